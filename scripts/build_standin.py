"""Build the stand-in instruct model of the real-path dress rehearsal (prm_ray/policy/standin.py).

    python scripts/build_standin.py --out runs/standin      # seconds; then, e.g.:
    python jobs/rollout.py --task math --model runs/standin --instructions runs/standin/problems.jsonl \\
        --split test --n 8 --max-tokens 40 --temperature 1.0 --out runs/standin-rollouts
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prm_ray.cli import parse_args  # noqa: E402
from prm_ray.config import param  # noqa: E402
from prm_ray.policy.standin import StandinConfig, build_standin  # noqa: E402


@dataclass
class BuildStandin(StandinConfig):
    out: str = param("runs/standin", "the model directory to write")


if __name__ == "__main__":
    cfg = parse_args(BuildStandin, sys.argv[1:])
    info = build_standin(cfg.out, cfg)
    print(f"stand-in in {cfg.out}: vocabulary {info['vocab_size']}, fit loss {info['fit_loss']:.3f}, "
          f"{len(info['problems'])} problems in {cfg.out}/problems.jsonl")
