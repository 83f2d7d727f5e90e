"""2D Navier–Stokes vorticity on the unit torus (the FNO / paper set-up) and a resumable zarr writer.

Pseudo-spectral solver: Crank–Nicolson for viscosity, explicit Euler for the 2/3-dealiased advection
term, forcing 0.1 (sin 2π(x+y) + cos 2π(x+y)); initial vorticity from a Gaussian random field
(alpha 2.5, tau 7). Batched over samples with torch.fft, on whatever device the tensors are.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import xarray as xr
import zarr
from tqdm.auto import tqdm

from minconv_dist.data.store import COMPLETE_ATTR, cache_dir, redact, set_attrs, zarr_store


def _wavenumbers(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(k_x, k_y)` on the rfft2 grid `[n, n // 2 + 1]`; x is the first axis."""
    k = torch.fft.fftfreq(n, 1.0 / n, device=device)
    kr = torch.fft.rfftfreq(n, 1.0 / n, device=device)
    return k[:, None].expand(n, kr.numel()), kr[None, :].expand(n, kr.numel())


def gaussian_random_field(samples: int, n: int, *, alpha: float = 2.5, tau: float = 7.0,
                          generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Initial vorticity `[samples, n, n]`, covariance `(-Δ + tau²)^(-alpha)` scaled as in FNO."""
    k = torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    sigma = tau ** (0.5 * (2 * alpha - 2))
    sqrt_eig = n**2 * math.sqrt(2.0) * sigma * (4 * math.pi**2 * k2 + tau**2) ** (-alpha / 2)
    sqrt_eig[0, 0] = 0.0  # zero-mean vorticity, as on a torus it must be
    coeff = torch.randn(samples, n, n, dtype=torch.complex128, generator=generator)
    return torch.fft.ifft2(sqrt_eig * coeff).real.to(dtype)


def paper_forcing(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`0.1 (sin 2π(x+y) + cos 2π(x+y))` on the `[n, n]` grid, x along the first axis."""
    x = torch.arange(n, dtype=torch.float64) / n
    s = 2 * math.pi * (x[:, None] + x[None, :])
    return (0.1 * (torch.sin(s) + torch.cos(s))).to(dtype)


def solve_vorticity(w0: torch.Tensor, forcing: torch.Tensor | None, viscosity: float, t_final: float,
                    dt: float = 1e-3, record_every: float = 1.0) -> torch.Tensor:
    """Integrate `w0: [B, N, N]` to `t_final`; returns `[B, R, N, N]` recorded every `record_every` time units."""
    n = w0.shape[-1]
    steps, per_record = round(t_final / dt), round(record_every / dt)
    if steps % per_record or not math.isclose(steps * dt, t_final) or not math.isclose(per_record * dt, record_every):
        raise ValueError(f"t_final={t_final} and record_every={record_every} must be multiples of dt={dt}, "
                         f"and t_final a multiple of record_every")
    kx, ky = _wavenumbers(n, w0.device)
    lap = 4 * math.pi**2 * (kx**2 + ky**2)
    lap_inv = torch.where(lap == 0, 0.0, 1.0 / lap.clamp(min=1e-12))
    k_max = n // 2
    dealias = ((kx.abs() <= 2 / 3 * k_max) & (ky.abs() <= 2 / 3 * k_max)).to(w0.dtype)
    w_h = torch.fft.rfft2(w0)
    f_h = torch.zeros_like(w_h[0]) if forcing is None else torch.fft.rfft2(forcing.to(w0))
    implicit = 1.0 + 0.5 * dt * viscosity * lap
    explicit = 1.0 - 0.5 * dt * viscosity * lap
    ikx, iky = 2j * math.pi * kx, 2j * math.pi * ky
    records = []
    irfft = lambda a: torch.fft.irfft2(a, s=(n, n))  # noqa: E731
    for step in range(1, steps + 1):
        psi_h = w_h * lap_inv  # -Δψ = ω
        u, v = irfft(iky * psi_h), irfft(-ikx * psi_h)  # velocity (∂ψ/∂y, -∂ψ/∂x)
        advection_h = dealias * torch.fft.rfft2(u * irfft(ikx * w_h) + v * irfft(iky * w_h))
        w_h = (-dt * advection_h + dt * f_h + explicit * w_h) / implicit
        if step % per_record == 0:
            records.append(irfft(w_h))
    return torch.stack(records, dim=1)


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
        template.to_zarr(store, mode="w", compute=False, consolidated=False, zarr_format=3)
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
    path = str(cache / f"navier_stokes_{samples}_samples_16x16_v1.zarr")
    generate_navier_stokes(path, samples=samples)
    return path
