"""The default policy shipped in artifacts/policy is what `jobs/bootstrap_policy.py` produces today."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from prm_ray.artifacts import POLICY_CARD
from prm_ray.config import to_dict
from prm_ray.policy.bootstrap import BootstrapConfig, PolicyEvalConfig, evaluate_policy
from prm_ray.tasks.arith import ArithTask

POLICY = Path(__file__).resolve().parent.parent / "artifacts" / "policy"


@pytest.fixture(scope="module")
def card():
    return json.loads((POLICY / POLICY_CARD).read_text())


def test_shipped_policy_was_trained_with_the_current_defaults():
    recorded = yaml.safe_load((POLICY / "bootstrap_config.yaml").read_text())
    current = to_dict(BootstrapConfig())
    # Where the files went and whether --overwrite was given do not change the weights.
    for key in ("out", "overwrite"):
        recorded.pop(key), current.pop(key)
    assert recorded == current


def test_card_meets_the_targets(card):
    m = card["metrics"]
    assert m["split"] == "validation" and m["problems"] >= 300
    assert 0.30 <= m["pass@1"] <= 0.70
    assert m["pass@16"] >= 0.85
    assert m["majority@16"] > m["pass@1"] and m["likelihood_bon@16"] > m["pass@1"]


def test_weights_reproduce_the_card_on_a_fresh_sample(card):
    tok = AutoTokenizer.from_pretrained(POLICY)
    model = AutoModelForCausalLM.from_pretrained(POLICY).eval()
    cfg = replace(PolicyEvalConfig(), temperature=card["rollout_temperature"], num_problems=48, seed=99)
    m = evaluate_policy(model, tok, ArithTask(**card["arith"]), cfg)
    # 48 problems x 16 samples: the standard error of pass@1 is about 0.05.
    assert abs(m["pass@1"] - card["metrics"]["pass@1"]) < 0.15
    assert m["pass@16"] >= 0.85
