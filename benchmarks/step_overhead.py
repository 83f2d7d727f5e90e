"""Where a small training step's time goes (issue 25, item 2): the worker loop's step on a DeepSpeed engine
(ZeRO 0/1/2, built as a run builds it) against the plain torch loop of `benchmarks/gpu_stack.py`, at the paper's
z500 size, on one GPU, in one process (a world of 1, NCCL; no Ray, which adds nothing inside a step).

For each variant: ms per step (best of interleaved repeats), then over profiled steps the GPU's kernel time per
step, and per step the kernel launches, the host waits on the device (stream/device/event synchronisations) and
the host time of the forward, backward and optimizer step. `--sync-sites` lists where a variant's host waits
come from. Diagnostic variants change one thing (the precision, clipping, a DeepSpeed setting) to price it;
"before" is the engine as built until 2026-12-06.

    python benchmarks/step_overhead.py [--batch 4] [--steps 40] [--repeats 3] [--variants ...] [--sync-sites ...]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from benchmarks.gpu_stack import _model, on_device, plain_step  # noqa: E402
from minconv_dist.train.engine import build_engine  # noqa: E402
from minconv_dist.train.loop import train_step  # noqa: E402
from minconv_dist.train.meter import LossMeter  # noqa: E402

Z500 = {"layers": 3, "hidden": 24, "grid": (16, 32), "T": 24, "closed": 4, "batch": 4}
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def _phases(engine: Any) -> None:
    """Label the engine's forward, backward and step in the profile (instance attributes; the engine is ours)."""
    for name in ("forward", "backward", "step"):
        method = getattr(engine, name)

        def labelled(*args, _method=method, _name=name, **kwargs):
            with record_function(f"phase.{_name}"):
                return _method(*args, **kwargs)

        setattr(engine, name, labelled)


@contextlib.contextmanager
def tweaked(ds: dict[str, Any], adam: dict[str, Any]) -> Iterator[None]:
    """While building an engine: `ds` merged into DeepSpeed's config (one level deep), `adam` into AdamW's
    arguments."""
    import minconv_dist.train.engine as engine_module

    config, adamw = engine_module.deepspeed_config, torch.optim.AdamW

    def merged(*args, **kwargs) -> dict[str, Any]:
        out = config(*args, **kwargs)
        for key, value in ds.items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
        return out

    engine_module.deepspeed_config = merged
    torch.optim.AdamW = lambda params, **kwargs: adamw(params, **{**kwargs, **adam})
    try:
        yield
    finally:
        engine_module.deepspeed_config, torch.optim.AdamW = config, adamw


def engine_step(size: dict[str, Any], stage: int, device: torch.device, overrides: list[str],
                ds: dict[str, Any] | None = None, adam: dict[str, Any] | None = None
                ) -> tuple[Callable[[], None], Callable[[], None]]:
    """(step, teardown) of the worker loop's step on a fresh DeepSpeed engine built as a run builds it; `overrides`
    are config keys, `ds` and `adam` tweaks of DeepSpeed's config and AdamW's arguments."""
    from minconv_dist.train import load_config

    cfg = load_config(overrides=[f"data.batch_size={size['batch']}", f"parallel.zero_stage={stage}",
                                 "optim.warmup_steps=0", *overrides])
    model = _model(size)
    if cfg.model.fuse_norm:
        model.fuse_residual_norm()
    with tweaked(ds or {}, adam or {}):
        engine = build_engine(cfg, model, total_steps=10**6, device=device)
    _phases(engine)
    batches, meter, k = on_device(size, device), LossMeter(device), size["T"] - size["closed"]
    count = iter(range(1, 10**9))
    return (lambda: meter.update(train_step(engine, next(batches), k, 0.0)[0], next(count))), engine.destroy


BF16 = "parallel.precision=bf16"  # bf16 weights (at ZeRO-0 DeepSpeed's fp16 optimizer; at 1/2 its ZeRO one)
CONTIGUOUS = {"zero_optimization": {"contiguous_gradients": True}}
NO_OVERFLOW_CHECK = {"bf16": {"check_grad_overflow": False}}
FOREACH = {"fused": None}  # torch's default on a GPU (foreach); fused=False would mean its per-tensor loop


def before(stage: int) -> Callable[[dict[str, Any], torch.device], tuple[Callable[[], None], Callable[[], None]]]:
    """The engine as built until 2026-12-06: bf16 weights, foreach AdamW, contiguous gradients at ZeRO-1/2."""
    return lambda size, device: engine_step(size, stage, device, [BF16], ds=CONTIGUOUS if stage else None,
                                            adam=FOREACH)


