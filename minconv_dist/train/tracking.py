"""MLflow helpers of the driver: it opens the run (params, config), logs and registers the final model and sets
the run's status; rank 0 of the workers logs metrics and plots into the same run by id (`train/metric_logger.py`),
so no worker needs global MLflow state. Every call here is bounded (`http_limits`), so that a server that does
not answer costs seconds, not MLflow's default minutes of retries.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import numpy as np
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

import minconv_dist
from minconv_dist.data.store import redact_config
from minconv_dist.tracking_uri import tracking_uri
from minconv_dist.train.config import flatten

T = TypeVar("T")
STEP_TAG = "minconv.step"  # on a model version: the global step of the checkpoint it was logged from


@contextmanager
def http_limits(timeout_s: int) -> Iterator[None]:
    """MLflow's HTTP requests inside the block: `timeout_s` each and no retries (MLflow's defaults, 120 s and 7
    retries with backoff, take minutes to report a server that is down). MLflow reads them at each request."""
    limits = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    previous = {key: os.environ.get(key) for key in limits}
    os.environ.update(limits)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def ctrl_c_held() -> Iterator[None]:
    """A Ctrl-C during the block takes effect when it ends. A KeyboardInterrupt inside an MLflow call can stop
    a sqlite store's write mid-transaction: MLflow rolls its session back on an Exception, which KeyboardInterrupt
    is not, so the store stays locked for this process, and the KILLED that the interrupt should then write fails
    ("database is locked"). Only where Python's own handler is set, on the main thread (signals reach no other);
    elsewhere, and where SIGINT is ignored, a no-op."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    pressed: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if pressed:
            raise KeyboardInterrupt


def with_backoff(action: Callable[[], T], wait_s: float) -> T:
    """`action()`, tried again after 1, 2, 4, ... s while it raises and `wait_s` seconds have not passed; then
    its last error. A Ctrl-C takes effect between MLflow's calls, not inside one (`ctrl_c_held`): each try is
    bounded by `http_limits`, the waits between tries are not held."""
    end, pause = time.monotonic() + wait_s, 1.0
    while True:
        try:
            with ctrl_c_held():
                return action()
        except Exception:  # noqa: BLE001 - an MLflow server that does not answer raises many kinds
            left = end - time.monotonic()
            if left <= 0:
                raise
            time.sleep(min(pause, left))
            pause *= 2


def one_line(err: BaseException) -> str:
    """An error in one line. MLflow's HTTP errors carry the URL and urllib3's retry history: of those, the cause
    (`ConnectionRefusedError`, a read timeout, ...) is what says why."""
    text = " ".join(str(err).split())
    cause = re.search(r"Caused by (\w+)\(", text)
    if cause:
        reason = re.search(r"\[Errno -?\d+\] [^'\")]+|Read timed out", text)
        return f"{cause.group(1)}: {reason.group(0) if reason else 'no answer'}"
    text = f"{type(err).__name__}: {text}"
    return text if len(text) <= 200 else text[:197] + "..."


def resolve_uri(uri: str | None) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else a sqlite store `mlflow.db` in the working directory (absolute,
    because Ray workers run elsewhere)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def _artifact_root(uri: str) -> str | None:
    """For a local sqlite store, artifacts go next to it (absolute); servers choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def open_run(uri: str, experiment: str, run_name: str, config: dict[str, Any],
             tags: dict[str, str] | None = None) -> str:
    """Create the run with the config as params and as config.yaml, credentials removed, and `tags` (e.g. which
    loss weighting `train_loss` has). Returns the run id."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=_artifact_root(uri))
    run = client.create_run(exp_id, run_name=run_name, tags={"minconv.arch": config["model"]["arch"], **(tags or {})})
    try:
        safe = redact_config(config)
        params = {key: str(value) for key, value in flatten(safe).items()}
        keys = sorted(params)
        for i in range(0, len(keys), 100):
            client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, params[k]) for k in keys[i:i + 100]])
        client.log_text(run.info.run_id, yaml.safe_dump(safe, sort_keys=False), "config.yaml")
    except KeyboardInterrupt:  # the run exists: it must not stay RUNNING
        client.set_terminated(run.info.run_id, status="KILLED")
        raise
    return run.info.run_id


