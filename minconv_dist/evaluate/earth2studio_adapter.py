"""A model of this package as an Earth2Studio prognostic model, so Earth2Studio's workflows (`run.deterministic`,
`run.ensemble`), data sources and IO backends drive it. Nothing here imports earth2studio: its protocol is
structural; `pip install .[earth2studio]` adds the package itself.

The protocol, as earth2studio 0.19 defines it (`earth2studio/models/px/base.py` `PrognosticModel`, coords as
`earth2studio/utils/type.py` `CoordSystem`: an `OrderedDict` of numpy arrays, one per tensor dim, in order):
- `input_coords()`: `batch` and `time` free (`np.empty(0)`), `lead_time` the history read (timedelta64,
  `-(h - 1) dt .. 0`), `variable` (Earth2Studio names), `lat`, `lon` (the model's grid, in its order);
- `output_coords(input_coords)`: the same, `lead_time` one step `dt` past the input's last; raises (as
  `earth2studio/utils/coords.py` `handshake_dim` / `handshake_coords` do: KeyError, ValueError) unless the
  input's last four dims are `lead_time, variable, lat, lon` with this model's variables, grid and history;
- `__call__(x, coords)`: one step from x [..., lead_time, variable, lat, lon]; the leading dims (`batch`,
  `time`, an `ensemble`, ...) are folded into one batch and restored, as `earth2studio/models/batch.py`
  `batch_func` does;
- `create_iterator(x, coords)`: yields the initial condition (x's last frame, `lead_time` 0 step) first, then
  one step per `next`. The recurrent state is carried between steps, so a step costs one closed-loop step, not
  a warm-up over the history;
- `to(device)`: moves the network, returns the adapter.
Inputs and outputs are in physical units (the network normalises itself). A model with forcings gets them
computed for each frame's valid time, the `time` coord plus its `lead_time` (`data/forcings.py`), as a forecast
of this package does; its static fields are in its weights.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator

import numpy as np
import torch

from minconv_dist.data import DimNames, default_store
from minconv_dist.data.forcings import compute_forcings
from minconv_dist.evaluate.forecast import open_channels, time_step
from minconv_dist.evaluate.layout import weatherbench2_key
from minconv_dist.evaluate.model_uri import load_model

CoordSystem = OrderedDict  # str -> np.ndarray, as earth2studio.utils.type.CoordSystem
DOMAIN = ("lead_time", "variable", "lat", "lon")  # the input's last dims

#: WeatherBench2 variable on pressure levels -> Earth2Studio's prefix of `<prefix><level>` (`z500`, `t850`):
#: `earth2studio/lexicon/wb2.py` `WB2Lexicon` and `arco.py` `ARCOLexicon`.
LEVEL_PREFIX = {"geopotential": "z", "temperature": "t", "u_component_of_wind": "u", "v_component_of_wind": "v",
                "vertical_velocity": "w", "specific_humidity": "q", "relative_humidity": "r"}
#: WeatherBench2 single-level variable -> Earth2Studio name: the same lexicons, `tisr` from `lexicon/base.py`.
SURFACE_NAMES = {"10m_u_component_of_wind": "u10m", "10m_v_component_of_wind": "v10m",
                 "100m_u_component_of_wind": "u100m", "100m_v_component_of_wind": "v100m", "2m_temperature": "t2m",
                 "2m_dewpoint_temperature": "d2m", "surface_pressure": "sp", "mean_sea_level_pressure": "msl",
                 "total_column_water_vapour": "tcwv", "total_precipitation": "tp", "sea_surface_temperature": "sst",
                 "toa_incident_solar_radiation": "tisr"}


def earth2studio_name(channel: str) -> str:
    """A channel spec as Earth2Studio names it: `z` and `geopotential@500` -> `z500`, `2m_temperature` -> `t2m`."""
    name, level = weatherbench2_key(channel)
    known = LEVEL_PREFIX.get(name) if level is not None else SURFACE_NAMES.get(name)
    if known is None:
        raise ValueError(f"channel {channel!r} (WeatherBench2 {name!r}, level {level}) has no Earth2Studio name; "
                         f"known: {sorted(LEVEL_PREFIX)} on levels, {sorted(SURFACE_NAMES)}")
    return known if level is None else f"{known}{level}"


class Earth2StudioPrognostic:
    """An Earth2Studio `PrognosticModel` around `model` (a `Network`, e.g. from `load_model`) on the grid `lat`,
    `lon` (degrees, in the model's order), stepping `time_step`, warming up on `history` frames."""

    def __init__(self, model: torch.nn.Module, lat: np.ndarray, lon: np.ndarray, time_step: np.timedelta64,
                 history: int = 1):
        if history < 1:
            raise ValueError(f"history={history}: the model reads at least the initial frame")
        grid = (len(lat), len(lon))
        if model.grid is not None and tuple(model.grid) != grid:
            raise ValueError(f"the model was built for grid {tuple(model.grid)}, lat x lon is {grid}")
        self.model = model.eval()
        self.time_step = np.timedelta64(time_step, "ns")
        self._input = CoordSystem({
            "batch": np.empty(0), "time": np.empty(0),
            "lead_time": self.time_step * np.arange(-history + 1, 1),
            "variable": np.array([earth2studio_name(c) for c in model.normalizer.channels]),
            "lat": np.asarray(lat, dtype=float), "lon": np.asarray(lon, dtype=float)})

    @classmethod
    def load(cls, uri: str, data: str | None = None, *, coarsen: int = 1, dims: DimNames = DimNames(),
             history: int = 1, storage_options: dict | None = None, **load_kwargs: Any) -> "Earth2StudioPrognostic":
        """`load_model(uri, **load_kwargs)` on the grid and time step of its channels in the store `data` (default:
        the embedded one), block-averaged by `coarsen` as in training."""
        model = load_model(uri, **load_kwargs)
        field = open_channels(data or default_store(), model.normalizer.channels, dims=dims, coarsen=coarsen,
                              storage_options=storage_options)
        return cls(model, field["lat"].values, field["lon"].values, time_step(field["time"].values), history)

    def __str__(self) -> str:
        return "minconv_dist"

    def input_coords(self) -> CoordSystem:
        return CoordSystem((k, v.copy()) for k, v in self._input.items())

    def _check(self, coords: CoordSystem) -> None:
        """Raise, as Earth2Studio's handshakes do, unless coords end with this model's domain."""
        dims = list(coords)
        if dims[-len(DOMAIN):] != list(DOMAIN):
            missing = [d for d in DOMAIN if d not in coords]
            if missing:
                raise KeyError(f"Required dimension {missing[0]} not found in input coordinates {dims}")
            raise ValueError(f"expected the input's last dims to be {list(DOMAIN)}, got {dims}")
        lead = np.asarray(coords["lead_time"]) - np.asarray(coords["lead_time"])[-1]
        for key, got in (("lead_time", lead), ("variable", coords["variable"]), ("lat", coords["lat"]),
                         ("lon", coords["lon"])):
            want = self._input[key]
            if np.shape(got) != want.shape or not np.all(np.asarray(got) == want):
                raise ValueError(f"Coordinate systems for required dim {key} are not the same: got "
                                 f"{np.asarray(got)[:6]}, this model takes {want[:6]}")

    def output_coords(self, input_coords: CoordSystem) -> CoordSystem:
        self._check(input_coords)
        out = CoordSystem(input_coords)
        out["lead_time"] = np.asarray(input_coords["lead_time"])[-1:] + self.time_step
        return out

    def _flat(self, x: torch.Tensor, coords: CoordSystem) -> torch.Tensor:
        """x [..., T, C, H, W] -> [B, T, C, H, W], after checking x's shape against coords."""
        if tuple(x.shape) != tuple(len(v) for v in coords.values()):
            raise ValueError(f"tensor shape {tuple(x.shape)} does not match the coords "
                             f"{ {k: len(v) for k, v in coords.items()} }")
        return x.reshape(-1, *x.shape[-4:])

    def _forcings(self, coords: CoordSystem, lead: np.ndarray, device: torch.device) -> torch.Tensor | None:
        """The model's forcings [B, len(lead), F, H, W] at valid times `time` + `lead` of every item of the
        folded batch (None without forcings); refuses coords without a `time` dim before the domain."""
        if not self.model.forcings:
            return None
        leading = list(coords)[:-len(DOMAIN)]
        if "time" not in leading:
            raise KeyError(f"Required dimension time not found in input coordinates {list(coords)}: this model "
                           f"reads forcings {self.model.forcings} computed from each frame's valid time")
        at = leading.index("time")
        init = np.asarray(coords["time"], dtype="datetime64[ns]").reshape([-1 if i == at else 1
                                                                           for i in range(len(leading))])
        init = np.broadcast_to(init, [len(coords[d]) for d in leading]).reshape(-1)
        valid = init[:, None] + np.asarray(lead, dtype="timedelta64[ns]")[None, :]
        f = compute_forcings(self.model.forcings, valid.ravel(), self._input["lat"], self._input["lon"])
        return torch.from_numpy(f.reshape(*valid.shape, *f.shape[1:])).to(device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, coords: CoordSystem) -> tuple[torch.Tensor, CoordSystem]:
        out = self.output_coords(coords)
        forcings = self._forcings(coords, coords["lead_time"], x.device)
        y, _ = self.model.rollout(self._flat(x, coords), 1, forcings=forcings)
        return y.to(x.dtype).reshape(*x.shape[:-4], *y.shape[1:]), out

    def create_iterator(self, x: torch.Tensor, coords: CoordSystem) -> Iterator[tuple[torch.Tensor, CoordSystem]]:
        out = self.output_coords(coords)  # checks before the first yield
        initial = CoordSystem(coords)
        initial["lead_time"] = np.asarray(coords["lead_time"])[-1:]
        yield x[..., -1:, :, :, :], initial
        with torch.no_grad():
            y, state = self.model.rollout(self._flat(x, coords), 1,
                                          forcings=self._forcings(coords, coords["lead_time"], x.device))
        while True:
            yield y.to(x.dtype).reshape(*x.shape[:-4], *y.shape[1:]), out
            read = out["lead_time"]  # the valid time of the frame read next: the one just yielded
            out = CoordSystem(out)
            out["lead_time"] = out["lead_time"] + self.time_step
            with torch.no_grad():  # continues the trajectory exactly
                y, state = self.model.rollout(y.to(x.dtype), 1, state,
                                              forcings=self._forcings(coords, read, x.device))

    def to(self, device: Any) -> "Earth2StudioPrognostic":
        self.model.to(device)
        return self
