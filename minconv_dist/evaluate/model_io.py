"""Load a model for forecasting from wherever it lives, with its normalisation stats.

`load_model(uri)` takes a model file (`minconv_dist.models.io` format: what training writes as each
checkpoint's `model.pt`), an MLflow `models:/name/version` or `runs:/...` URI (stats from the logged
model's `metadata["norm_stats"]`), or an official-repo checkpoint (`official:PATH`, `arch` and
`padding` given; no stats).
"""
from __future__ import annotations

import json
import os

from minconv_dist.models import Network, from_official_checkpoint
from minconv_dist.models.io import load_checkpoint


def load_model(
    uri: str, *, arch: str | None = None, padding: str = "zeros", tanh_encoder: bool = False,
) -> tuple[Network, dict | None]:
    """(model, stats dict or None) from a checkpoint path, `models:/...`/`runs:/...`, or `official:PATH`."""
    if uri.startswith(("models:/", "runs:/")):
        import mlflow

        model = mlflow.pytorch.load_model(uri, map_location="cpu")
        model = getattr(model, "network", model)  # training logs the network inside a pickling wrapper
        meta = mlflow.models.get_model_info(uri).metadata or {}
        stats = meta.get("norm_stats")
        return model.eval(), json.loads(stats) if isinstance(stats, str) else stats
    if uri.startswith("official:"):
        if arch is None:
            raise ValueError("an official checkpoint carries no architecture name: pass arch (--arch)")
        model = from_official_checkpoint(uri[len("official:"):], arch, padding=padding, tanh_encoder=tanh_encoder)
        return model.eval(), None
    if not os.path.exists(uri):
        raise FileNotFoundError(f"no model at {uri!r}: expected a checkpoint file, models:/name/version, "
                                "runs:/id/path, or official:PATH")
    return load_checkpoint(uri)
