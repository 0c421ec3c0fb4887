"""Sample N responses per instruction with vLLM on Ray, verify them, write a Parquet dataset.

    python jobs/rollout.py --task arith --model artifacts/policy --n 8 --out runs/rollouts/train
    python jobs/rollout.py --task math --instructions prm_ray/data/math500.jsonl \\
        --model meta-llama/Llama-3.1-8B-Instruct --n 8 --engine.num_gpus 1 --out runs/math
    ray job submit --working-dir . -- python jobs/rollout.py --config my_rollout.yaml

Re-running the same command after a kill completes only the missing shards.
"""

import json

from prm_ray.cli import run_job
from prm_ray.stages.rollout import RolloutConfig, run_rollouts

CONFIG = RolloutConfig
ALIASES = {"n": "sampling.n", "temperature": "sampling.temperature", "max-tokens": "sampling.max_tokens",
           "seed": "sampling.seed", "replicas": "engine.replicas"}


def run(cfg: RolloutConfig) -> dict:
    summary = run_rollouts(cfg)
    print(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> dict:
    return run_job(run, CONFIG, argv, aliases=ALIASES)


if __name__ == "__main__":
    main()
