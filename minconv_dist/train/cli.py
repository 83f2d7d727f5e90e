"""The command line shared by the training jobs: a YAML file, `--set key=value` overrides and a few
shortcut flags, all mapped onto the one `TrainConfig` (whose dataclass defaults are the defaults)."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from minconv_dist.train.config import ConfigError, load_config
from minconv_dist.train.local_ray import LOCAL_ONLY
from minconv_dist.train.resume import RunFinished, resume_config

# Ray Train 2.60 wraps print() in its workers and the driver then shows every worker line twice (the print
# and its logger's copy); plain print: each line once. Ray Train passes this variable on to its workers.
WORKER_PRINT = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# What a job prints: our own lines. Of the workers' output the driver shows only lines that start with
# [minconv], without Ray's "(RayTrainWorker pid=...)" prefix (Ray's log settings, read when Ray is imported; Ray
# Train's per-worker checkpoint/report lines, DeepSpeed's and Ray's core-worker messages stay in Ray's logs,
# /tmp/ray/session_*/logs), and MLflow says only warnings, without progress bars. `--debug` shows everything.
QUIET = {"RAY_DEDUP_LOGS_SKIP_REGEX": r"^(?!\[minconv\])", "RAY_DISABLE_WORKER_LOG_PREFIX": "1",
         "MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}

# flag -> config key; the value is passed through the same YAML parsing as --set
SHORTCUTS = {
    "--url": ("data.url", "zarr store URL (local, s3://, gs://); default: {store}"),
    "--channels": ("data.channels", "channels, e.g. '[z]' or '[geopotential@500, temperature@850]'"),
    "--workers": ("parallel.num_workers", "number of Ray Train workers"),
    "--gpu": ("parallel.use_gpu", "true: one GPU per worker (bf16)"),
    "--zero-stage": ("parallel.zero_stage", "DeepSpeed ZeRO stage 0-3"),
    "--arch": ("model.arch", "minconvgru | minconvlstm | minconvexplstm | convlstm | convgru"),
    "--hidden-size": ("model.hidden_size", "channels of every layer, e.g. 24"),
    "--layers": ("model.layers", "number of recurrent layers, e.g. 3"),
    "--sequence-length": ("data.sequence_length", "T: frames predicted per window"),
    "--teacher-steps": ("data.teacher_steps", "k: teacher-forced frames (T - k closed loop)"),
    "--epochs": ("optim.epochs", "training epochs"),
    "--name": ("run.name", "run name (directory under run.storage_path, MLflow run name)"),
}


def main(description: str, preset: Path | None = None, argv: list[str] | None = None,
         default_url: Callable[[], str] | None = None,
         store: str = "the embedded synthetic ERA5-like z500 store (2015-2016 hourly, written on first use)") -> int:
    """Parse, train, print where the results are. `preset` is the job's own YAML over the defaults;
    `default_url` makes the job's embedded store when no data.url is given (else fit's synthetic ERA5), and
    `store` says in --help what that store is."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Every config key (see docs/training.md) can be set with --set "
                                            "section.key=value, e.g. --set optim.lr=5e-4 --set data.batch_size=8.")
    parser.add_argument("--config", help="YAML file with config sections (model, data, optim, parallel, "
                                         "checkpoint, tracking, run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key; repeatable")
    parser.add_argument("--resume", metavar="RUN", help="continue run RUN (a name under run.storage_path, or "
                                                        "its directory) from its newest verified checkpoint")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (else: one line), and "
                                                            "Ray's, DeepSpeed's and MLflow's own log lines")
    for flag, (key, text) in SHORTCUTS.items():
        parser.add_argument(flag, dest=key, metavar="VALUE", help=f"{text.format(store=store)} (= --set {key}=VALUE)")
    args = parser.parse_args(argv)
    local = {} if "RAY_ADDRESS" in os.environ else LOCAL_ONLY  # a Ray of the job's own: on loopback only
    for key, value in {**WORKER_PRINT, **local, **({} if args.debug else QUIET)}.items():
        os.environ.setdefault(key, value)
    from minconv_dist.train.head import HeadLost
    from minconv_dist.train.meter import NonFiniteLossError
    from minconv_dist.train.trainer import Interrupted, TrainingError, fit  # imports Ray (and DeepSpeed, torch)

    shortcuts = [f"{key}={getattr(args, key)}" for _, (key, _) in SHORTCUTS.items() if getattr(args, key) is not None]
    try:
        if args.resume:  # the run's saved plan, with only the changes a resume may make
            cfg = resume_config(args.resume, args.config, shortcuts + args.overrides)
        else:
            cfg = load_config(args.config, shortcuts + args.overrides, preset=preset)
        if cfg.data.url is None and default_url is not None:
            cfg.data.url = default_url()
        fit(cfg, resume=args.resume)
    except RunFinished as done:
        print(done)
        return 0
    except Interrupted as stop:
        print(f"\n{stop}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the MLflow run existed: nothing to continue
        print("\ninterrupted before training started", file=sys.stderr)
        return 130
    except (ConfigError, TrainingError, NonFiniteLossError, HeadLost) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        if isinstance(err, HeadLost):  # Ray's client would hang the exit for a minute, then abort the process
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 2 if isinstance(err, ConfigError) else 1
    return 0
