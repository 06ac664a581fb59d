"""DP invariants end to end: sensitivity (1), calibration (2), honest accounting (5).

Every privacy figure here is checked the way a reviewer would: the sensitivity and the noise are
measured on the running system (one device changed, everyone else silent), and the epsilon is
recomputed with dp-accounting from the run's own outputs, never by re-typing our formulas.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import dp_accounting
import numpy as np
import pytest
from conftest import FIXED_SIZE, in_process_fleet, tiny_mean
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import stats

from fleet.config import ConfigError
from fleet.privacy.accountant import ORDERS
from fleet.privacy.clipping import clip
from fleet.privacy.mechanisms import check_population, validate
from tests.doubles import OneDevice

SGD = ("train.server_optimizer=sgd", "train.server_lr=1.0")
# A small always-available fleet where one device is sampled often: q = 13 / ~108.
SMALL = (
    "fleet.population=120",
    "fleet.goal=10",
    "fleet.min_reports=1",
    "fleet.failure_prob_mean=0",
    "task.mean_dim=400",
    "train.eval_every=1000",
    *SGD,
)


def run_rounds(coord, n: int) -> tuple[np.ndarray, list[dict]]:
    """n rounds; each round's released update times the goal (server SGD with lr 1: the noised sum)."""
    deltas, lines = [], []
    for _ in range(n):
        before = coord.get_params().astype(np.float64)
        lines.append(coord.run_round())
        deltas.append((coord.get_params().astype(np.float64) - before) * coord.cfg.fleet.goal)
    return np.array(deltas), lines


def one_device_runs(cfg, updates: tuple[str, ...], rounds: int) -> dict[str, tuple[np.ndarray, list[dict]]]:
    """The same rounds (same seed: same cohorts, same noise) with one device's update changed."""
    shards, probe = in_process_fleet(cfg, 1)
    probe.run_round()
    OneDevice.TARGET = int(shards[0].cols["device_id"][shards[0]._selected[0]])  # counted in round 0
    out = {}
    for update in updates:
        OneDevice.UPDATE = update
        _, coord = in_process_fleet(cfg, 1)
        out[update] = run_rounds(coord, rounds)
    return out


def recompute(lines: list[dict], sampling: str, z: float, kind: str, cohort: int, delta: float) -> float:
    """dp-accounting on the released rounds of metrics lines: one exact event per round."""
    if kind == "pld":
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    else:
        rel = dp_accounting.NeighboringRelation.REPLACE_ONE if sampling == "fixed_size" else None
        acc = rdp_privacy_accountant.RdpAccountant(list(ORDERS), *([rel] if rel else []))
    gauss = dp_accounting.GaussianDpEvent(z)
    events = Counter()  # rounds with the same event are composed together (order does not matter)
    for x in lines:
        if not x["released"]:
            continue
        if sampling == "fixed_size":
            events[dp_accounting.SampledWithoutReplacementDpEvent(x["available"], x["selected"], gauss)] += 1
        else:
            events[dp_accounting.PoissonSampledDpEvent(min(1.0, cohort / x["available"]), gauss)] += 1
    for event, count in events.items():
        acc.compose(event, count)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(
    "sampling, pair, neighbours, kind",
    [
        ("fixed_size", ("push", "pull"), "replace-one", "rdp"),  # one device's data replaced
        ("poisson", ("push", "nan"), "zero-out", "pld"),  # one device's contribution removed
        ("poisson", ("push", "nan"), "zero-out", "rdp"),
    ],
)
def test_epsilon_follows_from_the_sensitivity_and_noise_measured(sampling, pair, neighbours, kind):
    """The released sum's sensitivity under the sampling's neighbouring relation and the noise's
    std are measured; their ratio is the multiplier dp-accounting must be given. Fixed-size
    sampling (replace-one) moves the sum by 2S, so the accounted multiplier is z/2: the old
    ledger accounted z and printed an epsilon 7x too small."""
    s = 0.5
    cfg = tiny_mean(
        "task.name=tests.doubles:OneDevice",
        *SMALL,
        f"privacy.sampling={sampling}",
        f"privacy.accountant={kind}",
        "privacy.noise_multiplier=0.8",
        f"privacy.clip_norm={s}",
    )
    runs = one_device_runs(cfg, pair, 30)
    (da, lines), (db, _) = runs[pair[0]], runs[pair[1]]
    diff = np.linalg.norm(da - db, axis=1)
    sensitivity = diff.max()
    counted = diff > 1e-3 * s  # elsewhere the two runs differ by float32 rounding only
    assert counted.sum() >= 2  # the device was counted in several rounds
    assert sensitivity == pytest.approx(2 * s if neighbours == "replace-one" else s, rel=1e-4)
    noise = da[~counted]  # the other rounds release the noise alone: every other update is zero
    sigma = noise.std()
    assert stats.normaltest(noise.ravel()).pvalue > 1e-4 and abs(noise.mean()) < 5 * sigma / np.sqrt(
        noise.size
    )
    z_measured = sigma / sensitivity
    cohort = math.ceil(cfg.fleet.goal * cfg.fleet.overselect)
    want = recompute(lines, sampling, z_measured, kind, cohort, cfg.fleet.population**-1.1)
    # sigma is measured from ~10,000 draws (0.7% standard error), the epsilon follows within ~2%
    assert lines[-1]["epsilon"] == pytest.approx(want, rel=0.03)


