"""Bring a run's MLflow record up to date with what training left on this machine: the metrics and plots rank 0
spooled while the server did not answer (`train/spool.py`), the final model to log and register, and the run's
final status. `fit` does it at the end, retrying with backoff for `tracking.wait_s`; what is left after that (the
server still down) is written to the spool's `sync.json`, and this command finishes it once the server answers:

    python -m minconv_dist.train.sync RUN_DIR [--tracking-uri URI]

RUN_DIR is the run directory (`run.storage_path/<run name>`); for an s3:// or gs:// one, run it on the machine
that spooled (`spool_dir` says where). Run it after the job has ended. Doing it twice is harmless: every step
(replay, logging the model, registering it, the status) is recorded as done, or checked on the server, first.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import fsspec
import torch
from mlflow.tracking import MlflowClient

from minconv_dist.data.store import redact
from minconv_dist.errors import run_job
from minconv_dist.models import load_model_file
from minconv_dist.train import tracking
from minconv_dist.train.spool import TARGET, Spool, load_target, spool_dir


def sync_command(run_dir: str) -> str:
    """The command that finishes the sync of `run_dir`, quoted for a POSIX shell."""
    return shlex.join(["python", "-m", "minconv_dist.train.sync", run_dir])


def plan(status: str, checkpoint: str | None = None, step: int = 0, registered_model: str = "",
         example: tuple[int, list[int]] = (1, [])) -> dict[str, Any]:
    """What ending a run means: its final `status`, and the model of `checkpoint` to log and register as
    `registered_model` ("": log only); `example` = (frames, grid) of the input example that documents its
    signature. Each step done is added to it."""
    finish: dict[str, Any] = {"status": status}
    if checkpoint is not None:
        finish["model"] = {"checkpoint": checkpoint, "step": step, "name": registered_model,
                           "frames": example[0], "grid": list(example[1])}
    return finish


def _log_checkpoint_model(uri: str, run_id: str, model: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as local:
        path = Path(local) / "model.pt"
        fs, root = fsspec.core.url_to_fs(model["checkpoint"])
        fs.get(f"{root.rstrip('/')}/model.pt", str(path))
        network = load_model_file(path)
        shape = (1, model["frames"], network.in_channels, *model["grid"])
        forcings = torch.zeros(*shape[:2], len(network.forcings), *shape[3:])  # MLflow's one input: [B, T, C + F, H, W]
        example = torch.cat([network.normalizer.denormalize(torch.zeros(shape)), forcings], dim=2)
        model["model_uri"], model["model_id"] = tracking.log_model(uri, run_id, network, example, path)


def _attempt(spool: Spool, finish: dict[str, Any] | None) -> None:
    """One try at everything; each step done is recorded in `finish`, so a retry starts where this one failed."""
    uri, run_id = spool.uri, spool.server_run_id
    spool.replay(MlflowClient(uri))
    if finish is None:
        return
    model = finish.get("model")
    if model and "model_uri" not in model:
        _log_checkpoint_model(uri, run_id, model)
    if model and model["name"] and "version" not in model:
        model["version"] = tracking.register(uri, run_id, model["model_uri"], model["model_id"], model["name"],
                                             model["step"])
    tracking.set_status(uri, run_id, finish["status"])


def finish_run(spool: Spool, finish: dict[str, Any] | None, *, timeout_s: int, wait_s: float) -> str | None:
    """Replay the spool and do `finish` (see `plan`; None: replay only), retrying with backoff for `wait_s`.
    Returns None when all is done, else what is left, in words; that is then saved in `sync.json`."""
    try:
        with tracking.http_limits(timeout_s):
            tracking.with_backoff(lambda: _attempt(spool, finish), wait_s)
    except Exception as err:  # noqa: BLE001 - the server's many ways of not answering
        spool.save_target(finish or {})
        return f"{left(spool, finish)} (MLflow at {redact(spool.uri)}: {tracking.one_line(err)})"
    (spool.directory / TARGET).unlink(missing_ok=True)  # synced: what the spool holds is on the server
    return None


def left(spool: Spool, finish: dict[str, Any] | None) -> str:
    """What the server does not have yet, in words."""
    parts = []
    if segments := spool.pending():
        parts.append(f"metrics and plots of {len(segments)} outage(s)")
    model = (finish or {}).get("model")
    if model and "model_uri" not in model:
        parts.append("the model")
    if model and model["name"] and "version" not in model:
        parts.append(f"its registration as {model['name']}")
    if finish:
        parts.append(f"the run's status {finish['status']}")
    return ", ".join(parts) or "nothing"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minconv_dist.train.sync",
                                description="Bring a run's MLflow record up to date once the server answers: the "
                                            "metrics and plots kept while it did not, the model to log and "
                                            "register, the run's final status (docs/training.md, \"Tracking "
                                            "outages\").", epilog="--debug shows the traceback of an error.")
    p.add_argument("run_dir", help="the run directory (run.storage_path/<run name>), or its mlflow-spool folder")
    p.add_argument("--tracking-uri", help="the MLflow server (default: the one the run used, as sync.json says)")
    p.add_argument("--timeout-s", type=int, default=10, help="seconds one MLflow request may take")
    p.add_argument("--wait-s", type=float, default=0.0, help="retry with backoff this long while it fails")
    return p


def main(argv: list[str] | None = None) -> str:
    args = parser().parse_args(argv)
    directory = Path(args.run_dir)
    if not (directory / TARGET).exists():
        directory = spool_dir(args.run_dir.rstrip("/"))
    if not (directory / TARGET).exists():
        if not fsspec.core.url_to_fs(args.run_dir)[0].exists(args.run_dir):
            raise FileNotFoundError(f"{args.run_dir}: no such run directory")
        print(f"[minconv] nothing to sync in {args.run_dir}: MLflow has everything ({directory} holds no {TARGET})")
        return ""
    target = load_target(directory)
    spool = Spool(directory, args.tracking_uri or target["uri"], target["run_id"])
    finish = target.get("finish")
    problem = finish_run(spool, finish, timeout_s=args.timeout_s, wait_s=args.wait_s)
    if problem is not None:
        print(f"MLflow run {spool.server_run_id} not synced, still left: {problem}; try again when it answers",
              file=sys.stderr)
        raise SystemExit(1)
    version = ((finish or {}).get("model") or {}).get("version")
    registered = f"; model {finish['model']['name']} version {version}" if version else ""
    status = f"; status {finish['status']}" if finish else ""
    print(f"[minconv] synced MLflow run {spool.server_run_id} at {redact(spool.uri)}{status}{registered}")
    return spool.server_run_id


if __name__ == "__main__":
    sys.exit(run_job(main))
