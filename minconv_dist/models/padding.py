"""3x3 convolutions with the three boundary conditions the models use.

- "zeros": zero padding (bounded domains);
- "circular": periodic in both directions (the Navier–Stokes torus);
- "cylinder": periodic along longitude (W), zeros along latitude (H): a global lat/lon grid.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

PADDINGS = ("zeros", "circular", "cylinder")


def check_padding(padding: str) -> str:
    if padding not in PADDINGS:
        raise ValueError(f"unknown padding {padding!r}; expected one of {PADDINGS}")
    return padding


def pad(x: Tensor, padding: str, width: int = 1) -> Tensor:
    """Pad the last two dims (H, W) of x by `width` with the given boundary condition."""
    if padding == "zeros":
        return F.pad(x, (width,) * 4)
    if padding == "circular":
        return F.pad(x, (width,) * 4, mode="circular")
    if padding == "cylinder":
        x = F.pad(x, (width, width, 0, 0), mode="circular")
        return F.pad(x, (0, 0, width, width))
    raise ValueError(f"unknown padding {padding!r}; expected one of {PADDINGS}")


class PaddedConv2d(nn.Conv2d):
    """A 3x3, stride-1 conv that keeps the grid size under the chosen boundary condition.

    Accepts [N, C, H, W] or [B, T, C, H, W] (frames folded into the batch: one batched conv).
    """

    def __init__(self, in_channels: int, out_channels: int, padding: str = "zeros"):
        super().__init__(in_channels, out_channels, kernel_size=3, padding=0, bias=True)
        self.boundary = check_padding(padding)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-3]
        y = super().forward(pad(x.reshape(-1, *x.shape[-3:]), self.boundary))
        return y.reshape(*lead, *y.shape[-3:])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, boundary={self.boundary}"
