"""The scoring service on Ray Serve: ``config`` (ServeConfig), ``schemas`` (requests, responses,
field-naming errors), ``batcher`` (batched scoring, pure PyTorch) and ``app`` (the deployment).

``serve run prm_ray.serve:app_builder prm=<ckpt>`` finds the application builder here.
"""

from prm_ray.serve.app import app_builder, build_app, scorer_handle
from prm_ray.serve.config import ServeConfig

__all__ = ["ServeConfig", "app_builder", "build_app", "scorer_handle"]
