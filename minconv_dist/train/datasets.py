"""The training and validation windows of a run, built the same way on the driver (to size the epoch and
fail early) and in every worker (to train)."""
from __future__ import annotations

import numpy as np

from minconv_dist.data import NormStats, WindowDataset, channel_bounds
from minconv_dist.data.forcings import forcing_channels
from minconv_dist.train.config import TrainConfig


def split_of(cfg: TrainConfig, split: str) -> dict[str, tuple | None]:
    """`time_range` and `sample_range` of the "train" or "val" split, as WindowDataset/compute_stats take them."""
    time_range, samples = getattr(cfg.data, f"{split}_range"), getattr(cfg.data, f"{split}_samples")
    return {"time_range": tuple(time_range) if time_range else None,
            "sample_range": tuple(samples) if samples else None}


def window_dataset(cfg: TrainConfig, url: str, stats: NormStats, split: str, *, rank: int,
                   world_size: int, frames: tuple[int, int] | None = None) -> WindowDataset:
    """Raw windows of T + 1 frames of `split` for data-parallel rank `rank` of `world_size`: training windows
    shuffled at `data.stride` (with `data.stateful`, in `data.batch_size` streams in time order at stride T),
    validation windows in order and disjoint (stride T + 1). NaN are filled with the
    training means when `data.nan_policy` is "fill"; every block is checked against the channels' plausible
    ranges. frames: [first, stop) of each window, the time block of a rank of a time group (`TimeSplit.frames`).
    With `data.forcings`, each item is a pair (window, its forcings)."""
    d = cfg.data
    train = split == "train"
    return WindowDataset(
        url, d.channels, d.sequence_length + 1, stride=d.stride if train else d.sequence_length + 1,
        **split_of(cfg, split), coarsen=d.coarsen, dims=d.dims, storage_options=d.storage_options or None,
        shuffle=train, seed=cfg.run.seed, batch_size=d.batch_size, rank=rank, world_size=world_size,
        nan_policy=d.nan_policy, fill_values=stats.mean if d.nan_policy == "fill" else None,
        max_read_amplification=d.max_read_amplification,
        bounds=channel_bounds(d.channels, d.bounds),  # every block a worker reads is range-checked too
        frames=frames, forcings=forcing_channels(d.forcings), reader=d.reader, stateful=d.stateful and train,
    )


def build_network(cfg: TrainConfig, stats: NormStats, grid: tuple[int, int], static: np.ndarray | None = None):
    """The run's network, its normaliser holding the training statistics, reading the forcings of
    `data.forcings` and the static fields `static` [S, H, W] of `data.static` (`data.static.read_static`)."""
    from minconv_dist.models import build_model

    m, d = cfg.model, cfg.data
    model = build_model(m.arch, stats.channels, m.hidden_size, m.layers, padding=m.padding, norm=m.norm,
                        grid=grid, tanh_encoder=m.tanh_encoder, scan_method=m.scan_method, chunk_size=m.chunk_size,
                        forcings=forcing_channels(d.forcings), static=d.static, predict=m.predict)
    model.normalizer.set_stats(stats.mean, stats.std)
    if m.chrono_max is not None:
        for cell in model.cells:
            cell.chrono_init_(m.chrono_max)
    if m.predict == "tendency":
        model.normalizer.set_tendency_std(stats.tendency_std)
    if d.static:
        model.static.set_fields(static)
    if m.fuse_norm:
        model.fuse_residual_norm()
    return model
