"""Shared fixtures: a tiny random Llama with the project's char tokenizer, built once per session."""

from __future__ import annotations

import os

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

    # address="local": never attach to a `ray start` head (e.g. one left up by `make demo`).
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


TINY_ARITH = dict(min_steps=1, max_steps=2, ops="+", num_train=200, num_validation=50, num_test=50)


@pytest.fixture(scope="session")
def tiny_trained_policy(tmp_path_factory):
    """A tiny policy really trained by the bootstrap on an easy arith world (some answers right).

    Returns (config, policy card); the HF model directory is `config.out`.
    """
    from prm_ray.bootstrap import BootstrapConfig, EvalConfig, bootstrap
    from prm_ray.policy import ModelShape
    from prm_ray.tasks.arith import ArithConfig

    cfg = BootstrapConfig(
        out=str(tmp_path_factory.mktemp("trained_policy")),
        arith=ArithConfig(**TINY_ARITH),
        model=ModelShape(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                         max_position_embeddings=128),
        train_problems=500, steps=60, batch_size=16, lr=1e-2,
        eval=EvalConfig(num_problems=6, samples=4, max_new_tokens=48, temperature=0.8),
    )
    return cfg, bootstrap(cfg, progress=False)


@pytest.fixture(scope="session")
def tiny_rollouts(tiny_trained_policy, ray_session, tmp_path_factory):
    """Real rollouts of the tiny trained policy (6 validation instructions x 4, 3 shards), made
    once: a vLLM engine start costs ~30 s here. Returns (out dir, summary). Do not write into it."""
    from prm_ray.rollout import RolloutConfig, SamplingConfig, run_rollouts
    from prm_ray.tasks.arith import ArithConfig

    out = tmp_path_factory.mktemp("rollouts") / "clean"
    cfg = RolloutConfig(model=tiny_trained_policy[0].out, out=str(out), task="arith", split="validation", limit=6,
                        shard_size=2, sampling=SamplingConfig(n=4, max_tokens=48), arith=ArithConfig(**TINY_ARITH),
                        progress=False)
    return out, run_rollouts(cfg)
