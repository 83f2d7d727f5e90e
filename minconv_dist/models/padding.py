"""3x3 convolutions with the three boundary conditions the models use.

- "zeros": zero padding (bounded domains);
- "circular": periodic in both directions (the Navier–Stokes torus);
- "cylinder": periodic along longitude (W), zeros along latitude (H): a global lat/lon grid.

A periodic dim needs its wrap-around halo copied in (`wrap`); a zero-padded dim does not: the conv pads it
itself (`zero_halo`), without materialising a padded copy of its input (in forward or in backward).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

PADDINGS = ("zeros", "circular", "cylinder")


def check_padding(padding: str) -> str:
    if padding not in PADDINGS:
        raise ValueError(f"unknown padding {padding!r}; expected one of {PADDINGS}")
    return padding


def wrap(x: Tensor, padding: str, width: int = 1) -> Tensor:
    """Pad the periodic dims of x [..., H, W] by `width` with their wrap-around halo (none for "zeros")."""
    if check_padding(padding) == "zeros":
        return x
    return F.pad(x, (width, width, *((width, width) if padding == "circular" else (0, 0))), mode="circular")


def zero_halo(padding: str, width: int = 1) -> tuple[int, int]:
    """(H, W) zero padding that remains after `wrap`."""
    return {"zeros": (width, width), "circular": (0, 0), "cylinder": (width, 0)}[check_padding(padding)]


def pad(x: Tensor, padding: str, width: int = 1) -> Tensor:
    """Pad the last two dims (H, W) of x by `width` with the given boundary condition."""
    h, w = zero_halo(padding, width)
    return F.pad(wrap(x, padding, width), (w, w, h, h))


class PaddedConv2d(nn.Conv2d):
    """A 3x3, stride-1 conv that keeps the grid size under the chosen boundary condition.

    Accepts [N, C, H, W] or [B, T, C, H, W] (frames folded into the batch: one batched conv).
    """

    def __init__(self, in_channels: int, out_channels: int, padding: str = "zeros"):
        super().__init__(in_channels, out_channels, kernel_size=3, padding=zero_halo(padding), bias=True)
        self.boundary = padding

    def forward(self, x: Tensor) -> Tensor:
        # 4-D frames (a per-step loop) go straight to the conv: no reshapes, whose autograd nodes it pays per step.
        frames = x.flatten(0, 1) if x.dim() == 5 else x
        y = super().forward(wrap(frames, self.boundary))
        return y.unflatten(0, x.shape[:2]) if x.dim() == 5 else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, boundary={self.boundary}"
