"""Triton scans (GPU only): forward and backward against a float64 reference, fused gates vs gates + scan."""
import contextlib

import pytest
import torch

from minconv_dist.ops.gates import GATES, gate_rule
from minconv_dist.ops.scan import GATE_SCANS, SCANS, gate_scan, resolve, scan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or "triton" not in SCANS, reason="needs CUDA and triton"),
]
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2}  # relative L2 error against float64

SHAPES = [
    (2, 1, (3,)),  # T = 1
    (3, 37, (5, 7)),  # odd T, tiny D
    (1, 300, (4,)),  # B*D tiny: time split into chunks
    (1, 1000, (3, 11)),  # many chunks, D not a multiple of any block
    (2, 130, (64, 33, 33)),  # large D (69696), T not a power of two
]


def _rel(x, ref):
    assert torch.isfinite(x).all()
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check(fn, inputs, dtype, ref_fn=None):
    """fn on the GPU in `dtype` vs (ref_fn or fn) on float64 copies of the rounded inputs."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = [x.to(dtype).cuda().requires_grad_() if x is not None else None for x in inputs]
    ref = [x.detach().double().requires_grad_() if x is not None else None for x in dev]
    h, last = fn(*dev)
    h_ref, last_ref = (ref_fn or fn)(*ref)
    assert h.dtype == dtype and h.shape == h_ref.shape
    w = torch.randn(h.shape, generator=gen, device="cuda", dtype=torch.float64)
    leaves = [x for x in dev if x is not None]
    grads = torch.autograd.grad((h.double() * w).sum() + last.double().square().sum(), leaves)
    grads_ref = torch.autograd.grad((h_ref * w).sum() + last_ref.square().sum(), [x for x in ref if x is not None])
    assert _rel(h, h_ref) < TOL[dtype]
    assert _rel(last, last_ref) < TOL[dtype]
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == dtype
        assert _rel(g, g_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,D", SHAPES)
@pytest.mark.parametrize("with_h0", [True, False])
def test_triton_scan_matches_float64(dtype, B, T, D, with_h0):
    a = torch.rand(B, T, *D) * 0.98 + 0.01
    b = torch.randn(B, T, *D)
    h0 = torch.randn(B, *D) if with_h0 else None
    _check(lambda a, b, h0: scan(a, b, h0, method="triton"), (a, b, h0), dtype,
           ref_fn=lambda a, b, h0: scan(a, b, h0, method="sequential"))


@pytest.mark.parametrize("kind", sorted(GATES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,hw", [(2, 1, (3, 5)), (2, 45, (8, 9)), (1, 400, (2, 3)), (2, 70, (64, 64))])
def test_fused_gate_scan_matches_gates_then_scan(kind, dtype, B, T, hw):
    hidden = 3
    pre = torch.randn(B, T, GATES[kind].blocks * hidden, *hw) * 3
    h0 = torch.rand(B, hidden, *hw) + 0.25

    def fused(pre, h0):
        return gate_scan(kind, pre, h0, method="triton")

    def unfused(pre, h0):
        a, b = gate_rule(kind)(pre)
        return scan(a, b, h0, method="sequential")

    _check(fused, (pre, h0), dtype, ref_fn=unfused)


def _spy(monkeypatch, registry, name):
    """Replace registry[name] by a wrapper that records each call; returns the list of calls."""
    calls, fn = [], registry[name]

    def spy(*args):
        calls.append(args)
        return fn(*args)

    monkeypatch.setitem(registry, name, spy)
    return calls


def test_auto_picks_triton_on_cuda_and_chunking_composes(monkeypatch):
    calls = _spy(monkeypatch, SCANS, "triton")
    a = (torch.rand(2, 50, 8, device="cuda") * 0.9 + 0.05).requires_grad_()
    b = torch.randn(2, 50, 8, device="cuda", requires_grad=True)
    assert resolve("auto", a) == "triton"
    h, last = scan(a, b)
    assert len(calls) == 1
    h_c, last_c = scan(a, b, chunk_size=16)
    assert len(calls) == 1 + 4  # one call per chunk of 16 of the 50 steps
    torch.testing.assert_close(h_c, h, rtol=1e-6, atol=1e-6)
    g = torch.autograd.grad(h.sum() + last.sum(), (a, b))
    g_c = torch.autograd.grad(h_c.sum() + last_c.sum(), (a, b))
    for x, y in zip(g_c, g):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_auto_gate_scan_is_the_fused_kernel_on_cuda(monkeypatch):
    calls = _spy(monkeypatch, GATE_SCANS, "triton")
    pre = torch.randn(2, 7, GATES["gru"].blocks * 3, 4, 4, device="cuda")
    h, _ = gate_scan("gru", pre, torch.full((2, 3, 4, 4), 0.5, device="cuda"))
    assert len(calls) == 1 and h.shape == (2, 7, 3, 4, 4)


def test_auto_keeps_float64_in_float64_on_cuda():
    """The kernel accumulates in fp32, so float64 on CUDA resolves to the torch form, exact to float64."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.rand(2, 300, 8, device="cuda", dtype=torch.float64, generator=gen) * 0.9 + 0.05
    b = torch.randn(2, 300, 8, device="cuda", dtype=torch.float64, generator=gen)
    assert resolve("auto", a) == "doubling" and resolve("auto", a.float()) == "triton"
    h, _ = scan(a, b)
    want, _ = scan(a.cpu(), b.cpu(), method="sequential")
    torch.testing.assert_close(h.cpu(), want, rtol=1e-12, atol=1e-12)


@contextlib.contextmanager
def _forced(kernel, config):
    """Run `kernel` (an autotuned Triton kernel) with `config` alone: no timing, no choice."""
    saved = kernel.configs, kernel.cache
    kernel.configs, kernel.cache = [config], {}
    try:
        yield
    finally:
        kernel.configs, kernel.cache = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bits_do_not_depend_on_the_tuned_config(dtype):
    """A restarted process tunes again: every config the autotuner may pick for these inputs (block width, warps,
    pipeline depth) gives the same bits, forward and backward."""
    from minconv_dist.ops.scan import triton_scan as ts

    gen = torch.Generator(device="cuda").manual_seed(0)
    B, T, D = 2, 70, 3000  # T and D multiples of no tile
    a = (torch.rand(B, T, D, device="cuda", generator=gen) * 0.9 + 0.05).to(dtype)
    b = torch.randn(B, T, D, device="cuda", generator=gen).to(dtype)
    dh = torch.randn(B, T, D, device="cuda", generator=gen).to(dtype)
    results = []
    for kernel, configs in ((ts._fwd_kernel, ts._FWD_CONFIGS), (ts._bwd_kernel, ts._CONFIGS)):
        for config in ts._prune(configs, {"X": a, "D": D}):
            with _forced(kernel, config):
                x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
                h, _ = ts.scan_triton(x, y)
                results.append((h, *torch.autograd.grad(h, (x, y), dh)))
    for got in results[1:]:
        assert all(torch.equal(g, w) for g, w in zip(got, results[0]))