@pytest.mark.parametrize("sampling, kind", [("poisson", "rdp"), ("poisson", "pld"), ("fixed_size", "rdp")])
def test_adaptive_clipping_costs_what_its_two_noise_streams_measure(sampling, kind):
    """Adaptive clipping releases the sum and a noised count of unclipped updates. Both streams'
    standard deviations are measured from the released model and clip norms, the count's
    sensitivity from one device's bit, and the two Gaussians are composed by dp-accounting."""
    cfg = tiny_mean(
        "task.name=tests.doubles:OneDevice",
        *SMALL,
        "privacy=dp_fedavg_adaptive",
        f"privacy.sampling={sampling}",
        f"privacy.accountant={kind}",
        "privacy.noise_multiplier=1.0",
        "privacy.target_quantile=0.99",  # every bit is 1 (zero updates): the clip norm stays put
        "privacy.initial_clip=0.1",
        "privacy.count_noise=1.0",  # goal / 20 = 0.5 would need z < 1
    )
    goal, lr = cfg.fleet.goal, cfg.privacy.clip_lr
    # The count's sensitivity: the target's bit 1 (a zero update) against nothing (zero-out) or
    # against bit 0 (a huge update; replace-one). The two runs share the count's noise.
    pair = ("zero", "nan") if sampling == "poisson" else ("zero", "push")
    runs = one_device_runs(cfg, pair, 200)
    fractions = {}
    for update, (_, lines) in runs.items():
        clips = np.array([cfg.privacy.initial_clip] + [x["clip_norm"] for x in lines])
        fractions[update] = cfg.privacy.target_quantile - np.log(clips[1:] / clips[:-1]) / lr
    count_sensitivity = np.abs(fractions[pair[0]] - fractions[pair[1]]).max() * goal
    assert count_sensitivity == pytest.approx(0.5 if sampling == "poisson" else 1.0, rel=1e-6)
    deltas, lines = runs["zero"]  # every update zero: the model moves by the sum's noise alone
    clips = np.array([cfg.privacy.initial_clip] + [x["clip_norm"] for x in lines])[:-1]
    z_update = (deltas / clips[:, None]).std()  # per unit of clip norm
    # The noised centred count is (fraction - 1/2) goal; its centre is reported / 2.
    count_noise = (fractions["zero"] - 0.5) * goal - np.array([x["reported"] for x in lines]) / 2
    sigma_b = count_noise.std()
    assert abs(count_noise.mean()) < 4 * sigma_b / np.sqrt(len(count_noise))
    sum_sensitivity = 2.0 if sampling == "fixed_size" else 1.0  # measured in the test above
    streams = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.GaussianDpEvent(z_update / sum_sensitivity),
            dp_accounting.GaussianDpEvent(sigma_b / count_sensitivity),
        ]
    )
    # dp-accounting's own combination of Gaussians (what its RDP accountant does inside sampling)
    z_round = rdp_privacy_accountant._effective_gaussian_noise_multiplier(streams)
    cohort = math.ceil(goal * cfg.fleet.overselect)
    want = recompute(lines, sampling, z_round, kind, cohort, cfg.fleet.population**-1.1)
    # sigma_b is measured from 200 draws (5% standard error): the combined multiplier to about
    # 1.5%, the epsilon to about 3%. Raw 0/1 bits (sensitivity 1, not 1/2) cost 2x in epsilon.
    assert lines[-1]["epsilon"] == pytest.approx(want, rel=0.08)


