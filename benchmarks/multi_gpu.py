"""Issue 7 on one multi-GPU host: weak scaling of the training step (ZeRO 1/2/3, bf16), peak memory ZeRO-3 vs
ZeRO-0, the sequence-parallel scan vs the single-GPU chunked scan, and a Ray job on a local multi-GPU cluster.

    python benchmarks/multi_gpu.py                      # every GPU count 1, 2, 4, 8 that the host has
    python benchmarks/multi_gpu.py --cpu --quick        # the same code paths on 2 gloo CPU workers (smoke test)

Prints one markdown table per part, with the command, device and date, ready for docs/benchmarks.md.
Every part runs the training step the jobs run (`minconv_dist.train.loop`: DeepSpeed config, loss, model).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minconv_dist.train.config import load_config  # noqa: E402


def _report(metrics: dict[str, Any]) -> None:
    """Report rank 0's numbers. Ray Train V2 keeps only metrics that come with a checkpoint, so rank 0
    attaches a tiny one (the metrics as JSON); the other ranks report without."""
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _step_worker(cfg: dict[str, Any]) -> None:
    """Time `steps` training steps of the jobs' loss under DeepSpeed on random data; report rank 0's numbers."""
    import deepspeed
    import torch.nn.functional as F

    from minconv_dist.models import build_model
    from minconv_dist.train.loop import deepspeed_config

    train_cfg = load_config(overrides=cfg["overrides"])
    device = ray.train.torch.get_device()
    gpu = device.type == "cuda"
    torch.manual_seed(0)
    m, d = train_cfg.model, train_cfg.data
    model = build_model(m.arch, 1, m.hidden_sizes, padding=m.padding, norm=m.norm, grid=tuple(cfg["grid"]),
                        scan_method=m.scan_method, chunk_size=m.chunk_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(train_cfg, gpu))
    dtype = torch.bfloat16 if gpu else torch.float32
    x = torch.randn(d.batch_size, d.sequence_length + 1, 1, *cfg["grid"], device=device)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    error = ""
    try:
        for i in range(cfg["warmup"] + cfg["steps"]):
            if i == cfg["warmup"]:
                if gpu:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            loss = F.mse_loss(engine(x[:, :-1].to(dtype), teacher_steps=d.teacher_steps).float(), x[:, 1:])
            engine.backward(loss)
            engine.step()
        if gpu:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    except torch.OutOfMemoryError as err:
        error, elapsed = f"OOM: {str(err).splitlines()[0][:80]}", float("nan")
    world = ray.train.get_context().get_world_size()
    _report({
        "samples_per_s": d.batch_size * world * cfg["steps"] / elapsed,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else psutil.Process().memory_info().rss / 2**30,
        "error": error,
    })


def _scan_worker(cfg: dict[str, Any]) -> None:
    """Sequence-parallel scan over the world vs the single-device chunked scan, exactness block by block."""
    import torch.distributed as dist

    from minconv_dist.ops.scan import scan
    from minconv_dist.ops.scan.sequence_parallel import sequence_parallel_scan

    device = ray.train.torch.get_device()
    rank, world = dist.get_rank(), dist.get_world_size()
    T, C, (H, W), block = cfg["T"], cfg["C"], cfg["grid"], cfg["block"]
    if T % (world * block):
        raise ValueError(f"T={T} must be a multiple of world x block = {world * block}")

    def blocks(first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """a, b for time blocks [first, first+count): each block from its own seed, so any rank can rebuild any."""
        parts = []
        for k in range(first, first + count):
            g = torch.Generator(device="cpu").manual_seed(k)
            raw = torch.randn(2, 1, block, C, H, W, generator=g)
            parts.append(raw.to(device))
        raw = torch.cat(parts, dim=2)
        return torch.sigmoid(raw[0] + 2), 0.1 * raw[1]

    per = T // world // block
    a, b = blocks(rank * per, per)
    a.requires_grad_(True)
    b.requires_grad_(True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(cfg["repeats"] + 1):
        sync()
        dist.barrier()
        start = time.perf_counter()
        h, _ = sequence_parallel_scan(a, b)
        h.square().mean().backward()
        sync()
        dist.barrier()
        times.append(time.perf_counter() - start)
    # exactness: the single-device scan, forward only, block by block with the state carried
    state, worst = None, 0.0
    with torch.no_grad():
        for k in range((rank + 1) * per):
            ak, bk = blocks(k, 1)
            ref, state = scan(ak, bk, state)
            if k >= rank * per:
                local = h[:, (k - rank * per) * block:(k - rank * per + 1) * block]
                worst = max(worst, (local - ref).abs().max().item())
    worst_t = torch.tensor(worst, device=device)
    dist.all_reduce(worst_t, op=dist.ReduceOp.MAX)
    single = float("nan")
    if rank == 0:  # the whole sequence on one device, chunked (state carried, recomputed in backward)
        del a, b, h
        try:
            fa, fb = blocks(0, T // block)
            fa.requires_grad_(True)
            fb.requires_grad_(True)
            for _ in range(2):
                sync()
                start = time.perf_counter()
                out, _ = scan(fa, fb, chunk_size=cfg["chunk"])
                out.square().mean().backward()
                sync()
                single = time.perf_counter() - start
        except torch.OutOfMemoryError:
            single = float("inf")
    _report({"sp_s": min(times[1:]), "single_s": single, "max_abs_err": worst_t.item()})


def _run(fn, cfg: dict[str, Any], workers: int, gpu: bool) -> dict[str, Any]:
    trainer = TorchTrainer(fn, train_loop_config=cfg,
                           scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu),
                           run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(prefix="mgpu-")))
    return trainer.fit().metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_job(gpus: int, gpu: bool, out: Path) -> str:
    """`ray job submit` of jobs/train_era5.py to a fresh local cluster (own temp dir, stopped by its PIDs)."""
    temp = tempfile.mkdtemp(prefix="mgr", dir="/tmp")
    dash = _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    ray_bin = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray_bin, "start", "--head", f"--port={_free_port()}", "--node-ip-address=127.0.0.1",
                    f"--num-gpus={gpus if gpu else 0}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", f"--temp-dir={temp}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True)
    try:
        sets = [f"parallel.num_workers={gpus}", f"parallel.use_gpu={str(gpu).lower()}", "parallel.zero_stage=2",
                "optim.epochs=1", f"tracking.uri=sqlite:///{out}/mlflow.db", f"run.storage_path={out}/runs",
                "tracking.registered_model=minconv-era5-multigpu"]
        job = subprocess.run([ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".",
                              "--", "python", "jobs/train_era5.py", *(a for s in sets for a in ("--set", s))],
                             cwd=ROOT, env=env, capture_output=True, text=True)
        return "SUCCEEDED" if job.returncode == 0 else f"FAILED (rc {job.returncode}): {job.stdout[-300:]}"
    finally:
        procs = [p for p in psutil.process_iter(["cmdline"]) if any(temp in c for c in (p.info["cmdline"] or []))]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in psutil.wait_procs(procs, timeout=15)[1]:
            p.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="1,2,4,8", help="GPU counts to try (those above the host's are skipped)")
    parser.add_argument("--cpu", action="store_true", help="2 gloo CPU workers, tiny sizes: checks the code paths")
    parser.add_argument("--quick", action="store_true", help="fewer steps and a shorter scan")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: scaling,memory,scan,job")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    gpu = not args.cpu
    have = torch.cuda.device_count() if gpu else 2
    if gpu and have == 0:
        sys.exit("no CUDA device: run with --cpu for the smoke test")
    counts = [n for n in map(int, args.gpus.split(",")) if n <= have] if gpu else [1, 2]
    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({os.cpu_count()} cores, gloo)"
    ray.init(include_dashboard=False)
    print(f"# multi-GPU benchmark: `{' '.join(sys.argv)}`, {device} x {have}, "
          f"{datetime.date.today().isoformat()}\n")
    steps, warm = (3, 1) if args.quick else (20, 5)
    grid = (64, 128) if gpu else (16, 32)
    size = ["model.hidden_sizes=[64, 64, 64, 64]", "data.sequence_length=64", "data.teacher_steps=48",
            "data.batch_size=2"] if gpu else ["model.hidden_sizes=[8, 8]", "data.sequence_length=8",
                                              "data.teacher_steps=6", "data.batch_size=2"]

    if "scaling" not in skip:
        print("## Weak scaling (per-GPU batch fixed; efficiency = thr(N) / (N x thr(1)))\n")
        print("| ZeRO | GPUs | samples/s | efficiency | peak GiB/GPU |\n|---|---|---|---|---|")
        for stage in (1, 2, 3):
            base = None
            for n in counts:
                r = _run(_step_worker, {"overrides": size + [f"parallel.zero_stage={stage}"], "grid": grid,
                                        "steps": steps, "warmup": warm}, n, gpu)
                base = base or r["samples_per_s"]
                print(f"| {stage} | {n} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / (n * base):.0%} | "
                      f"{r['peak_mem_gib']:.2f} | {r['error']}", flush=True)
        print()

    if "memory" not in skip:
        print("## Peak memory, ZeRO-3 vs ZeRO-0 (a wide model: optimizer state dominates)\n")
        wide = ["model.hidden_sizes=[1024, 1024, 1024, 1024, 1024, 1024, 1024, 1024]", "model.norm=group",
                "data.sequence_length=4", "data.teacher_steps=4", "data.batch_size=1"] if gpu else \
            ["model.hidden_sizes=[64, 64]", "model.norm=group", "data.sequence_length=4", "data.teacher_steps=4",
             "data.batch_size=1"]
        print("| ZeRO | GPUs | peak GiB/GPU | note |\n|---|---|---|---|")
        for stage in (0, 3):
            n = counts[-1]
            r = _run(_step_worker, {"overrides": wide + [f"parallel.zero_stage={stage}"], "grid": (32, 64),
                                    "steps": 2, "warmup": 1}, n if stage else 1, gpu)
            print(f"| {stage} | {n if stage else 1} | {r['peak_mem_gib']:.2f} | {r['error'] or 'fits'} |", flush=True)
        print()

    if "scan" not in skip:
        T = (8760 if not args.quick else 1024) if gpu else 64
        cfg = {"T": T - T % (counts[-1] * 8), "C": 64 if gpu else 4, "grid": grid, "block": 8, "chunk": 512,
               "repeats": 2 if args.quick else 5}
        print(f"## Sequence-parallel scan, T={cfg['T']}, C={cfg['C']}, grid {grid} (forward + backward)\n")
        print("| GPUs | sequence-parallel s | single-device chunked s | max abs error |\n|---|---|---|---|")
        r = _run(_scan_worker, cfg, counts[-1], gpu)
        single = "OOM" if r["single_s"] == float("inf") else f"{r['single_s']:.3f}"
        print(f"| {counts[-1]} | {r['sp_s']:.3f} | {single} | {r['max_abs_err']:.2e} |\n", flush=True)

    if "job" not in skip:
        ray.shutdown()
        out = Path(tempfile.mkdtemp(prefix="mgpu-job-"))
        print(f"## Ray job on a local {counts[-1]}-GPU cluster: {ray_job(counts[-1], gpu, out)} "
              f"(MLflow store {out}/mlflow.db)")


if __name__ == "__main__":
    main()
