"""Tokenize a dataset once: token ids, prompt lengths and step ids as Arrow columns, cached beside it.

    rollouts (or step labels, or reference log-probs) --Ray Data tasks, tokens.encode_table-->
        <data>/tokens-<key>/data/*.parquet: the dataset's rows plus the token columns

Every row of the dataset (keyed by ``(instruction_id, sample_index)``) with its columns and the
:data:`prm_ray.tokens.TOKEN_FIELDS` columns, so a later pass can read it in the dataset's place.
The key of the cache is the dataset's fingerprint, the tokenizer's files and the encoding settings:
every PRM trained or evaluated on the same rollouts with the same tokenizer reads the same token
ids. Training joins them to its examples (:func:`prm_ray.stages.train.examples.attach_tokens`);
the reference pass and evaluation read the tokenized dataset (:class:`prm_ray.stages.logprobs.ModelPass`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import ray
import ray.data

from prm_ray.artifacts import (
    TOKENS_DONE,
    check_columns,
    data_dir,
    fingerprint,
    parquet_source,
    read_json,
    write_json,
    write_parquet_atomic,
)
from prm_ray.models import load_tokenizer, resolve_model
from prm_ray.tokens import TOKEN_NAMES, encode_table

__all__ = ["IN_PROCESS_ROWS", "KEY_COLUMNS", "read_tokens", "tokenize_dataset", "tokenizer_fingerprint"]

KEY_COLUMNS = ("instruction_id", "sample_index")

# Files that decide how a Hugging Face tokenizer encodes (fast and slow tokenizers, chat templates).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "chat_template.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
                    "added_tokens.json")


def tokenizer_fingerprint(path: str) -> str:
    """sha256 over a local tokenizer's files; a hub id stands for itself."""
    resolved = Path(resolve_model(path, "tokenizer"))
    if not resolved.is_dir():
        return f"hub:{resolved}"
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        f = resolved / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    return load_tokenizer(path)  # once per Ray worker process, not per batch


def _encode_batch(batch: pa.Table, tokenizer: str, step_split: str = "blank_line") -> pa.Table:
    names = [f"instruction {i!r} sample {j}" for i, j in zip(*(batch.column(c).to_pylist() for c in KEY_COLUMNS))]
    tokens = encode_table(_tokenizer(tokenizer), batch.column("prompt").to_pylist(),
                          batch.column("response").to_pylist(), names=names, step_split=step_split)
    batch = batch.drop_columns([c for c in TOKEN_NAMES if c in batch.column_names])  # another tokenizer's
    for name in tokens.column_names:
        batch = batch.append_column(name, tokens.column(name))
    return batch


IN_PROCESS_ROWS = 4096
"""Datasets up to this many rows are tokenized in the calling process (about a second): a Ray Data
job's start-up would cost more than the work."""


def tokenize_dataset(data: str | Path, tokenizer: str, *, in_process_rows: int = IN_PROCESS_ROWS,
                     step_split: str = "blank_line") -> tuple[Path, dict]:
    """Token columns of every response of ``data`` (a rollout or step-label directory), made once
    in a Ray Data pass (in this process up to ``in_process_rows`` rows: the same output) and kept
    in ``<data>/tokens-<key>/`` (beside a plain directory of Parquet files:
    ``<data>.tokens-<key>/``); returns (that directory, info).

    ``info``: ``rows``, ``seconds`` (of the pass that made them) and ``reused``. Ray must be
    initialised by the caller. ``step_split``: see :data:`prm_ray.core.reward.STEP_SPLITS` (the
    ``release`` split tokenizes rewritten responses, so it has its own cache).
    """
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"no dataset at {data}")
    key = {"data": fingerprint(data) if data_dir(data).is_dir() else str(data.resolve()),
           "tokenizer": tokenizer_fingerprint(tokenizer), "chat_template": True, "append_eos": True,
           "separator": "\n\n", "fields": list(TOKEN_NAMES), "layout": "rows+tokens"}
    if step_split != "blank_line":  # named only when not the default: earlier caches stay valid
        key["step_split"] = step_split
    name = f"tokens-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}"
    # Beside the data: inside a dataset directory laid out as <data>/data/, else next to the
    # directory (inside it, a reader of the directory would read the tokens as rows too).
    out = data / name if data_dir(data).is_dir() else data.parent / f"{data.name}.{name}"
    done = read_json(out / TOKENS_DONE)
    if done is not None and done.get("key") == key:
        return out, {**done["info"], "reused": True}
    if out.exists():
        shutil.rmtree(out)  # an unfinished pass
    t0 = time.time()
    src = parquet_source(data)
    dataset = pads.dataset(str(src), format="parquet")
    rows = dataset.count_rows()
    check_columns(dataset.schema.names, [*KEY_COLUMNS, "prompt", "response"], str(src))
    if rows <= in_process_rows:
        data_dir(out).mkdir(parents=True)
        table = dataset.to_table()
        write_parquet_atomic(_encode_batch(table, tokenizer, step_split), data_dir(out) / "part-00000.parquet")
    else:
        # One read task per file (a rollout job writes many shards), batches of 2k rows each.
        ds = ray.data.read_parquet(str(src), file_extensions=["parquet"])
        ds = ds.map_batches(_encode_batch, fn_kwargs={"tokenizer": tokenizer, "step_split": step_split},
                            batch_format="pyarrow",
                            batch_size=2048)
        ds.write_parquet(str(data_dir(out)))
    info = {"rows": rows, "seconds": time.time() - t0}
    write_json(out / TOKENS_DONE, {"key": key, "info": info})
    return out, {**info, "reused": False}


def read_tokens(path: str | Path) -> pa.Table:
    """The keys and token columns of a :func:`tokenize_dataset` output."""
    return pads.dataset(str(data_dir(Path(path))), format="parquet").to_table(columns=[*KEY_COLUMNS, *TOKEN_NAMES])
