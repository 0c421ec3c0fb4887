"""One resource vocabulary for every stage, and the pre-flight check of a config against a cluster.

Every stage that asks Ray for resources (vLLM engines, verifiers, the reference pass, evaluation,
training workers, serving replicas) says so with the same five fields of :class:`Resources`:
``replicas``, ``num_cpus``, ``num_gpus``, ``accelerator_type``, ``threads``. An actor-pool
section inherits them (``--engine.num_gpus 1``, ``--eval.replicas 4``); training has them under
``workers``.

Ray never fails a request that no node can satisfy: an actor or a training worker group that asks
for 2 GPUs on a cluster whose GPU nodes have 1, or for an accelerator type no node type has, just
stays pending while the autoscaler logs that it cannot help. On a GPU cluster that is hours of
paid idle head node. :func:`plan` checks each stage's request against the node types of a cluster
launcher YAML or a KubeRay manifest, at the cluster's maximum size (``jobs/check_cluster.py``).
Ray's ``accelerator_type="A10G"`` is the resource ``accelerator_type:A10G``, which the autoscaler
(from the instance type or a node type's ``resources``) and each GPU node's raylet both report.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prm_ray.config import ConfigError, param

__all__ = ["DTYPES", "NodeType", "Request", "Resources", "autoscaler_config", "check", "check_cpus_left",
           "check_dtype", "cpu_has_native_bf16", "node_types", "per_node", "plan", "resolve_dtype"]

ACCELERATOR_PREFIX = "accelerator_type:"  # ray._common.utils.RESOURCE_CONSTRAINT_PREFIX
ACCELERATOR_AMOUNT = 0.001  # what Ray asks for per task/actor with accelerator_type=...


DTYPES = ("auto", "bfloat16", "float32", "float16", "float64")
"""What a stage's ``dtype`` may say. ``auto``: bfloat16 on GPUs and on CPUs with native bf16 matmuls
(AVX512-BF16 or AMX), float32 on other CPUs, where bf16 is emulated: measured on an AVX2-only EPYC,
a training step was 11x slower in bf16 than in fp32 (docs/bench_precision.md)."""

# oneDNN ISA caps without a bf16 dot product (ONEDNN_MAX_CPU_ISA); AVX2_VNNI_2 only converts.
_NO_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_has_native_bf16() -> bool:
    """True when this machine's CPU has bf16 matmul instructions and oneDNN may use them (an
    ``ONEDNN_MAX_CPU_ISA`` cap below AVX512_CORE_BF16 makes torch emulate bf16, as on an AVX2 CPU)."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _NO_BF16_ISAS:
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_dtype(value: str, field: str) -> None:
    if value not in DTYPES:
        raise ConfigError(f"{field} must be one of {', '.join(DTYPES)}, got {value!r}")


def resolve_dtype(dtype: str, num_gpus: float) -> str:
    """The dtype ``auto`` means for a stage with ``num_gpus`` per replica, on this machine's CPU.

    Training, the reference pass, evaluation and serving resolve once, in the driver, so every
    replica of a run computes in the same precision and the resolved dtype is what their configs,
    caches and reports record (on a cluster whose CPU nodes differ, pin it). Rollout engines
    resolve on their own node and record it per shard (``engine_dtype``); a study keys its rollout
    sets by what ``auto`` means on the driver's machine, and resuming a set in another precision is
    refused (bf16 and fp32 sample different responses from the same seeds)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if num_gpus > 0 or cpu_has_native_bf16() else "float32"


@dataclass
class Resources:
    """What one stage asks Ray for: ``replicas`` copies, each with these resources."""

    replicas: int = param(1, "copies of this stage's actor (training: workers), each with the resources below")
    num_cpus: float = param(1.0, "CPUs reserved per replica (Ray's num_cpus)")
    num_gpus: float = param(0.0, "GPUs per replica (Ray's num_gpus); > 0 puts the models on CUDA")
    accelerator_type: str | None = param(None, "GPU model a replica must run on (Ray's accelerator_type, e.g. "
                                               "A100): the autoscaler starts matching nodes")
    threads: int | None = param(None, "torch threads per replica (stages that run torch); null: max(1, floor(num_cpus))")

    def __post_init__(self) -> None:
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise ConfigError(f"replicas must be an integer >= 1, got {self.replicas!r}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError(f"num_cpus and num_gpus must be >= 0, got {self.num_cpus}, {self.num_gpus}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1 or null, got {self.threads}")

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, int(self.num_cpus))

    def ray_options(self) -> dict[str, Any]:
        """Per-replica ``num_cpus`` / ``num_gpus`` / ``accelerator_type`` for ``ray.remote``,
        ``map_batches`` and Serve's ``ray_actor_options``."""
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.accelerator_type:
            opts["accelerator_type"] = self.accelerator_type
        return opts

    def bundle(self) -> dict[str, float]:
        """One replica as Ray resources (what a node must have for it)."""
        b = {"CPU": float(self.num_cpus)}
        if self.num_gpus:
            b["GPU"] = float(self.num_gpus)
        if self.accelerator_type:
            b[ACCELERATOR_PREFIX + self.accelerator_type] = ACCELERATOR_AMOUNT
        return b

    def request(self, stage: str) -> Request:
        return Request(stage, self.bundle(), self.replicas)


