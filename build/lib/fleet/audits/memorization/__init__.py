"""Memorization audit: secret-sharer canaries planted in the fleet, exposure and extraction.

Ramaswamy et al. (2020) measured what a production model memorizes by planting canaries in users'
data and auditing the trained model (Carlini et al. 2019, "The Secret Sharer"; Thakkar et al.
2021). This package does the same to the emulated fleet, in three parts:

- **The plan** (`make_plan`, written by `prepare` to RUN_DIR/canaries/plan.npz before the actors
  start). Each canary is a prefix and `secret_words` random secret words; each group's canaries
  go to `devices` devices of their own, chosen uniformly (seeded, by population row) among the
  fleet's eligible devices that hold enough examples to carry `repeats` copies. The plan names
  devices, so it lives in its own file: never in the coordinator, the metrics, the summary or
  W&B. Shards read it; the server never does.
- **Planting** (`CanaryCorpus`): a FederatedCorpus wrapping the real one (synthetic or Arrow),
  substituting canary sequences into the planted devices' examples as they are read, so nothing
  on disk is rewritten and an unplanted device reads exactly what it read before.
- **The audit** (`run_audit`, run when training ends and by `fleet-audit RUN_DIR`): for each canary,
  its log-perplexity (bits over the secret given the prefix), its exposure by rank among R fresh
  candidates, its exposure extrapolated from a skew-normal fitted to sampled candidates, and
  whether beam search from the prefix (and from a few generic prefixes) extracts the secret;
  by cell, the mean with its 95% interval and a test against a control group never planted.
  Candidates are scored by batched forward passes that start from the prefix's state (computed
  once per prefix), and log-probs are gathered, never looped over in Python. Written to
  RUN_DIR/memorization.json, a CSV by group and a plot; `compare` (and `fleet-audit RUN_DIR
  --compare OTHER...`, and the `CompareSweep` Hydra callback of the `memorization` experiment)
  sets runs side by side.

Exposure by rank: the canary is ranked among itself and R fresh candidates of the same format
(same prefix, secrets drawn as the canary's was), so |R| = R + 1 and exposure = log2|R| - log2
rank, rank = 1 + the number of candidates with lower log-perplexity: 0 for a canary the model
finds least likely, log2(R + 1) for one it prefers to every candidate. A canary ranked first is
reported as ">= log2|R|"; the skew-normal extrapolation then is the figure, capped at the
candidate space's own maximum (-log2 of the secret's probability) and given a bootstrap interval.
`during_training` (a driver hook) records rank exposure every `track_every` rounds.
"""

from fleet.audits.memorization.audit import group_table, load_weights, run_audit, times_trained
from fleet.audits.memorization.compare import CompareSweep, cli, compare, summary_text
from fleet.audits.memorization.figures import memorization_figures
from fleet.audits.memorization.plan import (
    AUDIT_STREAM,
    COMPARE_STEM,
    GROUPS_FILE,
    PLAN_DIR,
    PLAN_FILE,
    PLOT_FILE,
    RESULT_FILE,
    draw_words,
    make_plan,
    plan_file,
    planted,
    prepare,
    word_distribution,
)
from fleet.audits.memorization.scoring import (
    beam_search,
    bootstrap_extrapolated,
    exposure_by_rank,
    exposure_extrapolated,
    fit_skewnorm,
    generic_extraction,
    log_perplexity,
    measure,
    secret_bits,
)
from fleet.audits.memorization.statistics import CHANCE_BITS, above_control, mean_interval
from fleet.audits.memorization.track import TRACK_FILE, during_training, read_track
from fleet.config import Config
from fleet.learning.data.canaries import CanaryCorpus, CanaryPlan


def before_start(run) -> Config:
    """Hook: write the canary plan the shards read (RUN_DIR/canaries/), if canaries are planted;
    the actors get the config that names it."""
    return prepare(run.cfg, run.run_dir)


def after_training(run) -> None:
    """Hook: audit the canaries when training ends (fleet-audit RUN_DIR does it again)."""
    if planted(run.cfg) and run.cfg.memorization.audit:
        run_audit(run.run_dir, run.cfg, summary=run.summary)


__all__ = [
    "AUDIT_STREAM",
    "CHANCE_BITS",
    "TRACK_FILE",
    "above_control",
    "bootstrap_extrapolated",
    "during_training",
    "generic_extraction",
    "mean_interval",
    "read_track",
    "secret_bits",
    "after_training",
    "before_start",
    "COMPARE_STEM",
    "GROUPS_FILE",
    "PLAN_DIR",
    "PLAN_FILE",
    "PLOT_FILE",
    "RESULT_FILE",
    "CanaryCorpus",
    "CanaryPlan",
    "CompareSweep",
    "beam_search",
    "cli",
    "compare",
    "draw_words",
    "exposure_by_rank",
    "exposure_extrapolated",
    "fit_skewnorm",
    "group_table",
    "load_weights",
    "log_perplexity",
    "make_plan",
    "measure",
    "memorization_figures",
    "plan_file",
    "planted",
    "prepare",
    "run_audit",
    "summary_text",
    "times_trained",
    "word_distribution",
]
