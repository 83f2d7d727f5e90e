"""Train a Min ConvRNN on 2D Navier-Stokes vorticity with the paper's set-up: 16x16 (64x64 solved,
downsampled x4), circular padding, [49]*4 MinConvGRU, sequences of 25 with 20 teacher-forced,
Adam 5e-4 with cosine decay, batch 1, input noise 1e-2. Windows never cross trajectories; the train and
val splits are sample index ranges (data.train_samples, data.val_samples).

With no arguments: a 16-trajectory store generated once into the cache (about a minute), trained for 3
short epochs (window stride 2) on 2 CPU workers of a local Ray, a few minutes in all.
Paper scale: python jobs/generate_navier_stokes.py ns.zarr --samples 1200, then
  python jobs/train_navier_stokes.py --url ns.zarr --config configs/navier_stokes_paper.yaml
"""
import sys

from minconv_dist.data import default_navier_stokes_store
from minconv_dist.train.cli import main

DEMO_SAMPLES = 16

PAPER = {
    "model": {"arch": "minconvgru", "hidden_sizes": [49] * 4, "padding": "circular", "norm": "layer"},
    "data": {"channels": ["vorticity"], "sample_dim": "sample", "lat_dim": "y", "lon_dim": "x", "coarsen": 1,
             "train_range": None, "val_range": None, "train_samples": [0, 12], "val_samples": [12, DEMO_SAMPLES],
             "sequence_length": 25, "teacher_steps": 20, "stride": 2, "batch_size": 1, "input_noise": 1e-2},
    "optim": {"lr": 5e-4, "epochs": 3, "warmup_steps": 0},
    "tracking": {"registered_model": "minconv-navier-stokes"},
}

if __name__ == "__main__":
    sys.exit(main(__doc__, base=PAPER, default_url=lambda: default_navier_stokes_store(DEMO_SAMPLES)))
