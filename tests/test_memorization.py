"""Memorization audit: exposure arithmetic, the planting plan, memorization of a trained canary,
and a run with canaries that keeps its planted device ids out of every shared output."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import SMALL_NWP, in_process_fleet, make_cfg, tiny_mean, write_users_jsonl

from fleet.audits import memorization as mz
from fleet.audits.cli import main
from fleet.config import ConfigError, validate
from fleet.learning.data.corpus import make_corpus
from fleet.learning.data.vocab import NUM_SPECIAL
from fleet.learning.engines import FusedEngine, LocalSGD
from fleet.learning.model import NWPModel, get_flat, set_flat
from fleet.phones import population
from fleet.round import checkpoint
from fleet.runtime.driver import train


def fixed_distribution_model(word_logp: np.ndarray) -> NWPModel:
    """A CIFG whose next-word distribution is softmax(word_logp) over the words, whatever the context.

    One unit: the input and recurrent weights are 0 and the o and i gates saturate (bias 30), so
    c = tanh(b_g) and r = o tanh(c) w_p = 1 at every step; the tied embedding (width 1) then makes
    the logits the embedding column itself. Specials get -100 (probability ~1e-44).
    """
    v = len(word_logp)
    m = NWPModel(v + NUM_SPECIAL, 1, 1, 1).eval()
    with torch.no_grad():
        m.w_x.zero_()
        m.w_r.zero_()
        m.bias.copy_(torch.tensor([30.0, 30.0, 1.0]))
        m.w_p.fill_(1.0 / math.tanh(math.tanh(1.0)))
        m.embedding[:NUM_SPECIAL, 0] = -100.0
        m.embedding[NUM_SPECIAL:, 0] = torch.tensor(word_logp, dtype=torch.float32)
    return m


def test_exposure_by_rank_on_a_model_with_known_probabilities():
    # Words 4..7 with probabilities 1/2, 1/4, 1/8, 1/8: 1, 2, 3 and 3 bits each.
    m = fixed_distribution_model(np.log([0.5, 0.25, 0.125, 0.125]))
    prefix = np.array([6, 5])
    space = np.array(list(itertools.product(range(4, 8), repeat=2)))
    lp = mz.log_perplexity(m, prefix, space, batch=5)  # batches of 5: the batching is exercised too
    want = np.array([[1, 2, 3, 3][a - 4] + [1, 2, 3, 3][b - 4] for a, b in space], dtype=float)
    np.testing.assert_allclose(lp, want, atol=1e-4)

    # |R| = 16: the canary and the 15 other secrets. Canary (w4 w4), 2 bits: nothing is lower.
    i = 0
    rank, exposure = mz.exposure_by_rank(lp[i], np.delete(lp, i))
    assert (rank, exposure) == (1, pytest.approx(4.0))
    # Canary (w5 w6), 5 bits: 8 secrets are lower (2, 3, 3, 4 x 5 bits); its 3 ties do not count.
    i = int(np.flatnonzero((space == [5, 6]).all(1))[0])
    rank, exposure = mz.exposure_by_rank(lp[i], np.delete(lp, i))
    assert rank == 9
    assert exposure == pytest.approx(4.0 - math.log2(9.0))
    # The least likely secret (w7 w7 or a 6 bits tie) has exposure log2 16 - log2 13.
    i = int(np.flatnonzero((space == [7, 7]).all(1))[0])
    assert mz.exposure_by_rank(lp[i], np.delete(lp, i)) == (13, pytest.approx(4.0 - math.log2(13.0)))


def test_extrapolated_exposure_is_close_to_the_rank_where_all_candidates_are_enumerated():
    # 16 words with random probabilities, secrets of 4 words: all 65,536 can be ranked.
    logits = np.random.default_rng(0).normal(0.0, 1.0, 16)
    m = fixed_distribution_model(logits - np.log(np.exp(logits).sum()))
    space = np.array(list(itertools.product(range(4, 20), repeat=4)))
    lp = mz.log_perplexity(m, np.array([4]), space)
    fit = mz.fit_skewnorm(lp)
    order = np.argsort(lp, kind="stable")
    for rank, tolerance in ((80, 0.4), (300, 0.4), (1200, 0.4), (5000, 0.4), (20, 1.5)):
        i = order[rank]
        _, by_rank = mz.exposure_by_rank(lp[i], np.delete(lp, i))
        extrapolated = mz.exposure_extrapolated(lp[i], fit)
        # Within 0.4 bits up to ~10 bits of exposure; in the last few candidates of this small,
        # discrete space the fitted tail is heavier than the real one, so it errs low (safe side).
        assert abs(extrapolated - by_rank) < tolerance, (rank, by_rank, extrapolated)
        assert extrapolated < by_rank + 0.4


@pytest.fixture
def one_thread():
    """Train as a shard does, on one thread: two threads on a busy 2-core machine were measured
    20x slower for this small model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_canary_trained_many_times_is_exposed_and_extracted_an_unseen_one_is_not(one_thread):
    cfg = make_cfg(*SMALL_NWP, "memorization=secret_sharer")
    corpus = make_corpus(cfg)
    g = np.random.default_rng(3)
    word_p = mz.word_distribution(corpus, "unigram")
    prefixes = mz.draw_words(g, word_p, (2, 3))
    secrets = mz.draw_words(g, word_p, (2, 5))
    plan = mz.CanaryPlan(
        seed=0,
        seq_len=cfg.model.seq_len,
        prefixes=prefixes,
        secrets=secrets,
        group=np.zeros(2, dtype=np.int32),
        repeats=np.ones(2, dtype=np.int32),
        prob=np.zeros(2),
        device_ids=np.zeros(0, dtype=np.int64),
        device_rows=np.zeros(0, dtype=np.int64),
        device_canary=np.zeros(0, dtype=np.int32),
        device_insertions=np.zeros(0, dtype=np.int64),
    )
    # Centrally: 1,200 natural examples and canary 0 repeated 64 times; canary 1 is never seen.
    natural = np.concatenate([corpus.examples(d, 24) for d in range(50)])
    data = np.concatenate([natural, np.repeat(plan.sequences()[:1], 64, axis=0)])
    torch.manual_seed(0)
    model = NWPModel(cfg.model.vocab_size + NUM_SPECIAL, 16, 32, 16, init_scale=1.0)
    engine = FusedEngine(model.shape)
    params = get_flat(model)
    delta, _ = engine.train_device(params, data, LocalSGD(6, 16, 1.0), np.random.default_rng(0))
    set_flat(model, params + delta)
    model.eval()

    got = mz.measure(model, prefixes, secrets, word_p, references=4095, samples=4096, beam_width=5, seed=1)
    assert got["exposure"][0] > 12.0 - 1.0  # log2|R| = 12: ranked first or nearly
    assert got["exposure_extrapolated"][0] > 12.0
    assert got["extracted"][0] and got["extracted_top_b"][0]
    assert got["exposure"][1] < 6.0
    assert not got["extracted"][1] and not got["extracted_top_b"][1]


