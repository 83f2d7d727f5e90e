"""Fused Triton scan (GPU): linear space, fp32 accumulation, its own backward kernel.

Why linear space: every Min cell has a_t in (0, 1), so the recurrence only shrinks earlier errors
(|dh_t| <= |dh_{t-1}| + rounding of one step) and fp32 is stable; it also reads each input once,
where the log form streams five full-size intermediates through memory.

Layout: a, b viewed as [B, T, D] (D = C*H*W). A program owns BD consecutive elements of D for one
batch row and one time chunk. It loads [BT, BD] tiles (coalesced over D, 16 bytes a thread and row, the
next tiles' loads in flight while one is scanned), scans each tile along time with `tl.associative_scan`
(within each thread: every warp lies along D), and carries the state to the next tile. When B*D alone
cannot fill the GPU, time is split into chunks too: pass 1 reduces each chunk to its affine map (prod a,
end state from 0), a tiny scan over the chunks gives each chunk its initial state, pass 2 scans again
from it.

KIND says where (a, b) come from: PLAIN = given a and b; a Min cell's KIND (ops/gates.py `GATES`,
with its number of gate blocks NB) = its conv pre-activations [B, T, NB*D], gate blocks stacked on
channels, gates computed in registers. Every rule has b = (1 - a) * g(h~), so the kinds differ only in
a(pre) and the slopes of logit(a) (`_gates`). The backward recomputes the gates from `pre` and
reads the saved h; nothing else is stored.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from torch import Tensor

from minconv_dist.ops.gates import GATES, gate_kind
from minconv_dist.ops.scan.naive import scan_sequential

PLAIN = 0  # KIND of the plain scan: x = a, y = b, one block per row
_PLAIN = tl.constexpr(PLAIN)
_GRU = tl.constexpr(GATES["gru"].kernel)
_LSTM = tl.constexpr(GATES["lstm"].kernel)
# (BT, BD, num_warps, NS): BT steps x BD columns a tile; NS - 1 tiles' loads in flight (copied asynchronously to
# shared memory) while one is scanned. The pipelined tiles (NS 2-3) won benchmarks/scan_tiles.py's sweep of the plain
# scan on an H200 (fp32 and bf16, walks of 24 to 8192 steps: docs/benchmarks.md, "Speed II, item 1"); the NS = 1
# ones are the earlier lists' (which the fused Min-cell kernels picked). The autotuner picks among them per D.
# One BT per kernel: a tile of BT steps is scanned as a tree, so the bits depend on BT (and on nothing else of the
# config: benchmarks/scan_determinism.py on an H200). With one BT, whatever config a new process's autotuning
# picks, a run restarted from a checkpoint (a killed worker, --resume) redoes the same arithmetic, bit for bit.
_FWD_BT, _BWD_BT = 8, 4
_FWD_CONFIGS = [triton.Config({"BT": _FWD_BT, "BD": bd, "NS": ns}, num_warps=w) for bd, w, ns in [
    (512, 4, 3), (512, 2, 3), (1024, 4, 3), (512, 2, 2), (1024, 4, 2), (512, 4, 1), (1024, 4, 1), (256, 2, 1)]]
_CONFIGS = [triton.Config({"BT": _BWD_BT, "BD": bd, "NS": ns}, num_warps=w) for bd, w, ns in [
    (512, 4, 3), (1024, 8, 3), (512, 2, 3), (1024, 4, 3), (512, 2, 2), (1024, 4, 2),
    (1024, 8, 1), (512, 4, 1), (256, 2, 1), (1024, 4, 1), (512, 2, 1)]]
_MIN_CHUNK = 64  # time steps per chunk when time is split


def _prune(configs, named_args, **kwargs):
    """Keep the blocks whose warps all lie along D, and skip blocks far wider than D (tiny D: they only cost compile
    time). A thread loads 16 bytes of a row, so a block narrower than num_warps * 32 threads * 16 bytes puts warps
    along time, and the tile's scan then crosses warps through shared memory and barriers (bf16 at BD = 512 with 4
    warps: docs/benchmarks.md, "Speed II, item 1")."""
    per_thread = 16 // named_args["X"].element_size()
    along_d = [c for c in configs if c.kwargs["BD"] >= 32 * c.num_warps * per_thread] or configs
    width = max(256, triton.next_power_of_2(named_args["D"]))
    return [c for c in along_d if c.kwargs["BD"] <= width] or along_d


@triton.jit
def _combine(a1, b1, a2, b2):
    """(a1, b1) then (a2, b2): h -> a2 * (a1 * h + b1) + b2."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _sigmoid(x):
    """With a fast division (2 ulp): the IEEE division that `/` compiles to was most of a fused backward's work."""
    return libdevice.fast_dividef(1.0, 1.0 + tl.exp(-x))


