"""Every torch scan method equals the sequential definition in float64: values, gradients, h0."""
import pytest
import torch

from minconv_dist.ops.gates import GATES
from minconv_dist.ops.scan import SCANS, gate_scan, resolve, scan

TORCH_METHODS = ["doubling", "loop", "log"]  # "triton" is tested on the GPU (test_scan_triton.py)


def _inputs(B, T, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(B, T, *D, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    b = torch.rand(B, T, *D, generator=gen, dtype=torch.float64) + 0.05  # positive: "log" needs it
    h0 = torch.rand(B, *D, generator=gen, dtype=torch.float64) + 0.1
    return a, b, h0


def _value_and_grads(method, a, b, h0, w, chunk_size=None):
    leaves = [t.detach().clone().requires_grad_() for t in (a, b, h0) if t is not None]
    h, last = scan(*leaves, *([] if h0 is not None else [None]), method=method, chunk_size=chunk_size)
    grads = torch.autograd.grad((h * w).sum() + 3 * last.sum(), leaves, materialize_grads=True)
    return h, last, grads


@pytest.mark.parametrize("method", TORCH_METHODS)
@pytest.mark.parametrize("B,T,D", [(2, 1, (3,)), (3, 7, (2, 3, 5)), (1, 33, (4,)), (2, 64, (2, 2))])
@pytest.mark.parametrize("with_h0", [False, True])
def test_method_equals_sequential(method, B, T, D, with_h0):
    a, b, h0 = _inputs(B, T, D, seed=T)
    h0 = h0 if with_h0 else None  # a zero state enters the log form as log 0 = -inf: still exact
    w = torch.randn(B, T, *D, dtype=torch.float64)
    h_ref, last_ref, g_ref = _value_and_grads("sequential", a, b, h0, w)
    h, last, g = _value_and_grads(method, a, b, h0, w)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(last, last_ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(last, h[:, -1])
    for x, r in zip(g, g_ref):
        torch.testing.assert_close(x, r, rtol=1e-9, atol=1e-10)


def test_scan_gradcheck_tiny():
    a, b, h0 = _inputs(1, 4, (2,))
    for method in ("sequential", *TORCH_METHODS):
        assert torch.autograd.gradcheck(
            lambda a, b, h0: scan(a, b, h0, method=method)[0], (a.requires_grad_(), b.requires_grad_(), h0.requires_grad_())
        )


def test_carrying_the_final_state_equals_one_long_scan():
    a, b, h0 = _inputs(2, 10, (3,))
    h_full, _ = scan(a, b, h0)
    h1, last1 = scan(a[:, :4], b[:, :4], h0)
    h2, _ = scan(a[:, 4:], b[:, 4:], last1)
    assert torch.allclose(torch.cat([h1, h2], 1), h_full, rtol=1e-12)


@pytest.mark.parametrize("method", ["doubling", "loop"])
def test_linear_methods_handle_signed_inputs_and_keep_dtype(method):
    a, b, h0 = _inputs(2, 19, (5,), seed=1)
    b = b - 0.6
    h_ref, _ = scan(a, b, -h0, method="sequential")
    torch.testing.assert_close(scan(a, b, -h0, method=method)[0], h_ref, rtol=1e-10, atol=1e-12)
    assert scan(a.float(), b.bfloat16(), method=method)[0].dtype == torch.bfloat16


def test_loop_accumulates_bf16_in_fp32_and_skips_unneeded_gradients():
    a, b, h0 = (t.float() for t in _inputs(2, 200, (8,), seed=2))
    got, _ = scan(a.bfloat16(), b.bfloat16(), h0, method="loop")
    ref, _ = scan(a.bfloat16().float(), b.bfloat16().float(), h0, method="sequential")  # rounded inputs, fp32 state
    assert got.dtype == torch.bfloat16
    assert ((got.float() - ref).abs() <= 2**-8 * ref.abs()).all()  # only the output's bf16 rounding
    b = b.requires_grad_()
    h, _ = scan(a, b, h0, method="loop")  # a and h0 need no gradient: only db is computed
    (db,) = torch.autograd.grad(h.sum(), b)
    h_ref, _ = scan(a, b, h0, method="sequential")
    torch.testing.assert_close(db, torch.autograd.grad(h_ref.sum(), b)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(GATES))
@pytest.mark.parametrize("method", ["doubling", "loop", "sequential"])
def test_gate_scan_methods_equal_log_form(kind, method):
    gen = torch.Generator().manual_seed(3)
    pre = torch.randn(2, 9, GATES[kind].blocks * 3, 4, 5, generator=gen, dtype=torch.float64) * 3
    h0 = torch.full((2, 3, 4, 5), 0.5, dtype=torch.float64)
    ref, last_ref = gate_scan(kind, pre, h0, method="log")
    h, last = gate_scan(kind, pre, h0, method=method)
    torch.testing.assert_close(h, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(last, last_ref, rtol=1e-10, atol=1e-12)


def test_auto_is_a_torch_method_on_cpu_and_triton_needs_cuda():
    a, b, h0 = _inputs(1, 5, (2,), seed=0)
    assert resolve("auto", a) == "loop"
    torch.testing.assert_close(scan(a, b, h0)[0], scan(a, b, h0, method="sequential")[0])
    if "triton" in SCANS:
        with pytest.raises(ValueError, match="needs CUDA"):
            scan(a, b, h0, method="triton")
