"""A minimal copy of what Earth2Studio 0.19 asks of a prognostic model, for tests that run without it
(earth2studio pulls ~270 MB of dependencies and takes ~50 CPU-seconds to import `earth2studio.models.px`;
tests/test_earth2studio_adapter.py also runs the adapter through earth2studio itself when it is installed).

Copied in substance, not in text, from earth2studio (github.com/NVIDIA/earth2studio, 0e67cdae):
`earth2studio/models/px/base.py` (`PrognosticModel`: `__call__`, `create_iterator`, `input_coords`,
`output_coords`, `to`), `earth2studio/utils/coords.py` (`handshake_dim`, `handshake_coords`),
`earth2studio/models/batch.py` (`batch_func`: an input with one dim fewer than `input_coords` gets a batch dim
and loses it again; extra leading dims are folded into the batch and restored), `earth2studio/data/utils.py`
(`fetch_data`: x with coords `time, lead_time, variable, <domain>`), `earth2studio/run.py` (`deterministic`:
the output coords of `output_coords(input_coords())` without the free dims, then `create_iterator` read for
nsteps + 1 items, the first the initial condition).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

METHODS = ("__call__", "create_iterator", "input_coords", "output_coords", "to")


def handshake_dim(coords: OrderedDict, dim: str, index: int | None = None) -> None:
    """KeyError if `dim` is absent, ValueError if it is not at `index`."""
    if dim not in coords:
        raise KeyError(f"Required dimension {dim} not found in input coordinates")
    if index is not None and list(coords)[index] != dim:
        raise ValueError(f"Required dimension {dim} not found in the required index {index} in {list(coords)}")


def handshake_coords(coords: OrderedDict, target: OrderedDict, dim: str) -> None:
    """ValueError unless coords[dim] equals target[dim] (shape and values)."""
    handshake_dim(coords, dim)
    handshake_dim(target, dim)
    if coords[dim].shape != target[dim].shape or not np.all(coords[dim] == target[dim]):
        raise ValueError(f"Coordinate systems for required dim {dim} are not the same")


def fetch_like(frames: np.ndarray, time: np.ndarray, model) -> tuple[torch.Tensor, OrderedDict]:
    """What `fetch_data` hands a workflow: frames [time, lead_time, variable, lat, lon] with coords built from
    the model's `input_coords()` (the free dims dropped, `time` set)."""
    wanted = model.input_coords()
    coords = OrderedDict(time=np.asarray(time))
    coords.update((k, v) for k, v in wanted.items() if k not in ("batch", "time"))
    return torch.as_tensor(frames), coords


def check_prognostic(model, x: torch.Tensor, coords: OrderedDict, steps: int = 2) -> list[torch.Tensor]:
    """Assert the protocol on input x with `coords` (as `fetch_like` gives); returns the iterator's first
    steps + 1 outputs (the initial condition first)."""
    for name in METHODS:
        assert callable(getattr(model, name, None)), f"{name} missing"
    ic = model.input_coords()
    assert isinstance(ic, OrderedDict) and next(iter(ic)) == "batch", "input_coords: an OrderedDict, batch first"
    assert all(isinstance(v, np.ndarray) for v in ic.values())
    assert ic["batch"].shape == (0,) and ic["time"].shape == (0,), "batch and time are free dims"
    assert ic["lead_time"].dtype.kind == "m" and ic["lead_time"][-1] == np.timedelta64(0), "history ends at 0"
    oc = model.output_coords(ic)
    assert isinstance(oc, OrderedDict) and list(oc) == list(ic), "output_coords keeps the dims"
    dt = oc["lead_time"][-1] - ic["lead_time"][-1]
    assert oc["lead_time"].shape == (1,) and dt > np.timedelta64(0)
    for i, dim in enumerate(k for k in ic if k != "batch"):  # the input as the workflow builds it
        handshake_dim(coords, dim, i)
        if dim != "time":
            handshake_coords(OrderedDict(coords, lead_time=coords["lead_time"] - coords["lead_time"][-1]), ic, dim)

    y, yc = model(x, coords)  # one dim fewer than input_coords: no batch dim in, none out
    assert isinstance(yc, OrderedDict) and list(yc) == list(coords)
    assert tuple(y.shape) == (*x.shape[:-4], 1, *x.shape[-3:]) and yc["lead_time"][0] == coords["lead_time"][-1] + dt
    ens = x.unsqueeze(0).expand(2, *x.shape)  # a leading ensemble dim is folded into the batch and restored
    ye, yec = model(ens, OrderedDict(ensemble=np.arange(2), **coords))
    assert tuple(ye.shape) == (2, *y.shape) and list(yec)[0] == "ensemble"
    torch.testing.assert_close(ye[1], y)

    outs, it = [], model.create_iterator(x, coords)
    for k in range(steps + 1):
        out, out_coords = next(it)
        assert list(out_coords) == list(coords)
        assert out_coords["lead_time"].tolist() == [coords["lead_time"][-1] + k * dt], (k, out_coords["lead_time"])
        assert tuple(out.shape) == (*x.shape[:-4], 1, *x.shape[-3:])
        outs.append(out)
    torch.testing.assert_close(outs[0], x[..., -1:, :, :, :])  # the initial condition first
    torch.testing.assert_close(outs[1], y)  # its first step is __call__'s
    assert model.to("cpu") is not None
    return outs
