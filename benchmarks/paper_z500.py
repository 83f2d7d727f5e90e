"""The paper's z500 comparison on the embedded synthetic store (CPU-sized): five models beside
persistence and climatology, skill vs lead time.

    python benchmarks/paper_z500.py --out docs/results          # table + skill curves, ~5 min on 2 cores
    python benchmarks/paper_z500.py --data gs://...  --channel geopotential@500   # dims: as the store spells them

Set-up (shared MODELS.md): z500 at 5.625° coarsened x2 to 16x32, cylinder padding, sequences 24 with
20 teacher steps, hidden [24]*3 MinConvGRU, [20]*3 MinConvLSTM/ExpLSTM, [14]*3 ConvGRU, [12]*3 ConvLSTM,
Adam 1e-3; test: 168 h rollouts from bi-weekly init dates after a 20-frame warm-up. Training here is cut
to a wall-time budget per model (the paper trains 20 epochs over 36 years), so the numbers measure the
pipeline, not the paper's skill. The synthetic store's numbers are not comparable to WeatherBench's.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minconv_dist.data import (DimNames, WindowDataset, compute_stats, dayofyear_climatology,  # noqa: E402
                               default_store, open_store, store_dims)
from minconv_dist.data.selection import coarsen  # noqa: E402
from minconv_dist.evaluate import (as_fields, evaluate_forecast, from_weatherbench2, init_times,  # noqa: E402
                                   open_channels, open_forecast, write_forecast)
from minconv_dist.evaluate.plots import plot_maps, plot_skill  # noqa: E402
from minconv_dist.models import build_model  # noqa: E402

PAPER_HIDDEN = {"minconvgru": 24, "minconvlstm": 20, "minconvexplstm": 20, "convgru": 14, "convlstm": 12}


def train(arch: str, args: argparse.Namespace, stats, dims: DimNames) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(args.seed)
    model = build_model(arch, [args.channel], PAPER_HIDDEN[arch], 3, padding="cylinder", norm="layer", grid=(16, 32))
    model.normalizer.set_stats(stats.mean, stats.std)
    normalize = model.normalizer.normalize
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = WindowDataset(args.data, args.channel, args.seq_len + 1, stride=args.stride, time_range=tuple(args.train),
                         coarsen=2, dims=dims, shuffle=True, seed=args.seed, rank=0, world_size=1,
                         batch_size=args.batch_size)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)
    steps, t0 = 0, time.perf_counter()
    while steps < args.max_steps and time.perf_counter() - t0 < args.max_train_seconds:
        data.set_epoch(steps)
        for x in loader:
            loss = F.mse_loss(normalize(model(x[:, :-1], teacher_steps=args.teacher)), normalize(x[:, 1:]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if steps >= args.max_steps or time.perf_counter() - t0 > args.max_train_seconds:
                break
    seconds = time.perf_counter() - t0
    return model.eval(), dict(model=arch, params=sum(p.numel() for p in model.parameters()), steps=steps,
                              s_per_step=seconds / max(steps, 1), last_loss=float(loss.detach()))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="zarr store (default: the embedded synthetic store)")
    p.add_argument("--dims", type=json.loads, default={})
    p.add_argument("--channel", default="geopotential@500", help="one channel, e.g. z for a WeatherBench v1 store")
    p.add_argument("--models", nargs="+", default=list(PAPER_HIDDEN), choices=list(PAPER_HIDDEN))
    p.add_argument("--train", nargs=2, default=["2015-01-01", "2015-12-31"])
    p.add_argument("--test", nargs=2, default=["2016-01-02", "2016-12-23"], help="init-time range")
    p.add_argument("--init-every", default="14D")
    p.add_argument("--seq-len", type=int, default=24)
    p.add_argument("--teacher", type=int, default=20)
    p.add_argument("--stride", type=int, default=6, help="hours between training window starts")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--max-train-seconds", type=float, default=45.0)
    p.add_argument("--steps", type=int, default=168, help="lead hours")
    p.add_argument("--definition", default="weatherbench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    args.data = args.data or default_store()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dims, out = store_dims(open_store(args.data), DimNames(**args.dims)), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    stats = compute_stats(args.data, args.channel, dims, tuple(args.train), progress=False)
    truth_da = open_channels(args.data, args.channel, dims=dims, coarsen=2)
    truth = as_fields(truth_da).load()
    clim = dayofyear_climatology(args.data, args.channel, dims, tuple(args.train), progress=False)
    clim = as_fields(coarsen(clim, 2, "lat", "lon", args.data))
    inits = init_times(truth_da["time"].values, *args.test, args.init_every)

    rows, skills, work = [], [], tempfile.TemporaryDirectory()
    for arch in args.models:
        model, row = train(arch, args, stats, dims)
        store = Path(work.name) / f"forecast_{arch}.zarr"
        t0 = time.perf_counter()
        write_forecast(model, truth_da, inits, context=args.teacher, steps=args.steps, out=str(store),
                       batch_size=16, attrs={"model": arch, "data_source": "synthetic"}, overwrite=True)
        row["forecast_s"] = time.perf_counter() - t0
        fc = from_weatherbench2(open_forecast(str(store)), [args.channel])  # WB2 layout -> our channel
        skill = evaluate_forecast(fc, truth, clim, args.definition, name=arch)
        skills.append(skill if not skills else skill.sel(source=[arch]))
        if arch == args.models[0]:
            plot_maps(fc, truth, args.channel, out / "z500_maps.png", leads=[24, 72, args.steps])
        rows.append(row)
        print(json.dumps(row), flush=True)
    skill = xr.concat(skills, dim="source")
    order = list(args.models) + ["persistence", "climatology"]
    skill = skill.sel(source=order)
    skill.attrs["definition"] = args.definition
    plot_skill(skill, args.channel, out / "z500_skill.png", title="synthetic z500 (16x32): skill vs lead time")
    leads = [h for h in (24, 72, 120, 168) if h <= args.steps]
    table = ["| source | params | train steps | s / step | " + " | ".join(f"RMSE {h} h" for h in leads)
             + " | " + " | ".join(f"ACC {h} h" for h in leads) + " |", "|---" * (4 + 2 * len(leads)) + "|"]
    info = {r["model"]: r for r in rows}
    for source in order:
        s = skill[args.channel].sel(source=source)
        r = info.get(source)
        cells = [f"{r['params']:,}", str(r["steps"]), f"{r['s_per_step']:.3f}"] if r else ["—"] * 3
        rmse = [f"{float(s.sel(metric='weighted_rmse', prediction_timedelta=np.timedelta64(h, 'h'))):.0f}" for h in leads]
        acc = [f"{float(s.sel(metric='acc', prediction_timedelta=np.timedelta64(h, 'h'))):.3f}" for h in leads]
        table.append(f"| {source} | " + " | ".join(cells + rmse + acc) + " |")
    text = "\n".join(table) + "\n"
    (out / "z500_results.md").write_text(text)
    print(text)
    return {"rows": rows, "skill": skill}


if __name__ == "__main__":
    main()
