"""Math-Shepherd step labels: K Monte-Carlo completions from every step boundary of verified rollouts.

    python jobs/label_steps.py --rollouts runs/rollouts/train --out runs/shepherd --k 8
    python jobs/label_steps.py --rollouts runs/math --engine.num_gpus 1 --engine.replicas 4 --out runs/math-shepherd
    ray job submit --working-dir . -- python jobs/label_steps.py --config my_shepherd.yaml

The completer defaults to the rollouts' own model, temperature and max_tokens (rollout_meta.json).
Re-running the same command after a kill completes only the missing shards; a finished output is
returned as is.
"""

import json

from prm_ray.cli import run_job
from prm_ray.stages.shepherd import ShepherdConfig, run_shepherd

CONFIG = ShepherdConfig
ALIASES = {"k": "completions_per_step", "temperature": "sampling.temperature",
           "max-tokens": "sampling.max_tokens", "seed": "sampling.seed", "replicas": "engine.replicas"}


def run(cfg: ShepherdConfig) -> dict:
    summary = run_shepherd(cfg)
    print(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> dict:
    return run_job(run, CONFIG, argv, aliases=ALIASES)


if __name__ == "__main__":
    main()
