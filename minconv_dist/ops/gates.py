"""Gate rules of the Min cells: the conv's pre-activations -> the recurrence's (a, b).

Each Min cell's state follows h_t = a_t * h_{t-1} + b_t. A rule reads the pre-activations
`pre` whose channel axis (dim -3, so [B, T, k*hidden, H, W] and [B, k*hidden, H, W] both work)
stacks the k gate blocks in the official order, and returns (a, b) in linear space, or
(log a, log b) for the paper's log-space scan. Both forms are the same function of `pre`;
the log form is kept because the official implementation computes exactly it.

`GATES` is the one table of the kinds: the number of gate blocks, both rules and the KIND constant
of the fused Triton kernels (ops/scan/triton_scan.py) are read from it and written nowhere else.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

CHANNEL_DIM = -3

GateRule = Callable[[Tensor], tuple[Tensor, Tensor]]
BlockRule = Callable[..., tuple[Tensor, Tensor]]  # the k gate blocks -> (a, b) or (log a, log b)


def g(x: Tensor) -> Tensor:
    """minGRU's positive activation: x + 0.5 for x >= 0, sigmoid(x) otherwise."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: Tensor) -> Tensor:
    """log g(x), computed without forming g(x) (as the official code does)."""
    return torch.where(x >= 0, (F.relu(x) + 0.5).log(), -F.softplus(-x))


def _gru(k: Tensor, h_tilde: Tensor) -> tuple[Tensor, Tensor]:
    """MinConvGRU: pre = [k, h~]; z = sigmoid(k); a = 1 - z, b = z * g(h~)."""
    z = torch.sigmoid(k)
    return 1 - z, z * g(h_tilde)


def _gru_log(k: Tensor, h_tilde: Tensor) -> tuple[Tensor, Tensor]:
    return -F.softplus(k), -F.softplus(-k) + log_g(h_tilde)


def _lstm(f: Tensor, i: Tensor, h_tilde: Tensor) -> tuple[Tensor, Tensor]:
    """MinConvLSTM: pre = [f, i, h~]; f' = s(f)/(s(f)+s(i)), i' = s(i)/(s(f)+s(i))."""
    sf, si = torch.sigmoid(f), torch.sigmoid(i)
    total = sf + si
    return sf / total, si / total * g(h_tilde)


def _lstm_log(f: Tensor, i: Tensor, h_tilde: Tensor) -> tuple[Tensor, Tensor]:
    d = F.softplus(-f) - F.softplus(-i)
    return -F.softplus(d), -F.softplus(-d) + log_g(h_tilde)


def _explstm(f: Tensor, i: Tensor, h_tilde: Tensor) -> tuple[Tensor, Tensor]:
    """MinConvExpLSTM: pre = [f, i, h~]; f' = sigmoid(f - i), i' = 1 - f'."""
    a = torch.sigmoid(f - i)
    return a, (1 - a) * g(h_tilde)


def _explstm_log(f: Tensor, i: Tensor, h_tilde: Tensor) -> tuple[Tensor, Tensor]:
    d = f - i
    log_f = F.logsigmoid(d)
    return log_f, log_f - d + log_g(h_tilde)


class GateKind(NamedTuple):
    """One Min cell kind. A tuple with `blocks` first, where the earlier (blocks, rule, log rule) tuples had
    it, so `GATES[kind][0]` (benchmarks/scan.py) still reads the number of blocks."""

    blocks: int  # gate blocks stacked on the channel axis of `pre`
    linear: BlockRule  # the gate blocks -> (a, b)
    log: BlockRule  # the gate blocks -> (log a, log b)
    name: str
    kernel: int  # KIND constant of the fused Triton kernels (0 there is the plain scan)
    # How biases set the retain gate a: where the conv's weights contribute 0, a bias of l * weight on each
    # (block, weight) here gives a = sigmoid(l) (`MinConvCell.chrono_init_`).
    retain: tuple[tuple[int, float], ...]

    def hidden(self, channels: int) -> int:
        """The state's channels from those of `pre`, which must split into equal gate blocks."""
        if channels % self.blocks:
            raise ValueError(
                f"{self.name}: pre-activations have {channels} channels, not a multiple of {self.blocks}"
            )
        return channels // self.blocks

    def gates(self, pre: Tensor, log_space: bool = False) -> tuple[Tensor, Tensor]:
        """(a, b), or (log a, log b) with log_space, from pre [..., k*hidden, H, W]."""
        self.hidden(pre.shape[CHANNEL_DIM])
        rule = self.log if log_space else self.linear
        return rule(*pre.chunk(self.blocks, dim=CHANNEL_DIM))


GATES: dict[str, GateKind] = {
    kind.name: kind
    for kind in (
        GateKind(2, _gru, _gru_log, "gru", 1, ((0, -1.0),)),  # a = 1 - sigmoid(k) = sigmoid(-k)
        GateKind(3, _lstm, _lstm_log, "lstm", 2, ((0, 1.0), (1, -1.0))),  # s(l) / (s(l) + s(-l)) = s(l)
        GateKind(3, _explstm, _explstm_log, "explstm", 3, ((0, 0.5), (1, -0.5))),  # sigmoid(f - i)
    )
}


def gate_kind(kind: str) -> GateKind:
    if kind not in GATES:
        raise ValueError(f"unknown gate kind {kind!r}; expected one of {sorted(GATES)}")
    return GATES[kind]


def gate_rule(kind: str, log_space: bool = False) -> GateRule:
    """pre -> (a, b) of `kind` (or their logs)."""
    return functools.partial(gate_kind(kind).gates, log_space=log_space)


def gate_blocks(kind: str) -> int:
    return gate_kind(kind).blocks