CASES = [
    ("poisson", "pld", False),
    ("poisson", "rdp", False),
    ("fixed_size", "rdp", False),
    ("poisson", "pld", True),
    ("poisson", "rdp", True),
    ("fixed_size", "rdp", True),
]


@pytest.mark.parametrize(
    "sampling, kind, adaptive",
    [pytest.param(*c, marks=pytest.mark.slow) if c[:2] != ("poisson", "rdp") else c for c in CASES],
)
def test_printed_epsilon_equals_an_independent_recomputation_from_the_outputs(
    sampling, kind, adaptive, tmp_path
):
    """From metrics.jsonl's `available` and `selected` and the resolved config alone (the README's
    recipe), dp-accounting gives the epsilon every line printed, within 1% and never above it.
    Diurnal availability: every round has its own q_r. `fleet-privacy --run` prints the same."""
    from dataclasses import asdict

    from fleet.round import checkpoint
    from fleet.runtime.privacy_cli import main as fleet_privacy

    cfg = tiny_mean(
        "fleet.availability.model=diurnal",
        "fleet.population=3000",
        "fleet.goal=20",
        "fleet.start_hour=20",
        "fleet.min_reports=1",
        "fleet.round_interval_s=1800",
        "train.rounds=16",
        f"privacy.sampling={sampling}",
        f"privacy.accountant={kind}",
        *(("privacy=dp_fedavg_adaptive",) if adaptive else ()),
    )
    checkpoint.save_config(tmp_path, asdict(cfg))
    _, coord = in_process_fleet(cfg, 2, tmp_path / "state")
    lines = [coord.run_round() for _ in range(16)]
    assert len({x["available"] for x in lines}) > 8  # q_r changes round to round
    # The recipe: z from the config (the adaptive split keeps the add-or-remove total at z),
    # halved under replace-one, where the sum moves by 2S and the centred bit by 1.
    z = cfg.privacy.noise_multiplier / (2.0 if sampling == "fixed_size" else 1.0)
    cohort = math.ceil(cfg.fleet.goal * cfg.fleet.overselect)
    delta = cfg.fleet.population**-1.1
    for i in (3, 9, 15):
        want = recompute(lines[: i + 1], sampling, z, kind, cohort, delta)
        assert want * (1 - 1e-3) <= lines[i]["epsilon"] <= want * 1.01, (i, lines[i]["epsilon"], want)
    summary = coord.privacy_summary()
    assert summary["epsilon"] == lines[-1]["epsilon"] and summary["accountant"] == kind
    (tmp_path / "summary.json").write_text(json.dumps({"privacy": summary, "population": 3000}))
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as e:
        fleet_privacy(["--run", str(tmp_path)])
    assert e.value.code == 0
    assert (
        f"epsilon = {summary['epsilon']:.4g} at delta = {delta:.3g} ({kind.upper()}, the run's"
        in out.getvalue()
    )


def test_each_round_is_accounted_with_the_q_of_who_could_be_sampled():
    """10% of the fleet is ineligible (too little memory) and 1.3x is selected: q = 26 / 1805. The
    textbook figure, q = ceil(goal x overselect) / population = 26 / 2000 (every device always
    available, over-selection counted), is printed beside it, labelled as such."""
    cfg = tiny_mean("fleet.min_reports=1")
    shards, coord = in_process_fleet(cfg)
    eligible = sum(int(s.eligible.sum()) for s in shards)
    line = coord.run_round()
    assert line["available"] == eligible < 2000
    assert line["q"] == pytest.approx(26 / eligible) and coord.mechanism.accountant.releases[0].q == line["q"]
    summary = coord.privacy_summary()
    assert summary["textbook"]["q"] == 26 / 2000 and summary["textbook"]["epsilon"] < summary["epsilon"]
    assert "real availability does not give it" in summary["textbook"]["note"]
    assert summary["device"].startswith("a device available in every released round")


