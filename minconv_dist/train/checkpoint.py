"""Checkpoints: DeepSpeed's own (sharded under ZeRO) plus what makes a restart exact.

Layout of one checkpoint directory (every rank writes its own files into a fresh local directory, then
Ray merges the ranks' uploads into one `checkpoint_*` directory of the run):

    ds/...               DeepSpeed engine: module, optimizer shards, LR scheduler   (all ranks)
    latest               DeepSpeed's tag pointer                                    (rank 0)
    rng_rank{r}.pt       python / numpy / torch RNG states of rank r                 (rank r)
    ema_rank{r}.pt       rank r's part of the EMA of the weights, plain tensors     (rank r, with optim.ema_decay)
    model.pt             the model file: spec + fp32 master weights (their EMA with  (rank 0)
                         optim.ema_decay), normaliser
                         included (minconv_dist.models.model_file: loads without DeepSpeed)
    config.yaml          the run's config, without storage_options (credentials)    (rank 0)
    position.json        epoch, step in epoch, global step, world size, MLflow run   (rank 0, written last)

Ray registers a checkpoint only after every rank's upload finished, and `is_complete` checks that all
the files above are there, so a half-written directory is never resumed from.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import torch
import yaml

from minconv_dist.data.store import redact_config
from minconv_dist.models import save_model_file

if TYPE_CHECKING:
    from minconv_dist.train.ema import WeightEMA

TAG = "ds"
POSITION = "position.json"


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _zero0_masters(optimizer: Any) -> dict[int, torch.Tensor]:
    """ZeRO-0 under bf16: DeepSpeed's FP16 optimizers keep an fp32 copy of each bf16 parameter, flat
    (FP16_Optimizer) or one tensor per parameter (FP16_UnfusedOptimizer). Keyed by id of the parameter."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from torch._utils import _unflatten_dense_tensors

    if not isinstance(optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)):
        return {}
    low = optimizer.fp16_groups
    if isinstance(optimizer, FP16_Optimizer):
        high = [_unflatten_dense_tensors(flat, group) for flat, group in zip(optimizer.fp32_groups_flat, low)]
    else:
        high = optimizer.fp32_groups
    return {id(p): master for group, masters in zip(low, high) for p, master in zip(group, masters)}


def master_weights(engine: Any, ema: WeightEMA | None = None) -> dict[str, torch.Tensor] | None:
    """The weights the optimizer updates, in fp32, as a full CPU state dict on rank 0 (None elsewhere); with
    `ema`, their EMA instead (an EMA run's exported model).

    Under bf16 the module holds bf16 copies; the fp32 masters live in the optimizer, partitioned across
    ranks under ZeRO. `safe_get_full_fp32_param` (DeepSpeed's API for this) gathers a ZeRO-1/2/3 master;
    at ZeRO-0 the bf16 wrapper holds whole fp32 copies; in fp32 the module's parameters are the masters.
    Collective under ZeRO: every rank must call it.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    zero0 = _zero0_masters(engine.optimizer)
    state, keep = {}, engine.global_rank == 0
    averages = None if ema is None else ema.full()  # collective when the EMA is sharded
    for i, (name, param) in enumerate(engine.module.named_parameters()):
        master = averages[i] if averages is not None else safe_get_full_fp32_param(param)  # collective under ZeRO
        if keep:
            state[name] = (zero0.get(id(param), param) if master is None else master).detach().float().cpu()
    if not keep:
        return None
    for name, buffer in engine.module.named_buffers():
        state[name] = buffer.detach().cpu().clone()
    return state


def save(engine: Any, directory: str | Path, *, rank: int, world_size: int, position: dict[str, Any],
         config: dict[str, Any], ema: WeightEMA | None = None) -> None:
    """Write this rank's part of a checkpoint into a local `directory` (collective: all ranks call it)."""
    directory = Path(directory)
    engine.save_checkpoint(str(directory), tag=TAG)
    weights = master_weights(engine, ema)
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
    if ema is not None:
        torch.save(ema.state_dict(), directory / f"ema_rank{rank}.pt")
    if rank == 0:
        save_model_file(directory / "model.pt", engine.module, state_dict=weights)
        (directory / "config.yaml").write_text(yaml.safe_dump(redact_config(config), sort_keys=False))
        (directory / POSITION).write_text(json.dumps({**position, "world_size": world_size}))


def restore(engine: Any, directory: str | Path, *, rank: int, ema: WeightEMA | None = None) -> dict[str, Any]:
    """Load engine, optimizer, scheduler, this rank's RNG states and its part of the `ema`; return the saved
    position."""
    directory = Path(directory)
    position = json.loads((directory / POSITION).read_text())
    if position["world_size"] != engine.world_size:
        raise RuntimeError(
            f"checkpoint {directory} was written by {position['world_size']} workers; this run has "
            f"{engine.world_size} (parallel.num_workers must match to resume a ZeRO checkpoint)"
        )
    load_path, _ = engine.load_checkpoint(str(directory), tag=TAG)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}/{TAG}")
    _set_rng_state(torch.load(directory / f"rng_rank{rank}.pt", weights_only=False))
    if ema is not None:
        ema.load_state_dict(torch.load(directory / f"ema_rank{rank}.pt", weights_only=True))
    return position


def is_complete(fs: fsspec.AbstractFileSystem, directory: str) -> bool:
    """True when every rank's files are present (see the module docstring)."""
    pos = f"{directory}/{POSITION}"
    if not fs.exists(pos):
        return False
    world = json.loads(fs.cat_file(pos))["world_size"]
    needed = ["latest", "model.pt", *(f"rng_rank{r}.pt" for r in range(world))]
    return all(fs.exists(f"{directory}/{name}") for name in needed)


def latest(run_dir: str) -> tuple[str, dict[str, Any]] | None:
    """(path, position) of the complete checkpoint with the highest global step under `run_dir`."""
    fs, root = fsspec.core.url_to_fs(run_dir)
    best = None
    for pos in fs.glob(f"{root}/*/{POSITION}"):
        directory = pos.rsplit("/", 1)[0]
        if not is_complete(fs, directory):
            continue
        position = json.loads(fs.cat_file(pos))
        if best is None or position["global_step"] > best[1]["global_step"]:
            best = (directory, position)
    if best is None:
        return None
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    path = best[0] if protocol in ("file", "local") else f"{protocol}://{best[0]}"
    return path, best[1]
