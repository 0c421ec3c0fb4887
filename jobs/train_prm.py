"""Train an implicit PRM on Ray Train from a rollout dataset.

    python jobs/train_prm.py --data runs/rollouts/train --model artifacts/policy \\
        --objective ce --num-workers 2 --out runs/prm-ce
    ray job submit --working-dir . -- python jobs/train_prm.py --config configs/llama3-8b-math-train.yaml

The output directory is a Hugging Face model directory: load it with
`prm_ray.load_prm(<out>)` (the card says which reference and beta) or vLLM. A finished run is
not retrained when submitted again with the same settings; other settings into the same --out are
refused (--overwrite replaces it).
"""

import json

from prm_ray.cli import run_job
from prm_ray.stages.train import TrainConfig, train_prm

CONFIG = TrainConfig
ALIASES = {"objective": "dataset.objective", "responses-per-instruction": "dataset.responses_per_instruction",
           "instruction-fraction": "dataset.instruction_fraction", "balance": "dataset.balance",
           "num-workers": "workers.replicas"}


def run(cfg: TrainConfig) -> dict:
    report = train_prm(cfg)
    print(json.dumps({k: report[k] for k in ("status", "steps", "examples", "timings", "final_metrics")},
                     indent=2, default=str))
    print(f"PRM in {cfg.out} ({'reused' if report['reused'] else 'trained'})")
    return report


def main(argv=None) -> dict:
    return run_job(run, CONFIG, argv, aliases=ALIASES)


if __name__ == "__main__":
    main()
