"""Streaming `[T, C, H, W]` windows from a zarr store, chunk-aware and sharded over ranks and loader workers.

How an epoch is planned (pure index arithmetic, identical in every process):
1. Window starts are grouped into *blocks*: runs of whole zarr time-chunks, long enough that reading a
   block plus the `T - 1` frames after it costs at most `max_read_amplification` x the block itself.
2. Blocks are permuted with `seed` and the epoch; their windows, concatenated in that order, form the
   epoch's sequence. Rank `r` of `R` takes the `r`-th of `R` equal contiguous slices (the last
   `n mod R` windows are dropped so that every rank runs the same number of steps).
3. A rank's slice is cut into contiguous, near-equal pieces, one per DataLoader worker; each worker
   passes its piece through a shuffle buffer (seeded by seed, epoch, rank, worker).
So each block is read once per epoch (by one worker, in one concurrent zarr read), every window of it
is cut from memory, and randomness comes from the block order plus the buffer.

Time blocks (`frames=(first, stop)`): the dataset yields frames `[first, stop)` of each window, for a rank
that holds one time block of the windows (time parallelism). The plan above is the same for every
`frames` (a time group's ranks get the same windows in the same order), but a block reads only the frames
its windows' pieces cover: the merged runs of `[start + first, start + stop)`, one read per run.

Sample stores (`DimNames(sample=...)`, e.g. Navier–Stokes `(sample, time, y, x)`) hold independent
trajectories: window `i` is start `i mod n` of sample `i // n` (`n` windows per sample), so no window
crosses two trajectories, and a block is (whole sample chunks) x (a run of time chunks). Everything
above then applies unchanged to the window indices.

Forcings (`forcings=[channel names]`, `data/forcings.py`): computed per read run from its frames' valid times
and the coarsened grid, cut into windows the way the data are, and yielded beside them: `(window, forcings)`.

Stateful windows (`stateful=True`, stride = window - 1 = T: window i+1's first frame is window i's last, so its
first input frame follows window i's last input frame): each rank reads `batch_size` = B *streams*, and batch n's
element j continues batch n-1's element j. The N windows of the split, in time order, are cut into R x B
contiguous stretches of L = N // (R B) windows each; stream j of rank r walks stretch r B + j in time order, one
window per batch, never shuffled. The N - L R B spare windows are left out, before the first stretch and after
the last one in proportions drawn per epoch (seeded with seed, epoch; 0 before it without `shuffle`), so the cuts
between windows stay on the same frames and the stretches shift a little from epoch to epoch. With W loader
workers, worker w yields the batches n = w, w + W, ... (each the B streams' n-th windows), so the DataLoader's
round-robin delivers them in step order and the resume below applies unchanged. A single time series only (no
sample dim: a stretch would cross trajectories) and no NaN skipping (it would break the streams' alignment).

Resume: `position` counts the windows the rank has consumed this epoch. A DataLoader with `W` workers
and `batch_size` `B` takes whole batches round-robin from the workers (in order); from `position`,
`W` and `B`, each worker works out how many of its own windows were consumed and skips them, and
the workers' roles are rotated so that the resumed loader continues the same round-robin: the
windows after a resume come in exactly the order the uninterrupted epoch would have given them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice

import numpy as np
import torch
import xarray as xr

from minconv_dist.data.channels import ChannelSpec, channel_layers, parse_channels
from minconv_dist.data.checks import Frames, Range, check_frames, frame_sums
from minconv_dist.data.chunks import Source, read
from minconv_dist.data.forcings import check_times, compute_forcings
from minconv_dist.data.selection import coarsen as coarsen_grid
from minconv_dist.data.selection import coarse_grid, sample_slice, time_slice
from minconv_dist.data.store import DimNames, open_store, redact

NAN_POLICIES = ("raise", "fill", "skip")
BlockRead = tuple[int, int, list[tuple[int, int]]]  # samples [first, last) and runs of frames [start, stop)
Window = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # [T, C, H, W], or that and its forcings [T, F, H, W]
Block = tuple[list[Window], list[bool] | None]  # its windows and which hold NaN (None: none does)


def buffer_shuffle(seq: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order a streaming shuffle buffer of `size` items would emit `seq` in."""
    if size <= 1 or seq.size <= 1:
        return seq.copy()
    size = min(size, seq.size)
    buf, out = seq[:size].tolist(), []  # Python lists: 3x faster than indexing numpy item by item
    picks = rng.integers(0, size, seq.size - size).tolist()
    for j, incoming in zip(picks, seq[size:].tolist()):
        out.append(buf[j])
        buf[j] = incoming
    return np.concatenate([np.array(out, dtype=seq.dtype), rng.permutation(np.array(buf, dtype=seq.dtype))])


