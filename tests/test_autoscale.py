"""Autoscaling from the cluster YAMLs (issue 26, item 2), on this host. Each YAML becomes a config for Ray's fake
multi-node autoscaler (tests/fake_cluster.py: the same node types, resources and min/max workers, each GPU an
`accelerator`), a head starts with it on 127.0.0.1 (`RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=...`), and jobs/train_era5.py is submitted asking for accelerators, which the head has none
of. The autoscaler must launch a node of the YAML's worker type, the job must finish, and the node must go once
idle for `idle_timeout_minutes`: the YAMLs' node types, their resources and the job's request agree.

Both YAMLs are rehearsed at once, each on a cluster of its own: most of a rehearsal is waiting (a node starting,
a job's driver and workers importing, the idle timeout), which overlaps.
"""
from __future__ import annotations

import json
import os
import re
import time
import urllib.request
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.job_submission import JobStatus

from minconv_dist.data import write_synthetic_era5
from minconv_dist.train.checkpoint import latest
from minconv_dist.train.local_ray import LocalHead, free_port, local_ray_head, processes_under
from tests.fake_cluster import ACCELERATOR, HEAD, OBJECT_STORE, fake_config, node_resources

ROOT = Path(__file__).resolve().parents[1]
IDLE_MINUTES = 0.1  # the YAMLs say 10
ENDED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
# (YAML, what each worker asks for besides a CPU and the accelerator, the node type that must come up)
SCENARIOS = [
    ("aws.yaml", {}, "gpu_worker"),  # a plain request: the on-demand type, whose resources it fits best
    ("gcp.yaml", {"spot": 1}, "spot_worker"),  # a request for spot capacity
]


