"""The shipped YAML configs load into the typed configs (no unknown or mistyped fields)."""

from pathlib import Path

import pytest

from prm_ray.config import from_dict, load_yaml
from prm_ray.stages.rollout import RolloutConfig
from prm_ray.stages.train import TrainConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name,cls", [("llama3-8b-math-rollout.yaml", RolloutConfig),
                                      ("llama3-8b-math-train.yaml", TrainConfig)])
def test_shipped_config_is_valid(name, cls):
    cfg = from_dict(cls, load_yaml(CONFIGS / name))
    assert "Llama-3.1-8B-Instruct" in cfg.model


def test_shipped_study_config_is_valid():
    from prm_ray.study import CompareBaselinesConfig, CompareObjectivesConfig, ScaleResponsesConfig

    data = load_yaml(CONFIGS / "llama3-8b-math.yaml")
    cfg = from_dict(ScaleResponsesConfig, data)
    assert cfg.policy.endswith("Llama-3.1-8B-Instruct") and not cfg.bootstrap_if_missing
    assert cfg.test_rollouts.task == "math" and cfg.test_rollouts.sampling.n == 64
    assert cfg.train.strategy == "fsdp" and cfg.eval.num_gpus == 1
    from_dict(CompareObjectivesConfig, data)
    assert from_dict(CompareBaselinesConfig, data).shepherd.completions_per_step == 8
