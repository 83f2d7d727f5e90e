"""Training: one typed config, the per-worker DeepSpeed loop under Ray Train, checkpoints, MLflow tracking."""
from minconv_dist.train.config import ConfigError, TrainConfig, load_config
from minconv_dist.train.trainer import FitResult, TrainingError, fit

__all__ = ["ConfigError", "FitResult", "TrainConfig", "TrainingError", "fit", "load_config"]
