"""What each stage asks Ray for, checked against the node types of a cluster before a run.

Ray never fails a request that no node can satisfy: an actor or a training worker group that asks
for 2 GPUs on a cluster whose GPU nodes have 1, or for an accelerator type no node type has, just
stays pending while the autoscaler logs that it cannot help. On a GPU cluster that is hours of
paid idle head node. So the per-replica requests that the configs hand to Ray (the same numbers
`rollout.py`, `train.py` and `evaluate.py` pass to `map_batches` / `ScalingConfig`) are checked
here against the node types of a cluster launcher YAML or a KubeRay manifest, at the cluster's
maximum size:

    python -m prm_ray.cluster --config configs/llama3-8b-math.yaml --cluster cluster/aws-gpu.yaml

Each stage is checked on its own (the study runs them one after another). A request fits a node
type when every resource it names is there in the amount asked; Ray's `accelerator_type="A10G"`
is the resource `accelerator_type:A10G`, which the autoscaler (from the instance type or a node
type's `resources`) and each GPU node's raylet (from the detected GPU) both report.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prm_ray.config import ConfigError, from_dict, load_yaml

ACCELERATOR_PREFIX = "accelerator_type:"  # ray._common.utils.RESOURCE_CONSTRAINT_PREFIX
ACCELERATOR_AMOUNT = 0.001  # what Ray asks for per task/actor with accelerator_type=...


@dataclass(frozen=True)
class Request:
    """`count` actors or workers, each needing `bundle` on one node."""

    stage: str  # the config path of the settings, e.g. "train_rollouts.engine"
    bundle: dict[str, float]
    count: int


@dataclass(frozen=True)
class NodeType:
    resources: dict[str, float]
    max_count: int  # nodes of this type at the cluster's maximum size (the head: 1)


def bundle(num_cpus: float, num_gpus: float = 0.0, accelerator_type: str | None = None) -> dict[str, float]:
    b = {"CPU": float(num_cpus)}
    if num_gpus:
        b["GPU"] = float(num_gpus)
    if accelerator_type:
        b[ACCELERATOR_PREFIX + accelerator_type] = ACCELERATOR_AMOUNT
    return b


def rollout_requests(rc, prefix: str = "") -> list[Request]:
    e, v = rc.engine, rc.verifier
    return [Request(f"{prefix}engine", bundle(e.num_cpus, e.num_gpus, e.accelerator_type), e.replicas),
            Request(f"{prefix}verifier", bundle(v.num_cpus), v.replicas)]


def train_requests(tc, prefix: str = "") -> list[Request]:
    rp = tc.ref_pass
    out = []
    if tc.reference:
        out.append(Request(f"{prefix}ref_pass", bundle(rp.num_cpus, rp.num_gpus, rp.accelerator_type), rp.replicas))
    # Ray Train places all workers at once (one placement group): fewer slots than workers is a
    # hang, not a slowdown.
    out.append(Request(f"{prefix.rstrip('.') or 'train'}",
                       bundle(tc.cpus_per_worker, tc.gpus_per_worker if tc.use_gpu else 0.0, tc.accelerator_type),
                       tc.num_workers))
    return out


def study_requests(cfg) -> list[Request]:
    ev = cfg.eval
    return (rollout_requests(cfg.train_rollouts, "train_rollouts.")
            + rollout_requests(cfg.test_rollouts, "test_rollouts.")
            + train_requests(cfg.train, "train.")
            + [Request("eval", bundle(ev.num_cpus, ev.num_gpus, ev.accelerator_type), ev.replicas)])


def config_problems(cfg) -> list[str]:
    """Settings that no cluster can make work."""
    from prm_ray.rollout import RolloutConfig
    from prm_ray.study import StudyConfig

    problems = []
    if isinstance(cfg, StudyConfig):
        rollouts = [("train_rollouts.", cfg.train_rollouts), ("test_rollouts.", cfg.test_rollouts)]
        if not Path(cfg.runs_dir).is_absolute():
            problems.append(
                f"runs_dir {cfg.runs_dir!r} is relative: under `ray job submit` it resolves inside the job's "
                "working directory on the head node, which worker nodes never see; use a path on storage "
                "every node mounts (e.g. /mnt/shared/prm-ray/runs)")
    elif isinstance(cfg, RolloutConfig):
        rollouts = [("", cfg)]
    else:
        rollouts = []
    for prefix, rc in rollouts:
        e = rc.engine
        if e.num_gpus and e.num_gpus != e.tensor_parallel_size:
            problems.append(f"{prefix}engine.num_gpus ({e.num_gpus:g}) must equal {prefix}engine.tensor_parallel_size "
                            f"({e.tensor_parallel_size}): a vLLM replica's actor holds the GPUs of all its shards")
    return problems


def requests_for(cfg) -> list[Request]:
    from prm_ray.rollout import RolloutConfig
    from prm_ray.study import StudyConfig
    from prm_ray.train import TrainConfig

    if isinstance(cfg, StudyConfig):
        return study_requests(cfg)
    if isinstance(cfg, RolloutConfig):
        return rollout_requests(cfg)
    if isinstance(cfg, TrainConfig):
        return train_requests(cfg)
    raise TypeError(f"no resource plan for {type(cfg).__name__}")


def load_config(path: str | Path, kind: str | None = None):
    """A study, rollout or training config from YAML (`kind` None: guessed from its fields)."""
    from prm_ray.rollout import RolloutConfig
    from prm_ray.study import StudyConfig
    from prm_ray.train import TrainConfig

    data = load_yaml(path)
    if kind is None:
        kind = ("study" if {"train_rollouts", "test_rollouts", "policy", "runs_dir"} & data.keys()
                else "rollout" if {"engine", "sampling", "verifier", "task"} & data.keys() else "train")
    if kind == "study":
        # Keep the shared setup only: the studies' own grid fields (responses, fractions, ...)
        # ask for no resources.
        names = {f.name for f in dataclasses.fields(StudyConfig)}
        return from_dict(StudyConfig, {k: v for k, v in data.items() if k in names})
    classes = {"rollout": RolloutConfig, "train": TrainConfig}
    if kind not in classes:
        raise ConfigError(f"kind must be study, rollout or train, got {kind!r}")
    return from_dict(classes[kind], data)


# ---------------------------------------------------------------------------------------------
# Node types of a cluster
# ---------------------------------------------------------------------------------------------


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

    A cluster launcher YAML is filled with its provider's defaults, as `ray up` does; a KubeRay
    manifest is translated the way the KubeRay autoscaler translates the RayCluster it watches.
    Both then go through Ray's own `validate_config` (its JSON schema plus consistency checks).
    """
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
    """How many bundles `b` fit on one node with `resources`."""
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


