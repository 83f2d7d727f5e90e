"""Ensemble forecasts: `write_forecast`'s store with a `realization` dim (WeatherBench2's name for the members),
from initial-condition perturbations, several models, or both.

- Models: K models on the same channels and grid give N / K members each, model j the members
  j N/K .. (j + 1) N/K - 1.
- Perturbations: Gaussian noise of std S in normalised units (S times each channel's standard deviation in
  the model's normaliser). With `context` it is added to every context frame, so each member warms up on its
  own frames; with `warmup` (Min cells) it is added to every layer's hidden state just before the init-time
  frame is read: the warm-up pass over the record is shared by all members, and each member reads the
  init frame from its own perturbed state (so its first lead is perturbed too).
- Reproducible: the noise of member k at init time t is drawn by numpy's default generator seeded with
  `SeedSequence([seed, k, t])` (t in ns since 1970, as uint64), context frames in order, or the layers in
  order, so member k is the same whatever the batch size, device, other members or init times.
- Memory: a rollout runs at most `batch_size` (init time, member) pairs: `batch_size // M` init times with
  all M members of a model, or one init time and a divisor of M members when `batch_size < M`.
- As `write_forecast`: each member reads the store up to its init time only, a model with forcings gets them
  computed for the valid times of its frames (the context's, the warm-up pass's, the closed loop's) and its
  static fields are in its weights; init times whose inputs hold NaN are refused unless `allow_nan`.
"""
from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import xarray as xr

from minconv_dist.data.store import COMPLETE_ATTR, set_attrs, zarr_store
from minconv_dist.evaluate.forecast import (_forcings, _frames, check_inputs, forecast_template, time_step,
                                           warmup_start)
from minconv_dist.evaluate.layout import LAT, LEAD, LON, REALIZATION, TIME, to_weatherbench2, with_cf_attrs
from minconv_dist.evaluate.nan_inputs import check_nan_inits
from minconv_dist.evaluate.outputs import staged

Block = tuple[slice, slice]  # (init times, members of one model)
UNITS = {"none": "", "context frames": "normalised: the noise is S x each channel's std in the model's normaliser",
         "warm state": "the network's hidden-state units (it reads normalised inputs)"}


def check_ensemble(models: Sequence[torch.nn.Module], members: int, perturbation_std: float,
                   uris: Sequence[str] | None = None) -> int:
    """Members per model; raises ValueError (naming the flag) unless the models agree on channels and grid,
    N is a positive multiple of their number, and the members of one model differ (S > 0 when it has several)."""
    names = list(uris or (f"model {j}" for j in range(len(models))))
    for name, model in zip(names[1:], models[1:]):
        for what, ours, theirs in (("channels", model.normalizer.channels, models[0].normalizer.channels),
                                   ("grid", model.grid, models[0].grid)):
            if ours != theirs:
                raise ValueError(f"--model {name} has {what} {ours}, --model {names[0]} has {theirs}: the members "
                                 "of one ensemble share channels and grid")
    if members < 1:
        raise ValueError(f"--members {members}: an ensemble needs at least 1 member")
    if members % len(models):
        raise ValueError(f"--members {members} with {len(models)} --model URIs: every model gives the same number "
                         f"of members, so --members must be a multiple of {len(models)}")
    if perturbation_std < 0 or not np.isfinite(perturbation_std):
        raise ValueError(f"--perturbation-std {perturbation_std}: expected a finite value >= 0")
    per_model = members // len(models)
    if per_model > 1 and perturbation_std == 0:
        raise ValueError(f"--members {members} from {len(models)} model(s) with --perturbation-std 0 gives "
                         f"{per_model} identical members per model; set --perturbation-std > 0")
    return per_model


def member_noise(seed: int, member: int, init_time: np.datetime64, shapes: Sequence[tuple[int, ...]]
                 ) -> list[np.ndarray]:
    """Standard normal float32 arrays of `shapes`, drawn in order for (seed, member, init time) alone."""
    t = int(np.datetime64(init_time, "ns").astype(np.int64)) % 2**64
    rng = np.random.default_rng(np.random.SeedSequence([seed, member, t]))
    return [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]


