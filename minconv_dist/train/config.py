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
from typing import Annotated, Any, Literal, Union

import yaml

from minconv_dist.data import DimNames, parse_channels
from minconv_dist.data.forcings import FORCINGS
from minconv_dist.data.store import READERS, resolve_reader
from minconv_dist.data.windows import NAN_POLICIES
from minconv_dist.models import ARCHS, NORMS, PADDINGS, PREDICTS, SEQUENTIAL_ARCHS
from minconv_dist.train.losses import channel_factors


class ConfigError(ValueError):
    """A config key is unknown or its value is invalid; the message names the dotted key."""


@dataclass(frozen=True)
class Bounds:
    """A numeric range, or a list length, attached to a field's type: `Annotated[int, Bounds(ge=1)]`."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    length: int | None = None
    min_length: int | None = None

    def check(self, key: str, value: Any) -> None:
        if value is None:
            return
        if self.length is not None:
            _check(key, len(value) == self.length, value, f"a list of {self.length} values")
        if self.min_length is not None:
            _check(key, len(value) >= self.min_length, value, f"a list of at least {self.min_length} values")
        for bound, ok, text in ((self.ge, lambda b: value >= b, ">="), (self.gt, lambda b: value > b, ">"),
                                (self.le, lambda b: value <= b, "<="), (self.lt, lambda b: value < b, "<")):
            if bound is not None:
                _check(key, ok(bound), value, f"{text} {bound:g}")


@dataclass(frozen=True)
class Matches:
    """The form a string field must have, attached to its type: `Annotated[str, Matches(regex, text)]`."""

    regex: str
    text: str  # what the regex allows, in words, for the error

    def check(self, key: str, value: Any) -> None:
        if value is not None:
            _check(key, re.fullmatch(self.regex, value), value, self.text)


AtLeast1 = Annotated[int, Bounds(ge=1)]
# A run name becomes a directory and URL path (run.storage_path/<name>), a Ray metric tag (Ray encodes tags as
# ASCII: "my run ü" failed in Ray's controller with UnicodeEncodeError) and part of printed commands.
RunName = Annotated[str, Matches(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", "1-100 ASCII letters, digits, '.', '_' or '-', "
                                 "starting with a letter or digit (it names a directory, a URL path and a Ray "
                                 "metric tag, which must be ASCII), e.g. 'my-run-u'")]
NonNegative = Annotated[float, Bounds(ge=0)]
Pair = Bounds(length=2)
Arch = Literal[tuple(sorted(ARCHS))]
Padding = Literal[tuple(sorted(PADDINGS))]
Norm = Literal[NORMS]


@dataclass
class ModelConfig:
    arch: Arch = "minconvgru"
    hidden_size: AtLeast1 = 24  # channels of every layer (equal: each layer adds a residual)
    layers: AtLeast1 = 3
    padding: Padding = "cylinder"
    norm: Norm = "layer"
    tanh_encoder: bool = False
    scan_method: str = "auto"
    # Min cells: conv + gates + scan per chunk of this many frames, recomputed in backward, so memory grows
    # with the chunk, not with the sequence (exact gradients; for very long sequences). null: no chunking.
    chunk_size: AtLeast1 | None = None
    # torch.compile each layer's residual add + post-norm (Network.fuse_residual_norm): 1.15x the bf16 step on
    # a GPU; the first steps pay the compile (seconds to a minute).
    fuse_norm: bool = False
    # What the decoder predicts (docs/models.md, "State or tendency"): state, the next frame (the paper's); or
    # tendency, its change from the frame read in units of the change's std (GraphCast's, anemoi's).
    predict: Literal[PREDICTS] = "state"
    # Min cells: chrono initialisation of the retain gates (MinConvCell.chrono_init_), their time constants spread
    # over [2, chrono_max] frames, so states can hold for weeks from the start. null: torch's init (a near 0.5).
    chrono_max: Annotated[int, Bounds(ge=3)] | None = None


@dataclass
class DataConfig:
    url: str | None = None  # None: the embedded synthetic ERA5-like store (minconv_dist.data.default_store)
    # The defaults fit the embedded store: its prognostic variables, in the WeatherBench2 layout.
    channels: Annotated[list[str], Bounds(min_length=1)] = field(
        default_factory=lambda: ["geopotential@500", "temperature@850"])
    # The store's dimension names; dims.sample for trajectories. lat/lon may be spelled either way: a store with
    # latitude/longitude (WeatherBench2) instead of lat/lon (WeatherBench v1), or the reverse, is read as it is.
    dims: DimNames = field(default_factory=DimNames)
    storage_options: dict[str, Any] = field(default_factory=dict)
    # How chunks are fetched and decoded (docs/data.md, "Readers"): auto (the fast-io extra's readers where it
    # is installed and they apply, else zarr-python), zarr, zarrs, or obstore (zarr-python's pipeline, s3:// by
    # obstore).
    reader: Literal[READERS] = "auto"
    stats_path: str | None = None  # NormStats JSON; None: computed over the training split before training
    # Defaults fit the synthetic store (2015-2016); the paper uses 1979-2014 / 2015-2016 (configs/era5_weatherbench.yaml).
    # [start, end], both inclusive; null: the whole time axis (sample stores, whose time is within each trajectory).
    train_range: Annotated[list[str] | None, Pair] = field(default_factory=lambda: ["2015-01-01", "2015-12-31"])
    val_range: Annotated[list[str] | None, Pair] = field(default_factory=lambda: ["2016-01-01", "2016-03-31"])
    # [start, stop) sample indices of a sample store's splits; required with dims.sample, disjoint
    train_samples: Annotated[list[int] | None, Pair] = None
    val_samples: Annotated[list[int] | None, Pair] = None
    coarsen: AtLeast1 = 2
    sequence_length: AtLeast1 = 24  # T: frames predicted per window; each window holds T + 1 frames
    teacher_steps: AtLeast1 = 20  # k: frames read teacher-forced; the last T - k are closed loop
    stride: AtLeast1 = 24  # time steps between window starts in the training split
    batch_size: AtLeast1 = 4  # per worker, per micro-step
    loader_workers: Annotated[int, Bounds(ge=0)] = 0
    input_noise: NonNegative = 0.0  # std of Gaussian noise added to the normalised inputs
    nan_policy: Literal[NAN_POLICIES] = "raise"  # NaN in a window: raise, skip the window, fill with the mean
    # A block's extra frames (the T frames past it that its last windows need) over its own frames, at most.
    # Lower: longer blocks, fewer zarr calls (faster on small frames), a coarser shuffle (docs/data.md).
    max_read_amplification: Annotated[float, Bounds(gt=1)] = 1.05
    # Per channel, in data.channels order: [low, high], where its values can physically lie (store units), or
    # null for the default (minconv_dist.data.DEFAULT_BOUNDS; none: only finiteness). Checked before training.
    bounds: list[Annotated[list[float], Pair] | None] | None = None
    # Inputs the model reads but does not predict (docs/data.md, "Forcings and static fields"). Forcings: computed
    # from each frame's valid time and the grid, e.g. [local_solar_time, day_of_year, toa_insolation,
    # cos_latitude, longitude]. Static: variables without a time dim (e.g. [geopotential_at_surface,
    # land_sea_mask]) of data.static_url (null: data.url), coarsened like the data.
    forcings: list[str] = field(default_factory=list)
    static: list[str] = field(default_factory=list)
    static_url: str | None = None
    # Stateful truncated training (docs/training.md, "Stateful training"): each worker trains batch_size streams,
    # each a stretch of the training series in time order, window after window (data.stride must equal
    # data.sequence_length); a window starts from the state the one before it ended in, carried without its
    # gradient, and saved in the checkpoints. Validation stays stateless.
    stateful: bool = False

    def __post_init__(self) -> None:
        _check("data.teacher_steps", self.teacher_steps <= self.sequence_length, self.teacher_steps,
               f"in [1, data.sequence_length={self.sequence_length}]")
        _check("data.forcings", set(self.forcings) <= set(FORCINGS) and len(set(self.forcings)) == len(self.forcings),
               self.forcings, f"distinct names from {list(FORCINGS)}")
        _check("data.static", len(set(self.static)) == len(self.static), self.static, "distinct variable names")
        try:  # a fast reader asked for without the fast-io extra, or with storage_options obstore cannot take
            for url in (self.url, self.static_url):  # the static fields' store is read by data.reader too
                resolve_reader(url or "", self.storage_options or None, self.reader)
        except ValueError as err:
            raise ConfigError(f"data.reader: {err}") from err
        if self.bounds is not None:
            _check("data.bounds", len(self.bounds) == len(self.channels) and all(
                b is None or b[0] < b[1] for b in self.bounds), self.bounds,
                f"one [low, high] (low < high) or null per channel of data.channels={self.channels}")
        for key in ("train_samples", "val_samples"):
            value = getattr(self, key)
            if self.dims.sample is None:
                _check(f"data.{key}", value is None, value, "null unless data.dims.sample is set")
            else:
                _check(f"data.{key}", value is not None and 0 <= value[0] < value[1], value,
                       f"[start, stop) sample indices with 0 <= start < stop (data.dims.sample={self.dims.sample!r})")
        if self.stateful:
            why = "with data.stateful=true"
            _check("data.stride", self.stride == self.sequence_length, self.stride,
                   f"data.sequence_length={self.sequence_length} {why}: each window starts where the one before "
                   "ended")
            _check("data.dims.sample", self.dims.sample is None, self.dims.sample,
                   f"null {why}: a stream walks one time series, and would cross independent trajectories")
            _check("data.nan_policy", self.nan_policy != "skip", self.nan_policy,
                   f"'raise' or 'fill' {why}: a skipped window would break its stream")
        if self.dims.sample is not None:
            (t0, t1), (v0, v1) = self.train_samples, self.val_samples
            _check("data.val_samples", v1 <= t0 or v0 >= t1, self.val_samples,
                   f"disjoint from data.train_samples={self.train_samples}")


@dataclass
class OptimConfig:
    lr: Annotated[float, Bounds(gt=0)] = 1e-3
    weight_decay: NonNegative = 0.0
    betas: Annotated[list[Annotated[float, Bounds(ge=0, le=0.999999)]], Pair] = field(
        default_factory=lambda: [0.9, 0.999])
    epochs: AtLeast1 = 3
    steps_per_epoch: AtLeast1 | None = None  # cap on micro-steps per epoch; None: the whole training split
    warmup_steps: Annotated[int, Bounds(ge=0)] = 10  # optimizer steps of linear warm-up before the cosine decay
    min_lr_ratio: Annotated[float, Bounds(ge=0, le=1)] = 0.0
    grad_clip: NonNegative = 1.0  # 0 disables clipping
    grad_accum: AtLeast1 = 1
    # >0: the closed loop grows linearly from 1 step to T - k over these many epochs
    curriculum_epochs: Annotated[int, Bounds(ge=0)] = 0
    # EMA of the weights, decay per optimizer step (docs/training.md, "EMA of the weights"): validation and the
    # exported model use it, training goes on with the raw weights. null or 0: off; anemoi-training uses 0.999.
    ema_decay: Annotated[float, Bounds(ge=0, lt=1)] | None = None


@dataclass
class LossConfig:
    """Weights of the training loss's squared errors (docs/training.md, "The loss"): per latitude row, channel
    and lead, each normalised to mean 1, so the loss stays on the scale of the plain normalised MSE."""

    # the evaluation's cell-area weights of the latitude rows (WeatherBench2's); null: on when the store's
    # data.dims.lat is a latitude, uniform otherwise (Navier–Stokes' y); true on a grid without latitude is refused
    area_weighted: bool | None = None
    # {variable: weight} (GraphCast's per-variable weights); the variables of data.channels not named weigh 1
    variable_weights: dict[str, NonNegative] = field(default_factory=dict)
    # uniform | proportional (GraphCast: level / mean of the trained levels) | {level: weight} (levels not
    # named weigh 1); channels without a level weigh 1
    level_weights: Literal["uniform", "proportional"] | dict[int | float, NonNegative] = "uniform"
    # null: uniform; else one weight per lead 1 .. T - k + 1: lead 1 weighs the k teacher-forced (one-step)
    # predictions, lead i + 1 the i-th closed-loop step
    lead_weights: list[NonNegative] | None = None
    # mse: the weighted squared error; crps: the almost-fair CRPS (anemoi's AFCRPS) of loss.members predictions
    # per window, each from its own Gaussian noise of std data.input_noise (> 0) on the inputs, with these weights
    kind: Literal["mse", "crps"] = "mse"
    members: Annotated[int, Bounds(ge=2)] | None = None  # M, with loss.kind=crps (the model runs M x batch_size)
    alpha: Annotated[float, Bounds(gt=0, le=1)] = 0.95  # AFCRPS: 1 is the fair CRPS; anemoi's default 0.95


@dataclass
class ParallelConfig:
    num_workers: AtLeast1 = 2
    use_gpu: bool = False
    cpus_per_worker: Annotated[float, Bounds(gt=0)] = 1.0
    gpus_per_worker: Annotated[float, Bounds(gt=0)] = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 0
    # bf16: bf16 weights and activations, fp32 masters in the optimizer (DeepSpeed's bf16); bf16-mixed: fp32
    # weights, bf16 compute under torch.autocast (DeepSpeed's torch_autocast). auto: bf16-mixed on GPU, fp32 on CPU
    precision: Literal["auto", "fp32", "bf16", "bf16-mixed"] = "auto"
    max_failures: Annotated[int, Bounds(ge=-1)] = 2  # -1: retry forever
    allow_autoscale: bool = False  # True: do not refuse a request larger than the cluster is now
    # Ray Train's placement of the workers: pack (as few nodes as fit them: faster collectives) or spread (one per
    # node where there are enough: a lost node takes fewer workers with it). Both are soft: a restart after a
    # node is lost uses the nodes that are left (docs/cluster.md).
    placement: Literal["pack", "spread"] = "pack"
    # Custom Ray resources each worker asks for besides CPU and GPU, e.g. {spot: 1} for the cluster YAMLs' spot
    # workers, or {accelerator: 1} for the fake-GPU nodes of the autoscaling test (docs/cluster.md).
    worker_resources: dict[str, float] = field(default_factory=dict)
    # S: ranks that split each window in time (Min cells only; docs/training.md, "Time parallelism"). The workers
    # form num_workers / S data-parallel groups of S consecutive ranks; each rank reads one block of the
    # data.teacher_steps frames and the group's last rank runs the closed loop.
    sequence_parallel: AtLeast1 = 1

    def __post_init__(self) -> None:
        _check("parallel.worker_resources", all(
            isinstance(k, str) and k not in ("CPU", "GPU") and isinstance(v, (int, float)) and not isinstance(v, bool)
            and v > 0 for k, v in self.worker_resources.items()), self.worker_resources,
            "a mapping of custom resource names (not CPU or GPU: those are parallel.cpus_per_worker and "
            "parallel.gpus_per_worker) to amounts > 0")


@dataclass
class CheckpointConfig:
    val_every: AtLeast1 = 50  # micro-steps between validation + checkpoint (and one at the end)
    val_batches: AtLeast1 = 4  # per worker
    keep: AtLeast1 = 2  # best N checkpoints by val_loss (plus the latest)
    # SIGTERM (a spot node's preemption notice) gives a worker this long before it is killed: it trains on to the
    # next checkpoint if that fits in the time, then leaves; else it leaves at once and the run restarts from
    # the last checkpoint. 0: leave at once (docs/cluster.md, "Spot workers").
    preemption_grace_s: NonNegative = 20.0


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite mlflow.db in the working directory
    experiment: str = "minconv_dist"
    registered_model: str = "minconv-era5"  # "" skips registration
    log_every: AtLeast1 = 10  # micro-steps between metric log lines
    plot: bool = True
    # outages (docs/training.md, "What survives what"): training never waits for the server
    timeout_s: AtLeast1 = 10  # an MLflow request taking longer fails (no retries): the server counts as down
    retry_every_s: NonNegative = 30.0  # during an outage rank 0 offers the server what it spooled this often
    wait_s: NonNegative = 60.0  # the driver retries (with backoff) creating the run and finishing it this long


@dataclass
class RunConfig:
    name: RunName | None = None  # None: "<arch>-<YYYYmmdd-HHMMSS>-<6 hex>" (train/runs.py)
    storage_path: str = "runs"  # local dir (made absolute) or s3:// / gs:// URI shared by all nodes
    seed: int = 0
    stop_after_steps: AtLeast1 | None = None  # stop early (as if interrupted), checkpointed; --resume continues


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        """Checks across sections: the loss's weights against the channels and the window, stateful training and
        time parallelism (docs/training.md, "Stateful training", "Time parallelism")."""
        self._check_loss()
        if self.model.chrono_max is not None:
            _check("model.chrono_max", self.model.arch not in SEQUENTIAL_ARCHS, self.model.chrono_max,
                   f"null for model.arch={self.model.arch!r}: only Min cells have a retain gate to initialise")
        S = self.parallel.sequence_parallel
        if self.data.stateful:
            _check("parallel.sequence_parallel", S == 1, S,
                   "1 with data.stateful=true: the carry would have to enter at a time group's first rank")
            _check("loss.kind", self.loss.kind == "mse", self.loss.kind,
                   "'mse' with data.stateful=true: the carry holds one state per window, not per member")
        if S == 1:
            return
        key, why = "parallel.sequence_parallel", f"with parallel.sequence_parallel={S}"
        _check(key, self.parallel.num_workers % S == 0, S,
               f"a divisor of parallel.num_workers={self.parallel.num_workers}")
        _check(key, S <= self.data.teacher_steps, S,
               f"at most data.teacher_steps={self.data.teacher_steps} (each time rank reads >= 1 teacher-forced frame)")
        _check(key, self.model.arch not in SEQUENTIAL_ARCHS, S,
               f"1 for model.arch={self.model.arch!r}: its conv reads h_(t-1), so its time cannot be split (use a "
               "Min cell)")
        closed_loop = self.data.teacher_steps < self.data.sequence_length
        _check("parallel.zero_stage", self.parallel.zero_stage < 3 or not closed_loop, self.parallel.zero_stage,
               f"0, 1 or 2 {why} and a closed loop (data.teacher_steps < data.sequence_length): ZeRO-3 gathers a "
               "module's weights from all ranks at each call, and only the last time rank runs the closed loop")
        _check("optim.curriculum_epochs", self.optim.curriculum_epochs == 0, self.optim.curriculum_epochs,
               f"0 {why}: the time blocks are cut from data.teacher_steps, fixed for the run")
        _check("data.nan_policy", self.data.nan_policy != "skip", self.data.nan_policy,
               f"'raise' or 'fill' {why}: the ranks of a time group must skip the same windows, but each sees only "
               "its block")

    def _check_loss(self) -> None:
        """loss.* against data.channels and the window (docs/training.md, "The loss")."""
        loss, d = self.loss, self.data
        try:
            specs = parse_channels(d.channels)
        except ValueError as err:
            raise ConfigError(f"data.channels: {err}") from err
        names = [str(c) for c in specs]
        for variable in loss.variable_weights:
            if variable not in {c.variable for c in specs}:
                raise ConfigError(f"loss.variable_weights: {variable} is not a trained channel; channels are {names}")
        levels = sorted({c.level for c in specs if c.level is not None})
        if loss.level_weights != "uniform" and not levels:
            raise ConfigError(f"loss.level_weights: got {loss.level_weights!r}, but no channel is on a pressure level "
                              f"(variable@level); channels are {names}")
        if isinstance(loss.level_weights, dict):
            for level in loss.level_weights:
                if float(level) not in levels:
                    raise ConfigError(f"loss.level_weights: level {level:g} is not a trained level; the channels' "
                                      f"levels are {', '.join(f'{x:g}' for x in levels)}")
        factors = channel_factors(names, loss.variable_weights, loss.level_weights)
        if not factors.any():
            raise ConfigError(f"loss.variable_weights / loss.level_weights: every channel of {names} weighs 0 "
                              "(variable weight x level weight); the loss would be 0")
        if loss.kind == "crps":
            _check("loss.members", loss.members is not None, loss.members,
                   "an int >= 2 with loss.kind='crps' (the ensemble's size)")
            _check("data.input_noise", d.input_noise > 0, d.input_noise,
                   "> 0 with loss.kind='crps': the members differ by their input noise (0: identical members)")
        else:
            _check("loss.members", loss.members is None, loss.members,
                   f"null with loss.kind={loss.kind!r} (an ensemble is trained with loss.kind=crps)")
        leads = loss.lead_weights
        if leads is not None:
            n = d.sequence_length - d.teacher_steps + 1
            _check("loss.lead_weights", len(leads) == n, leads, f"{n} weights, one per lead 1 .. T - k + 1 "
                   f"(data.sequence_length={d.sequence_length}, data.teacher_steps={d.teacher_steps})")
            _check("loss.lead_weights", any(leads), leads, "at least one weight > 0")
            _check("loss.lead_weights", leads[0] > 0 or not self.optim.curriculum_epochs, leads,
                   "a lead-1 weight > 0 with optim.curriculum_epochs > 0 (its first epochs have few closed-loop "
                   "steps)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(key: str, ok: Any, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: got {value!r}, expected {expected}")


def _convert(key: str, tp: Any, value: Any) -> Any:
    """Check `value` against the annotation `tp`: types (ints widen to floats; nothing else is coerced),
    `Literal` choices and `Bounds`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        value = _convert(key, args[0], value)
        for meta in args[1:]:
            meta.check(key, value)
        return value
    if origin is Literal:
        _check(key, value in args and not isinstance(value, bool), value, f"one of {list(args)}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for alternative in inner:  # the first that takes the value
            try:
                return _convert(key, alternative, value)
            except ConfigError as err:
                errors.append(str(err).removeprefix(f"{key}: "))
        raise ConfigError(f"{key}: " + "; or ".join(errors))
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
        return {_convert(f"{key} key {k!r}", args[0], k): _convert(f"{key}.{k}", args[1], v) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; expected one of {sorted(names)}")
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}
    kwargs = {name: _convert(prefix + name, hints[name], values[name]) if name in values else defaults[name]
              for name in names}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a dataclass outside this module (DimNames) rejecting a value
        raise ConfigError(f"{prefix.rstrip('.')}: {err}") from err


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


def _load_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        loaded = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:  # one line with file and line, not a parser traceback
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"config file {where}: not valid YAML ({getattr(err, 'problem', None) or err})") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level")
    return loaded


def explicit_values(path: str | Path | None = None, overrides: list[str] = (), preset: str | Path | None = None
                    ) -> dict[str, Any]:
    """What was asked for, as nested values: `preset` (a job's own YAML) <- YAML file `path` <- overrides."""
    values: dict[str, Any] = {}
    for file in (preset, path):
        if file is not None:
            values = _merge(values, _load_file(file))
    for text in overrides:
        values = _merge(values, parse_override(text))
    return values


def build_config(*layers: dict[str, Any]) -> TrainConfig:
    """The defaults with `layers` of nested values on top, each value checked against its field."""
    values: dict[str, Any] = {}
    for layer in layers:
        values = _merge(values, layer)
    return _build(TrainConfig, values)


def load_config(path: str | Path | None = None, overrides: list[str] = (), preset: str | Path | None = None
                ) -> TrainConfig:
    """Defaults <- `preset` (a job's own YAML, configs/) <- YAML file `path` <- `key=value` overrides."""
    return build_config(explicit_values(path, overrides, preset))


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config values as `section.key` -> value."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {prefix + key: value})
    return out
