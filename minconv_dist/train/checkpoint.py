"""Checkpoints: DeepSpeed's own (sharded under ZeRO) plus what makes a restart exact, each one checkable.

Layout of one checkpoint directory `<run.storage_path>/<run>/checkpoint_*` (every rank writes its own files into a
fresh local directory, then Ray uploads the ranks' directories into one):

    ds/...                 DeepSpeed engine: module, optimizer shards, LR scheduler   (all ranks)
    latest, zero_to_*.py   DeepSpeed's tag pointer and conversion scripts (never run) (rank 0)
    rng_rank{r}.pt         python / numpy / torch RNG states of rank r, as tensors     (rank r)
    ema_rank{r}.pt         rank r's part of the EMA of the weights (optim.ema_decay)   (rank r)
    carry_rank{r}.pt       the state rank r's streams carry to their next windows       (rank r)
                           (data.stateful; train/carry.py)
    model.pt               the model file: spec + fp32 master weights (their EMA with  (rank 0)
                           optim.ema_decay), normaliser included
                           (minconv_dist.models.model_file: loads without DeepSpeed)
    config.yaml            the run's config, without storage_options (credentials)    (rank 0)
    position.json          epoch, step in epoch, global step, world size, MLflow run   (rank 0)
    manifest_rank{r}.json  size and sha256 of every file above that rank r wrote       (rank r, last)

Every file is written under a temporary name, fsynced and renamed; each rank's manifest lists its local folder
after all its writes (a file added to `save` is covered without more code). What that guarantees:
- complete (`manifest.index`): position.json names the world size and every rank's manifest is there, parses and
  matches the sizes of the files on storage, whatever order Ray uploaded them in (S3 included). A full disk's
  0-byte files, a short file or unparsable JSON: incomplete, never a crash.
- verified (`manifest.verify`): complete, and every file's sha256 matches. `latest` returns only verified
  checkpoints, the newest first, and says which newer ones it skipped and why; `--resume`, a worker restarted
  by Ray and the "last good checkpoint" of an error all go through it.
- loaded safely (`restore`): each file is checked against its manifest entry as it is read, and read with
  `torch.load(weights_only=True)`, DeepSpeed's too (`safe_files.SafeFiles`); a file that holds more than data
  is refused, naming it.
- a write that fails (a full disk: ENOSPC, any OSError) is a `StorageError`: the run ends at once, in one line
  naming the storage and its free space, and no checkpoint before it is touched.
"""
from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import torch
import yaml

from minconv_dist.data.store import redact_config
from minconv_dist.models import save_model_file
from minconv_dist.train import manifest
from minconv_dist.train.manifest import POSITION, CheckpointError, write_atomic

if TYPE_CHECKING:
    from minconv_dist.train.carry import Carry
    from minconv_dist.train.ema import WeightEMA

TAG = "ds"
REQUIRED = ("model.pt", "config.yaml")  # besides position.json and every rank's rng_rank{r}.pt


class StorageError(RuntimeError):
    """A checkpoint could not be written (a full disk, a storage error): retrying cannot help."""