def blocks(n_init: int, per_model: int, batch_size: int) -> Iterator[Block]:
    """(init times, members) rectangles of at most `batch_size` pairs, init-major."""
    if batch_size >= per_model:
        per_batch = batch_size // per_model
        for i in range(0, n_init, per_batch):
            yield slice(i, min(i + per_batch, n_init)), slice(0, per_model)
        return
    width = max(d for d in range(1, batch_size + 1) if per_model % d == 0)  # blocks line up with zarr chunks
    for i in range(n_init):
        for k in range(0, per_model, width):
            yield slice(i, i + 1), slice(k, k + width)


def _states_before(model: torch.nn.Module, data: xr.DataArray, idx: np.ndarray, *, start: int, chunk: int,
                   device: str | torch.device) -> Iterator[list | None]:
    """Per init time, in order: the state after frame idx - 1 of one pass over the frames from `start`, read
    `chunk` frames at a time with the state carried (None when the init frame is the pass's first: the cells'
    default state). A model's forcings are those of the frames' valid times."""
    ends, times = idx - 1, data["time"].values
    if ends[0] < start:
        yield None
    state = None
    for c0 in range(start, int(ends[-1]) + 1, chunk):
        c1 = min(c0 + chunk, int(ends[-1]) + 1)
        inside = ends[(ends >= c0) & (ends < c1)] - c0
        with torch.no_grad():
            warm, state = model.warm_states(_frames(data, np.arange(c0, c1)[None], device), inside, state,
                                            forcings=_forcings(model, data, times[None, c0:c1], device))
        yield from (s for s, _ in warm)


def _perturbed(model: torch.nn.Module, frames: torch.Tensor, state: list | None, inits: np.ndarray,
               members: range, std: float, seed: int, target: str) -> tuple[torch.Tensor, list | None]:
    """frames [b, t, C, H, W] and state (per layer [b, ...]) of b init times -> b x len(members) copies, member
    fastest, each with its own noise on `target` ("frames" or "state")."""
    m = len(members)
    frames = frames.repeat_interleave(m, dim=0)
    state = None if state is None else [s.repeat_interleave(m, dim=0) for s in state]
    if std == 0:
        return frames, state
    tensors = [frames] if target == "frames" else state
    scale = [model.normalizer.std.to(frames.device, frames.dtype).view(-1, 1, 1) * std] if target == "frames" \
        else [std] * len(tensors)
    shapes = [tuple(x.shape[1:]) for x in tensors]
    noise = [member_noise(seed, k, t, shapes) for t in inits for k in members]  # a row per (init, member)
    for i, (x, s) in enumerate(zip(tensors, scale)):  # one copy to the device per tensor, not per row
        x += s * torch.from_numpy(np.stack([row[i] for row in noise])).to(x.device, x.dtype)
    return frames, state


def member_forecasts(model: torch.nn.Module, data: xr.DataArray, idx: np.ndarray, *, steps: int, per_model: int,
                     first_member: int = 0, perturbation_std: float = 0.0, seed: int = 0, context: int = 20,
                     warmup_from: int | None = None, warmup_chunk: int = 256, batch_size: int = 8,
                     device: str | torch.device = "cpu") -> Iterator[tuple[Block, torch.Tensor]]:
    """((init positions, member positions within the model), forecasts [b, m, steps, C, H, W]) per rollout.

    One model's members `first_member ..`: each init warms up on its `context` frames, or (`warmup_from`: the
    first frame of one pass over the record, Min cells) from the pass's state before its init frame. A model
    with forcings reads those of each frame's valid time, the closed loop's future ones computed (the same for
    every member of an init time).
    """
    times, step = data["time"].values, time_step(data["time"].values)
    states = None if warmup_from is None else _states_before(model, data, idx, start=warmup_from,
                                                            chunk=warmup_chunk, device=device)
    held: tuple[slice, Any] = (slice(0, 0), None)  # the states of the init times of the block being run
    window = np.arange(-context + 1, 1) if warmup_from is None else np.zeros(1, dtype=int)
    for inits, members in blocks(idx.size, per_model, batch_size):
        frames = _frames(data, idx[inits, None] + window, device)
        if states is not None and held[0] != inits:
            taken = [next(states) for _ in range(inits.stop - inits.start)]
            held = (inits, [torch.cat([cell.initial_state(frames[j:j + 1, 0]) if s is None else s[layer]
                                       for j, s in enumerate(taken)])
                            for layer, cell in enumerate(model.cells)])
        frames, state = _perturbed(model, frames, None if states is None else held[1], times[idx[inits]],
                                   range(first_member + members.start, first_member + members.stop),
                                   perturbation_std, seed, "frames" if states is None else "state")
        valid = times[idx[inits], None] + step * np.arange(window[0], steps)  # the frames read, then the loop's
        forcings = _forcings(model, data, valid, device)
        if forcings is not None:
            forcings = forcings.repeat_interleave(members.stop - members.start, dim=0)  # member fastest, as frames
        with torch.no_grad():
            y, _ = model.rollout(frames, steps, state, forcings=forcings)
        yield (inits, members), y.view(inits.stop - inits.start, members.stop - members.start, *y.shape[1:])


