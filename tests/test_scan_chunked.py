"""Chunked scans (state carried, recomputed per chunk) equal unchunked ones exactly."""
import pytest
import torch

from minconv_dist.models import MinConvCell
from minconv_dist.ops.gates import GATES
from minconv_dist.ops.scan import gate_scan, run_chunked, scan


def _leaves(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(*s, generator=gen, dtype=torch.float64) * 0.9 + 0.05).requires_grad_() for s in shapes]


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 16, 37, 100])  # T=37: none but 1 divides it
@pytest.mark.parametrize("method", ["sequential", "doubling", "loop"])
def test_chunked_scan_equals_unchunked(chunk_size, method):
    a, b, h0 = _leaves((2, 37, 3, 2), (2, 37, 3, 2), (2, 3, 2))
    w = torch.randn(2, 37, 3, 2, dtype=torch.float64)

    def run(cs):
        h, last = scan(a, b, h0, method=method, chunk_size=cs)
        return (h, last, *torch.autograd.grad((h * w).sum() + last.square().sum(), (a, b, h0)))

    for got, ref in zip(run(chunk_size), run(None)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kind", sorted(GATES))
def test_chunked_gate_scan_equals_unchunked(kind):
    (pre,) = _leaves((1, 20, GATES[kind].blocks * 2, 3, 3), seed=2)
    (h0,) = _leaves((1, 2, 3, 3), seed=3)
    outs = []
    for cs in (None, 6):
        h, last = gate_scan(kind, pre * 6 - 3, h0, chunk_size=cs)
        outs.append((h, last, *torch.autograd.grad(h.sin().sum() + last.sum(), (pre, h0))))
    for got, ref in zip(*outs):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)


def test_chunked_min_cell_recomputes_the_conv_and_keeps_gradients_exact():
    torch.manual_seed(0)
    cell = MinConvCell("gru", 4, padding="circular").double()
    x = torch.randn(2, 23, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    outs = []
    for cs in (None, 5, 8):
        cell.chunk_size = cs
        h, last = cell(x)
        loss = (h * torch.linspace(-1, 1, 23, dtype=torch.float64)[:, None, None, None]).sum() + last.sum()
        outs.append((h, last, *torch.autograd.grad(loss, (x, *cell.parameters()))))
    for other in outs[1:]:
        for got, ref in zip(other, outs[0]):
            torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-12)


def test_run_chunked_keeps_only_chunk_inputs_and_states():
    """Under recompute, autograd saves no per-chunk intermediate of fn (only inputs and carries)."""
    x = torch.randn(1, 64, 8, requires_grad=True)
    saved = []

    def fn(xc, h):
        big = xc.exp() * 2  # an intermediate autograd would otherwise keep
        h_seq, last = scan(torch.sigmoid(big), big, h, method="doubling")
        return h_seq, last

    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        run_chunked(fn, (x,), torch.zeros(1, 8), chunk_size=16)
    assert max(saved) <= 16 * 8  # one chunk, never the whole sequence


def test_bad_chunk_size():
    a, b, h0 = _leaves((1, 4, 2), (1, 4, 2), (1, 2))
    with pytest.raises(ValueError, match="chunk_size"):
        scan(a, b, h0, chunk_size=0)
