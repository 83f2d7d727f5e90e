"""The DeepSpeed engine around a model: its config, optimizer and learning-rate schedule."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch

from minconv_dist.train.config import TrainConfig


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to `min_lr_ratio`, over optimizer steps."""
    warm, floor = cfg.optim.warmup_steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# DeepSpeed's default communication buckets (elements): sized for LLMs, they dominate the memory of our models
DEFAULT_BUCKET = 500_000_000


def bucket_size(model: torch.nn.Module) -> int:
    """ZeRO's reduce / all-gather / ZeRO-3 prefetch bucket, in elements: an eighth of the model, at least its
    largest tensor (DeepSpeed gathers a tensor whole), at most DeepSpeed's default. The default 5e8 bf16
    elements (1 GB per bucket) would outweigh what ZeRO saves on a model of tens of millions of parameters."""
    sizes = [p.numel() for p in model.parameters()]
    return int(min(DEFAULT_BUCKET, max(max(sizes), sum(sizes) // 8)))


Precision = Literal["fp32", "bf16", "bf16-mixed"]


def resolve_precision(cfg: TrainConfig, device: torch.device) -> Precision:
    """`parallel.precision`, with auto made concrete: bf16-mixed on a GPU, fp32 elsewhere (gloo on CPUs).

    bf16-mixed (fp32 weights, bf16 compute under autocast) rather than bf16 weights: at ZeRO-0 DeepSpeed wraps a
    torch optimizer over bf16 weights in its fp16 optimizer, which reads an overflow flag on the host for each
    parameter every step (16 of the 23 waits of a z500-size step, docs/benchmarks.md) and accumulates gradients
    in bf16; and fp32 weights, gradients and Adam moments take 16 bytes a parameter against bf16's 18-20."""
    if cfg.parallel.precision != "auto":
        return cfg.parallel.precision
    return "bf16-mixed" if device.type == "cuda" else "fp32"


def deepspeed_config(cfg: TrainConfig, precision: Precision, bucket: int = DEFAULT_BUCKET) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.zero_stage:
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if cfg.parallel.zero_stage in (1, 2):
        # Copying each gradient into the reduce bucket as it is made (the default) costs a hook call per parameter
        # on the host: 0.67 -> 0.82 of the plain step at ZeRO-1, the z500 size (docs/benchmarks.md). It saves
        # fragmentation, which models of this size do not feel.
        zero.update(contiguous_gradients=False)
    if cfg.parallel.zero_stage == 3:  # gathered parameters and the optimizer's fp32 working set: one bucket
        zero.update(stage3_prefetch_bucket_size=bucket, stage3_max_live_parameters=bucket,
                    stage3_max_reuse_distance=bucket, sub_group_size=bucket)
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "torch_autocast": {"enabled": precision == "bf16-mixed", "dtype": "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def build_engine(cfg: TrainConfig, model: torch.nn.Module, total_steps: int, device: torch.device) -> Any:
    """AdamW (torch's, fused on a GPU: DeepSpeed would JIT-build its own) with the warm-up + cosine schedule,
    wrapped by DeepSpeed per `cfg.parallel`: the ZeRO stage, and the precision on `device` (bf16: bf16 weights
    with fp32 masters in the optimizer; bf16-mixed: fp32 weights under autocast)."""
    import deepspeed

    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                  fused=True if device.type == "cuda" else None)
    optimizer_steps = max(1, total_steps // o.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, optimizer_steps))
    config = deepspeed_config(cfg, resolve_precision(cfg, device), bucket_size(model))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine
