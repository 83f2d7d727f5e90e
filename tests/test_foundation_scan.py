"""Reference scans (issue 2): the log-space form equals the sequential definition, values and gradients."""
import pytest
import torch

from minconv_dist.ops.scan import gate_scan, scan, scan_sequential
from minconv_dist.ops.gates import GATES, gate_rule


def _inputs(B, T, D, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(B, T, *D, generator=gen, dtype=dtype) * 0.98 + 0.01
    b = torch.rand(B, T, *D, generator=gen, dtype=dtype) + 0.05
    h0 = torch.rand(B, *D, generator=gen, dtype=dtype) + 0.1
    return a, b, h0


def test_sequential_matches_hand_computed_recurrence():
    a = torch.tensor([[0.5, 0.25, 1.0]], dtype=torch.float64).unsqueeze(-1)
    b = torch.tensor([[1.0, 2.0, -3.0]], dtype=torch.float64).unsqueeze(-1)
    h, h_last = scan(a, b, torch.tensor([[4.0]], dtype=torch.float64), method="sequential")
    # h1 = .5*4+1 = 3; h2 = .25*3+2 = 2.75; h3 = 2.75-3 = -0.25
    assert torch.allclose(h.squeeze(), torch.tensor([3.0, 2.75, -0.25], dtype=torch.float64))
    assert h_last.item() == pytest.approx(-0.25)


@pytest.mark.parametrize("B,T,D", [(2, 1, (3,)), (3, 7, (2, 4, 5)), (1, 33, (6,))])
@pytest.mark.parametrize("with_h0", [False, True])
def test_log_space_equals_sequential_values_and_grads(B, T, D, with_h0):
    a, b, h0 = _inputs(B, T, D)
    h0 = h0 if with_h0 else None
    leaves = [t.requires_grad_() for t in (a, b, h0) if t is not None]
    h_ref, last_ref = scan(a, b, h0, method="sequential")
    h_log, last_log = scan(a, b, h0, method="log")
    assert torch.allclose(h_log, h_ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(last_log, h_log[:, -1])
    w = torch.randn_like(h_ref)
    g_ref = torch.autograd.grad((h_ref * w).sum() + last_ref.sum(), leaves)
    g_log = torch.autograd.grad((h_log * w).sum() + last_log.sum(), leaves)
    for r, l in zip(g_ref, g_log):
        assert torch.allclose(l, r, rtol=1e-9, atol=1e-10)


def test_scan_gradcheck_tiny():
    a, b, h0 = _inputs(1, 4, (2,))
    for method in ("sequential", "log"):
        assert torch.autograd.gradcheck(
            lambda a, b, h0: scan(a, b, h0, method=method)[0], (a.requires_grad_(), b.requires_grad_(), h0.requires_grad_())
        )


def test_carrying_the_final_state_equals_one_long_scan():
    a, b, h0 = _inputs(2, 10, (3,))
    h_full, _ = scan(a, b, h0)
    h1, last1 = scan(a[:, :4], b[:, :4], h0)
    h2, _ = scan(a[:, 4:], b[:, 4:], last1)
    assert torch.allclose(torch.cat([h1, h2], 1), h_full, rtol=1e-12)


@pytest.mark.parametrize("kind", sorted(GATES))
def test_log_gates_are_logs_of_linear_gates(kind):
    blocks = GATES[kind][0]
    pre = torch.randn(2, 5, blocks * 3, 4, 4, dtype=torch.float64) * 3
    a, b = gate_rule(kind)(pre)
    log_a, log_b = gate_rule(kind, log_space=True)(pre)
    assert torch.allclose(log_a.exp(), a, rtol=1e-12)
    assert torch.allclose(log_b.exp(), b, rtol=1e-12)
    assert (a > 0).all() and (a < 1).all() and (b > 0).all()
    h0 = torch.full_like(a[:, 0], 0.5)
    assert torch.allclose(gate_scan(kind, pre, h0, method="log")[0], gate_scan(kind, pre, h0, method="sequential")[0], rtol=1e-10)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: scan(torch.rand(2, 3, 4), torch.rand(2, 3, 5)), "b has"),
        (lambda: scan(torch.rand(2, 0, 4), torch.rand(2, 0, 4)), "T>=1"),
        (lambda: scan(torch.rand(2, 3, 4), torch.rand(2, 3, 4), torch.rand(2, 5)), "h0 has shape"),
        (lambda: scan(torch.rand(2, 3, 4), torch.rand(2, 3, 4), method="magic"), "unknown scan method"),
        (lambda: gate_rule("rnn"), "unknown gate kind"),
    ],
)
def test_bad_scan_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
