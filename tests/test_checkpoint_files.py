"""Checkpoint files on one in-process DeepSpeed engine (gloo, world size 1), without Ray: a save restores exactly
through weights-only loads, a crafted file is refused naming it and never runs, incomplete or altered checkpoints
are skipped for the newest verified one (local disk and S3), and a run directory is claimed once."""
from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from minconv_dist.train import checkpoint, runs
from minconv_dist.train.checkpoint import CheckpointError, latest, probe
from minconv_dist.train.config import ConfigError
from minconv_dist.train.loop import train_step
from tests.checkpoint_damage import plant, truncate, zero_bytes
from tests.test_train_step import batches, engine_for, process_group  # noqa: F401 - a fixture

pytestmark = pytest.mark.timeout(300)
POSITION = {"epoch": 0, "step_in_epoch": 2, "global_step": 2}


def save(engine, directory: Path, step: int = 2) -> Path:
    directory.mkdir(parents=True)
    checkpoint.save(engine, directory, rank=0, world_size=1, position={**POSITION, "global_step": step},
                    config={"run": {"name": "t"}})
    return directory


def masters(engine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in checkpoint.master_weights(engine).items()}


@pytest.fixture
def loads(monkeypatch) -> list[dict]:
    """The keyword arguments of every torch.load call, whoever makes it (DeepSpeed included)."""
    seen, real = [], torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return seen


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (1, "bf16"), (2, "fp32"), (3, "bf16"), (0, "bf16-mixed"),
                                              (2, "bf16-mixed")])
def test_restore_is_exact_and_loads_data_only(stage, precision, process_group, tmp_path, loads):
    """Every file DeepSpeed wrote (ZeRO 0-3, fp32, bf16 and bf16-mixed: the classes of DEEPSPEED_CLASSES) reads back
    weights-only, and the restored engine and RNG streams continue exactly as the saved ones."""
    engine = engine_for(stage, precision)
    data = batches(4)
    for x in data[:2]:
        train_step(engine, x, 4, 0.0)
    save(engine, tmp_path / "ckpt")
    rng = (random.random(), np.random.rand(), torch.rand(3))
    train_step(engine, data[2], 4, 0.0)
    expected = masters(engine)

    other = engine_for(stage, precision, lr=1e-2)
    assert checkpoint.restore(other, tmp_path / "ckpt", rank=0, label="ckpt")["global_step"] == 2
    assert (random.random(), np.random.rand()) == rng[:2] and torch.equal(torch.rand(3), rng[2])
    train_step(other, data[2], 4, 0.0)
    for name, value in masters(other).items():
        assert torch.equal(value, expected[name]), name
    assert loads and all(kwargs.get("weights_only") is True for kwargs in loads)


@pytest.mark.parametrize("target", ["rng_rank0.pt", "ds/mp_rank_00_model_states.pt"])
def test_a_crafted_file_is_refused_naming_it_and_never_runs(target, process_group, tmp_path):
    """A pickle that would create a marker, in place of the RNG file or a DeepSpeed file, with the manifest
    resealed to match (integrity checks pass): the driver's probe and a worker's restore both refuse it."""
    engine = engine_for(0, "fp32")
    ckpt = save(engine, tmp_path / "checkpoint_000001")
    marker = tmp_path / "marker"
    plant(ckpt, target, marker)
    assert latest(str(tmp_path)) == (str(ckpt), {**POSITION, "world_size": 1})  # sealed: the bytes verify
    refused = rf"^checkpoint_000001: {target} is not a data-only file \(Unsupported global: GLOBAL io.open"
    with pytest.raises(CheckpointError, match=refused):
        probe(str(ckpt))
    with pytest.raises(CheckpointError, match=refused):
        checkpoint.restore(engine_for(0, "fp32"), ckpt, rank=0, label=ckpt.name)
    assert not marker.exists()
    # unsealed, the same file is only corrupt: a checkpoint that does not verify
    plant(ckpt, target, marker)
    (ckpt / target).write_bytes((ckpt / target).read_bytes().replace(b"marker", b"markex"))
    skipped = []
    assert latest(str(tmp_path), on_skip=skipped.append) is None and not marker.exists()
    assert skipped == [f"skipped checkpoint_000001: {target} does not match its sha256 in the manifest"]


@pytest.fixture(scope="module")
def good(process_group, tmp_path_factory) -> Path:
    """A run directory with two real checkpoints of a ZeRO-1 engine, at steps 2 and 4, to copy and damage."""
    engine = engine_for(1, "fp32")
    run = tmp_path_factory.mktemp("good") / "run"
    for step in (2, 4):
        train_step(engine, batches(1)[0], 4, 0.0)
        save(engine, run / f"checkpoint_00000{step}", step)
    return run