@triton.jit
def _last(x, rows, BT: tl.constexpr):
    """Row BT-1 of a [BT, BD] tile (masked rows are identities, so it is the last valid state)."""
    return tl.sum(tl.where(rows[:, None] == BT - 1, x, 0.0), axis=0)


@triton.jit
def _program(T, D, chunk_len, BT: tl.constexpr, BD: tl.constexpr):
    """Both kernels' set-up: this program's batch row bi, time chunk c = [t_lo, t_hi), columns offs_d
    of D (mask dm), the tile's rows, and the offset of its state in a [B, n_chunks, D] tensor."""
    pid_d = tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2)
    offs_d = pid_d * BD + tl.arange(0, BD)
    dm = offs_d < D
    rows = tl.arange(0, BT)
    t_lo = c * chunk_len
    t_hi = tl.minimum(t_lo + chunk_len, T)
    state_off = (bi * tl.num_programs(2) + c) * D + offs_d
    return bi, c, offs_d, dm, rows, t_lo, t_hi, state_off


@triton.jit
def _x_off(bi, T, t, offs_d, D, NB: tl.constexpr):
    """Offsets of the tile at steps t, columns offs_d of batch row bi in x [B, T, NB*D]
    (offsets, not pointers: a Min cell's gate blocks are read at +BS, +2BS from them)."""
    return (bi * T + t[:, None]) * (NB * D) + offs_d[None, :]


@triton.jit
def _d_ptr(P, bi, T, t, offs_d, D, SHIFT: tl.constexpr = 0):
    """Pointers of the tile at steps t + SHIFT, columns offs_d of batch row bi in a [B, T, D] tensor."""
    return P + (bi * T + t[:, None] + SHIFT) * D + offs_d[None, :]


@triton.jit
def _g_and_slope(x):
    """minGRU's g (ops/gates.py) of a raw h~ block, and its derivative g'."""
    x = x.to(tl.float32)
    s = _sigmoid(x)
    return tl.where(x >= 0, x + 0.5, s), tl.where(x >= 0, 1.0, s * (1.0 - s))


@triton.jit
def _complement(x, e, s):
    """sigmoid(-x) from e = exp(-x) and s = sigmoid(x): accurate on both sides, and no inf * 0."""
    return tl.where(x > 0, e * s, 1.0 - s)


@triton.jit
def _gates(x0, x1, KIND: tl.constexpr):
    """A Min cell's (a, 1 - a) from its raw gate blocks (both computed directly, for accuracy), and the slopes
    (s0, s1) of logit(a) along x0 and x1: dL/dx_k = s_k * dL/da * a (1 - a). (The forward drops the slopes,
    and the compiler what computes them.)"""
    x0 = x0.to(tl.float32)
    if KIND == _GRU:  # a = 1 - sigmoid(k): logit(a) = -k
        a = _sigmoid(-x0)
        oma = _sigmoid(x0)
        s0 = tl.full(x0.shape, -1.0, tl.float32)
        s1 = s0
    else:
        x1 = x1.to(tl.float32)
        if KIND == _LSTM:  # a = s(f) / (s(f) + s(i)): logit(a) = log s(f) - log s(i)
            ef = tl.exp(-x0)
            ei = tl.exp(-x1)
            sf = libdevice.fast_dividef(1.0, 1.0 + ef)
            si = libdevice.fast_dividef(1.0, 1.0 + ei)
            inv = libdevice.fast_dividef(1.0, sf + si)
            a = sf * inv
            oma = si * inv
            s0 = _complement(x0, ef, sf)
            s1 = -_complement(x1, ei, si)
        else:  # explstm: a = sigmoid(f - i): logit(a) = f - i
            a = _sigmoid(x0 - x1)
            oma = _sigmoid(x1 - x0)
            s0 = tl.full(x0.shape, 1.0, tl.float32)
            s1 = -s0
    return a, oma, s0, s1


