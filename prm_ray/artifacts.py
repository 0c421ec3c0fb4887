"""Every on-disk layout of the project, in one place: names, atomic writes, run logs, settings checks.

What a stage leaves behind (docs/rollouts.md, docs/evaluation.md have the schemas)::

    <rollout set>/          rollout_meta.json  config.yaml  summary.json  runs.jsonl  skipped_rows.json
                            data/shard-000000.parquet ...          (step labels: shepherd_meta.json)
    <reference cache>/      _ref_logprobs.json  data/*.parquet     (rollout rows + ref_token_logp)
    <trained PRM>/          Hugging Face model files  prm_ray_prm.json (the PRM card)  config.yaml
                            train_report.json  metrics.jsonl  attempts.jsonl  examples/  ray/
    <evaluation>/           metrics.json  eval_config.yaml  scores/*.parquet
    <policy>/               Hugging Face model files  prm_ray_policy.json (the policy card)

One rule for reusing an output directory, in every stage: the same settings reuse (or resume) it,
different settings are refused with the first differing field named, unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from prm_ray.config import ConfigError

__all__ = [
    "ATTEMPTS_FILE", "EVAL_CONFIG", "METRICS_FILE", "POLICY_CARD", "PRM_CARD", "REF_DONE", "ROLLOUT_META",
    "RUNS_FILE", "SHEPHERD_META", "SKIPPED_FILE", "STATE_FILE", "SUMMARY_FILE", "TOKENS_DONE", "TRAIN_METRICS", "TRAIN_REPORT",
    "append_run", "check_columns", "check_settings", "data_dir", "delete_run", "fingerprint", "first_difference",
    "load_rollouts", "parquet_source", "read_json", "read_jsonl", "read_policy_card", "read_prm_card", "read_timing",
    "rollout_temperature", "run_exists", "shard_path", "train_run_location", "write_json",
    "write_parquet_atomic", "write_timing",
]

# Rollout sets and step-label sets (prm_ray.stages.rollout, prm_ray.stages.shepherd)
ROLLOUT_META = "rollout_meta.json"
SHEPHERD_META = "shepherd_meta.json"
SUMMARY_FILE = "summary.json"
SKIPPED_FILE = "skipped_rows.json"
RUNS_FILE = "runs.jsonl"  # one line per invocation that did work: its timing (the cost survives reuse)
# Reference log-prob caches (prm_ray.stages.evaluate.reference_logprobs)
REF_DONE = "_ref_logprobs.json"
# Token columns of a dataset (prm_ray.stages.tokenize), in <data>/tokens-<key>/
TOKENS_DONE = "_tokens.json"
# Trained PRMs (prm_ray.stages.train)
PRM_CARD = "prm_ray_prm.json"  # kind (implicit/explicit), beta, reference model, objective
TRAIN_REPORT = "train_report.json"
TRAIN_METRICS = "metrics.jsonl"
ATTEMPTS_FILE = "attempts.jsonl"
STATE_FILE = "training_state.pt"  # optimizer and schedule, inside Ray Train checkpoints only
# Evaluations (prm_ray.stages.evaluate)
METRICS_FILE = "metrics.json"
EVAL_CONFIG = "eval_config.yaml"
# Policies (prm_ray.policy.bootstrap)
POLICY_CARD = "prm_ray_policy.json"  # rollout temperature, held-out metrics, training record


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text()) if path.exists() else default


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def append_run(out: Path, record: dict) -> list[dict]:
    """Append one invocation's record to ``<out>/runs.jsonl``; return every record so far."""
    with open(out / RUNS_FILE, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    return read_jsonl(out / RUNS_FILE)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` so that a killed writer never leaves a half-written file: a
    hidden temporary file (a leading dot hides it from Parquet dataset discovery), then a rename."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def data_dir(out: Path) -> Path:
    return Path(out) / "data"


def parquet_source(path: str | Path) -> Path:
    """Where a dataset's Parquet files are: ``<path>/data/`` for a stage's output directory, else
    ``path`` itself (a plain directory of Parquet files)."""
    return data_dir(Path(path)) if data_dir(Path(path)).is_dir() else Path(path)


def shard_path(out: Path, shard_id: int) -> Path:
    return data_dir(out) / f"shard-{shard_id:06d}.parquet"


def write_timing(where: Path, name: str, measured: dict) -> None:
    """Keep a stage's measured seconds next to its output, so a later run that reuses the output
    can still report what it cost."""
    write_json(where / f"timing-{name}.json", measured)


def read_timing(where: Path, name: str) -> dict | None:
    return read_json(where / f"timing-{name}.json")


# ---------------------------------------------------------------------------------------------
# Rollout data
# ---------------------------------------------------------------------------------------------


def check_columns(names: list[str], required: tuple[str, ...] | list[str], where: str) -> None:
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(f"rollout data {where} is missing column(s) {', '.join(missing)} "
                         f"(needs {', '.join(required)}; has {', '.join(names) or 'none'}); "
                         f"see docs/rollouts.md for the schema")


def load_rollouts(path: str | Path, columns: list[str] | tuple[str, ...] | None = None) -> pa.Table:
    """Read a rollout dataset: the rollout output dir (reads ``<dir>/data``), a dir of Parquet files,
    or one Parquet file. Hidden files (a shard being written, ``.shard-*.tmp-*``) are ignored.

    ``columns``: read only these (checked first: missing ones raise a ValueError naming them).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"rollout dataset not found: {path}")
    src = data_dir(path) if path.is_dir() and data_dir(path).is_dir() else path
    try:
        dataset = pads.dataset(str(src), format="parquet")
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"cannot read rollout Parquet at {src}: {exc}") from exc
    if src.is_dir() and not dataset.files:
        raise FileNotFoundError(f"no Parquet files in {src}")
    if columns is not None:
        check_columns(dataset.schema.names, columns, str(src))
    return dataset.to_table(columns=list(columns) if columns is not None else None)


def fingerprint(out: Path) -> str:
    """sha256 over a dataset's shard files' names and bytes: what was derived from it is tied to it."""
    h = hashlib.sha256()
    files = sorted(data_dir(out).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no rollout Parquet files in {data_dir(out)}")
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reusing an output directory: one rule for every stage
# ---------------------------------------------------------------------------------------------


def first_difference(old: dict, new: dict, prefix: str = "") -> str | None:
    """The first (sorted, dotted) key whose value differs between two nested dicts."""
    for key in sorted(set(old) | set(new)):
        x, y = old.get(key), new.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            found = first_difference(x, y, f"{prefix}{key}.")
            if found:
                return found
        elif x != y:
            return f"{prefix}{key}"
    return None


def _lookup(d: dict | None, dotted: str) -> Any:
    for part in dotted.split("."):
        d = (d or {}).get(part) if isinstance(d, dict) else None
    return d


def check_settings(out: Path, old: dict | None, new: dict, *, what: str, overwrite: bool = False,
                   names: dict[str, str] | None = None) -> bool:
    """Whether ``out`` may be used for output made with ``new`` settings.

    ``old`` are the settings recorded there (None: nothing there yet). Equal settings: True (reuse
    or resume). Different ones: ConfigError naming the first differing field, or, with
    ``overwrite``, the directory is emptied and False is returned. ``names`` spells out keys whose
    name alone would not say what differs.
    """
    if old is None:
        return True
    key = first_difference(old, new)
    if key is None:
        return True
    if overwrite:
        shutil.rmtree(out)
        out.mkdir(parents=True)
        return False
    label = (names or {}).get(key, key)
    raise ConfigError(f"{out} already holds {what} made with a different '{label}' ({_lookup(old, key)!r} vs "
                      f"{_lookup(new, key)!r}); use another output directory, delete it, or pass --overwrite")


# ---------------------------------------------------------------------------------------------
# Cards: what a trained PRM or a policy says about itself
# ---------------------------------------------------------------------------------------------


def read_prm_card(path: str | Path) -> dict:
    """A trained PRM's card (``prm_ray_prm.json``); ``{}`` for a model without one (any HF model)."""
    return read_json(Path(path) / PRM_CARD, {})


def read_policy_card(path: str | Path) -> dict:
    return read_json(Path(path) / POLICY_CARD, {})


def rollout_temperature(model: str) -> float | None:
    """The policy card's calibrated sampling temperature, when ``model`` has a card."""
    t = read_policy_card(model).get("rollout_temperature")
    return float(t) if t is not None else None


# ---------------------------------------------------------------------------------------------
# Ray Train's storage for a training run
# ---------------------------------------------------------------------------------------------

DEFAULT_RUN_NAME = "train"


def train_run_location(storage_path: str | None, out: str | Path) -> tuple[str, str]:
    """``(storage_path, name)`` for Ray Train's RunConfig of the PRM written to ``out``.

    Ray Train resumes a run from whatever it finds at ``<storage_path>/<name>``, and on more than
    one node ``storage_path`` must be storage every node reaches (NFS/EFS, ``s3://``, ``gs://``).
    Without one the run lives in ``<out>/ray/train``, next to the PRM it produces. With one, the
    name is derived from the resolved output directory: stable across re-submissions of the same
    study, distinct per PRM (a fixed name would make the second PRM resume from the first).
    """
    out = Path(out).resolve()
    if not storage_path:
        return str(out / "ray"), DEFAULT_RUN_NAME
    digest = hashlib.sha256(str(out).encode()).hexdigest()[:10]
    return storage_path.rstrip("/"), f"{out.name}-{digest}"


def _storage(storage_path: str) -> tuple[pafs.FileSystem, str]:
    fs, root = pafs.FileSystem.from_uri(storage_path if "://" in storage_path
                                        else str(Path(storage_path).resolve()))
    return fs, root.rstrip("/")


def run_exists(storage_path: str, name: str) -> bool:
    """True when ``<storage_path>/<name>`` holds anything: a resumed run, whose logs must be kept."""
    fs, root = _storage(storage_path)
    return fs.get_file_info(f"{root}/{name}").type != pafs.FileType.NotFound


def delete_run(storage_path: str, name: str) -> None:
    """Remove a training run's checkpoints (an overwritten PRM must not resume from them)."""
    if run_exists(storage_path, name):
        fs, root = _storage(storage_path)
        fs.delete_dir(f"{root}/{name}")
