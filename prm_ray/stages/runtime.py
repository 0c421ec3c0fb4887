"""How stages meet Ray: joining a cluster, actor pools from :class:`prm_ray.resources.Resources`,
Ray Data's console output, and the wall and CPU seconds a stage took.

Stages build Ray Data pipelines of actor pools (``map_actors``); the resources each pool asks for
come from its config, through ``Resources.ray_options``. Ray Data's own progress display is kept
for terminals; in a redirected log (``ray job submit``, CI) it would print its whole progress
block every 10 s, so it is turned off there and each stage reports progress itself.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import ray
import ray.data

from prm_ray.resources import Resources, check_cpus_left

__all__ = ["cluster_cpus", "cpu_seconds", "init_ray", "map_actors", "measure", "quiet_data_progress"]


def init_ray(address: str | None = None) -> None:
    """Join ``address`` (else ``RAY_ADDRESS``, a running local cluster) or start a local Ray."""
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=False, logging_level="WARNING")
    quiet_data_progress()


def quiet_data_progress() -> None:
    """In a redirected log, Ray Data's progress as one line a minute, not a block every 10 s."""
    if not sys.stdout.isatty():
        # Read when Ray Data first logs progress in this process (its logging progress manager).
        os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "60")
        ray.data.DataContext.get_current().enable_operator_progress_bars = False
        # The one-line notices about that choice are not news to anyone reading our log.
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def cluster_cpus() -> float:
    """CPUs of the cluster this process is connected to; 0 (unknown) when it is not connected."""
    return ray.cluster_resources().get("CPU", 0.0) if ray.is_initialized() else 0.0


def map_actors(ds: ray.data.Dataset, actor_cls: type, resources: Resources, *, stage: str,
               constructor_kwargs: dict[str, Any], batch_size: int | None, check_cpus: bool = True,
               **kwargs: Any) -> ray.data.Dataset:
    """``ds.map_batches`` through a pool of ``resources.replicas`` actors of ``actor_cls``, each with
    ``resources``' CPUs, GPUs and accelerator type. ``check_cpus``: refuse (naming ``stage``) a
    CPU-only pool that would take every CPU of the cluster from Ray Data's own tasks."""
    # A failed pipeline's executor lingers in a reference cycle, holding its actors and their CPUs
    # until Python's cycle collector happens to run; a driver that waits on the next pipeline
    # allocates too little for that, and the new actors never get CPUs. Collect it now.
    gc.collect()
    if check_cpus:
        check_cpus_left(resources, stage, cluster_cpus())
    return ds.map_batches(actor_cls, batch_size=batch_size, batch_format="pyarrow",
                          compute=ray.data.ActorPoolStrategy(size=resources.replicas),
                          fn_constructor_kwargs=constructor_kwargs, **resources.ray_options(), **kwargs)


def cpu_seconds() -> float:
    """The machine's user + nice + system CPU seconds so far (see :func:`measure` for what that covers)."""
    t = psutil.cpu_times()
    # Ray runs its workers niced, and the kernel books niced CPU time as `nice`, not `user`.
    return float(t.user + t.nice + t.system)


@contextmanager
def measure() -> Iterator[dict]:
    """Wall time and CPU-seconds of the enclosed block: ``{"wall_s", "cpu_s"}``, filled on exit.

    CPU-seconds are the whole machine's (user + nice + system over all cores, from ``psutil``),
    because the work runs in Ray workers, not in this process. On a single-node cluster that is the
    job's CPU time plus anything else running on the machine; on a multi-node cluster it counts
    this node only, so it is reported for local runs and should be read as an upper bound.
    """
    out: dict = {}
    t0, c0 = time.time(), cpu_seconds()
    try:
        yield out
    finally:
        out["wall_s"] = time.time() - t0
        out["cpu_s"] = cpu_seconds() - c0
