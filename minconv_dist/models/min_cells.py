"""The Min cells: MinConvGRU, MinConvLSTM, MinConvExpLSTM.

A Min cell convolves the *input only*, so the gates of all T frames come from one batched conv;
its state then follows the linear recurrence h_t = a_t * h_{t-1} + b_t, solved by `gate_scan` over
time (parallel form) or one step at a time (`step`, for closed-loop forecasting). Both forms use the
same gate rule from `minconv_dist.ops.gates`.

Time parallelism: given a `time_group`, x is one time block of a longer sequence split over that group's
ranks; the cell takes its carry-in state from the ranks before it and sends its gradient back through
`sequence_parallel_run` (exact forward and backward), still in time chunks when `chunk_size` is set.

Initial state: when none is given the cell starts from h0 = g(0) = 0.5 everywhere. This is what the
official parallel path does (it feeds log g(h0) with h0 = 0), so outputs match official checkpoints;
the step form uses the same default so the two forms agree. A state passed in enters unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from minconv_dist.models.padding import PaddedConv2d
from minconv_dist.ops.gates import gate_blocks, gate_kind, gate_rule
from minconv_dist.ops.scan import gate_scan, run_chunked
from minconv_dist.ops.scan.sequence_parallel import sequence_parallel_run

DEFAULT_H0 = 0.5  # g(0): the official parallel path's initial state


class MinConvCell(nn.Module):
    """One Min cell. kind: "gru" | "lstm" | "explstm". State: h [B, hidden, H, W]."""

    def __init__(
        self, kind: str, hidden: int, padding: str = "zeros", scan_method: str = "auto",
        chunk_size: int | None = None,
    ):
        super().__init__()
        self.kind = kind
        self.hidden = hidden
        self.scan_method = scan_method
        # Long sequences: conv + gates + scan run per time chunk, recomputed in backward, so the
        # memory of the pre-activations grows with the chunk, not with T (exact gradients).
        self.chunk_size = chunk_size
        self.conv = PaddedConv2d(hidden, gate_blocks(kind) * hidden, padding)

    def initial_state(self, x: Tensor) -> Tensor:
        """Default state for input x [B, (T,) hidden, H, W]."""
        shape = (x.shape[0], self.hidden, *x.shape[-2:])
        return torch.full(shape, DEFAULT_H0, dtype=x.dtype, device=x.device)

    def forward(self, x: Tensor, h0: Tensor | None = None, time_group=None) -> tuple[Tensor, Tensor]:
        """Parallel form. x: [B, T, hidden, H, W] -> (h [B, T, hidden, H, W], h_last [B, hidden, H, W]).
        time_group: x is this rank's block of a sequence split in time over the group (h0: the sequence's)."""
        h0 = self.initial_state(x) if h0 is None else h0
        if time_group is not None:
            return sequence_parallel_run(self._conv_scan, self._gates, (x,), h0, group=time_group,
                                         chunk_size=self.chunk_size)
        if self.chunk_size is None:
            return self._conv_scan(x, h0)
        return run_chunked(self._conv_scan, (x,), h0, self.chunk_size)

    def _conv_scan(self, x: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
        return gate_scan(self.kind, self.conv(x), h0, method=self.scan_method)

    def _gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(a, b) of the recurrence `_conv_scan` solves."""
        return gate_rule(self.kind)(self.conv(x))

    @torch.no_grad()
    def chrono_init_(self, max_steps: int, generator: torch.Generator | None = None) -> None:
        """Chrono initialisation (Tallec & Ollivier, ICLR 2018): each state channel's retain gate starts, at zero
        input, at a = u / (1 + u), u ~ U(1, max_steps - 1), so its state decays with a time constant 1 / (1 - a)
        spread over [2, max_steps] frames, where torch's default init (biases near 0) gives every channel a near
        0.5, a memory of about 2 frames. For states meant to hold for weeks (issue 24's ablation). Sets the conv's gate biases."""
        if max_steps < 3:
            raise ValueError(f"chrono_init_: max_steps must be >= 3 (time constants up to it), got {max_steps}")
        u = torch.rand(self.hidden, generator=generator, dtype=torch.float64) * (max_steps - 2) + 1
        logit = u.log().to(self.conv.bias.dtype)
        blocks = self.conv.bias.view(gate_blocks(self.kind), self.hidden)
        for block, weight in gate_kind(self.kind).retain:
            blocks[block] = weight * logit

    def step(self, x: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Step form. x: [B, hidden, H, W], h: [B, hidden, H, W] -> (h_new, h_new)."""
        h = self.initial_state(x) if h is None else h
        a, b = gate_rule(self.kind)(self.conv(x))
        h = a * h + b
        return h, h

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, hidden={self.hidden}, scan_method={self.scan_method}, "
            f"chunk_size={self.chunk_size}"
        )
