"""The Earth2Studio adapter: the protocol's checks (tests/earth2studio_protocol.py), a 24-step forecast through its
iterator equal to the model's own rollout (also for a model with forcings, computed for each valid time),
Earth2Studio variable names, bad coordinates refused; and, when earth2studio is installed (the optional extra),
the same run through earth2studio's own workflow."""
from collections import OrderedDict

import numpy as np
import pytest
import torch

from minconv_dist.data.forcings import FORCINGS, compute_forcings, forcing_channels
from minconv_dist.evaluate import load_model, open_channels
from minconv_dist.evaluate.earth2studio_adapter import Earth2StudioPrognostic, earth2studio_name
from minconv_dist.models import build_model, save_model_file
from tests.earth2studio_protocol import check_prognostic, fetch_like

HISTORY, STEPS = 6, 24


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("minconvgru", ["z"], 4, 2, padding="cylinder", norm="layer", grid=(16, 32))
    model.normalizer.set_stats([54107.863], [3349.0322])
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model_file(path, model)
    return str(path)


@pytest.fixture(scope="module")
def case(tiny_store, model_uri):
    """(adapter, frames [2 init times, HISTORY, 1, 16, 32] ending at the init times, init times)."""
    adapter = Earth2StudioPrognostic.load(model_uri, tiny_store, coarsen=2, history=HISTORY)
    data = open_channels(tiny_store, "z", coarsen=2)
    init = data["time"].values[[30, 100]]
    rows = np.searchsorted(data["time"].values, init)[:, None] + np.arange(-HISTORY + 1, 1)
    return adapter, data.values[rows].astype(np.float32), init


def test_earth2studio_names():
    assert [earth2studio_name(c) for c in ("z", "geopotential@500", "t", "temperature@850", "2m_temperature",
                                           "u_component_of_wind@250", "10m_v_component_of_wind",
                                           "mean_sea_level_pressure")] == [
        "z500", "z500", "t850", "t850", "t2m", "u250", "v10m", "msl"]
    with pytest.raises(ValueError, match="no Earth2Studio name"):
        earth2studio_name("vorticity")


def test_the_protocol_and_a_24_step_forecast_through_the_iterator(case, model_uri):
    adapter, frames, init = case
    ic = adapter.input_coords()
    assert list(ic) == ["batch", "time", "lead_time", "variable", "lat", "lon"] and list(ic["variable"]) == ["z500"]
    assert ic["lead_time"].tolist() == (np.arange(-HISTORY + 1, 1) * np.timedelta64(1, "h")).astype("m8[ns]").tolist()
    x, coords = fetch_like(frames, init, adapter)
    assert len(check_prognostic(adapter, x, coords, steps=STEPS)) == STEPS + 1  # fp32, as workflows run it

    # in float64 the iterator (state carried, each prediction fed back in physical units) is the model's own
    # 24-step rollout (which stays normalised) up to rounding: 1e-9 of the field's std per value. In fp32 the
    # feedback's rounding (1 ulp of ~5e4) grows to ~1e-4 std over 24 steps of this untrained model.
    double = Earth2StudioPrognostic(load_model(model_uri).double(), ic["lat"], ic["lon"], np.timedelta64(1, "h"),
                                    HISTORY)
    steps = double.create_iterator(x.double(), coords)
    got = torch.cat([next(steps)[0] for _ in range(STEPS + 1)][1:], dim=1)
    with torch.no_grad():
        expected, _ = load_model(model_uri).double().rollout(x.double(), STEPS)  # [2, 24, 1, 16, 32]
    tol = 1e-9 * 3349.0
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)
    assert (expected[:, 1:] - expected[:, :-1]).abs().amax(dim=(2, 3, 4)).min() > 1e5 * tol  # one step off fails


