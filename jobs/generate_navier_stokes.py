"""Generate the paper's Navier–Stokes vorticity data set into a zarr store (resumable: re-run to continue)."""

from __future__ import annotations

import json
import sys

from minconv_dist.data import generate_navier_stokes
from minconv_dist.errors import run_job
from minconv_dist.job_args import job_parser


def main(argv: list[str] | None = None) -> None:
    p = job_parser(__doc__)
    p.add_argument("url", help="output zarr store: path, memory://, s3://, gs://")
    p.add_argument("--samples", type=int, required=True, help="number of trajectories")
    p.add_argument("--resolution", type=int, default=64, help="solver grid (n x n)")
    p.add_argument("--downsample", type=int, default=4, help="keep every k-th grid point when writing")
    p.add_argument("--time-units", type=int, default=50, help="simulated time, recorded once per unit")
    p.add_argument("--viscosity", type=float, default=1e-3, help="kinematic viscosity")
    p.add_argument("--dt", type=float, default=1e-3, help="internal solver step")
    p.add_argument("--batch-size", type=int, default=16, help="trajectories solved together (one zarr chunk)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial fields (per batch)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--storage-options", type=json.loads, default=None, help="JSON dict passed to fsspec")
    p.add_argument("--overwrite", action="store_true", help="replace a store written with other arguments")
    a = p.parse_args(argv)
    generate_navier_stokes(a.url, samples=a.samples, resolution=a.resolution, downsample=a.downsample,
                           time_units=a.time_units, viscosity=a.viscosity, dt=a.dt, batch_size=a.batch_size,
                           seed=a.seed, device=a.device, storage_options=a.storage_options, overwrite=a.overwrite)


if __name__ == "__main__":
    sys.exit(run_job(main))