def active_nodes(head: LocalHead, types: list[str]) -> dict[str, int]:
    """Node type (of `types`) -> count of the nodes the autoscaler has up: its report, through the dashboard, which
    camel-cases the report's keys (gpu_worker comes as gpuWorker)."""
    names = {re.sub(r"_(\w)", lambda m: m[1].upper(), name): name for name in types}
    token = Path(head.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(f"{head.address}/api/cluster_status", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        status = json.load(response)["data"]["clusterStatus"] or {}
    report = status.get("autoscalerReport") or {}
    return {names.get(kind, kind): count for kind, count in
            {**(report.get("activeNodes") or {}), **(report.get("idleNodes") or {})}.items()}


@dataclass
class Rehearsal:
    """One YAML's fake cluster and the job submitted to it; `polls`: (time, node type -> count up)."""

    yaml_name: str
    node_type: str
    types: list[str]
    run_dir: Path
    head: LocalHead
    client: Any
    job: str
    submitted: float
    polls: list[tuple[float, dict[str, int]]] = field(default_factory=list)

    def poll(self) -> None:
        self.polls.append((time.time(), active_nodes(self.head, self.types)))

    def status(self) -> JobStatus:
        return self.client.get_job_status(self.job)

    def seen(self) -> set[str]:
        return {kind for _, nodes in self.polls for kind in nodes}

    def up_at(self) -> float | None:
        return next((t for t, nodes in self.polls if self.node_type in nodes), None)

    def gone_at(self) -> float | None:
        up = self.up_at()
        return None if up is None else next((t for t, nodes in self.polls if t > up and self.node_type not in nodes),
                                            None)


def rehearse(stack: ExitStack, yaml_name: str, asks: dict[str, float], node_type: str, store: str,
             tmp: Path) -> Rehearsal:
    """Start a fake cluster from `yaml_name` (its head stopped by `stack`) and submit the job to it."""
    tmp.mkdir()
    source = yaml.safe_load((ROOT / "cluster" / yaml_name).read_text())
    head_spec = source["available_node_types"][source["head_node_type"]]
    assert ACCELERATOR not in node_resources(head_spec)  # the job cannot run on the head
    port = free_port()
    fake = fake_config(ROOT / "cluster" / yaml_name, f"127.0.0.1:{port}", IDLE_MINUTES)
    (tmp / "fake.yaml").write_text(yaml.safe_dump(fake))
    request = {ACCELERATOR: 1, **asks}  # where a real job asks --gpu true: one GPU per worker
    settings = [f"data.url={store}", "data.channels=[z]", "data.coarsen=2", "data.train_range=[2015-01-01, 2015-01-31]",
                "data.val_range=[2015-02-01, 2015-02-28]", "data.sequence_length=6", "data.teacher_steps=4",
                "data.stride=6", "data.batch_size=2", "model.hidden_size=4", "model.layers=2", "optim.epochs=1",
                "optim.steps_per_epoch=2", "checkpoint.val_every=2", "checkpoint.val_batches=1",
                f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"run.storage_path={tmp}/runs", "run.name=scaled",
                "parallel.num_workers=2", f"parallel.worker_resources={json.dumps(request)}",
                "parallel.allow_autoscale=true"]
    # the job's driver runs on the head: no idle workers started for it there (Ray starts one per head CPU)
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_prestart_worker_first_driver="0")
    head = stack.enter_context(local_ray_head(
        num_cpus=int(head_spec["resources"]["CPU"]), port=port, env=env,
        args=[f"--autoscaling-config={tmp / 'fake.yaml'}", f"--object-store-memory={OBJECT_STORE}"]))
    client = head.job_client()
    job = client.submit_job(submission_id=f"scaled-{uuid.uuid4().hex[:8]}",
                            entrypoint="python jobs/train_era5.py " + " ".join(f"--set '{s}'" for s in settings),
                            runtime_env={"working_dir": str(ROOT)})
    return Rehearsal(yaml_name, node_type, list(fake["available_node_types"]), tmp / "runs" / "scaled", head, client,
                     job, time.time())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_jobs_asking_for_accelerators_scale_up_each_yamls_worker_type_and_idle_nodes_go(tmp_path,
                                                                                        tmp_path_factory):
    store = str(tmp_path / "era5.zarr")
    write_synthetic_era5(store, start="2015-01-01", end="2015-03-01", nlat=16, nlon=32)
    with ExitStack() as stack:
        runs = [rehearse(stack, *scenario, store, tmp_path / scenario[0].split(".")[0]) for scenario in SCENARIOS]
        deadline = time.time() + 600
        while not all(run.status() in ENDED and run.gone_at() for run in runs):
            assert time.time() < deadline, [(run.yaml_name, run.status(), run.polls[-1:]) for run in runs]
            for run in runs:
                assert run.status() in (*ENDED[:1], JobStatus.PENDING, JobStatus.RUNNING), \
                    run.client.get_job_logs(run.job)[-4000:]
                run.poll()
            time.sleep(1)
        for run in runs:
            assert run.status() == JobStatus.SUCCEEDED, run.client.get_job_logs(run.job)[-4000:]
            assert run.head.processes(), "no process of the cluster found: nothing would be stopped"
    figures = {}
    for run in runs:
        assert not processes_under(run.head.temp_dir), f"a process of {run.yaml_name}'s cluster outlived it"
        assert run.seen() == {HEAD, run.node_type}, run.seen()  # the YAML's type, and nothing else, was launched
        final = latest(str(run.run_dir))
        assert final is not None and final[1]["global_step"] == 2
        trained = (Path(final[0]) / "position.json").stat().st_mtime  # the last report: the node idles after it
        idle_s = run.gone_at() - trained
        assert IDLE_MINUTES * 60 <= idle_s < IDLE_MINUTES * 60 + 120, idle_s  # removed once idle that long
        figures[run.yaml_name] = {"node_type": run.node_type,
                                  "up_after_submit_s": round(run.up_at() - run.submitted, 1),
                                  "removed_after_last_step_s": round(idle_s, 1), "idle_timeout_s": IDLE_MINUTES * 60,
                                  "load_average_1min": round(os.getloadavg()[0], 1)}
        print(f"[figures] {run.yaml_name}: {figures[run.yaml_name]}")
    (tmp_path_factory.getbasetemp() / "autoscale_figures.json").write_text(json.dumps(figures, indent=1))