# "ZeRO-k": the default config (precision auto: bf16-mixed on a GPU). Diagnostic variants change one thing.
VARIANTS: dict[str, Callable[[dict[str, Any], torch.device], tuple[Callable[[], None], Callable[[], None]]]] = {
    "plain torch": lambda size, device: (plain_step(size, device, phases=True), lambda: None),
    "ZeRO-0": lambda size, device: engine_step(size, 0, device, []),
    "ZeRO-1": lambda size, device: engine_step(size, 1, device, []),
    "ZeRO-2": lambda size, device: engine_step(size, 2, device, []),
    "ZeRO-0, before": before(0),
    "ZeRO-1, before": before(1),
    "ZeRO-2, before": before(2),
    "ZeRO-0, bf16": lambda size, device: engine_step(size, 0, device, [BF16]),
    "ZeRO-1, bf16": lambda size, device: engine_step(size, 1, device, [BF16]),
    "ZeRO-2, bf16": lambda size, device: engine_step(size, 2, device, [BF16]),
    "ZeRO-0, foreach AdamW": lambda size, device: engine_step(size, 0, device, [], adam=FOREACH),
    "ZeRO-0, no clipping": lambda size, device: engine_step(size, 0, device, ["optim.grad_clip=0"]),
    "ZeRO-2, contiguous gradients": lambda size, device: engine_step(size, 2, device, [], ds=CONTIGUOUS),
    "ZeRO-2, bf16, no overflow check": lambda size, device: engine_step(size, 2, device, [BF16],
                                                                        ds=NO_OVERFLOW_CHECK),
    "ZeRO-0, fuse_norm": lambda size, device: engine_step(size, 0, device, ["model.fuse_norm=true"]),
    "plain torch, fuse_norm": lambda size, device: (plain_step(size, device, phases=True, fuse_norm=True),
                                                    lambda: None),
}


def ms_per_step(step: Callable[[], None], steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def profiled(step: Callable[[], None], steps: int) -> dict[str, float]:
    """Per step: GPU kernel ms, kernel launches, host waits, and host ms of each labelled phase."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    # Kernels are the device-side rows; a CPU op's "self device time" repeats its kernels', and a record_function
    # has a device-side twin spanning its kernels: counting either would count a kernel twice.
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    out = {"gpu_ms": sum(e.self_device_time_total for e in kernels) / 1e3 / steps,
           "launches": sum(e.count for e in events if e.key in LAUNCH_CALLS) / steps,
           "syncs": sum(e.count for e in events if e.key in SYNC_CALLS) / steps}
    for e in events:
        if e.key.startswith("phase.") and e.device_type == DeviceType.CPU:
            out[e.key] = e.cpu_time_total / 1e3 / steps
    out["table"] = events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50)
    return out


def sync_sites(step: Callable[[], None], steps: int = 3) -> list[tuple[int, str]]:
    """Where the host waits on the device, per step: torch's sync debug mode warns at each synchronising op (an
    .item(), a pageable host->device copy, a bool of a device tensor); each warning's Python stack is reduced to
    its innermost frames outside torch. Explicit `torch.cuda.synchronize()` calls are not flagged."""
    import collections
    import traceback
    import warnings

    sites: collections.Counter[str] = collections.Counter()
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename
                  and "warnings.py" not in f.filename]
        sites[" < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-3:][::-1])] += 1

    torch.cuda.synchronize()
    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            for _ in range(steps):
                step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = shown
    return [(count / steps, site) for site, count in sites.most_common()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[4])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tables", nargs="*",
                        default=["plain torch", "ZeRO-0", "ZeRO-2"],
                        help="variants whose top host ops are printed")
    parser.add_argument("--sync-sites", nargs="*", default=[], help="variants whose synchronising calls are listed")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    import deepspeed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    # `model.fuse_norm` compiles one function, whose graphs every model in this process shares: 2 ranks (window,
    # closed-loop step) x grad mode x autocast x dtype. A run has one precision; this process holds several, which
    # would pass Dynamo's default limit of 8 and send the later variants back to eager (as on 2026-12-05).
    torch._dynamo.config.recompile_limit = 64
    print(f"# `{' '.join(sys.argv)}`: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, DeepSpeed "
          f"{deepspeed.__version__}, {datetime.date.today().isoformat()}\n", flush=True)
    for batch in args.batch:
        size = {**Z500, "batch": batch}
        built = {name: VARIANTS[name](size, device) for name in args.variants}
        for step, _ in built.values():
            for _ in range(8):  # warm-up: autotuning, compilation, the optimizer's lazy state
                step()
        times: dict[str, list[float]] = {name: [] for name in built}
        for _ in range(args.repeats):  # interleaved
            for name, (step, _) in built.items():
                times[name].append(ms_per_step(step, args.steps))
        prof = {name: profiled(step, 10) for name, (step, _) in built.items()}
        plain = min(times["plain torch"]) if "plain torch" in times else float("nan")
        print(f"## z500 size (3 x 24, 16x32, T=24, 4 closed-loop), batch {batch}\n")
        print("| variant | ms/step (best of %d x %d) | plain / this | GPU kernel ms/step | launches/step | host waits/step"
              " | host ms: forward | backward | step |" % (args.repeats, args.steps))
        print("|---|---|---|---|---|---|---|---|---|")
        for name in built:
            p, best = prof[name], min(times[name])
            print(f"| {name} | {best:.2f} | {plain / best:.2f} | {p['gpu_ms']:.2f} | {p['launches']:.0f} | "
                  f"{p['syncs']:.1f} | {p.get('phase.forward', float('nan')):.2f} | "
                  f"{p.get('phase.backward', float('nan')):.2f} | {p.get('phase.step', float('nan')):.2f} |")
        for name in args.tables:
            if name in prof:
                print(f"\n### top host ops, {name}, batch {batch} (10 steps)\n\n```\n{prof[name]['table']}\n```")
        for name in args.sync_sites:
            if name in built:
                print(f"\n### where {name} waits on the device, batch {batch} (per step)\n")
                for count, site in sync_sites(built[name][0]):
                    print(f"- {count:.1f} x {site}")
        for _, teardown in built.values():
            teardown()
        print(flush=True)


if __name__ == "__main__":
    main()
