"""Step-level evaluation: does a PRM's step reward point at the first wrong step?

    python jobs/step_eval.py --prm runs/prm-ce --rollouts runs/rollouts/test --validation runs/rollouts/val \\
        --out runs/step-eval-ce
    python jobs/step_eval.py --prm PRIME-RL/EurusPRM-Stage2 --reference_model Qwen/Qwen2.5-Math-7B-Instruct \\
        --rollouts processbench/math.jsonl --validation processbench/gsm8k.jsonl --eval.num_gpus 1 --out runs/pb-math
    ray job submit --working-dir . -- python jobs/step_eval.py --config my_step_eval.yaml

Writes <out>/step_report.json (F1, error and correct accuracy, threshold, step AUC, per error kind,
for the PRM and the baselines), <out>/steps/ (one row per response), step_rewards.png and
f1_threshold.png (docs/step-eval.md).
"""

from prm_ray.cli import run_job
from prm_ray.stages.step_eval import StepEvalConfig, run_step_eval

CONFIG = StepEvalConfig
ALIASES: dict[str, str] = {}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def run(cfg: StepEvalConfig) -> dict:
    report = run_step_eval(cfg)
    lab = report["labels"]
    print(f"{lab['responses']} responses, {lab['with_error']} with a wrong step "
          f"({lab['right_answer_wrong_process']} of them with the right answer)")
    rows = {"prm": report, **report["baselines"]}
    print(f"{'scorer':<24} {'F1':>6} {'err acc':>8} {'corr acc':>9} {'step AUC':>9}  threshold")
    for name, m in rows.items():
        print(f"{name:<24} {_pct(m['f1']):>6} {_pct(m['error_accuracy']):>8} {_pct(m['correct_accuracy']):>9} "
              f"{_pct(m['step_auc']):>9}  {m['threshold']:.4g} ({m['threshold_from']})")
    print(f"report: {cfg.out}/step_report.json")
    return report


def main(argv=None) -> dict:
    return run_job(run, CONFIG, argv, aliases=ALIASES)


if __name__ == "__main__":
    main()
