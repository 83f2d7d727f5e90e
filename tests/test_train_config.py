"""The training config, its CLI, the LR schedule and curriculum, and the cluster YAMLs (no Ray session)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from minconv_dist.train.config import ConfigError, TrainConfig, load_config
from minconv_dist.train.engine import lr_lambda
from minconv_dist.train.loop import teacher_steps_at

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_yaml_and_overrides(tmp_path):
    assert load_config() == TrainConfig()
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 5e-4\ndata:\n  train_range: [1979-01-01, 2014-12-31]\n")
    cfg = load_config(path, ["parallel.zero_stage=3", "model.hidden_size=8", "model.layers=2", "data.url=null",
                             "model.chunk_size=16"])
    assert cfg.model.chunk_size == 16
    assert cfg.optim.lr == 5e-4 and cfg.data.train_range == ["1979-01-01", "2014-12-31"]
    assert cfg.parallel.zero_stage == 3 and (cfg.model.hidden_size, cfg.model.layers) == (8, 2) and cfg.data.url is None
    assert cfg.optim.epochs == TrainConfig().optim.epochs  # untouched keys keep the dataclass default


@pytest.mark.parametrize("override, match", [
    ("optim.lrr=1", "unknown config key optim.lrr"),
    ("modell.arch=x", "unknown config key modell"),
    ("parallel.zero_stage=4", r"parallel.zero_stage: got 4"),
    ("data.batch_size=two", "data.batch_size: expected int"),
    ("data.teacher_steps=30", r"data.teacher_steps: got 30, expected in \[1, data.sequence_length=24\]"),
    ("model.arch=transformer", "model.arch"),
    ("model.hidden_size=0", r"model.hidden_size: got 0, expected >= 1"),
    ("model.norm=batch", r"model.norm: got 'batch', expected one of \['layer', 'group'\]"),
    ("model.chunk_size=0", r"model.chunk_size: got 0, expected >= 1"),
    ("data.max_read_amplification=1", r"data.max_read_amplification: got 1.0, expected > 1"),
    ("parallel.use_gpu=maybe", "parallel.use_gpu: expected bool"),
    ("optim", "expected key=value"),
    ("data.train_samples=[0, 8]", r"data.train_samples: got \[0, 8\], expected null unless data.dims.sample"),
    ("parallel.placement=strict_spread", r"parallel.placement: got 'strict_spread', expected one of \['pack', 'spread'\]"),
    ("parallel.worker_resources={GPU: 1}", r"parallel.worker_resources: got \{'GPU': 1.0\}, expected a mapping of custom "
                                           r"resource names \(not CPU or GPU"),
    ("parallel.worker_resources={spot: 0}", r"parallel.worker_resources: got \{'spot': 0.0\}"),
    ("parallel.worker_resources=[spot]", r"parallel.worker_resources: expected a mapping"),
    ("checkpoint.preemption_grace_s=-1", r"checkpoint.preemption_grace_s: got -1.0, expected >= 0"),
    ("run.name=my run ü", r"run.name: got 'my run ü', expected 1-100 ASCII letters, digits, '.', '_' or '-'"),
    ("run.name=-resume", r"run.name: got '-resume', expected .* starting with a letter or digit"),
    ("run.name=a/b", r"run.name: got 'a/b', expected"),
    ("model.chrono_max=2", r"model.chrono_max: got 2, expected >= 3"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[override])


def test_chrono_init_needs_a_min_cell():
    with pytest.raises(ConfigError, match=r"model.chrono_max: got 100, expected null for model.arch='convlstm'"):
        load_config(overrides=["model.arch=convlstm", "model.chrono_max=100"])


@pytest.mark.parametrize("override, match", [
    ("data.train_samples=null", r"data.train_samples: got None, expected \[start, stop\) sample indices"),
    ("data.val_samples=[5, 5]", r"data.val_samples: got \[5, 5\]"),
    ("data.val_samples=[6, 9]", r"data.val_samples: got \[6, 9\], expected disjoint from data.train_samples=\[0, 8\]"),
])
def test_sample_split_is_checked(override, match):
    ns = ["data.dims.sample=sample", "data.train_samples=[0, 8]", "data.val_samples=[8, 10]"]
    cfg = load_config(overrides=ns)
    assert cfg.data.train_samples == [0, 8] and cfg.data.val_samples == [8, 10]
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[*ns, override])


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim:\n  lr: [1e-3,\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"config file .*broken.yaml:\d+:\d+: not valid YAML"):
        load_config(broken)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown config key optim.learning_rate"):
        load_config(bad)


def leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        out.update(leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_set_what_they_say(name):
    """Every value a shipped YAML sets arrives in the config (on top of the job preset it is meant for)."""
    preset = ROOT / "configs" / "navier_stokes.yaml" if name == "navier_stokes_paper.yaml" else None
    cfg = load_config(ROOT / "configs" / name, preset=preset).to_dict()
    for key, value in leaves(yaml.safe_load((ROOT / "configs" / name).read_text())).items():
        got = leaves(cfg)[key]
        assert got == value or str(got) == str(value) or got == [str(v) for v in value], (key, got, value)


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = load_config(overrides=["optim.warmup_steps=4", "optim.min_lr_ratio=0.1"])
    f = lr_lambda(cfg, total_steps=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(20) == pytest.approx(0.1) and f(12) < f(8)


def test_curriculum_lengthens_the_closed_loop():
    cfg = load_config(overrides=["data.sequence_length=24", "data.teacher_steps=20", "optim.curriculum_epochs=3"])
    closed = [24 - teacher_steps_at(cfg, e) for e in range(5)]
    assert closed == [1, 2, 3, 4, 4]
    assert teacher_steps_at(load_config(), 0) == 20  # no curriculum: the final split from the start


@pytest.mark.parametrize("job, store", [("jobs/train_era5.py", "synthetic ERA5-like z500 store"),
                                        ("jobs/train_navier_stokes.py", "16-trajectory Navier-Stokes vorticity store")])
def test_jobs_have_help(job, store):
    out = subprocess.run([sys.executable, job, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--set" in out.stdout and "--resume" in out.stdout
    assert store in " ".join(out.stdout.split())  # --url names the job's own default store


def test_job_rejects_bad_config_before_ray():
    out = subprocess.run([sys.executable, "jobs/train_era5.py", "--set", "optim.lr=-1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "optim.lr: got -1" in out.stderr
    # Ray's metric tags are ASCII: this name once failed in Ray's controller (UnicodeEncodeError, exit 1)
    out = subprocess.run([sys.executable, "jobs/train_era5.py", "--name", "my run ü"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: run.name: got 'my run ü', expected 1-100 ASCII")
    assert len(out.stderr.splitlines()) == 1, out.stderr


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cluster_yaml_passes_rays_validator(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / name).read_text())
    validate_config(prepare_config(config))  # what `ray up` runs: defaults filled in, then Ray's JSON schema
    broken = {**config, "available_node_types": {**config["available_node_types"], "head": {
        **config["available_node_types"]["head"], "min_worker": 0}}}
    with pytest.raises(Exception, match="min_worker"):  # the validator is not a no-op
        validate_config(prepare_config(broken))
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_types and config["available_node_types"][config["head_node_type"]]["resources"].get("GPU", 0) == 0
    # a spot / preemptible worker type, kept off unless a job asks for its `spot` resource (docs/cluster.md)
    (spot,) = [t for t in gpu_types if t["resources"].get("spot")]
    market = spot["node_config"].get("InstanceMarketOptions", {}).get("MarketType") or \
        spot["node_config"].get("scheduling", [{}])[0].get("preemptible")
    assert market in ("spot", True) and spot["resources"]["spot"] == spot["resources"]["GPU"]
    assert not any(k in (ROOT / "cluster" / name).read_text().lower() for k in ("secret_access_key", "private_key\":"))


@pytest.mark.parametrize("overrides, match", [
    (["parallel.sequence_parallel=3"], r"parallel.sequence_parallel: got 3, expected a divisor of parallel.num_workers=2"),
    (["parallel.sequence_parallel=2", "data.teacher_steps=1"],
     r"parallel.sequence_parallel: got 2, expected at most data.teacher_steps=1"),
    (["parallel.sequence_parallel=2", "optim.curriculum_epochs=2"],
     r"optim.curriculum_epochs: got 2, expected 0 with parallel.sequence_parallel=2"),
    (["parallel.sequence_parallel=2", "data.nan_policy=skip"],
     r"data.nan_policy: got 'skip', expected 'raise' or 'fill' with parallel.sequence_parallel=2"),
])
def test_time_parallelism_is_checked(overrides, match):
    """parallel.sequence_parallel's constraints, each error naming the key to change (the arch and ZeRO-3 ones:
    tests/test_time_parallel.py)."""
    assert load_config(overrides=["parallel.sequence_parallel=2"]).parallel.sequence_parallel == 2
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


def test_max_read_amplification_sets_the_training_windows_blocks(tiny_store):
    """The config key reaches WindowDataset: a lower bound makes longer blocks (6-frame chunks, T + 1 = 7)."""
    from minconv_dist.data import NormStats
    from minconv_dist.train.datasets import window_dataset

    stats = NormStats(["z"], [0.0], [1.0])
    blocks = []
    for amplification in (1.5, 1.1):
        cfg = load_config(overrides=[f"data.url={tiny_store}", "data.channels=[z]", "data.sequence_length=6",
                                     "data.teacher_steps=4", "data.train_range=[2015-01-01, 2015-01-08]",
                                     "data.coarsen=1", f"data.max_read_amplification={amplification}"])
        blocks.append(window_dataset(cfg, tiny_store, stats, "train", rank=0, world_size=1).block)
    assert blocks == [12, 60]  # one extra chunk per block: <= 0.5 and <= 0.1 of the block


def test_default_data_config_reads_the_embedded_stores_layout(tiny_wb2_store, tiny_store):
    """data.channels defaults to the embedded store's prognostic variables; data.dims' default lat/lon are read as
    the store spells them (latitude/longitude there), and the workers get the store's spelling."""
    from minconv_dist.data import DimNames
    from minconv_dist.train.trainer import _check_data

    small = ["data.train_range=[2015-01-01, 2015-01-07]", "data.val_range=[2015-01-08, 2015-01-10]",
             "data.sequence_length=6", "data.teacher_steps=4", "data.stride=6", "data.batch_size=2"]
    cfg = load_config(overrides=[f"data.url={tiny_wb2_store}", *small])
    assert cfg.data.channels == ["geopotential@500", "temperature@850"] and cfg.data.dims == DimNames()
    stats, grid, *_ = _check_data(cfg, tiny_wb2_store)
    assert stats.channels == ["geopotential@500", "temperature@850"] and grid == (16, 32)
    assert cfg.data.dims == DimNames(lat="latitude", lon="longitude")
    assert cfg.to_dict()["data"]["dims"]["lat"] == "latitude"  # what the workers are given
    v1 = load_config(overrides=[f"data.url={tiny_store}", "data.channels=[z]", *small])
    _check_data(v1, tiny_store)
    assert v1.data.dims == DimNames()  # a WeatherBench v1 store keeps lat/lon
