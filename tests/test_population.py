"""The device table: distributions, Parquet round trip, bad input with one-line errors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_mean

from fleet.config import ConfigError, FleetConfig
from fleet.phones import population
from fleet.privacy.mechanisms import validate
from fleet.round.shard import ShardCore


def test_generation_is_independent_of_the_row_range():
    f = FleetConfig(id_mode="random")
    whole = population.generate(f, 7, 0, 1000)
    part = population.generate(f, 7, 400, 700)
    for k in whole:
        np.testing.assert_array_equal(whole[k][400:700], part[k])
    assert len(np.unique(whole["device_id"])) == 1000
    assert whole["device_id"].min() > 2**40  # large random ids


def test_distributions_as_configured():
    f = FleetConfig(low_memory_share=0.2, examples_max=300)
    c = population.generate(f, 0, 0, 50_000)
    low = np.mean(c["memory_bytes"] < f.min_memory_gb * population.GB)
    assert abs(low - 0.2) < 0.01
    ex = c["num_examples"]
    assert ex.min() >= 1 and ex.max() <= 300
    assert np.mean(ex) > np.median(ex)  # heavy right tail
    sp = c["flops"]
    assert np.percentile(sp, 99) / np.median(sp) > 4  # heavy-tailed speeds
    assert abs(np.mean(c["failure_prob"]) - f.failure_prob_mean) < 0.005


def test_parquet_round_trip(tmp_path):
    f = FleetConfig()
    cols = population.generate(f, 0, 0, 3000)
    path = tmp_path / "fleet.parquet"
    population.save(path, cols)
    back = population.load(path, 1000, 2500, "diurnal")
    for k in cols:
        np.testing.assert_array_equal(back[k], cols[k][1000:2500])


def test_shard_loads_its_range_from_parquet(tmp_path):
    cfg = tiny_mean("fleet.population=3000")
    cols = population.generate(cfg.fleet, 5, 0, 3000)
    path = tmp_path / "fleet.parquet"
    population.save(path, cols)
    cfg.fleet.path = str(path)
    shard = ShardCore(cfg, 1, 1500, 3000)
    np.testing.assert_array_equal(shard.cols["device_id"], cols["device_id"][1500:])


def test_parquet_missing_column_names_it(tmp_path):
    cols = population.generate(FleetConfig(), 0, 0, 100)
    del cols["uplink"]
    path = tmp_path / "bad.parquet"
    pq.write_table(population.to_table(cols), path)
    with pytest.raises(ConfigError, match=r"^fleet.path: .*lacks column\(s\) uplink"):
        population.load(path, 0, 100, "always")


def test_truncated_parquet_is_a_clear_error(tmp_path):
    path = tmp_path / "trunc.parquet"
    population.save(path, population.generate(FleetConfig(), 0, 0, 1000))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"^fleet.path: "):
        population.load(path, 0, 1000, "always")


def test_parquet_negative_rates_rejected(tmp_path):
    cols = population.generate(FleetConfig(), 0, 0, 100)
    cols["downlink"][3] = -1.0
    path = tmp_path / "neg.parquet"
    pq.write_table(pa.table(population.to_table(cols)), path)
    with pytest.raises(ConfigError, match="downlink"):
        population.load(path, 0, 100, "always")


@pytest.mark.parametrize(
    "override, key",
    [
        ("fleet.availability.model=sometimes", "fleet.availability.model"),
        ("fleet.goal=5000", "fleet.goal"),
        ("fleet.failure_prob_mean=-0.1", "fleet.failure_prob_mean"),
        ("fleet.downlink_median=-5", "fleet.downlink_median"),
        ("privacy.noise_multiplier=-1", "privacy.noise_multiplier"),
        ("fleet.overselect=0.5", "fleet.overselect"),
        ("rng=lucky", "rng"),
    ],
)
def test_bad_config_names_the_key(override, key):
    cfg = tiny_mean(override)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert msg.startswith(key + ":") and "\n" not in msg
