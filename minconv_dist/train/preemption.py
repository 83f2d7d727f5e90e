"""Spot and preemptible workers. SIGTERM is the preemption notice: the cloud stops the VM, its OS sends every
process SIGTERM and, a grace period later, SIGKILL (about 30 s on GCP; AWS warns 2 minutes ahead through its
metadata service, then stops the VM the same way).

With `checkpoint.preemption_grace_s` > 0, a worker that gets SIGTERM while it trains keeps training while the
next planned checkpoint still fits in that time (estimated from its steps' pace and its last checkpoint's
duration), writes it with the other ranks, and then leaves with `Preempted`: Ray restarts the group from that
checkpoint and no step is lost. When it does not fit, the worker leaves at once and the run restarts from the
last checkpoint. The checkpoints stay at the steps of the plan (a checkpoint is collective, and the other
ranks know nothing of the notice), so a restart is exact either way; one cut short by the kill never verifies
(train/manifest.py) and is never taken. A second SIGTERM, or one once the training thread has ended, ends the
process at once, as Ray's own handler does.

Ray runs the training function on a thread of the worker actor, and Python lets only the main thread install a
signal handler; the actor's main thread serves Ray's calls, so `Guard` asks it, through the actor's own handle,
to install ours in front of Ray's.
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Any

import ray


class Preempted(RuntimeError):
    """This worker got the preemption notice (SIGTERM) and left; Ray restarts the run from a checkpoint."""


class _Notice:
    """When SIGTERM came, if it came while `trainer` (the training thread) runs; one per worker process."""

    def __init__(self) -> None:
        self.received_at: float | None = None
        self.trainer: threading.Thread | None = None
        self.previous: Any = signal.SIG_DFL

    def handle(self, signum: int, frame: Any) -> None:
        if self.received_at is None and self.trainer is not None and self.trainer.is_alive():
            self.received_at = time.monotonic()
        elif callable(self.previous):  # a second one, or no training: what Ray's handler does (it exits)
            self.previous(signum, frame)
        elif self.previous == signal.SIG_DFL:
            raise SystemExit(128 + signum)


_NOTICE = _Notice()


def _install() -> None:
    """On the actor's main thread: our handler in front of the one there (Ray's)."""
    if signal.getsignal(signal.SIGTERM) != _NOTICE.handle:
        _NOTICE.previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _NOTICE.handle)


class Guard:
    """One rank's watch over the notice during `worker_loop`, from its training thread; it times the steps and
    checkpoints since `step` to estimate what the next checkpoint needs."""

    def __init__(self, grace_s: float, rank: int, step: int):
        self.grace_s, self.rank = grace_s, rank
        self.since = (time.monotonic(), step)  # the last checkpoint (or the start): the pace is measured from here
        self.step_s: float | None = None  # seconds per step between the last two checkpoints
        self.checkpoint_s = 0.0  # the last validation + checkpoint; 0 before the first one
        self.checkpoint_began = 0.0
        self.staying = False
        _NOTICE.received_at, _NOTICE.trainer = None, None
        if grace_s > 0:  # Ray Train's worker actor runs `execute(fn)` on its main thread
            ray.get(ray.get_runtime_context().current_actor.execute.remote(_install))
            _NOTICE.trainer = threading.current_thread()

    def check(self, done: int, next_checkpoint: int) -> None:
        """Before the step after `done`: leave (raise `Preempted`) if the notice came and the checkpoint of
        step `next_checkpoint` cannot be written before the grace period ends; else say once that we stay."""
        if _NOTICE.received_at is None:
            return
        left = _NOTICE.received_at + self.grace_s - time.monotonic()
        start, first = self.since
        pace = (time.monotonic() - start) / (done - first) if done > first else self.step_s
        need = None if pace is None else (next_checkpoint - done) * pace + self.checkpoint_s
        if need is None or need > left:
            estimate = "an unknown time (no step timed yet)" if need is None else f"~{need:.1f} s"
            raise Preempted(f"rank {self.rank} got SIGTERM (preemption notice) after step {done}: the checkpoint of "
                            f"step {next_checkpoint} needs {estimate}, {max(left, 0):.1f} s of the {self.grace_s:g} s "
                            "grace (checkpoint.preemption_grace_s) are left; leaving now, the run restarts from the "
                            "last checkpoint")
        if not self.staying:
            self.staying = True
            print(f"[minconv] rank {self.rank} got SIGTERM (preemption notice) after step {done}: training on to the "
                  f"checkpoint of step {next_checkpoint} (~{need:.1f} s of {left:.1f} s left), then leaving",
                  flush=True)

    def begin_checkpoint(self) -> None:
        self.checkpoint_began = time.monotonic()

    def checkpointed(self, step: int) -> None:
        """After the checkpoint of `step` is reported: leave if the notice came."""
        (start, first), now = self.since, time.monotonic()
        if step > first:
            self.step_s = (self.checkpoint_began - start) / (step - first)
        self.checkpoint_s, self.since = now - self.checkpoint_began, (now, step)
        if _NOTICE.received_at is not None:
            raise Preempted(f"rank {self.rank} got SIGTERM (preemption notice) and left after the checkpoint of step "
                            f"{step}; the run restarts from it")
