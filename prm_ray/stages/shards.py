"""The shard pipeline of rollouts and of step labels: sampler actors -> verifier actors -> writer.

The unit of work is a *shard* (one row holding lists: a few instructions, or a few responses to
label). It flows through three Ray Data stages, each a pool of actors (``map_batches`` with
``batch_size=1``)::

    shard rows --> sampler (vllm.LLM, GPUs or CPUs) --> verifier (task verifier, CPUs)
               --> writer (one Parquet file per shard, atomic rename) --> driver: stats only

so the driver never holds responses, and a killed run resumes by skipping shards whose file exists.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.data
from tqdm.auto import tqdm

from prm_ray.resources import Resources
from prm_ray.stages.runtime import map_actors

__all__ = ["one_shard", "stream_shards"]


def one_shard(batch: pa.Table) -> dict[str, Any]:
    """The shard a stage received (each batch holds exactly one)."""
    if batch.num_rows != 1:
        raise RuntimeError(f"expected one shard per batch, got {batch.num_rows} rows")
    return batch.to_pylist()[0]


def stream_shards(todo: list[dict], stats: list[dict], *, out: Path, engine: Resources, engine_env: dict[str, str],
                  verifier: Resources, sampler_cls: type, sampler_kwargs: dict, verifier_cls: type, verifier_kwargs: dict,
                  writer: Callable[..., pa.Table], total: int, desc: str, progress: bool,
                  rate: Callable[[list[dict]], dict]) -> list[dict]:
    """Run ``todo`` shards through sampler -> verifier -> writer. The driver only sees each shard's
    stats, which are appended to ``stats`` as they arrive (so a caller still has them if the
    pipeline fails). ``engine_env``: environment variables of the sampler actors.
    ``total`` responses drive the progress bar; ``rate(stats)`` its postfix."""
    ds = ray.data.from_items(todo, override_num_blocks=len(todo))
    # Sampler and verifier pools hold their CPUs for the whole run; the writer tasks need a little.
    ds = map_actors(ds, sampler_cls, engine, stage="engine", constructor_kwargs=sampler_kwargs, batch_size=1,
                    check_cpus=False, runtime_env={"env_vars": engine_env})
    ds = map_actors(ds, verifier_cls, verifier, stage="verifier", constructor_kwargs=verifier_kwargs, batch_size=1,
                    check_cpus=False)
    ds = ds.map_batches(writer, batch_size=1, batch_format="pyarrow", num_cpus=0.1, fn_kwargs={"out": str(out)})
    with tqdm(total=total, desc=desc, unit="resp", disable=not progress, mininterval=1.0) as bar:
        for row in ds.iter_rows():
            stats.append(row)
            bar.update(row["responses"])
            bar.set_postfix(rate(stats))
    return stats
