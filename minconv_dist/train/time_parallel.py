"""Time parallelism: the ranks of a time group split each window in time (docs/training.md, "Time parallelism").

The workers form a DeviceMesh ("data", "time") of num_workers / S x S ranks, so a time group is S
consecutive ranks that read the same windows (sharded over the "data" dimension only). A window holds T + 1
frames, the model reads k of them teacher-forced: rank i of a group reads frames [i k // S, (i + 1) k // S)
teacher-forced (the first k mod S ranks one fewer when S does not divide k) plus the frame after them, its last
target; the last rank also reads the T - k targets of the closed loop it runs.

The loss: each rank's MSE is over its own predictions, weighted by `share` = S x (its predictions) / T.
DeepSpeed treats every rank as data-parallel and averages the gradients over all D x S ranks; each rank's
gradient is its part of its window's exact gradient (the cells exchange the rest), so the average is
(1 / D S) sum_d S grad(window mean of d) = the data-parallel mean gradient, as on D ranks without time
parallelism. ZeRO then shards over all D x S ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def device_mesh(world_size: int, sequence_parallel: int, device_type: str) -> DeviceMesh:
    """The ("data", "time") mesh of the world (collective: every rank calls it)."""
    return init_device_mesh(device_type, (world_size // sequence_parallel, sequence_parallel),
                            mesh_dim_names=("data", "time"))


@dataclass(frozen=True)
class TimeSplit:
    """Rank `index` of a time group of `count` ranks (`group`), for windows of `length` = T predictions."""

    index: int
    count: int
    length: int
    group: Any = None  # the time group's ProcessGroup

    @classmethod
    def of(cls, mesh: DeviceMesh, length: int) -> TimeSplit:
        return cls(mesh.get_local_rank("time"), mesh["time"].size(), length, mesh.get_group("time"))

    def teacher_frames(self, teacher_steps: int) -> tuple[int, int]:
        """[first, stop) of the window's teacher-forced frames this rank reads."""
        k, S, i = teacher_steps, self.count, self.index
        return i * k // S, (i + 1) * k // S

    def frames(self, teacher_steps: int) -> tuple[int, int]:
        """[first, stop) of the window's T + 1 frames this rank reads: its teacher-forced frames and the next
        (their last target); the last rank reads on to the window's end (its closed loop's targets)."""
        first, stop = self.teacher_frames(teacher_steps)
        return first, (stop + 1 if self.index < self.count - 1 else self.length + 1)

    def share(self, predictions: int) -> float:
        """The weight of a loss averaged over `predictions` of this rank's frames (see the module docstring)."""
        return self.count * predictions / self.length
