"""Data layer: zarr stores over fsspec, channel selection, streaming windows, statistics, generators."""

from minconv_dist.data.channels import ChannelSpec, parse_channels, select_channels
from minconv_dist.data.checks import DEFAULT_BOUNDS, channel_bounds, check_stats
from minconv_dist.data.navier_stokes import default_navier_stokes_store, generate_navier_stokes
from minconv_dist.data.climatology import (CLIMATOLOGIES, WEATHERBENCH2_PERIOD, dayofyear_climatology,
                                           weatherbench2_climatology)
from minconv_dist.data.stats import NormStats, compute_stats
from minconv_dist.data.store import DataError, DimNames, open_store, store_dims
from minconv_dist.data.synthetic import default_store, write_synthetic_era5
from minconv_dist.data.windows import WindowDataset

__all__ = ["CLIMATOLOGIES", "DEFAULT_BOUNDS", "ChannelSpec", "DataError", "DimNames", "NormStats",
           "WEATHERBENCH2_PERIOD", "WindowDataset", "channel_bounds", "check_stats", "compute_stats", "dayofyear_climatology", "weatherbench2_climatology",
           "default_navier_stokes_store", "default_store", "generate_navier_stokes", "open_store", "parse_channels", "select_channels",
           "store_dims", "write_synthetic_era5"]
