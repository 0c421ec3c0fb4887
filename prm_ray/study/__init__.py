"""The paper's studies: ``specs`` (what a study is: its setup and its rows), ``runner`` (one function
per stage, typed records), ``accounting`` (what each PRM cost), ``report`` (tables and plots),
``preflight`` (does every stage fit a cluster)."""

from prm_ray.study.runner import run_study
from prm_ray.study.specs import (
    CompareBaselinesConfig,
    CompareObjectivesConfig,
    PRMSpec,
    ScaleInstructionsConfig,
    ScaleResponsesConfig,
    StudyConfig,
    compare_baselines_specs,
    compare_objectives_specs,
    scale_instructions_specs,
    scale_responses_specs,
    train_config,
)

__all__ = ["CompareBaselinesConfig", "CompareObjectivesConfig", "PRMSpec", "ScaleInstructionsConfig",
           "ScaleResponsesConfig", "StudyConfig", "compare_baselines_specs", "compare_objectives_specs",
           "run_study", "scale_instructions_specs", "scale_responses_specs", "train_config"]
