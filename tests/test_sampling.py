"""Invariant 4 (uniformity) and 6 (reproducibility whatever the shard count); secure sampling."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import in_process_fleet, tiny_mean
from scipy import stats

from fleet.round.sampling import Sampler, split_ranks


def _selection_counts(draw, n_avail: int, k: int, trials: int) -> np.ndarray:
    counts = np.zeros(n_avail, dtype=np.int64)
    for r in range(trials):
        ranks = draw(r, n_avail, k)
        assert len(np.unique(ranks)) == len(ranks) == k
        counts[ranks] += 1
    return counts


def _chi2_pvalue(counts: np.ndarray) -> float:
    return float(stats.chisquare(counts).pvalue)


def test_uniform_sampling_passes_chi_square():
    s = Sampler("reproducible", seed=3)
    counts = _selection_counts(s.draw, n_avail=50, k=10, trials=4000)
    assert _chi2_pvalue(counts) > 1e-3


def test_secure_sampling_passes_chi_square():
    s = Sampler("secure", seed=3)
    counts = _selection_counts(s.draw, n_avail=50, k=10, trials=4000)
    assert _chi2_pvalue(counts) > 1e-3


def test_chi_square_detects_a_biased_sampler():
    """A test double that favours low ranks slightly must fail the same test."""
    gen = np.random.default_rng(0)

    def biased(r, n, k):
        w = np.linspace(1.0, 1.5, n)
        return np.sort(gen.choice(n, size=k, replace=False, p=w / w.sum()))

    counts = _selection_counts(biased, n_avail=50, k=10, trials=4000)
    assert _chi2_pvalue(counts) < 1e-3


def test_split_ranks_maps_global_ranks_to_shards():
    ranks = np.array([0, 2, 3, 7, 9])
    parts = split_ranks(ranks, [3, 0, 5, 2])
    assert [p.tolist() for p in parts] == [[0, 2], [], [0, 4], [1]]


def _sampled_ids(cfg, shards_n: int, rounds: int = 3) -> list[np.ndarray]:
    """Ids each round's accepted devices, read from inside the (in-process) shards."""
    shards, coord = in_process_fleet(cfg, shards_n)
    out = []
    for _ in range(rounds):
        coord.run_round()
        out.append(np.sort(np.concatenate([s.cols["device_id"][s._selected] for s in shards])))
    return out


def test_same_sample_for_1_2_3_shards_in_reproducible_mode():
    cfg = tiny_mean("fleet.availability.model=diurnal", "fleet.population=3000")
    runs = [_sampled_ids(cfg, k) for k in (1, 2, 3)]
    for a, b in zip(runs[0], runs[1], strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(runs[0], runs[2], strict=True):
        np.testing.assert_array_equal(a, b)


def test_secure_mode_gives_different_samples():
    cfg = tiny_mean("rng=secure", "fleet.population=3000")
    a = _sampled_ids(cfg, 2, rounds=1)[0]
    b = _sampled_ids(cfg, 2, rounds=1)[0]
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("mode", ["reproducible", "secure"])
def test_draw_caps_at_available(mode):
    s = Sampler(mode, 0)
    assert s.draw(0, 5, 10).tolist() == [0, 1, 2, 3, 4]
    assert len(s.draw(0, 0, 10)) == 0
