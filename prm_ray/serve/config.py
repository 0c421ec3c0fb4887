"""The scoring service's config: what it serves, its request limits, batching and replicas."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from prm_ray.artifacts import read_prm_card
from prm_ray.config import ConfigError, param
from prm_ray.core.metrics import VOTE_ON
from prm_ray.core.reward import AGGREGATIONS
from prm_ray.models import context_length, device_for
from prm_ray.resources import Resources, check_dtype, resolve_dtype
from prm_ray.scoring import ImplicitPRM

__all__ = ["DEFAULT_BETA", "TOKEN_ENV", "AutoscalingConfig", "ServeConfig", "check_implicit", "checkpoint_beta",
           "check_token_budget", "load_scorer_prm", "resolved_config"]

DEFAULT_BETA = 0.05
TOKEN_ENV = "PRM_RAY_SERVE_TOKEN"


@dataclass
class AutoscalingConfig:
    """Serve's replica autoscaling (replaces ``replicas`` when set)."""

    min_replicas: int = param(1, "replicas at the least")
    max_replicas: int = param(2, "replicas at the most")
    target_ongoing_requests: float = param(32.0, "requests in flight per replica that autoscaling aims for (one "
                                                 "full batch keeps the model busy without growing queues)")
    upscale_delay_s: float = param(10.0, "seconds of high load before adding a replica")
    downscale_delay_s: float = param(60.0, "seconds of low load before removing one")

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ConfigError(f"autoscaling: need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                              f"got {self.min_replicas}, {self.max_replicas}")
        if self.target_ongoing_requests <= 0:
            raise ConfigError(f"autoscaling.target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")


@dataclass(kw_only=True)
class ServeConfig(Resources):
    """Serve an implicit PRM over HTTP (POST /score, POST /rerank, GET /health)."""

    prm: str = param(dataclasses.MISSING, "the PRM checkpoint (a Hugging Face directory)")
    reference_model: str | None = param(None, "the reference model; null scores \"w/o ref\" (paper Table 4: "
                                              "beta x log pi_phi)")
    beta: float | None = param(None, "null: the beta the PRM was trained with (its prm_ray_prm.json), else 0.05")
    aggregation: str = param("min", "the default when a request names none: min, sum, last_q, mean, min_q, sum_q, last or prod")
    dtype: str = param("auto", "the models' dtype: auto (bfloat16 on GPUs and on CPUs with native bf16, else "
                               "float32), bfloat16, float32, float16 or float64")
    step_separator: str = param("\n\n", "what splits a response into steps")
    chat_template: bool = param(True, "render prompts with the model's chat template")
    max_batch_size: int = param(32, "responses per forward pass (a /rerank of N responses counts N)")
    max_batch_tokens: int | None = param(None, "cap batches by padded tokens (responses x longest sequence) instead "
                                               "of max_batch_size responses: on accelerators, large batches of short "
                                               "responses and small ones of long responses; at least the model's "
                                               "context; null: max_batch_size caps")
    batch_wait_timeout_s: float = param(0.01, "how long a batch waits to fill")
    max_ongoing_requests: int | None = param(None, "requests a replica accepts at once; null: max(64, 2 x "
                                                   "max_batch_size), so the next batch fills while one runs "
                                                   "(small values make Serve's router back off: 12 s p50 at 2)")
    max_responses: int = param(64, "responses per /rerank request")
    max_chars: int = param(16384, "characters per text field")
    max_request_steps: int = param(256, "entries of a /score request's steps list")
    share_prompt: bool = param(True, "run a shared prompt once and fan its KV cache out to its responses ...")
    share_prompt_min_saving: float = param(0.25, "... when that cuts the batch's padded tokens by this share "
                                                 "(docs/serving.md)")
    vote_coef: float = param(0.001, "weighted vote: sigmoid(vote_coef x v), v per vote_on (the released eval: "
                                    "0.001 on the log-ratio)")
    vote_on: str = param("log_ratio", "what vote_coef multiplies: log_ratio (the score without beta, the released "
                                      "eval) or score (as eval.vote_on)")
    vote_groups: str = param("exact", "how /rerank's vote groups answers: exact = the extracted strings | math = "
                                      "equivalent answers vote together (math-verify in a deadline pool on the "
                                      "replica, as the rollouts' answer_group; adds its comparisons to the latency)")
    autoscaling: AutoscalingConfig | None = param(None, "")
    host: str = param("127.0.0.1", "HTTP bind address (serve-config files set it in http_options)")
    port: int = param(8000, "HTTP port")
    name: str = param("prm-scorer", "the Serve application name (serve.get_app_handle(name))")
    route_prefix: str = param("/", "URL prefix of the routes")
    auth_token_env: str = param(TOKEN_ENV, "bearer-token auth is on when this environment variable is set")
    ray_address: str | None = param(None, "jobs/serve_scorer.py: null starts or joins a local Ray")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prm:
            raise ConfigError("config field 'prm' must name a PRM checkpoint")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"beta must be a finite number > 0, got {self.beta}")
        check_dtype(self.dtype, "dtype")
        if not self.step_separator:
            raise ConfigError("step_separator must be a non-empty string")
        for name in ("max_batch_size", "max_responses", "max_chars", "max_request_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ConfigError(f"max_batch_tokens must be >= 1 or null, got {self.max_batch_tokens}")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < 1:
            raise ConfigError(f"max_ongoing_requests must be >= 1, got {self.max_ongoing_requests}")
        if not 0 <= self.batch_wait_timeout_s <= 10:
            raise ConfigError(f"batch_wait_timeout_s must be in [0, 10], got {self.batch_wait_timeout_s}")
        if not 0 <= self.share_prompt_min_saving < 1:
            raise ConfigError(f"share_prompt_min_saving must be in [0, 1), got {self.share_prompt_min_saving}")
        if not (math.isfinite(self.vote_coef) and self.vote_coef > 0):
            raise ConfigError(f"vote_coef must be a finite number > 0, got {self.vote_coef}")
        if self.vote_on not in VOTE_ON:
            raise ConfigError(f"vote_on must be one of {VOTE_ON}, got {self.vote_on!r}")
        if self.vote_groups not in ("exact", "math"):
            raise ConfigError(f"vote_groups must be 'exact' or 'math', got {self.vote_groups!r}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"route_prefix must start with '/', got {self.route_prefix!r}")

    @property
    def ongoing_requests(self) -> int:
        return self.max_ongoing_requests or max(64, 2 * self.max_batch_size)


def checkpoint_beta(prm_path: str) -> float | None:
    """The beta a PRM was trained with, from its card; None when it has none (any HF model)."""
    try:
        beta = read_prm_card(prm_path).get("beta")
    except (OSError, ValueError, AttributeError):
        return None
    return float(beta) if isinstance(beta, (int, float)) and beta > 0 else None


def check_implicit(prm_path: str) -> None:
    """The service serves implicit PRMs: the batcher's shared-prompt plan and the token rewards of
    /score are implicit-PRM math. An explicit (step-labelled, Math-Shepherd) checkpoint is refused."""
    if read_prm_card(prm_path).get("kind") == "explicit":
        raise ConfigError(f"prm: {prm_path} is an explicit (step-labelled) PRM; the service serves implicit "
                          "PRMs. Score it in process with prm_ray.scoring.load_prm")


def check_token_budget(cfg: ServeConfig) -> None:
    """A token budget below the models' context would leave a valid long response no batch to join."""
    if cfg.max_batch_tokens is None:
        return
    limits = [x for x in (context_length(cfg.prm), cfg.reference_model and context_length(cfg.reference_model)) if x]
    if limits and cfg.max_batch_tokens < min(limits):
        raise ConfigError(f"max_batch_tokens ({cfg.max_batch_tokens}) must be at least the models' context "
                          f"({min(limits)} tokens), so that the longest valid response fits a batch")


def load_scorer_prm(cfg: ServeConfig) -> ImplicitPRM:
    """The PRM a replica serves: beta from the config, else the checkpoint's card, else 0.05."""
    check_implicit(cfg.prm)
    beta = cfg.beta or checkpoint_beta(cfg.prm) or DEFAULT_BETA
    return ImplicitPRM.from_pretrained(cfg.prm, ref_path=cfg.reference_model, beta=beta,
                                       step_separator=cfg.step_separator, aggregation=cfg.aggregation,
                                       device=device_for(cfg.num_gpus), dtype=cfg.dtype)


def resolved_config(cfg: ServeConfig) -> ServeConfig:
    """The config replicas get: local model paths made absolute where they were written (replicas
    may start in another directory; a Serve config is built on the cluster; hub ids and missing
    paths are kept), and ``dtype: auto`` resolved once, so every replica scores in one precision."""
    paths = {k: os.path.abspath(v) for k in ("prm", "reference_model")
             if isinstance(v := getattr(cfg, k), str) and not os.path.isabs(v) and os.path.exists(v)}
    return dataclasses.replace(cfg, **paths, dtype=resolve_dtype(cfg.dtype, cfg.num_gpus))