@pytest.mark.parametrize("sampling", ["poisson", "fixed_size"])
def test_the_sampling_that_runs_is_the_sampling_that_is_accounted(sampling):
    """Each sampling draws its own law and is accounted as that law with its neighbouring relation:
    poisson a Binomial cohort (PoissonSampledDpEvent, zero-out = add-or-remove accounting), fixed
    size exactly ceil(goal x overselect) (SampledWithoutReplacementDpEvent, replace-one)."""
    cfg = tiny_mean(f"privacy.sampling={sampling}", "privacy.accountant=rdp", "fleet.min_reports=1")
    _, coord = in_process_fleet(cfg, 1)
    lines = [coord.run_round() for _ in range(12)]
    cohort = math.ceil(cfg.fleet.goal * cfg.fleet.overselect)
    events = [r.event() for r in coord.mechanism.accountant.releases]
    summary = coord.privacy_summary()
    assert summary["sampling"] == sampling
    if sampling == "poisson":
        assert len({x["selected"] for x in lines}) > 3  # a random cohort size
        assert all(isinstance(e, dp_accounting.PoissonSampledDpEvent) for e in events)
        assert summary["event"].startswith("PoissonSampledDpEvent") and "zero-out" in summary["neighbours"]
    else:
        assert all(x["selected"] == cohort and x["reported"] <= cfg.fleet.goal for x in lines)
        assert all(isinstance(e, dp_accounting.SampledWithoutReplacementDpEvent) for e in events)
        assert [(e.source_dataset_size, e.sample_size) for e in events] == [
            (x["available"], x["selected"]) for x in lines
        ]
        assert (
            summary["event"].startswith("SampledWithoutReplacement")
            and "replace-one" in summary["neighbours"]
        )
        with pytest.raises(ConfigError, match="privacy.accountant: pld cannot account fixed_size"):
            validate(tiny_mean("privacy.sampling=fixed_size", "privacy.accountant=pld"))


def test_clip_bounds_norm_even_for_huge_float32():
    for scale in (1e-3, 1.0, 1e6, 3e38):
        d = np.full(1000, scale, dtype=np.float32)
        c, _ = clip(d, 0.7)
        assert np.linalg.norm(c.astype(np.float64)) <= 0.7


def test_sensitivity_huge_update_moves_sum_by_at_most_s():
    cfg = tiny_mean("task.name=tests.doubles:HugeTask", "privacy.clip_norm=0.5", "fleet.failure_prob_mean=0")
    shards, _ = in_process_fleet(cfg, 1)
    shard = shards[0]
    n = shard.check_in(0, 0.0)
    shard.plan(0, 0.0, 600.0, np.arange(min(n, 7)))
    params = np.zeros(cfg.task.mean_dim, dtype=np.float32)
    accepted = np.ones(len(shard._selected), dtype=bool)
    full = shard.train(0, 0.0, params, accepted, 0.5).sum
    for leave_out in range(len(accepted)):
        shard.check_in(0, 0.0)
        shard.plan(0, 0.0, 600.0, np.arange(min(n, 7)))
        acc = accepted.copy()
        acc[leave_out] = False
        partial = shard.train(0, 0.0, params, acc, 0.5).sum
        assert np.linalg.norm(full - partial) <= 0.5 + 1e-9


