"""The training and validation windows of a run, built the same way on the driver (to size the epoch and
fail early) and in every worker (to train)."""
from __future__ import annotations

from minconv_dist.data import DimNames, NormStats, WindowDataset
from minconv_dist.train.config import TrainConfig


def dims_of(cfg: TrainConfig) -> DimNames:
    d = cfg.data
    return DimNames(d.time_dim, d.level_dim, d.lat_dim, d.lon_dim, d.sample_dim)


def split_of(cfg: TrainConfig, split: str) -> dict[str, tuple | None]:
    """`time_range` and `sample_range` of the "train" or "val" split, as WindowDataset/compute_stats take them."""
    time_range, samples = getattr(cfg.data, f"{split}_range"), getattr(cfg.data, f"{split}_samples")
    return {"time_range": tuple(time_range) if time_range else None,
            "sample_range": tuple(samples) if samples else None}


def window_dataset(cfg: TrainConfig, url: str, stats: NormStats, split: str, *, rank: int,
                   world_size: int) -> WindowDataset:
    """Windows of T + 1 frames of `split` for one rank: training windows shuffled at `data.stride`,
    validation windows in order and disjoint (stride T + 1)."""
    d = cfg.data
    train = split == "train"
    return WindowDataset(
        url, d.channels, d.sequence_length + 1, stride=d.stride if train else d.sequence_length + 1,
        **split_of(cfg, split), coarsen=d.coarsen, stats=stats, dims=dims_of(cfg),
        storage_options=d.storage_options or None, shuffle=train, seed=cfg.run.seed, batch_size=d.batch_size,
        rank=rank, world_size=world_size,
    )
