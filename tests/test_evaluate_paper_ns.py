"""The paper's Navier–Stokes comparison, tiny, on CPU: only that it runs end to end and writes its table."""
import json

import torch

from benchmarks import paper_navier_stokes as ns


def test_data_starts_at_the_initial_field_and_keeps_zero_mean_vorticity():
    args = dict(time_units=2, dt=0.05, device=torch.device("cpu"))
    w = ns.navier_stokes_data(2, 16, downsample=1, gen=torch.Generator().manual_seed(0), **args)
    assert w.shape == (2, 3, 16, 16) and torch.isfinite(w).all()
    assert float(w.mean((-1, -2)).abs().max()) < 1e-5  # zero mean vorticity on the full grid
    assert not torch.allclose(w[:, 0], w[:, -1])  # the flow evolves
    coarse = ns.navier_stokes_data(2, 16, downsample=2, gen=torch.Generator().manual_seed(0), **args)
    torch.testing.assert_close(coarse, w[..., ::2, ::2])  # downsampling keeps every 2nd grid point


def test_tiny_comparison_runs_end_to_end(tmp_path):
    out = tmp_path / "ns.md"
    args = ns.parser().parse_args([
        "--train-samples", "4", "--test-samples", "2", "--epochs", "1", "--resolution", "16", "--downsample", "2",
        "--time-units", "8", "--dt", "0.05", "--train-len", "5", "--train-teacher", "3", "--test-len", "8",
        "--test-teacher", "3", "--hidden", "4", "--layers", "2", "--batch-size", "2", "--out", str(out)])
    rows = ns.run(args)
    assert [r["model"] for r in rows] == list(ns.PAPER_HIDDEN)
    assert all(r["closed_loop_rmse"] > 0 and r["s_per_epoch"] > 0 for r in rows)
    assert out.read_text().count("\n| ") == 6 and len(json.loads(out.with_suffix(".json").read_text())) == 5
