"""Training: one typed config, the per-worker DeepSpeed loop under Ray Train, checkpoints, MLflow tracking.

Everything loads on first use: importing the config (a job's `--help`) does not start Ray, DeepSpeed or MLflow,
and a module of this package that Ray Train's controller unpickles (`failures`) loads neither the data layer nor
torch."""
from typing import Any

__all__ = ["ConfigError", "FitResult", "TrainConfig", "TrainingError", "fit", "load_config"]


def __getattr__(name: str) -> Any:
    if name in ("ConfigError", "TrainConfig", "load_config"):
        from minconv_dist.train import config

        return getattr(config, name)
    if name in ("FitResult", "TrainingError", "fit"):
        from minconv_dist.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'minconv_dist.train' has no attribute {name!r}")
