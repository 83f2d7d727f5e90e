"""Statistics against numpy on the loaded array; NormStats files (climatologies: test_evaluate_baselines.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minconv_dist.data import DimNames, NormStats, compute_stats, open_store

WB2 = DimNames(lat="latitude", lon="longitude")
CHANNELS = "geopotential@500, temperature@850, 2m_temperature"


def test_stats_equal_numpy_over_the_training_period_only(tiny_wb2_store):
    stats = compute_stats(tiny_wb2_store, CHANNELS, WB2, time_range=("2015-01-02", "2015-01-05"), progress=False)
    ds = open_store(tiny_wb2_store).sel(time=slice("2015-01-02", "2015-01-05"))
    assert ds.sizes["time"] == 96
    arrays = [ds.geopotential.sel(level=500).values, ds.temperature.sel(level=850).values,
              ds["2m_temperature"].values]
    assert stats.channels == ["geopotential@500", "temperature@850", "2m_temperature"]
    np.testing.assert_allclose(stats.mean, [a.astype(np.float64).mean() for a in arrays], rtol=1e-12)
    np.testing.assert_allclose(stats.std, [a.astype(np.float64).std() for a in arrays], rtol=1e-8)
    whole = compute_stats(tiny_wb2_store, CHANNELS, WB2, progress=False)
    assert whole.mean != stats.mean


def test_empty_range_is_an_error(tiny_store):
    with pytest.raises(ValueError, match=r"time_range=\[.2020-01-01., .2020-02-01.\] selects no time steps"):
        compute_stats(tiny_store, "z", time_range=("2020-01-01", "2020-02-01"), progress=False)


def test_normstats_save_load(tmp_path, s3_bucket, s3_options):
    stats = NormStats(["z", "t2m"], [54000.0, 280.0], [3300.0, 20.0])
    path = tmp_path / "stats.json"
    stats.save(str(path))
    assert json.loads(path.read_text()) == {"channels": ["z", "t2m"], "mean": [54000.0, 280.0], "std": [3300.0, 20.0],
                                            "tendency_std": None}
    assert NormStats.load(str(path)) == stats
    url = f"s3://{s3_bucket}/model/stats.json"
    stats.save(url, s3_options)
    assert NormStats.load(url, s3_options) == stats
    with pytest.raises(ValueError, match="non-positive std"):
        NormStats(["z"], [0.0], [0.0])
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a NormStats JSON"):
        NormStats.load(str(path))


def test_stats_over_training_samples_only(tiny_sample_store):
    ns = DimNames(lat="y", lon="x", sample="sample")
    stats = compute_stats(tiny_sample_store, "vorticity", ns, sample_range=(0, 7), progress=False)
    v = open_store(tiny_sample_store).vorticity.values[:7].astype(np.float64)
    np.testing.assert_allclose(stats.mean, [v.mean()], rtol=1e-12)
    np.testing.assert_allclose(stats.std, [v.std()], rtol=1e-8)
    with pytest.raises(ValueError, match="needs a sample dim"):
        compute_stats(tiny_sample_store, "vorticity", DimNames(lat="y", lon="x"), sample_range=(0, 7), progress=False)