def _rng_state() -> dict[str, Any]:
    """Lists, numbers and tensors only, so that `torch.load(weights_only=True)` reads them back."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
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
         config: dict[str, Any], ema: WeightEMA | None = None, carry: Carry | None = None) -> None:
    """Write this rank's part of a checkpoint into a local `directory` (collective: all ranks call it); its
    manifest last."""
    from minconv_dist.train.safe_files import SafeFiles

    directory = Path(directory)
    engine.checkpoint_engine = SafeFiles()  # DeepSpeed's files too: a temporary name, fsync, rename
    engine.save_checkpoint(str(directory), tag=TAG)
    weights = master_weights(engine, ema)
    with manifest.atomic(directory / f"rng_rank{rank}.pt") as tmp:
        torch.save(_rng_state(), tmp)
    if ema is not None:
        with manifest.atomic(directory / f"ema_rank{rank}.pt") as tmp:
            torch.save(ema.state_dict(), tmp)
    if carry is not None:
        with manifest.atomic(directory / f"carry_rank{rank}.pt") as tmp:
            torch.save(carry.state_dict(), tmp)
    if rank == 0:
        save_model_file(directory / "model.pt", engine.module, state_dict=weights)
        write_atomic(directory / "config.yaml", yaml.safe_dump(redact_config(config), sort_keys=False).encode())
        write_atomic(directory / POSITION, json.dumps({**position, "world_size": world_size}).encode())
    manifest.write(directory, rank)


def restore(engine: Any, directory: str | Path, *, rank: int, label: str, ema: WeightEMA | None = None,
            carry: Carry | None = None) -> dict[str, Any]:
    """Load engine, optimizer, scheduler, this rank's RNG states, its part of the `ema` and its `carry` from the
    local copy `directory` of checkpoint `label`, each file checked against the manifests as it is read; return the
    saved position."""
    from minconv_dist.train.safe_files import SafeFiles

    directory = Path(directory)
    try:
        found = manifest.index(fsspec.filesystem("file"), str(directory), REQUIRED)
    except CheckpointError as err:
        raise CheckpointError(f"{label}: {err}") from None
    files = SafeFiles(directory, found.files, label)
    with open(directory / POSITION, "rb") as f:
        manifest.check_file(f, POSITION, found.files[POSITION])
        position = json.load(f)
    if position["world_size"] != engine.world_size:
        raise CheckpointError(
            f"{label} was written by {position['world_size']} workers; this run has {engine.world_size} "
            "(parallel.num_workers must match to resume a ZeRO checkpoint)")
    engine.checkpoint_engine = files
    load_path, _ = engine.load_checkpoint(str(directory), tag=TAG)
    if load_path is None:
        raise CheckpointError(f"{label}: DeepSpeed found no checkpoint under {TAG}/")
    _set_rng_state(files.load(directory / f"rng_rank{rank}.pt"))
    if ema is not None:
        ema.load_state_dict(files.load(directory / f"ema_rank{rank}.pt"))
    if carry is not None:
        carry.load_state_dict(files.load(directory / f"carry_rank{rank}.pt"), engine.device)
    return position


def probe(path: str) -> None:
    """Refuse the checkpoint at `path` if any of its .pt files holds more than data, naming the file, before
    anything is loaded: each is unpickled weights-only with its tensors on the meta device (no tensor bytes are
    read)."""
    from minconv_dist.train.safe_files import torch_load

    fs, root = fsspec.core.url_to_fs(path)
    label = PurePosixPath(root).name
    try:
        files = manifest.index(fs, root, REQUIRED).files
    except CheckpointError as err:
        raise CheckpointError(f"{label}: {err}") from None
    for name in files:
        if name.endswith(".pt"):
            with fs.open(f"{root}/{name}", "rb") as f:
                torch_load(f, f"{label}: {name}", map_location="meta")


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def latest(run_dir: str, on_skip: Callable[[str], None] | None = None) -> tuple[str, dict[str, Any]] | None:
    """(path, position) of the verified checkpoint with the highest global step under `run_dir`; `on_skip` hears
    one line per checkpoint passed over on the way, naming it and why."""
    fs, root = fsspec.core.url_to_fs(run_dir)
    fs.invalidate_cache()  # an object store's listing cache would hide the checkpoints written since
    ordered = []
    for directory, info in fs.glob(f"{root}/checkpoint_*", detail=True).items():  # Ray's own files share the prefix
        if info["type"] != "directory":
            continue
        try:
            ordered.append((manifest.index(fs, directory, REQUIRED).position["global_step"], directory))
        except CheckpointError as err:
            if on_skip:
                on_skip(f"skipped {PurePosixPath(directory).name}: {err}")
    for _, directory in sorted(ordered, reverse=True):
        try:
            return _url(fs, directory), manifest.verify(fs, directory, REQUIRED).position
        except CheckpointError as err:
            if on_skip:
                on_skip(f"skipped {PurePosixPath(directory).name}: {err}")
    return None


def usable(candidate: str | None, run_dir: str) -> str | None:
    """What a worker group continues from: the newest checkpoint under `run_dir` that verifies (None: there is none,
    a new run), said in one line when it is not `candidate`, the one Ray hands a restarted group (or --resume's).
    Either `candidate` does not verify, or Ray is behind: it registers a checkpoint only once it has polled every
    rank's report of it, so a worker lost just after a checkpoint leaves Ray on the one before (or on none), which
    would redo steps for nothing."""
    skipped: list[str] = []
    found = latest(run_dir, on_skip=skipped.append)
    name = PurePosixPath(fsspec.core.url_to_fs(candidate)[1]).name if candidate else None
    problem = next((line.split(": ", 1)[1] for line in skipped if line.startswith(f"skipped {name}: ")), None)
    if found is None:
        if candidate:
            raise CheckpointError(f"{name} cannot be restored ({problem}) and no other checkpoint under {run_dir} "
                                  "verifies")
        return None
    if PurePosixPath(found[0]).name == name:
        return candidate
    chosen = f"{PurePosixPath(found[0]).name} (step {found[1]['global_step']})"
    print(f"[minconv] skipped {name}: {problem}; restoring {chosen}" if problem else
          f"[minconv] restoring {chosen}: the last checkpoint Ray registered is {name or 'none'} (a worker was lost "
          "before Ray took every rank's report of the newer one)", flush=True)
    return found[0]


def _free(path: str) -> str:
    if "://" in path:
        return "free space unknown"
    existing = Path(path)
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    return f"{free / 2**30:.1f} GiB free" if free >= 2**30 else f"{free / 2**20:.1f} MiB free"


def write_failure(err: OSError, run_dir: str, step: int) -> StorageError:
    """One line for a checkpoint that could not be written: the error, and the free space where it was going
    (the run's storage, and the local folder the error names if it is elsewhere)."""
    where = f"run.storage_path {run_dir}: {_free(run_dir)}"
    failed = str(getattr(err, "filename", None) or "")
    if failed.startswith("/") and not failed.startswith(run_dir):
        where += f"; {Path(failed).parent}: {_free(failed)}"
    return StorageError(f"checkpoint of step {step} not written: {err} ({where})")