def plan_cfg(*overrides: str):
    return make_cfg(
        *SMALL_NWP,
        "fleet.id_mode=random",
        "memorization=secret_sharer",
        "memorization.groups=[{devices:1,repeats:3,canaries:2},{devices:5,repeats:6,canaries:1},"
        "{devices:4,prob:0.5,canaries:1}]",
        *overrides,
    )


def test_plan_hits_exactly_the_configured_devices_and_repeats():
    cfg = plan_cfg()
    validate(cfg)
    corpus = make_corpus(cfg)
    plan = mz.make_plan(cfg, corpus)
    assert plan.devices().tolist() == [1, 1, 5, 4]
    assert len(set(plan.device_ids.tolist())) == 11  # no device carries two canaries
    cols = population.generate(cfg.fleet, cfg.seed, 0, cfg.fleet.population)
    np.testing.assert_array_equal(cols["device_id"][plan.device_rows], plan.device_ids)
    counts = cols["num_examples"][plan.device_rows]
    assert np.all(cols["memory_bytes"][plan.device_rows] >= cfg.fleet.min_memory_gb * population.GB)
    # Reproducible from the config, and a different seed plants elsewhere.
    again = mz.make_plan(cfg, corpus)
    np.testing.assert_array_equal(again.device_ids, plan.device_ids)
    np.testing.assert_array_equal(again.secrets, plan.secrets)
    assert set(mz.make_plan(plan_cfg("seed=5"), corpus).device_ids) != set(plan.device_ids)

    wrapped = mz.CanaryCorpus(corpus, plan)
    sequences = plan.sequences()
    for j, (dev, c, n) in enumerate(zip(plan.device_ids, plan.device_canary, counts, strict=True)):
        ex = wrapped.examples(int(dev), int(n))
        hits = int(np.all(ex == sequences[c], axis=1).sum())
        assert hits == plan.device_insertions[j]
        if plan.repeats[c]:
            assert hits == plan.repeats[c] and n >= plan.repeats[c]
        np.testing.assert_array_equal(wrapped.examples(int(dev), int(n)), ex)  # same at every read
        untouched = ~np.all(ex == sequences[c], axis=1)
        np.testing.assert_array_equal(ex[untouched], corpus.examples(int(dev), int(n))[untouched])
    assert plan.insertions().tolist()[:3] == [3, 3, 30]
    assert 0 < plan.insertions()[3] < counts[plan.device_canary == 3].sum()  # p = 0.5 of each
    # Devices without a canary read exactly the base corpus.
    other = int(cols["device_id"][np.setdiff1d(np.arange(50), plan.device_rows)[0]])
    np.testing.assert_array_equal(wrapped.examples(other, 7), corpus.examples(other, 7))


