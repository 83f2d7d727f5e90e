"""What every Ray worker of a job runs first (Ray's `worker_process_setup_hook`), kept outside `minconv_dist.train`:
importing that package imports torch, and a worker that loads torch before Ray sets its OMP_NUM_THREADS (per
task, after this hook) keeps one torch thread per core of the machine instead of one per CPU it was given (OpenMP
reads the variable once, when torch loads). On 2 cores that changed the last bits of every gradient; on a 48-core
GPU node it would give each worker 48 threads. Import only the standard library here.
"""
from __future__ import annotations

import signal


def ignore_sigint() -> None:
    """For a Ray that a job starts itself (`fit`): its workers are in the job's process group, so a terminal's
    Ctrl-C (SIGINT to the whole group) would kill them while the driver is still ending the run; they ignore it (so
    do their data-loader processes, which inherit it), and the driver, which gets it too, stops them after marking
    the run KILLED. Ray's own daemons block SIGINT already."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
