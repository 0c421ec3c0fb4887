"""The paper's objective comparison (Table 1: CE, CE dataset-/instruction-balanced, DPO, KTO, NCA)
and reference ablation (Table 4: the reference model on/off at training and at inference).

    python jobs/compare_objectives.py
    ray job submit --working-dir . -- python jobs/compare_objectives.py --runs_dir $PWD/runs
"""

from prm_ray.cli import run_job
from prm_ray.study import CompareObjectivesConfig, compare_objectives_specs, run_study

CONFIG, ALIASES = CompareObjectivesConfig, {}


def run(cfg: CompareObjectivesConfig) -> dict:
    return run_study(cfg, compare_objectives_specs(cfg), axis_name="objective",
                     title="Implicit PRM: training objectives and the reference model (paper Tables 1 and 4)")


def main(argv=None) -> dict:
    return run_job(run, CONFIG, argv, aliases=ALIASES)


if __name__ == "__main__":
    main()
