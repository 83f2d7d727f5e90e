"""What the stack costs on GPUs, each ratio against a baseline measured in the same run (issue 10):

- stack overhead: the worker loop's step (`minconv_dist.train.loop.train_step` on a DeepSpeed engine inside a
  Ray Train worker) vs a plain torch loop (autocast bf16, fused AdamW, the same clipping), data on the device;
- data stall: the same loop fed by the real WindowDataset (DataLoader workers, pinned memory, non-blocking
  copies) vs batches already on the device;
- weak scaling 1 -> N GPUs at ZeRO-1 and ZeRO-2 (per-GPU batch fixed);
- ZeRO-3 memory on a parameter-dominated model vs ZeRO-0, beside DeepSpeed's own estimate;
- the sequence-parallel scan over N GPUs: exactness against one device and speed-up, and the largest T.

    python benchmarks/gpu_stack.py                 # 1 GPU, then every GPU of the machine
    python benchmarks/gpu_stack.py --cpu --quick   # the same code paths on 2 gloo CPU workers (smoke test)

Prints markdown tables with the command, device and date, for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minconv_dist.train.local_ray import LOCAL_ONLY  # noqa: E402

os.environ.update(LOCAL_ONLY)  # before Ray is imported: the Ray this script starts listens on 127.0.0.1 only

import cloudpickle  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
import ray.train.torch  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

import benchmarks.sp_scan  # noqa: E402
from benchmarks.sp_scan import sp_scan_check  # noqa: E402
from minconv_dist.data import WindowDataset, write_synthetic_era5  # noqa: E402
from minconv_dist.models import build_model  # noqa: E402
from minconv_dist.train import load_config  # noqa: E402
from minconv_dist.train.engine import build_engine  # noqa: E402
from minconv_dist.train.loop import train_step  # noqa: E402
from minconv_dist.train.meter import LossMeter  # noqa: E402


cloudpickle.register_pickle_by_value(benchmarks.sp_scan)  # Ray workers need not import benchmarks/


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rate(step: Callable[[int], None], device: torch.device, warmup: int, steps: int) -> float:
    """Steps per second of `step(i)` after `warmup` calls."""
    for i in range(warmup):
        step(i)
    _sync(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    _sync(device)
    return steps / (time.perf_counter() - start)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def _model(size: dict[str, Any]) -> torch.nn.Module:
    """A MinConvGRU of `size` with z500-like statistics (the store's values are ~54000 +- 3300)."""
    torch.manual_seed(0)
    model = build_model("minconvgru", ["z"], size["hidden"], size["layers"], padding="cylinder",
                        norm=size.get("norm", "layer"), grid=tuple(size["grid"]))
    model.normalizer.set_stats([54000.0], [3300.0])
    return model


def _cfg(size: dict[str, Any], stage: int):
    """The default config at `size`'s batch and `stage` (its precision: auto)."""
    return load_config(overrides=[f"data.batch_size={size['batch']}", f"parallel.zero_stage={stage}",
                                  "optim.warmup_steps=0"])


def engine_rate(size: dict[str, Any], stage: int, device: torch.device, batches, warmup: int, steps: int
                ) -> tuple[float, float]:
    """(samples/s per rank, peak GiB) of the worker loop's step on a DeepSpeed engine."""
    _free(device)
    engine = build_engine(_cfg(size, stage), _model(size), total_steps=10**6, device=device)
    meter, k = LossMeter(device), size["T"] - size["closed"]
    _free(device)
    rate = _rate(lambda i: meter.update(train_step(engine, next(batches), k, 0.0)[0], i + 1), device, warmup, steps)
    meter.summary()
    peak = _peak_gib(device)
    engine.destroy()  # DeepSpeed's hooks and buffers; the engine itself goes with this frame
    return rate * size["batch"], peak


def plain_step(size: dict[str, Any], device: torch.device, phases: bool = False, fuse_norm: bool = False
               ) -> Callable[[], None]:
    """One step of a plain torch loop on on-device batches: the same model and loss, autocast bf16, fused AdamW,
    the same clipping. phases: label the forward, backward and step for torch.profiler."""
    model = _model(size).to(device)
    if fuse_norm:
        model.fuse_residual_norm()
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=cuda)
    batches, k = on_device(size, device), size["T"] - size["closed"]
    label = torch.profiler.record_function if phases else (lambda _: contextlib.nullcontext())

    def step() -> None:
        x = next(batches)
        with label("phase.forward"):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                pred = model(x[:, :-1], teacher_steps=k)
            loss = F.mse_loss(model.normalizer.normalize(pred), model.normalizer.normalize(x[:, 1:]))
        with label("phase.backward"):
            loss.backward()
        with label("phase.step"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def plain_rate(size: dict[str, Any], device: torch.device, warmup: int, steps: int) -> float:
    """Samples/s of `plain_step`."""
    _free(device)
    step = plain_step(size, device)
    return _rate(lambda _: step(), device, warmup, steps) * size["batch"]


def on_device(size: dict[str, Any], device: torch.device):
    x = torch.randn(size["batch"], size["T"] + 1, 1, *size["grid"], device=device)
    return itertools.repeat(x)


def from_store(size: dict[str, Any], device: torch.device, store: str, rank: int, world: int, workers: int):
    """Batches of the real loader: WindowDataset -> DataLoader (workers, pinned) -> non-blocking copy."""
    ds = WindowDataset(store, ["z"], size["T"] + 1, stride=1, seed=0, batch_size=size["batch"], rank=rank, world_size=world)
    loader = torch.utils.data.DataLoader(ds, batch_size=size["batch"], drop_last=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    return (x.to(device, non_blocking=True) for epoch in itertools.count() for x in loader)


def _report(metrics: dict[str, Any]) -> None:
    """Ray Train V2 keeps only metrics reported with a checkpoint: rank 0 attaches a tiny one."""
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def stack_worker(cfg: dict[str, Any]) -> None:
    """One Ray Train worker group: every requested measurement, rank 0's numbers reported."""
    device = ray.train.torch.get_device()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    warmup, steps = cfg["warmup"], cfg["steps"]
    out: dict[str, Any] = {}
    for label, size in cfg["sizes"].items():
        if "overhead" in cfg["parts"]:
            for repeat in range(2):  # A/B interleaved: plain, then each stage, twice
                out.setdefault(f"{label}/plain", []).append(plain_rate(size, device, warmup, steps))
                for stage in (0, 1, 2):
                    out.setdefault(f"{label}/zero{stage}", []).append(
                        engine_rate(size, stage, device, on_device(size, device), warmup, steps)[0])
        if "data" in cfg["parts"] and "store" in size:
            for repeat in range(2):
                out.setdefault(f"{label}/device_data", []).append(
                    engine_rate(size, 0, device, on_device(size, device), warmup, steps)[0])
                out.setdefault(f"{label}/store_data", []).append(engine_rate(
                    size, 0, device, from_store(size, device, size["store"], rank, world, cfg["loader_workers"]),
                    warmup, steps)[0])
        if "scaling" in cfg["parts"]:
            for stage in (1, 2):
                out[f"{label}/scaling{stage}"] = engine_rate(size, stage, device, on_device(size, device), warmup,
                                                             steps)[0]
    if "memory" in cfg["parts"]:
        wide = cfg["wide"]
        for stage in cfg["memory_stages"]:
            out[f"memory{stage}"] = engine_rate(wide, stage, device, on_device(wide, device), 1, 2)[1]
    if "profile" in cfg["parts"]:
        out["profile"] = profile_table(cfg["sizes"]["gpu"], device)
    if "scan" in cfg["parts"]:
        out["scan"] = [sp_scan_check(device, **case) for case in cfg["scan_cases"]]
    _report(out)


def profile_table(size: dict[str, Any], device: torch.device) -> str:
    """torch.profiler's top CUDA kernels over a few steps of the ZeRO-0 engine loop."""
    if device.type != "cuda":
        return "(no CUDA)"
    from torch.profiler import ProfilerActivity, profile

    engine = build_engine(_cfg(size, 0), _model(size), total_steps=10**6, device=device)
    batches, k = on_device(size, device), size["T"] - size["closed"]
    for _ in range(3):
        train_step(engine, next(batches), k, 0.0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            train_step(engine, next(batches), k, 0.0)
        torch.cuda.synchronize()
    engine.destroy()
    _free(device)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)


def run(cfg: dict[str, Any], workers: int, gpu: bool) -> dict[str, Any]:
    trainer = TorchTrainer(stack_worker, train_loop_config=cfg,
                           scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu,
                                                                  resources_per_worker={"CPU": cfg["cpus"]}),
                           run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(prefix="gpu-stack-")))
    return trainer.fit().metrics


