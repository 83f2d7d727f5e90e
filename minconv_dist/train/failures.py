"""Which worker failures end a run at once. Ray restarts a failed worker group `parallel.max_failures` times, for
faults that pass (a lost node); these fail the same way on every retry from the last checkpoint.

Its own small module because Ray Train's controller unpickles the callback: importing it there must not load the
data layer, DeepSpeed or MLflow (they cost the controller seconds of start-up on every run)."""
from __future__ import annotations

from typing import Any

import ray.train


def not_retried() -> tuple[type[Exception], ...]:
    """Bad data, a diverging loss, a checkpoint that cannot be written (a full disk) or read (altered files)."""
    from minconv_dist.data.store import DataError
    from minconv_dist.train.checkpoint import CheckpointError, StorageError
    from minconv_dist.train.meter import NonFiniteLossError

    return DataError, NonFiniteLossError, StorageError, CheckpointError


class StopOnDeterministicError(ray.train.UserCallback):
    """One `not_retried` failure from any worker ends the run at once, as a ControllerError, which Ray's failure
    policy does not retry."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        repeats = not_retried()
        for _, error in sorted(worker_exceptions.items()):
            if isinstance(error, repeats):
                raise ray.train.ControllerError(error)
