"""The training loss: a squared error weighted per latitude row, channel and lead (docs/training.md, "The loss"),
or (`loss.kind: crps`) the almost-fair CRPS of an ensemble with the same weights.

Over predictions p and targets y of the prognostic channels, both normalised by the model's normaliser,
[B, T, C, H, W]:

    loss = mean_{b,t,c,i,j} ( lead_t · channel_c · area_i · (p - y)²_{b,t,c,i,j} )

Each factor has mean 1 over its axis (the window's T predictions, the C channels, the H rows), so with every
factor uniform the loss is the plain normalised MSE, and with any of them it stays on that scale:
- area_i: `cell_area_weights` of the run's latitude rows, the weights the evaluation scores with (WeatherBench2;
  GraphCast's `normalized_latitude_weights`; anemoi's area node weights); uniform on a grid without latitude;
- channel_c: variable weight x level weight (`uniform`; `proportional`: level / mean of the trained levels, as
  GraphCast's `normalized_level_weights`; or an explicit map), divided by their mean over the channels;
- lead_t: the weight of prediction t's lead, max(1, t - k + 2) for k teacher-forced frames, divided by its mean
  over the T predictions (so it is renormalised when a curriculum changes k).

With `loss.kind: crps` the squared error is replaced by the pointwise almost-fair CRPS of M members (`afcrps`),
weighted and averaged the same way.

This module is pure arithmetic: its checks raise ValueError naming the config key; the config and the driver
turn them into ConfigError.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from minconv_dist.data.channels import ChannelSpec, parse_channels
from minconv_dist.data.grid import cell_area_weights

if TYPE_CHECKING:
    from minconv_dist.train.config import TrainConfig

LevelWeights = str | Mapping[float, float]


def level_factors(channels: Sequence[ChannelSpec], level_weights: LevelWeights) -> np.ndarray:
    """Per channel, the level weight before normalisation; 1 for a channel without a level."""
    levels = sorted({c.level for c in channels if c.level is not None})
    if level_weights == "uniform" or not levels:
        return np.ones(len(channels))
    if level_weights == "proportional":
        scale = {level: level / np.mean(levels) for level in levels}
    else:
        scale = {float(level): float(w) for level, w in level_weights.items()}
    return np.array([1.0 if c.level is None else scale.get(c.level, 1.0) for c in channels])


def channel_factors(channels: Sequence[str], variable_weights: Mapping[str, float],
                    level_weights: LevelWeights) -> np.ndarray:
    """Per channel, variable weight x level weight, before normalisation."""
    specs = parse_channels(channels)
    variable = np.array([float(variable_weights.get(c.variable, 1.0)) for c in specs])
    return variable * level_factors(specs, level_weights)


def lead_of_predictions(sequence_length: int, teacher_steps: int) -> np.ndarray:
    """The lead (in data steps) of each of a window's T predictions: 1 for the k teacher-forced outputs,
    i + 1 for the i-th closed-loop step."""
    return np.maximum(1, np.arange(sequence_length) - teacher_steps + 2)


@dataclass(frozen=True)
class LossWeights:
    """The run's loss weights, built on the driver and sent to the workers (plain lists: picklable, JSON-able).

    rows: per latitude row, mean 1, or None (uniform); channels: per channel, mean 1; leads: per lead as
    configured (`loss.lead_weights`, normalised per teacher_steps in `WeightedMSE`), or None (uniform)."""

    rows: list[float] | None
    channels: list[float]
    leads: list[float] | None
    description: str

    @property
    def uniform(self) -> bool:
        return self.rows is None and self.leads is None and all(c == 1.0 for c in self.channels)


def area_rows(area_weighted: bool | None, latitude: Sequence[float] | None, where: str) -> np.ndarray | None:
    """The rows' area weights per `loss.area_weighted` (null: where the grid has latitudes); `where`: the store."""
    if latitude is None:
        if area_weighted:
            raise ValueError(f"loss.area_weighted: true, but the grid of {where} has no latitude coordinate "
                             "(data.dims.lat); set loss.area_weighted to false or null")
        return None
    if area_weighted is False:
        return None
    try:
        return cell_area_weights(np.asarray(latitude, dtype=float))
    except ValueError as err:
        raise ValueError(f"loss.area_weighted: the latitudes of {where} (data.dims.lat): {err}; set "
                         "loss.area_weighted=false to weigh the rows uniformly") from err


def loss_weights(cfg: TrainConfig, latitude: Sequence[float] | None, where: str) -> LossWeights:
    """The weights of `cfg.loss` for the channels of `cfg.data` on a grid whose rows lie at `latitude` (degrees,
    the run's coarsened rows; None: not a latitude grid). `cfg` has passed the config's checks."""
    loss = cfg.loss
    rows = area_rows(loss.area_weighted, latitude, where)
    raw = channel_factors(cfg.data.channels, loss.variable_weights, loss.level_weights)
    channels = raw / raw.mean()
    leads = None if loss.lead_weights is None else [float(w) for w in loss.lead_weights]
    names = [str(c) for c in parse_channels(cfg.data.channels)]
    parts = [f"area (cell-area weights of {len(rows)} latitude rows)" if rows is not None else "uniform area",
             "channels " + (", ".join(f"{n} {w:.3g}" for n, w in zip(names, channels))
                            if not np.allclose(channels, 1) else "uniform"),
             f"leads {leads}" if leads is not None else "uniform leads"]
    uniform = rows is None and leads is None and np.allclose(channels, 1)
    if loss.kind == "crps":
        description = (f"almost-fair CRPS (AFCRPS) of {loss.members} members (input noise "
                       f"{cfg.data.input_noise:g}), alpha {loss.alpha:g}: " + ("uniform weights" if uniform
                                                                           else "; ".join(parts)))
    else:
        description = "plain normalised MSE" if uniform else "weighted normalised MSE: " + "; ".join(parts)
    return LossWeights(None if rows is None else rows.tolist(), channels.tolist(), leads, description)


