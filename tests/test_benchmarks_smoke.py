"""The benchmark scripts run (tiny options): a benchmark that crashes measures nothing."""
from __future__ import annotations

from benchmarks import loader


def test_loader_benchmark_runs_and_prints_its_table(capsys):
    loader.main(["--days", "3", "--window", "6", "--sample", "5", "--s3-days", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| local") or line.startswith("| moto")]
    assert len(rows) == 4, out  # local and moto S3, time chunks of 1 and 24
    for row in rows:
        amplification = float(row.split("|")[7])
        assert 1.0 <= amplification <= 1.5, row
