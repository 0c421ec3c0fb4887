"""prm-ray: implicit process reward models (Yuan et al., 2024) as a distributed system on Ray.

Modules follow the data's path: `tasks` (instructions, answers, verifiers) -> rollouts ->
datasets -> `reward` / `losses` (the paper's math, pure PyTorch) -> training -> evaluation ->
serving. `prm` holds the public scoring API.
"""

__version__ = "0.1.0"
__all__ = ["ImplicitPRM", "StepScores", "__version__"]


def __getattr__(name: str):
    # Lazy, so light processes (verifier workers, Ray Data CPU stages) don't import torch.
    if name in ("ImplicitPRM", "StepScores"):
        from prm_ray import prm

        return getattr(prm, name)
    raise AttributeError(f"module 'prm_ray' has no attribute {name!r}")
