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


def build_model(
    arch: str,
    in_channels: int,
    hidden_sizes: Sequence[int],
    padding: str = "zeros",
    norm: str = "layer",
    grid: tuple[int, int] | None = None,
    tanh_encoder: bool = False,
    scan_method: str = "auto",
    chunk_size: int | None = None,
) -> Network:
    """Build one of `ARCHS`. norm="layer" (the paper's LayerNorm over [H, W]) needs `grid`.

    chunk_size: Min cells run conv + gates + scan per time chunk, recomputed in backward, so
    activation memory grows with the chunk rather than with T (exact gradients; long sequences).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    hidden_sizes = list(hidden_sizes)
    if not hidden_sizes or len(set(hidden_sizes)) != 1 or hidden_sizes[0] < 1:
        raise ValueError(
            f"hidden_sizes must be a non-empty list of one positive size repeated (the residual "
            f"needs equal sizes), got {hidden_sizes}"
        )
    check_padding(padding)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    hidden = hidden_sizes[0]
    cells = [ARCHS[arch](hidden, padding, scan_method, chunk_size) for _ in hidden_sizes]
    model = Network(
        cells, in_channels, hidden, norm=norm, grid=grid, tanh_encoder=tanh_encoder,
        decode_cell_output=arch == "convgru",
    )
    # What rebuilds this model elsewhere (checkpoints, MLflow, the forecast job): plain values only.
    model.spec = dict(
        arch=arch, in_channels=in_channels, hidden_sizes=hidden_sizes, padding=padding, norm=norm,
        grid=list(grid) if grid is not None else None, tanh_encoder=tanh_encoder,
    )
    return model
