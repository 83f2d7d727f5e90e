"""Train a Min ConvRNN on ERA5-like data (the paper's WeatherBench set-up).

With no arguments: geopotential@500 and temperature@850 of the embedded synthetic store, 2 CPU workers on a
local Ray, a few minutes.
Real data: --url <WeatherBench zarr> --config configs/era5_weatherbench.yaml.
Cluster: ray job submit --working-dir . -- python jobs/train_era5.py --set tracking.uri=http://<head>:5000
"""
import sys

from minconv_dist.train.cli import main

if __name__ == "__main__":
    sys.exit(main(__doc__))
