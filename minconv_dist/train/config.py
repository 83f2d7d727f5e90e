"""One typed training config: the dataclass defaults are the only defaults; YAML files and `key=value`
overrides are checked against it, so an unknown key or a value of the wrong type fails naming the key.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from minconv_dist.models import ARCHS, PADDINGS


class ConfigError(ValueError):
    """A config key is unknown or its value is invalid; the message names the dotted key."""


@dataclass
class ModelConfig:
    arch: str = "minconvgru"
    hidden_sizes: list[int] = field(default_factory=lambda: [24, 24, 24])
    padding: str = "cylinder"
    norm: str = "layer"
    tanh_encoder: bool = False
    scan_method: str = "auto"
    # Min cells: conv + gates + scan per chunk of this many frames, recomputed in backward, so memory grows
    # with the chunk, not with the sequence (exact gradients; for very long sequences). null: no chunking.
    chunk_size: int | None = None


@dataclass
class DataConfig:
    url: str | None = None  # None: the embedded synthetic ERA5-like store (minconv_dist.data.default_store)
    channels: list[str] = field(default_factory=lambda: ["z"])
    time_dim: str = "time"
    level_dim: str = "level"
    lat_dim: str = "lat"
    lon_dim: str = "lon"
    sample_dim: str | None = None  # trajectory dim of a sample store (Navier–Stokes: "sample"); None: one series
    storage_options: dict[str, Any] = field(default_factory=dict)
    stats_path: str | None = None  # NormStats JSON; None: computed over data.train_range before training
    # Defaults fit the synthetic store (2015-2016); the paper uses 1979-2014 / 2015-2016 (configs/era5_weatherbench.yaml).
    # null: the whole time axis (sample stores, whose time is within each trajectory).
    train_range: list[str] | None = field(default_factory=lambda: ["2015-01-01", "2015-12-31"])
    val_range: list[str] | None = field(default_factory=lambda: ["2016-01-01", "2016-03-31"])
    # [start, stop) sample indices of a sample store's splits; required with sample_dim, disjoint
    train_samples: list[int] | None = None
    val_samples: list[int] | None = None
    coarsen: int = 2
    sequence_length: int = 24  # T: frames predicted per window; each window holds T + 1 frames
    teacher_steps: int = 20  # k: frames read teacher-forced; the last T - k are closed loop
    stride: int = 24  # hours between window starts in the training period
    batch_size: int = 4  # per worker, per micro-step
    loader_workers: int = 0
    input_noise: float = 0.0  # std of Gaussian noise added to the (normalised) inputs


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    epochs: int = 3
    steps_per_epoch: int | None = None  # cap on micro-steps per epoch; None: the whole training period
    warmup_steps: int = 10  # optimizer steps of linear warm-up before the cosine decay
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    # >0: the closed loop grows linearly from 1 step to T - k over these many epochs
    curriculum_epochs: int = 0


@dataclass
class ParallelConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    zero_stage: int = 0
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU (gloo)
    max_failures: int = 2
    allow_autoscale: bool = False  # True: do not refuse a request larger than the cluster is now


@dataclass
class CheckpointConfig:
    val_every: int = 50  # micro-steps between validation + checkpoint (and one at the end)
    val_batches: int = 4  # per worker
    keep: int = 2  # best N checkpoints by val_loss (plus the latest)


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite mlflow.db in the working directory
    experiment: str = "minconv_dist"
    registered_model: str = "minconv-era5"  # "" skips registration
    log_every: int = 10  # micro-steps between metric log lines
    plot: bool = True


@dataclass
class RunConfig:
    name: str | None = None  # None: "<arch>-<timestamp>"
    storage_path: str = "runs"  # local dir (made absolute) or s3:// / gs:// URI shared by all nodes
    seed: int = 0
    stop_after_steps: int | None = None  # stop early (as if interrupted), checkpointed; --resume continues


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        """Check values that types alone do not catch; raise ConfigError naming the key."""
        m, d, o, p, c, t = self.model, self.data, self.optim, self.parallel, self.checkpoint, self.tracking
        _choice("model.arch", m.arch, sorted(ARCHS))
        _choice("model.padding", m.padding, sorted(PADDINGS))
        _choice("model.norm", m.norm, ["layer", "group"])
        _check("model.hidden_sizes", m.hidden_sizes and len(set(m.hidden_sizes)) == 1 and m.hidden_sizes[0] > 0,
               m.hidden_sizes, "a non-empty list of one positive size repeated")
        _check("model.chunk_size", m.chunk_size is None or m.chunk_size >= 1, m.chunk_size, "null or >= 1")
        _check("data.channels", len(d.channels) > 0, d.channels, "at least one channel")
        for key in ("train_range", "val_range"):
            value = getattr(d, key)
            _check(f"data.{key}", value is None or len(value) == 2, value, "[start, end] or null")
        for key in ("train_samples", "val_samples"):
            value = getattr(d, key)
            if d.sample_dim is None:
                _check(f"data.{key}", value is None, value, "null unless data.sample_dim is set")
            else:
                _check(f"data.{key}", value is not None and len(value) == 2 and 0 <= value[0] < value[1], value,
                       f"[start, stop) sample indices with 0 <= start < stop (data.sample_dim={d.sample_dim!r})")
        if d.sample_dim is not None:
            (t0, t1), (v0, v1) = d.train_samples, d.val_samples
            _check("data.val_samples", v1 <= t0 or v0 >= t1, d.val_samples,
                   f"disjoint from data.train_samples={d.train_samples}")
        for key in ("coarsen", "sequence_length", "stride", "batch_size"):
            _check(f"data.{key}", getattr(d, key) >= 1, getattr(d, key), ">= 1")
        _check("data.teacher_steps", 1 <= d.teacher_steps <= d.sequence_length, d.teacher_steps,
               f"in [1, data.sequence_length={d.sequence_length}]")
        _check("data.loader_workers", d.loader_workers >= 0, d.loader_workers, ">= 0")
        _check("data.input_noise", d.input_noise >= 0, d.input_noise, ">= 0")
        _check("optim.lr", o.lr > 0, o.lr, "> 0")
        _check("optim.betas", len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), o.betas, "two values in [0, 1)")
        for key in ("epochs", "grad_accum"):
            _check(f"optim.{key}", getattr(o, key) >= 1, getattr(o, key), ">= 1")
        _check("optim.steps_per_epoch", o.steps_per_epoch is None or o.steps_per_epoch >= 1, o.steps_per_epoch, ">= 1")
        for key in ("warmup_steps", "grad_clip", "weight_decay", "curriculum_epochs"):
            _check(f"optim.{key}", getattr(o, key) >= 0, getattr(o, key), ">= 0")
        _check("optim.min_lr_ratio", 0 <= o.min_lr_ratio <= 1, o.min_lr_ratio, "in [0, 1]")
        _check("parallel.num_workers", p.num_workers >= 1, p.num_workers, ">= 1")
        _check("parallel.cpus_per_worker", p.cpus_per_worker > 0, p.cpus_per_worker, "> 0")
        _check("parallel.gpus_per_worker", p.gpus_per_worker > 0, p.gpus_per_worker, "> 0")
        _choice("parallel.zero_stage", p.zero_stage, [0, 1, 2, 3])
        _choice("parallel.precision", p.precision, ["auto", "fp32", "bf16"])
        _check("parallel.max_failures", p.max_failures >= -1, p.max_failures, ">= -1 (-1: retry forever)")
        _check("checkpoint.val_every", c.val_every >= 1, c.val_every, ">= 1")
        _check("checkpoint.val_batches", c.val_batches >= 1, c.val_batches, ">= 1")
        _check("checkpoint.keep", c.keep >= 1, c.keep, ">= 1")
        _check("tracking.log_every", t.log_every >= 1, t.log_every, ">= 1")
        _check("run.stop_after_steps", self.run.stop_after_steps is None or self.run.stop_after_steps >= 1,
               self.run.stop_after_steps, ">= 1")
        return self


def _check(key: str, ok: Any, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: got {value!r}, expected {expected}")


def _choice(key: str, value: Any, allowed: list) -> None:
    _check(key, value in allowed, value, f"one of {allowed}")


def _convert(key: str, tp: Any, value: Any) -> Any:
    """Check `value` against the annotation `tp` (ints widen to floats; nothing else is coerced)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(key, inner[0], value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {[f.name for f in dataclasses.fields(tp)]}, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; expected one of {sorted(names)}")
    base = cls()
    kwargs = {}
    for name in names:
        if name in values:
            kwargs[name] = _convert(prefix + name, hints[name], values[name])
        else:
            kwargs[name] = getattr(base, name)
    return cls(**kwargs)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class _Loader(yaml.SafeLoader):
    """YAML without PyYAML's 1.1 quirks: `1e-3` is a float, `2015-01-01` stays a string."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> dict[str, Any]:
    """`optim.lr=1e-3` -> {"optim": {"lr": 0.001}}; the value is read as YAML (lists, null, numbers)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key=value, e.g. optim.lr=1e-3")
    out: Any = _load_yaml(raw) if raw.strip() else ""
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    """Defaults <- `base` (a job's own settings) <- YAML file <- `key=value` overrides; validated."""
    values: dict[str, Any] = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = _load_yaml(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level")
        values = _merge(values, loaded)
    for text in overrides:
        values = _merge(values, parse_override(text))
    return _build(TrainConfig, values).validate()


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, values).validate()
