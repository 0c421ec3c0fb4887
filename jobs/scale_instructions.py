"""The paper's instruction-scaling study (Figure 4): PRMs trained on 25/50/75/100% of the
training instructions (all their responses), evaluated by best-of-N on held-out problems.

    python jobs/scale_instructions.py
    ray job submit --working-dir . -- python jobs/scale_instructions.py --runs_dir $PWD/runs

Shares rollouts (and the 100% PRM) with jobs/scale_responses.py when the settings match.
"""

from prm_ray.cli import run_job
from prm_ray.study import ScaleInstructionsConfig, run_study, scale_instructions_specs

CONFIG, ALIASES = ScaleInstructionsConfig, {}


def run(cfg: ScaleInstructionsConfig) -> dict:
    return run_study(cfg, scale_instructions_specs(cfg), axis_name="instruction_fraction",
                     title="Implicit PRM: scaling the number of instructions (paper Fig. 4)")


def main(argv=None) -> dict:
    return run_job(run, CONFIG, argv, aliases=ALIASES)


if __name__ == "__main__":
    main()
