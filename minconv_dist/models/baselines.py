"""ConvLSTM and ConvGRU baselines: their conv sees [x_t, h_{t-1}], so time is sequential.

They expose the Min cells' interface — forward(x_seq, state) and step(x_t, state), each returning
(output, state) — so the network treats all five cells alike. Default state: zeros.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from minconv_dist.models.padding import PaddedConv2d


class _SequentialCell(nn.Module):
    """Runs `step` over time for the parallel-form call."""

    hidden: int

    def forward(self, x: Tensor, state=None, time_group=None) -> tuple[Tensor, object]:
        """x: [B, T, hidden, H, W] -> (h [B, T, hidden, H, W], state).

        The frames come from one `unbind`, whose backward stacks the T gradients once; indexing x[:, t]
        instead costs a zero-filled [B, T, ...] gradient per frame in backward (O(T^2) memory traffic)."""
        if time_group is not None:
            raise ValueError(f"{type(self).__name__} reads h_(t-1) in its conv, so its time cannot be split over "
                             "ranks (time_group); split time with a Min cell")
        outs = []
        for x_t in x.unbind(1):
            out, state = self.step(x_t, state)
            outs.append(out)
        return torch.stack(outs, dim=1), state

    def _zeros(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], self.hidden, *x.shape[-2:])


class ConvLSTMCell(_SequentialCell):
    """conv(in+hidden -> 4*hidden) split (n, i, f, o); c = s(f)c + s(i)tanh(n); h = s(o)tanh(c).

    State: (h, c), each [B, hidden, H, W].
    """

    def __init__(self, hidden: int, padding: str = "zeros"):
        super().__init__()
        self.hidden = hidden
        self.conv = PaddedConv2d(2 * hidden, 4 * hidden, padding)

    def step(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h, c = (self._zeros(x), self._zeros(x)) if state is None else state
        n, i, f, o = self.conv(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(n)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)


class ConvGRUCell(_SequentialCell):
    """conv_a([x, h]) -> sigmoid -> (z, r); h~ = tanh(conv_b([x, r*h])); h = (1-z)h + z h~.

    State: h [B, hidden, H, W].
    """

    def __init__(self, hidden: int, padding: str = "zeros"):
        super().__init__()
        self.hidden = hidden
        self.conv_a = PaddedConv2d(2 * hidden, 2 * hidden, padding)
        self.conv_b = PaddedConv2d(2 * hidden, hidden, padding)

    def step(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = self._zeros(x) if state is None else state
        z, r = torch.sigmoid(self.conv_a(torch.cat([x, h], dim=1))).chunk(2, dim=1)
        h_tilde = torch.tanh(self.conv_b(torch.cat([x, r * h], dim=1)))
        h = (1 - z) * h + z * h_tilde
        return h, h