def test_plan_on_an_arrow_corpus_uses_its_devices(tmp_path):
    from fleet.learning.data import ingest

    src = write_users_jsonl(tmp_path / "raw.jsonl", per_user=(2, 7))
    out = tmp_path / "corpus"
    ingest.main([str(src), str(out), "--user-column", "user", "--vocab-size", "50", "--no-progress"])
    cfg = make_cfg(
        *SMALL_NWP,
        "data=arrow",
        f"data.path={out}",
        "model.vocab_size=50",
        "fleet.goal=5",
        "memorization=secret_sharer",
        "memorization.groups=[{devices:3,repeats:2,canaries:2}]",
        "memorization.prefix=[w1,w2]",
    )
    corpus = make_corpus(cfg)
    plan = mz.make_plan(cfg, corpus)
    ids, counts = corpus.device_table(0, corpus.num_devices)
    np.testing.assert_array_equal(ids[plan.device_rows], plan.device_ids)
    vocab = corpus.vocab()
    assert [vocab[i] for i in plan.prefixes[0]] == ["w1", "w2"]
    wrapped = mz.CanaryCorpus(corpus, plan)
    for dev, c, n in zip(plan.device_ids, plan.device_canary, counts[plan.device_rows], strict=True):
        ex = wrapped.examples(int(dev), int(n))
        assert int(np.all(ex == plan.sequences()[c], axis=1).sum()) == 2
    with pytest.raises(ConfigError, match="memorization.prefix"):
        mz.make_plan(
            make_cfg(
                *SMALL_NWP,
                "data=arrow",
                f"data.path={out}",
                "model.vocab_size=50",
                "memorization=secret_sharer",
                "memorization.prefix=[zzz]",
            ),
            corpus,
        )


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="memorization.secret_words"):
        validate(plan_cfg("memorization.secret_words=17"))
    with pytest.raises(ConfigError, match=r"memorization.groups\[2\].prob"):
        validate(plan_cfg("memorization.groups=[{devices:1},{devices:1},{devices:1,prob:1.5}]"))
    with pytest.raises(ConfigError, match="memorization.groups: 2001 planted devices"):
        cfg = plan_cfg("memorization.groups=[{devices:2001}]")
        mz.make_plan(cfg, make_corpus(cfg))


@pytest.mark.parametrize("privacy", ["none", "dp_fedavg", "dp_ftrl", "dp_blt"])
def test_the_audit_scores_the_model_the_mechanism_released(privacy, tmp_path):
    """What the end-of-run audit and `fleet-audit` load is the released model, whatever the
    mechanism: DP-FTRL's server optimizer never steps, and its weights are the initial model."""
    from fleet.audits.memorization.audit import load_weights

    cfg = tiny_mean(f"privacy={privacy}", "fleet.min_reports=1")
    _, coord = in_process_fleet(cfg, 2, tmp_path / "state")
    init = coord.get_params().copy()
    for _ in range(3):
        coord.run_round()
    coord.checkpoint()
    weights, committed = load_weights(tmp_path)
    assert committed == 3 and np.array_equal(weights, coord.get_params())
    assert np.linalg.norm(weights - init) > 0.1


