"""Tokenize a dataset once: token ids, prompt lengths and step ids as Arrow columns, cached beside it.

    rollouts (or step-labelled rows) --Ray Data tasks, tokens.encode_table--> <data>/tokens-<key>/data/*.parquet

One row per response, keyed by ``(instruction_id, sample_index)``, with the
:data:`prm_ray.tokens.TOKEN_FIELDS` columns. The key of the cache is the dataset's fingerprint, the
tokenizer's files and the encoding settings, so every PRM trained on the same rollouts with the
same tokenizer reads the same token ids, and training itself does no tokenization
(:func:`prm_ray.stages.train.examples.attach_tokens` joins them to the examples).
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

from prm_ray.artifacts import TOKENS_DONE, data_dir, fingerprint, read_json, write_json
from prm_ray.models import load_tokenizer, resolve_model
from prm_ray.tokens import TOKEN_FIELDS, encode_table

__all__ = ["KEY_COLUMNS", "read_tokens", "tokenize_dataset", "tokenizer_fingerprint"]

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


def _encode_batch(batch: pa.Table, tokenizer: str) -> pa.Table:
    names = [f"instruction {i!r} sample {j}" for i, j in zip(*(batch.column(c).to_pylist() for c in KEY_COLUMNS))]
    tokens = encode_table(_tokenizer(tokenizer), batch.column("prompt").to_pylist(),
                          batch.column("response").to_pylist(), names=names)
    return pa.Table.from_arrays([batch.column(c) for c in KEY_COLUMNS] + tokens.columns,
                                names=list(KEY_COLUMNS) + tokens.column_names)


def _source(data: Path) -> Path:
    return data_dir(data) if data_dir(data).is_dir() else data


def tokenize_dataset(data: str | Path, tokenizer: str) -> tuple[Path, dict]:
    """Token columns of every response of ``data`` (a rollout or step-label directory), made once
    in a Ray Data pass and kept in ``<data>/tokens-<key>/``; returns (that directory, info).

    ``info``: ``rows``, ``seconds`` (of the pass that made them) and ``reused``. Ray must be
    initialised by the caller.
    """
    data = Path(data)
    key = {"data": fingerprint(data) if data_dir(data).is_dir() else str(data.resolve()),
           "tokenizer": tokenizer_fingerprint(tokenizer), "chat_template": True, "append_eos": True,
           "separator": "\n\n", "fields": [name for name, _ in TOKEN_FIELDS]}
    out = data / f"tokens-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}"
    done = read_json(out / TOKENS_DONE)
    if done is not None and done.get("key") == key:
        return out, {**done["info"], "reused": True}
    if out.exists():
        shutil.rmtree(out)  # an unfinished pass
    t0 = time.time()
    src = _source(data)
    rows = pads.dataset(str(src), format="parquet").count_rows()
    # One read task per file (a rollout job writes many shards), batches of 2k rows each.
    ds = ray.data.read_parquet(str(src), columns=[*KEY_COLUMNS, "prompt", "response"], file_extensions=["parquet"])
    ds = ds.map_batches(_encode_batch, fn_kwargs={"tokenizer": tokenizer}, batch_format="pyarrow", batch_size=2048)
    ds.write_parquet(str(data_dir(out)))
    info = {"rows": rows, "seconds": time.time() - t0}
    write_json(out / TOKENS_DONE, {"key": key, "info": info})
    return out, {**info, "reused": False}


def read_tokens(path: str | Path) -> pa.Table:
    """The token table a :func:`tokenize_dataset` pass wrote."""
    return pads.dataset(str(data_dir(Path(path))), format="parquet").to_table()
