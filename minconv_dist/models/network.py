"""The network shared by all five cells: normaliser -> 1x1 encoder -> [cell + residual + post-norm] x L ->
1x1 decoder -> de-normaliser. Inputs and outputs are in physical units; everything between is normalised.

Semantics follow the official implementation:
- `forward(x, teacher_steps=k)`: frames 0..k-1 are read teacher-forced (Min cells: in parallel), then
  T-k closed-loop steps each feed back the previous prediction. Output t predicts frame t+1.
- Closed loop uses each cell's step form, continuing from the state the teacher-forced part left.
- Stateful training (`forward(x, state=s, return_carry=True)`): the window starts from the carried state s and
  also returns the carry for the next window, the state after all T input frames read teacher-forced (`carry`),
  detached: no gradient flows into the window before.
- Time parallelism (`forward(..., time_group=g)`): x is one time block of a window split over the ranks of g;
  the Min cells exchange their carry-in states (exact, forward and backward), the per-frame encoder, norms
  and decoder need nothing, and the closed loop runs on g's last rank from the window's final state.
- ConvGRU decodes its last cell's raw output rather than the normed residual (as the official code
  does); the other four decode the normed residual stream.

Inputs that are not predicted: the encoder reads the C prognostic channels, then F forcing channels (`forcings=`
tensors the caller computes from each frame's valid time; the network knows nothing of time) and S static fields
(`static`: buffers of the network, normalised by their own statistics); the decoder predicts the C prognostic
channels. Every frame is read with the forcings of its own valid time, also in the closed loop, where the frame
read is the previous prediction: a forecast needs the forcings of its future valid times, never future data.

What the decoder predicts (`predict`): "state", the next frame itself (the paper's and the official code's), or
"tendency", the change from the frame read, in units of the change's own std (`TendencyNormalizer`): the frame
read is added back in float32, so the state a closed loop carries from step to step stays float32 under bf16.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from minconv_dist.models.normalizer import Normalizer, StaticFields, TendencyNormalizer

NORMS = ("layer", "group")  # LayerNorm over [H, W] (the paper's), or GroupNorm(1, hidden) (grid-free)
PREDICTS = ("state", "tendency")  # the next frame (the paper's), or its change from the frame read

State = list[Any]  # one entry per layer: a tensor, or (h, c) for ConvLSTM


class GridLayerNorm(nn.LayerNorm):
    """The paper's LayerNorm over the [H, W] grid, its weight and bias [H, W] (the official layout), computed as a
    LayerNorm over the flattened H*W. Same numbers; but CUDA's backward with a 2-D normalized shape returned
    a weight gradient of shape [W] for a long window (T = 8760 frames x 24 channels = 210240 rows, bf16,
    torch 2.11 on an H200: "NativeLayerNormBackward0 returned an invalid gradient at index 1 - got [32] but
    expected shape compatible with [16, 32]"); the 1-D form avoids that path."""

    def forward(self, x: Tensor) -> Tensor:
        flat = F.layer_norm(x.flatten(-2), (x.shape[-2] * x.shape[-1],), self.weight.flatten(),
                            self.bias.flatten(), self.eps)
        return flat.view_as(x)


def map_state(state: State, fn: Callable[[Tensor], Tensor]) -> State:
    """`fn` applied to every tensor of a state (a tensor or an (h, c) tuple per layer)."""
    return [tuple(fn(t) for t in s) if isinstance(s, tuple) else fn(s) for s in state]


def _per_frame(module: nn.Module, x: Tensor) -> Tensor:
    """Apply a 4-D module to [..., C, H, W] by folding the leading dims into the batch."""
    y = module(x.reshape(-1, *x.shape[-3:]))
    return y.reshape(*x.shape[:-3], *y.shape[-3:])


def residual_norm(norm: nn.Module, z: Tensor, out: Tensor) -> Tensor:
    """The post-norm of a layer: norm(z + out) per frame, z and out [..., hidden, H, W]. A function of its own
    (`Network.residual_norm`), so `Network.fuse_residual_norm` can swap in a compiled copy."""
    return _per_frame(norm, z + out)


class Network(nn.Module):
    """Normaliser, encoder, L residual recurrent layers with post-norm, decoder. Stateless between calls.

    `channels` names the prognostic channels (e.g. `geopotential@500`), read and predicted; their statistics are
    buffers of `normalizer` (identity until set), so a model file carries them with the weights. `forcings` names
    the forcing channels the caller passes with every frame (e.g. `toa_insolation`), `static` the fixed fields
    (buffers of `static`, set with `static.set_fields`; they need `grid`); both are read, not predicted.
    predict="tendency": the decoder predicts each step's change (set its std with
    `normalizer.set_tendency_std`), else the next frame."""

    def __init__(
        self,
        cells: Sequence[nn.Module],
        channels: Sequence[str],
        hidden: int,
        norm: str = "layer",
        grid: tuple[int, int] | None = None,
        tanh_encoder: bool = False,
        decode_cell_output: bool = False,
        forcings: Sequence[str] = (),
        static: Sequence[str] = (),
        predict: str = "state",
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
        if predict not in PREDICTS:
            raise ValueError(f"unknown predict {predict!r}; expected one of {PREDICTS}")
        if norm == "layer" and grid is None:
            raise ValueError("norm='layer' normalises over [H, W] and needs grid=(H, W)")
        if static and grid is None:
            raise ValueError(f"static fields {list(static)} are [S, H, W] buffers and need grid=(H, W)")
        in_channels = len(channels)
        self.predict = predict
        self.normalizer = TendencyNormalizer(channels) if predict == "tendency" else Normalizer(channels)
        self.in_channels = in_channels
        self.forcings = [str(f) for f in forcings]
        self.static = StaticFields(static, tuple(grid)) if static else None
        self.hidden = hidden
        self.grid = tuple(grid) if norm == "layer" else None
        reads = in_channels + len(self.forcings) + len(static)
        encoder: list[nn.Module] = [nn.Conv2d(reads, hidden, kernel_size=1)]
        if tanh_encoder:
            encoder.append(nn.Tanh())
        self.encoder = nn.Sequential(*encoder)
        self.cells = nn.ModuleList(cells)
        self.norms = nn.ModuleList(
            GridLayerNorm(grid) if norm == "layer" else nn.GroupNorm(1, hidden) for _ in cells
        )
        self.decoder = nn.Conv2d(hidden, in_channels, kernel_size=1)
        self.decode_cell_output = decode_cell_output
        self.residual_norm = residual_norm

    def fuse_residual_norm(self) -> None:
        """Run each layer's residual add + post-norm (and autocast's casts around them) as kernels fused by
        `torch.compile`, the rest of the network eager: 1.15x the bf16 MinConvGRU training step on an H100
        (docs/benchmarks.md, issue 14). Same numbers up to the order of the norm's reductions. Every model of a
        process shares the compiled function's graphs (one per rank x grad mode x autocast x dtype, 4 in a run):
        past Dynamo's recompile limit (8), later variants run eager."""
        self.residual_norm = torch.compile(residual_norm, dynamic=False)

    def _check(self, x: Tensor, name: str, rank: int) -> None:
        if x.dim() != rank:
            shape = "[B, T, C, H, W]" if rank == 5 else "[B, C, H, W]"
            raise ValueError(f"{name}: expected a {rank}-D tensor {shape}, got shape {tuple(x.shape)}")
        if x.shape[-3] != self.in_channels:
            raise ValueError(f"{name}: has {x.shape[-3]} channels, the model expects {self.in_channels}")
        if self.grid is not None and tuple(x.shape[-2:]) != self.grid:
            raise ValueError(
                f"{name}: grid {tuple(x.shape[-2:])} differs from the LayerNorm grid {self.grid}; "
                "use norm='group' for a grid-free model"
            )

    def _check_forcings(self, forcings: Tensor | None, x: Tensor, frames: int, name: str) -> None:
        """forcings: [B, frames, F, H, W] for a model with F > 0 forcing channels, else None."""
        if not self.forcings:
            if forcings is not None:
                raise ValueError(f"{name}: this model reads no forcings, got a tensor of shape {tuple(forcings.shape)}")
            return
        expected = (x.shape[0], frames, len(self.forcings), *x.shape[-2:])
        if forcings is None or tuple(forcings.shape) != expected:
            got = "none" if forcings is None else f"shape {tuple(forcings.shape)}"
            raise ValueError(f"{name}: expected forcings {self.forcings} of shape {expected} [B, frames, F, H, W], "
                             f"got {got}")

    def _inputs(self, z: Tensor, forcings: Tensor | None) -> Tensor:
        """What the encoder reads: normalised prognostic z [..., C, H, W], the forcings [..., F, H, W] of its
        frames, the normalised static fields; in the network's dtype."""
        dtype = self.decoder.weight.dtype
        parts = [z.to(dtype)]
        if forcings is not None:
            parts.append(forcings.to(dtype))
        if self.static is not None:
            static = self.static.normalized().to(dtype)
            parts.append(static.expand(*z.shape[:-3], *static.shape))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-3)

    def _layers(self, x: Tensor, state: State | None, parallel: bool, time_group=None,
                forcings: Tensor | None = None) -> tuple[Tensor, State]:
        """One pass through encoder, cells and decoder; x: normalised [B, T, C, H, W] (parallel) or [B, C, H, W],
        forcings: those of x's frames, [B, T, F, H, W] or [B, F, H, W] (None without forcings). Returns the
        normalised next frames: the decoder's output, or with predict="tendency" x plus the decoded change (in
        at least float32)."""
        z = _per_frame(self.encoder, self._inputs(x, forcings))
        new_state: State = []
        for layer, (cell, norm) in enumerate(zip(self.cells, self.norms)):
            previous = None if state is None else state[layer]
            out, s = cell(z, previous, time_group) if parallel else cell.step(z, previous)
            z = self.residual_norm(norm, z, out)
            new_state.append(s)
        y = _per_frame(self.decoder, out if self.decode_cell_output else z)
        return (self.normalizer.next_frame(x, y) if self.predict == "tendency" else y), new_state

    def _normalized(self, x: Tensor) -> Tensor:
        """Physical inputs -> normalised, in at least float32 (`_inputs` casts what the encoder reads)."""
        return self.normalizer.normalize(x)

    def _closed_loop(self, y: Tensor, state: State, steps: int, forcings: Tensor | None
                     ) -> tuple[list[Tensor], State]:
        """`steps` steps from prediction y [B, C, H, W], each reading the last prediction with the forcings of
        its valid time, forcings[:, i] ([B, steps, F, H, W]; None without forcings)."""
        preds = []
        for i in range(steps):
            y, state = self._layers(y, state, parallel=False, forcings=None if forcings is None else forcings[:, i])
            preds.append(y)
        return preds, state

    @staticmethod
    def _frames(forcings: Tensor | None, start: int, stop: int | None = None) -> Tensor | None:
        return None if forcings is None else forcings[:, start:stop]

    def forward(self, x: Tensor, teacher_steps: int | None = None, time_group=None,
                forcings: Tensor | None = None, state: State | None = None, return_carry: bool = False
                ) -> Tensor | tuple[Tensor, State]:
        """x: [B, T, C, H, W] -> predictions [B, T, C, H, W] (k = teacher_steps, default T), physical units,
        in at least float32. forcings: [B, T, F, H, W], those of x's frames (the closed loop reads predictions
        of frames k..T-1 with forcings[:, k:]); None for a model without forcings.

        state: where the window starts (None: each cell's initial state), e.g. the carry of the window before.
        return_carry: also return the carry for the next window, `(predictions, carry(x, k, state after k))`.

        time_group: x is this rank's block of a window split in time over the group's ranks (in rank order),
        and k counts the block's teacher-forced frames. Only the last rank may run closed-loop steps (k < T):
        they continue from the window's state after its teacher-forced frames."""
        self._check(x, "x", 5)
        T = x.shape[1]
        self._check_forcings(forcings, x, T, "forcings")
        k = T if teacher_steps is None else teacher_steps
        if not 1 <= k <= T:
            raise ValueError(f"teacher_steps={k} must lie in [1, T={T}]")
        if time_group is not None and k < T and dist.get_rank(time_group) < dist.get_world_size(time_group) - 1:
            raise ValueError(f"teacher_steps={k} < T={T} on time rank {dist.get_rank(time_group)}: only the last "
                             "rank of a time group runs the closed loop")
        if time_group is not None and (state is not None or return_carry):
            raise ValueError("a carried state (state=, return_carry=) is not supported with time_group")
        y, state = self._layers(self._normalized(x[:, :k]), state, parallel=True, time_group=time_group,
                                forcings=self._frames(forcings, 0, k))
        preds, _ = self._closed_loop(y[:, -1], state, T - k, self._frames(forcings, k))
        out = self.normalizer.denormalize(torch.cat([y, *(p.unsqueeze(1) for p in preds)], dim=1))
        return (out, self.carry(x, k, state, forcings)) if return_carry else out

    def carry(self, x: Tensor, teacher_steps: int, state: State, forcings: Tensor | None = None) -> State:
        """The state after all T frames of x [B, T, C, H, W] read teacher-forced, from `state`, the state after
        its first k = teacher_steps; detached. With k < T the closed loop read predictions of frames k..T-1, so
        the carry reads the frames themselves, in one parallel pass without autograd (`warm_states`): the next
        window continues from the truth."""
        state = map_state(state, Tensor.detach)
        if teacher_steps < x.shape[1]:
            with torch.no_grad():
                _, state = self.warm_states(x[:, teacher_steps:], [], state, self._frames(forcings, teacher_steps))
        return state

    def rollout(self, context: Tensor, steps: int, state: State | None = None, forcings: Tensor | None = None
                ) -> tuple[Tensor, State]:
        """Warm up on context [B, Tc, C, H, W] (from `state` if given), then forecast `steps` frames.

        Returns (forecast [B, steps, C, H, W] in physical units, state). forecast[:, 0] predicts the frame after the
        context. The state has consumed every frame but the last forecast, so
        `rollout(forecast[:, -1:], m, state)` continues the same trajectory exactly. forcings: [B, Tc + steps - 1,
        F, H, W], those of the context's frames and of the forecast frames the closed loop reads (all but the last),
        in time order: everything a forecast needs is known at the context's last frame.
        """
        self._check(context, "context", 5)
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        Tc = context.shape[1]
        self._check_forcings(forcings, context, Tc + steps - 1, "forcings")
        y, state = self._layers(self._normalized(context), state, parallel=True,
                                forcings=self._frames(forcings, 0, Tc))
        preds, state = self._closed_loop(y[:, -1], state, steps - 1, self._frames(forcings, Tc))
        return self.normalizer.denormalize(torch.stack([y[:, -1], *preds], dim=1)), state

    def warm_states(self, x: Tensor, ends: Sequence[int], state: State | None = None,
                    forcings: Tensor | None = None) -> tuple[list[tuple[State, Tensor]], State]:
        """Read x [B, T, C, H, W] (physical units) in consecutive parallel passes that end at each of `ends`
        (ascending frame indices in [0, T)) and at the last frame, carrying the state from pass to pass.

        Returns ([(state after frame e, prediction of frame e + 1 [B, C, H, W] in physical units) for e in
        ends], state after the last frame). So one scan over a long record gives the state at every init time
        e: the prediction is `rollout(x[:, :e + 1], m, state)[0][:, 0]`, and `rollout(y[:, None], m - 1,
        state_e)` gives the rest of that forecast. Pass the returned state with the next stretch of the
        record to go on. Exact for every cell; only the Min cells run each pass as one scan (ConvLSTM and
        ConvGRU loop over its frames). forcings: [B, T, F, H, W], those of x's frames.
        """
        self._check(x, "x", 5)
        self._check_forcings(forcings, x, x.shape[1], "forcings")
        T, ends = x.shape[1], [int(e) for e in ends]
        if any(not 0 <= e < T for e in ends) or any(a >= b for a, b in zip(ends, ends[1:])):
            raise ValueError(f"ends must be strictly ascending frame indices in [0, {T}), got {ends[:5]} ...")
        z, start, found = self._normalized(x), 0, []
        for end in ends + ([T - 1] if not ends or ends[-1] != T - 1 else []):
            y, state = self._layers(z[:, start:end + 1], state, parallel=True,
                                    forcings=self._frames(forcings, start, end + 1))
            found.append((state, self.normalizer.denormalize(y[:, -1])))
            start = end + 1
        return found[:len(ends)], state
