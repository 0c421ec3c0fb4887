"""Training a PRM: examples from rollouts -> reference log-probs -> one Ray Train loop for every objective.

``examples`` builds rows or pairs (pure pyarrow), ``config`` is :class:`TrainConfig`, ``step`` is one
micro-batch's loss (pure PyTorch), ``worker`` the loop on each Ray Train worker, ``loggers`` the
metric trackers, and ``driver`` runs it all (:func:`train_prm`).
"""

from prm_ray.stages.train.config import TrainConfig
from prm_ray.stages.train.driver import train_prm

__all__ = ["TrainConfig", "train_prm"]
