"""An exponential moving average (EMA) of the weights: validation and the exported model use it, training goes
on with the raw weights (docs/training.md, "EMA of the weights").

    ema_0 = w_0,   ema_s = decay · ema_(s-1) + (1 - decay) · w_s     after each optimizer step s

(torch.optim.swa_utils' EMA update). It is kept in fp32, of the fp32 weights the optimizer updates, as DeepSpeed
holds them on this rank:
- ZeRO-0, fp32: the module's parameters (they are the masters), whole on every rank;
- ZeRO-0, bf16: the fp32 copy of each bf16 parameter that DeepSpeed's FP16 optimizer keeps, whole on every rank;
- ZeRO-1 and 2: this rank's fragment of each parameter in its partition of the flat fp32 masters (the mapping
  that DeepSpeed's own `safe_get_full_fp32_param` assembles from), so the EMA is sharded as the optimizer is;
- ZeRO-3: this rank's partition of each fp32 master (`safe_get_local_fp32_param`), sharded likewise.
A sharded EMA is assembled (an all-reduce per parameter) only to validate and to export. Its state, saved in
each checkpoint, is this rank's part as plain tensors, so a resumed or restarted run continues it exactly.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.swa_utils import get_ema_multi_avg_fn

from minconv_dist.train.checkpoint import _zero0_masters


@dataclass(frozen=True)
class _Part:
    """This rank's part of one parameter's fp32 master: a flat view, its offset in the flattened parameter, and
    the group that holds the other parts (None: the part is the whole parameter)."""

    view: Tensor
    start: int
    numel: int  # of the whole parameter
    shape: torch.Size
    group: Any = None


def _parts(engine: Any) -> list[_Part]:
    """The fp32 master part of each parameter of `engine.module`, in `named_parameters` order (see the module
    docstring). Views into DeepSpeed's buffers: take them again after DeepSpeed loads a checkpoint."""
    from deepspeed.utils import safe_get_local_fp32_param

    zero0 = _zero0_masters(engine.optimizer)
    parts = []
    for param in engine.module.parameters():
        if hasattr(param, "ds_id"):  # ZeRO-3: the partition of rank r starts at r x the (padded) partition size
            local = safe_get_local_fp32_param(param).view(-1)
            start = dist.get_rank(param.ds_process_group) * param.partition_numel()
            parts.append(_Part(local, start, param.ds_numel, param.ds_shape, param.ds_process_group))
        elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2: a fragment, or nothing, in this rank's flat partition
            mapping = param._hp_mapping
            local, start = ((param.new_empty(0, dtype=torch.float32), 0) if mapping is None else
                            (mapping.get_hp_fragment().view(-1), mapping.lp_fragment_address.start))
            parts.append(_Part(local, start, param.numel(), param.shape, param._dp_group))
        else:
            master = zero0.get(id(param), param)
            parts.append(_Part(master.detach().view(-1), 0, param.numel(), param.shape))
    return parts


class WeightEMA:
    """The EMA of `engine`'s weights with `decay` per optimizer step; see the module docstring."""

    def __init__(self, engine: Any, decay: float):
        self.engine, self.decay = engine, decay
        self.names = [name for name, _ in engine.module.named_parameters()]
        self._update = get_ema_multi_avg_fn(decay)
        self.parts = _parts(engine)
        self.average = [part.view.detach().clone() for part in self.parts]
        self.steps = engine.global_steps

    def step(self) -> None:
        """Call after every micro-step: folds the weights in when the optimizer has stepped since the last call
        (once per `optim.grad_accum` micro-steps). Queues device work only."""
        if self.engine.global_steps == self.steps:
            return
        live = [i for i, part in enumerate(self.parts) if part.view.numel()]
        self._update([self.average[i] for i in live], [self.parts[i].view for i in live], None)
        self.steps = self.engine.global_steps

    def state_dict(self) -> dict[str, Tensor]:
        """This rank's part of the EMA, by parameter name: plain CPU tensors."""
        return {name: average.detach().cpu().clone() for name, average in zip(self.names, self.average)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Continue from a saved `state_dict` of the same rank; call after DeepSpeed loaded the checkpoint."""
        self.parts = _parts(self.engine)
        for name, average, part in zip(self.names, self.average, self.parts):
            saved = state.get(name)
            if saved is None or saved.shape != part.view.shape:
                raise RuntimeError(f"the checkpoint's EMA of {name} has shape "
                                   f"{None if saved is None else tuple(saved.shape)}; this rank holds "
                                   f"{tuple(part.view.shape)} of it")
            average.copy_(saved)
        self.steps = self.engine.global_steps

    def full(self) -> list[Tensor]:
        """The whole EMA of each parameter, fp32, shaped as the parameter (collective when sharded)."""
        out = []
        for part, average in zip(self.parts, self.average):
            if part.group is None:
                out.append(average.view(part.shape))
                continue
            whole = torch.zeros(part.numel, dtype=torch.float32, device=average.device)
            n = max(0, min(average.numel(), part.numel - part.start))
            if n:
                whole.narrow(0, part.start, n).copy_(average[:n])
            dist.all_reduce(whole, group=part.group)
            out.append(whole.view(part.shape))
        return out

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside, the module computes with the EMA weights (cast to its dtype); after, it has its own weights
        back, bit for bit. The fp32 masters and the optimizer are not touched. Collective on entry and exit."""
        from deepspeed.runtime.zero import GatheredParameters  # ZeRO-3: whole parameters, re-partitioned on exit

        params = list(self.engine.module.parameters())
        averages = self.full()
        with GatheredParameters(params, modifier_rank=0):
            raw = [p.detach().clone() for p in params]
            for p, average in zip(params, averages):
                p.data.copy_(average)
        try:
            yield
        finally:
            with GatheredParameters(params, modifier_rank=0):
                for p, weights in zip(params, raw):
                    p.data.copy_(weights)
