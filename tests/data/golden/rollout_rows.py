"""Run a fixed rollout config with the shipped policy and print a digest of its Parquet rows.

Run at 1a275c9 (before issue #14's redesign) and after it: the digests must be equal (same seeds,
same rows). float32 engine, so the digest does not depend on the CPU's bf16 support.

    python tests/data/golden/rollout_rows.py <out dir>
"""

import hashlib
import json
import sys
from pathlib import Path

import pyarrow.dataset as pads

ROOT = Path(__file__).resolve().parents[3]


def digest(out: Path) -> tuple[str, int]:
    table = pads.dataset(str(out / "data"), format="parquet").to_table()
    rows = sorted(table.to_pylist(), key=lambda r: (r["instruction_id"], r["sample_index"]))
    blob = json.dumps(rows, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest(), len(rows)


def main() -> None:
    out = Path(sys.argv[1])
    try:
        from prm_ray.stages.rollout import RolloutConfig, SamplingConfig, run_rollouts  # after the redesign
    except ImportError:
        from prm_ray.rollout import RolloutConfig, SamplingConfig, run_rollouts  # 1a275c9
    from prm_ray.config import from_dict, to_dict

    cfg = RolloutConfig(model=str(ROOT / "artifacts" / "policy"), out=str(out), split="test", limit=12,
                        shard_size=4, sampling=SamplingConfig(n=4, max_tokens=160), progress=False)
    data = to_dict(cfg)
    data["engine"]["dtype"] = "float32"
    cfg = from_dict(RolloutConfig, data)
    run_rollouts(cfg)
    sha, n = digest(out)
    print(json.dumps({"rows": n, "sha256": sha}))


if __name__ == "__main__":
    main()
