"""Training-loss bookkeeping that never stalls a step: losses are summed on the device, and the host reads
them (one collective, one copy) only on log, validation and epoch-end steps."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the run stops and its last good checkpoint is kept."""


class LossMeter:
    """The last loss, the epoch's running sum and the first step whose loss was not finite, all kept as
    tensors on `device` so that `update` queues work without waiting for it.

    Every tensor given to a collective lives on `device`, the backend's device (NCCL has no CPU tensors)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = torch.zeros((), device=device)
        self.total = torch.zeros((), device=device, dtype=torch.float64)
        self.count = torch.zeros((), device=device, dtype=torch.float64)
        self.first_bad = torch.full((), math.inf, device=device, dtype=torch.float64)

    def update(self, loss: Tensor, step: int) -> None:
        """Record the loss of `step` (a scalar on `device`); no host synchronisation."""
        loss = loss.detach().float()
        finite = torch.isfinite(loss)
        self.last = loss
        self.total += torch.where(finite, loss, 0.0).double()
        self.count += 1
        self.first_bad = torch.minimum(self.first_bad, torch.where(finite, math.inf, float(step)).double())

    def load(self, total: float, count: float) -> None:
        """Continue an epoch's sum after a resume (its global values: give them to one rank only)."""
        self.total.fill_(total)
        self.count.fill_(count)

    def start_epoch(self) -> None:
        self.total.zero_()
        self.count.zero_()

    def summary(self) -> dict[str, float]:
        """Over all ranks (collective): the last loss and the epoch's mean, and the epoch's global sum and
        count (what a checkpoint saves). Raises NonFiniteLossError if any rank saw a non-finite loss."""
        sums = torch.stack([self.last.double(), self.total, self.count])
        bad = self.first_bad.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
            sums[0] /= dist.get_world_size()
        last, total, count, first_bad = torch.cat([sums, bad.view(1)]).tolist()  # the one host sync
        if math.isfinite(first_bad):
            raise NonFiniteLossError(
                f"non-finite training loss at step {int(first_bad)}; the run stops and keeps its last good "
                "checkpoint (lower optim.lr, or set optim.grad_clip)")
        return {"last": last, "epoch_mean": total / max(count, 1.0), "epoch_total": total, "epoch_count": count}