@triton.jit
def _raw(X, Y, off, m, BS, KIND: tl.constexpr, NB: tl.constexpr):
    """The raw loads of one tile, issued before they are used: (a, b, b) plain, (x0, x1, h~) Min cells
    ((k, k, h~) for the GRU's two blocks)."""
    if KIND == _PLAIN:
        r0 = tl.load(X + off, mask=m, other=0.0)
        r1 = tl.load(Y + off, mask=m, other=0.0)
        r2 = r1
    else:
        r0 = tl.load(X + off, mask=m, other=0.0)
        if NB == 3:
            r1 = tl.load(X + off + BS, mask=m, other=0.0)
        else:
            r1 = r0
        r2 = tl.load(X + off + (NB - 1) * BS, mask=m, other=0.0)  # h~: the last block
    return r0, r1, r2


@triton.jit
def _ab(r0, r1, r2, KIND: tl.constexpr):
    if KIND == _PLAIN:
        a = r0.to(tl.float32)
        b = r1.to(tl.float32)
    else:
        a, oma, _, _ = _gates(r0, r1, KIND)
        g, _ = _g_and_slope(r2)
        b = oma * g
    return a, b


@triton.jit
def _scan_tile(a, b, h, prod, rows, BT: tl.constexpr, REDUCE: tl.constexpr):
    """Scan a [BT, BD] tile of (a, b) along its rows from the carried state h: (states, prod), where
    prod gains the tile's product of a when REDUCE."""
    ca, cb = tl.associative_scan((a, b), 0, _combine)
    hs = ca * h[None, :] + cb
    if REDUCE:
        prod = prod * _last(ca, rows, BT)
    return hs, prod


@triton.jit
def _adjoint_combine(A1, B1, a1, A2, B2, a2):
    """A run of later steps (A1, B1, a1), then the run of steps just before it (A2, B2, a2). A run maps the carry
    v it receives (v = a g of the step after it) to the adjoint g = A v + B of its earliest step, whose a is
    the third member: so each step uses its own a, and no a_{t+1} is loaded or recomputed."""
    m = A2 * a1
    return m * A1, m * B1 + B2, a2


@triton.jit
def _bwd_loads(X, DH, H, bi, T, t, valid, offs_d, D, BS, KIND: tl.constexpr, NB: tl.constexpr,
               LOAD_HP: tl.constexpr):
    """A backward tile's raw loads, issued before they are used: what a_t (and, for a Min cell, b_t) are
    made of, dh_t and, unless only reducing, h_{t-1} (0 before step 0)."""
    off = _x_off(bi, T, t, offs_d, D, NB)
    if KIND == _PLAIN:  # b does not enter the backward
        r0 = tl.load(X + off, mask=valid, other=0.0)
        r1 = r0
        r2 = r0
    else:
        r0, r1, r2 = _raw(X, X, off, valid, BS, KIND, NB)
    dh = tl.load(_d_ptr(DH, bi, T, t, offs_d, D), mask=valid, other=0.0)
    if LOAD_HP:
        hp = tl.load(_d_ptr(H, bi, T, t, offs_d, D, -1), mask=valid & (t >= 1)[:, None], other=0.0)
    else:
        hp = dh
    return r0, r1, r2, dh, hp


