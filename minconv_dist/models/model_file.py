"""The model file: a network's spec and its weights, normalisation statistics included (they are buffers of
the network's normaliser), so the file alone forecasts in physical units.

    torch.save({"format": "minconv_dist.model/4",
                "spec": model.spec,                 # build_model(**spec) rebuilds it, forcings and static included
                "state_dict": model.state_dict()})  # weights, normalizer.mean / .std (/ .tendency_std),
                                                    # static.values / .mean / .std

Format 3 added the spec's `forcings` and `static` (the input channels that are not predicted), format 4 its
`predict` ("state" or "tendency"); format 2 and 3 files, which lack them, still load (as "state" models).

Training writes it into every checkpoint (`model.pt`), the forecast job reads it. Only tensors, lists,
strings and numbers, so `torch.load(weights_only=True)` reads it. (A training checkpoint is a different
thing: DeepSpeed shards, RNG states and the data position; see `minconv_dist.train.checkpoint`.)
"""
from __future__ import annotations

import os

import torch

from minconv_dist.models.network import Network
from minconv_dist.models.registry import build_model

FORMAT = "minconv_dist.model/4"
READABLE = ("minconv_dist.model/2", "minconv_dist.model/3", FORMAT)


def save_model_file(path: str | os.PathLike, model: Network,
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the model file atomically (a crash leaves the old file, not half a new one).

    `state_dict` overrides `model.state_dict()` (e.g. the fp32 master weights gathered from ZeRO shards).
    """
    if not hasattr(model, "spec"):
        raise ValueError("model has no .spec; build it with minconv_dist.models.build_model")
    tmp = f"{os.fspath(path)}.tmp"
    torch.save({"format": FORMAT, "spec": dict(model.spec),
                "state_dict": model.state_dict() if state_dict is None else state_dict}, tmp)
    os.replace(tmp, path)


def load_model_file(path: str | os.PathLike) -> Network:
    """The model in eval mode, from a model file. A file that is not one (garbage, or a pickle that would run code:
    `weights_only` refuses to build any object but tensors and plain data) is a ValueError naming it."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as err:  # noqa: BLE001 - garbage makes torch.load raise almost anything
        raise ValueError(_unreadable(path, err)) from err
    if not isinstance(obj, dict) or obj.get("format") not in READABLE:
        found = obj.get("format", sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
        hint = " (an official-repo checkpoint? use from_official_checkpoint / 'official:PATH')" \
            if isinstance(obj, dict) and "model_state_dict" in obj else ""
        raise ValueError(f"{path}: not a minconv_dist model file of format {' or '.join(READABLE)} (found {found})"
                         f"{hint}")
    model = build_model(**obj["spec"])
    model.load_state_dict(obj["state_dict"])
    return model.eval()


def _unreadable(path: str | os.PathLike, err: Exception) -> str:
    """Why torch.load(weights_only=True) refused `path`, in one line: a pickle that names code to run (a class or
    function: a crafted file, or a whole pickled model), or something that is no torch file at all."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    detail = " ".join(line.strip() for line in str(err).splitlines() if line.strip()
                      and not line.strip().startswith(boilerplate))
    if type(err).__name__ != "UnpicklingError":
        detail = f"{type(err).__name__}: {detail}".rstrip(": ")
    if "GLOBAL" in detail.upper():
        return (f"{path}: refused, not a weights-only model file: loading it would run code ({detail}); nothing "
                "was run")
    return f"{path}: not a minconv_dist model file, torch.load(weights_only=True) cannot read it ({detail})"
