"""Training: one typed config, the per-worker DeepSpeed loop under Ray Train, checkpoints, MLflow tracking.

`fit` and its types load on first use: importing the config (a job's `--help`) does not start Ray,
DeepSpeed or MLflow."""
from typing import Any

from minconv_dist.train.config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "FitResult", "TrainConfig", "TrainingError", "fit", "load_config"]


def __getattr__(name: str) -> Any:
    if name in ("FitResult", "TrainingError", "fit"):
        from minconv_dist.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'minconv_dist.train' has no attribute {name!r}")
