"""MLflow helpers. The driver opens the run (params, config) and logs the final model; rank 0 of
the workers logs metrics and plots into the same run by id, so no worker needs global MLflow state.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import yaml
from matplotlib.figure import Figure
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

import minconv_dist
from minconv_dist.data.store import redact_config
from minconv_dist.train.config import flatten


def resolve_uri(uri: str | None) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else a sqlite store `mlflow.db` in the working directory (absolute,
    because Ray workers run elsewhere)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def _artifact_root(uri: str) -> str | None:
    """For a local sqlite store, artifacts go next to it (absolute); servers choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def open_run(uri: str, experiment: str, run_name: str, config: dict[str, Any]) -> str:
    """Create the run with the config as params and as config.yaml, credentials removed. Returns the run id."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=_artifact_root(uri))
    run = client.create_run(exp_id, run_name=run_name, tags={"minconv.arch": config["model"]["arch"]})
    safe = redact_config(config)
    params = {key: str(value) for key, value in flatten(safe).items()}
    keys = sorted(params)
    for i in range(0, len(keys), 100):
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, params[k]) for k in keys[i:i + 100]])
    client.log_text(run.info.run_id, yaml.safe_dump(safe, sort_keys=False), "config.yaml")
    return run.info.run_id


class MetricLogger:
    """Rank 0's handle on the run: batched metrics and forecast plots.

    A worker restarted from a checkpoint replays the steps after it; those steps were logged already (with the
    same values: the replay is exact), so each metric skips the steps up to the last one the run has of it."""

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = MlflowClient(uri), run_id
        self.logged_until: dict[str, int] = {}

    def _new(self, key: str, step: int) -> bool:
        if key not in self.logged_until:  # once per metric and logger: what the run already holds
            history = self.client.get_metric_history(self.run_id, key)
            self.logged_until[key] = max((m.step for m in history), default=-1)
        return step > self.logged_until[key]

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        fresh = [Metric(k, float(v), now, step) for k, v in metrics.items() if self._new(k, step)]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)

    def plot_forecast(self, truth: torch.Tensor, forecast: torch.Tensor, step: int, channel: str) -> None:
        """truth, forecast: [T, H, W] in physical units; shows the last closed-loop lead time."""
        t, f = truth[-1].float().numpy(), forecast[-1].float().numpy()
        fig = Figure(figsize=(12, 3), constrained_layout=True)  # no pyplot: no global backend or figure list
        axes = fig.subplots(1, 3)
        lo, hi = np.percentile(t, [1, 99])
        for ax, img, title, kw in (
            (axes[0], t, "truth", dict(vmin=lo, vmax=hi)),
            (axes[1], f, "forecast", dict(vmin=lo, vmax=hi)),
            (axes[2], f - t, "forecast - truth", dict(cmap="RdBu_r")),
        ):
            im = ax.imshow(img, origin="lower", **kw)
            ax.set_title(f"{channel} {title}")
            fig.colorbar(im, ax=ax, shrink=0.8)
        fig.suptitle(f"validation at step {step}, lead {truth.shape[0]} frames")
        self.client.log_figure(self.run_id, fig, f"plots/forecast_step{step:07d}.png")


def finish_run(uri: str, run_id: str, status: str) -> None:
    MlflowClient(uri).set_terminated(run_id, status=status)


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
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (which `log_model` needs) reads a process-wide URI: set it only for the call."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def log_model(uri: str, run_id: str, model: torch.nn.Module, example: torch.Tensor,
              registered_name: str) -> str | None:
    """Log `model` (pickled: torch.export would freeze the batch size) with an input example and signature,
    and register it under `registered_name` (skipped when empty). Returns the registered version.

    The package's source travels with the model (`code_paths`), so it registers and loads whether or not
    minconv_dist is an installed distribution (under `ray job submit --working-dir` it is plain files).
    The normalisation statistics are in the weights (the network's normaliser)."""
    model = PortableModel(model.eval())
    with torch.no_grad():
        output = model(example).numpy()
    signature = mlflow.models.infer_signature(example.numpy(), output)
    with _tracking_uri(uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model, name="model", serialization_format="pickle", input_example=example.numpy(),
            signature=signature, registered_model_name=registered_name or None,
            metadata={"minconv_dist_version": minconv_dist.__version__},
            code_paths=[os.path.dirname(minconv_dist.__file__)],
            # stated, not inferred: inference re-imports the model in a subprocess (~20 s)
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
        )
    return None if info.registered_model_version is None else str(info.registered_model_version)
