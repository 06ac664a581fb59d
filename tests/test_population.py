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


@pytest.mark.parametrize("id_mode", ["index", "random"])
def test_derived_columns_are_the_generated_ones_bit_for_bit(id_mode):
    """A shard keeps most columns `Derived` (generated when read); whatever rows are asked, in
    whatever order or form, they must be exactly the rows `generate` holds."""
    f = FleetConfig(id_mode=id_mode, timezones=[-8.0, 1.0, 5.5], failure_prob_mean=0.05)
    whole = population.generate(f, 3, 0, 5000)
    cols = population.columns(f, 3, 1000, 5000)
    assert set(cols) == set(population.COLUMNS)
    picks = np.random.default_rng(0).integers(0, 4000, size=300)
    mask = np.zeros(4000, dtype=bool)
    mask[picks] = True
    for k, col in cols.items():
        ref = whole[k][1000:]
        assert isinstance(col, np.ndarray) == (k in population.HELD)
        assert len(col) == 4000
        np.testing.assert_array_equal(np.asarray(col), ref)
        np.testing.assert_array_equal(col[picks], ref[picks])  # scattered, repeated, unsorted
        np.testing.assert_array_equal(col[mask], ref[mask])
        np.testing.assert_array_equal(col[17:3001:7], ref[17:3001:7])
        np.testing.assert_array_equal(col[np.array([-1, -4000])], ref[[-1, -4000]])
        assert col[123] == ref[123] and col[123].dtype == ref.dtype
        if not isinstance(col, np.ndarray):
            assert col.nbytes == 0
            with pytest.raises(IndexError):
                col[np.array([4000])]
            with pytest.raises(IndexError):
                col[np.array([1.0])]
            with pytest.raises(TypeError, match="Derived"):  # never a silent False
                col == ref[0]  # noqa: B015
            with pytest.raises(TypeError):
                ref < col  # noqa: B015


def test_a_shard_holds_only_what_a_check_in_reads():
    """The shard's state is the held columns, the schedule and participation: no per-device id,
    speed or memory column (the cohort's are generated at plan time)."""
    cfg = tiny_mean("fleet.population=3000", "fleet.availability.model=diurnal")
    shard = ShardCore(cfg, 0, 1000, 3000)
    held = {k for k, v in shard.cols.items() if isinstance(v, np.ndarray)}
    assert held == set(population.HELD)
    whole = population.generate(cfg.fleet, cfg.seed, 0, 3000)
    np.testing.assert_array_equal(
        shard.eligible, whole["memory_bytes"][1000:] >= cfg.fleet.min_memory_gb * population.GB
    )
    assert shard.info()["state_bytes"] / 2000 <= 28


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