def test_a_model_with_forcings_reads_those_of_each_valid_time(tiny_wb2_store):
    """The forcings of each frame's valid time (the `time` coord plus its `lead_time`; an ensemble dim in front
    folded into the batch): the protocol holds, and in float64 the 24-step iterator is the model's rollout with
    the forcings of the history's and the closed loop's valid times; an hour late they move it far more."""
    data = open_channels(tiny_wb2_store, "geopotential@500", coarsen=2)
    torch.manual_seed(0)
    model = build_model("minconvgru", ["geopotential@500"], 4, 2, padding="cylinder", norm="layer", grid=(16, 32),
                        forcings=forcing_channels(list(FORCINGS)))
    model.normalizer.set_stats([54107.863], [3349.0322])
    with torch.no_grad():
        model.encoder[0].weight.mul_(3)  # forcings that weigh (as tests/test_forcings.py has them)
    lat, lon, hour = data["lat"].values, data["lon"].values, np.timedelta64(1, "h")
    adapter = Earth2StudioPrognostic(model, lat, lon, hour, HISTORY)
    init = data["time"].values[[30, 100]]
    rows = np.searchsorted(data["time"].values, init)[:, None] + np.arange(-HISTORY + 1, 1)
    x, coords = fetch_like(data.values[rows].astype(np.float32), init, adapter)
    check_prognostic(adapter, x, coords, steps=2)

    double = Earth2StudioPrognostic(model.double(), lat, lon, hour, HISTORY)
    steps = double.create_iterator(x.double(), coords)
    got = torch.cat([next(steps)[0] for _ in range(STEPS + 1)][1:], dim=1)
    valid = init[:, None] + hour * np.arange(-HISTORY + 1, STEPS)  # the history, then the closed loop's frames
    expected = {}
    for late in (0, 1):
        f = compute_forcings(model.forcings, (valid + late * hour).ravel(), lat, lon)
        with torch.no_grad():
            expected[late], _ = model.rollout(x.double(), STEPS, forcings=torch.from_numpy(f).reshape(
                *valid.shape, *f.shape[1:]))
    tol = 1e-9 * 3349.0
    torch.testing.assert_close(got, expected[0], rtol=0, atol=tol)
    assert (got - expected[1]).abs().max() > 1e5 * tol
    with pytest.raises(KeyError, match="time not found"):
        adapter(x[0], OrderedDict((k, v) for k, v in coords.items() if k != "time"))


def test_bad_coordinates_are_refused(case):
    adapter, frames, init = case
    x, coords = fetch_like(frames, init, adapter)
    for key, value, error in (("variable", np.array(["t850"]), ValueError), ("lat", coords["lat"][::-1], ValueError),
                              ("lead_time", coords["lead_time"][-3:], ValueError)):
        bad = OrderedDict(coords, **{key: value})
        with pytest.raises(error, match=f"required dim {key}"):
            adapter.output_coords(bad)
    with pytest.raises(KeyError, match="variable"):
        adapter(x[:, :, 0], OrderedDict((k, v) for k, v in coords.items() if k != "variable"))
    with pytest.raises(ValueError, match="does not match the coords"):
        adapter(x[..., :8], OrderedDict(coords, lon=coords["lon"]))


def test_through_earth2studio_itself_when_installed(case):
    """earth2studio's `PrognosticModel` isinstance check, and its `run.deterministic` workflow (fetch_data from a
    DataSource, the iterator, an IO backend) writes what the iterator yields (which the float64 test above
    shows is the model's own rollout). earth2studio hands the model float32, as `check_prognostic` does."""
    run = pytest.importorskip("earth2studio.run", reason="the optional extra earth2studio is not installed")
    from earth2studio.io import KVBackend
    from earth2studio.models.px import PrognosticModel

    adapter, frames, init = case
    assert isinstance(adapter, PrognosticModel)
    io = run.deterministic([init[0]], STEPS, adapter, xr_source(adapter, frames[0], init[0]), KVBackend(),
                           device=torch.device("cpu"), verbose=False)
    got = torch.as_tensor(np.asarray(io["z500"]))[0]  # (time, lead_time, lat, lon): the IC, then 24 steps
    steps = adapter.create_iterator(*fetch_like(frames[:1], init[:1], adapter))
    expected = torch.cat([next(steps)[0] for _ in range(STEPS + 1)], dim=1)[0, :, 0]
    assert got.shape == expected.shape == (STEPS + 1, 16, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * 3349.0)  # the same float32 arithmetic


def xr_source(adapter, frames, init):
    """An Earth2Studio DataSource (`__call__(time, variable) -> DataArray [time, variable, lat, lon]`) serving
    `frames` [HISTORY, C, H, W], the frames an init at `init` reads."""
    import xarray as xr

    ic = adapter.input_coords()
    times = init + ic["lead_time"]

    class Source:
        def __call__(self, time, variable):
            pick = [int(np.flatnonzero(times == t)[0]) for t in np.asarray(time, dtype="datetime64[ns]")]
            return xr.DataArray(frames[pick], dims=("time", "variable", "lat", "lon"),
                                coords={"time": np.asarray(time), "variable": list(variable), "lat": ic["lat"],
                                        "lon": ic["lon"]})

    return Source()
