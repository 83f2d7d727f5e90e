"""Checkpoints: DeepSpeed's own (sharded under ZeRO) plus what makes a restart exact.

Layout of one checkpoint directory (every rank writes its own files into a fresh local directory, then
Ray merges the ranks' uploads into one `checkpoint_*` directory of the run):

    ds/...               DeepSpeed engine: module, optimizer shards, LR scheduler   (all ranks)
    latest               DeepSpeed's tag pointer                                    (rank 0)
    rng_rank{r}.pt       python / numpy / torch RNG states of rank r                 (rank r)
    model.pt             the model file: spec, consolidated fp32 weights, stats (rank 0)
                         (minconv_dist.models.io: loads without DeepSpeed; the forecast job reads it)
    stats.json           normalisation stats                                        (rank 0)
    config.yaml          the run's config, without storage_options (credentials)    (rank 0)
    position.json        epoch, step in epoch, global step, world size, MLflow run   (rank 0, written last)

Ray registers a checkpoint only after every rank's upload finished, and `is_complete` checks that all
the files above are there, so a half-written directory is never resumed from.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
import yaml

from minconv_dist.models import save_checkpoint

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


def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """Full fp32 CPU weights on rank 0 (None elsewhere). Collective under ZeRO-3: every rank must call it."""
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if engine.global_rank != 0:
        return None
    return {k: v.detach().float().cpu().clone() for k, v in state.items()}


def save(engine: Any, directory: str | Path, *, rank: int, world_size: int, position: dict[str, Any],
         stats_json: str, config: dict[str, Any]) -> None:
    """Write this rank's part of a checkpoint into a local `directory` (collective: all ranks call it)."""
    directory = Path(directory)
    engine.save_checkpoint(str(directory), tag=TAG)
    weights = consolidated_state_dict(engine)
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
    if rank == 0:
        save_checkpoint(directory / "model.pt", engine.module, json.loads(stats_json), state_dict=weights)
        (directory / "stats.json").write_text(stats_json)
        safe = {**config, "data": {k: v for k, v in config["data"].items() if k != "storage_options"}}
        (directory / "config.yaml").write_text(yaml.safe_dump(safe, sort_keys=False))  # no credentials
        (directory / POSITION).write_text(json.dumps({**position, "world_size": world_size}))


def restore(engine: Any, directory: str | Path, *, rank: int) -> dict[str, Any]:
    """Load engine, optimizer, scheduler and this rank's RNG states; return the saved position."""
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
    return position


def is_complete(fs: fsspec.AbstractFileSystem, directory: str) -> bool:
    """True when every rank's files are present (see the module docstring)."""
    pos = f"{directory}/{POSITION}"
    if not fs.exists(pos):
        return False
    world = json.loads(fs.cat_file(pos))["world_size"]
    needed = ["latest", "model.pt", "stats.json", *(f"rng_rank{r}.pt" for r in range(world))]
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
