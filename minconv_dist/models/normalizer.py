"""Per-channel normalisation as part of the model, in the manner of anemoi's pre-processors: the statistics are
buffers, so they travel in the state dict with the weights, and a model file forecasts in physical units."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


class Normalizer(nn.Module):
    """`(x - mean) / std` per channel of `[..., C, H, W]`, and back. Identity statistics until `set_stats`.

    The statistics stay in float32 (or float64) whatever dtype the network is cast to: in bf16 a z500 mean
    of 54000 would be off by up to 128, a tenth of a standard deviation of the normalised field. Both
    directions compute in at least float32.
    """

    def __init__(self, channels: Sequence[str]):
        super().__init__()
        self.channels = [str(c) for c in channels]
        self.register_buffer("mean", torch.zeros(len(self.channels)))
        self.register_buffer("std", torch.ones(len(self.channels)))

    def set_stats(self, mean: Sequence[float], std: Sequence[float]) -> "Normalizer":
        mean_t, std_t = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(std, dtype=torch.float64)
        if mean_t.shape != self.mean.shape or std_t.shape != self.std.shape:
            raise ValueError(f"statistics for {mean_t.numel()} / {std_t.numel()} channels, the model has "
                             f"{len(self.channels)} ({self.channels})")
        if not (torch.isfinite(mean_t).all() and torch.isfinite(std_t).all() and (std_t > 0).all()):
            raise ValueError(f"statistics must be finite with std > 0, got mean {mean_t.tolist()}, std {std_t.tolist()}")
        with torch.no_grad():
            self.mean.copy_(mean_t)
            self.std.copy_(std_t)
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "Normalizer":
        """Follow device moves and casts up to float64, but never down to a 16-bit dtype."""
        probe = fn(torch.zeros((), dtype=self.mean.dtype, device=self.mean.device))
        dtype = probe.dtype if probe.dtype in (torch.float32, torch.float64) else self.mean.dtype
        self.mean = self.mean.to(probe.device, dtype)
        self.std = self.std.to(probe.device, dtype)
        return self

    def _shaped(self, x: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
        if x.shape[-3] != len(self.channels):
            raise ValueError(f"expected [..., C={len(self.channels)}, H, W] for channels {self.channels}, "
                             f"got shape {tuple(x.shape)}")
        dtype = torch.promote_types(x.dtype, self.mean.dtype)
        return self.mean.to(dtype).view(-1, 1, 1), self.std.to(dtype).view(-1, 1, 1), dtype

    def normalize(self, x: Tensor) -> Tensor:
        mean, std, dtype = self._shaped(x)
        return (x.to(dtype) - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        mean, std, dtype = self._shaped(x)
        return x.to(dtype) * std + mean


class StaticFields(Normalizer):
    """Fixed input fields `values` [S, H, W] (orography, land-sea mask, ...) in physical units, with statistics of
    their own: per field, the mean and std over the grid of the field itself (a constant field gets std 1, so it
    enters as zeros). Buffers, so a model file carries them; float32 whatever the network's dtype, as the
    normaliser's statistics (in bf16 an orography of 5e4 m²/s² would be off by up to 128)."""

    def __init__(self, names: Sequence[str], grid: tuple[int, int]):
        super().__init__(names)
        self.register_buffer("values", torch.zeros(len(self.channels), *grid))

    def set_fields(self, values: Tensor) -> "StaticFields":
        values = torch.as_tensor(values, dtype=torch.float64)
        if values.shape != self.values.shape:
            raise ValueError(f"static fields {self.channels}: expected shape {tuple(self.values.shape)}, got "
                             f"{tuple(values.shape)}")
        if not torch.isfinite(values).all():
            raise ValueError(f"static fields {self.channels} must be finite")
        std = values.flatten(1).std(dim=1, unbiased=False)
        self.set_stats(values.flatten(1).mean(dim=1), torch.where(std > 0, std, torch.ones_like(std)))
        with torch.no_grad():
            self.values.copy_(values)
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "StaticFields":
        super()._apply(fn, recurse)
        self.values = self.values.to(self.mean.device, self.mean.dtype)
        return self

    def normalized(self) -> Tensor:
        """The fields normalised by their own statistics, [S, H, W], in at least float32."""
        return self.normalize(self.values)
