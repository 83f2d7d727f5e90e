"""Fused Triton scan (GPU): linear space, fp32 accumulation, its own backward kernel.

Why linear space: every Min cell has a_t in (0, 1), so the recurrence only shrinks earlier errors
(|dh_t| <= |dh_{t-1}| + rounding of one step) and fp32 is stable; it also reads each input once,
where the log form streams five full-size intermediates through memory.

Layout: a, b viewed as [B, T, D] (D = C*H*W). A program owns BD consecutive elements of D for one
batch row and one time chunk. It loads [BT, BD] tiles (coalesced over D, BT*BD independent loads in
flight), scans each tile along time with `tl.associative_scan`, and carries the state to the next
tile. When B*D alone cannot fill the GPU, time is split into chunks too: pass 1 reduces each chunk
to its affine map (prod a, end state from 0), a tiny scan over the chunks gives each chunk its initial
state, pass 2 scans again from it.

KIND says where (a, b) come from: 0 = given a and b; 1/2/3 = a Min cell's conv pre-activations
[B, T, k*D] (gru/lstm/explstm, gate blocks stacked on channels), gates computed in registers. Every
rule has b = (1 - a) * g(h~) (see ops/gates.py), so the kinds differ only in a(pre). The backward
recomputes the gates from `pre` and reads the saved h; nothing else is stored.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from minconv_dist.ops.scan.naive import scan_sequential

#: Min cell kind -> KIND constant of the kernels
KINDS = {"gru": 1, "lstm": 2, "explstm": 3}
_BLOCKS = {0: 1, 1: 2, 2: 3, 3: 3}  # rows of pre hold this many D-blocks
_FWD_CONFIGS = [
    triton.Config({"BT": 8, "BD": 512}, num_warps=4),
    triton.Config({"BT": 16, "BD": 256}, num_warps=2),
    triton.Config({"BT": 4, "BD": 1024}, num_warps=8),
]
# the backward also tries wider/deeper tiles (measured: they help the prefetching bf16 backward)
_CONFIGS = _FWD_CONFIGS + [
    triton.Config({"BT": 8, "BD": 1024}, num_warps=8),
    triton.Config({"BT": 16, "BD": 512}, num_warps=8),
    triton.Config({"BT": 8, "BD": 256}, num_warps=2),
]
_MIN_CHUNK = 64  # time steps per chunk when time is split


def _prune(configs, named_args, **kwargs):
    """Skip blocks far wider than D (tiny D: they only cost compile time)."""
    width = max(256, triton.next_power_of_2(named_args["D"]))
    return [c for c in configs if c.kwargs["BD"] <= width] or configs


@triton.jit
def _combine(a1, b1, a2, b2):
    """(a1, b1) then (a2, b2): h -> a2 * (a1 * h + b1) + b2."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _last(x, rows, BT: tl.constexpr):
    """Row BT-1 of a [BT, BD] tile (masked rows are identities, so it is the last valid state)."""
    return tl.sum(tl.where(rows[:, None] == BT - 1, x, 0.0), axis=0)


@triton.jit
def _gates(x0, x1, KIND: tl.constexpr):
    """(a, 1 - a) from the raw gate blocks, both computed directly for accuracy."""
    x0 = x0.to(tl.float32)
    if KIND == 1:  # gru: a = 1 - sigmoid(k)
        a = _sigmoid(-x0)
        oma = _sigmoid(x0)
    else:
        x1 = x1.to(tl.float32)
        if KIND == 2:  # lstm: a = s(f) / (s(f) + s(i))
            sf = _sigmoid(x0)
            si = _sigmoid(x1)
            a = sf / (sf + si)
            oma = si / (sf + si)
        else:  # explstm: a = sigmoid(f - i)
            a = _sigmoid(x0 - x1)
            oma = _sigmoid(x1 - x0)
    return a, oma


@triton.jit
def _raw(X, Y, off, m, BS, KIND: tl.constexpr):
    """The raw loads of one tile, issued before they are used (prefetch): (a, b, -) for KIND 0,
    (x0, x1, h~) for the Min cells (gru has no x1: it repeats x0)."""
    r0 = tl.load(X + off, mask=m, other=0.0)
    if KIND == 0:
        r1 = tl.load(Y + off, mask=m, other=0.0)
        r2 = r1
    elif KIND == 1:
        r1 = r0
        r2 = tl.load(X + off + BS, mask=m, other=0.0)
    else:
        r1 = tl.load(X + off + BS, mask=m, other=0.0)
        r2 = tl.load(X + off + 2 * BS, mask=m, other=0.0)
    return r0, r1, r2


