"""WindowDataset: content, sharding over ranks x loader workers, determinism, resume, bad input."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from minconv_dist.data import DataError, DimNames, WindowDataset, open_store, write_synthetic_era5
from minconv_dist.data import windows as windows_module
from minconv_dist.data.windows import buffer_shuffle, consumed_per_worker, windows_with_nan

T = 5


def frame_index(store: str, var: str = "z") -> tuple[np.ndarray, dict[bytes, int]]:
    """The store's frames and a lookup from a frame's bytes to its time index."""
    frames = open_store(store)[var].values
    return frames, {f.tobytes(): i for i, f in enumerate(frames)}


def starts_of(windows, lookup) -> list[int]:
    return [lookup[w[0, 0].numpy().tobytes()] for w in windows]


def test_windows_are_the_stores_frames(tiny_store):
    frames, lookup = frame_index(tiny_store)
    ds = WindowDataset(tiny_store, "z", T, stride=3, shuffle=False)
    windows = list(ds)
    assert len(windows) == len(ds) == (240 - T) // 3 + 1
    assert starts_of(windows, lookup) == list(range(0, 240 - T + 1, 3))
    for w, s in zip(windows, range(0, 240, 3)):
        assert w.shape == (T, 1, 32, 64) and w.dtype == torch.float32
        np.testing.assert_array_equal(w[:, 0].numpy(), frames[s:s + T])
    np.testing.assert_array_equal(ds.times, open_store(tiny_store).time.values[0:240 - T + 1:3])
    assert ds.grid == (32, 64)


def test_time_range_by_dates(tiny_store):
    ds = WindowDataset(tiny_store, "z", 24, time_range=("2015-01-03", "2015-01-04"), shuffle=False)
    assert len(ds) == 48 - 24 + 1
    assert str(ds.times[0])[:19] == "2015-01-03T00:00:00" and str(ds.times[-1])[:19] == "2015-01-04T00:00:00"


def test_each_block_is_read_once_per_epoch(tiny_store, monkeypatch):
    reads = []
    original = WindowDataset._read

    def counting(self, layers, s_first, s_last, t_first, t_last):
        reads.append((t_first, t_last))
        return original(self, layers, s_first, s_last, t_first, t_last)

    monkeypatch.setattr(WindowDataset, "_read", counting)
    ds = WindowDataset(tiny_store, "z", T, shuffle_buffer=100, max_read_amplification=1.1)
    assert ds.block == 60  # 10 chunks of 6: the T - 1 frames past a block cost one more chunk, 10 %
    assert len(list(ds)) == len(ds) and len(reads) == 4
    assert sorted(reads) == [(0, 64), (60, 124), (120, 184), (180, 240)]
    assert sum(b - a for a, b in reads) / 240 <= 1.1


def test_coarsening_equals_block_mean_and_latitude_order(tiny_north_to_south_store):
    dims = DimNames(lat="latitude", lon="longitude")
    ds = WindowDataset(tiny_north_to_south_store, "geopotential@500, 2m_temperature", T, coarsen=4, shuffle=False,
                       dims=dims)
    src = open_store(tiny_north_to_south_store)
    w = next(iter(ds))
    assert w.shape == (T, 2, 8, 16) and ds.grid == (8, 16)
    z = src.geopotential.sel(level=500).values[:T]
    expected = z.reshape(T, 8, 4, 16, 4).mean(axis=(2, 4))
    assert src.latitude.values[0] > 0  # the store runs north to south, and the windows keep its order:
    np.testing.assert_allclose(w[:, 0].numpy(), expected, rtol=1e-6)


def test_windows_are_raw_physical_values(tiny_store):
    """Normalising is the model's first step: the loader hands over the store's values (z500 ~ 5e4)."""
    w = next(iter(WindowDataset(tiny_store, "z", T, shuffle=False)))
    np.testing.assert_array_equal(w[:, 0].numpy(), open_store(tiny_store).z.values[:T])
    assert 4e4 < w.mean() < 7e4


def collect(ds: WindowDataset, workers: int, batch: int) -> list[torch.Tensor]:
    """Windows in the order a DataLoader delivers them."""
    return [x for b in DataLoader(ds, batch_size=batch, num_workers=workers) for x in b.unbind(0)]


def test_sharding_over_ranks_and_workers_covers_each_window_once(tiny_store):
    _, lookup = frame_index(tiny_store)
    n = 240 - T + 1
    seen = []
    for rank in range(2):
        ds = WindowDataset(tiny_store, "z", T, rank=rank, world_size=2, batch_size=3, seed=7)
        got = starts_of(collect(ds, workers=2, batch=3), lookup)
        assert len(got) == len(ds) == n // 2
        seen += got
    assert len(seen) == len(set(seen)) == n - n % 2
    assert set(seen) <= set(range(n))


def test_order_is_deterministic_per_seed_and_epoch(tiny_store):
    _, lookup = frame_index(tiny_store)
    order = lambda seed, epoch: (lambda ds: (ds.set_epoch(epoch), starts_of(list(ds), lookup))[1])(  # noqa: E731
        WindowDataset(tiny_store, "z", T, seed=seed))
    a = order(0, 0)
    assert a == order(0, 0)
    assert a != order(1, 0) and a != order(0, 1)
    assert sorted(a) == sorted(order(0, 1)) == list(range(240 - T + 1))
    assert a != sorted(a)


def test_resume_in_process_yields_exactly_the_rest(tiny_store):
    _, lookup = frame_index(tiny_store)
    ds = WindowDataset(tiny_store, "z", T, seed=3)
    ds.set_epoch(2)
    full = starts_of(list(ds), lookup)
    it = iter(ds)
    head = [next(it) for _ in range(50)]
    state = ds.state_dict()
    assert state["epoch"] == 2 and state["position"] == 50
    fresh = WindowDataset(tiny_store, "z", T, seed=3)
    fresh.load_state_dict(state)
    fresh.set_epoch(2)  # the loop's call at the start of the resumed epoch keeps the position
    assert starts_of(head, lookup) + starts_of(list(fresh), lookup) == full
    fresh.set_epoch(3)
    assert len(list(fresh)) == len(fresh)
    with pytest.raises(ValueError, match="seed"):
        WindowDataset(tiny_store, "z", T, seed=4).load_state_dict(state)


def test_resume_with_loader_workers_yields_exactly_the_rest(tiny_store):
    _, lookup = frame_index(tiny_store)
    make = lambda: WindowDataset(tiny_store, "z", T, rank=1, world_size=2, batch_size=4, seed=5)  # noqa: E731
    full = starts_of(collect(make(), workers=2, batch=4), lookup)
    loader = iter(DataLoader(make(), batch_size=4, num_workers=2))
    consumed = [x for _ in range(7) for x in next(loader).unbind(0)]
    del loader
    resumed = make()
    resumed.load_state_dict(make().state_dict(position=len(consumed)))
    rest = starts_of(collect(resumed, workers=2, batch=4), lookup)
    assert starts_of(consumed, lookup) + rest == full


def test_windows_are_views_of_their_block(tiny_store):
    """No copy per window: the windows of a block share its memory, one frame apart."""
    first = list(WindowDataset(tiny_store, "z", T, shuffle=False, max_read_amplification=1.1))[:56]  # block 0
    assert len({w.untyped_storage().data_ptr() for w in first}) == 1
    assert all(b.data_ptr() - a.data_ptr() == a[0].nbytes for a, b in zip(first, first[1:]))


def test_the_store_is_opened_once_per_process(tiny_store, monkeypatch):
    """Not once per epoch; a pickled copy (a spawned loader worker's) opens its own and yields the same windows."""
    opened = []
    original = windows_module.open_store

    def counting(*args, **kwargs):
        opened.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(windows_module, "open_store", counting)
    ds = WindowDataset(tiny_store, "z", T)
    first = list(ds)
    ds.set_epoch(1)
    assert len(list(ds)) == len(first) and len(opened) == 1
    copy = pickle.loads(pickle.dumps(ds))
    copy.set_epoch(0)
    assert all(torch.equal(a, b) for a, b in zip(list(copy), first)) and len(opened) == 2


def test_buffer_shuffle_keeps_its_order():
    """The order a resume relies on: the same as the item-by-item definition of a streaming shuffle buffer."""
    def reference(seq, size, rng):
        size = min(size, seq.size)
        buf, out = seq[:size].copy(), np.empty_like(seq)
        for i, (j, incoming) in enumerate(zip(rng.integers(0, size, seq.size - size), seq[size:])):
            out[i], buf[j] = buf[j], incoming
        out[seq.size - size:] = rng.permutation(buf)
        return out

    seq = np.random.default_rng(0).permutation(500)
    for size in (2, 7, 100, 500, 800):
        got, want = (f(seq, size, np.random.default_rng([1, size])) for f in (buffer_shuffle, reference))
        np.testing.assert_array_equal(got, want)
        assert got.dtype == seq.dtype


def test_windows_with_nan_per_sample_and_first_frame():
    x = torch.zeros(2, 10, 1, 3, 3)
    x[0, 4, 0, 1, 1] = x[1, 0, 0, 2, 2] = x[1, 9, 0, 0, 0] = float("nan")
    want = [[torch.isnan(x[s, t:t + 3]).any().item() for t in range(8)] for s in range(2)]
    assert windows_with_nan(x, 3).tolist() == want[0] + want[1]


def test_consumed_per_worker_follows_dataloader_round_robin():
    assert consumed_per_worker([5, 3], 0, 2) == ([0, 0], 0)
    assert consumed_per_worker([5, 3], 2, 2) == ([2, 0], 1)
    assert consumed_per_worker([5, 3], 4, 2) == ([2, 2], 0)
    assert consumed_per_worker([5, 3], 7, 2) == ([4, 3], 0)  # worker 1's last batch has one window
    assert consumed_per_worker([5, 3], 8, 2) == ([5, 3], 1)
    with pytest.raises(ValueError, match="batch boundary"):
        consumed_per_worker([5, 3], 3, 2)


@pytest.mark.parametrize("kwargs, match", [
    ({"time_range": ("2016-01-01", "2016-02-01")}, "selects no time steps"),
    ({"window": 241}, "window=241 is longer than the 240 time steps"),
    ({"time_range": ("2015-01-02", "2015-01-02"), "window": 25}, "longer than the 24 time steps"),
    ({"coarsen": 3}, "coarsen=3 does not divide the 32x64 grid"),
    ({"nan_policy": "ignore"}, "nan_policy='ignore'"),
    ({"nan_policy": "fill"}, "takes fill_values, one per channel"),
    ({"nan_policy": "fill", "fill_values": [1.0, 2.0]}, "takes fill_values, one per channel"),
    ({"rank": 2, "world_size": 2}, "rank=2 outside world_size=2"),
    ({"sample_range": (0, 1)}, "needs a sample dim"),
])
def test_bad_arguments(tiny_store, kwargs, match):
    kwargs = {"window": T, **kwargs}
    with pytest.raises(ValueError, match=match):
        WindowDataset(tiny_store, "z", **kwargs)


def test_missing_time_dim_is_named(tiny_wb2_store):
    with pytest.raises(ValueError, match="expected \\('time', 'lat', 'lon'\\)"):
        WindowDataset(tiny_wb2_store, "2m_temperature", T)


@pytest.fixture
def nan_store(tmp_path):
    """A tiny store with NaN in frame 100 of `z`."""
    path = str(tmp_path / "nan.zarr")
    write_synthetic_era5(path, start="2015-01-01", end="2015-01-11", chunks=6)
    arr = zarr.open_array(os.path.join(path, "z"), mode="r+")
    arr[100, 3, 4] = np.nan
    return path


def test_nan_raise_names_variable_and_time(nan_store):
    with pytest.raises(ValueError, match=r"NaN in channel z \(variable 'z'\) at time 2015-01-05T04:00"):
        list(WindowDataset(nan_store, "z", T, shuffle=False))


def test_nan_skip_and_fill(nan_store):
    skipped = list(WindowDataset(nan_store, "z", T, shuffle=False, nan_policy="skip"))
    assert len(skipped) == 236 - T  # the windows starting at 96..100 hold frame 100
    assert not any(torch.isnan(w).any() for w in skipped)
    filled = list(WindowDataset(nan_store, "z", T, shuffle=False, nan_policy="fill", fill_values=[54000.0]))
    assert len(filled) == 236 and filled[100][0, 0, 3, 4] == 54000.0
    assert not any(torch.isnan(w).any() for w in filled)


def test_missing_chunk_is_named(tiny_store, tmp_path):
    path = str(tmp_path / "holed.zarr")
    shutil.copytree(tiny_store, path)
    os.remove(os.path.join(path, "z", "c", "7", "0", "0"))
    with pytest.raises(DataError, match=r"chunk 'z/c/7/0/0' of variable 'z' \(time .*\) is missing from"):
        list(WindowDataset(path, "z", T, shuffle=False))


def test_corrupt_chunk_is_named(tiny_store, tmp_path):
    path = str(tmp_path / "corrupt.zarr")
    shutil.copytree(tiny_store, path)
    with open(os.path.join(path, "z", "c", "3", "0", "0"), "wb") as f:
        f.write(b"not zstd at all")
    with pytest.raises(DataError, match="chunk .z/c/3/0/0. does not decode"):
        list(WindowDataset(path, "z", T, shuffle=False))


def test_s3_windows_equal_local(tiny_store, s3_bucket, s3_options):
    url = f"s3://{s3_bucket}/tiny.zarr"
    write_synthetic_era5(url, start="2015-01-01", end="2015-01-11", chunks=6, storage_options=s3_options)
    remote = WindowDataset(url, "z", T, stride=4, storage_options=s3_options, rank=0, world_size=2, seed=1)
    local = WindowDataset(tiny_store, "z", T, stride=4, rank=0, world_size=2, seed=1)
    pairs = list(zip(collect(remote, workers=2, batch=2), collect(local, workers=2, batch=2)))
    assert len(pairs) == len(local) == 59 // 2
    for a, b in pairs:
        assert torch.equal(a, b)


# ---- sample stores (Navier–Stokes layout): windows inside one trajectory, splits by sample index ----
NS = DimNames(lat="y", lon="x", sample="sample")


def ids(windows) -> list[tuple[int, int]]:
    """(sample, start) of each window of `tiny_sample_store`, checking it lies inside one trajectory."""
    out = []
    for w in windows:
        first = int(w[0, 0, 0, 0])
        np.testing.assert_array_equal(w[:, 0, 0, 0].numpy(), first + np.arange(w.shape[0]))
        out.append(divmod(first, 100))
    return out


def test_sample_windows_stay_inside_one_trajectory(tiny_sample_store):
    ds = WindowDataset(tiny_sample_store, "vorticity", T, stride=2, sample_range=(2, 9), dims=NS, shuffle=False)
    assert ds.windows_per_sample == 4 and len(ds) == 7 * 4 and ds.grid == (8, 8)
    assert ids(ds) == [(s, t) for s in range(2, 9) for t in (0, 2, 4, 6)]
    assert ds.samples.tolist() == [s for s in range(2, 9) for _ in range(4)] and ds.times[:4].tolist() == [0, 2, 4, 6]


def test_sample_blocks_are_whole_sample_chunks_read_once(tiny_sample_store, monkeypatch):
    reads = []
    original = WindowDataset._read

    def counting(self, layers, *span):
        reads.append(span)
        return original(self, layers, *span)

    monkeypatch.setattr(WindowDataset, "_read", counting)
    ds = WindowDataset(tiny_sample_store, "vorticity", T, sample_range=(2, 9), dims=NS, seed=1)
    assert len(ids(ds)) == 7 * 8
    assert sorted(reads) == [(2, 4, 0, 12), (4, 8, 0, 12), (8, 9, 0, 12)]  # chunks of 4 samples, all frames


def test_sample_sharding_over_ranks_and_workers_covers_each_window_once(tiny_sample_store):
    seen = []
    for rank in range(2):
        ds = WindowDataset(tiny_sample_store, "vorticity", T, dims=NS, rank=rank, world_size=2, batch_size=3, seed=7,
                           shuffle_buffer=8)
        got = ids(collect(ds, workers=2, batch=3))
        assert len(got) == len(ds) == 40
        seen += got
    assert sorted(seen) == [(s, t) for s in range(10) for t in range(8)]
    assert seen != sorted(seen)  # shuffled


def test_sample_splits_are_disjoint(tiny_sample_store):
    def make(samples: tuple[int, int]) -> set[tuple[int, int]]:
        return set(ids(WindowDataset(tiny_sample_store, "vorticity", T, sample_range=samples, dims=NS)))

    train, val, test = make((0, 7)), make((7, 9)), make((9, 10))
    assert {s for s, _ in train} == set(range(7)) and {s for s, _ in val} == {7, 8} and {s for s, _ in test} == {9}
    assert not (train & val or train & test or val & test)


def test_sample_resume_with_loader_workers_yields_exactly_the_rest(tiny_sample_store):
    make = lambda: WindowDataset(tiny_sample_store, "vorticity", T, dims=NS, rank=1, world_size=2,  # noqa: E731
                                 batch_size=4, seed=5, shuffle_buffer=8)
    full = ids(collect(make(), workers=2, batch=4))
    loader = iter(DataLoader(make(), batch_size=4, num_workers=2))
    consumed = [x for _ in range(3) for x in next(loader).unbind(0)]
    del loader
    resumed = make()
    resumed.load_state_dict(make().state_dict(position=len(consumed)))
    assert ids(consumed) + ids(collect(resumed, workers=2, batch=4)) == full


@pytest.mark.parametrize("kwargs, match", [
    ({"dims": DimNames(lat="y", lon="x")}, r"has dims \('sample', 'time', 'y', 'x'\); expected \('time', 'y', 'x'\)"),
    ({"sample_range": (8, 11)}, r"need 0 <= start < stop <= 10"),
    ({"sample_range": (3, 3)}, r"need 0 <= start < stop <= 10"),
    ({"window": 13}, "window=13 is longer than the 12 time steps"),
])
def test_bad_sample_arguments(tiny_sample_store, kwargs, match):
    kwargs = {"window": T, "dims": NS, **kwargs}
    with pytest.raises(ValueError, match=match):
        WindowDataset(tiny_sample_store, "vorticity", **kwargs)


def test_time_blocks_are_pieces_of_the_same_windows_and_read_only_their_frames(tiny_store, monkeypatch):
    """Time parallelism: each rank of a time group yields its frames of the same windows, in the same order,
    and reads only those frames (disjoint windows here: 10 windows of 12 frames per rank, from one block)."""
    reads = []
    original = WindowDataset._read

    def counting(self, layers, s_first, s_last, t_first, t_last):
        reads.append((self.frames, t_last - t_first))
        return original(self, layers, s_first, s_last, t_first, t_last)

    monkeypatch.setattr(WindowDataset, "_read", counting)
    whole = list(WindowDataset(tiny_store, "z", 12, stride=12, seed=3, rank=1, world_size=2))
    pieces = [(0, 5), (4, 9), (8, 12)]  # k = 11 split 4 / 4 / 3, each piece with the frame after it
    for frames in pieces:
        got = list(WindowDataset(tiny_store, "z", 12, stride=12, seed=3, rank=1, world_size=2, frames=frames))
        assert len(got) == len(whole) == 10
        for piece, window in zip(got, whole):
            assert torch.equal(piece, window[frames[0]:frames[1]])
    read = {frames: sum(n for f, n in reads if f == frames) for frames in [(0, 12), *pieces]}
    assert read == {(0, 12): 120, **{(a, b): 10 * (b - a) for a, b in pieces}}
    with pytest.raises(ValueError, match=r"frames=\(3, 13\)"):
        WindowDataset(tiny_store, "z", 12, frames=(3, 13))
