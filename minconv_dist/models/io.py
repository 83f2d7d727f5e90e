"""A model file that forecasts on its own: the network's spec, its weights, its normalisation stats.

    torch.save({"format": "minconv_dist.checkpoint/1",
                "spec": model.spec,                       # build_model(**spec) rebuilds it
                "state_dict": model.state_dict(),
                "stats": {"channels": [...], "mean": [...], "std": [...]}})   # or None

Training writes it into every checkpoint (`model.pt`), the forecast job reads it. Only tensors, lists,
strings and numbers, so `torch.load(weights_only=True)` reads it.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from minconv_dist.models.network import Network
from minconv_dist.models.registry import build_model

FORMAT = "minconv_dist.checkpoint/1"


def stats_to_dict(stats: Any) -> dict[str, list] | None:
    """Normalisation stats (any object or dict with channels, mean, std) -> plain dict of lists."""
    if stats is None:
        return None
    get = stats.get if isinstance(stats, dict) else lambda k: getattr(stats, k)
    return {"channels": [str(c) for c in get("channels")],
            "mean": np.asarray(get("mean"), dtype=np.float64).tolist(),
            "std": np.asarray(get("std"), dtype=np.float64).tolist()}


def save_checkpoint(path: str | os.PathLike, model: Network, stats: Any = None,
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the model file atomically (a crash leaves the old file, not half a new one).

    `state_dict` overrides `model.state_dict()` (e.g. weights gathered from ZeRO-3 shards).
    """
    if not hasattr(model, "spec"):
        raise ValueError("model has no .spec; build it with minconv_dist.models.build_model")
    tmp = f"{os.fspath(path)}.tmp"
    torch.save({"format": FORMAT, "spec": dict(model.spec),
                "state_dict": model.state_dict() if state_dict is None else state_dict,
                "stats": stats_to_dict(stats)}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> tuple[Network, dict | None]:
    """(model in eval mode, stats dict or None) from a model file."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "spec" not in obj or "state_dict" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        hint = " (an official-repo checkpoint? use from_official_checkpoint / 'official:PATH')" \
            if isinstance(obj, dict) and "model_state_dict" in obj else ""
        raise ValueError(f"{path}: not a minconv_dist model file: expected keys 'spec', 'state_dict', 'stats', "
                         f"got {keys}{hint}")
    model = build_model(**obj["spec"])
    model.load_state_dict(obj["state_dict"])
    return model.eval(), obj.get("stats")