@pytest.mark.parametrize("privacy", ["none", "dp_ftrl"])
def test_run_with_canaries_audits_and_leaks_no_planted_device_id(privacy, ray_session, tmp_path, capfd):
    cfg = make_cfg(
        *SMALL_NWP,
        "fleet.id_mode=random",
        "fleet.goal=20",
        f"privacy={privacy}",
        "tracking.mode=offline",
        "train.rounds=3",
        "train.eval_every=3",
        "ray.shards=2",
        "memorization=secret_sharer",
        "memorization.groups=[{devices:1,repeats:4,canaries:1},{devices:300,repeats:4,canaries:1}]",
        "memorization.references=255",
        "memorization.samples=256",
        "memorization.beam_width=3",
    )
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    result = json.loads((run_dir / mz.RESULT_FILE).read_text())
    assert [c["devices"] for c in result["canaries"]] == [1, 300]
    # exposure by rank is log2 |R| - log2 rank, |R| = 256 candidates (the canary among 255)
    for c in result["canaries"]:
        assert 1 <= c["rank"] <= 256 and c["exposure"] == pytest.approx(8.0 - math.log2(c["rank"]))
    # times trained: the planted devices' participations, read back from the shards' state, times
    # the copies each one carries
    plan = mz.CanaryPlan.load(mz.plan_file(run_dir))
    state = run_dir / "state"
    saved = checkpoint.load_coordinator(state)
    parts = np.concatenate(
        [
            checkpoint.load_shard(state, a, b, saved["round"])["participations"]
            for a, b in ((0, 1000), (1000, 2000))
        ]
    )
    for k, c in enumerate(result["canaries"]):
        mine = plan.device_canary == k
        assert c["times_trained"] == int((parts[plan.device_rows[mine]] * plan.device_insertions[mine]).sum())
    assert result["canaries"][1]["times_trained"] > 0  # 60 trainings of 2000 devices, 300 planted
    assert (run_dir / mz.GROUPS_FILE).exists() and (run_dir / mz.PLOT_FILE).exists()
    media = list((run_dir / "wandb").rglob("media/images/memorization/exposure_*.png"))
    assert media, "the exposure plot was not logged to the W&B run"

    planted_ids = set(mz.CanaryPlan.load(mz.plan_file(run_dir)).device_ids.tolist())
    assert min(planted_ids) > 10**12
    # Every shared output (metrics, summary, config, the audit, W&B) and the console, searched
    # for a planted id in decimal or hex. Only the plan itself (canaries/) names them.
    files = [p for p in run_dir.rglob("*") if p.is_file() and mz.PLAN_DIR not in p.relative_to(run_dir).parts]
    assert any(p.name == "metrics.jsonl" for p in files) and any(p.name == "summary.json" for p in files)
    texts = [p.read_bytes().decode("utf-8", "replace") for p in files]
    texts += list(capfd.readouterr())
    numbers = set()
    for text in texts:
        numbers.update(int(x) for x in re.findall(r"\d{9,}", text))
        numbers.update(int(x, 16) for x in re.findall(r"[0-9a-fA-F]{12,}", text))
    assert not numbers & planted_ids

    # fleet-audit RUN_DIR audits again from the files alone; --compare sets runs side by side.
    (run_dir / mz.RESULT_FILE).unlink()
    main([str(run_dir), "--no-figures"])
    again = json.loads((run_dir / mz.RESULT_FILE).read_text())
    assert [c["exposure"] for c in again["canaries"]] == [c["exposure"] for c in result["canaries"]]
    other = tmp_path / "other"
    other.mkdir()
    (other / mz.RESULT_FILE).write_text(json.dumps({**again, "label": "other run"}))
    main([str(run_dir), "--compare", str(other)])
    table = (tmp_path / f"{mz.COMPARE_STEM}.csv").read_text().splitlines()
    assert len(table) == 1 + 4 and (tmp_path / f"{mz.COMPARE_STEM}.png").exists()
    assert "other run" in capfd.readouterr().out


def test_the_control_group_of_an_untrained_model_sits_at_chance():
    """Canaries never seen rank uniformly among candidates drawn alike: their mean exposure is
    1/ln 2 bits, which the Student interval of 64 of them must contain. A canary scored against
    candidates from a different law (here: the uniform, which an unigram-drawn secret beats
    under a model that learned the unigram), or an off-by-one rank, moves it out."""
    cfg = make_cfg(*SMALL_NWP, "memorization=secret_sharer")
    corpus = make_corpus(cfg)
    word_p = mz.word_distribution(corpus, "unigram")
    g = np.random.default_rng(11)
    prefixes, secrets = mz.draw_words(g, word_p, (64, 3)), mz.draw_words(g, word_p, (64, 5))
    torch.manual_seed(1)
    model = NWPModel(cfg.model.vocab_size + NUM_SPECIAL, 16, 32, 16, init_scale=1.0).eval()
    got = mz.measure(model, prefixes, secrets, word_p, references=1023, samples=256, beam_width=2, seed=5)
    mean, lo, hi = mz.mean_interval(got["exposure"])
    assert lo < mz.CHANCE_BITS < hi, (mean, lo, hi)
    assert hi - lo < 1.0  # 64 canaries: an interval narrow enough to mean something

    # The same canaries under a model that knows the unigram, ranked against uniform candidates,
    # are not at chance: the interval leaves 1/ln 2 (the test can fail).
    unigram_model = fixed_distribution_model(np.log(word_p))
    uniform = np.full_like(word_p, 1.0 / len(word_p))
    off = mz.measure(
        unigram_model, prefixes, secrets, uniform, references=1023, samples=256, beam_width=2, seed=5
    )
    assert mz.mean_interval(off["exposure"])[1] > mz.CHANCE_BITS