def set_status(uri: str, run_id: str, status: str) -> None:
    """RUNNING again (a resume), or the end: FINISHED, KILLED, FAILED."""
    client = MlflowClient(uri)
    if status == "RUNNING":
        client.update_run(run_id, status=status)
    else:
        client.set_terminated(run_id, status=status)


class PortableModel(torch.nn.Module):
    """The trained network, pickled as (spec, weights) and rebuilt with `build_model` on load, so a logged
    model survives changes to the model classes' private attributes. Forwards `forward` and `rollout`.

    `forward(x)` (MLflow's pyfunc input) takes one array [B, T, C + F, H, W]: the C prognostic channels, then the F
    forcing channels of the network (`network.forcings`; F = 0 for most models)."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, teacher_steps: int | None = None) -> torch.Tensor:
        c = self.network.in_channels
        forcings = x[:, :, c:] if self.network.forcings else None
        return self.network(x[:, :, :c], teacher_steps=teacher_steps, forcings=forcings)

    def rollout(self, context: torch.Tensor, steps: int, state: Any = None, forcings: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, Any]:
        return self.network.rollout(context, steps, state, forcings=forcings)

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.network.spec, "state_dict": self.network.state_dict()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from minconv_dist.models import build_model

        network = build_model(**state["spec"])
        network.load_state_dict(state["state_dict"])
        self.__init__(network.eval())


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """`logger` at ERROR for the block: mlflow.pytorch warns that a pickled model runs code when unpickled;
    our loader (`minconv_dist.evaluate.load_model`) reads the weights-only model file logged beside it."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def log_model(uri: str, run_id: str, model: torch.nn.Module, example: torch.Tensor,
              model_file: str | os.PathLike) -> tuple[str, str]:
    """Log `model` with an input example and signature; returns its (model URI, model id).

    Two forms travel together: the weights-only model file `model_file` (`extra_files/model.pt`, what
    `minconv_dist.evaluate.load_model` and jobs/forecast.py read with `torch.load(weights_only=True)`), and the
    pickled network for `mlflow.pytorch.load_model` (unpickling runs code: load it only from a store you trust;
    pickled because torch.export would freeze the batch size). The package's source travels with the model
    (`code_paths`), so it logs and loads whether or not minconv_dist is an installed distribution (under
    `ray job submit --working-dir` it is plain files). The normalisation statistics are in the weights."""
    model = PortableModel(model.eval())
    with torch.no_grad():
        output = model(example).numpy()
    signature = mlflow.models.infer_signature(example.numpy(), output)
    # the run made active: MLflow files a logged model under the active run's experiment (without one, under
    # the default experiment, whatever run_id says); leaving it ends the run FINISHED, as the caller's next step
    # (`train/sync.py`: metrics replayed first, registration after) does anyway
    with tracking_uri(uri), mlflow.start_run(run_id=run_id), _quiet("mlflow.pytorch"):
        info = mlflow.pytorch.log_model(
            model, name="model", serialization_format="pickle", input_example=example.numpy(),
            signature=signature, extra_files=[os.fspath(model_file)],
            metadata={"minconv_dist_version": minconv_dist.__version__},
            code_paths=[os.path.dirname(minconv_dist.__file__)],
            # stated, not inferred: inference re-imports the model in a subprocess (~20 s)
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
        )
    return info.model_uri, info.model_id


def register(uri: str, run_id: str, model_uri: str, model_id: str, name: str, step: int) -> str:
    """Register the logged model as a version of `name`; the version. Idempotent: a version of this run at this
    step (a retry after a reply that was lost) is returned as it is."""
    client = MlflowClient(uri)
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if version.tags.get(STEP_TAG) == str(step):
            return str(version.version)
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    with tracking_uri(uri):  # the registry looks the logged model up through the process-wide URI
        version = client.create_model_version(name, source=model_uri, run_id=run_id, model_id=model_id,
                                              tags={STEP_TAG: str(step)})
    return str(version.version)
