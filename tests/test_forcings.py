"""Forcings and static inputs (issue 23, item 2): hand values of the forcings, the windows' forcings, the model's
inputs (closed loop included), the model file, forecasts that read no frame past their init time, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from minconv_dist.data import DimNames, WindowDataset, write_synthetic_era5
from minconv_dist.data import store as store_module
from minconv_dist.data.forcings import (CHANNELS, FORCINGS, compute_forcings, forcing_channels, local_solar_time,
                                        toa_insolation, year_fraction)
from minconv_dist.data.static import read_static
from minconv_dist.evaluate import open_channels, write_forecast
from minconv_dist.models import build_model, load_model_file, save_model_file, to_official_state_dict
from minconv_dist.train import ConfigError, load_config
from minconv_dist.train.cli import main as train_main
from tests.conftest import TINY, add_static_fields

WB2 = DimNames(lat="latitude", lon="longitude")
STATIC = ["land_sea_mask", "geopotential_at_surface"]
ALL = forcing_channels(list(FORCINGS))


def times(*labels: str) -> np.ndarray:
    return np.array(labels, dtype="datetime64[ns]")


def usno_sun(when: str) -> tuple[float, float, float]:
    """Earth-Sun distance (AU), declination (rad) and equation of time (minutes) from the US Naval Observatory's
    low-precision formulas (aa.usno.navy.mil/faq/sun_approx): a different algorithm from the NOAA/Spencer series
    the code uses, good to ~0.01° and ~1e-5 AU."""
    D = (np.datetime64(when) - np.datetime64("2000-01-01T12:00")) / np.timedelta64(1, "D")
    g = np.deg2rad((357.529 + 0.98560028 * D) % 360)
    q = (280.459 + 0.98564736 * D) % 360
    L = np.deg2rad(q + 1.915 * np.sin(g) + 0.020 * np.sin(2 * g))
    e = np.deg2rad(23.439 - 0.00000036 * D)
    ra = np.rad2deg(np.arctan2(np.cos(e) * np.sin(L), np.cos(L))) % 360
    return (1.00014 - 0.01671 * np.cos(g) - 0.00014 * np.cos(2 * g), np.arcsin(np.sin(e) * np.sin(L)),
            4 * ((q - ra + 180) % 360 - 180))


def test_insolation_equals_hand_values():
    """Over S0, so O(1). March equinox 2015 (20 March, 22:45 UTC): at 12 UTC the sun stands over the equator at
    the longitude where the apparent solar time is noon, 1.9°E (equation of time -7.6 min), and the insolation
    there is (r0 / r)² cos δ = 1.0085 (r = 0.99580 AU: nearer the sun than on average, so not 1.0); at the
    antipode it is midnight: 0. June solstice at the North Pole: the sun circles at elevation δ = 23.44°, the
    same (r0 / r)² sin δ at every longitude. Tolerance 2e-4 of S0 (0.3 W/m²): the two algorithms' accuracy;
    without the distance factor the equinox value is off by 8.5e-3."""
    r, decl, eqt = usno_sun("2015-03-20T12:00")
    noon = -eqt / 4  # degrees east: 4 minutes of solar time per degree
    got = toa_insolation(times("2015-03-20T12:00"), np.array([0.0]), np.array([noon, noon + 180]))
    assert got[0, 0, 0] == pytest.approx(np.cos(decl) / r**2, abs=2e-4) and got[0, 0, 0] > 1.008
    assert got[0, 0, 1] == 0.0
    r, decl, _ = usno_sun("2015-06-21T16:00")
    pole = toa_insolation(times("2015-06-21T16:00"), np.array([90.0]), np.arange(0.0, 360.0, 45.0))
    np.testing.assert_allclose(pole, np.sin(decl) / r**2, atol=2e-4)
    assert (toa_insolation(times("2015-12-21T16:00"), np.array([89.0]), np.arange(0.0, 360.0, 45.0)) == 0).all()


def test_calendar_forcings_equal_hand_values():
    """Local mean solar time: UTC + longitude / 15°; the day of year: 0 at 1 January 00 UTC, half a turn in the
    middle of the calendar year (2 July 12 UTC of 2015; 2 July 00 UTC of leap 2016)."""
    t = times("2015-03-20T06:00")
    np.testing.assert_allclose(local_solar_time(t, np.array([0.0, 90.0, 270.0, -90.0])), [[6, 12, 0, 0]])
    np.testing.assert_allclose(year_fraction(times("2015-01-01", "2015-07-02T12:00", "2016-07-02", "2016-12-31T12:00")),
                               [0.0, 0.5, 0.5, 365.5 / 366])
    f = compute_forcings(ALL, times("2015-01-01T06:00"), np.array([60.0]), np.array([90.0]))[0, :, 0, 0]
    expected = {"cos_local_solar_time": -1.0, "sin_local_solar_time": 0.0,  # local noon at 90°E
                "cos_day_of_year": np.cos(2 * np.pi * 0.25 / 365), "sin_day_of_year": np.sin(2 * np.pi * 0.25 / 365),
                "cos_latitude": 0.5, "cos_longitude": 0.0, "sin_longitude": 1.0}
    for name, value in expected.items():
        assert f[ALL.index(name)] == pytest.approx(value, abs=1e-6), name
    assert f.dtype == np.float32 and CHANNELS == tuple(ALL)


def test_unknown_forcings_are_refused_naming_the_key_and_the_known_names():
    with pytest.raises(ValueError, match=r"unknown forcing 'insolation'; known forcings are \['local_solar_time'"):
        forcing_channels(["insolation"])
    with pytest.raises(ConfigError, match=r"^data.forcings: got \['insolation'\], expected distinct names from "
                                          r"\['local_solar_time', 'day_of_year', 'toa_insolation'"):
        load_config(overrides=["data.forcings=[insolation]"])
    with pytest.raises(ValueError, match="holds float64 values, not dates"):
        compute_forcings(["toa_insolation"], np.arange(3.0), np.zeros(2), np.zeros(2))


def test_windows_carry_the_forcings_of_their_frames(tiny_static_store):
    """Each window's forcings are those of its frames' valid times on the coarsened grid, also for a time block
    (time parallelism), and with loader workers they come batched beside the windows."""
    channels = forcing_channels(["local_solar_time", "toa_insolation"])
    ds = WindowDataset(tiny_static_store, "geopotential@500", 7, stride=5, coarsen=2, dims=WB2, shuffle=False,
                       forcings=channels)
    block = WindowDataset(tiny_static_store, "geopotential@500", 7, stride=5, coarsen=2, dims=WB2, shuffle=False,
                          forcings=channels, frames=(3, 7))
    grid = open_channels(tiny_static_store, "geopotential@500", dims=WB2, coarsen=2)
    np.testing.assert_array_equal(ds.latitudes, grid["lat"].values)
    for (x, f), (xb, fb), start in zip(ds, block, ds.times):
        valid = start + np.arange(7) * np.timedelta64(1, "h")
        expected = compute_forcings(channels, valid, grid["lat"].values, grid["lon"].values)
        assert f.shape == (7, 3, 16, 32) and x.shape == (7, 1, 16, 32)
        np.testing.assert_array_equal(f.numpy(), expected)
        np.testing.assert_array_equal(fb.numpy(), expected[3:])
        torch.testing.assert_close(xb, x[3:], rtol=0, atol=0)
    x, f = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)))
    assert x.shape == (4, 7, 1, 16, 32) and f.shape == (4, 7, 3, 16, 32)


def network(grid=(16, 32), norm="layer", forcings=ALL, static=STATIC, arch="minconvgru", seed=0):
    torch.manual_seed(seed)
    model = build_model(arch, ["geopotential@500"], 4, 2, padding="cylinder", norm=norm, grid=grid,
                        forcings=forcings, static=static)
    model.normalizer.set_stats([54000.0], [3300.0])
    with torch.no_grad():  # forcing and static inputs that weigh: the default init would leave them faint
        model.encoder[0].weight.mul_(3)
    return model


@pytest.mark.parametrize("arch", ["minconvgru", "convlstm"])
def test_the_closed_loop_reads_each_frame_with_its_own_forcings(arch):
    """forward(teacher_steps=k) == rollout of the first k frames == warm_states then rollout, each closed-loop step
    reading the forcings of the frame it reads; a forcing of frame t moves predictions t.. only, and so does each
    static field."""
    model = network(grid=(6, 8), norm="group", forcings=["a", "b"], static=["s"], arch=arch).double()
    model.static.set_fields(300 + 50 * torch.randn(1, 6, 8))
    x = 54000 + 3300 * torch.randn(2, 7, 1, 6, 8, dtype=torch.float64)
    f = torch.randn(2, 7, 2, 6, 8, dtype=torch.float64)
    y = model(x, teacher_steps=3, forcings=f)
    forecast, _ = model.rollout(x[:, :3], 4, forcings=f[:, :6])
    torch.testing.assert_close(forecast, y[:, 2:6], rtol=1e-12, atol=1e-9)
    (state, first), = model.warm_states(x[:, :3], [2], forcings=f[:, :3])[0]
    rest, _ = model.rollout(first[:, None], 3, state, forcings=f[:, 3:6])
    torch.testing.assert_close(torch.cat([first[:, None], rest], 1), forecast, rtol=1e-12, atol=1e-9)
    moved = f.clone()
    moved[:, 4] += 1.0
    change = (model(x, teacher_steps=3, forcings=moved) - y).abs().amax(dim=(0, 2, 3, 4))
    assert (change[:4] == 0).all() and (change[4:] > 1e-3).all()
    model.static.set_fields(model.static.values + 50 * torch.randn(1, 6, 8, dtype=torch.float64))
    assert (model(x, teacher_steps=3, forcings=f) - y).abs().amax(dim=(0, 2, 3, 4)).min() > 1e-3
    with pytest.raises(ValueError, match=r"expected forcings \['a', 'b'\] of shape \(2, 7, 2, 6, 8\).*got none"):
        model(x)
    with pytest.raises(ValueError, match="reads no forcings"):
        build_model(arch, ["z"], 2, 1, norm="group")(x, forcings=f)


def test_model_file_round_trips_forcing_and_static_specs(tiny_static_store, tmp_path):
    """spec and file keep the forcing channels and the static fields (values and their own statistics, in
    float32 under bf16); the reloaded model gives the same forecast. Old files load; the official layout, which
    has no place for these inputs, is refused."""
    grid = open_channels(tiny_static_store, "geopotential@500", dims=WB2, coarsen=2)
    fields = read_static(tiny_static_store, STATIC, latitude=grid["lat"].values, longitude=grid["lon"].values,
                         dims=WB2, coarsen=2)
    model = network()
    model.static.set_fields(torch.from_numpy(fields))
    assert model.spec["forcings"] == ALL and model.spec["static"] == STATIC
    torch.testing.assert_close(model.static.mean, torch.from_numpy(fields).double().mean(dim=(1, 2)).float())
    save_model_file(tmp_path / "m.pt", model)
    loaded = load_model_file(tmp_path / "m.pt")
    assert loaded.spec == model.spec and loaded.forcings == ALL and loaded.static.channels == STATIC
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.from_numpy(grid.isel(time=slice(0, 4)).values)[None]
    f = torch.from_numpy(compute_forcings(ALL, grid["time"].values[:9], grid["lat"].values, grid["lon"].values))[None]
    torch.testing.assert_close(loaded.rollout(x, 6, forcings=f)[0], model.eval().rollout(x, 6, forcings=f)[0],
                               rtol=0, atol=0)
    assert loaded.to(torch.bfloat16).static.values.dtype == torch.float32

    plain = build_model("minconvgru", ["z"], 4, 1, norm="group")
    old = {"format": "minconv_dist.model/2", "spec": {k: v for k, v in plain.spec.items()
                                                      if k not in ("forcings", "static")},
           "state_dict": plain.state_dict()}
    torch.save(old, tmp_path / "old.pt")
    assert load_model_file(tmp_path / "old.pt").forcings == []
    with pytest.raises(ValueError, match="official layout reads and predicts the same channels"):
        to_official_state_dict(model)


@pytest.fixture(scope="module")
def frame_store(tmp_path_factory) -> str:
    """The tiny WB2 store with one frame per time chunk, so a chunk read is a frame read, and static fields."""
    path = str(tmp_path_factory.mktemp("stores") / "frames.zarr")
    write_synthetic_era5(path, **{**TINY, "chunks": 1}, layout="weatherbench2")
    add_static_fields(path)
    return path


class RecordingStore(zarr.storage.WrapperStore):
    """A zarr store that notes the key of every read."""

    def __init__(self, store, keys: list[str]):
        super().__init__(store)
        self.keys = keys

    def _with_store(self, store):  # zarr re-wraps the store (read-only) on open: keep the same record
        return type(self)(store, self.keys)

    async def get(self, key, prototype, byte_range=None):
        self.keys.append(key)
        return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        self.keys.extend(k for k, _ in key_ranges)
        return await self._store.get_partial_values(prototype, key_ranges)


def frames_read(keys: list[str]) -> list[int]:
    """Time indices of the data chunks read (`geopotential/c/<time>/<level>/0/0`)."""
    return sorted({int(k.split("/")[2]) for k in keys if k.startswith("geopotential/c/")})


@pytest.mark.parametrize("warmup", [None, 12, "all"])
def test_a_forecast_with_forcings_reads_no_frame_past_its_init_time(frame_store, tmp_path, monkeypatch, warmup):
    """Through write_forecast (what jobs/forecast.py calls), with a context per init or one warm-up pass: the store
    is read up to the last init time only, and each forecast equals the model's rollout with the forcings of its
    valid times (computed, not read); with the forcings an hour late it would differ."""
    keys: list[str] = []
    real = store_module.zarr_store
    monkeypatch.setattr(store_module, "zarr_store", lambda url, so=None: RecordingStore(
        zarr.storage.LocalStore(real(url, so)), keys))
    data = open_channels(frame_store, "geopotential@500", dims=WB2, coarsen=2)
    lat, lon, all_times = data["lat"].values, data["lon"].values, data["time"].values
    model = network()
    model.static.set_fields(torch.from_numpy(read_static(frame_store, STATIC, latitude=lat, longitude=lon, dims=WB2,
                                                         coarsen=2)))
    inits = all_times[[30, 42, 54]]
    keys.clear()
    write_forecast(model, data, inits, context=12, warmup=warmup, steps=6, out=str(tmp_path / "fc.zarr"),
                   batch_size=2)
    read = frames_read(keys)
    assert read and read[-1] == 54, read  # up to the last init time, and no further
    assert read[0] == (0 if warmup == "all" else 19)  # 12 frames of context / warm-up before the first init
    monkeypatch.undo()

    fc = xr.open_zarr(tmp_path / "fc.zarr")["geopotential"].sel(level=500)
    hour = np.timedelta64(1, "h")
    for k, i in enumerate([30, 42, 54]):
        first = {None: i - 11, 12: 19, "all": 0}[warmup]  # the frames the state has read: its context or warm-up
        context = torch.from_numpy(data.isel(time=slice(first, i + 1)).values)[None]
        valid = all_times[first] + hour * np.arange(i - first + 6)  # the context's frames, then leads 1..5
        expected = {}
        for late in (0, 1):
            f = torch.from_numpy(compute_forcings(ALL, valid + late * hour, lat, lon))[None]
            with torch.no_grad():
                expected[late] = model.rollout(context, 6, forcings=f)[0][0, :, 0].numpy()
        np.testing.assert_allclose(fc.isel(time=k).values, expected[0], rtol=1e-5, atol=0)
        assert np.abs(fc.isel(time=k).values - expected[1]).max() > 1.0  # m²/s²: the forcings count


def test_bad_inputs_are_refused_in_one_line_naming_the_key(tiny_static_store, tmp_path, capsys):
    """What `jobs/train_era5.py` prints (exit 2, one line, no traceback), before any Ray starts."""
    base = [f"--url={tiny_static_store}", "--set", "data.dims={lat: latitude, lon: longitude}",
            "--channels=[geopotential@500]", "--set", "data.train_range=[2015-01-01, 2015-01-07]",
            "--set", "data.val_range=[2015-01-08, 2015-01-10]", "--sequence-length=4", "--teacher-steps=3",
            "--set", "data.stride=4",
            "--set", f"run.storage_path={tmp_path}/runs", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    cases = [
        (["--set", "data.forcings=[toa_insolation, moon_phase]"],
         "data.forcings: got ['toa_insolation', 'moon_phase'], expected distinct names from ['local_solar_time', "),
        (["--set", "data.static=[land_sea_mask, soil_type]"],
         "data.static: static field 'soil_type' is not in "),
        (["--set", "data.static=[2m_temperature]"],
         "data.static: static field '2m_temperature' of '" + tiny_static_store + "' has the time dim 'time'"),
        (["--set", "data.static=[land_sea_mask]", "--set", f"data.static_url={tmp_path}/absent.zarr"],
         f"data.static_url: no zarr store at '{tmp_path}/absent.zarr'"),
    ]
    for extra, message in cases:
        assert train_main("train", argv=base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()
