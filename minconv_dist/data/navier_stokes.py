"""The paper's Navier–Stokes data set as a zarr store: a resumable writer around `minconv_dist.simulate`."""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr
import zarr
from tqdm.auto import tqdm

from minconv_dist.data.store import COMPLETE_ATTR, cache_dir, checksummed, redact, set_attrs, zarr_store
from minconv_dist.simulate import gaussian_random_field, paper_forcing, solve_vorticity


def _params(**kw: float | int) -> dict:
    return {f"ns_{k}": v for k, v in kw.items()}


def generate_navier_stokes(url: str, *, samples: int, resolution: int = 64, downsample: int = 4,
                           time_units: int = 50, viscosity: float = 1e-3, dt: float = 1e-3,
                           batch_size: int = 16, seed: int = 0, alpha: float = 2.5, tau: float = 7.0,
                           device: str | None = None, storage_options: dict | None = None,
                           overwrite: bool = False, progress: bool = True) -> None:
    """Write `vorticity` with dims (sample, time, y, x) batch by batch; time 0 is the initial field.

    The solver runs at `resolution`; every `downsample`-th point is stored (FNO's subsampling). The
    store's `minconv_complete` attribute stays False and `ns_samples_written` counts finished samples
    until the end, so a killed run is visibly incomplete; calling again with the same arguments resumes
    it (sample `i` depends only on `seed` and its batch, so a resumed store equals an uninterrupted one).
    Chunks carry a CRC32C checksum.
    """
    if samples < 1 or resolution % downsample or batch_size < 1:
        raise ValueError(f"samples={samples}, resolution={resolution}, downsample={downsample}, "
                         f"batch_size={batch_size}: need samples, batch_size >= 1 and downsample dividing resolution")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    params = _params(samples=samples, resolution=resolution, downsample=downsample, time_units=time_units,
                     viscosity=viscosity, dt=dt, batch_size=batch_size, seed=seed, alpha=alpha, tau=tau)
    store = zarr_store(url, storage_options)
    try:
        existing = dict(zarr.open_group(store, mode="r").attrs)
    except FileNotFoundError:
        existing = None
    if existing is not None and not overwrite:
        differing = {k: (existing.get(k), v) for k, v in params.items() if existing.get(k) != v}
        if differing:
            raise ValueError(f"{redact(url)!r} holds another Navier–Stokes run (stored, requested): {differing}; "
                             "pass overwrite=True to replace it")
        if existing.get(COMPLETE_ATTR):
            return
        start = int(existing["ns_samples_written"])
    else:
        n = resolution // downsample
        import dask.array as dsa
        template = xr.Dataset(
            {"vorticity": (("sample", "time", "y", "x"),
                           dsa.zeros((samples, time_units + 1, n, n), chunks=(batch_size, time_units + 1, n, n),
                                     dtype=np.float32))},
            coords={"sample": np.arange(samples), "time": np.arange(time_units + 1, dtype=np.float64),
                    "y": np.arange(n) / n, "x": np.arange(n) / n},
            attrs={**params, COMPLETE_ATTR: False, "ns_samples_written": 0})
        template.to_zarr(store, mode="w", compute=False, consolidated=False, zarr_format=3,
                         encoding=checksummed(template))
        start = 0

    forcing = paper_forcing(resolution).to(dev)
    with tqdm(total=samples, initial=start, desc="navier-stokes samples", disable=not progress) as bar:
        for first in range(start, samples, batch_size):
            count = min(batch_size, samples - first)
            g = torch.Generator().manual_seed(seed * 1_000_003 + first // batch_size)
            w0 = gaussian_random_field(batch_size, resolution, alpha=alpha, tau=tau, generator=g)[:count].to(dev)
            w = torch.cat([w0[:, None], solve_vorticity(w0, forcing, viscosity, float(time_units), dt)], dim=1)
            w = w[..., ::downsample, ::downsample].cpu().numpy()
            xr.Dataset({"vorticity": (("sample", "time", "y", "x"), w)}).to_zarr(
                store, region={"sample": slice(first, first + count)}, consolidated=False)
            set_attrs(url, storage_options, ns_samples_written=first + count)
            bar.update(count)
    set_attrs(url, storage_options, **{COMPLETE_ATTR: True})


def default_navier_stokes_store(samples: int = 32) -> str:
    """Path of a cached store of `samples` trajectories with the paper's defaults (64x64 solved, 16x16 kept,
    50 time units), generated on first use: the Navier–Stokes demo's data. An interrupted generation is
    resumed by the next call (see `generate_navier_stokes`)."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    path = str(cache / f"navier_stokes_{samples}_samples_16x16_v2.zarr")  # v2: checksummed chunks
    generate_navier_stokes(path, samples=samples)
    return path
