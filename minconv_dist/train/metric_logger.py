"""Rank 0's metrics and plots, written by a background thread so that the training loop never waits on MLflow.

`log` and `plot_forecast` only queue a record (bounded). The thread sends each one to the server; when a request
fails (MLflow's HTTP timeout is `tracking.timeout_s`, without retries), the server counts as down: one warning
line, and from then on records go to the spool (`train/spool.py`), a local MLflow file store. Every
`tracking.retry_every_s` the thread replays the spool; once that succeeds the server is up again and records go
to it directly. A queue that fills up (a server slow to fail) is not waited for: the training loop writes the
record to the spool itself. `flush` (before each checkpoint) and `close` (at the end; the logger is a context
manager) wait until every queued record is on the server or in the spool, so that a worker restarted from that
checkpoint loses nothing; that takes at most a few `timeout_s`, the time a request may take before it fails.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from contextlib import suppress
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from minconv_dist.data.store import redact
from minconv_dist.train.spool import Spool
from minconv_dist.train.tracking import one_line


def forecast_figure(truth: np.ndarray, forecast: np.ndarray, step: int, channel: str, lead: int) -> Figure:
    """truth, forecast: [H, W] in physical units, at the last closed-loop lead time (`lead` frames)."""
    fig = Figure(figsize=(12, 3), constrained_layout=True)  # no pyplot: no global backend or figure list
    axes = fig.subplots(1, 3)
    lo, hi = np.percentile(truth, [1, 99])
    for ax, img, title, kw in (
        (axes[0], truth, "truth", dict(vmin=lo, vmax=hi)),
        (axes[1], forecast, "forecast", dict(vmin=lo, vmax=hi)),
        (axes[2], forecast - truth, "forecast - truth", dict(cmap="RdBu_r")),
    ):
        im = ax.imshow(img, origin="lower", **kw)
        ax.set_title(f"{channel} {title}")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"validation at step {step}, lead {lead} frames")
    return fig


class MetricLogger:
    """Rank 0's handle on the run.

    A worker restarted from a checkpoint replays the steps after it; those steps were logged already (with the
    same values: the replay is exact), so each metric skips the steps up to the last one the server run has of
    it when this logger first sends it. (Spooled steps are checked one by one when replayed.)

    The HTTP limits are set for the whole process: rank 0's worker makes no other MLflow calls."""

    def __init__(self, uri: str, run_id: str, spool: Spool, *, timeout_s: int = 10, retry_every_s: float = 30.0,
                 queue_size: int = 1000):
        os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout_s))
        self.uri, self.client, self.run_id, self.spool = uri, MlflowClient(uri), run_id, spool
        self.timeout_s, self.retry_every_s = timeout_s, retry_every_s
        self.logged_until: dict[str, int] = {}
        self._queue: queue.Queue = queue.Queue(queue_size)
        self._down = bool(spool.pending())  # a previous worker left records: replay them before sending new ones
        self._retry_at = 0.0
        self._spooled_here = False  # the training loop spooled a record itself (queue full)
        self._warned = False
        self._lost = 0  # records neither sent nor spooled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-logger", daemon=True)
        self._thread.start()

    # the training loop's side: never waits on the server
    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._put(("metrics", [Metric(k, float(v), now, step) for k, v in metrics.items()]))

    def plot_forecast(self, truth: torch.Tensor, forecast: torch.Tensor, step: int, channel: str) -> None:
        """truth, forecast: [T, H, W] in physical units; shows the last closed-loop lead time."""
        self._put(("figure", (truth[-1].float().numpy().copy(), forecast[-1].float().numpy().copy(), step, channel,
                              truth.shape[0])))

    def _put(self, record: tuple[str, Any]) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:  # the thread is stuck on a slow server: bounded memory, so this one goes to disk now
            self._to_spool(record)
            self._spooled_here = True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued record is on the server or in the spool; False if `timeout` ran out first
        (default: what two requests that time out take, the most a send does before the record goes to the spool,
        plus a margin)."""
        end = time.monotonic() + (2 * self.timeout_s + 5 if timeout is None else timeout)
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def close(self, timeout: float | None = None) -> int:
        """Flush and stop the thread. Records still queued after `timeout` (default: twice `flush`'s) go to the
        spool from here. Returns the number of spool segments the server does not have yet (0: all was sent)."""
        self.flush(2 * (2 * self.timeout_s + 5) if timeout is None else timeout)
        self._stop.set()
        self._thread.join(timeout=1)
        while True:
            try:
                self._to_spool(self._queue.get_nowait())
            except queue.Empty:
                break
        self.spool.close_segment()
        with suppress(Exception):  # a last offer: the driver (maybe on another machine) cannot see this spool
            if self.spool.pending():
                self.spool.replay(self.client)
        return len(self.spool.pending())

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # the thread's side
    def _run(self) -> None:
        while True:
            try:
                record = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():
                    return
                if (self._down and time.monotonic() >= self._retry_at) or (not self._down and self._spooled_here):
                    self._replay()
                continue
            try:
                if self._down and time.monotonic() >= self._retry_at:
                    self._replay()
                if not self._down:
                    try:
                        self._send(record)
                        continue
                    except Exception as err:  # noqa: BLE001 - any failure: keep the record, find out later
                        self._went_down(err)
                self._to_spool(record)
            except Exception as err:  # noqa: BLE001 - the spool failed too (a full disk): say so once, keep training
                if not self._lost:
                    print(f"[minconv] warning: records for MLflow are lost: the spool {self.spool.directory} "
                          f"cannot be written ({one_line(err)})", flush=True)
                self._lost += 1
            finally:
                self._queue.task_done()

    def _new(self, key: str, step: int) -> bool:
        if key not in self.logged_until:  # once per metric and logger: what the run already holds
            history = self.client.get_metric_history(self.run_id, key)
            self.logged_until[key] = max((m.step for m in history), default=-1)
        return step > self.logged_until[key]

    def _send(self, record: tuple[str, Any]) -> None:
        kind, data = record
        if kind == "metrics":
            fresh = [m for m in data if self._new(m.key, m.step)]
            if fresh:
                self.client.log_batch(self.run_id, metrics=fresh)
        else:
            self.client.log_figure(self.run_id, forecast_figure(*data), _plot_path(data[2]))

    def _to_spool(self, record: tuple[str, Any]) -> None:
        kind, data = record
        if kind == "metrics":
            self.spool.write(metrics=data)
        else:
            self.spool.write(figure=forecast_figure(*data), artifact_file=_plot_path(data[2]))

    def _went_down(self, err: Exception) -> None:
        self._down, self._retry_at = True, time.monotonic() + self.retry_every_s
        if not self._warned:  # one line for the whole run, however many outages
            self._warned = True
            print(f"[minconv] warning: MLflow at {redact(self.uri)} does not answer ({one_line(err)}); training goes "
                  f"on: metrics and plots are kept in {self.spool.directory} and sent when it answers (asked every "
                  f"{self.retry_every_s:g} s)", flush=True)

    def _replay(self) -> None:
        """Send the spool; the server is up again if that works."""
        self.spool.close_segment()
        self._spooled_here = False
        try:
            sent = self.spool.replay(self.client)
        except Exception as err:  # noqa: BLE001
            self._went_down(err)
            return
        if self._down and sent:
            print(f"[minconv] MLflow answers again: sent the {sent} metric values kept meanwhile", flush=True)
        self._down = False


def _plot_path(step: int) -> str:
    return f"plots/forecast_step{step:07d}.png"
