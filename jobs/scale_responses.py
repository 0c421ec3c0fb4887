"""The paper's response-scaling study (Figure 5), end to end: policy -> training and test rollouts
-> implicit PRMs for k responses per instruction x objective -> best-of-N evaluation -> report.

    python jobs/scale_responses.py                                    # embedded default: 3 seeds x 500 problems, ~2-3 h on 2 cores
    python jobs/scale_responses.py --config configs/demo.yaml         # make demo's size, ~28 min on 2 cores
    ray job submit --working-dir . -- python jobs/scale_responses.py --runs_dir $PWD/runs
    python jobs/scale_responses.py --config configs/llama3-8b-math.yaml   # a GPU cluster

Writes runs/<name>/report.md, report.json, bon_vs_n.png, scaling.png, stages.png, config.yaml.
Finished stages (rollouts, PRMs, evaluations) are reused when the job is submitted again.
"""

from prm_ray.cli import run_job
from prm_ray.study import ScaleResponsesConfig, run_study, scale_responses_specs

CONFIG, ALIASES = ScaleResponsesConfig, {}


def run(cfg: ScaleResponsesConfig) -> dict:
    return run_study(cfg, scale_responses_specs(cfg), axis_name="responses_per_instruction",
                     title="Implicit PRM: scaling responses per instruction (paper Fig. 5)")


def main(argv=None) -> dict:
    return run_job(run, CONFIG, argv, aliases=ALIASES)


if __name__ == "__main__":
    main()
