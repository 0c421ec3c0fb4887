"""Tokenize once: a 64k-response rollout set tokenized by the Ray Data pass, then reused.

    python bench/tokenize_once.py                 # 8,000 instructions x 8 responses (about 2 min)
    python bench/tokenize_once.py --instructions 500 --out /tmp/t.json   # smaller

Measured, in one run on the same rollout set (arith solutions and corrupted copies, the shipped
policy's tokenizer):
- the first `prm_ray.stages.tokenize.tokenize_dataset` call (the Ray Data pass, every CPU);
- a second call, as a re-training on the same rollouts makes it (the cache is found and reused);
- joining the token columns to CE training examples (`attach_tokens`, in the driver);
- what the training step did per micro-batch before: `encode_pair` on every row, here summed over
  one epoch of the same rows in one process;
- the padded share of the training step's forwards over that epoch (the defaults: 32 rows per
  worker-step, micro-batches of 16), with and without `group_by_length`.
Writes `out` (JSON) and prints the numbers (docs/bench_train.md).
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from prm_ray.cli import run_job  # noqa: E402
from prm_ray.config import ConfigError, param  # noqa: E402
from prm_ray.models import load_tokenizer  # noqa: E402
from prm_ray.stages.rollout import SCHEMA  # noqa: E402
from prm_ray.stages.runtime import init_ray  # noqa: E402
from prm_ray.stages.tokenize import read_tokens, tokenize_dataset  # noqa: E402
from prm_ray.stages.train.examples import DatasetConfig, attach_tokens, build_examples  # noqa: E402
from prm_ray.stages.train.step import micro_batches  # noqa: E402
from prm_ray.tasks.arith import ArithTask  # noqa: E402
from prm_ray.tokens import encode_pair  # noqa: E402


@dataclass
class TokenizeBenchConfig:
    """Tokenize a rollout set once and reuse it (docs/bench_train.md)."""

    instructions: int = param(8000, "instructions; each gets 8 responses")
    policy: str = param(str(ROOT / "artifacts" / "policy"), "the tokenizer's model directory")
    out: str = param(str(ROOT / "bench" / "results" / "tokenize_once.json"), "results JSON")

    def __post_init__(self) -> None:
        if self.instructions < 1:
            raise ConfigError(f"instructions must be >= 1, got {self.instructions}")


CONFIG, ALIASES = TokenizeBenchConfig, {}


def write_rollouts(path: Path, n: int) -> int:
    """8 responses per instruction: its solution and 7 copies with one step's result changed."""
    rng = random.Random(0)
    rows = []
    for inst in ArithTask(num_train=n).instructions("train", limit=n):
        steps = inst.meta["solution"].split("\n\n")
        for j in range(8):
            resp = list(steps)
            if j:
                k = rng.randrange(max(1, len(steps) - 1))
                head, _, val = resp[k].rpartition("= ")
                resp[k] = f"{head}= {(int(val) + j) % 10}" if val.isdigit() else resp[k] + " x"
            rows.append({"instruction_id": inst.id, "prompt": inst.prompt, "response": "\n\n".join(resp),
                         "sample_index": j, "gold_answer": inst.answer, "extracted_answer": inst.answer,
                         "correct": j == 0, "verify_status": "ok", "num_tokens": 0, "cumulative_logprob": 0.0,
                         "finish_reason": "stop", "model": "bench", "seed": j})
    (path / "data").mkdir(parents=True)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    for i in range(0, table.num_rows, 8192):  # shards, as a rollout job writes them
        pq.write_table(table.slice(i, 8192), path / "data" / f"shard-{i // 8192:06d}.parquet")
    return table.num_rows


def padding_fractions(examples: pa.Table, step_rows: int = 32, micro: int = 16) -> dict:
    """Share of padded positions over one epoch of the training defaults' steps (64 rows over 2
    workers: 32 rows per worker-step, micro-batches of 16), without and with grouping by length."""
    out = {}
    for grouped in (False, True):
        real = padded = 0
        for i in range(0, examples.num_rows - step_rows + 1, step_rows):
            for mb in micro_batches(examples.slice(i, step_rows), micro, grouped):
                lengths = [len(x) for x in mb.column("response_input_ids").to_pylist()]
                real, padded = real + sum(lengths), padded + len(lengths) * max(lengths)
        out["grouped" if grouped else "plain"] = 1 - real / padded
    return out


def run(cfg: TokenizeBenchConfig) -> dict:
    init_ray()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rollouts"
        rows = write_rollouts(data, cfg.instructions)
        t0 = time.perf_counter()
        path, first = tokenize_dataset(data, cfg.policy)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, again = tokenize_dataset(data, cfg.policy)
        warm = time.perf_counter() - t0
        examples, _ = build_examples(data, DatasetConfig(objective="ce"))
        t0 = time.perf_counter()
        attached = attach_tokens(examples, read_tokens(path))
        attach = time.perf_counter() - t0
        tok = load_tokenizer(cfg.policy)
        t0 = time.perf_counter()
        for p, r in zip(examples.column("prompt").to_pylist(), examples.column("response").to_pylist()):
            encode_pair(tok, p, r)
        per_row = time.perf_counter() - t0
        tokens = int(sum(len(x) for x in attached.column("response_input_ids").to_pylist()))
        padding = padding_fractions(attached.take(np.random.default_rng(0).permutation(attached.num_rows)))
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
               "machine": platform.processor() or platform.machine(), "responses": rows, "tokens": tokens,
               "first_pass_s": cold, "first_pass_reused": first["reused"], "second_call_s": warm,
               "second_call_reused": again["reused"], "attach_tokens_s": attach,
               "encode_pair_per_row_one_epoch_s": per_row, "padding_fraction": padding, "config": vars(cfg)}
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


def main(argv=None) -> dict:
    return run_job(run, CONFIG, argv, aliases=ALIASES, description=__doc__)


if __name__ == "__main__":
    main()
