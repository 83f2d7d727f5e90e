"""`python tests/held_job.py STEP MARKER [jobs/train_era5.py arguments]`: the ERA5 training job as users run it,
plus one StepCallback: every rank of every attempt appends `rank first_step node_id pid time` to MARKER before
global step STEP and waits there for good (the test then kills the Ray head under it). Run from the
repository root."""
import functools
import os
import runpy
import sys
import time


class HoldBefore:
    def __init__(self, step: int, marker: str):
        self.step, self.marker, self.first = step, marker, None

    def __call__(self, engine, step: int, rank: int) -> None:
        import ray

        self.first = self.first or step  # the first step this worker process runs
        if step == self.step:
            with open(self.marker, "a") as f:
                f.write(f"{rank} {self.first} {ray.get_runtime_context().get_node_id()} {os.getpid()} {time.time()}\n")
            while True:
                time.sleep(1)


if __name__ == "__main__":
    from minconv_dist.train import trainer

    step, marker, *job_args = sys.argv[1:]
    trainer.fit = functools.partial(trainer.fit, callbacks=[HoldBefore(int(step), marker)])
    sys.argv = ["jobs/train_era5.py", *job_args]  # what the job sees, and the --resume command it prints
    runpy.run_path("jobs/train_era5.py", run_name="__main__")
