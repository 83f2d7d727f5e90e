"""Shared fixtures: a moto S3 server on 127.0.0.1, an endpoint that never answers, and a tiny synthetic store.
Every Ray the tests start runs in Ray's single-machine mode (set here, before anything imports Ray): it
listens on 127.0.0.1 only."""

from __future__ import annotations

import os
import uuid

import pytest

from minconv_dist.data import write_synthetic_era5
from minconv_dist.train.local_ray import LOCAL_ONLY, free_port

os.environ.update(LOCAL_ONLY)

# 10 days hourly on the 32x64 grid in 6-hour chunks: 240 frames, 2 MB, ~0.1 s to write.
TINY = {"start": "2015-01-01", "end": "2015-01-11", "freq": "1h", "chunks": 6}


@pytest.fixture(autouse=True, scope="module")
def no_leaked_ray_address():
    """A module that leaves RAY_ADDRESS in this process's environment makes every later `ray.init(num_cpus=...)`
    join that cluster, or fail ("When connecting to an existing cluster, num_cpus and num_gpus must not be
    provided"): this fails the module that leaked it instead, and restores the variable."""
    before = os.environ.get("RAY_ADDRESS")
    yield
    after = os.environ.get("RAY_ADDRESS")
    if after != before:
        os.environ.pop("RAY_ADDRESS", None)
        if before is not None:
            os.environ["RAY_ADDRESS"] = before
        pytest.fail(f"this module left RAY_ADDRESS={after!r} in the environment (it was {before!r})")


@pytest.fixture(scope="module")
def ray_session():
    """A Ray of this module's own, 2 CPUs, stopped after it: `address="local"` never joins another (a stale
    `ray_current_cluster` file or RAY_ADDRESS)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_options():
    """storage_options for a moto server started here; stopped after the session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing",
           "client_kwargs": {"region_name": "us-east-1"}}
    server.stop()


@pytest.fixture
def s3_bucket(s3_options) -> str:
    """A fresh, empty bucket name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_options["endpoint_url"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("stores") / "tiny.zarr")
    write_synthetic_era5(path, **TINY)
    return path


@pytest.fixture(scope="session")
def tiny_wb2_store(tmp_path_factory) -> str:
    """WeatherBench2 layout: level dim, latitude/longitude names (south to north), static fields."""
    path = str(tmp_path_factory.mktemp("stores") / "tiny_wb2.zarr")
    write_synthetic_era5(path, **TINY, layout="weatherbench2")
    return path


@pytest.fixture(scope="session")
def tiny_north_to_south_store(tiny_wb2_store, tmp_path_factory) -> str:
    """`tiny_wb2_store` with latitude running north to south, as ERA5's own files and ARCO-ERA5 order it."""
    from minconv_dist.data import open_store

    path = str(tmp_path_factory.mktemp("stores") / "tiny_n2s.zarr")
    open_store(tiny_wb2_store).isel(latitude=slice(None, None, -1)).to_zarr(path, zarr_format=3, consolidated=False)
    return path


@pytest.fixture(scope="session")
def tiny_sample_store(tmp_path_factory) -> str:
    """Navier–Stokes layout `vorticity(sample, time, y, x)`: 10 trajectories of 12 frames on 8x8, chunked
    (4, 5, 8, 8) so that neither chunk size divides its dim; frame (s, t) is `100 s + t` everywhere."""
    import numpy as np
    import xarray as xr

    path = str(tmp_path_factory.mktemp("stores") / "tiny_ns.zarr")
    s, t = np.meshgrid(np.arange(10), np.arange(12), indexing="ij")
    v = np.broadcast_to((100 * s + t)[..., None, None], (10, 12, 8, 8)).astype(np.float32)
    xr.Dataset({"vorticity": (("sample", "time", "y", "x"), v)},
               coords={"sample": np.arange(10), "time": np.arange(12.0), "y": np.arange(8) / 8, "x": np.arange(8) / 8},
               ).to_zarr(path, encoding={"vorticity": {"chunks": (4, 5, 8, 8)}}, zarr_format=3, consolidated=False)
    return path


def add_static_fields(path: str, lat: str = "latitude", lon: str = "longitude") -> None:
    """Write WeatherBench2's two static variables, dims (lat, lon) only, into the synthetic store at `path`:
    `land_sea_mask` (1 on a "continent" north of 17°S) and `geopotential_at_surface` (a smooth ridge on it, m²/s²);
    neither is symmetric in latitude, so a flipped latitude shows."""
    import numpy as np
    import xarray as xr

    from minconv_dist.data import open_store
    from minconv_dist.data.store import set_attrs

    grid = open_store(path)
    phi, lam = np.meshgrid(np.deg2rad(grid[lat].values), np.deg2rad(grid[lon].values), indexing="ij")
    mask = ((phi > -0.3) & (phi < 1.1) & (np.sin(lam) > 0.3)).astype(np.float32)
    orography = (9.81 * 3000 * mask * np.cos(phi) ** 2 * np.sin(lam) ** 2).astype(np.float32)
    xr.Dataset({"land_sea_mask": ((lat, lon), mask), "geopotential_at_surface": ((lat, lon), orography)}).to_zarr(
        path, mode="a", zarr_format=3, consolidated=False)
    set_attrs(path, None)  # re-consolidate, so readers of the consolidated metadata see the new variables


@pytest.fixture(scope="session")
def tiny_static_store(tmp_path_factory) -> str:
    """`tiny_wb2_store`'s layout with WeatherBench2's static `land_sea_mask` and `geopotential_at_surface`."""
    path = str(tmp_path_factory.mktemp("stores") / "tiny_static.zarr")
    write_synthetic_era5(path, **TINY, layout="weatherbench2")
    add_static_fields(path)
    return path


@pytest.fixture
def silent_endpoint():
    """A TCP server on 127.0.0.1 that accepts connections and never answers; its URL. Closed by the test."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:  # closed by the test
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() alone leaves it blocked (join waited 5 s)
    server.close()
    thread.join(5)
    for conn in accepted:
        conn.close()
