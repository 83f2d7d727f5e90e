"""MLflow's process-wide tracking URI, set for the length of a call. Its fluent API (`log_model`) reads nothing
else, and its model registry resolves a version's source and a `runs:/` URI through it too, whatever URI the
client in hand was given; so every call of ours that touches them runs inside `tracking_uri(uri)`."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    import mlflow  # on first use: importing minconv_dist.evaluate does not import MLflow

    previous = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
