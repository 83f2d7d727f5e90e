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

    def _check_stats(self, **stats: Tensor) -> None:
        for name, value in stats.items():
            if value.shape != self.mean.shape:
                raise ValueError(f"{name} for {value.numel()} channels, the model has {len(self.channels)} "
                                 f"({self.channels})")

    def set_stats(self, mean: Sequence[float], std: Sequence[float]) -> "Normalizer":
        mean_t, std_t = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(std, dtype=torch.float64)
        self._check_stats(mean=mean_t, std=std_t)
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
        for name, buffer in self._buffers.items():
            if buffer is not None:
                self._buffers[name] = buffer.to(probe.device, dtype)
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


class TendencyNormalizer(Normalizer):
    """A normaliser for a network that predicts the change of its inputs over one step (GraphCast's and
    anemoi-training's residual prediction): the network's output d is the step's change in units of its own
    per-channel std, `tendency_std` (of x(t+1) - x(t) over the training split), so the next frame is

        x(t+1) = x(t) + tendency_std * d,  in normalised units  z(t+1) = z(t) + (tendency_std / std) * d.

    The model starts near persistence and spends its capacity on the change, which for hourly frames is a few
    hundredths of a field's std. `next_frame` adds in at least float32: in bf16 a normalised z500 of 2 is
    resolved to 0.016, about an hour's change, so a bf16 state would lose the tendency."""

    def __init__(self, channels: Sequence[str]):
        super().__init__(channels)
        self.register_buffer("tendency_std", torch.ones(len(self.channels)))

    def set_tendency_std(self, tendency_std: Sequence[float]) -> "TendencyNormalizer":
        value = torch.as_tensor(tendency_std, dtype=torch.float64)
        self._check_stats(tendency_std=value)
        if not (torch.isfinite(value).all() and (value > 0).all()):
            raise ValueError(f"tendency_std must be finite and > 0, got {value.tolist()}")
        with torch.no_grad():
            self.tendency_std.copy_(value)
        return self

    def next_frame(self, z: Tensor, d: Tensor) -> Tensor:
        """z(t) + (tendency_std / std) * d: the normalised next frame from the normalised frame z [..., C, H, W]
        and the network's output d of the same shape, in at least float32."""
        _, std, dtype = self._shaped(z)
        scale = (self.tendency_std.to(dtype).view(-1, 1, 1) / std)
        return z.to(dtype) + scale * d.to(dtype)


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

    def normalized(self) -> Tensor:
        """The fields normalised by their own statistics, [S, H, W], in at least float32."""
        return self.normalize(self.values)
