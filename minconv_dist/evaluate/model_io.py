"""Save and load a model with what it needs to forecast: its spec and its normalisation statistics.

Plain checkpoint file (what training writes beside MLflow, and what the forecast job reads):

    torch.save({"format": "minconv_dist.checkpoint/1",
                "spec": model.spec,                       # build_model(**spec) rebuilds it
                "state_dict": model.state_dict(),
                "stats": {"channels": [...], "mean": [...], "std": [...]}})   # or None

Readable with `torch.load(weights_only=True)`: only tensors, lists, strings and numbers.
`load_model(uri)` also takes an MLflow `models:/name/version` (or `runs:/...`) URI, whose model may
carry the same stats dict as `metadata={"norm_stats": ...}` in `mlflow.pytorch.log_model`, and an
official-repo checkpoint (`official:path`, with `arch` and `padding` given).
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from minconv_dist.models import Network, build_model, from_official_checkpoint

FORMAT = "minconv_dist.checkpoint/1"


def stats_to_dict(stats: Any) -> dict[str, list] | None:
    """NormStats (or a dict of the same fields) -> plain dict of lists."""
    if stats is None:
        return None
    get = stats.get if isinstance(stats, dict) else lambda k: getattr(stats, k)
    return {"channels": [str(c) for c in get("channels")],
            "mean": np.asarray(get("mean"), dtype=np.float64).tolist(),
            "std": np.asarray(get("std"), dtype=np.float64).tolist()}


def save_checkpoint(path: str | os.PathLike, model: Network, stats: Any = None) -> None:
    """Write the plain checkpoint (atomically: a crash leaves the old file, not half a new one)."""
    if not hasattr(model, "spec"):
        raise ValueError("model has no .spec; build it with minconv_dist.models.build_model")
    tmp = f"{os.fspath(path)}.tmp"
    torch.save({"format": FORMAT, "spec": dict(model.spec), "state_dict": model.state_dict(),
                "stats": stats_to_dict(stats)}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> tuple[Network, dict | None]:
    """(model in eval mode, stats dict or None) from a plain checkpoint."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "spec" not in obj or "state_dict" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        hint = " (an official-repo checkpoint? use 'official:PATH' with --arch/--padding)" \
            if isinstance(obj, dict) and "model_state_dict" in obj else ""
        raise ValueError(f"{path}: not a minconv_dist checkpoint: expected keys 'spec', 'state_dict', 'stats', "
                         f"got {keys}{hint}")
    model = build_model(**obj["spec"])
    model.load_state_dict(obj["state_dict"])
    return model.eval(), obj.get("stats")


def load_model(
    uri: str, *, arch: str | None = None, padding: str = "zeros", tanh_encoder: bool = False,
) -> tuple[Network, dict | None]:
    """(model, stats dict or None) from a checkpoint path, `models:/...`/`runs:/...`, or `official:PATH`."""
    if uri.startswith(("models:/", "runs:/")):
        import mlflow

        model = mlflow.pytorch.load_model(uri, map_location="cpu")
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
