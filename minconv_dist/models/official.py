"""Import (and export) checkpoints of the paper's official implementation (AdaptiveAILab/minconvrnns).

Official layout (see shared MODELS.md): `encoder.0`, `{cgru|clstm}.{l}.conv.{0|1}` (index 1 when
padding is cylinder: index 0 is the pad module), ConvGRU's `conv_a`/`conv_b` likewise,
`norms.{l}` (LayerNorm [H, W] or GroupNorm [hidden]) and `decoder`. Hidden sizes, grid, norm type and
input channels are read off the weights; padding mode and the encoder's tanh leave no weights and
must be given. The official code takes normalised inputs, so an imported model's normaliser starts as the
identity (set its statistics with `model.normalizer.set_stats(mean, std)` to feed physical units).
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from minconv_dist.models.network import Network
from minconv_dist.models.registry import ARCHS, build_model

PREFIX = {"minconvgru": "cgru", "convgru": "cgru", "minconvlstm": "clstm", "minconvexplstm": "clstm", "convlstm": "clstm"}
#: arch -> {conv name: (out multiple, in multiple)} of `hidden`
CONV_SHAPES = {
    "minconvgru": {"conv": (2, 1)},
    "minconvlstm": {"conv": (3, 1)},
    "minconvexplstm": {"conv": (3, 1)},
    "convlstm": {"conv": (4, 2)},
    "convgru": {"conv_a": (2, 2), "conv_b": (1, 2)},
}
_CELL_KEY = re.compile(r"^(cgru|clstm)\.(\d+)\.(conv|conv_a|conv_b)\.(\d)\.(weight|bias)$")


def _load_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Tensor]:
    where = source if isinstance(source, (str, os.PathLike)) else "the given object"
    if isinstance(source, (str, os.PathLike)):
        try:
            obj = torch.load(source, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # unpickling errors come in many types
            raise ValueError(f"{where}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err
    else:
        obj = source
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"{where}: not an official checkpoint: expected a dict with 'model_state_dict' or a bare state dict of tensors"
        )
    if "encoder.0.weight" not in obj or "decoder.weight" not in obj:
        raise ValueError(f"{where}: not an official checkpoint: no 'encoder.0.weight'/'decoder.weight' keys")
    return dict(obj)


def from_official_checkpoint(
    path: str | os.PathLike | Mapping[str, Any],
    arch: str,
    padding: str = "zeros",
    tanh_encoder: bool = False,
    scan_method: str = "auto",
    channels: Sequence[str] | None = None,
) -> Network:
    """Build a `Network` whose outputs equal the official model's for the same input and teacher_steps.

    `path` is a file written by the official code (the full training dict or a bare state dict), or
    such a dict already in memory. `channels` names the inputs (default `c0`, `c1`, ...).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    sd = _load_state_dict(path)
    prefix = PREFIX[arch]
    cell_keys = {k: _CELL_KEY.match(k) for k in sd if k.startswith(("cgru.", "clstm."))}
    bad = [k for k, m in cell_keys.items() if m is None or m.group(1) != prefix]
    if bad:
        raise ValueError(f"weights don't fit arch {arch!r} (cells named '{prefix}.*'): unexpected keys {bad[:4]}")
    layers = sorted({int(m.group(2)) for m in cell_keys.values()})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"weights don't fit arch {arch!r}: cell layers {layers}, expected 0..L-1")
    pad_index = {int(m.group(4)) for m in cell_keys.values()}
    if pad_index == {1} and padding != "cylinder":
        raise ValueError(f"the checkpoint was trained with cylinder padding (conv.1.*), got padding={padding!r}")
    if pad_index == {0} and padding == "cylinder":
        raise ValueError("padding='cylinder' but the checkpoint has no CylinderPad (conv.0.* keys)")

    hidden, in_channels = sd["encoder.0.weight"].shape[:2]
    index = 1 if padding == "cylinder" else 0
    for layer in layers:
        for conv, (out_mult, in_mult) in CONV_SHAPES[arch].items():
            key = f"{prefix}.{layer}.{conv}.{index}.weight"
            expected = (out_mult * hidden, in_mult * hidden, 3, 3)
            if key not in sd or tuple(sd[key].shape) != expected:
                found = tuple(sd[key].shape) if key in sd else "missing"
                raise ValueError(f"weights don't fit arch {arch!r}: {key} is {found}, expected {expected}")
    norm_weight = sd.get("norms.0.weight")
    if norm_weight is None:
        raise ValueError("not an official checkpoint: no 'norms.0.weight'")
    norm, grid = ("layer", tuple(norm_weight.shape)) if norm_weight.dim() == 2 else ("group", None)

    if channels is not None and len(channels) != in_channels:
        raise ValueError(f"the checkpoint takes {in_channels} channels, got names for {len(channels)}: {list(channels)}")
    model = build_model(arch, in_channels if channels is None else channels, hidden, len(layers), padding=padding, norm=norm, grid=grid,
                        tanh_encoder=tanh_encoder, scan_method=scan_method).to(norm_weight.dtype)
    ours = {}
    for key, value in sd.items():
        m = _CELL_KEY.match(key)
        ours[f"cells.{m.group(2)}.{m.group(3)}.{m.group(5)}" if m else key] = value
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [k for k in missing if not k.startswith("normalizer.")]  # official models take normalised data
    if missing or unexpected:
        raise ValueError(f"weights don't fit arch {arch!r}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model


def to_official_state_dict(model: Network) -> dict[str, Tensor]:
    """Our state dict renamed to the official layout (for round trips and for the official code). The official
    layout has no normalisation statistics: the official code takes normalised inputs. Nor has it inputs that are
    not predicted: a model with forcings or static fields is refused."""
    if model.forcings or model.static is not None:
        raise ValueError(f"the official layout reads and predicts the same channels; this model also reads forcings "
                         f"{model.forcings} and static fields {model.spec.get('static', [])}")
    arch, padding = model.spec["arch"], model.spec["padding"]
    index = 1 if padding == "cylinder" else 0
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("normalizer."):
            continue
        m = re.match(r"^cells\.(\d+)\.(conv|conv_a|conv_b)\.(weight|bias)$", key)
        out[f"{PREFIX[arch]}.{m.group(1)}.{m.group(2)}.{index}.{m.group(3)}" if m else key] = value
    return out
