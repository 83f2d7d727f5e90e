"""Load a model for forecasting from wherever it lives: a model file (what training writes as each checkpoint's
`model.pt`), an MLflow `models:/name/version`, `models:/name@alias` or `runs:/<run id>/model` URI, or an
official-repo checkpoint (`official:PATH`, with `arch` and `padding` given). The normalisation statistics come
inside the model (its normaliser), except for official checkpoints, which take normalised inputs and have none:
pass `stats`.

Nothing here unpickles code. From MLflow it reads the model file that training logs beside the pickled network
(`MODEL_FILE`) with `torch.load(weights_only=True)`, never the pickle itself (`mlflow.pytorch.load_model` loads
that one, running whatever code it names: only for stores you trust).
"""
from __future__ import annotations

import os
import tempfile

from minconv_dist.data import NormStats
from minconv_dist.data.store import redact
from minconv_dist.models import Network, from_official_checkpoint, load_model_file

MODEL_FILE = "extra_files/model.pt"  # where training logs the model file inside an MLflow model (`extra_files`)


def load_model(uri: str, *, arch: str | None = None, padding: str = "zeros", tanh_encoder: bool = False,
               stats: NormStats | None = None, tracking_uri: str | None = None) -> Network:
    """The network in eval mode. `tracking_uri`: the MLflow server or store holding `models:/` and `runs:/`
    (default: $MLFLOW_TRACKING_URI or `mlflow.set_tracking_uri`'s; one of them is required, rather than MLflow's
    fallback, a new ./mlflow.db in whatever the working directory is)."""
    if uri.startswith("official:"):
        if arch is None or stats is None:
            raise ValueError(f"{uri}: an official checkpoint has no architecture name and no normalisation "
                             "statistics: pass arch and stats (--arch, --stats stats.json)")
        model = from_official_checkpoint(uri[len("official:"):], arch, padding=padding, tanh_encoder=tanh_encoder,
                                         channels=stats.channels)
        model.normalizer.set_stats(stats.mean, stats.std)
        return model.eval()
    if stats is not None:
        raise ValueError(f"{uri}: the model carries its own normalisation statistics; --stats is for official "
                         "checkpoints only")
    if uri.startswith(("models:/", "runs:/")):
        return _load_logged(uri, tracking_uri)
    if not os.path.exists(uri):
        raise FileNotFoundError(f"no model at {uri!r}: expected a model file, models:/name/version, "
                                "runs:/id/path, or official:PATH")
    return load_model_file(uri)


def _load_logged(uri: str, tracking_uri: str | None) -> Network:
    """The model file logged with an MLflow model; every failure a ValueError naming `uri` and the store."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from minconv_dist.tracking_uri import tracking_uri as using

    if tracking_uri is None and not mlflow.tracking.is_tracking_uri_set():
        raise ValueError(f"{uri}: no MLflow tracking URI is set; pass --tracking-uri or set MLFLOW_TRACKING_URI "
                         "(e.g. sqlite:////abs/path/mlflow.db or http://host:5000)")
    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    store = redact(tracking_uri)
    if store.startswith("sqlite:///") and not os.path.exists(store[len("sqlite:///"):]):  # MLflow would create one
        raise ValueError(f"{uri}: no MLflow store at {store} (no such file)")
    with tempfile.TemporaryDirectory() as local:
        try:
            with using(tracking_uri):
                path = mlflow.artifacts.download_artifacts(f"{uri.rstrip('/')}/{MODEL_FILE}", dst_path=local)
        except (MlflowException, OSError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if isinstance(err, OSError) or "extra_files" in reason:
                reason = (f"it has no weights-only model file {MODEL_FILE} (logged by an older minconv_dist?); "
                          f"mlflow.pytorch.load_model({uri!r}) loads its pickle, which runs code: only if you trust "
                          f"the store ({reason})")
            raise ValueError(f"{uri}: {reason} (MLflow tracking URI {store})") from err
        return load_model_file(path)
