"""Where Ray Train keeps a training run: a local directory by default, shared storage on a cluster.

Ray Train needs `RunConfig(storage_path=...)` to be storage that every node can reach once workers
run on more than one node (an NFS/EFS mount or an `s3://` / `gs://` URI). It also resumes a run
from whatever it finds at `<storage_path>/<name>`, so the run name must be unique per trained
PRM: with one shared `storage_path` and a fixed name, the second PRM of a study would resume from
the first one's checkpoint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

DEFAULT_RUN_NAME = "train"


def train_run_location(storage_path: str | None, out: str | Path) -> tuple[str, str]:
    """`(storage_path, name)` for Ray Train's RunConfig of the PRM written to `out`.

    Without a storage path the run lives in `<out>/ray/train`, next to the PRM it produces (the
    layout earlier runs used, so they still resume). With one, the name is derived from the
    resolved output directory: stable across re-submissions of the same study, distinct per PRM.
    """
    out = Path(out).resolve()
    if not storage_path:
        return str(out / "ray"), DEFAULT_RUN_NAME
    digest = hashlib.sha256(str(out).encode()).hexdigest()[:10]
    return storage_path.rstrip("/"), f"{out.name}-{digest}"


def run_exists(storage_path: str, name: str) -> bool:
    """True when `<storage_path>/<name>` holds anything: a resumed run, whose logs must be kept."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(storage_path if "://" in storage_path
                                        else str(Path(storage_path).resolve()))
    info = fs.get_file_info(f"{root.rstrip('/')}/{name}")
    return info.type != pafs.FileType.NotFound