def best(values: list[float]) -> float:
    return max(values)


def print_overhead(one: dict[str, Any], sizes: dict[str, dict[str, Any]]) -> None:
    """The stack overhead table: samples/s of the engine loop at ZeRO 0/1/2 against the plain torch loop."""
    print("## Stack overhead, one GPU: the worker loop on a DeepSpeed engine vs a plain torch loop "
          "(samples/s, best of 2 interleaved runs, data on the device)\n")
    print("| model | plain torch | ZeRO-0 | ZeRO-1 | ZeRO-2 | ratio 0 / 1 / 2 |\n|---|---|---|---|---|---|")
    for label, size in sizes.items():
        plain = best(one[f"{label}/plain"])
        zs = [best(one[f"{label}/zero{s}"]) for s in (0, 1, 2)]
        print(f"| {label}: {size['layers']}x{size['hidden']}, {size['grid'][0]}x{size['grid'][1]}, T={size['T']}, "
              f"batch {size['batch']} | {plain:.1f} | " + " | ".join(f"{z:.1f}" for z in zs) + " | "
              + " / ".join(f"{z / plain:.2f}" for z in zs) + " |", flush=True)


def print_memory(wide: dict[str, Any], n: int, z0: float, z3: float) -> None:
    """The ZeRO-3 memory table: peak GiB per GPU at ZeRO-0 on one GPU vs ZeRO-3 on n, and DeepSpeed's estimate."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    model = _model(wide)
    total = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    _, est, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=n, num_nodes=1,
                                                   cpu_offload=False, cpu_offload_params=False)
    print(f"\n## ZeRO-3 memory, a parameter-dominated model ({wide['layers']}x{wide['hidden']}, "
          f"{total / 1e6:.0f} M parameters, batch 1, T={wide['T']})\n")
    print(f"| ZeRO-0, 1 GPU | ZeRO-3, {n} GPUs | ratio | DeepSpeed's ZeRO-3 estimate (model states) |\n"
          f"|---|---|---|---|\n| {z0:.2f} GiB | {z3:.2f} GiB | **{z3 / z0:.2f}** | {est / 2**30:.2f} GiB |\n",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="2 gloo CPU workers, tiny sizes (smoke test)")
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--only", choices=["overhead", "memory"], help="only the stack overhead or the ZeRO-3 memory table")
    args = parser.parse_args()
    gpu = not args.cpu
    n = torch.cuda.device_count() if gpu else 2
    if gpu and n == 0:
        sys.exit("no CUDA device: run with --cpu for the smoke test")
    cpus = (os.cpu_count() or 2)
    work = Path(tempfile.mkdtemp(prefix="gpu-stack-data-"))
    store = str(work / "z_64x128.zarr")
    grid = (64, 128) if gpu else (16, 32)
    write_synthetic_era5(store, start="2015-01-01", end="2015-03-01", nlat=grid[0], nlon=grid[1], chunks=24)
    sizes = {
        "gpu": {"layers": 4, "hidden": 128, "grid": grid, "T": 48, "closed": 0, "batch": 4, "store": store},
        "z500": {"layers": 3, "hidden": 24, "grid": (16, 32), "T": 24, "closed": 4, "batch": 4},
    } if gpu else {
        "gpu": {"layers": 2, "hidden": 8, "grid": grid, "T": 8, "closed": 0, "batch": 2, "store": store},
    }
    wide = ({"layers": 12, "hidden": 1024, "grid": (32, 64), "T": 4, "closed": 0, "batch": 1, "norm": "group"}
            if gpu else {"layers": 2, "hidden": 64, "grid": (8, 16), "T": 4, "closed": 0, "batch": 1,
                         "norm": "group"})
    warmup, steps = (2, 5) if args.quick or not gpu else (5, 30)
    common = {"sizes": sizes, "wide": wide, "warmup": warmup, "steps": steps, "loader_workers": 4 if gpu else 1}
    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({cpus} cores, gloo)"
    ray.init(address="local", include_dashboard=False, num_cpus=cpus)
    print(f"# GPU stack: `{' '.join(sys.argv)}`, {device} x {n}, torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}\n", flush=True)

    one_parts = [args.only] if args.only else ["overhead", "data", "scaling", "memory", "profile"]
    one = run({**common, "cpus": max(1, cpus // 2) if gpu else 1, "parts": one_parts, "memory_stages": [0]}, 1, gpu)
    if args.only == "memory" and n > 1:
        many = run({**common, "cpus": max(1, cpus // n // 2) if gpu else 1, "parts": ["memory"],
                    "memory_stages": [3]}, n, gpu)
        print_memory(wide, n, one["memory0"], many["memory3"])
    if args.only != "memory":
        print_overhead(one, sizes)
    if args.only:
        return
    dev, real = best(one["gpu/device_data"]), best(one["gpu/store_data"])
    print(f"\n## Data stall, one GPU, ZeRO-0: WindowDataset feed ({common['loader_workers']} loader workers, pinned, "
          f"non-blocking) {real:.1f} vs on-device batches {dev:.1f} samples/s: **{real / dev:.2f}**\n")
    print("## Profile of the ZeRO-0 step (gpu size), top CUDA time\n\n```\n" + one["profile"] + "\n```\n", flush=True)

    if n > 1:
        many = run({**common, "cpus": max(1, cpus // n // 2) if gpu else 1, "parts": ["scaling", "memory", "scan"],
                    "memory_stages": [3],
                    "scan_cases": [{"T": 4096 if gpu else 64, "C": 64 if gpu else 4, "grid": grid, "single": True},
                                   {"T": 0 if gpu else 128, "C": 64 if gpu else 4, "grid": grid, "single": False}]},
                   n, gpu)
        print(f"## Weak scaling 1 -> {n} GPUs (per-GPU batch fixed; efficiency = thr({n}) / ({n} x thr(1)))\n")
        print("| model | ZeRO | 1 GPU samples/s | {n} GPUs samples/s | efficiency |\n|---|---|---|---|---|"
              .replace("{n}", str(n)))
        for label in sizes:
            for stage in (1, 2):
                a, b = one[f"{label}/scaling{stage}"], many[f"{label}/scaling{stage}"] * n
                print(f"| {label} | {stage} | {a:.1f} | {b:.1f} | {b / (n * a):.0%} |")
        print_memory(wide, n, one["memory0"], many["memory3"])
        print(f"## Sequence-parallel scan over {n} GPUs (C=64, grid {grid[0]}x{grid[1]}, forward + backward)\n")
        print("| T | sequence-parallel s | one device, chunked s | speed-up | max abs error vs one device |\n"
              "|---|---|---|---|---|")
        for r in many["scan"]:
            single = "OOM" if r["single_s"] == float("inf") else ("not run" if r["single_s"] != r["single_s"]
                                                                   else f"{r['single_s']:.3f}")
            speed = f"{r['single_s'] / r['sp_s']:.2f}x" if single not in ("OOM", "not run") else "-"
            print(f"| {r['T']} | {r['sp_s']:.3f} | {single} | {speed} | {r['max_abs_err']:.2e} |")


if __name__ == "__main__":
    main()
