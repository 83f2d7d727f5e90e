"""Model registration as `ray job submit --working-dir` runs it: minconv_dist present as plain files, not as
an installed distribution; and the registered model loading where minconv_dist is not importable at all."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = sysconfig.get_paths()["purelib"]

# `python -S` skips site-packages' .pth files, so the editable install's import hook is gone; the child adds
# site-packages back by hand (torch, mlflow) and, for registering, the repository as a plain folder.
REGISTER = """
import importlib.metadata, sys
sys.path[:0] = [{site!r}, {root!r}]
real = importlib.metadata.version
def version(name):
    if name.replace("-", "_") == "minconv_dist":
        raise importlib.metadata.PackageNotFoundError(name)
    return real(name)
importlib.metadata.version = version
import torch
from minconv_dist.models import build_model
from minconv_dist.models import save_model_file
from minconv_dist.train.tracking import log_model, open_run, register
model = build_model("minconvgru", ["z"], 4, 1, grid=(8, 8))
save_model_file("model.pt", model)
run = open_run({uri!r}, "e", "r", {{"model": {{"arch": "minconvgru"}}, "data": {{}}}})
model_uri, model_id = log_model({uri!r}, run, model, torch.zeros(1, 3, 1, 8, 8), "model.pt")
print("VERSION", register({uri!r}, run, model_uri, model_id, "m", 1))
"""
LOAD = """
import sys
sys.path[:0] = [{site!r}]
try:
    import minconv_dist
    raise SystemExit("minconv_dist is importable: the test would prove nothing")
except ImportError:
    pass
import mlflow, torch
mlflow.set_tracking_uri({uri!r})
model = mlflow.pytorch.load_model("models:/m/1")
print("SHAPE", tuple(model.rollout(torch.zeros(2, 3, 1, 8, 8), steps=4)[0].shape))
"""


def run_child(code: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the child's sys.path is set above only
    out = subprocess.run([sys.executable, "-S", "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True,
                         text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.timeout(300)
def test_registers_without_installed_distribution_and_loads_without_the_package(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert "VERSION 1" in run_child(REGISTER.format(site=SITE, root=str(ROOT), uri=uri), tmp_path)
    assert "SHAPE (2, 4, 1, 8, 8)" in run_child(LOAD.format(site=SITE, uri=uri), tmp_path)


def test_a_ctrl_c_during_an_mlflow_call_takes_effect_after_it():
    """`with_backoff` holds a Ctrl-C (SIGINT) until its try ends: an MLflow write cut off mid-transaction can leave
    a sqlite store locked, so the KILLED the interrupt then writes would fail. The try completes, and the
    KeyboardInterrupt follows it. Without the hold the same call is cut short (so this check can fail)."""
    import signal
    import time

    from minconv_dist.train.tracking import with_backoff

    done = []

    def call() -> int:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # the signal arrives here: Python's own handler would raise KeyboardInterrupt now
        done.append("written")
        return 7

    # Python's own handler, as in a terminal: a shell starts background jobs (nohup ... &) with SIGINT ignored
    original = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with_backoff(call, 0)
        assert done == ["written"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
        done.clear()
        with pytest.raises(KeyboardInterrupt):
            call()
        assert done == []
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # ignored (a cleanup's second Ctrl-C): left ignored
        try:
            assert with_backoff(call, 0) == 7 and done == ["written"]
        finally:
            signal.signal(signal.SIGINT, previous)
    finally:
        signal.signal(signal.SIGINT, original)