def sizes(ckpt: Path) -> dict[str, int]:
    return {k: v["size"] for k, v in json.loads((ckpt / "manifest_rank0.json").read_text())["files"].items()}


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def use_moto(request) -> str:
    """Point fsspec's default S3 at the test's moto server; returns a fresh bucket."""
    options, monkeypatch = request.getfixturevalue("s3_options"), request.getfixturevalue("monkeypatch")
    for key, value in {"AWS_ENDPOINT_URL": options["endpoint_url"], "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    return request.getfixturevalue("s3_bucket")


@pytest.mark.parametrize("damage, why", [
    (zero_bytes, "position.json is 0 bytes"),
    (lambda c: (c / "position.json").write_text(""), "position.json is 0 bytes"),
    (lambda c: (c / "position.json").write_text("{"), "position.json is not valid JSON .*"),
    (lambda c: truncate(c / "ds" / "mp_rank_00_model_states.pt"),
     r"ds/mp_rank_00_model_states.pt is \d+ bytes, the manifest says \d+"),
    (lambda c: (c / "manifest_rank0.json").unlink(), "manifest_rank0.json is missing"),
    (lambda c: (c / "manifest_rank0.json").write_text('{"rank": 0, "files": {'),
     "manifest_rank0.json is not valid JSON .*"),
    (lambda c: flip_a_byte(c / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
     "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt does not match its sha256 in the manifest"),
    (lambda c: (c / "model.pt").unlink(), "model.pt is missing, the manifest lists it"),
], ids=["full-disk", "empty-position", "bad-position", "truncated", "no-manifest", "bad-manifest", "flipped-byte",
        "missing-file"])
@pytest.mark.parametrize("where", ["local", "s3"])
def test_latest_skips_a_damaged_checkpoint_for_the_newest_verified(damage, why, where, good, tmp_path, request):
    """The newer of two checkpoints damaged as a full disk, a crash or a bad copy leaves it: `latest` returns the
    older one and says which it skipped and why; nothing raises."""
    shutil.copytree(good, tmp_path / "run")
    damage(tmp_path / "run" / "checkpoint_000004")
    run = str(tmp_path / "run")
    if where == "s3":
        bucket = use_moto(request)
        fsspec.filesystem("s3").put(run, f"{bucket}/run", recursive=True)
        run = f"s3://{bucket}/run"
    skipped = []
    found = latest(run, on_skip=skipped.append)
    assert found is not None and found[0] == f"{run}/checkpoint_000002" and found[1]["global_step"] == 2
    assert len(skipped) == 1 and re.fullmatch(f"skipped checkpoint_000004: {why}", skipped[0]), skipped


def test_a_restarted_worker_falls_back_from_the_checkpoint_ray_hands_it(good, tmp_path, capsys):
    """What rank 0 restores after a Ray restart: Ray's checkpoint if it verifies, else the newest that does, in
    one line; with none, an error naming both."""
    run = tmp_path / "run"
    shutil.copytree(good, run)
    newer, older = str(run / "checkpoint_000004"), str(run / "checkpoint_000002")
    assert checkpoint.usable(newer, str(run)) == newer and capsys.readouterr().out == ""
    truncate(run / "checkpoint_000004" / "ds" / "mp_rank_00_model_states.pt")
    assert checkpoint.usable(newer, str(run)) == older
    assert re.fullmatch(r"\[minconv\] skipped checkpoint_000004: ds/mp_rank_00_model_states.pt is \d+ bytes, the "
                        r"manifest says \d+; restoring checkpoint_000002 \(step 2\)\n", capsys.readouterr().out)
    truncate(run / "checkpoint_000002" / "model.pt")
    with pytest.raises(CheckpointError, match=r"^checkpoint_000004 cannot be restored \(ds/mp_rank_00_model_states.pt "
                                              r"is \d+ bytes, the manifest says \d+\) and no other checkpoint under"):
        checkpoint.usable(newer, str(run))


def test_a_restarted_worker_takes_a_newer_checkpoint_than_ray_registered(good, tmp_path, capsys):
    """Ray registers a checkpoint once it has polled every rank's report of it: a worker lost just after reporting
    leaves Ray one checkpoint behind (or on none), though storage holds a newer complete one. The restart takes
    the newest verified one, in one line; a new run's empty directory gives nothing to restore."""
    run = tmp_path / "run"
    shutil.copytree(good, run)
    newer, older = str(run / "checkpoint_000004"), str(run / "checkpoint_000002")
    for registered in (older, None):
        assert checkpoint.usable(registered, str(run)) == newer
        assert capsys.readouterr().out == (
            "[minconv] restoring checkpoint_000004 (step 4): the last checkpoint Ray registered is "
            f"{'checkpoint_000002' if registered else 'none'} (a worker was lost before Ray took every rank's report "
            "of the newer one)\n")
    (run / "checkpoint_000004" / "manifest_rank0.json").unlink()  # what an upload cut short leaves: not newer
    assert checkpoint.usable(older, str(run)) == older and capsys.readouterr().out == ""
    assert checkpoint.usable(None, str(tmp_path / "new-run")) is None


def test_a_perturbed_size_fails_the_check(good):
    """The size check is exact: one byte more is as wrong as half the file."""
    ckpt, name = good / "checkpoint_000004", "ds/mp_rank_00_model_states.pt"
    fs = fsspec.filesystem("file")
    checkpoint.manifest.verify(fs, str(ckpt))
    size = sizes(ckpt)[name]
    with open(ckpt / name, "ab") as f:
        f.write(b"\0")
    try:
        with pytest.raises(CheckpointError, match=rf"^{name} is {size + 1} bytes, the manifest says {size}$"):
            checkpoint.manifest.index(fs, str(ckpt))
    finally:
        with open(ckpt / name, "rb+") as f:
            f.truncate(size)
    checkpoint.manifest.verify(fs, str(ckpt))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_run_directory_is_claimed_once(where, tmp_path, request):
    directory = f"s3://{use_moto(request)}/runs/my run" if where == "s3" else str(tmp_path / "runs" / "my run")
    runs.claim(directory, "my run")
    for attempt in (runs.check_free, runs.claim):
        with pytest.raises(ConfigError, match=r"^run.name: run 'my run' already exists in .*my run \(started .* pid "
                                              r"\d+\); continue it with --resume 'my run', or choose another run.name"):
            attempt(directory, "my run")


def test_two_default_names_in_the_same_second_differ(monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261203-120000")
    first, second = runs.default_name("minconvgru"), runs.default_name("minconvgru")
    assert first != second and first.startswith("minconvgru-20261203-120000-")
