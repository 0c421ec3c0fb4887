"""Bootstrapping the tiny policy: trains, saves HF artefacts, measures, and is reused."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prm_ray.artifacts import POLICY_CARD
from prm_ray.policy.bootstrap import bootstrap
from prm_ray.tokens import render_prompt


@pytest.fixture(scope="module")
def small_cfg(tiny_trained_policy):
    return tiny_trained_policy[0]


@pytest.fixture(scope="module")
def card(tiny_trained_policy):
    return tiny_trained_policy[1]


def test_training_lowers_the_loss_and_records_everything(card, small_cfg):
    hist = card["train"]
    assert card["reused"] is False
    history = json.loads((Path(small_cfg.out) / "train_history.json").read_text())
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    assert card["rollout_temperature"] == 0.8
    m = card["metrics"]
    assert m["problems"] == 6 and m["samples"] == 4 and m["split"] == "validation"
    assert 0.0 <= m["pass@1"] <= m["pass@4"] <= 1.0
    assert sum(m["verify_status"].values()) == 24
    assert hist["params"] > 0 and hist["train_seconds"] > 0


def test_saved_policy_loads_with_from_pretrained(card, small_cfg):
    tok = AutoTokenizer.from_pretrained(small_cfg.out)
    model = AutoModelForCausalLM.from_pretrained(small_cfg.out)
    assert model.config.model_type == "llama"
    prompt = render_prompt(tok, "3+4")
    assert prompt == "<s>Q: 3+4\n"
    ids = tok(prompt + "Step 1: 3+4 = 7", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert tok.decode(ids[0], skip_special_tokens=True) == "Q: 3+4\nStep 1: 3+4 = 7"


def test_finished_policy_is_reused_not_retrained(card, small_cfg):
    again = bootstrap(small_cfg, progress=False)
    assert again["reused"] is True
    assert again["metrics"] == card["metrics"]
    assert (Path(small_cfg.out) / "bootstrap_config.yaml").exists()
    assert json.loads((Path(small_cfg.out) / POLICY_CARD).read_text())["seed"] == 0


def test_temperature_calibration_picks_the_candidate_closest_to_target(tiny_trained_policy, tmp_path):
    from dataclasses import replace

    from prm_ray.policy.bootstrap import calibrate_temperature
    from prm_ray.tasks.arith import ArithTask

    cfg = tiny_trained_policy[0]
    tok = AutoTokenizer.from_pretrained(cfg.out)
    model = AutoModelForCausalLM.from_pretrained(cfg.out).eval()
    ecfg = replace(cfg.eval, temperature=None, calibration_temperatures=[0.3, 3.0],
                   calibration_problems=4, samples=2, target_pass1=0.0)
    chosen, table = calibrate_temperature(model, tok, ArithTask(cfg.arith), ecfg)
    assert [row["temperature"] for row in table] == [0.3, 3.0]
    assert chosen == min(table, key=lambda r: r["pass@1"])["temperature"]


def test_emulated_bf16_is_named_with_the_flag_that_avoids_it(monkeypatch, small_cfg, tmp_path):
    """On a CPU without native bf16 the bootstrap's bf16 autocast is 10-30x slower (measured): the
    user is told, with the flag, rather than the recipe changed behind their back."""
    from dataclasses import replace

    import prm_ray.policy.bootstrap as bootstrap_module

    monkeypatch.setattr(bootstrap_module, "cpu_has_native_bf16", lambda: False)
    cfg = replace(small_cfg, out=str(tmp_path / "p"), steps=1, train_problems=16, bf16=True)
    with pytest.warns(UserWarning, match="--bf16 false"):
        bootstrap_module.train_policy(cfg, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bootstrap_module.train_policy(replace(cfg, bf16=False), progress=False)
