"""Evaluate a PRM on held-out rollouts: best-of-N, weighted and plain majority voting, pass@k.

    python jobs/evaluate_prm.py --prm runs/prm-ce --data runs/rollouts/test --out runs/eval-ce
    python jobs/evaluate_prm.py --prm PRIME-RL/EurusPRM-Stage2 --reference_model Qwen/Qwen2.5-Math-7B-Instruct \\
        --data /mnt/shared/runs/math500-x64 --eval.preset release --eval.num_gpus 1 --out /mnt/shared/runs/eval-eurus
    ray job submit --working-dir . -- python jobs/evaluate_prm.py --config my_eval.yaml

The reference log-probs of the data are computed once into <out>/ref-logprobs/ and reused by any
PRM evaluated with the same --out; metrics.json, the per-response scores and the resolved config
land in <out>/eval/ (docs/evaluation.md).
"""

import json

from prm_ray.cli import run_job
from prm_ray.stages.evaluate import EvaluationJobConfig, run_evaluation

CONFIG = EvaluationJobConfig
ALIASES = {"preset": "eval.preset", "aggregation": "eval.aggregation"}


def run(cfg: EvaluationJobConfig) -> dict:
    result = run_evaluation(cfg)
    m = result["metrics"]
    print(json.dumps(m, indent=2))
    ns = sorted(int(k.split("@")[1]) for k in m if k.startswith("bon@"))
    print(f"{result['problems']} problems x {result['samples_per_problem']} samples; pass@1 {100 * m['pass@1']:.1f}%, "
          + ", ".join(f"best-of-{n} {100 * m[f'bon@{n}']:.1f}%" for n in ns)
          + f" ({'reused' if result['reused'] else 'scored'}; votes by {result.get('votes_by', 'extracted_answer')})")
    return result


def main(argv=None) -> dict:
    return run_job(run, CONFIG, argv, aliases=ALIASES)


if __name__ == "__main__":
    main()