def consumed_per_worker(lengths: list[int], position: int, batch_size: int) -> tuple[list[int], int]:
    """Windows each worker had yielded when the DataLoader had delivered `position` windows, and the
    worker whose batch would have come next.

    The DataLoader asks workers for batches round-robin, skips exhausted workers and delivers in order;
    a worker's last batch may be short.
    """
    done = [0] * len(lengths)
    delivered, last, active = 0, -1, [w for w, n in enumerate(lengths) if n > 0]
    while delivered < position and active:
        for w in list(active):
            if delivered >= position:
                break
            take = min(batch_size, lengths[w] - done[w])
            done[w] += take
            delivered += take
            last = w
            if done[w] == lengths[w]:
                active.remove(w)
    if delivered != position:
        raise ValueError(f"resume position {position} is not a batch boundary for {len(lengths)} loader "
                         f"workers with batch_size={batch_size} (or is past the epoch's {sum(lengths)} windows)")
    return done, (last + 1) % len(lengths)


def frame_runs(firsts: np.ndarray, length: int) -> list[tuple[int, int]]:
    """The frames `[f, f + length)` of every `f` in `firsts`, merged into `[start, stop)` runs in time order."""
    firsts = np.unique(firsts)
    groups = np.split(firsts, np.flatnonzero(np.diff(firsts) > length) + 1)
    return [(int(g[0]), int(g[-1]) + length) for g in groups]


def windows_with_nan(x: torch.Tensor, length: int) -> np.ndarray:
    """Whether each window of `length` frames of `x: [S, T, ...]` holds NaN, in (sample, first frame) order:
    from a running count of the frames that hold NaN, so one pass over `x` serves every window."""
    counts = np.pad(np.cumsum(torch.isnan(x).flatten(2).any(-1).numpy(), axis=1), ((0, 0), (1, 0)))
    return (counts[:, length:] > counts[:, :-length]).ravel()


