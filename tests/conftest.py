"""Shared fixtures: a tiny random Llama with the project's char tokenizer, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never use the Hugging Face Hub (there is no network in CI): a model id that is not a local
# path must fail at once, not after the hub client's retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch
from transformers import LlamaForCausalLM

from prm_ray.policy import ModelShape, build_char_tokenizer


def _save_tiny_model(path, seed: int) -> str:
    torch.manual_seed(seed)
    shape = ModelShape(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                       max_position_embeddings=256)
    model = LlamaForCausalLM(shape.to_config())
    model.save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_policy_path(tmp_path_factory) -> str:
    """A random tiny Llama saved in HF format (the 'reference' / policy in tests)."""
    return _save_tiny_model(tmp_path_factory.mktemp("tiny_policy"), seed=0)


@pytest.fixture(scope="session")
def tiny_prm_path(tmp_path_factory) -> str:
    """A second random tiny Llama with the same tokenizer (stands in for a trained PRM)."""
    return _save_tiny_model(tmp_path_factory.mktemp("tiny_prm"), seed=1)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the session (start-up is seconds; per-test clusters would dominate)."""
    import ray

    # Two settings that only trim Ray's idle waits, which dominate a suite of many small runs:
    # Ray Train's controller polls its workers every 0.5 s instead of 2 s (each of the suite's ~15
    # trainings notices its end, or a killed worker, sooner), and up to 8 idle workers stay warm
    # instead of being killed after 1 s beyond 2, so the many short Ray Data pipelines reuse them
    # (measured here: 4.7 -> 3.7 s for a read -> actor -> write pipeline).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # With a dashboard, on a port of its own that every worker is told: Ray Train's
    # PlacementGroupCleaner asks the state API (the dashboard) whether its controller is alive.
    # Without one each training stalled 12 s at its end on that query's timeout; and a worker not
    # told asks "the latest cluster" on the machine, e.g. a `make demo` head, where the controller
    # is unknown, i.e. dead. The workers inherit the variable from the raylet that ray.init starts;
    # this process drops it again, since it overrides every explicit address given to Ray's job
    # and state clients (the cluster tests' private heads).
    from local_cluster import free_ports  # tests/ is on sys.path under pytest

    [port] = free_ports(1)  # outside the ephemeral range, where Ray's own random ports could take it
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        # address="local": never attach to a `ray start` head (e.g. one left up by `make demo`).
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_port=port, log_to_driver=False,
                 logging_level="WARNING",
                 _system_config={"num_workers_soft_limit": 8, "idle_worker_killing_time_threshold_ms": 600_000})
    finally:
        del os.environ["RAY_API_SERVER_ADDRESS"]
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_instance(ray_session):
    """Ray Serve on the session's Ray, HTTP on a free local port; modules deploy their own
    applications on it (and delete them, so their replicas' CPUs return to the pool)."""

    from local_cluster import free_ports
    from ray import serve

    [port] = free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


TINY_ARITH = dict(min_steps=1, max_steps=2, ops="+", num_train=200, num_validation=50, num_test=50)


@pytest.fixture(scope="session")
def tiny_trained_policy(tmp_path_factory):
    """A tiny policy really trained by the bootstrap on an easy arith world (some answers right).

    Returns (config, policy card); the HF model directory is `config.out`.
    """
    from prm_ray.policy import ModelShape
    from prm_ray.policy.bootstrap import BootstrapConfig, PolicyEvalConfig, bootstrap
    from prm_ray.resources import cpu_has_native_bf16
    from prm_ray.tasks.arith import ArithConfig

    cfg = BootstrapConfig(
        out=str(tmp_path_factory.mktemp("trained_policy")),
        arith=ArithConfig(**TINY_ARITH),
        model=ModelShape(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                         max_position_embeddings=128),
        train_problems=500, steps=60, batch_size=16, lr=1e-2,
        bf16=cpu_has_native_bf16(),  # emulated bf16 is 10x+ slower (AVX2-only CI machines)
        eval=PolicyEvalConfig(num_problems=6, samples=4, max_new_tokens=48, temperature=0.8),
    )
    return cfg, bootstrap(cfg, progress=False)