def test_noise_std_is_z_times_s_and_present_whatever_the_dropout():
    z, s, goal = 1.3, 0.25, 20
    cfg = tiny_mean(
        "task.name=tests.doubles:ZeroTask",
        "task.mean_dim=2000",
        f"privacy.noise_multiplier={z}",
        f"privacy.clip_norm={s}",
        f"fleet.goal={goal}",
        "fleet.failure_prob_mean=0.5",  # heavy dropout: rounds close below the goal
        "fleet.min_reports=1",
        *SGD,
        *FIXED_SIZE,
    )
    _, coord = in_process_fleet(cfg)
    deltas, lines = run_rounds(coord, 10)
    assert all(x["released"] for x in lines) and any(x["reported"] < goal for x in lines)
    x = deltas.ravel()
    # 20,000 draws: the sample std is within ~1.5% of the truth with overwhelming probability.
    assert abs(x.std() - z * s) / (z * s) < 0.03, x.std()
    assert stats.normaltest(x).pvalue > 1e-4
    assert abs(x.mean()) < 5 * z * s / np.sqrt(len(x))


def test_no_noise_without_dp():
    cfg = tiny_mean("task.name=tests.doubles:ZeroTask", "privacy=none", "train.server_optimizer=sgd")
    _, coord = in_process_fleet(cfg)
    before = coord.get_params().copy()
    coord.run_round()
    np.testing.assert_array_equal(coord.get_params(), before)


def test_target_epsilon_stops_before_a_round_would_pass_it():
    """The look-ahead uses the round's own q_r (known after check-in, before anyone is sampled):
    a round that would pass the target is not run, and the epsilon printed stays below it."""
    cfg = tiny_mean("fleet.min_reports=1", "privacy.accountant=rdp")
    _, probe = in_process_fleet(cfg)
    eps = [probe.run_round()["epsilon"] for _ in range(6)]
    target = (eps[4] + eps[5]) / 2
    _, coord = in_process_fleet(
        tiny_mean("fleet.min_reports=1", "privacy.accountant=rdp", f"privacy.target_epsilon={target}")
    )
    lines = []
    while len(lines) < 20:
        line = coord.run_round()
        if line.get("stop"):
            break
        lines.append(line)
    assert line["stop"] == "target_epsilon" and len(lines) == 5
    assert lines[-1]["epsilon"] == pytest.approx(eps[4]) and eps[4] <= target
    assert coord.round == 5 and len(coord.mechanism.accountant.releases) == 5


@pytest.mark.parametrize("mechanism", ["privacy=dp_fedavg", "privacy=dp_ftrl", "privacy=dp_blt"])
@pytest.mark.parametrize("delta", ["0.001", "0.9"])
def test_a_delta_not_below_one_over_the_population_is_refused(mechanism, delta):
    """With delta >= 1/N, publishing one random device's data in the clear meets the guarantee:
    it promises nothing, so it is refused before start-up, for every mechanism."""
    with pytest.raises(ConfigError, match=rf"privacy.delta: {delta} is not below 1 / population = 0.0005"):
        check_population(tiny_mean(mechanism, f"privacy.delta={delta}"), 2000)
    assert check_population(tiny_mean(mechanism), 2000) == 2000**-1.1


def test_an_unreachable_target_is_refused_before_start_up():
    with pytest.raises(ConfigError, match=r"privacy.target_epsilon: 0.01 is unreachable: one round costs"):
        check_population(tiny_mean("privacy.target_epsilon=0.01"), 2000)
    check_population(tiny_mean("privacy.target_epsilon=5"), 2000)
    with pytest.raises(ConfigError, match=r"privacy.target_epsilon: 0.01 is unreachable: the first release"):
        check_population(tiny_mean("privacy=dp_ftrl", "privacy.target_epsilon=0.01"), 2000)


