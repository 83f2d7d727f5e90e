"""The benchmark scripts run (tiny options): a benchmark that crashes measures nothing."""
from __future__ import annotations

from benchmarks import loader, time_parallel


def test_loader_benchmark_runs_and_prints_its_table(capsys):
    loader.main(["--days", "3", "--window", "6", "--sample", "5", "--s3-days", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| local") or line.startswith("| moto")]
    assert len(rows) == 4, out  # local and moto S3, time chunks of 1 and 24
    for row in rows:
        amplification = float(row.split("|")[7])
        assert 1.0 <= amplification <= 1.5, row


def test_time_parallel_benchmark_runs_and_its_gradients_agree(capfd):
    """2 gloo ranks (the GPU run's code paths on the CPU); rank 0 prints the tables."""
    time_parallel.main(["--device", "cpu", "--T", "16", "--grid", "8", "16", "--hidden", "8", "--chunk", "4",
                        "--steps", "1", "--single"])
    out = capfd.readouterr().out
    check, train, single = (line for line in out.splitlines() if line.startswith("| 16 |"))
    assert float(check.split("|")[7]) < 1e-5, out  # max difference / max gradient
    assert float(train.split("|")[8]) > 0, out  # frames/s
    assert "runs" in single, out
