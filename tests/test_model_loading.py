"""Loading a model never runs code from a file, and every way it can fail ends `jobs/forecast.py` in one line
(exit 2) naming the model: a version or alias that is not there, a file that is not a model file, a crafted
pickle, a models:/ URI with no tracking URI set. (issue 22, finding 8 and the forecast part of finding 10)"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs import forecast as forecast_job

from minconv_dist.errors import run_job
from minconv_dist.evaluate import load_model
from minconv_dist.models import build_model, save_model_file
from minconv_dist.train import tracking

ROOT = Path(__file__).resolve().parents[1]


class WritesMarker:
    """Unpickling this creates `path`: proof that a loader ran code from the file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> tuple[str, torch.nn.Module, Path]:
    """A tiny model logged and registered as `tiny` version 1 in a sqlite store, as training does it; then its
    pickle (what mlflow.pytorch.load_model reads) replaced by one that writes a marker when unpickled."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    torch.manual_seed(0)
    model = build_model("minconvgru", ["z"], 4, 1, grid=(8, 8))
    model.normalizer.set_stats([54000.0], [3000.0])
    save_model_file(root / "model.pt", model)
    run_id = tracking.open_run(uri, "e", "r", {"model": {"arch": "minconvgru"}})
    model_uri, model_id = tracking.log_model(uri, run_id, model, torch.full((1, 3, 1, 8, 8), 54000.0),
                                             root / "model.pt")
    assert tracking.register(uri, run_id, model_uri, model_id, "tiny", 7) == "1"
    assert tracking.register(uri, run_id, model_uri, model_id, "tiny", 7) == "1"  # a retry: the same version
    pickles = list((root / "mlartifacts").rglob("data/model.pth"))
    assert len(pickles) == 1, "found no pickled model to replace: the test would prove nothing"
    marker = root / "unpickled"
    torch.save(WritesMarker(marker), pickles[0])
    return uri, model, marker


def test_models_uri_loads_the_weights_only_file_and_never_the_pickle(registered):
    uri, model, marker = registered
    loaded = load_model("models:/tiny/1", tracking_uri=uri)
    for name, value in model.state_dict().items():  # weights and the normaliser's statistics, bit for bit
        assert torch.equal(loaded.state_dict()[name], value), name
    assert not marker.exists(), "load_model unpickled the logged model"


@pytest.mark.parametrize("model, expected", [
    ("models:/tiny/999", "models:/tiny/999: Model Version (name=tiny, version=999) not found"),
    ("models:/tiny@nosuch", "models:/tiny@nosuch: Registered model alias nosuch not found"),
])
def test_a_version_or_alias_that_is_not_there_is_one_line(model, expected, registered, tmp_path, capsys):
    uri, _, _ = registered
    code = run_job(forecast_job.main, ["--model", model, "--tracking-uri", uri, "--out", str(tmp_path / "fc.zarr")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err, err


def test_a_file_that_is_not_a_model_or_runs_code_is_one_line_and_nothing_runs(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 4)
    evil, marker = tmp_path / "evil.pt", tmp_path / "unpickled"
    torch.save({"format": "minconv_dist.model/2", "spec": WritesMarker(marker)}, evil)
    for path, expected in ((garbage, "not a minconv_dist model file"),
                           (evil, "refused, not a weights-only model file")):
        code = run_job(forecast_job.main, ["--model", str(path), "--out", str(tmp_path / "fc.zarr")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and f"{path}: {expected}" in err, err
    assert not marker.exists(), "the crafted pickle ran"


@pytest.mark.timeout(300)
def test_forecast_from_another_directory_without_tracking_uri_says_so_and_creates_no_store(registered, tmp_path):
    """MLflow's fallback would be a new, empty ./mlflow.db wherever the job runs, and a confusing traceback."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "forecast.py"), "--model", "models:/tiny/1", "--out",
                          "fc.zarr"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.count("\n") == 1 and "models:/tiny/1: no MLflow tracking URI is set; pass --tracking-uri or " \
                                          "set MLFLOW_TRACKING_URI" in out.stderr, out.stderr
    assert sorted(os.listdir(elsewhere)) == [], "the job left files behind (an MLflow store?)"
    shutil.rmtree(elsewhere)
