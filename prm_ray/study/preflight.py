"""Before paying for a cluster: does every stage of a config fit its node types?

    python jobs/check_cluster.py --config configs/llama3-8b-math.yaml --cluster cluster/aws-gpu.yaml

Reads a study, rollout or training config and a cluster launcher YAML or KubeRay manifest, prints
each stage's per-replica request and the node types it fits on, and names every problem
(:func:`prm_ray.resources.plan`). Exit status 1 when there is one.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from prm_ray.cli import USER_ERRORS
from prm_ray.config import ConfigError, from_dict, load_yaml
from prm_ray.resources import plan
from prm_ray.stages.rollout import RolloutConfig
from prm_ray.stages.train.config import TrainConfig
from prm_ray.study.specs import StudyConfig

__all__ = ["load_config", "main"]

KINDS = {"study": StudyConfig, "rollout": RolloutConfig, "train": TrainConfig}


def load_config(path: str | Path, kind: str | None = None):
    """A study, rollout or training config from YAML (``kind`` None: guessed from its fields)."""
    data = load_yaml(path)
    if kind is None:
        kind = ("study" if {"train_rollouts", "test_rollouts", "policy", "runs_dir"} & data.keys()
                else "rollout" if {"engine", "sampling", "verifier", "task"} & data.keys() else "train")
    if kind not in KINDS:
        raise ConfigError(f"kind must be study, rollout or train, got {kind!r}")
    if kind == "study":
        # Keep the shared setup only: the studies' own grid fields (responses, fractions, ...)
        # ask for no resources.
        names = {f.name for f in dataclasses.fields(StudyConfig)}
        data = {k: v for k, v in data.items() if k in names}
    return from_dict(KINDS[kind], data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check that every stage of a config can be scheduled on a cluster.",
                                allow_abbrev=False)
    p.add_argument("--config", required=True, help="study, rollout or training YAML")
    p.add_argument("--cluster", required=True, help="cluster launcher YAML or KubeRay manifest")
    p.add_argument("--kind", choices=sorted(KINDS), default=None)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = p.parse_args(argv)
    try:
        lines, problems = plan(load_config(args.config, args.kind), args.cluster)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"error: {exc}  (--debug shows the traceback)", file=sys.stderr)
        return 2
    print("\n".join(lines))
    for msg in problems:
        print(f"PROBLEM: {msg}", file=sys.stderr)
    if not problems:
        print(f"ok: every stage fits {args.cluster}")
    return 1 if problems else 0
