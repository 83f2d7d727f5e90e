"""Autoscaling from the cluster YAMLs (issue 26, item 2), on this host. Each YAML becomes a config for Ray's fake
multi-node autoscaler (tests/fake_cluster.py: the same node types, resources and min/max workers, each GPU an
`accelerator`), a head starts with it on 127.0.0.1 (`RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=...`), and jobs/train_era5.py is submitted asking for accelerators, which the head has none
of. The autoscaler must launch a node of the YAML's worker type, the job must finish, and the node must go once
idle for `idle_timeout_minutes`: the YAMLs' node types, their resources and the job's request agree.
"""
from __future__ import annotations

import json
import os
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from ray.job_submission import JobStatus

from minconv_dist.data import write_synthetic_era5
from minconv_dist.train.local_ray import free_port, local_ray_head
from tests.fake_cluster import ACCELERATOR, HEAD, OBJECT_STORE, fake_config, node_resources

ROOT = Path(__file__).resolve().parents[1]
IDLE_MINUTES = 0.25  # the YAMLs say 10


def active_nodes(head) -> dict[str, int]:
    """Node type -> count of the nodes the autoscaler has up (its report, through the dashboard)."""
    token = Path(head.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(f"{head.address}/api/cluster_status", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        status = json.load(response)["data"]["clusterStatus"] or {}
    report = status.get("autoscalerReport") or {}
    return {**(report.get("activeNodes") or {}), **(report.get("idleNodes") or {})}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("yaml_name, asks, node_type", [
    ("aws.yaml", {}, "gpu_worker"),  # a plain request: the on-demand type, whose resources it fits best
    ("gcp.yaml", {"spot": 1}, "spot_worker"),  # a request for spot capacity
])
def test_a_job_asking_for_accelerators_scales_up_the_yamls_worker_type_and_idle_nodes_go(yaml_name, asks, node_type,
                                                                                          tmp_path):
    source = yaml.safe_load((ROOT / "cluster" / yaml_name).read_text())
    head_spec = source["available_node_types"][source["head_node_type"]]
    assert ACCELERATOR not in node_resources(head_spec)  # the job cannot run on the head
    port = free_port()
    config = tmp_path / "fake.yaml"
    config.write_text(yaml.safe_dump(fake_config(ROOT / "cluster" / yaml_name, f"127.0.0.1:{port}", IDLE_MINUTES)))
    store = str(tmp_path / "era5.zarr")
    write_synthetic_era5(store, start="2015-01-01", end="2015-03-01", nlat=16, nlon=32)
    request = {ACCELERATOR: 1, **asks}  # where a real job asks --gpu true: one GPU per worker
    settings = [f"data.url={store}", "data.train_range=[2015-01-01, 2015-01-31]",
                "data.val_range=[2015-02-01, 2015-02-28]", "data.sequence_length=6", "data.teacher_steps=4",
                "data.stride=6", "data.batch_size=2", "model.hidden_size=4", "model.layers=2", "optim.epochs=1",
                "optim.steps_per_epoch=2", "checkpoint.val_every=2", "checkpoint.val_batches=1",
                f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"run.storage_path={tmp_path}/runs", "run.name=scaled",
                "parallel.num_workers=2", f"parallel.worker_resources={json.dumps(request)}",
                "parallel.allow_autoscale=true"]
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    with local_ray_head(num_cpus=int(head_spec["resources"]["CPU"]), port=port, env=env,
                        args=[f"--autoscaling-config={config}", f"--object-store-memory={OBJECT_STORE}"]) as head:
        client = head.job_client()
        job = client.submit_job(submission_id=f"scaled-{uuid.uuid4().hex[:8]}",
                                entrypoint="python jobs/train_era5.py " + " ".join(f"--set '{s}'" for s in settings),
                                runtime_env={"working_dir": str(ROOT)})
        submitted, seen, deadline = time.monotonic(), {}, time.monotonic() + 600
        while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            assert time.monotonic() < deadline, "the job did not end"
            for kind, count in active_nodes(head).items():
                seen.setdefault(kind, (count, round(time.monotonic() - submitted, 1)))
            time.sleep(2)
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-4000:]
        assert set(seen) == {HEAD, node_type}, seen  # the YAML's type, and nothing else, was launched
        assert (tmp_path / "runs" / "scaled").is_dir()
        ended = time.monotonic()
        while node_type in active_nodes(head):
            assert time.monotonic() - ended < 300, "the idle node was not removed"
            time.sleep(2)
        removed_after = time.monotonic() - ended
        assert removed_after < 300
        assert {p.info["name"] for p in head.processes()}, "no process of the cluster found: nothing would be stopped"
    print(f"[figures] {yaml_name}: {node_type} up {seen[node_type][1]} s after submit; job "
          f"{ended - submitted:.0f} s; removed {removed_after:.0f} s after the job ended "
          f"(idle_timeout_minutes={IDLE_MINUTES})")
