"""Training a PRM: examples from rollouts -> reference log-probs -> one Ray Train loop for every objective.

``examples`` builds rows or pairs (pure pyarrow), ``config`` is :class:`TrainConfig`, ``step`` is one
micro-batch's loss (pure PyTorch), ``parallel`` spreads the model over the workers (DDP or FSDP2),
``worker`` is the loop on each Ray Train worker, ``loggers`` the metric trackers, and ``driver`` runs it
all (:func:`train_prm`).
"""

__all__ = ["TrainConfig", "train_prm"]


def __getattr__(name: str):
    # Lazy, so the pure-PyTorch step (and its config) import without Ray: a bare GPU node with
    # torch and transformers only runs bench/gpu_bench.py against them.
    if name == "TrainConfig":
        from prm_ray.stages.train.config import TrainConfig

        return TrainConfig
    if name == "train_prm":
        from prm_ray.stages.train.driver import train_prm

        return train_prm
    raise AttributeError(f"module 'prm_ray.stages.train' has no attribute {name!r}")