def _write_block(store: Any, y: torch.Tensor, channels: list[str], inits: slice, members: slice) -> None:
    """Forecasts [b, m, steps, C, H, W] into the store's rows `inits` x `members`."""
    y = y.float().cpu().numpy()
    dims = (TIME, REALIZATION, LEAD, LAT, LON)
    part = to_weatherbench2(xr.Dataset({c: (dims, y[:, :, :, k]) for k, c in enumerate(channels)}))
    part.drop_vars(list(part.coords)).to_zarr(store, region={TIME: inits, REALIZATION: members}, consolidated=False)


def write_ensemble_forecast(
    models: Sequence[torch.nn.Module],
    data: xr.DataArray,
    init_time: np.ndarray,
    *,
    members: int,
    perturbation_std: float = 0.0,
    seed: int = 0,
    context: int = 20,
    steps: int,
    out: str,
    warmup: int | str | None = None,
    warmup_chunk: int = 256,
    batch_size: int = 8,
    attrs: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    storage_options: dict | None = None,
    allow_nan: bool = False,
    uris: Sequence[str] | None = None,
) -> str:
    """`members` forecasts per init time from `models` (see the module's docstring), written all or nothing
    to `out` as `write_forecast` writes one, with dims (time, realization, prediction_timedelta, [level,]
    latitude, longitude). `uris` name the models in errors. Root attrs record the members, models,
    perturbation and seed. NaN inputs are refused, or with `allow_nan` written and listed, as `write_forecast`
    does."""
    per_model = check_ensemble(models, members, perturbation_std, uris)
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: expected >= 1 (init time, member) pairs")
    init_time = np.asarray(init_time, dtype="datetime64[ns]")
    for model in models:
        idx = check_inputs(model, data, init_time, context if warmup is None else 1, steps)
    start = None if warmup is None else min(warmup_start(model, idx, warmup) for model in models)
    nan_attrs = check_nan_inits(data, idx, context, start, allow_nan)
    channels = [str(c) for c in data["channel"].values]
    lead = time_step(data["time"].values) * np.arange(1, steps + 1)
    first, width = next(blocks(init_time.size, per_model, batch_size))
    template = forecast_template(channels, init_time, lead, data["lat"].values, data["lon"].values,
                                 first.stop - first.start)
    template = with_cf_attrs(template.expand_dims({REALIZATION: np.arange(members)}, axis=1))
    template = template.chunk({REALIZATION: width.stop - width.start})
    perturbed = "none" if perturbation_std == 0 else "context frames" if warmup is None else "warm state"
    template.attrs = {k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v) for k, v in {
        **(attrs or {}), "channels": channels, "members": members, "members_per_model": per_model,
        "perturbation": perturbed, "perturbation_std": float(perturbation_std), "seed": int(seed),
        "perturbation_units": UNITS[perturbed],
        "member_noise": "numpy default_rng(SeedSequence([seed, member, init time in ns as uint64])).standard_normal"
                        ", per context frame or per layer in order (minconv_dist.evaluate.ensemble)",
        COMPLETE_ATTR: False}.items()}
    template.attrs.update(nan_attrs)
    with staged(out, storage_options, overwrite) as target:
        store = zarr_store(target, storage_options)
        template.to_zarr(store, mode="w", compute=False, consolidated=False, zarr_format=2)
        for j, model in enumerate(models):
            model = model.to(device).eval()
            for (inits, member_rows), y in member_forecasts(
                    model, data, idx, steps=steps, per_model=per_model, first_member=j * per_model,
                    perturbation_std=perturbation_std, seed=seed, context=context, warmup_from=start,
                    warmup_chunk=warmup_chunk, batch_size=batch_size, device=device):
                offset = j * per_model
                _write_block(store, y, channels, inits,
                             slice(offset + member_rows.start, offset + member_rows.stop))
        set_attrs(target, storage_options, **{COMPLETE_ATTR: True})  # last: marks it whole, consolidates
    return out
