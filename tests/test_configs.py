"""The shipped YAML configs load into the typed configs (no unknown or mistyped fields)."""

import dataclasses
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


PAPER = sorted((CONFIGS / "paper").rglob("*.yaml"))


@pytest.mark.parametrize("path", PAPER, ids=[str(p.relative_to(CONFIGS / "paper")) for p in PAPER])
def test_make_paper_config_loads_into_its_jobs_config(path):
    """`make paper` runs configs/paper/<job>[/<part>].yaml with jobs/<job>.py (the Makefile's rule)."""
    import importlib.util

    job = path.relative_to(CONFIGS / "paper").parts[0].removesuffix(".yaml")
    spec = importlib.util.spec_from_file_location(job, CONFIGS.parent / "jobs" / f"{job}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = from_dict(module.CONFIG, load_yaml(path))
    assert cfg.seeds == [0, 1, 2] and cfg.test_rollouts.limit == 500 and cfg.test_rollouts.sampling.n == 64
    # fp32 everywhere, what every committed result ran in: `auto` would pick bf16 on a CPU with it.
    pinned = [cfg.train_rollouts.engine.dtype, cfg.test_rollouts.engine.dtype, cfg.validation_rollouts.engine.dtype,
              cfg.train.precision, cfg.train.ref_pass.dtype, cfg.eval.dtype]
    assert set(pinned) == {"float32"}  # (Math-Shepherd's completions run on train_rollouts' engine)


def test_make_paper_splits_table1_by_generator_with_the_same_prms():
    """Table 1's parts rerank different test responses with the same PRMs (one training config)."""
    from prm_ray.study import CompareObjectivesConfig

    parts = {p.stem: from_dict(CompareObjectivesConfig, load_yaml(p))
             for p in (CONFIGS / "paper" / "compare_objectives").glob("table1*.yaml")}
    assert sorted(parts) == ["table1", "table1-stronger", "table1-weaker"]
    assert parts["table1"].test_generator is None
    assert parts["table1-weaker"].test_generator.bootstrap and parts["table1-stronger"].test_generator.temperature
    for cfg in parts.values():
        assert (cfg.objectives, cfg.train, cfg.train_rollouts, cfg.seeds) == (
            parts["table1"].objectives, parts["table1"].train, parts["table1"].train_rollouts, parts["table1"].seeds)


def test_make_demo_is_make_papers_scale_responses_made_smaller_on_the_test_side_only():
    """configs/demo.yaml trains the PRMs of `make paper`'s scale_responses (its seed 0) and cuts only
    the test side; with the `first` protocol its best-of-16 is the same N samples as the paper's."""
    from prm_ray.study import ScaleResponsesConfig

    demo = from_dict(ScaleResponsesConfig, load_yaml(CONFIGS / "demo.yaml"))
    paper = from_dict(ScaleResponsesConfig, load_yaml(CONFIGS / "paper" / "scale_responses.yaml"))
    assert (demo.train, demo.train_rollouts, demo.responses, demo.objectives) == (
        paper.train, paper.train_rollouts, paper.responses, paper.objectives)
    assert demo.seeds == paper.seeds[:1] and demo.validation_rollouts == paper.validation_rollouts
    assert demo.eval == paper.eval and demo.eval.protocol == "first"
    assert demo.headline_n <= demo.test_rollouts.sampling.n <= paper.test_rollouts.sampling.n
    assert demo.test_rollouts.limit < paper.test_rollouts.limit
    # The same sampling (seed included) but for n: each sample's seed is its index's, so the
    # demo's 16 are the first 16 of the paper's 64.
    smaller = dataclasses.replace(paper.test_rollouts, limit=demo.test_rollouts.limit, sampling=dataclasses.replace(
        paper.test_rollouts.sampling, n=demo.test_rollouts.sampling.n))
    assert demo.test_rollouts == smaller