def check_cpus_left(resources: Resources, stage: str, cluster_cpus: float) -> None:
    """Refuse a CPU-only pool that reserves every CPU of the cluster: Ray Data's read tasks (and Ray
    Train's ingest) then never get a CPU and the stage waits forever."""
    wanted = resources.replicas * resources.num_cpus
    if resources.num_gpus == 0 and cluster_cpus and wanted >= cluster_cpus:
        raise ConfigError(
            f"{stage}.replicas x {stage}.num_cpus = {wanted:g} takes every CPU of the cluster ({cluster_cpus:g}); "
            "Ray Data then cannot schedule its read tasks and the stage never starts. Lower "
            f"{stage}.num_cpus (torch threads are set by {stage}.threads)")


# ---------------------------------------------------------------------------------------------
# Node types of a cluster, and what fits on them
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """``count`` actors or workers, each needing ``bundle`` on one node."""

    stage: str  # the config path of the settings, e.g. "train_rollouts.engine"
    bundle: dict[str, float]
    count: int


@dataclass(frozen=True)
class NodeType:
    resources: dict[str, float]
    max_count: int  # nodes of this type at the cluster's maximum size (the head: 1)


def _ray_cluster_spec(docs: list[dict]) -> dict | None:
    """The RayCluster custom resource in a KubeRay manifest (a RayJob may embed one)."""
    for d in docs:
        if d.get("kind") == "RayCluster":
            return d
    for d in docs:
        if d.get("kind") == "RayJob" and "rayClusterSpec" in d.get("spec", {}):
            return {"metadata": d["metadata"], "spec": d["spec"]["rayClusterSpec"]}
    return None


def autoscaler_config(path: str | Path) -> dict[str, Any]:
    """The autoscaler's view of a cluster file, validated by Ray.

    A cluster launcher YAML is filled with its provider's defaults, as ``ray up`` does; a KubeRay
    manifest is translated the way the KubeRay autoscaler translates the RayCluster it watches.
    Both then go through Ray's own ``validate_config`` (its JSON schema plus consistency checks).
    """
    # Ray's autoscaler internals: only this pre-flight check needs them (not every stage import).
    from ray.autoscaler._private.util import prepare_config, validate_config

    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    if not docs:
        raise ConfigError(f"{path} is empty")
    ray_cr = _ray_cluster_spec(docs)
    if ray_cr is not None:
        from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

        ray_cr = {"metadata": {"namespace": "default", **ray_cr["metadata"]}, "spec": ray_cr["spec"]}
        return _derive_autoscaling_config_from_ray_cr(ray_cr)  # validates
    config = docs[0]
    if config.get("provider", {}).get("type") == "fake_multinode":
        # Ray's wheel leaves out the fake provider's defaults file, so `prepare_config` cannot
        # fill this one in; cluster/fake-multinode.yaml is therefore written out in full.
        validate_config(config)
        return config
    config = prepare_config(config)
    validate_config(config)
    return config


def node_types(config: dict[str, Any]) -> dict[str, NodeType]:
    types = config["available_node_types"]
    cap = config.get("max_workers", math.inf)
    out = {}
    for name, nt in types.items():
        if not nt.get("resources"):
            raise ConfigError(f"available_node_types.{name}.resources is empty: set it explicitly "
                              "(CPU, GPU, accelerator_type:<type>) so requests can be checked against it")
        head = name == config["head_node_type"]
        out[name] = NodeType({k: float(v) for k, v in nt["resources"].items()},
                             1 if head else int(min(nt.get("max_workers", cap), cap)))
    return out


def per_node(b: dict[str, float], resources: dict[str, float]) -> int:
    """How many bundles ``b`` fit on one node with ``resources``."""
    return min(math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in b.items() if v > 0)


def check(requests: list[Request], types: dict[str, NodeType]) -> list[str]:
    problems = []
    for r in requests:
        slots = {name: per_node(r.bundle, nt.resources) * nt.max_count for name, nt in types.items()}
        total = sum(slots.values())
        if total == 0:
            problems.append(f"{r.stage}: one replica asks for {_fmt(r.bundle)}, which no node type has; "
                            "Ray would keep it pending forever")
        elif total < r.count:
            problems.append(f"{r.stage}: {r.count} replicas of {_fmt(r.bundle)}, but the cluster at its "
                            f"maximum size has room for {total} ({_fmt(slots)})")
    return problems


def _fmt(d: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in d.items())


def plan(cfg: Any, cluster: str | Path) -> tuple[list[str], list[str]]:
    """``(table lines, problems)`` for running ``cfg`` on ``cluster``.

    ``cfg`` is any config with ``resource_requests()`` (a rollout, training or study config; each
    stage is checked on its own, as a study runs them one after another) and optionally
    ``cluster_problems()`` (settings no cluster can make work).
    """
    types = node_types(autoscaler_config(cluster))
    reqs = cfg.resource_requests()
    lines = [f"{'stage':<26} {'replicas':>8}  {'per replica':<40} node types (replicas per node)"]
    for r in reqs:
        where = [f"{n} ({per_node(r.bundle, t.resources)})" for n, t in types.items()
                 if per_node(r.bundle, t.resources) > 0]
        lines.append(f"{r.stage:<26} {r.count:>8}  {_fmt(r.bundle):<40} {', '.join(where) or 'NONE'}")
    problems = cfg.cluster_problems() if hasattr(cfg, "cluster_problems") else []
    return lines, problems + check(reqs, types)
