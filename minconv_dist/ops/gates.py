"""Gate rules of the Min cells: the conv's pre-activations -> the recurrence's (a, b).

Each Min cell's state follows h_t = a_t * h_{t-1} + b_t. A rule reads the pre-activations
`pre` whose channel axis (dim -3, so [B, T, k*hidden, H, W] and [B, k*hidden, H, W] both work)
stacks the k gate blocks in the official order, and returns (a, b) in linear space, or
(log a, log b) for the paper's log-space scan. Both forms are the same function of `pre`;
the log form is kept because the official implementation computes exactly it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

CHANNEL_DIM = -3


def g(x: Tensor) -> Tensor:
    """minGRU's positive activation: x + 0.5 for x >= 0, sigmoid(x) otherwise."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: Tensor) -> Tensor:
    """log g(x), computed without forming g(x) (as the official code does)."""
    return torch.where(x >= 0, (F.relu(x) + 0.5).log(), -F.softplus(-x))


def _split(pre: Tensor, blocks: int) -> tuple[Tensor, ...]:
    if pre.shape[CHANNEL_DIM] % blocks:
        raise ValueError(
            f"pre-activations have {pre.shape[CHANNEL_DIM]} channels, not a multiple of {blocks}"
        )
    return pre.chunk(blocks, dim=CHANNEL_DIM)


def gru_gates(pre: Tensor) -> tuple[Tensor, Tensor]:
    """MinConvGRU: pre = [k, h~]; z = sigmoid(k); a = 1 - z, b = z * g(h~)."""
    k, h_tilde = _split(pre, 2)
    z = torch.sigmoid(k)
    return 1 - z, z * g(h_tilde)


def gru_log_gates(pre: Tensor) -> tuple[Tensor, Tensor]:
    k, h_tilde = _split(pre, 2)
    return -F.softplus(k), -F.softplus(-k) + log_g(h_tilde)


def lstm_gates(pre: Tensor) -> tuple[Tensor, Tensor]:
    """MinConvLSTM: pre = [f, i, h~]; f' = s(f)/(s(f)+s(i)), i' = s(i)/(s(f)+s(i))."""
    f, i, h_tilde = _split(pre, 3)
    sf, si = torch.sigmoid(f), torch.sigmoid(i)
    total = sf + si
    return sf / total, si / total * g(h_tilde)


def lstm_log_gates(pre: Tensor) -> tuple[Tensor, Tensor]:
    f, i, h_tilde = _split(pre, 3)
    d = F.softplus(-f) - F.softplus(-i)
    return -F.softplus(d), -F.softplus(-d) + log_g(h_tilde)


def explstm_gates(pre: Tensor) -> tuple[Tensor, Tensor]:
    """MinConvExpLSTM: pre = [f, i, h~]; f' = sigmoid(f - i), i' = 1 - f'."""
    f, i, h_tilde = _split(pre, 3)
    a = torch.sigmoid(f - i)
    return a, (1 - a) * g(h_tilde)


def explstm_log_gates(pre: Tensor) -> tuple[Tensor, Tensor]:
    f, i, h_tilde = _split(pre, 3)
    d = f - i
    log_f = F.logsigmoid(d)
    return log_f, log_f - d + log_g(h_tilde)


GateRule = Callable[[Tensor], tuple[Tensor, Tensor]]

#: kind -> (number of gate blocks, linear rule, log rule)
GATES: dict[str, tuple[int, GateRule, GateRule]] = {
    "gru": (2, gru_gates, gru_log_gates),
    "lstm": (3, lstm_gates, lstm_log_gates),
    "explstm": (3, explstm_gates, explstm_log_gates),
}


def gate_rule(kind: str, log_space: bool = False) -> GateRule:
    if kind not in GATES:
        raise ValueError(f"unknown gate kind {kind!r}; expected one of {sorted(GATES)}")
    return GATES[kind][2 if log_space else 1]


def gate_blocks(kind: str) -> int:
    if kind not in GATES:
        raise ValueError(f"unknown gate kind {kind!r}; expected one of {sorted(GATES)}")
    return GATES[kind][0]