@pytest.fixture(scope="session")
def tiny_rollouts(tiny_trained_policy, ray_session, study_runs):
    """Real rollouts of the tiny trained policy (6 validation instructions x 4, 3 shards), made
    once: a vLLM engine start costs ~30 s here. They are the tiny study's validation rollouts, made
    where the study keeps them, so the study reuses them. Returns (out dir, summary). Do not write
    into it."""
    from prm_ray.config import from_dict
    from prm_ray.stages.rollout import run_rollouts
    from prm_ray.study import ScaleResponsesConfig
    from prm_ray.study.specs import rollout_dir

    study = from_dict(ScaleResponsesConfig, tiny_study(tiny_trained_policy[0].out, study_runs))
    cfg = study.validation_rollouts
    cfg.model, cfg.progress = study.policy, False
    cfg.out = str(rollout_dir(study, cfg))
    return Path(cfg.out), run_rollouts(cfg)


def tiny_study(policy: str, runs: Path) -> dict:
    """A scale_responses study small enough for a test (its training rollouts are the ones
    `tiny_train_rollouts` makes, so the study reuses them)."""
    roll = {"arith": TINY_ARITH, "sampling": {"max_tokens": 48}}
    return {
        "runs_dir": str(runs), "policy": policy, "headline_n": 4, "responses": [4], "seeds": [0],
        "intervals": {"draws": 200},
        "train_rollouts": {**roll, "limit": 48, "shard_size": 16, "sampling": {"n": 4, "max_tokens": 48}},
        "test_rollouts": {**roll, "limit": 8, "shard_size": 8, "sampling": {"n": 8, "max_tokens": 48}},
        # `tiny_rollouts` (6 validation instructions x 4, in 3 shards): made once for the session.
        "validation_rollouts": {**roll, "limit": 6, "shard_size": 2, "sampling": {"n": 4, "max_tokens": 48}},
        "train": {"beta": 0.5, "lr": 3e-3, "epochs": 2, "global_batch_size": 16, "micro_batch_size": 8,
                  "workers": {"replicas": 1, "num_cpus": 0.5}, "warmup_ratio": 0.0, "use_reference": True},
        # With the reference at training and inference (not the study default): exercises the
        # shared reference passes of the training and the test responses.
        "eval": {"replicas": 1, "batch_size": 32, "use_reference": True, "dtype": "float32"},
    }


@pytest.fixture(scope="session")
def study_runs(tmp_path_factory) -> Path:
    """One runs_dir for the session's studies: they reuse each other's (and the training tests')
    rollouts and PRMs."""
    return tmp_path_factory.mktemp("study_runs")


@pytest.fixture(scope="session")
def tiny_train_rollouts(tiny_trained_policy, ray_session, study_runs) -> Path:
    """Real rollouts of the tiny trained policy, 48 train instructions x 4, made once where the tiny
    study keeps its training rollouts (an engine start and 192 samples saved there)."""
    import copy

    from prm_ray.config import from_dict
    from prm_ray.stages.rollout import run_rollouts
    from prm_ray.study import ScaleResponsesConfig
    from prm_ray.study.specs import rollout_dir

    cfg = from_dict(ScaleResponsesConfig, tiny_study(tiny_trained_policy[0].out, study_runs))
    rc = copy.deepcopy(cfg.train_rollouts)
    rc.model, rc.progress = cfg.policy, False
    out = rollout_dir(cfg, rc)
    rc.out = str(out)
    run_rollouts(rc)
    return out


@pytest.fixture(scope="session")
def tiny_train_ref_cache(tiny_trained_policy, tiny_train_rollouts, study_runs) -> Path:
    """Per-token reference log-probs of `tiny_train_rollouts` (the policy is the reference), made
    once where the tiny study keeps them: the training tests read them as `ref_cache` instead of
    each running a reference pass, and the study reuses them."""
    from dataclasses import replace

    from prm_ray.config import from_dict
    from prm_ray.stages.evaluate import reference_logprobs
    from prm_ray.study import ScaleResponsesConfig
    from prm_ray.study.specs import reference_dir

    cfg = from_dict(ScaleResponsesConfig, tiny_study(tiny_trained_policy[0].out, study_runs))
    dtype = cfg.train.ref_pass.resolved().dtype  # what the study resolves `auto` to here
    out = reference_dir(cfg, tiny_train_rollouts, dtype)
    reference_logprobs(tiny_train_rollouts, cfg.policy, out, replace(cfg.eval.pass_config(), dtype=dtype))
    return out
