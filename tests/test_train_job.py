"""A real local Ray cluster (`ray start --head` on 127.0.0.1, its own temp dir and ports) and
`ray job submit --working-dir . -- python jobs/train_era5.py` with a tiny config, ending SUCCEEDED.
The cluster is stopped by the PIDs of its own processes (found through its unique temp dir), never with a
bare `ray stop`, which would stop every Ray on the machine.
"""
from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from minconv_dist.data import write_synthetic_era5
from minconv_dist.train.local_ray import local_ray_head, ray_executable

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def local_cluster():
    with local_ray_head(num_cpus=2) as head:
        yield head.address, head.env


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_submit_train_era5_succeeds(local_cluster, tmp_path, monkeypatch):
    address, env = local_cluster
    store = str(tmp_path / "era5.zarr")
    write_synthetic_era5(store, start="2015-01-01", end="2015-03-01", nlat=16, nlon=32)
    job_id = f"minconv-test-{uuid.uuid4().hex[:8]}"
    settings = [
        f"data.url={store}", "data.train_range=[2015-01-01, 2015-01-31]", "data.val_range=[2015-02-01, 2015-02-28]",
        "data.sequence_length=6", "data.teacher_steps=4", "data.stride=6", "data.batch_size=2",
        "model.hidden_size=4", "model.layers=2", "optim.epochs=1", "optim.steps_per_epoch=2", "checkpoint.val_every=2",
        "checkpoint.val_batches=1", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"run.storage_path={tmp_path}/runs",
        "run.name=job",
    ]
    submit = subprocess.run(
        [ray_executable(), "job", "submit", f"--address={address}", f"--submission-id={job_id}", "--working-dir", ".", "--",
         "python", "jobs/train_era5.py", *(arg for s in settings for arg in ("--set", s))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540,
    )
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    status = JobSubmissionClient(address).get_job_status(job_id)
    assert status == JobStatus.SUCCEEDED, submit.stdout[-4000:] + submit.stderr[-2000:]
    assert list((tmp_path / "runs" / "job").glob("checkpoint_*/model.pt"))
    assert (tmp_path / "mlflow.db").exists()
