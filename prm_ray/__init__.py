"""prm-ray: implicit process reward models (Yuan et al., 2024) as a distributed system on Ray.

The package follows the data's path: ``tasks`` (instructions, answers, verifiers) -> ``stages``
(rollouts, step labels, training, evaluation: Ray) -> ``serve``; ``core`` holds the paper's math
(pure PyTorch), ``scoring`` the public scoring API, ``study`` the paper's experiments.
docs/architecture.md has the picture.
"""

__version__ = "0.1.0"
__all__ = ["ExplicitPRM", "ImplicitPRM", "StepScores", "__version__", "load_prm"]


def __getattr__(name: str):
    # Lazy, so light processes (verifier workers, Ray Data CPU stages) that import a submodule do
    # not load torch and transformers through this package's __init__.
    if name in ("ExplicitPRM", "ImplicitPRM", "StepScores", "load_prm"):
        from prm_ray import scoring

        return getattr(scoring, name)
    raise AttributeError(f"module 'prm_ray' has no attribute {name!r}")
