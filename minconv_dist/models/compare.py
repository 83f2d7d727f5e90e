"""Compare two models' weights as a recovery check must: each parameter against its own scale, every buffer
exactly.

A tolerance scaled to the largest value of a whole state dict is scaled to the normaliser's mean (54100 for
z500), which dwarfs every weight: "two bf16 ulps of the largest value" then allows ~420, and such a check cannot
fail. Buffers (the normaliser's statistics) are copied, never trained, so any difference in them is a bug.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class WeightDifference:
    """One tensor's difference: max |got - want| over its elements, and its scale max |want|."""

    name: str
    kind: str  # "parameter" or "buffer"
    max_abs: float
    scale: float

    @property
    def relative(self) -> float:
        """max_abs / scale (0 for an exact match, inf where a zero tensor became non-zero)."""
        if self.max_abs == 0:
            return 0.0
        return self.max_abs / self.scale if self.scale > 0 else float("inf")


def weight_differences(got: nn.Module, want: nn.Module) -> list[WeightDifference]:
    """Every parameter and buffer of `want`, compared with the same-named one of `got` (same architecture)."""
    got_state = got.state_dict()
    missing = sorted(set(want.state_dict()) - set(got_state))
    if missing:
        raise ValueError(f"the models differ in architecture: {missing[:3]} missing from the first")
    out = []
    for kind, named in (("parameter", want.named_parameters()), ("buffer", want.named_buffers())):
        for name, value in named:
            w, g = value.detach().double().cpu(), got_state[name].detach().double().cpu()
            if g.shape != w.shape:
                raise ValueError(f"{name}: shape {tuple(g.shape)} differs from {tuple(w.shape)}")
            out.append(WeightDifference(name, kind, (g - w).abs().max().item() if w.numel() else 0.0,
                                        w.abs().max().item() if w.numel() else 0.0))
    return out


def check_weights(got: nn.Module, want: nn.Module, rel_tol: float = 0.0) -> list[WeightDifference]:
    """Raise AssertionError unless every buffer is equal and every parameter's max |got - want| is at most
    `rel_tol` times that parameter's own max |want| (0: bit-equal). Returns the differences, for a report."""
    diffs = weight_differences(got, want)
    bad_buffers = [d for d in diffs if d.kind == "buffer" and d.max_abs != 0]
    if bad_buffers:
        d = bad_buffers[0]
        raise AssertionError(f"buffer {d.name} differs by {d.max_abs:.3g} (buffers must be equal exactly)")
    worst = max((d for d in diffs if d.kind == "parameter"), key=lambda d: d.relative, default=None)
    if worst is not None and worst.relative > rel_tol:
        raise AssertionError(f"parameter {worst.name} differs by {worst.max_abs:.3g}, {worst.relative:.3g} of its "
                             f"scale {worst.scale:.3g} (allowed: {rel_tol:.3g} of its scale)")
    return diffs


def worst_parameter(diffs: list[WeightDifference]) -> str:
    """The parameter with the largest relative difference, as text for a report."""
    d = max((d for d in diffs if d.kind == "parameter"), key=lambda d: d.relative)
    return f"{d.name}: {d.max_abs:.2e} ({d.relative:.2e} of its scale)"