def test_cells_are_tested_against_the_control_group():
    g = np.random.default_rng(0)
    chance = lambda n: 10.0 - np.log2(g.integers(1, 1025, n))  # noqa: E731 - ranks uniform in 1..1024
    canaries = []
    for group, devices, exposures in ((0, 0, chance(8)), (1, 1, chance(8)), (2, 4, np.full(8, 10.0))):
        for e in exposures:
            canaries.append(
                {"group": group, "devices": devices, "repeats": 4, "prob": None, "insertions": 4 * devices,
                 "log_perplexity": 30.0, "exposure": float(e), "saturated": e == 10.0,
                 "exposure_extrapolated": float(e), "exposure_extrapolated_hi": None, "extracted": False,
                 "extracted_top_b": False, "generic_hits": 0}
            )  # fmt: skip
    rows = {r["group"]: r for r in mz.group_table(canaries)}
    assert rows[0]["p_vs_control"] is None and rows[0]["devices_planned"] == 0
    assert not rows[1]["above_control"] and rows[1]["p_vs_control"] > 0.05
    assert rows[2]["above_control"] and rows[2]["p_vs_control"] < 1e-3
    assert rows[2]["saturated"] == 8 and rows[2]["devices_planned"] == 32
    for r in rows.values():
        assert r["exposure_lo"] <= r["exposure"] <= r["exposure_hi"]
    assert rows[2]["exposure_lo"] == rows[2]["exposure_hi"] == 10.0


def test_the_extrapolation_is_capped_at_the_candidate_spaces_own_maximum():
    """A model sure of one secret: the skew-normal fitted to the candidates would put it far out
    (tens of bits), but a candidate equals the canary with probability 16^-3 under the uniform
    candidate law, so no exposure can pass 12 bits. Rank saturates: reported as ranked first."""
    logp = np.full(16, -20.0)
    logp[0] = 0.0  # word 4: nearly probability 1 after any context
    model = fixed_distribution_model(logp - np.log(np.exp(logp).sum()))
    word_p = np.full(16, 1 / 16)
    secrets = np.array([[4, 4, 4], [5, 6, 7]], dtype=np.int32)
    prefixes = np.array([[8, 9], [8, 9]], dtype=np.int32)
    np.testing.assert_allclose(mz.secret_bits(secrets, word_p), [12.0, 12.0])
    unbounded = mz.exposure_extrapolated(
        mz.log_perplexity(model, prefixes[0], secrets[:1])[0],
        mz.fit_skewnorm(
            mz.log_perplexity(model, prefixes[0], mz.draw_words(np.random.default_rng(1), word_p, (512, 3)))
        ),
    )
    assert unbounded > 12.0  # what the fit alone says
    got = mz.measure(
        model, prefixes, secrets, word_p, references=511, samples=512, beam_width=2, seed=3, bootstrap=5
    )
    assert got["exposure_extrapolated"][0] == pytest.approx(12.0)
    assert got["saturated"][0] and got["exposure"][0] == pytest.approx(9.0)
    assert got["exposure_extrapolated_lo"][0] <= got["exposure_extrapolated_hi"][0] <= 12.0 + 1e-9
    assert not got["saturated"][1] and math.isnan(got["exposure_extrapolated_hi"][1])  # rank is the figure
    assert got["exposure_extrapolated"][1] <= 12.0


