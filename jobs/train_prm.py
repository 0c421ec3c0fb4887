"""Train an implicit PRM on Ray Train from a rollout dataset.

    python jobs/train_prm.py --data runs/rollouts/train --model artifacts/policy \\
        --objective ce --num-workers 2 --out runs/prm-ce
    ray job submit --working-dir . -- python jobs/train_prm.py --config configs/llama3-8b-math-train.yaml

The output directory is a Hugging Face model directory: load it with
`prm_ray.ImplicitPRM.from_pretrained(<out>, ref_path=<policy>)` or vLLM. A finished run is not
retrained when submitted again with the same config.
"""

import json

from prm_ray.config import parse_args
from prm_ray.train import TrainConfig, train_prm

ALIASES = {"objective": "dataset.objective", "responses-per-instruction": "dataset.responses_per_instruction",
           "instruction-fraction": "dataset.instruction_fraction", "balance": "dataset.balance"}


def main(argv=None) -> dict:
    cfg = parse_args(TrainConfig, argv, aliases=ALIASES)
    report = train_prm(cfg)
    print(json.dumps({k: report[k] for k in ("status", "steps", "examples", "timings", "final_metrics")},
                     indent=2, default=str))
    print(f"PRM in {cfg.out} ({'reused' if report['reused'] else 'trained'})")
    return report


if __name__ == "__main__":
    main()
