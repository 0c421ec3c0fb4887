"""The paper's cost comparison (Figures 1 and 3, Table 1): the implicit PRM (CE and DPO) against a
Math-Shepherd PRM trained on MCTS-style step labels of the same rollouts, evaluated with the same
best-of-N protocol, with the compute of every stage.

    python jobs/compare_baselines.py
    ray job submit --working-dir . -- python jobs/compare_baselines.py --runs_dir $PWD/runs
"""

from prm_ray.cli import run_job
from prm_ray.study import CompareBaselinesConfig, compare_baselines_specs, run_study

CONFIG, ALIASES = CompareBaselinesConfig, {}


def run(cfg: CompareBaselinesConfig) -> dict:
    return run_study(cfg, compare_baselines_specs(cfg), axis_name="method",
                     title="Implicit PRM vs Math-Shepherd: accuracy and compute (paper Figures 1 and 3)")


def main(argv=None) -> dict:
    return run_job(run, CONFIG, argv, aliases=ALIASES)


if __name__ == "__main__":
    main()
