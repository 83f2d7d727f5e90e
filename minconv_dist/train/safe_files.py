"""Reading checkpoint files without running code from them. Checkpoints live on shared storage that others can
write to, and a pickle runs whatever its `__reduce__` names when unpickled.

Every `.pt` file of a checkpoint is read with `torch.load(weights_only=True)` (tensors, containers, numbers and
strings only) plus `DEEPSPEED_CLASSES`, the data-only classes DeepSpeed's own files hold, and only after its
bytes matched its manifest entry. DeepSpeed reads and writes its files through its engine's checkpoint engine,
whose stock version unpickles anything: `SafeFiles` replaces it. A refused file is a `CheckpointError` naming it.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import IO, Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from minconv_dist.train.manifest import CheckpointError, atomic, check_file

# What DeepSpeed 0.19's files hold besides tensors and containers, found by saving ZeRO 0-3 in fp32 and bf16
# (tests/test_checkpoint_files.py loads each): a plain object, an enum and a named tuple, rebuilt from their
# values without calling any other code.
DEEPSPEED_CLASSES = [LossScaler, ZeroStageEnum, fragment_address]


def _reason(err: Exception) -> str:
    """The one informative sentence of torch's long weights-only message."""
    text = str(err).split("WeightsUnpickler error: ", 1)[-1].strip()
    return text.splitlines()[0].split(". ", 1)[0] if text else type(err).__name__


def torch_load(source: str | Path | IO[bytes], name: str, map_location: Any = "cpu") -> Any:
    """`torch.load` of data only (tensors on `map_location`: "meta" reads no tensor bytes); `name` says which
    file in an error."""
    try:
        with torch.serialization.safe_globals(DEEPSPEED_CLASSES):
            return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{name} is not a data-only file ({_reason(err)}); refused to load it") from None
    except (RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{name} is not a readable torch file ({_reason(err)})") from None


class SafeFiles(CheckpointEngine):
    """DeepSpeed's file I/O for our checkpoints. `save`: a temporary name, fsync, rename. `load`: only a file of
    `root` that its manifest lists (`files`), after its size and sha256 matched, weights-only; `label` names the
    checkpoint in errors."""

    def __init__(self, root: Path | None = None, files: dict[str, dict[str, Any]] | None = None, label: str = ""):
        super().__init__()
        self.name, self.root, self.files, self.label = "minconv_dist.SafeFiles", root, files or {}, label

    def create(self, info: Any) -> None:
        pass

    def commit(self, info: Any) -> bool:
        return True

    def save(self, state_dict: Any, path: str) -> None:
        with atomic(Path(path)) as tmp:
            torch.save(state_dict, tmp)

    def load(self, path: str | Path, map_location: Any = None) -> Any:
        if self.root is None:
            raise CheckpointError(f"{path}: no manifest to check it against; refused to load it")
        name = Path(path).relative_to(self.root).as_posix()
        where = f"{self.label}: {name}" if self.label else name
        if name not in self.files:
            raise CheckpointError(f"{where} is not in the checkpoint's manifests; refused to load it")
        with open(path, "rb") as f:
            try:
                check_file(f, name, self.files[name])
            except CheckpointError as err:
                raise CheckpointError(f"{self.label}: {err}" if self.label else str(err)) from None
            return torch_load(f, where, map_location)
