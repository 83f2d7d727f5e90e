"""The paper's Navier–Stokes comparison: train all five models, print time per epoch and closed-loop RMSE.

    python benchmarks/paper_navier_stokes.py --out results.md            # the documented GPU size
    python benchmarks/paper_navier_stokes.py --help

Set-up (shared MODELS.md, arXiv 2508.03614): 2D vorticity on the unit torus from the FNO pseudo-spectral
Crank–Nicolson solver (viscosity 1e-3, forcing 0.1(sin 2π(x+y) + cos 2π(x+y)), Gaussian random field
initial vorticity alpha 2.5, tau 7, dt 1e-3, one frame per time unit), 64x64 subsampled x4 to 16x16,
circular padding; train on 25-frame windows with 20 teacher-forced steps, test on 50 frames with
20 teacher steps (30 closed-loop); Adam 5e-4 with cosine decay, input noise 1e-2.
Hidden sizes [49]*4 MinConvGRU, [40]*4 MinConvLSTM and MinConvExpLSTM, [28]*4 ConvGRU, [25]*4 ConvLSTM.

Imports only torch and minconv_dist.models (the data are solved in memory, no zarr), so it runs on a
bare GPU machine. Every number is in vorticity units (data de-normalised).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minconv_dist.models import build_model  # noqa: E402
from minconv_dist.simulate import gaussian_random_field, paper_forcing, solve_vorticity  # noqa: E402

PAPER_HIDDEN = {"minconvgru": 49, "minconvlstm": 40, "minconvexplstm": 40, "convgru": 28, "convlstm": 25}


def navier_stokes_data(samples: int, resolution: int, time_units: int, dt: float, downsample: int,
                       gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Vorticity [samples, time_units + 1, res/downsample, res/downsample] at t = 0, 1, ..., time_units:
    the paper's set-up (viscosity 1e-3, its forcing), solved in memory with `minconv_dist.simulate`."""
    w0 = gaussian_random_field(samples, resolution, generator=gen).to(device)
    w = solve_vorticity(w0, paper_forcing(resolution).to(device), 1e-3, float(time_units), dt)
    return torch.cat([w0[:, None], w], dim=1)[..., ::downsample, ::downsample]


def closed_loop_rmse(model, data: torch.Tensor, teacher: int, batch: int, mean: float, std: float) -> float:
    """RMSE over the closed-loop frames only; data [N, T+1, 1, H, W] normalised, answer in data units."""
    model.eval()
    se, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, data.shape[0], batch):
            x = data[i:i + batch]
            pred = model(x[:, :-1], teacher_steps=teacher)[:, teacher:]
            se += float(((pred - x[:, teacher + 1:]) ** 2).sum()) * std**2
            count += pred.numel()
    return math.sqrt(se / count)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    n = args.train_samples + args.test_samples
    t0 = time.perf_counter()
    data = navier_stokes_data(n, args.resolution, args.time_units, args.dt, args.downsample, gen, device)
    data = data.unsqueeze(2).float()
    sync(device)
    print(f"data: {n} trajectories x {data.shape[1]} frames at {tuple(data.shape[-2:])} "
          f"solved in {time.perf_counter() - t0:.1f} s on {device}", flush=True)
    train, test = data[: args.train_samples], data[args.train_samples:]
    mean, std = float(train.mean()), float(train.std())
    train, test = (train - mean) / std, (test - mean) / std
    if args.train_len + 1 > train.shape[1] or args.test_len + 1 > test.shape[1]:
        raise ValueError(f"windows of {args.train_len}/{args.test_len} (+1 target) frames need more than the "
                         f"{data.shape[1]} frames solved; raise --time-units")
    test = test[:, : args.test_len + 1]

    results = []
    for arch in args.models:
        torch.manual_seed(args.seed)
        hidden = args.hidden or PAPER_HIDDEN[arch]
        model = build_model(arch, ["vorticity"], hidden, args.layers, padding="circular", norm="layer", grid=tuple(data.shape[-2:]),
                            scan_method=args.scan_method).to(device)
        params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        iters = math.ceil(args.train_samples / args.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * iters)
        epoch_times, started = [], time.perf_counter()
        for epoch in range(args.epochs):
            model.train()
            sync(device)
            e0 = time.perf_counter()
            order = torch.randperm(args.train_samples, generator=gen)
            starts = torch.randint(0, train.shape[1] - args.train_len, (args.train_samples,), generator=gen)
            frames = starts[:, None] + torch.arange(args.train_len + 1)
            for i in range(0, args.train_samples, args.batch_size):
                rows = order[i:i + args.batch_size]
                x = train[rows[:, None].to(device), frames[rows].to(device)]  # [b, L+1, 1, H, W]
                inp = x[:, :-1] + args.noise * torch.randn_like(x[:, :-1])
                loss = F.mse_loss(model(inp, teacher_steps=args.train_teacher), x[:, 1:])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            sync(device)
            epoch_times.append(time.perf_counter() - e0)
            if time.perf_counter() - started > args.max_train_seconds:
                break
        rmse = closed_loop_rmse(model, test, args.test_teacher, args.eval_batch, mean, std)
        row = dict(model=arch, hidden=hidden, params=params, epochs=len(epoch_times),
                   s_per_epoch=statistics.median(epoch_times), closed_loop_rmse=rmse, last_loss=float(loss.detach()))
        results.append(row)
        print(f"{arch:15s} params {params:7d}  epochs {row['epochs']:3d}  {row['s_per_epoch']:.3f} s/epoch  "
              f"closed-loop RMSE {rmse:.4f}  (train loss {row['last_loss']:.4f})", flush=True)
        if args.out:
            write_table(args, results, device)
    return results


def write_table(args: argparse.Namespace, results: list[dict], device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"device: {name}; torch {torch.__version__}; args: {json.dumps(vars(args))}", "",
             "| model | hidden | params | epochs | s / epoch | closed-loop RMSE |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['hidden']}x{args.layers} | {r['params']:,} | {r['epochs']} | "
              f"{r['s_per_epoch']:.3f} | {r['closed_loop_rmse']:.4f} |" for r in results]
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(PAPER_HIDDEN), choices=list(PAPER_HIDDEN))
    p.add_argument("--train-samples", type=int, default=800)
    p.add_argument("--test-samples", type=int, default=100)
    p.add_argument("--resolution", type=int, default=64, help="solver grid")
    p.add_argument("--downsample", type=int, default=4, help="subsampling stride to the model grid")
    p.add_argument("--time-units", type=int, default=50, help="frames recorded after the initial one")
    p.add_argument("--dt", type=float, default=1e-3, help="solver time step")
    p.add_argument("--train-len", type=int, default=25)
    p.add_argument("--train-teacher", type=int, default=20)
    p.add_argument("--test-len", type=int, default=50)
    p.add_argument("--test-teacher", type=int, default=20)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--max-train-seconds", type=float, default=math.inf, help="stop a model's training after this")
    p.add_argument("--batch-size", type=int, default=8, help="the paper uses 1")
    p.add_argument("--eval-batch", type=int, default=50)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--noise", type=float, default=1e-2, help="std of the input noise (normalised units)")
    p.add_argument("--hidden", type=int, default=None, help="one hidden size for all models (tiny runs)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--scan-method", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="markdown table (and a .json beside it), rewritten after each model")
    return p


if __name__ == "__main__":
    run(parser().parse_args())
