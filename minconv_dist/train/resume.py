"""A resume continues the saved plan. The run's newest verified checkpoint holds its config.yaml; a resume
starts from it, and may change only what cannot break exactness: where and how often it reports, how
failures are retried, when to stop, and more epochs when asked for. Anything else is refused, naming the
key, before Ray starts; so is resuming a run that has already finished its plan."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec
import yaml

from minconv_dist.data.store import redact_config
from minconv_dist.train import checkpoint
from minconv_dist.train.config import ConfigError, TrainConfig, build_config, explicit_values, flatten

# Keys (or sections, ending in ".") a resume may change.
MAY_CHANGE = ("tracking.", "data.storage_options", "data.reader", "data.bounds", "run.name", "run.storage_path",
              "run.stop_after_steps", "parallel.max_failures", "parallel.allow_autoscale", "parallel.placement",
              "parallel.worker_resources", "parallel.cpus_per_worker", "parallel.gpus_per_worker", "checkpoint.keep", "checkpoint.preemption_grace_s", "optim.epochs")


class RunFinished(Exception):
    """The run has finished its plan; nothing to resume (ask for more epochs to train on)."""


def run_dir(resume: str, storage_path: str) -> str:
    """`resume` is a run name under `storage_path`, or a run directory."""
    if "/" in resume:
        return resume.rstrip("/")
    storage = storage_path if "://" in storage_path else str(Path(storage_path).resolve())
    return f"{storage.rstrip('/')}/{resume}"


def saved_plan(directory: str) -> tuple[str, dict[str, Any], dict[str, Any], list[str]]:
    """(checkpoint path, position, config) of the run's newest verified checkpoint, and a line for each newer
    checkpoint passed over (checkpoint.latest)."""
    skipped: list[str] = []
    found = checkpoint.latest(directory, on_skip=skipped.append)
    if found is None:
        why = f" ({'; '.join(skipped)})" if skipped else ""
        raise ConfigError(f"--resume: no verified checkpoint under {directory}{why}")
    path, position = found
    with fsspec.open(f"{path}/config.yaml", "r") as f:
        return path, position, yaml.safe_load(f), skipped


def check_plan(saved: dict[str, Any], cfg: TrainConfig, name: str) -> None:
    """Refuse a config that departs from the saved plan, naming the first key that does."""
    old, new = flatten(saved), flatten(redact_config(cfg.to_dict()))
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key) or key.startswith(MAY_CHANGE) and key != "optim.epochs":
            continue
        if key == "optim.epochs" and new[key] >= old[key]:
            continue
        raise ConfigError(
            f"--resume {name}: {key} was {old.get(key)!r} in the run and would be {new.get(key)!r}; a resume "
            f"continues the saved plan (it may change only {', '.join(MAY_CHANGE)} (more epochs))")


def check_unfinished(saved: dict[str, Any], position: dict[str, Any], cfg: TrainConfig, name: str) -> None:
    """Refuse to resume a run that finished its plan, unless more epochs are asked for."""
    if position.get("finished") and cfg.optim.epochs == saved["optim"]["epochs"]:
        raise RunFinished(f"run {name} is finished (step {position['global_step']}); nothing to resume. To train "
                          f"on, ask for more epochs: --resume {name} --set optim.epochs={cfg.optim.epochs + 1}")


def resume_config(resume: str, path: str | Path | None, overrides: list[str]) -> TrainConfig:
    """The saved config of run `resume`, with the changes asked for by `path` and `overrides` on top."""
    asked = explicit_values(path, overrides)
    storage = asked.get("run", {}).get("storage_path", TrainConfig().run.storage_path)
    _, _, saved, _ = saved_plan(run_dir(resume, storage))
    cfg = build_config(saved, asked)
    check_plan(saved, cfg, resume)
    return cfg