@triton.jit
def _adjoint_tile(DX, DY, r0, r1, r2, dh, hp, h0, u, prod, bi, T, t, valid, offs_d, rows, D, BS,
                  KIND: tl.constexpr, NB: tl.constexpr, HAS_H0: tl.constexpr, REDUCE: tl.constexpr,
                  BT: tl.constexpr):
    """The backward's loop body: scan the tile's adjoint from the carry u, then store its gradients or, when
    REDUCE, fold the tile's map of u into prod. Returns (u, prod) for the next tile."""
    if KIND == _PLAIN:
        a = r0.to(tl.float32)
        oma, s0, s1 = a, a, a  # unused
    else:
        a, oma, s0, s1 = _gates(r0, r1, KIND)
    a = tl.where(valid, a, 1.0)  # steps before the chunk pass the carry through
    A, Bg, _ = tl.associative_scan((tl.zeros_like(a) + 1.0, dh.to(tl.float32), a), 0, _adjoint_combine)
    gr = A * u[None, :] + Bg  # dL/dh_t
    v = a * gr  # what step t passes to step t - 1
    if REDUCE:
        prod = prod * _last(a * A, rows, BT)
    else:
        hp = hp.to(tl.float32)
        if HAS_H0:
            hp += tl.where((t == 0)[:, None], h0[None, :], 0.0)
        off = _x_off(bi, T, t, offs_d, D, NB)
        if KIND == _PLAIN:  # dL/da_t = g_t h_{t-1}, dL/db_t = g_t
            tl.store(DX + off, (gr * hp).to(DX.dtype.element_ty), mask=valid)
            tl.store(DY + off, gr.to(DY.dtype.element_ty), mask=valid)
        else:
            g, slope = _g_and_slope(r2)
            # b = (1 - a) g(h~): the total derivative along a is dL/da - dL/db * g(h~)
            w = v * (hp - g) * oma
            tl.store(DX + off + (NB - 1) * BS, (gr * oma * slope).to(DX.dtype.element_ty), mask=valid)
            tl.store(DX + off, (w * s0).to(DX.dtype.element_ty), mask=valid)
            if NB == 3:
                tl.store(DX + off + BS, (w * s1).to(DX.dtype.element_ty), mask=valid)
    return _last(v, rows, BT), prod