@triton.jit
def _ab(r0, r1, r2, KIND: tl.constexpr):
    if KIND == 0:
        a = r0.to(tl.float32)
        b = r1.to(tl.float32)
    else:
        a, oma = _gates(r0, r1, KIND)
        ht = r2.to(tl.float32)
        b = oma * tl.where(ht >= 0, ht + 0.5, _sigmoid(ht))
    return a, b


@triton.jit
def _craw(X, off, m, BS, KIND: tl.constexpr):
    """Raw loads for the coefficient a alone (the backward's shifted a_{t+1})."""
    r0 = tl.load(X + off, mask=m, other=0.0)
    if KIND >= 2:
        r1 = tl.load(X + off + BS, mask=m, other=0.0)
    else:
        r1 = r0
    return r0, r1


@triton.jit
def _coef_of(r0, r1, KIND: tl.constexpr):
    if KIND == 0:
        a = r0.to(tl.float32)
    else:
        a, _ = _gates(r0, r1, KIND)
    return a


@triton.jit
def _coef(X, off, m, BS, KIND: tl.constexpr):
    r0, r1 = _craw(X, off, m, BS, KIND)
    return _coef_of(r0, r1, KIND)


@triton.jit
def _store_grads(X, DX, DY, off, m, BS, gr, hp, KIND: tl.constexpr):
    """Given gr = dL/dh_t and hp = h_{t-1}: store dL/da, dL/db (KIND 0) or dL/dpre (Min cells)."""
    if KIND == 0:
        tl.store(DX + off, (gr * hp).to(DX.dtype.element_ty), mask=m)
        tl.store(DY + off, gr.to(DY.dtype.element_ty), mask=m)
    else:
        r0, r1, r2 = _raw(X, X, off, m, BS, KIND)
        a, oma = _gates(r0, r1, KIND)
        hoff = (KIND // 2 + 1) * BS
        ht = r2.to(tl.float32)
        sh = _sigmoid(ht)
        gv = tl.where(ht >= 0, ht + 0.5, sh)
        gd = tl.where(ht >= 0, 1.0, sh * (1.0 - sh))
        # b = (1 - a) g(h~): the total derivative along a is da - db * g(h~)
        w = gr * (hp - gv) * a * oma
        tl.store(DX + off + hoff, (gr * oma * gd).to(DX.dtype.element_ty), mask=m)
        if KIND == 1:
            tl.store(DX + off, (-w).to(DX.dtype.element_ty), mask=m)
        else:
            if KIND == 2:
                df = w * _sigmoid(-r0.to(tl.float32))
                di = -w * _sigmoid(-r1.to(tl.float32))
            else:
                df = w
                di = -w
            tl.store(DX + off, df.to(DX.dtype.element_ty), mask=m)
            tl.store(DX + off + BS, di.to(DX.dtype.element_ty), mask=m)


@triton.autotune(configs=_FWD_CONFIGS, key=["D", "KIND", "HAS_H0", "REDUCE"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _fwd_kernel(X, Y, H0, OUT, CA, CB, T, D, BS, chunk_len,
                KIND: tl.constexpr, HAS_H0: tl.constexpr, REDUCE: tl.constexpr,
                BT: tl.constexpr, BD: tl.constexpr):
    """h_t = a_t h_{t-1} + b_t over one time chunk. H0: initial states [B, n_chunks, D].
    REDUCE: store the chunk's (prod a, end state from 0) to CA, CB instead of h.
    (Prefetching tile i+1 here was measured slower in bf16 and no faster in fp32: see docs/benchmarks.md.)"""
    pid_d = tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2)
    NB: tl.constexpr = 1 if KIND == 0 else (2 if KIND == 1 else 3)
    offs_d = pid_d * BD + tl.arange(0, BD)
    dm = offs_d < D
    xo = offs_d  # BS: stride between gate blocks (= D, the blocks are stacked on channels)
    rows = tl.arange(0, BT)
    t_lo = c * chunk_len
    t_hi = tl.minimum(t_lo + chunk_len, T)
    state_off = (bi * tl.num_programs(2) + c) * D + offs_d
    if HAS_H0:
        h = tl.load(H0 + state_off, mask=dm, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BD], dtype=tl.float32)
    prod = tl.full([BD], 1.0, tl.float32)
    for t0 in range(t_lo, t_hi, BT):
        t = (t0 + rows).to(tl.int64)
        m = (t < t_hi)[:, None] & dm[None, :]
        r0, r1, r2 = _raw(X, Y, (bi * T + t[:, None]) * (NB * D) + xo[None, :], m, BS, KIND)
        a, b = _ab(r0, r1, r2, KIND)
        a = tl.where(m, a, 1.0)
        b = tl.where(m, b, 0.0)
        ca, cb = tl.associative_scan((a, b), 0, _combine)
        hs = ca * h[None, :] + cb
        if REDUCE:
            prod = prod * _last(ca, rows, BT)
        else:
            tl.store(OUT + (bi * T + t[:, None]) * D + offs_d[None, :], hs.to(OUT.dtype.element_ty), mask=m)
        h = _last(hs, rows, BT)
    if REDUCE:
        tl.store(CA + state_off, prod, mask=dm)
        tl.store(CB + state_off, h, mask=dm)


@triton.autotune(configs=_CONFIGS, key=["D", "KIND", "HAS_H0", "REDUCE", "CARRY"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bwd_kernel(X, Y, H0, H, DH, DX, DY, DH0, CA, CB, T, D, BS, chunk_len,
                KIND: tl.constexpr, HAS_H0: tl.constexpr, REDUCE: tl.constexpr, CARRY: tl.constexpr,
                BT: tl.constexpr, BD: tl.constexpr):
    """Adjoint g_t = dh_t + a_{t+1} g_{t+1}, scanned backwards over one time chunk.

    The carry between chunks is u = a_lo * g_lo (what step lo passes to step lo - 1), so a chunk's
    last step uses coefficient 1 and adds u. REDUCE: store the chunk's (prod a, u from a zero carry).
    Else: carry-in from CB when CARRY, store the gradients and, for chunk 0, dL/dh0 = a_0 g_0.
    KIND 0: the loads of a_{t+1}, dh_t and h_{t-1} for tile i+1 are issued before tile i is scanned."""
    pid_d = tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2)
    NB: tl.constexpr = 1 if KIND == 0 else (2 if KIND == 1 else 3)
    offs_d = pid_d * BD + tl.arange(0, BD)
    dm = offs_d < D
    xo = offs_d  # BS: stride between gate blocks (= D, the blocks are stacked on channels)
    rows = tl.arange(0, BT)
    t_lo = c * chunk_len
    t_hi = tl.minimum(t_lo + chunk_len, T)
    state_off = (bi * tl.num_programs(2) + c) * D + offs_d
    if CARRY:
        u = tl.load(CB + state_off, mask=dm, other=0.0)
    else:
        u = tl.zeros([BD], dtype=tl.float32)
    if HAS_H0:
        h0 = tl.load(H0 + bi * D + offs_d, mask=dm, other=0.0).to(tl.float32)
    prod = tl.full([BD], 1.0, tl.float32)
    if KIND == 0:  # prefetch: measured faster for the plain scan (bf16), slower for the fused gates
        t = (t_hi - 1 - rows).to(tl.int64)  # row 0 is the latest step
        valid = (t >= t_lo)[:, None] & dm[None, :]
        shifted = valid & (t + 1 < t_hi)[:, None]
        c0, c1 = _craw(X, (bi * T + t[:, None] + 1) * (NB * D) + xo[None, :], shifted, BS, KIND)
        dh = tl.load(DH + (bi * T + t[:, None]) * D + offs_d[None, :], mask=valid, other=0.0)
        if REDUCE:
            hp = dh
        else:
            hp = tl.load(H + (bi * T + t[:, None] - 1) * D + offs_d[None, :], mask=valid & (t >= 1)[:, None], other=0.0)
        for i in range(0, tl.cdiv(t_hi - t_lo, BT)):
            tn = t - BT
            validn = (tn >= t_lo)[:, None] & dm[None, :]
            shiftedn = validn & (tn + 1 < t_hi)[:, None]
            c0n, c1n = _craw(X, (bi * T + tn[:, None] + 1) * (NB * D) + xo[None, :], shiftedn, BS, KIND)
            dhn = tl.load(DH + (bi * T + tn[:, None]) * D + offs_d[None, :], mask=validn, other=0.0)
            if REDUCE:
                hpn = dhn
            else:
                hpn = tl.load(H + (bi * T + tn[:, None] - 1) * D + offs_d[None, :],
                              mask=validn & (tn >= 1)[:, None], other=0.0)
            coef = tl.where(shifted, _coef_of(c0, c1, KIND), 1.0)
            ca, cg = tl.associative_scan((coef, dh.to(tl.float32)), 0, _combine)
            gr = ca * u[None, :] + cg
            if REDUCE:
                prod = prod * _last(ca, rows, BT)
            else:
                hpf = hp.to(tl.float32)
                if HAS_H0:
                    hpf += tl.where((t == 0)[:, None], h0[None, :], 0.0)
                _store_grads(X, DX, DY, (bi * T + t[:, None]) * (NB * D) + xo[None, :], valid, BS, gr, hpf, KIND)
            u = _last(gr, rows, BT)
            t = tn
            valid = validn
            shifted = shiftedn
            c0, c1 = c0n, c1n
            dh = dhn
            hp = hpn
    else:
        for i in range(0, tl.cdiv(t_hi - t_lo, BT)):
            t = (t_hi - 1 - i * BT - rows).to(tl.int64)  # row 0 is the latest step
            valid = (t >= t_lo)[:, None] & dm[None, :]
            shifted = valid & (t + 1 < t_hi)[:, None]
            coef = tl.where(shifted, _coef(X, (bi * T + t[:, None] + 1) * (NB * D) + xo[None, :], shifted, BS, KIND), 1.0)
            dh = tl.load(DH + (bi * T + t[:, None]) * D + offs_d[None, :], mask=valid, other=0.0).to(tl.float32)
            ca, cg = tl.associative_scan((coef, dh), 0, _combine)
            gr = ca * u[None, :] + cg
            if REDUCE:
                prod = prod * _last(ca, rows, BT)
            else:
                hp = tl.load(H + (bi * T + t[:, None] - 1) * D + offs_d[None, :],
                             mask=valid & (t >= 1)[:, None], other=0.0).to(tl.float32)
                if HAS_H0:
                    hp += tl.where((t == 0)[:, None], h0[None, :], 0.0)
                _store_grads(X, DX, DY, (bi * T + t[:, None]) * (NB * D) + xo[None, :], valid, BS, gr, hp, KIND)
            u = _last(gr, rows, BT)
    a_lo = _coef(X, (bi * T + t_lo) * (NB * D) + xo, dm, BS, KIND)
    if REDUCE:
        tl.store(CA + state_off, prod * a_lo, mask=dm)
        tl.store(CB + state_off, a_lo * u, mask=dm)
    elif HAS_H0:
        if c == 0:
            tl.store(DH0 + bi * D + offs_d, a_lo * u, mask=dm)


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


def _forward(kind: int, x: Tensor, y: Tensor, h0: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    B, T, D = x.shape[0], x.shape[1], x.shape[2] // _BLOCKS[kind]
    bs, flags = D, dict(KIND=kind)
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


def _backward(kind: int, x: Tensor, y: Tensor, h0: Tensor | None, h: Tensor, dh: Tensor):
    B, T, D = h.shape
    bs, flags = D, dict(KIND=kind, HAS_H0=h0 is not None)
    dx = torch.empty_like(x)
    dy = torch.empty_like(y) if kind == 0 else dx
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
    return dx, (dy if kind == 0 else None), dh0


class _TritonScan(torch.autograd.Function):
    """kind 0: x = a, y = b, both [B, T, D]; kind > 0: x = pre [B, T, k*D], y = pre (unused)."""

    @staticmethod
    def forward(ctx, kind: int, x: Tensor, y: Tensor, h0: Tensor | None, out_dtype: torch.dtype) -> Tensor:
        h = _forward(kind, x, y, h0, out_dtype)
        ctx.kind = kind
        ctx.save_for_backward(x, y, h0, h)
        return h

    @staticmethod
    def backward(ctx, dh: Tensor):
        x, y, h0, h = ctx.saved_tensors
        dx, dy, dh0 = _backward(ctx.kind, x, y, h0, h, dh.contiguous())
        return None, dx, dy, None if h0 is None else dh0.to(h0.dtype), None


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], t.shape[1], -1).contiguous()


def scan_triton(a: Tensor, b: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`scan` on CUDA tensors: a, b [B, T, ...] (fp32/bf16/fp16), h0 [B, ...] or None (zeros)."""
    flat_h0 = None if h0 is None else h0.reshape(h0.shape[0], -1).contiguous()
    h = _TritonScan.apply(0, _flat(a), _flat(b), flat_h0, b.dtype).view(b.shape)
    return h, h[:, -1]


def gate_scan_triton(kind: str, pre: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fused gates + scan from a Min cell's pre-activations [B, T, k*hidden, H, W] (no a/b in memory)."""
    blocks = _BLOCKS[KINDS[kind]]
    B, T, C = pre.shape[:3]
    if C % blocks:
        raise ValueError(f"gate_scan({kind!r}): pre has {C} channels, not a multiple of {blocks}")
    shape = (B, T, C // blocks, *pre.shape[3:])
    flat_h0 = None if h0 is None else h0.reshape(B, -1).contiguous()
    x = _flat(pre)
    h = _TritonScan.apply(KINDS[kind], x, x, flat_h0, pre.dtype).view(shape)
    return h, h[:, -1]
