"""2D Navier–Stokes vorticity on the unit torus: the FNO / paper solver, in plain torch.

Pseudo-spectral: Crank–Nicolson for viscosity, explicit Euler for the 2/3-dealiased advection term,
forcing 0.1 (sin 2π(x+y) + cos 2π(x+y)); initial vorticity from a Gaussian random field (alpha 2.5,
tau 7). Batched over samples with torch.fft, on whatever device the tensors are. Torch only (no
xarray or zarr), so GPU machines and benchmarks use it as is; `minconv_dist.data` writes it to zarr.
"""

from __future__ import annotations

import math

import torch


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
