"""Load a model for forecasting from wherever it lives: a model file (what training writes as each checkpoint's
`model.pt`), an MLflow `models:/name/version` or `runs:/...` URI, or an official-repo checkpoint
(`official:PATH`, with `arch` and `padding` given). The normalisation statistics come inside the model
(its normaliser), except for official checkpoints, which take normalised inputs and have none: pass `stats`.
"""
from __future__ import annotations

import os
import tempfile

from minconv_dist.data import NormStats
from minconv_dist.models import Network, from_official_checkpoint, load_model_file


def load_model(uri: str, *, arch: str | None = None, padding: str = "zeros", tanh_encoder: bool = False,
               stats: NormStats | None = None, tracking_uri: str | None = None) -> Network:
    """The network in eval mode. `tracking_uri`: the MLflow server or store holding `models:/` and `runs:/`
    (default: MLflow's own, $MLFLOW_TRACKING_URI)."""
    if uri.startswith("official:"):
        if arch is None or stats is None:
            raise ValueError(f"{uri}: an official checkpoint has no architecture name and no normalisation "
                             "statistics: pass arch and stats (--arch, --stats stats.json)")
        model = from_official_checkpoint(uri[len("official:"):], arch, padding=padding, tanh_encoder=tanh_encoder,
                                         channels=stats.channels)
        model.normalizer.set_stats(stats.mean, stats.std)
        return model.eval()
    if stats is not None:
        raise ValueError(f"{uri}: the model carries its own normalisation statistics; --stats is for official "
                         "checkpoints only")
    if uri.startswith(("models:/", "runs:/")):
        import mlflow

        with tempfile.TemporaryDirectory() as local:
            path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=local, tracking_uri=tracking_uri)
            model = mlflow.pytorch.load_model(path, map_location="cpu")
        return getattr(model, "network", model).eval()  # training logs the network inside a pickling wrapper
    if not os.path.exists(uri):
        raise FileNotFoundError(f"no model at {uri!r}: expected a model file, models:/name/version, "
                                "runs:/id/path, or official:PATH")
    return load_model_file(uri)
