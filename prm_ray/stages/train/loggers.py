"""Training metrics to the trackers users read: TensorBoard, Weights & Biases, MLflow.

Rank 0 of the training workers writes every optimizer step's metrics (already averaged over the
workers) to ``metrics.jsonl`` and to the loggers named in ``TrainConfig.loggers``. They are not
routed through a Ray Train ``UserCallback``: on Ray 2.60 the run's controller can finish before it
has handed the last report to its callbacks (measured here: the final step of a 72-step run never
reached TensorBoard), and a tracker should hold every step ``metrics.jsonl`` holds. W&B and MLflow
are optional installs: naming one that is not installed is refused before any work starts.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from prm_ray.config import ConfigError

__all__ = ["MetricLoggers", "check_loggers"]

PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}


def check_loggers(names: list[str]) -> None:
    missing = [n for n in names if importlib.util.find_spec(PACKAGES[n]) is None]
    if missing:
        raise ConfigError(f"loggers: {', '.join(missing)} not installed (pip install "
                          f"{' '.join(PACKAGES[n] for n in missing)}), or leave them out of loggers")


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class MetricLoggers:
    """Each step's scalars to TensorBoard (``<out>/tensorboard``), W&B and MLflow (project and
    experiment ``prm-ray``, run named after the output directory; a resumed run continues it)."""

    def __init__(self, names: list[str], out: str, run_name: str, config: dict) -> None:
        # Optional packages: imported only where a run asked for them.
        self._tb = self._wandb = self._mlflow = None
        if "tensorboard" in names:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(out) / "tensorboard"))
        if "wandb" in names:
            import wandb

            self._wandb = wandb.init(project="prm-ray", name=run_name, id=run_name, resume="allow", dir=out,
                                     config=config)
        if "mlflow" in names:
            import mlflow

            mlflow.set_experiment("prm-ray")
            self._mlflow = mlflow
            mlflow.start_run(run_name=run_name)
            mlflow.log_params(_flatten(config))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        values = _scalars(metrics)
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"train/{k}", v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in values.items()}, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()
