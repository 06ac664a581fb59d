"""Exposure over training: the canaries' rank exposure every `memorization.track_every` rounds.

The final audit says what the model memorized; this says when. Every k rounds the
driver hands the released weights to `during_training`, which ranks each canary among a small
fixed set of `track_references` fresh candidates (the same set each time, so the curve moves
only with the model) and appends one line to RUN_DIR/memorization_track.jsonl. The plan, which
names devices, is read here on the driver's side, as the final audit reads it; the coordinator
never sees it, and the file holds exposures by canary index only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleet import rng
from fleet.audits.memorization.plan import draw_words, plan_file, planted, word_distribution
from fleet.audits.memorization.scoring import exposure_by_rank, log_perplexity, one_thread
from fleet.config import Config
from fleet.learning.data.canaries import CanaryPlan

TRACK_FILE = "memorization_track.jsonl"
TRACK_PLOT_FILE = "memorization_track.png"
TRACK_STREAM = "canary_track"


@dataclass
class _Tracker:
    plan: CanaryPlan
    candidates: np.ndarray  # (track_references, secret_words), drawn once


_TRACKERS: dict[str, _Tracker] = {}


def _tracker(run_dir: Path, cfg: Config) -> _Tracker:
    key = str(run_dir)
    if key not in _TRACKERS:
        from fleet.learning.data.corpus import make_corpus

        plan = CanaryPlan.load(plan_file(run_dir))
        word_p = word_distribution(make_corpus(cfg), cfg.memorization.secret_dist)
        g = np.random.default_rng([cfg.seed, rng.stream_id(TRACK_STREAM)])
        candidates = draw_words(g, word_p, (cfg.memorization.track_references, plan.secrets.shape[1]))
        _TRACKERS[key] = _Tracker(plan, candidates)
    return _TRACKERS[key]


@one_thread
def track_exposures(model: Any, plan: CanaryPlan, candidates: np.ndarray) -> np.ndarray:
    """Each canary's rank exposure among `candidates` under the model."""
    out = np.zeros(plan.num_canaries)
    unique, which = np.unique(plan.prefixes, axis=0, return_inverse=True)
    which = np.asarray(which).reshape(-1)
    for u, prefix in enumerate(unique):
        mine = np.flatnonzero(which == u)
        cand = log_perplexity(model, prefix, candidates)
        for c, lp in zip(mine, log_perplexity(model, prefix, plan.secrets[mine]), strict=True):
            out[c] = exposure_by_rank(float(lp), cand)[1]
    return out


def during_training(run: Any) -> None:
    """Hook, after every logged round: every track_every rounds, one line of exposures."""
    m = run.cfg.memorization
    if not planted(run.cfg) or m.track_every <= 0 or run.round % m.track_every or run.weights is None:
        return
    from fleet.learning.model import build_model, set_flat

    t = _tracker(Path(run.run_dir), run.cfg)
    model = build_model(run.cfg.model)
    set_flat(model, np.asarray(run.weights(), dtype=np.float32))
    model.eval()
    exposures = track_exposures(model, t.plan, t.candidates)
    line = {
        "round": int(run.round),
        "references": len(t.candidates),
        "exposure": [round(float(e), 4) for e in exposures],
    }
    with open(Path(run.run_dir) / TRACK_FILE, "a") as f:
        f.write(json.dumps(line) + "\n")


def read_track(run_dir: str | Path) -> dict:
    """{"rounds": [...], "exposure": (rounds, canaries) array, "max_exposure"}; the last line of
    a round wins (a resumed run scores its re-run rounds again). Empty rounds when not tracked."""
    path = Path(run_dir) / TRACK_FILE
    by_round: dict[int, dict] = {}
    if path.exists():
        for text in path.read_text().splitlines():
            try:
                line = json.loads(text)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash
            by_round[int(line["round"])] = line
    rounds = sorted(by_round)
    if not rounds:
        return {"rounds": [], "exposure": np.zeros((0, 0)), "max_exposure": math.nan}
    return {
        "rounds": rounds,
        "exposure": np.array([by_round[r]["exposure"] for r in rounds], dtype=np.float64),
        "max_exposure": math.log2(by_round[rounds[-1]]["references"] + 1),
    }