@pytest.mark.parametrize(
    "override, message",
    [
        ("privacy.clip_norm=inf", "privacy.clip_norm: must be finite"),
        ("privacy.noise_multiplier=inf", "privacy.noise_multiplier: must be finite"),
        ("privacy.noise_multiplier=nan", "privacy.noise_multiplier: must be finite"),
        ("privacy.noise_multiplier=0", "privacy.noise_multiplier: 0 adds no noise: epsilon is infinite"),
        ("privacy.delta=2", "privacy.delta: must be in (0, 1)"),
        ("privacy.delta=nan", "privacy.delta: must be finite"),
        ("privacy.target_epsilon=inf", "privacy.target_epsilon: must be finite"),
        ("fleet.overselect=inf", "fleet.overselect: must be finite"),
    ],
)
def test_bad_numbers_never_become_privacy_claims(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(tiny_mean(override))


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("mechanism", ["dp_fedavg", "dp_ftrl", "dp_blt"])
@pytest.mark.parametrize(
    "override, message",
    [
        ("privacy.delta=1.5", "privacy.delta: must be in (0, 1)"),
        ("privacy.delta=0", "privacy.delta: must be in (0, 1)"),
        ("privacy.target_epsilon=-1", "privacy.target_epsilon: must be > 0"),
        ("privacy.clip_norm=0", "privacy.clip_norm: must be > 0"),
        ("privacy.noise_multiplier=-1", "privacy.noise_multiplier: must be >= 0"),
        ("privacy.accountant=moments", "privacy.accountant: unknown value"),
    ],
)
def test_every_mechanism_checks_all_its_settings(mechanism, accountant, override, message):
    """Each mechanism validates every setting it reads, in one line, before anything starts (DP-FTRL
    once returned early and skipped them); a delta in (0, 1) that is not below 1 / population is
    refused once the population is known, rather than crashing dp-accounting mid-run."""
    cfg = tiny_mean(f"privacy={mechanism}", f"privacy.accountant={accountant}", override)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg)
        check_population(cfg, 2000)


@pytest.mark.parametrize("argv", [["--delta", "0.9"], ["--delta", "0.5", "--accountant", "rdp"]])
def test_fleet_privacy_answers_a_large_delta_without_crashing(argv, capsys):
    """Without a population (DP-FTRL's figure needs none) a large delta gives a figure rather than
    a traceback; with one, a delta not below 1 / population is refused as a run refuses it."""
    from fleet.runtime.privacy_cli import main

    main(["--mechanism", "dp_ftrl", "--rounds", "10", "--noise", "1", *argv])
    assert f"at delta = {argv[1]}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--population", "100", "--goal", "10", "--rounds", "10", "--noise", "1", *argv])
    assert e.value.code == 2 and "is not below 1 / population = 0.01" in capsys.readouterr().err


def test_zero_noise_only_on_request_and_then_epsilon_is_infinite():
    cfg = tiny_mean("privacy.noise_multiplier=0", "privacy.allow_zero_noise=true", "fleet.min_reports=1")
    validate(cfg)
    _, coord = in_process_fleet(cfg)
    line = coord.run_round()
    assert line["released"] and line["epsilon"] == math.inf
    assert coord.privacy_summary()["epsilon"] == math.inf


@pytest.mark.parametrize("argv", [["--delta", "2"], ["--noise", "nan"], ["--noise", "inf"], ["--delta", "0"]])
def test_fleet_privacy_refuses_bad_numbers(argv, capsys):
    from fleet.runtime.privacy_cli import main

    base = ["--population", "1000", "--goal", "10", "--rounds", "10"]
    if "--noise" not in argv:
        base += ["--noise", "1"]
    with pytest.raises(SystemExit) as e:
        main(base + argv)
    assert e.value.code == 2
    assert "epsilon =" not in capsys.readouterr().out


def test_a_round_with_no_valid_update_is_flagged_as_pure_noise():
    cfg = tiny_mean("task.name=tests.doubles:AllInvalid", "fleet.min_reports=1")
    _, coord = in_process_fleet(cfg)
    line = coord.run_round()
    assert line["released"] and line["reported"] == 0 and line["pure_noise"] is True
    assert coord.privacy_summary()["pure_noise_rounds"] == 1


