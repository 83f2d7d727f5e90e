"""Train a Min ConvRNN on 2D Navier-Stokes vorticity (the paper's set-up: 16x16, circular padding,
15 frames with 5 teacher-forced, [49]*4 MinConvGRU, Adam 5e-4 cosine, 30 epochs, batch 1, input noise 1e-2).

Needs a vorticity store (--url), e.g. one written by minconv_dist.data.generate_navier_stokes.
"""
import sys

from minconv_dist.train.cli import main

PAPER = {
    "model": {"arch": "minconvgru", "hidden_sizes": [49] * 4, "padding": "circular", "norm": "layer"},
    "data": {"channels": ["vorticity"], "lat_dim": "y", "lon_dim": "x", "coarsen": 1, "sequence_length": 15,
             "teacher_steps": 5, "stride": 1, "batch_size": 1, "input_noise": 1e-2},
    "optim": {"lr": 5e-4, "epochs": 30, "warmup_steps": 0},
    "tracking": {"registered_model": "minconv-navier-stokes"},
}

if __name__ == "__main__":
    given = " ".join(sys.argv[1:])
    if not any(flag in given for flag in ("--url", "data.url=", "--config", "--resume", "-h")):
        sys.exit("error: data.url: this job needs a Navier-Stokes vorticity store (--url PATH)")
    sys.exit(main(__doc__, base=PAPER))
