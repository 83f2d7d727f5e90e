"""The preemption notice's decision without Ray (tests/test_multinode.py sends a real SIGTERM on a cluster): after
SIGTERM a worker trains on to the next checkpoint only if the steps to it, at the pace measured since the last
checkpoint, plus that checkpoint's duration fit in what is left of the grace period; and SIGTERM outside training
ends the process as Ray's handler would."""
from __future__ import annotations

import threading

import pytest

from minconv_dist.train import preemption
from minconv_dist.train.preemption import Guard, Preempted


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(preemption.time, "monotonic", clock)
    yield clock
    preemption._NOTICE.received_at = None


def guard_at_step_4(clock: Clock, grace_s: float) -> Guard:
    """A rank that checkpointed at steps 2 and 4 (steps of 1 s, checkpoints of 3 s), given `grace_s`."""
    guard = Guard(0, rank=1, step=0)  # 0: no handler to install (that needs Ray's actor)
    guard.grace_s = grace_s
    for step in (2, 4):
        clock.now += 2.0  # two steps
        guard.begin_checkpoint()
        clock.now += 3.0
        guard.checkpointed(step)
    return guard


@pytest.mark.parametrize("grace_s, stays", [(6.0, True), (4.9, False)])
def test_a_worker_stays_for_the_next_checkpoint_only_if_it_fits_in_the_grace_period(clock, grace_s, stays, capsys):
    """After step 5, the checkpoint of step 6 needs one more step (1 s) and a checkpoint (3 s): 4 s. SIGTERM came
    1 s ago, after step 5's 1 s: 6 s of grace leave 5 s (stay), 4.9 s leave 3.9 s (go)."""
    guard = guard_at_step_4(clock, grace_s)
    clock.now += 1.0  # step 5
    preemption._NOTICE.received_at = clock.now - 1.0
    if stays:
        guard.check(5, 6)
        assert "got SIGTERM (preemption notice) after step 5: training on to the checkpoint of step 6 (~4.0 s of " \
               "5.0 s left), then leaving" in capsys.readouterr().out
        clock.now += 1.0
        guard.begin_checkpoint()
        with pytest.raises(Preempted, match="left after the checkpoint of step 6; the run restarts from it"):
            guard.checkpointed(6)
    else:
        with pytest.raises(Preempted, match=r"after step 5: the checkpoint of step 6 needs ~4.0 s, 3.9 s of the 4.9 s "
                                            r"grace \(checkpoint.preemption_grace_s\) are left; leaving now"):
            guard.check(5, 6)


def test_no_notice_no_change_and_no_pace_no_stay(clock):
    guard = Guard(0, rank=0, step=0)
    guard.grace_s = 60.0
    guard.check(0, 2)  # no notice: nothing happens
    preemption._NOTICE.received_at = clock.now
    with pytest.raises(Preempted, match=r"needs an unknown time \(no step timed yet\)"):
        guard.check(0, 2)  # nothing timed yet: no estimate to stay on


def test_sigterm_outside_training_or_twice_ends_the_process_as_rays_handler_does():
    notice, calls = preemption._Notice(), []
    notice.previous = lambda signum, frame: calls.append(signum)
    notice.handle(15, None)  # no training thread: passed on
    busy = threading.Event()
    trainer = threading.Thread(target=busy.wait)
    trainer.start()
    try:
        notice.trainer = trainer
        notice.handle(15, None)  # training: noted, not passed on
        assert notice.received_at is not None and calls == [15]
        notice.handle(15, None)  # a second one: passed on
        assert calls == [15, 15]
    finally:
        busy.set()
        trainer.join()
    notice.received_at = None
    notice.handle(15, None)  # the training thread has ended: passed on
    assert calls == [15, 15, 15]
