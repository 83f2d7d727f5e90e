"""The tracking spool: where rank 0's metrics and plots wait while the MLflow server does not answer, and how
they reach the server later.

The spool is a local MLflow file store (open it with `mlflow ui --backend-store-uri <spool dir>`): each outage
writes one *segment*, a run of its experiment `spool` tagged with the server's run id. Replaying a segment is
idempotent, so a replay cut short by the next outage, or run twice, neither loses nor duplicates anything:
a (metric, step) the server run already holds is not sent again (a restarted worker may have spooled the same
steps twice, with the same values: they count once), a plot overwrites itself, and a segment sent in full is
tagged synced.

Where: `<run dir>/mlflow-spool` for a local run directory. Object stores (s3://, gs://) cannot hold an MLflow
file store, so there the spool is on the machine that wrote it, under `$MINCONV_CACHE/mlflow-spool/` (see
`spool_dir`): rank 0's machine for metrics, the driver's for the end of the run.
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote, urlparse

from matplotlib.figure import Figure
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from minconv_dist.data.store import cache_dir, redact

SERVER_RUN = "minconv.server_run_id"
SYNCED = "minconv.synced"
BATCH = 1000  # MLflow's limit of metrics per log_batch
EXPERIMENT = "spool"
TARGET = "sync.json"  # {"uri", "run_id"} of the server run, and what the end of the run left to do ("finish")


def spool_dir(run_dir: str) -> Path:
    """The spool of the run in `run_dir`: inside it when it is a local path, else in this machine's cache."""
    scheme, _, rest = run_dir.partition("://")
    if not rest or scheme == "file":
        return Path(rest or run_dir) / "mlflow-spool"
    return cache_dir() / "mlflow-spool" / scheme / rest.strip("/")


def load_target(directory: Path) -> dict:
    """The contents of a spool's `sync.json` ({} when there is none)."""
    path = directory / TARGET
    return json.loads(path.read_text()) if path.exists() else {}


class Spool:
    """One run's spool. `write` may be called from two threads (the logger's and, when its queue is full, the
    training loop's); a lock keeps their writes apart."""

    def __init__(self, directory: str | os.PathLike, uri: str, server_run_id: str):
        # MLflow 3.17 refuses file stores unless this is set (they are "in maintenance mode")
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        self.directory, self.uri, self.server_run_id = Path(directory), uri, server_run_id
        self._client: MlflowClient | None = None
        self._experiment: str | None = None
        self._segment: str | None = None  # the segment being written; not replayed until closed
        self._lock = threading.Lock()

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(self.directory.resolve().as_uri())
        return self._client

    @property
    def experiment(self) -> str:
        """The spool's one experiment, `spool` (made on first use)."""
        if self._experiment is None:
            found = self.client.get_experiment_by_name(EXPERIMENT)
            self._experiment = found.experiment_id if found else self.client.create_experiment(EXPERIMENT)
        return self._experiment

    def write(self, metrics: Iterable[Metric] = (), figure: Figure | None = None, artifact_file: str = "") -> None:
        """Keep `metrics` and `figure` (as `artifact_file`) in the open segment, opening one if needed."""
        metrics = list(metrics)
        with self._lock:
            if self._segment is None:
                tags = {SERVER_RUN: self.server_run_id}
                self._segment = self.client.create_run(self.experiment, tags=tags).info.run_id
                if not (self.directory / TARGET).exists():  # what the sync command needs to find the server run
                    self.save_target({})
            for i in range(0, len(metrics), BATCH):
                self.client.log_batch(self._segment, metrics=metrics[i:i + BATCH])
            if figure is not None:
                self.client.log_figure(self._segment, figure, artifact_file)

    def save_target(self, finish: dict) -> None:
        """Write `sync.json` (atomically): the server run and `finish`, what the end of the run left to do
        ({}: keep what is there)."""
        target = load_target(self.directory)
        target.update(uri=redact(self.uri), run_id=self.server_run_id)
        if finish:
            target["finish"] = finish
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f"{TARGET}.tmp"
        tmp.write_text(json.dumps(target, indent=1))
        tmp.replace(self.directory / TARGET)

    def close_segment(self) -> None:
        """Later writes go to a new segment; this one may be replayed."""
        with self._lock:
            self._segment = None

    def pending(self) -> list[str]:
        """Ids of this run's segments not yet replayed in full, oldest first (the open one included)."""
        if not any(self.directory.glob("*/meta.yaml")):  # no experiment yet: nothing was spooled
            return []
        found, token, ours = [], None, f"tags.`{SERVER_RUN}` = '{self.server_run_id}'"
        while True:
            page = self.client.search_runs([self.experiment], filter_string=ours,
                                           order_by=["attributes.start_time ASC"], page_token=token)
            found += [r.info.run_id for r in page if r.data.tags.get(SYNCED) != "true"]
            token = page.token
            if not token:
                return found

    def replay(self, server: MlflowClient) -> int:
        """Send every closed segment that is not synced yet to the server run; the number of metric values sent.
        Raises on the first request that fails (what was sent before it stays sent)."""
        with self._lock:
            writing = self._segment
        sent = 0
        for segment in self.pending():
            if segment != writing:
                sent += self._replay(segment, server)
                self.client.set_tag(segment, SYNCED, "true")
        return sent

    def _replay(self, segment: str, server: MlflowClient) -> int:
        run = self.client.get_run(segment)
        sent = 0
        for key in sorted(run.data.metrics):
            spooled = {m.step: m for m in self.client.get_metric_history(segment, key)}
            have = {m.step for m in server.get_metric_history(self.server_run_id, key)}
            fresh = [spooled[step] for step in sorted(set(spooled) - have)]
            for i in range(0, len(fresh), BATCH):
                server.log_batch(self.server_run_id, metrics=fresh[i:i + BATCH])
            sent += len(fresh)
        artifacts = Path(unquote(urlparse(run.info.artifact_uri).path))
        for path in sorted(p for p in artifacts.rglob("*") if p.is_file()):
            folder = path.parent.relative_to(artifacts).as_posix()
            server.log_artifact(self.server_run_id, str(path), None if folder == "." else folder)
        return sent