@triton.autotune(configs=_FWD_CONFIGS, key=["D", "KIND", "HAS_H0", "REDUCE"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _fwd_kernel(X, Y, H0, OUT, CA, CB, T, D, BS, chunk_len,
                KIND: tl.constexpr, NB: tl.constexpr, HAS_H0: tl.constexpr, REDUCE: tl.constexpr,
                BT: tl.constexpr, BD: tl.constexpr, NS: tl.constexpr):
    """h_t = a_t h_{t-1} + b_t over one time chunk. H0: initial states [B, n_chunks, D].
    REDUCE: store the chunk's (prod a, end state from 0) to CA, CB instead of h."""
    bi, c, offs_d, dm, rows, t_lo, t_hi, state_off = _program(T, D, chunk_len, BT, BD)
    if HAS_H0:
        h = tl.load(H0 + state_off, mask=dm, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BD], dtype=tl.float32)
    prod = tl.full([BD], 1.0, tl.float32)
    for t0 in tl.range(t_lo, t_hi, BT, num_stages=NS):
        t = (t0 + rows).to(tl.int64)
        m = (t < t_hi)[:, None] & dm[None, :]
        r0, r1, r2 = _raw(X, Y, _x_off(bi, T, t, offs_d, D, NB), m, BS, KIND, NB)
        a, b = _ab(r0, r1, r2, KIND)
        hs, prod = _scan_tile(tl.where(m, a, 1.0), tl.where(m, b, 0.0), h, prod, rows, BT, REDUCE)
        if not REDUCE:
            tl.store(_d_ptr(OUT, bi, T, t, offs_d, D), hs.to(OUT.dtype.element_ty), mask=m)
        h = _last(hs, rows, BT)
    if REDUCE:
        tl.store(CA + state_off, prod, mask=dm)
        tl.store(CB + state_off, h, mask=dm)


@triton.autotune(configs=_CONFIGS, key=["D", "KIND", "HAS_H0", "REDUCE", "CARRY"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bwd_kernel(X, Y, H0, H, DH, DX, DY, DH0, CA, CB, T, D, BS, chunk_len,
                KIND: tl.constexpr, NB: tl.constexpr, HAS_H0: tl.constexpr, REDUCE: tl.constexpr,
                CARRY: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, NS: tl.constexpr):
    """Adjoint g_t = dh_t + a_{t+1} g_{t+1}, scanned backwards over one time chunk.

    The carry between tiles and chunks is v = a_lo * g_lo (what step lo passes to step lo - 1). REDUCE: store
    the chunk's map of its carry-in to its carry-out (CA * v + CB). Else: carry-in from CB when CARRY, store the
    gradients and, for chunk 0, dL/dh0 = a_0 g_0."""
    bi, c, offs_d, dm, rows, t_lo, t_hi, state_off = _program(T, D, chunk_len, BT, BD)
    if CARRY:
        u = tl.load(CB + state_off, mask=dm, other=0.0)
    else:
        u = tl.zeros([BD], dtype=tl.float32)
    if HAS_H0:
        h0 = tl.load(H0 + bi * D + offs_d, mask=dm, other=0.0).to(tl.float32)
    else:
        h0 = u  # never read: HAS_H0 is off
    prod = tl.full([BD], 1.0, tl.float32)
    for i in tl.range(0, tl.cdiv(t_hi - t_lo, BT), num_stages=NS):
        t = (t_hi - 1 - i * BT - rows).to(tl.int64)  # row 0 is the latest step
        valid = (t >= t_lo)[:, None] & dm[None, :]
        r0, r1, r2, dh, hp = _bwd_loads(X, DH, H, bi, T, t, valid, offs_d, D, BS, KIND, NB, not REDUCE)
        u, prod = _adjoint_tile(DX, DY, r0, r1, r2, dh, hp, h0, u, prod, bi, T, t, valid, offs_d, rows, D, BS,
                                KIND, NB, HAS_H0, REDUCE, BT)
    if REDUCE:
        tl.store(CA + state_off, prod, mask=dm)
        tl.store(CB + state_off, u, mask=dm)
    elif HAS_H0:
        if c == 0:
            tl.store(DH0 + bi * D + offs_d, u, mask=dm)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _chunk_len(B: int, T: int, D: int, device: torch.device) -> int:
    """Whole T per program unless B*D leaves SMs idle; then split time so ~2 programs fill each SM."""
    sms = _sm_count(device)
    programs = B * triton.cdiv(D, 512)
    if programs >= sms or T < 2 * _MIN_CHUNK:
        return T
    n_chunks = min(triton.cdiv(2 * sms, programs), T // _MIN_CHUNK)
    return triton.cdiv(T, n_chunks)


def _grid(B: int, D: int, n_chunks: int):
    return lambda meta: (triton.cdiv(D, meta["BD"]), B, n_chunks)


def _forward(kind: int, blocks: int, x: Tensor, y: Tensor, h0: Tensor | None,
             out_dtype: torch.dtype) -> Tensor:
    B, T, D = x.shape[0], x.shape[1], x.shape[2] // blocks
    bs, flags = D, dict(KIND=kind, NB=blocks)
    out = torch.empty(B, T, D, device=x.device, dtype=out_dtype)
    chunk = _chunk_len(B, T, D, x.device)
    n_chunks = triton.cdiv(T, chunk)
    if n_chunks > 1:
        ca = torch.empty(B, n_chunks, D, device=x.device, dtype=torch.float32)
        cb = torch.empty_like(ca)
        _fwd_kernel[_grid(B, D, n_chunks)](x, y, ca, out, ca, cb, T, D, bs, chunk,
                                           HAS_H0=False, REDUCE=True, **flags)
        ends, _ = scan_sequential(ca[:, :-1], cb[:, :-1], None if h0 is None else h0.float())
        first = torch.zeros_like(ca[:, :1]) if h0 is None else h0.float().unsqueeze(1)
        h0 = torch.cat([first, ends], dim=1)
    _fwd_kernel[_grid(B, D, n_chunks)](x, y, h0, out, out, out, T, D, bs, chunk,
                                       HAS_H0=h0 is not None, REDUCE=False, **flags)
    return out


def _backward(kind: int, blocks: int, x: Tensor, y: Tensor, h0: Tensor | None, h: Tensor, dh: Tensor):
    B, T, D = h.shape
    bs, flags = D, dict(KIND=kind, NB=blocks, HAS_H0=h0 is not None)
    dx = torch.empty_like(x)
    dy = torch.empty_like(y) if kind == PLAIN else dx
    dh0 = torch.empty(B, D, device=h.device, dtype=torch.float32) if h0 is not None else None
    chunk = _chunk_len(B, T, D, h.device)
    n_chunks = triton.cdiv(T, chunk)
    carry = None
    if n_chunks > 1:
        ca = torch.empty(B, n_chunks, D, device=h.device, dtype=torch.float32)
        cb = torch.empty_like(ca)
        _bwd_kernel[_grid(B, D, n_chunks)](x, y, h0, h, dh, dx, dy, dh0, ca, cb, T, D, bs, chunk,
                                           REDUCE=True, CARRY=False, **flags)
        # u entering chunk c comes from chunks c+1..: a scan over the reversed chunk axis
        rev, _ = scan_sequential(ca.flip(1)[:, :-1], cb.flip(1)[:, :-1], None)
        carry = torch.cat([torch.zeros_like(ca[:, :1]), rev], dim=1).flip(1).contiguous()
    _bwd_kernel[_grid(B, D, n_chunks)](x, y, h0, h, dh, dx, dy, dh0, carry, carry, T, D, bs, chunk,
                                       REDUCE=False, CARRY=carry is not None, **flags)
    return dx, (dy if kind == PLAIN else None), dh0


class _TritonScan(torch.autograd.Function):
    """PLAIN: x = a, y = b, both [B, T, D]; a Min cell's KIND: x = pre [B, T, blocks*D], y = pre (unused)."""

    @staticmethod
    def forward(ctx, kind: int, blocks: int, x: Tensor, y: Tensor, h0: Tensor | None,
                out_dtype: torch.dtype) -> Tensor:
        h = _forward(kind, blocks, x, y, h0, out_dtype)
        ctx.kind, ctx.blocks = kind, blocks
        ctx.save_for_backward(x, y, h0, h)
        return h

    @staticmethod
    def backward(ctx, dh: Tensor):
        x, y, h0, h = ctx.saved_tensors
        dx, dy, dh0 = _backward(ctx.kind, ctx.blocks, x, y, h0, h, dh.contiguous())
        return None, None, dx, dy, None if h0 is None else dh0.to(h0.dtype), None


def _flat(t: Tensor) -> Tensor:
    """[B, T, ...] -> [B, T, D], contiguous."""
    return t.reshape(t.shape[0], t.shape[1], -1).contiguous()


def _flat_state(h0: Tensor | None) -> Tensor | None:
    """[B, ...] -> [B, D], contiguous."""
    return None if h0 is None else h0.reshape(h0.shape[0], -1).contiguous()


def scan_triton(a: Tensor, b: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`scan` on CUDA tensors: a, b [B, T, ...] (fp32/bf16/fp16), h0 [B, ...] or None (zeros)."""
    h = _TritonScan.apply(PLAIN, 1, _flat(a), _flat(b), _flat_state(h0), b.dtype).view(b.shape)
    return h, h[:, -1]


def gate_scan_triton(kind: str, pre: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fused gates + scan from a Min cell's pre-activations [B, T, k*hidden, H, W] (no a/b in memory)."""
    cell = gate_kind(kind)
    shape = (*pre.shape[:2], cell.hidden(pre.shape[2]), *pre.shape[3:])
    x = _flat(pre)
    h = _TritonScan.apply(cell.kernel, cell.blocks, x, x, _flat_state(h0), pre.dtype).view(shape)
    return h, h[:, -1]
