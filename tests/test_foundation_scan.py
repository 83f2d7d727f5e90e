"""Foundations (issue 2): the scan's definition by hand, the gate rules' two forms, bad inputs.

That every scan method equals the definition (values, gradients, h0) is tested in test_scan_methods.py.
"""
import pytest
import torch

from minconv_dist.ops.gates import GATES, gate_rule
from minconv_dist.ops.scan import gate_scan, scan


def test_sequential_matches_hand_computed_recurrence():
    a = torch.tensor([[0.5, 0.25, 1.0]], dtype=torch.float64).unsqueeze(-1)
    b = torch.tensor([[1.0, 2.0, -3.0]], dtype=torch.float64).unsqueeze(-1)
    h, h_last = scan(a, b, torch.tensor([[4.0]], dtype=torch.float64), method="sequential")
    # h1 = .5*4+1 = 3; h2 = .25*3+2 = 2.75; h3 = 2.75-3 = -0.25
    assert torch.allclose(h.squeeze(), torch.tensor([3.0, 2.75, -0.25], dtype=torch.float64))
    assert h_last.item() == pytest.approx(-0.25)


@pytest.mark.parametrize("kind", sorted(GATES))
def test_log_gates_are_logs_of_linear_gates(kind):
    pre = torch.randn(2, 5, GATES[kind].blocks * 3, 4, 4, dtype=torch.float64) * 3
    a, b = gate_rule(kind)(pre)
    log_a, log_b = gate_rule(kind, log_space=True)(pre)
    assert torch.allclose(log_a.exp(), a, rtol=1e-12)
    assert torch.allclose(log_b.exp(), b, rtol=1e-12)
    assert (a > 0).all() and (a < 1).all() and (b > 0).all()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: scan(torch.rand(2, 3, 4), torch.rand(2, 3, 5)), "b has"),
        (lambda: scan(torch.rand(2, 0, 4), torch.rand(2, 0, 4)), "T>=1"),
        (lambda: scan(torch.rand(2, 3, 4), torch.rand(2, 3, 4), torch.rand(2, 5)), "h0 has shape"),
        (lambda: scan(torch.rand(2, 3, 4), torch.rand(2, 3, 4), method="magic"), "unknown scan method"),
        (lambda: gate_rule("rnn"), "unknown gate kind"),
        (lambda: gate_rule("lstm")(torch.rand(1, 2, 4, 3, 3)), "not a multiple of 3"),
        (lambda: gate_scan("gru", torch.rand(1, 2, 4, 3, 3), method="log"), "explicit positive h0"),
    ],
)
def test_bad_scan_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
