"""The training config: what to train on, the objective's hyperparameters, and where it runs."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from prm_ray.config import ConfigError, param
from prm_ray.core.objectives import get_objective
from prm_ray.core.reward import LOGPROB_CHUNK
from prm_ray.resources import Resources, resolve_dtype
from prm_ray.stages.logprobs import LogprobPassConfig
from prm_ray.stages.train.examples import DatasetConfig
from prm_ray.stages.train.parallel import STRATEGIES

__all__ = ["LOGGERS", "TRAIN_PRECISIONS", "TrainConfig", "absolute_paths"]

LOGGERS = ("tensorboard", "wandb", "mlflow")
TRAIN_PRECISIONS = ("auto", "bfloat16", "float32")


def _workers() -> Resources:
    # Training workers must leave CPUs for Ray Data's ingest tasks: if they reserve every CPU,
    # the dataset is never read and the run hangs. 2 workers x 0.5 fit a 2-core laptop.
    return Resources(replicas=2, num_cpus=0.5)


def _ref_pass() -> LogprobPassConfig:
    return LogprobPassConfig(micro_batch_size=16)


@dataclass
class TrainConfig:
    """Train an implicit PRM (or an explicit, step-labelled one) from rollouts with Ray Train."""

    data: str = param("runs/rollouts/train", "the rollout set (or a step-labelled set for math-shepherd-*)")
    model: str = param("artifacts/policy", "the PRM starts from this model")
    reference_model: str | None = param(None, "the reference pi_ref; null: the same as model (the policy)")
    out: str = param("runs/prm", "output directory: a Hugging Face model directory plus the run's records")
    dataset: DatasetConfig = param(factory=DatasetConfig, help="")
    use_reference: bool = param(True, "false: the paper's \"w/o ref\" training (Table 4): r = beta x log pi_phi")
    beta: float = param(0.05, "the implicit reward's scale, r = beta x log(pi_phi / pi_ref)")
    lr: float = param(5e-4, "peak learning rate (AdamW)")
    min_lr_ratio: float = param(0.1, "the cosine schedule ends at lr x this")
    warmup_ratio: float = param(0.03, "share of the optimizer steps spent warming up")
    weight_decay: float = param(0.0, "AdamW weight decay")
    epochs: int = param(1, "passes over the training examples")
    global_batch_size: int = param(64, "examples per optimizer step, over all workers")
    micro_batch_size: int = param(16, "examples per forward pass per worker (gradient accumulation fills the rest)")
    group_by_length: bool = param(True, "split each optimizer step's rows into micro-batches of similar length "
                                        "(less padding; the same rows per step, so the same gradient sum)")
    max_grad_norm: float = param(1.0, "gradient clipping")
    precision: str = param("auto", "bfloat16: compute in bf16 (ddp: autocast; fsdp: bf16 parameter copies), "
                                   "weights and optimizer stay float32 | float32 | "
                                   "auto: bfloat16 on GPUs and on CPUs with native bf16, else float32")
    logprob_chunk: int = param(LOGPROB_CHUNK, "response positions per LM-head chunk: the [tokens, vocab] float32 "
                                              "logits never exist whole, backward recomputes each chunk's; "
                                              "0: the model's full logits")
    compile: bool = param(False, "torch.compile each transformer block (GPUs: faster steps after a first, slow "
                                 "compile)")
    max_optimizer_steps: int | None = param(None, "stop after this many optimizer steps; null: every epoch")
    kto_desirable_weight: float = param(1.0, "KTO's lambda_D")
    kto_undesirable_weight: float = param(1.0, "KTO's lambda_U")
    workers: Resources = param(factory=_workers, help="the Ray Train workers (threads: torch threads each)")
    strategy: str = param("ddp", "ddp: a full replica per worker | fsdp: FSDP2, parameters, gradients and "
                                 "optimizer state sharded over the workers (big models)")
    checkpoint_every: int = param(50, "optimizer steps between checkpoints (a killed worker resumes from the last)")
    max_failures: int = param(2, "worker-group restarts Ray Train may make")
    storage_path: str | None = param(None, "Ray Train storage; must be shared (NFS, s3://) on several nodes; "
                                           "null: <out>/ray")
    ref_pass: LogprobPassConfig = param(factory=_ref_pass, help="the reference log-prob pass before training")
    step_label_tokens: list[str] = param(factory=lambda: ["+", "-"],
                                         help="explicit PRMs: the two single tokens whose logits at a step's last "
                                              "token give its score, logit(+) - logit(-)")
    ref_cache: str | None = param(None, "per-token reference log-probs of the rollouts (prm_ray.stages.evaluate."
                                        "reference_logprobs, in ref_pass.dtype resolved): responses found there skip the "
                                        "reference pass")
    loggers: list[str] = param(factory=lambda: ["tensorboard"],
                               help="where metrics go besides metrics.jsonl: tensorboard (<out>/tensorboard), "
                                    "wandb, mlflow (each when installed)")
    seed: int = param(0, "model init order, data shuffle and dropout seeds")
    overwrite: bool = param(False, "replace an output directory trained with other settings (else refused)")
    ray_address: str | None = param(None, "null: RAY_ADDRESS, a running local cluster, or a new one")
    debug_kill_rank: int | None = param(None, "test hook: SIGKILL this rank's worker ...", hidden=True)
    debug_kill_at_step: int | None = param(None, "test hook: ... at this step, on the first attempt", hidden=True)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        per_step = self.micro_batch_size * self.workers.replicas
        if self.micro_batch_size < 1 or self.global_batch_size % per_step:
            raise ConfigError(f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                              f"micro_batch_size x workers.replicas ({per_step})")
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if len(self.step_label_tokens) != 2 or len(set(self.step_label_tokens)) != 2:
            raise ConfigError(f"step_label_tokens must be two different tokens [positive, negative], "
                              f"got {self.step_label_tokens!r}")
        if self.logprob_chunk < 0:
            raise ConfigError(f"logprob_chunk must be >= 0 (0: no chunking), got {self.logprob_chunk}")
        if self.precision not in TRAIN_PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(TRAIN_PRECISIONS)}, got {self.precision!r}")
        bad = [x for x in self.loggers if x not in LOGGERS]
        if bad:
            raise ConfigError(f"loggers: {bad} unknown; valid: {', '.join(LOGGERS)}")

    def resolved(self) -> TrainConfig:
        """This config with every ``auto`` precision replaced by what it means on this hardware
        (:func:`prm_ray.resources.resolve_dtype`): what the run records, keys and trains with."""
        return dataclasses.replace(self, precision=resolve_dtype(self.precision, self.workers.num_gpus),
                                   ref_pass=self.ref_pass.resolved())

    @property
    def bf16(self) -> bool:
        return resolve_dtype(self.precision, self.workers.num_gpus) == "bfloat16"

    @property
    def autocast(self) -> bool:
        """bf16 autocast around the forward: DDP's way to bf16 (FSDP2 casts the parameters instead)."""
        return self.bf16 and self.strategy == "ddp"

    @property
    def reference_path(self) -> str:
        return self.reference_model or self.model

    @property
    def explicit(self) -> bool:
        return get_objective(self.dataset.objective).explicit

    def resource_requests(self, prefix: str = "") -> list:
        out = []
        if self.use_reference and not self.explicit:
            out.append(self.ref_pass.request(f"{prefix}ref_pass"))
        # Ray Train places all workers at once (one placement group): fewer slots than workers is
        # a hang, not a slowdown.
        out.append(self.workers.request(prefix.rstrip(".") or "train"))
        return out


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Ray Train workers do not run in the driver's directory: a relative local path would be
    looked up on the Hugging Face hub there. Hub ids (no such local path) are left as they are."""
    cfg = copy.deepcopy(cfg)
    for name in ("data", "model", "reference_model", "ref_cache", "out"):
        value = getattr(cfg, name)
        if value and "://" not in value and (name == "out" or Path(value).exists()):
            setattr(cfg, name, str(Path(value).resolve()))
    return cfg