class WindowDataset(torch.utils.data.IterableDataset):
    """Raw float32 windows `[T, C, H, W]` (physical units: normalising is the model's first step) streamed
    from a zarr store.

    `len(ds)` is the number of windows this rank yields per epoch. Use one DataLoader per rank, pass its
    `batch_size` here when resuming with loader workers, call `set_epoch` before each epoch and don't
    use `persistent_workers` (the workers' copies would not see the new epoch). Windows are views of
    the block they were cut from (no copy per window; DataLoader's collate copies them into the batch):
    treat them as read-only, `clone()` before modifying one in place. `frames=(first, stop)`: yield (and
    read) only those frames of each window, `[stop - first, C, H, W]`. `prefetch` blocks past the current
    one are read ahead, concurrently, in threads.

    nan_policy: "raise" (default), "skip" the windows holding NaN, or "fill" them with `fill_values`
    (one per channel, e.g. the training means). Infinite values always raise, and so do values outside
    `bounds` (per channel `(low, high)` or None; see `checks.py`) when given. Every such error, and a chunk
    that does not decode, is a `DataError` naming the channel, the time and the store; so is a chunk missing
    from the store (`chunks.check_present`), unless it reads as NaN and the policy is "fill" or "skip".

    forcings: channel names of `data/forcings.py` (e.g. `["toa_insolation"]`); with any, each item is a pair
    `(window, forcings [T, F, H, W] of its frames' valid times on the coarsened grid)`, both float32.

    reader: how blocks are fetched and decoded, one of `store.READERS` (default "auto": with the fast-io extra, zarrs
    for local stores and obstore for s3://; `store.resolve_reader`). Loader workers forked after either started
    read with zarr-python: their threads do not survive a fork.

    stateful: `batch_size` streams per rank, each a stretch of the series in time order at stride `window - 1`
    (module docstring); `streams(epoch)` gives the plan, batch n's element j continuing batch n-1's.
    """

    def __init__(self, url: str, channels: str | list, window: int, *, stride: int = 1,
                 time_range: tuple | None = None, sample_range: tuple[int, int] | None = None, coarsen: int = 1,
                 dims: DimNames = DimNames(), storage_options: dict | None = None, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, nan_policy: str = "raise",
                 fill_values: Sequence[float] | None = None, shuffle_buffer: int = 1024, batch_size: int = 1,
                 max_read_amplification: float = 1.05, prefetch: int = 2,
                 bounds: Sequence[Range | None] | None = None, frames: tuple[int, int] | None = None,
                 forcings: Sequence[str] = (), reader: str = "auto", stateful: bool = False) -> None:
        super().__init__()
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy={nan_policy!r}: expected one of {NAN_POLICIES}")
        if window < 1 or stride < 1 or batch_size < 1:
            raise ValueError(f"window={window}, stride={stride}, batch_size={batch_size}: all must be >= 1")
        if max_read_amplification <= 1:
            raise ValueError(f"max_read_amplification={max_read_amplification}: must be > 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} outside world_size={world_size}")
        if stateful and (stride != window - 1 or dims.sample or nan_policy == "skip"):
            raise ValueError(f"stateful windows walk one time series in steps of window - 1 = {window - 1} frames: "
                             f"got stride={stride}, dims.sample={dims.sample!r}, nan_policy={nan_policy!r} (need "
                             f"stride={window - 1}, no sample dim, nan_policy 'raise' or 'fill')")
        self.frames = (0, window) if frames is None else (int(frames[0]), int(frames[1]))
        if not 0 <= self.frames[0] < self.frames[1] <= window:
            raise ValueError(f"frames={frames}: expected [first, stop) with 0 <= first < stop <= window={window}")
        self.url, self.storage_options, self.dims, self.reader = url, storage_options, dims, reader
        self.specs: list[ChannelSpec] = parse_channels(channels)
        self.channels = [str(s) for s in self.specs]
        if (nan_policy == "fill") != (fill_values is not None) or (
                fill_values is not None and len(fill_values) != len(self.channels)):
            raise ValueError(f"nan_policy='fill' takes fill_values, one per channel {self.channels} (and only "
                             f"then); got nan_policy={nan_policy!r}, fill_values={fill_values}")
        self.fill_values = None if fill_values is None else np.asarray(fill_values, np.float32)
        self.window, self.stride, self.coarsen = window, stride, coarsen
        self.shuffle, self.seed, self.nan_policy = shuffle, seed, nan_policy
        self.shuffle_buffer, self.batch_size, self.prefetch = shuffle_buffer, batch_size, prefetch
        self.rank, self.world_size, self.bounds, self.stateful = rank, world_size, bounds, stateful
        self._sources = [Source(url, spec, dims, storage_options, allow_nan=nan_policy != "raise")
                         for spec in self.specs]
        self._opened: tuple[int, list[xr.DataArray]] | None = None  # (process id, `_layers`)

        layers = self._layers()
        first = layers[0]
        all_times = first[dims.time].values
        period = time_slice(first, time_range, url, dims.time)
        self._t0, self._t1 = period.start, period.stop
        n_times = self._t1 - self._t0
        where = f"{redact(url)!r} between {list(time_range)}" if time_range else repr(redact(url))
        if window > n_times:
            raise ValueError(f"window={window} is longer than the {n_times} time steps of {where}")
        samples = sample_slice(first.sizes[dims.sample] if dims.sample else 1, sample_range, url, dims.sample)
        self._s0, self._s1 = samples.start, samples.stop
        self.windows_per_sample = (n_times - window) // stride + 1
        self.n_windows = int(self.windows_per_sample * (self._s1 - self._s0))  # a Python int: it reaches JSON
        if sample_range is not None:
            where += f" samples {self._s0}:{self._s1}"
        streams = world_size * batch_size if stateful else world_size
        if self.n_windows < streams:
            raise ValueError(f"{self.n_windows} windows in {where} cannot be shared by {streams} "
                             f"{'streams (ranks x batch_size)' if stateful else 'ranks'}")
        samples, starts = self._locate(np.arange(self.n_windows))
        self.times = all_times[starts]
        self.samples = first[dims.sample].values[samples] if dims.sample else None
        self.grid = coarse_grid(first.sizes[dims.lat], first.sizes[dims.lon], coarsen, url)
        self.latitudes, self.longitudes = (first[d].coarsen({d: coarsen}).mean().values if d in first.coords else
                                           np.arange(first.sizes[d] // coarsen, dtype=np.float64)
                                           for d in (dims.lat, dims.lon))
        self.forcings = list(forcings)
        self._valid_times = check_times(all_times, repr(redact(url))) if self.forcings else None

        chunk = self._chunk(layers, dims.time)
        extra = math.ceil((window - 1) / chunk) if window > 1 else 0
        self.block = chunk * max(1, math.ceil(extra / (max_read_amplification - 1)))
        self._time_blocks = all_times.size // self.block + 1
        self._sample_chunk = self._chunk(layers, dims.sample)
        self.epoch, self.position = 0, 0

    # ---- planning (no data read) ----
    def __len__(self) -> int:
        if self.stateful:
            return self.n_windows // (self.world_size * self.batch_size) * self.batch_size
        return self.n_windows // self.world_size

    def _layers(self) -> list[xr.DataArray]:
        """Per-channel lazy arrays without dask: one time slice becomes one concurrent zarr read. Opened once
        per process (opening took ~9 ms per local epoch, a round trip per remote one); a forked or unpickled copy
        opens its own, as a remote store's connections survive neither."""
        if self._opened is None or self._opened[0] != os.getpid():
            store = open_store(self.url, self.storage_options, dask=False, reader=self.reader)
            self._opened = (os.getpid(), channel_layers(store, self.specs, self.dims))
        return self._opened[1]

    def __getstate__(self) -> dict:
        """Pickled (to spawned loader workers) without the opened store, which the copy opens for itself."""
        return {**self.__dict__, "_opened": None}

    @staticmethod
    def _chunk(layers: list[xr.DataArray], dim: str | None) -> int:
        """The largest chunk size of any channel along `dim` (1 if unchunked or absent)."""
        return max(int(layer.encoding.get("preferred_chunks", {}).get(dim, 1)) for layer in layers)

    def _locate(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store indices `(sample, first frame)` of windows `idx`; the sample is 0 without a sample dim."""
        return self._s0 + idx // self.windows_per_sample, self._t0 + self.stride * (idx % self.windows_per_sample)

    def _block_of(self, samples: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Block id of each window: its sample chunk x its run of time chunks, so blocks align with chunks."""
        return samples // self._sample_chunk * self._time_blocks + starts // self.block

    def streams(self, epoch: int) -> np.ndarray:
        """Stateful windows: indices (into `self.times`) of this rank's windows `[L, B]`, row n the batch of step n,
        column j stream j (one contiguous stretch in time order)."""
        per_stream = len(self) // self.batch_size
        spare = self.n_windows - per_stream * self.world_size * self.batch_size
        before = int(np.random.default_rng([self.seed, epoch]).integers(spare + 1)) if self.shuffle else 0
        firsts = before + (self.rank * self.batch_size + np.arange(self.batch_size)) * per_stream
        return firsts[None, :] + np.arange(per_stream)[:, None]

    def _rank_windows(self, epoch: int) -> np.ndarray:
        """Indices (into `self.times`) of this rank's windows, in block order (stateful: in step order)."""
        if self.stateful:
            return self.streams(epoch).ravel()
        block_of = self._block_of(*self._locate(np.arange(self.n_windows)))
        blocks = np.unique(block_of)
        if self.shuffle:
            blocks = np.random.default_rng([self.seed, epoch]).permutation(blocks)
        # a stable sort by block rank groups each block's windows, keeping their (sample, time) order
        rank_of_block = np.empty(blocks.max() + 1, dtype=np.int64)
        rank_of_block[blocks] = np.arange(blocks.size)
        order = np.argsort(rank_of_block[block_of], kind="stable")
        per = len(self)
        return order[self.rank * per:(self.rank + 1) * per]

    def worker_plan(self, epoch: int, worker: int, num_workers: int) -> np.ndarray:
        """Window indices worker `worker` of `num_workers` yields this epoch, in order, before resume."""
        if self.stateful:  # whole batches, every num_workers-th: the round-robin delivers them in step order
            return self.streams(epoch)[worker::num_workers].ravel()
        piece = np.array_split(self._rank_windows(epoch), num_workers)[worker]
        if not self.shuffle:
            return piece
        return buffer_shuffle(piece, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, self.rank, worker]))

    # ---- epoch and resume ----
    def set_epoch(self, epoch: int) -> None:
        """Start `epoch`; the resume position is kept only when it is the epoch already set."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self, position: int | None = None) -> dict:
        """`{"epoch", "position", ...}`. Without loader workers this object counts `position` itself; with
        workers it cannot see what they yielded: pass the windows the loop consumed (sum of batch sizes)."""
        return {"epoch": self.epoch, "position": self.position if position is None else position,
                "seed": self.seed, "windows_per_epoch": len(self), "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        expected = {"seed": self.seed, "windows_per_epoch": len(self), "world_size": self.world_size}
        wrong = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if wrong:
            raise ValueError(f"data state does not match this dataset (saved, current): {wrong}")
        if not 0 <= state["position"] <= len(self):
            raise ValueError(f"resume position {state['position']} outside [0, {len(self)}]")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    # ---- reading ----
    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        plans = [self.worker_plan(self.epoch, w, num_workers) for w in range(num_workers)]
        done, next_role = consumed_per_worker([p.size for p in plans], self.position, self.batch_size)
        # the resumed DataLoader starts its round-robin at worker 0: give it the role whose batch was next
        role = (next_role + worker) % num_workers
        plan, skip = plans[role], done[role]
        if self.nan_policy != "skip":  # with "skip", consumed counts yielded windows: re-walk them below
            plan, skip = plan[skip:], 0
        in_process = info is None
        if not plan.size:
            return
        blocks, reads, block_of, index = self._plan_blocks(plan)
        rank_of = {b: j for j, b in enumerate(blocks)}
        last_use = {b: i for i, b in enumerate(block_of)}
        layers = self._layers()
        pool = ThreadPoolExecutor(max_workers=max(1, self.prefetch))
        pending: dict[int, Future] = {}
        loaded: dict[int, Block] = {}
        next_block = 0
        try:
            for i, (b, k) in enumerate(zip(block_of, index)):
                if b not in loaded:  # its first window: the reads ahead move on by one block
                    while next_block < min(len(blocks), rank_of[b] + 1 + self.prefetch):
                        nb = blocks[next_block]
                        pending[nb] = pool.submit(self._read_block, layers, *reads[nb])
                        next_block += 1
                    loaded[b] = pending.pop(b).result()
                windows, nan = loaded[b]
                if i == last_use[b]:
                    del loaded[b]
                if nan is not None and nan[k]:
                    continue
                if skip:
                    skip -= 1
                    continue
                if in_process:
                    self.position += 1
                yield windows[k]
            if in_process:
                self.position = 0  # a finished epoch leaves nothing to resume
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _plan_blocks(self, plan: np.ndarray) -> tuple[list[int], dict[int, BlockRead], list[int], list[int]]:
        """For windows `plan`: their blocks in order of first use, each block's read (samples and runs of
        frames), and per window its block and its index among its block's windows (`_read_block`'s order),
        all planned before any read so that the yield loop does no arithmetic of its own."""
        samples, starts = self._locate(plan)
        block_of = self._block_of(samples, starts)
        blocks, first_use = np.unique(block_of, return_index=True)
        blocks = blocks[np.argsort(first_use)].tolist()
        first, stop = self.frames
        length = stop - first
        reads, index = {}, np.empty_like(plan)
        for b in blocks:
            mine = np.flatnonzero(block_of == b)
            s_first, s_last, firsts = int(samples[mine].min()), int(samples[mine].max()) + 1, starts[mine] + first
            runs = frame_runs(firsts, length)
            run_starts = np.array([t0 for t0, _ in runs])
            per_sample = np.array([t1 - t0 - length + 1 for t0, t1 in runs])  # windows of a run, per sample
            run_base = np.concatenate([[0], np.cumsum(per_sample * (s_last - s_first))[:-1]])
            r = np.searchsorted(run_starts, firsts, side="right") - 1
            reads[b] = (s_first, s_last, runs)
            index[mine] = run_base[r] + (samples[mine] - s_first) * per_sample[r] + firsts - run_starts[r]
        return blocks, reads, block_of.tolist(), index.tolist()

    def _read_block(self, layers: list[xr.DataArray], s_first: int, s_last: int, runs: list[tuple[int, int]]
                    ) -> Block:
        """Every window of runs `[t_first, t_last)` of samples `[s_first, s_last)` (`_read`) as a view of its
        run, in (run, sample, first frame) order, cut here in one call per run and sample (indexing the run
        per window in the yield loop cost ~3 us a window, most of that loop); and, with `nan_policy="skip"`,
        which windows hold NaN (one pass over the block, not one per window), None when none does."""
        length = self.frames[1] - self.frames[0]
        windows: list[torch.Tensor] = []
        nan: list[np.ndarray] = []
        for t_first, t_last in runs:
            x = self._read(layers, s_first, s_last, t_first, t_last)
            cut = [series.unbind(0) for series in x.unfold(1, length, 1).movedim(-1, 2)]  # per sample [length, C, H, W]
            if self.forcings:  # the same for every sample: one array per run, its windows views of it
                f = torch.from_numpy(compute_forcings(self.forcings, self._valid_times[t_first:t_last],
                                                      self.latitudes, self.longitudes))
                f_cut = f.unfold(0, length, 1).movedim(-1, 1).unbind(0)
                cut = [list(zip(series, f_cut)) for series in cut]
            for series in cut:
                windows += series
            if self.nan_policy == "skip":
                nan.append(windows_with_nan(x, length))
        flags = np.concatenate(nan) if nan else np.zeros(0, bool)
        return windows, flags.tolist() if flags.any() else None

    def _read(self, layers: list[xr.DataArray], s_first: int, s_last: int, t_first: int,
              t_last: int) -> torch.Tensor:
        """Samples `[s_first, s_last)` x frames `[t_first, t_last)` of every channel as `[S, T, C, H, W]`
        (S = 1 without a sample dim), coarsened and checked."""
        where = {self.dims.time: slice(t_first, t_last)}
        if self.dims.sample:
            where[self.dims.sample] = slice(s_first, s_last)
        arrays = []
        for layer, source in zip(layers, self._sources):
            part = coarsen_grid(read(layer, where, source), self.coarsen, self.dims.lat, self.dims.lon, self.url)
            a = np.asarray(part.values, dtype=np.float32)
            arrays.append(a if self.dims.sample else a[None])
        # one channel: a view, not a copy (copying into fresh memory took ~18% of the reads' time)
        x = arrays[0][:, :, None] if len(arrays) == 1 else np.stack(arrays, axis=2)
        finite = np.isfinite(x).all()
        if self.bounds is not None or not finite:
            self._check(x, layers[0], where)
        if not finite and self.nan_policy == "fill":
            x = np.where(np.isnan(x), self.fill_values[:, None, None], x)
        return torch.from_numpy(x)

    def _check(self, x: np.ndarray, layer: xr.DataArray, where: dict[str, slice]) -> None:
        """`checks.check_frames` on a block (a missing chunk was named by the read, `chunks.check_present`)."""
        times = layer[self.dims.time].values[where[self.dims.time]]
        samples = layer[self.dims.sample].values[where[self.dims.sample]] if self.dims.sample else None
        bounds = self.bounds or [None] * len(self.specs)
        check_frames(Frames.of_sums(frame_sums(x), times, samples), self.specs, bounds, self.url,
                     allow_nan=self.nan_policy != "raise")

    def check_first(self, n: int, bounds: Sequence[Range | None]) -> None:
        """Read the first `n` windows this rank trains on (their block only, no prefetch) checked against
        `bounds`: the driver's look at the data before any worker starts."""
        saved = self.bounds, self.prefetch, self.epoch, self.position
        self.bounds, self.prefetch = bounds, 0
        self.set_epoch(0)
        windows = iter(self)
        try:
            for _ in islice(windows, n):
                pass
        finally:
            windows.close()
            self.bounds, self.prefetch, self.epoch, self.position = saved
