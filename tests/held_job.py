"""`python tests/held_job.py STEP MARKER [jobs/train_era5.py arguments]`: the ERA5 training job as users run it,
plus one StepCallback: every rank touches MARKER before global step STEP and waits there for good (the test
then kills the Ray head under it). Run from the repository root."""
import functools
import runpy
import sys
import time
from pathlib import Path


class HoldBefore:
    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def __call__(self, engine, step: int, rank: int) -> None:
        if step == self.step:
            Path(self.marker).touch()
            while True:
                time.sleep(1)


if __name__ == "__main__":
    from minconv_dist.train import trainer

    step, marker, *job_args = sys.argv[1:]
    trainer.fit = functools.partial(trainer.fit, callbacks=[HoldBefore(int(step), marker)])
    sys.argv = ["jobs/train_era5.py", *job_args]  # what the job sees, and the --resume command it prints
    runpy.run_path("jobs/train_era5.py", run_name="__main__")