def afcrps(members: Tensor, target: Tensor, alpha: float) -> Tensor:
    """The almost-fair CRPS of an ensemble `members` [M, ...] against `target` [...], point by point, in fp32
    (anemoi's AFCRPS: anemoi-core training/src/anemoi/training/losses/kcrps.py, `CRPS`, formerly
    `AlmostFairKernelCRPS`; Lang et al. 2024, AIFS-CRPS):

        afCRPS = mean_j |x_j - y| - (1 - eps) / (2 M (M - 1)) · sum_{j,k} |x_j - x_k|,   eps = (1 - alpha) / M

    alpha = 1 is the fair (unbiased) CRPS, alpha = 0 the standard ensemble CRPS. The fair score is blind to how
    far apart members that bracket the truth are (for M = 2 it is 0 whenever y lies between them); alpha < 1
    mixes in a little of the standard score, which is not. The pair sum comes from the sorted members,
    sum_{j,k} |x_j - x_k| = 2 sum_i (2i - M + 1) x_(i) (i = 0 .. M-1), so it holds M fields, not M²."""
    M = members.shape[0]
    if M < 2:
        raise ValueError(f"loss.members: got {M}, expected >= 2 (a CRPS needs an ensemble)")
    x, y = members.float(), target.float()
    skill = (x - y).abs().mean(dim=0)
    rank = torch.arange(M, device=x.device, dtype=x.dtype).view(M, *(1,) * (x.ndim - 1))
    pairs = 2 * ((2 * rank - M + 1) * x.sort(dim=0).values).sum(dim=0)
    eps = (1 - alpha) / M
    return skill - (1 - eps) / (2 * M * (M - 1)) * pairs


class WeightedMSE:
    """`LossWeights` on a device: call it with normalised predictions and targets [B, n, C, H, W]."""

    members = 1  # predictions per window (`WeightedAFCRPS`: the ensemble's M)

    def __init__(self, weights: LossWeights | None, sequence_length: int, device: torch.device | str = "cpu"):
        self.weights, self.sequence_length, self.device = weights, sequence_length, torch.device(device)
        self.uniform = weights is None or weights.uniform
        if not self.uniform:
            rows = torch.ones(1) if weights.rows is None else torch.tensor(weights.rows)
            self.space = (torch.tensor(weights.channels).view(-1, 1) * rows.view(1, -1)).to(self.device)  # [C, H]
        self._leads: dict[int, Tensor] = {}

    def lead(self, teacher_steps: int) -> Tensor:
        """Weights of the window's T predictions for k = teacher_steps, mean 1: [T]."""
        if teacher_steps not in self._leads:
            leads = lead_of_predictions(self.sequence_length, teacher_steps)
            w = np.ones(leads.size) if self.weights.leads is None else np.asarray(self.weights.leads)[leads - 1]
            self._leads[teacher_steps] = torch.tensor(w / w.mean(), dtype=torch.float32, device=self.device)
        return self._leads[teacher_steps]

    def __call__(self, pred: Tensor, target: Tensor, teacher_steps: int, first: int = 0) -> tuple[Tensor, Tensor]:
        """(weighted loss, plain MSE detached) of pred, target: [B, n, C, H, W], predictions first .. first + n - 1
        of a window read with k = teacher_steps (first > 0: a later time block of it, time parallelism)."""
        if self.uniform:
            loss = F.mse_loss(pred, target)
            return loss, loss.detach()
        value = self.weighted_mean((pred.float() - target.float()).square(), teacher_steps, first)
        return value, F.mse_loss(pred.detach(), target)

    def weighted_mean(self, pointwise: Tensor, teacher_steps: int, first: int = 0) -> Tensor:
        """The weighted mean of a pointwise loss [B, n, C, H, W] of predictions first .. first + n - 1."""
        if self.uniform:
            return pointwise.mean()
        n = pointwise.shape[1]
        weights = self.lead(teacher_steps)[first:first + n].view(n, 1, 1) * self.space
        return (pointwise.mean(dim=(0, 4)) * weights).mean()  # [n, C, H]: no weight varies in B, W


class WeightedAFCRPS(WeightedMSE):
    """`afcrps` of M members with the weights of `LossWeights`: call it with normalised predictions
    [M·B, n, C, H, W], member-major (member m of window b at m·B + b), and targets [B, n, C, H, W]; the second
    value is the plain MSE of the ensemble mean (detached)."""

    def __init__(self, weights: LossWeights | None, sequence_length: int, members: int, alpha: float,
                 device: torch.device | str = "cpu"):
        super().__init__(weights, sequence_length, device)
        self.members, self.alpha = members, alpha

    def __call__(self, pred: Tensor, target: Tensor, teacher_steps: int, first: int = 0) -> tuple[Tensor, Tensor]:
        members = pred.unflatten(0, (self.members, -1))
        score = self.weighted_mean(afcrps(members, target, self.alpha), teacher_steps, first)
        return score, F.mse_loss(members.detach().float().mean(dim=0), target.float())


def training_loss(cfg: TrainConfig, weights: LossWeights, device: torch.device | str = "cpu") -> WeightedMSE:
    """The loss `cfg.loss.kind` asks for, with `weights`, on `device`."""
    if cfg.loss.kind == "crps":
        return WeightedAFCRPS(weights, cfg.data.sequence_length, cfg.loss.members, cfg.loss.alpha, device)
    return WeightedMSE(weights, cfg.data.sequence_length, device)


PLAIN_MSE = WeightedMSE(None, 0)  # the paper's loss: no weights
