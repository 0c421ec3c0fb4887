"""The command lines a newcomer meets: help that shows the real defaults, strict flags, one-line
errors (tracebacks behind --debug), stages that refuse to mix settings into one output, clear "not
found" for local paths, and a config reference that cannot drift from the code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from prm_ray.cli import build_parser, parse_args, run_job
from prm_ray.config import ConfigError
from prm_ray.policy.bootstrap import BootstrapConfig
from prm_ray.serve import ServeConfig
from prm_ray.stages.rollout import RolloutConfig
from prm_ray.stages.train import TrainConfig
from prm_ray.study import ScaleResponsesConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))


def _help(cls) -> str:
    return " ".join(build_parser(cls)[0].format_help().split())  # argparse wraps lines


def test_help_shows_each_fields_real_default_and_meaning():
    text = _help(BootstrapConfig)
    # The nested model's defaults are the bootstrap's (192 / 3 layers), not ModelShape's own (256 / 4).
    assert "--model.hidden_size V, --model.hidden-size V (int, default 192) width of the residual stream" in text
    assert "(int, default 3) transformer blocks" in text
    assert "(list[float], default [0.8, 1.0, 1.2, 1.4]) candidate temperatures" in text
    assert "--eval.temperature V (float or null, default null)" in text
    serve = _help(ServeConfig)
    assert "--prm V (str, default required)" in serve
    assert r"(str, default '\n\n') what splits a response into steps" in serve
    assert "(int, default 2 (the autoscaling section is off unless a field of it is set))" in serve
    study = _help(ScaleResponsesConfig)
    assert "--test_rollouts.split V, --test-rollouts.split V (str, default 'test')" in study
    assert "--test_rollouts.sampling.n V, --test-rollouts.sampling.n V (int, default 64)" in study
    # Test hooks are not user options.
    assert "debug_kill" not in _help(TrainConfig)


def test_a_list_flag_takes_commas_or_the_list_as_help_prints_it(capsys):
    for text in ("8", "2,8", "[2, 8]", " [2,8] "):
        cfg = parse_args(ScaleResponsesConfig, ["--responses", text, "--objectives", "[ce]"])
        assert cfg.responses == [int(x) for x in text.strip(" []").split(",")] and cfg.objectives == ["ce"]
    with pytest.raises(SystemExit):  # argparse's one-line error, naming the field
        parse_args(ScaleResponsesConfig, ["--responses", "[eight]"])
    assert "responses[0]" in capsys.readouterr().err


@pytest.mark.parametrize("argv, nearest", [(["--lim", "3"], "--limit"), (["--engine.dtyp", "float16"], "--engine.dtype"),
                                           (["--limt", "3"], "--limit")])
def test_an_abbreviated_or_unknown_flag_is_an_error_naming_the_nearest(argv, nearest, capsys):
    with pytest.raises(SystemExit):
        parse_args(RolloutConfig, argv)
    err = capsys.readouterr().err
    assert f"{argv[0]} (did you mean {nearest}?)" in err


def test_a_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    import train_prm

    argv = ["--data", str(tmp_path / "no-such-rollouts"), "--out", str(tmp_path / "prm")]
    with pytest.raises(SystemExit) as exit_info:
        train_prm.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: rollout dataset not found:") and "--debug" in err[0]
    with pytest.raises(FileNotFoundError, match="rollout dataset not found"):
        train_prm.main(argv + ["--debug"])


def test_run_job_reports_a_config_error_naming_the_field(capsys):
    def work(cfg):
        raise ConfigError("global_batch_size: 3 training examples are fewer than one global batch (64)")

    with pytest.raises(SystemExit):
        run_job(work, TrainConfig, [])
    assert capsys.readouterr().err.startswith("error: global_batch_size: 3 training examples")


def test_config_reference_is_generated_from_the_configs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_docs", ROOT / "scripts" / "config_docs.py")
    config_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_docs)
    assert (ROOT / "docs" / "config.md").read_text() == config_docs.render(), \
        "docs/config.md is out of date: run python scripts/config_docs.py"


def test_a_training_run_refuses_other_settings_in_its_output(tmp_path):
    """The check comes first: nothing is built or trained before the refusal."""
    from prm_ray.stages.train import train_prm
    from prm_ray.stages.train.driver import settings

    out = tmp_path / "prm"
    out.mkdir()
    data = str(tmp_path / "missing")
    (out / "settings.json").write_text(json.dumps(settings(TrainConfig(out=str(out), data=data, lr=1e-3))))
    with pytest.raises(ConfigError, match=r"different 'lr' \(0.001 vs 0.0005\).*--overwrite"):
        train_prm(TrainConfig(out=str(out), data=data))
    with pytest.raises(FileNotFoundError):  # --overwrite: cleared, then on to the (missing) data
        train_prm(TrainConfig(out=str(out), data=data, overwrite=True))
    assert not (out / "settings.json").exists() or json.loads((out / "settings.json").read_text())["lr"] == 5e-4


def test_a_policy_directory_refuses_other_settings(tmp_path):
    from prm_ray.policy.bootstrap import bootstrap

    shipped = ROOT / "artifacts" / "policy"
    with pytest.raises(ConfigError, match=r"different 'steps' \(1500 vs 10\)"):
        bootstrap(BootstrapConfig(out=str(shipped), steps=10))
    card = bootstrap(BootstrapConfig(out=str(shipped)))  # the same settings: reused, nothing retrained
    assert card["reused"] is True


def test_an_evaluation_refuses_another_config_in_its_output(tmp_path):
    from prm_ray.stages.evaluate import EvaluateConfig, evaluate_prm

    out = tmp_path / "eval"
    out.mkdir()
    key = {"prm": str(ROOT), "data": str(tmp_path), "beta": 0.05, "config": {"protocol": "first"}}
    (out / "metrics.json").write_text(json.dumps({"key": key}))
    with pytest.raises(ConfigError, match="an evaluation made with a different 'config"):
        evaluate_prm(str(ROOT / "artifacts" / "policy"), tmp_path, out, EvaluateConfig())


def test_a_missing_local_path_is_not_found_at_once(tmp_path, monkeypatch):
    from prm_ray.scoring import ImplicitPRM

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the heuristic itself, not the offline switch
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for path in ("runs/prm-ce", "./prm-ce", str(tmp_path / "prm-ce"), "a/b/c"):
        with pytest.raises(FileNotFoundError, match="PRM not found: .*prm-ce|PRM not found: .*a/b/c"):
            ImplicitPRM.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="reference model not found"):
        ImplicitPRM.from_pretrained(str(ROOT / "artifacts" / "policy"), ref_path="runs/missing-ref")


def test_the_shipped_tokenizer_knows_the_models_context():
    from transformers import AutoConfig, AutoTokenizer

    policy = ROOT / "artifacts" / "policy"
    assert AutoTokenizer.from_pretrained(policy).model_max_length == AutoConfig.from_pretrained(
        policy).max_position_embeddings == 256
