"""Train a Min ConvRNN on 2D Navier-Stokes vorticity with the paper's set-up (configs/navier_stokes.yaml):
16x16 (64x64 solved, downsampled x4), circular padding, MinConvGRU 4 x 49 channels, sequences of 25 with 20
teacher-forced, Adam 5e-4 with cosine decay, batch 1, input noise 1e-2. Windows never cross trajectories;
the train and val splits are sample index ranges (data.train_samples, data.val_samples).

With no arguments: a 16-trajectory store generated once into the cache (about a minute), trained for 3
short epochs (window stride 2) on 2 CPU workers of a local Ray, a few minutes in all.
Paper scale: python jobs/generate_navier_stokes.py ns.zarr --samples 1200, then
  python jobs/train_navier_stokes.py --url ns.zarr --config configs/navier_stokes_paper.yaml
"""
import sys
from pathlib import Path

from minconv_dist.data import default_navier_stokes_store
from minconv_dist.train.cli import main

PRESET = Path(__file__).resolve().parents[1] / "configs" / "navier_stokes.yaml"
DEMO_SAMPLES = 16  # the preset's train + val samples

if __name__ == "__main__":
    sys.exit(main(__doc__, preset=PRESET, default_url=lambda: default_navier_stokes_store(DEMO_SAMPLES),
                  store=f"a {DEMO_SAMPLES}-trajectory Navier-Stokes vorticity store, generated into the cache on "
                        "first use"))
