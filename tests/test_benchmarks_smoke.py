"""The benchmark scripts run (tiny options): a benchmark that crashes measures nothing."""
from __future__ import annotations

from benchmarks import baselines, ensemble, loader, scan_cpu, time_parallel, train_step
from minconv_dist.data.store import fast_io_missing


def test_loader_benchmark_runs_and_prints_its_table(capsys):
    loader.main(["--days", "3", "--window", "6", "--sample", "5", "--s3-days", "1", "--grid", "16", "32"])
    out = capsys.readouterr().out
    assert "hourly 16x32 float32 stores" in out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| local") or line.startswith("| moto")]
    # local and moto S3, time chunks of 1 and 24, a row per reader that reads the store its own way
    readers = {"local": ["zarr", "zarrs"], "moto S3": ["zarr", "zarrs", "obstore"]} if fast_io_missing() is None \
        else {"local": ["zarr"], "moto S3": ["zarr"]}
    assert [(row[1].split(",")[0].strip(), row[2].strip()) for row in rows] == [
        (store, reader) for _ in range(2) for store in ("local", "moto S3") for reader in readers[store]], out
    for row in rows:
        blocks_alone, amplification = float(row[7]), float(row[11])
        assert blocks_alone > 0 and 1.0 <= amplification <= 1.5, row


def test_cpu_scan_benchmark_prints_every_method(capsys):
    scan_cpu.main(["--small", "--repeats", "1"])
    (row,) = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| [2, 8")]
    assert all(float(cell) > 0 for cell in row[2:5]) and row[5].strip().endswith("x"), row


def test_baselines_benchmark_checks_equality_and_prints_its_table(capsys):
    baselines.main(["--device", "cpu", "--T", "3", "--grid", "8", "8", "--hidden", "4", "--repeats", "1",
                    "--warmup", "0"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| conv")]
    assert [(r[1].strip(), r[3].strip()) for r in rows] == [("convlstm", "fp32"), ("convgru", "fp32")]
    assert all(float(r[7]) <= 1e-5 for r in rows)  # ours == the per-step loop (checked before timing)


def test_train_step_variants_check_equality_and_print_their_rows(capsys):
    train_step.main(["--device", "cpu", "--T", "3", "--grid", "8", "8", "--hidden", "4", "--repeats", "1",
                     "--variants", "eager", "channels_last"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| 3 |")]
    assert [r[3].strip() for r in rows] == ["eager", "channels_last", "official"]
    assert all(float(r[7]) <= 1e-5 for r in rows[:2])  # each variant == the eager network (checked first)


def test_time_parallel_benchmark_runs_and_its_gradients_agree(capfd):
    """2 gloo ranks (the GPU run's code paths on the CPU); rank 0 prints the tables. float64 is exact."""
    time_parallel.main(["--device", "cpu", "--T", "16", "--grid", "8", "16", "--hidden", "8", "--chunk", "4",
                        "--steps", "1", "--single", "--check-dtype", "float32", "float64"])
    out = capfd.readouterr().out
    check, floor, check64, floor64, train, single = (line for line in out.splitlines() if line.startswith("| 16 |"))
    assert float(check.split("|")[7]) < 1e-5, out  # max difference / max gradient
    assert "floor" in floor and float(floor.split("|")[7]) < 1e-5, out  # one device at another chunk size
    assert "float64" in check64 and float(check64.split("|")[7]) < 1e-12, out
    assert check64.split("|")[8].split(".")[0].strip() in {"encoder", "cells", "norms", "decoder"}, out  # named
    assert float(train.split("|")[8]) > 0, out  # frames/s
    assert "runs" in single, out


def test_time_parallel_benchmark_has_its_one_device_baseline(capfd):
    time_parallel.main(["--device", "cpu", "--S", "1", "--T", "16", "--grid", "8", "16", "--hidden", "8",
                        "--chunk", "4", "--steps", "1", "--no-single"])
    rows = [line.split("|") for line in capfd.readouterr().out.splitlines() if line.startswith("| 16 |")]
    assert len(rows) == 1 and rows[0][3].strip() == "1" and rows[0][4].strip() == "12", rows  # S, its frames


def test_ensemble_benchmark_prints_a_row_per_mode_and_member_count(capsys):
    ensemble.main(["--device", "cpu", "--grid", "8", "16", "--hidden", "4", "--layers", "1", "--inits", "2",
                   "--init-every", "4", "--context", "3", "--steps", "2", "--members", "2", "--repeats", "1"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| context", "| warmup"))]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [("context", "deterministic"), ("context", "2"),
                                                             ("warmup", "deterministic"), ("warmup", "2")]
    assert all(float(r[3]) > 0 and float(r[5]) > 0 for r in rows)