def test_the_bootstrap_interval_reaches_the_true_exposure_where_the_fit_is_right():
    """Erring low is the unsafe side of a privacy audit: where the candidates really are skew-normal,
    the interval must contain the true exposure, its upper end above it, out to 22 bits (the
    point estimate alone is up to a bit off there). Where they are not, the fit tends to read low
    above ~12 bits, which no resampling can reveal; reports quote the upper end and say so."""
    from scipy import stats

    a = 4.0
    samples = stats.skewnorm.rvs(a, size=4096, random_state=np.random.default_rng(2))
    for bits in (10.0, 16.0, 22.0):
        canary = float(stats.skewnorm.ppf(2.0**-bits, a))
        fit = mz.fit_skewnorm(samples)
        lo, hi = mz.bootstrap_extrapolated(canary, samples, 99.0, np.random.default_rng(4), 30)
        assert lo < hi
        assert lo <= bits <= hi, (bits, mz.exposure_extrapolated(canary, fit), lo, hi)
        assert lo <= mz.exposure_extrapolated(canary, fit) <= hi


def test_generic_prefixes_bring_up_a_secret_the_model_says_after_anything():
    logp = np.log(np.array([0.6, 0.3, 0.05, 0.05]))  # words 4..7, whatever the context
    model = fixed_distribution_model(logp)
    secrets = np.array([[4, 4], [7, 6]], dtype=np.int32)  # the most likely pair; an unlikely one
    generic = np.array([[5], [6], [7]], dtype=np.int32)
    np.testing.assert_array_equal(mz.generic_extraction(model, generic, secrets, beam_width=2), [3, 0])
    np.testing.assert_array_equal(mz.generic_extraction(model, generic[:0], secrets, beam_width=2), [0, 0])


def train_in_process(cfg, run_dir):
    """A run without Ray (shards in this process), as the memorization notebook runs one."""
    from fleet.phones.population import shard_ranges
    from fleet.round.coordinator import Coordinator
    from fleet.round.shard import ShardCore
    from fleet.runtime.hooks import Run

    run_dir.mkdir(parents=True)
    cfg = mz.prepare(cfg, run_dir)
    pop, state = cfg.fleet.population, str(run_dir / "state")
    shards = [ShardCore(cfg, i, a, b, state_dir=state) for i, (a, b) in enumerate(shard_ranges(pop, 2))]
    coordinator = Coordinator(cfg, shards, pop, state)
    live = Run(cfg, run_dir, weights=coordinator.get_params)
    for r in range(cfg.train.rounds):
        coordinator.run_round()
        live.round = r + 1
        mz.during_training(live)
    coordinator.checkpoint()
    return coordinator


@pytest.mark.slow
def test_positive_control_one_device_canary_is_memorized_without_dp(one_thread, tmp_path):
    """The preset's positive control, shrunk: a canary on ONE phone of 40, each phone training in
    about one round of four, is memorized without DP (far above the never-planted control, most
    ranked first); the exposure track shows it growing over training."""
    cfg = make_cfg(
        *SMALL_NWP,
        "privacy=none",
        "fleet.population=40",
        "fleet.goal=10",
        "train.rounds=150",
        "train.client_lr=1.0",
        "train.server_optimizer=sgd",
        "memorization=secret_sharer",
        "memorization.groups=[{devices:0,repeats:1,canaries:8},{devices:1,repeats:16,canaries:8}]",
        "memorization.references=1023",
        "memorization.samples=1024",
        "memorization.track_every=50",
    )
    validate(cfg)
    train_in_process(cfg, tmp_path / "run")
    result = mz.run_audit(tmp_path / "run", cfg, figures=True)
    control, single = result["groups"]
    assert control["devices"] == 0 and control["times_trained"] == 0
    assert single["devices_trained"] == 8 and single["times_trained"] > 16 * 5
    assert single["above_control"] and single["exposure_lo"] > control["exposure_hi"]
    assert single["exposure"] > 6.0 and single["saturated"] >= 4, result["groups"]  # of 10 bits
    assert control["exposure"] < 4.0
    track = mz.read_track(tmp_path / "run")
    assert track["rounds"] == [50, 100, 150]
    planted = np.array([c["devices"] == 1 for c in result["canaries"]])
    assert track["exposure"][-1, planted].mean() > track["exposure"][0, planted].mean()
    assert (tmp_path / "run" / mz.PLOT_FILE).exists()


def test_comparing_an_audit_from_an_older_fleet_says_to_audit_it_again(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / mz.RESULT_FILE).write_text(json.dumps({"label": "no DP", "max_exposure": 14.0, "groups": []}))
    with pytest.raises(ConfigError, match=f"older fleet.*fleet-audit {old}"):
        mz.compare([old])
