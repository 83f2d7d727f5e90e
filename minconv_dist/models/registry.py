"""`build_model`: the one place that knows which cell each architecture name means."""
from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from minconv_dist.models.baselines import ConvGRUCell, ConvLSTMCell
from minconv_dist.models.min_cells import MinConvCell
from minconv_dist.models.network import Network
from minconv_dist.models.padding import check_padding

CellFactory = Callable[[int, str, str, "int | None"], nn.Module]  # (hidden, padding, scan_method, chunk_size)

ARCHS: dict[str, CellFactory] = {
    "minconvgru": lambda h, p, m, c: MinConvCell("gru", h, p, m, c),
    "minconvlstm": lambda h, p, m, c: MinConvCell("lstm", h, p, m, c),
    "minconvexplstm": lambda h, p, m, c: MinConvCell("explstm", h, p, m, c),
    "convlstm": lambda h, p, m, c: ConvLSTMCell(h, p),
    "convgru": lambda h, p, m, c: ConvGRUCell(h, p),
}
# Their conv reads h_(t-1): no parallel form in time, so no split of time over ranks either.
SEQUENTIAL_ARCHS = ("convgru", "convlstm")


def build_model(
    arch: str,
    channels: int | Sequence[str],
    hidden_size: int,
    layers: int = 1,
    padding: str = "zeros",
    norm: str = "layer",
    grid: tuple[int, int] | None = None,
    tanh_encoder: bool = False,
    scan_method: str = "auto",
    chunk_size: int | None = None,
    forcings: Sequence[str] = (),
    static: Sequence[str] = (),
    predict: str = "state",
) -> Network:
    """Build one of `ARCHS`: `layers` cells of `hidden_size` channels (equal sizes: each layer adds a residual).

    channels: the input channels' names (e.g. `["geopotential@500"]`), or their number (named `c0`, `c1`, ...);
    the model's normaliser keeps their statistics. norm="layer" (the paper's LayerNorm over [H, W]) needs
    `grid`. chunk_size: Min cells run conv + gates + scan per time chunk, recomputed in backward, so
    activation memory grows with the chunk rather than with T (exact gradients; long sequences).
    forcings: names of the forcing channels the model reads with every frame (`minconv_dist.data.forcings`
    computes them); static: names of its fixed input fields (buffers, set with `model.static.set_fields`; they
    need `grid`). Both are inputs only: the model predicts `channels`. predict: "state" (the next frame, the
    paper's) or "tendency" (its change from the frame read, `Network`).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    names = [f"c{i}" for i in range(channels)] if isinstance(channels, int) else [str(c) for c in channels]
    if not names:
        raise ValueError(f"channels must name at least one channel, got {channels!r}")
    if hidden_size < 1 or layers < 1:
        raise ValueError(f"hidden_size={hidden_size} and layers={layers} must both be >= 1")
    check_padding(padding)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    forcings, static = [str(f) for f in forcings], [str(s) for s in static]
    inputs = names + forcings + static
    if len(set(inputs)) != len(inputs):
        raise ValueError(f"channels {names}, forcings {forcings} and static {static} must name distinct inputs")
    cells = [ARCHS[arch](hidden_size, padding, scan_method, chunk_size) for _ in range(layers)]
    model = Network(
        cells, names, hidden_size, norm=norm, grid=grid, tanh_encoder=tanh_encoder,
        decode_cell_output=arch == "convgru", forcings=forcings, static=static, predict=predict,
    )
    # What rebuilds this model elsewhere (model files, MLflow, the forecast job): plain values only.
    model.spec = dict(
        arch=arch, channels=names, hidden_size=hidden_size, layers=layers, padding=padding, norm=norm,
        grid=list(grid) if grid is not None else None, tanh_encoder=tanh_encoder, forcings=forcings, static=static,
        predict=predict,
    )
    return model
