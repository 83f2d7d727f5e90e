"""The recurrent state that stateful training (`data.stateful`) carries from one window to the next, per rank."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from minconv_dist.models.network import State, map_state


@dataclass
class Carry:
    """Where each of a rank's B streams (`WindowDataset(stateful=True)`) ended its last window: the state after the
    window's T input frames read teacher-forced, detached (`Network.forward(return_carry=True)`), the start of its
    next window. None at the streams' start, each epoch's first step: every cell then starts from its own initial
    state. Each rank saves its own in every checkpoint (`carry_rank{r}.pt`), so a resume or a restarted worker
    continues exactly."""

    state: State | None = None

    def reset(self) -> None:
        self.state = None

    def state_dict(self) -> dict[str, Any]:
        """Lists, tuples and tensors only (`torch.load(weights_only=True)` reads them back)."""
        return {"state": self.state}

    def load_state_dict(self, saved: dict[str, Any], device: torch.device) -> None:
        state = saved["state"]
        self.state = None if state is None else map_state(state, lambda t: t.to(device))