@pytest.mark.slow
def test_fleet_privacy_prints_both_accountants_and_the_noise_for_a_target(capsys):
    """PLD is tighter than RDP's conversion for few rounds (paper.md: 0.084 against 0.813 at
    z = 1, q = 1e-3, 100 rounds, delta = 1e-6); dp-accounting is asked here, independently."""
    from fleet.runtime.privacy_cli import main

    main(["--population", "100000", "--goal", "100", "--rounds", "100", "--noise", "1.0", "--delta", "1e-6"])
    out = capsys.readouterr().out
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-5)
    acc.compose(dp_accounting.PoissonSampledDpEvent(1e-3, dp_accounting.GaussianDpEvent(1.0)), 100)
    pld = float(out.split("epsilon = ")[1].split()[0])
    rdp = float(out.split("epsilon = ")[2].split()[0])
    assert acc.get_epsilon(1e-6) <= pld <= acc.get_epsilon(1e-6) * 1.01
    ref = rdp_privacy_accountant.RdpAccountant(list(ORDERS))
    ref.compose(dp_accounting.PoissonSampledDpEvent(1e-3, dp_accounting.GaussianDpEvent(1.0)), 100)
    assert ref.get_epsilon(1e-6) <= rdp <= ref.get_epsilon(1e-6) * 1.01 and rdp > 5 * pld
    main(["--population", "100000", "--goal", "100", "--rounds", "50", "--target-epsilon", "1.0"])
    z = float(capsys.readouterr().out.split("z = ")[1].split()[0])
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.PoissonSampledDpEvent(1e-3, dp_accounting.GaussianDpEvent(z)), 50)
    assert 0.98 < acc.get_epsilon(100_000**-1.1) <= 1.0


def test_adaptive_clipping_tracks_the_median_norm():
    """From 10x too large, the clip norm settles on the median update norm: within the norm
    histogram's bin (a factor 1.78 wide) that holds it, and steady over the last rounds."""
    cfg = tiny_mean(
        "privacy=dp_fedavg_adaptive",
        "privacy.noise_multiplier=0.5",
        "privacy.initial_clip=10.0",
        "fleet.goal=100",
        "fleet.population=4000",
        "fleet.min_reports=1",
        "train.client_lr=0.01",
    )
    _, coord = in_process_fleet(cfg)
    lines = [coord.run_round() for _ in range(80)]
    upper = np.median([x["update_norm_median"] for x in lines[-10:]])  # the median's bin's top
    lower = upper / 10 ** (8 / 32)  # its bottom: the bins are log-spaced, 32 to 8 decades
    clips = np.array([x["clip_norm"] for x in lines[-20:]])
    assert np.all((lower * 0.9 < clips) & (clips < upper * 1.1)), (lower, upper, clips)
    assert clips.max() / clips.min() < 1.15


def test_the_no_dp_baselines_run_dp_fedavgs_protocol_and_differ_only_in_clip_and_noise():
    """privacy=none is DP-FedAvg with the clip and noise off: the same Poisson cohorts, every arrival
    counted, the sum over the goal. With a clip that never binds, clip_only (z = 0) releases the same
    models bit for bit; DP-FedAvg with noise draws the same cohorts and differs in the model alone."""
    base = ("fleet.min_reports=1", "fleet.failure_prob_mean=0.2", "train.server_optimizer=sgd", "seed=3")
    runs = {}
    for arm in ("privacy=none", "privacy=clip_only privacy.clip_norm=1e9", "privacy=dp_fedavg"):
        _, coord = in_process_fleet(tiny_mean(*base, *arm.split()))
        lines = [coord.run_round() for _ in range(4)]
        runs[arm.split()[0]] = (lines, coord.get_params().copy(), coord.mechanism.cohort(1000))
    counts = ("available", "selected", "reported", "dropped", "q", "waiting_for_limit")
    none_lines, none_params, none_cohort = runs["privacy=none"]
    assert none_cohort.poisson and not none_cohort.closes_on_goal
    # Poisson: a round's cohort is not the goal, and every arrival counts (none dropped after it).
    assert any(x["reported"] != tiny_mean(*base).fleet.goal for x in none_lines)
    assert all(x["dropped"]["after_goal"] == 0 for x in none_lines)

    def funnel(lines: list[dict]) -> list[dict]:
        return [{k: x[k] for k in counts} for x in lines]

    for arm, (lines, _, _) in runs.items():
        assert funnel(lines) == funnel(none_lines), arm
    np.testing.assert_array_equal(runs["privacy=clip_only"][1], none_params)
    assert not np.array_equal(runs["privacy=dp_fedavg"][1], none_params)