def plan(cfg, cluster: str | Path) -> tuple[list[str], list[str]]:
    """(table lines, problems) for running `cfg` on `cluster`."""
    types = node_types(autoscaler_config(cluster))
    reqs = requests_for(cfg)
    lines = [f"{'stage':<26} {'replicas':>8}  {'per replica':<40} node types (replicas per node)"]
    for r in reqs:
        where = [f"{n} ({per_node(r.bundle, t.resources)})" for n, t in types.items()
                 if per_node(r.bundle, t.resources) > 0]
        lines.append(f"{r.stage:<26} {r.count:>8}  {_fmt(r.bundle):<40} {', '.join(where) or 'NONE'}")
    return lines, config_problems(cfg) + check(reqs, types)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check that every stage of a config can be scheduled on a cluster.")
    p.add_argument("--config", required=True, help="study, rollout or training YAML")
    p.add_argument("--cluster", required=True, help="cluster launcher YAML or KubeRay manifest")
    p.add_argument("--kind", choices=["study", "rollout", "train"], default=None)
    args = p.parse_args(argv)
    lines, problems = plan(load_config(args.config, args.kind), args.cluster)
    print("\n".join(lines))
    for msg in problems:
        print(f"PROBLEM: {msg}", file=sys.stderr)
    if not problems:
        print(f"ok: every stage fits {args.cluster}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
