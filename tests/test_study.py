"""A tiny end-to-end scale_responses study: rollouts -> PRMs -> evaluation -> report, then reuse."""

import json
import re
import sys
from pathlib import Path

import pytest
from conftest import TINY_ARITH

from prm_ray.config import ConfigError, from_dict
from prm_ray.study import (
    CompareObjectivesConfig,
    ScaleResponsesConfig,
    compare_objectives_specs,
    scale_instructions_specs,
    ScaleInstructionsConfig,
    scale_responses_specs,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))


def _tiny(policy: str, runs: Path) -> dict:
    roll = {"arith": TINY_ARITH, "sampling": {"max_tokens": 48}}
    return {
        "runs_dir": str(runs), "policy": policy, "headline_n": 4, "responses": [4],
        "train_rollouts": {**roll, "limit": 48, "shard_size": 16, "sampling": {"n": 4, "max_tokens": 48}},
        "test_rollouts": {**roll, "limit": 8, "shard_size": 8, "sampling": {"n": 8, "max_tokens": 48}},
        "train": {"beta": 0.5, "lr": 3e-3, "epochs": 2, "global_batch_size": 16, "micro_batch_size": 8,
                  "num_workers": 1, "cpus_per_worker": 0.5, "warmup_ratio": 0.0, "reference": True},
        # With the reference at training and inference (not the study default): exercises the
        # shared reference passes of the training and the test responses.
        "eval": {"replicas": 1, "batch_size": 32, "reference": True, "dtype": "float32"},
    }


def test_study_configs_keep_their_own_nested_defaults():
    cfg = from_dict(ScaleResponsesConfig, {"test_rollouts": {"limit": 5}})
    assert cfg.test_rollouts.split == "test" and cfg.test_rollouts.sampling.n == 64
    assert cfg.test_rollouts.limit == 5 and cfg.train_rollouts.sampling.n == 8
    with pytest.raises(ConfigError, match="responses"):
        from_dict(ScaleResponsesConfig, {"responses": [1, 16]})
    with pytest.raises(ConfigError, match="held-out"):
        from_dict(ScaleResponsesConfig, {"test_rollouts": {"split": "train"}})
    with pytest.raises(ConfigError, match="objectives"):
        from_dict(CompareObjectivesConfig, {"objectives": ["ce", "ppo"]})


def test_grids():
    specs = scale_responses_specs(ScaleResponsesConfig())
    assert [s.name for s in specs] == ["ce-k1", "ce-k2", "ce-k4", "ce-k8", "dpo-k1", "dpo-k2", "dpo-k4", "dpo-k8"]
    assert [s.name for s in specs if s.undefined] == ["dpo-k1"]
    assert [s.instruction_fraction for s in scale_instructions_specs(ScaleInstructionsConfig())] == [0.25, 0.5, 0.75, 1.0]
    cmp = compare_objectives_specs(CompareObjectivesConfig())
    assert [(s.objective, s.balance) for s in cmp[:6]] == [("ce", "none"), ("ce", "dataset"), ("ce", "instruction"),
                                                           ("dpo", "none"), ("kto", "none"), ("nca", "none")]
    assert {(s.reference_train, s.reference_infer) for s in cmp[6:]} == {(True, True), (True, False), (False, True)}


def test_scale_responses_end_to_end(tiny_trained_policy, ray_session, tmp_path):
    import scale_responses

    cfg = _tiny(tiny_trained_policy[0].out, tmp_path / "runs")
    argv = ["--config", str(tmp_path / "cfg.json")]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))  # JSON is YAML
    report = scale_responses.main(argv)
    run = tmp_path / "runs" / "scale_responses"
    for f in ("report.md", "report.json", "bon_vs_n.png", "scaling.png", "stages.png", "config.yaml"):
        assert (run / f).stat().st_size > 0, f
    saved = json.loads((run / "report.json").read_text())
    by = {r["name"]: r for r in saved["results"]}
    assert set(by) == {"ce-k4", "dpo-k4"}  # (DPO at k=1, undefined, is checked in test_grids)
    for name in ("ce-k4", "dpo-k4"):
        r = by[name]
        assert r["objective"] == name.split("-")[0] and r["reference"] is True
        assert r["responses_per_instruction"] == int(name[-1])
        keys = {f"{k}@{n}" for k in ("pass", "majority", "bon", "weighted_mv") for n in (1, 2, 4, 8)}
        assert set(r["metrics"]) == keys
        assert all(0.0 <= v <= 1.0 for v in r["metrics"].values())
    # The policy-only numbers agree with the rollouts themselves.
    base = saved["baseline"]
    assert base["pass@1"] == pytest.approx(saved["stages"][2]["pass@1"])
    assert base["pass@8"] == pytest.approx(saved["stages"][2]["pass@N"])
    # Every best-of-N number in report.md is the one in report.json.
    md = (run / "report.md").read_text()
    for name in ("ce-k4", "dpo-k4"):
        row = re.search(rf"^\| {re.escape(name)} \| (.*) \|$", md, re.M).group(1).split(" | ")
        assert row == [f"{100 * by[name]['metrics'][f'bon@{n}']:.1f}" for n in (1, 2, 4, 8)]
    lik = saved["baseline_likelihood"]
    assert set(lik) == set(base) and lik["pass@1"] == base["pass@1"]
    assert {s["stage"] for s in saved["stages"]} >= {"train rollouts", "test rollouts", "train ce-k4", "eval ce-k4"}
    assert report["results"] == saved["results"]

    # Submitting again reuses every stage and gives the same numbers.
    again = scale_responses.main(argv)
    assert all(s["reused"] for s in again["stages"]), again["stages"]
    assert [r["metrics"] for r in again["results"]] == [r["metrics"] for r in saved["results"]]
