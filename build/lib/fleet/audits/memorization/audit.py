"""The audit of a trained run: every canary measured, with how often its devices trained."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fleet import rng
from fleet.atomic import JSON_INF, atomic_write_bytes
from fleet.audits.memorization.figures import log_to_wandb, memorization_figures
from fleet.audits.memorization.plan import (
    AUDIT_STREAM,
    GROUPS_FILE,
    PLOT_FILE,
    RESULT_FILE,
    draw_words,
    plan_file,
    word_distribution,
)
from fleet.audits.memorization.scoring import measure
from fleet.audits.memorization.statistics import ALPHA, INTERVAL, TEST, above_control, mean_interval
from fleet.audits.memorization.track import TRACK_PLOT_FILE, read_track
from fleet.config import Config, ConfigError
from fleet.learning.data.canaries import CanaryPlan
from fleet.learning.data.vocab import NUM_SPECIAL
from fleet.round import checkpoint


def load_weights(run_dir: Path) -> tuple[np.ndarray, int]:
    """The released model of a run's last checkpoint (whatever the mechanism) and its round."""
    saved = checkpoint.load_coordinator(run_dir / checkpoint.STATE_DIR)
    if saved is None:
        raise ConfigError(f"RUN_DIR: no checkpoint in {str(run_dir)!r} (state/{checkpoint.COORDINATOR_FILE})")
    return checkpoint.released_model(saved), int(saved["round"])


def times_trained(run_dir: Path, rows: np.ndarray, committed: int) -> np.ndarray | None:
    """How many rounds each planted row trained in, from the shards' checkpoint (None if absent).

    The same row-aligned state the participation audit reads; only counts per canary leave it.
    """
    state_dir = run_dir / checkpoint.STATE_DIR
    name = re.compile(rf"shard_(\d+)_(\d+)_r{committed}\.npz")
    out = np.full(len(rows), -1, dtype=np.int64)
    for p in state_dir.glob(f"shard_*_r{committed}.npz"):
        m = name.fullmatch(p.name)
        if m is None:
            continue
        start, stop = int(m.group(1)), int(m.group(2))
        state = checkpoint.load_shard(state_dir, start, stop, committed)
        inside = (rows >= start) & (rows < stop)
        out[inside] = state["participations"][rows[inside] - start]
    return None if np.any(out < 0) else out


def generic_prefixes(word_p: np.ndarray, plan: CanaryPlan, count: int, seed: int) -> np.ndarray:
    """`count` prefixes no canary has: the most frequent words first, then seeded random draws.

    Prefixes have the canaries' length; with a shared configured prefix the generic ones are
    single words instead (any of the same length would be the canaries' own).
    """
    m = plan.prefixes.shape[1]
    if count <= 0:
        return np.zeros((0, m), dtype=np.int32)
    g = np.random.default_rng([seed, 1])
    top = (np.argsort(-word_p)[:m] + NUM_SPECIAL).astype(np.int32)[None, :]
    rows = np.concatenate([top, draw_words(g, word_p, (4 * count, m))])
    own = {tuple(p) for p in plan.prefixes.tolist()}
    keep = [r for r in rows if tuple(r.tolist()) not in own]
    return np.unique(np.asarray(keep[:count], dtype=np.int32), axis=0)


def secret_space(corpus: Any, dist: str, words: int) -> str:
    """The true candidate space, in words: what the sampled |R| stands for."""
    v = corpus.vocab_size
    law = "the corpus unigram" if dist == "unigram" else "uniformly"
    return f"{words} words drawn i.i.d. from {law} over {v} words ({float(v) ** words:.3g} sequences)"


def final_recall(run_dir: Path, summary: dict | None) -> float | None:
    """recall@1 of the final model: from the run's summary (at the end of training, passed in),
    or summary.json when a finished run is audited again."""
    if summary is None and (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
    value = ((summary or {}).get("final") or {}).get("recall@1")
    return None if value is None else float(value)


def run_audit(run_dir: str | Path, cfg: Config, figures: bool = True, summary: dict | None = None) -> dict:
    """Audit the final model of a run with canaries; writes memorization.json/.csv/.png there.

    R, the samples, the bootstrap and the beam width are cfg.memorization's (change them on a
    copy of the run's config to audit again differently). When a W&B run is active (the end of
    `fleet.runtime.driver.train`), the figures and a few aggregates are logged to it. `summary`,
    the run's own (or summary.json), gives the model's recall to set beside the exposures.
    """
    from fleet.learning.data.corpus import make_corpus

    run_dir = Path(run_dir)
    m = cfg.memorization
    plan = CanaryPlan.load(plan_file(run_dir))
    model, committed = _released_model(run_dir, cfg)
    corpus = make_corpus(cfg)
    vocab = corpus.vocab()

    seed = int(np.random.SeedSequence([cfg.seed, rng.stream_id(AUDIT_STREAM)]).generate_state(1)[0])
    word_p = word_distribution(corpus, m.secret_dist)
    generic = generic_prefixes(word_p, plan, m.generic_prefixes, seed)
    got = measure(
        model, plan.prefixes, plan.secrets, word_p, m.references, m.samples, m.beam_width, seed,
        bootstrap=m.bootstrap, generic_prefixes=generic,
    )  # fmt: skip
    trained = times_trained(run_dir, plan.device_rows, committed)

    def words(ids: np.ndarray) -> str:
        return " ".join(vocab[int(i)] for i in ids)

    canaries = _canary_rows(plan, got, trained, words)
    result = {
        "run_dir": str(run_dir),
        "label": run_label(run_dir, cfg),
        "arm": arm(cfg),
        "round": committed,
        "recall@1": final_recall(run_dir, summary),
        "references": m.references,
        "max_exposure": math.log2(m.references + 1),
        "samples": m.samples,
        "bootstrap": m.bootstrap,
        "beam_width": m.beam_width,
        "generic_prefixes": [words(p) for p in generic],
        "secret_words": int(plan.secrets.shape[1]),
        "secret_dist": m.secret_dist,
        "secret_space": secret_space(corpus, m.secret_dist, int(plan.secrets.shape[1])),
        "interval": INTERVAL,
        "test": TEST,
        "canaries": canaries,
        "groups": group_table(canaries),
    }
    _write_outputs(run_dir, result, figures)
    return result


def _released_model(run_dir: Path, cfg: Config) -> tuple[Any, int]:
    """The model the run released at its last checkpoint, in eval mode, and that round: what the
    canaries are scored against."""
    from fleet.learning.model import build_model, set_flat

    weights, committed = load_weights(run_dir)
    model = build_model(cfg.model)
    set_flat(model, weights)
    model.eval()
    return model, committed


def _canary_rows(
    plan: CanaryPlan,
    got: dict[str, np.ndarray],
    trained: np.ndarray | None,
    words: Callable[[np.ndarray], str],
) -> list[dict]:
    """One JSON row per canary: its plan, its scores from `measure` and (when the shards' state
    is in the checkpoint) how often its devices trained; NaN bounds become None for JSON."""
    devices, insertions = plan.devices(), plan.insertions()

    def number(x: float) -> float | None:
        return None if math.isnan(x) else float(x)

    canaries = []
    for c in range(plan.num_canaries):
        row = {
            "canary": c,
            "group": int(plan.group[c]),
            "devices": int(devices[c]),
            "repeats": int(plan.repeats[c]) if plan.repeats[c] else None,
            "prob": float(plan.prob[c]) if not plan.repeats[c] else None,
            "insertions": int(insertions[c]),
            "log_perplexity": float(got["log_perplexity"][c]),
            "rank": int(got["rank"][c]),
            "exposure": float(got["exposure"][c]),
            "saturated": bool(got["saturated"][c]),
            "exposure_extrapolated": float(got["exposure_extrapolated"][c]),
            "exposure_extrapolated_lo": number(got["exposure_extrapolated_lo"][c]),
            "exposure_extrapolated_hi": number(got["exposure_extrapolated_hi"][c]),
            "exposure_cap": float(got["exposure_cap"][c]),
            "extracted": bool(got["extracted"][c]),
            "extracted_top_b": bool(got["extracted_top_b"][c]),
            "generic_hits": int(got["generic_hits"][c]),
            "prefix": words(plan.prefixes[c]),
            "secret": words(plan.secrets[c]),
            "top_beam": words(got["top_beam"][c]),
        }
        if trained is not None:
            mine = plan.device_canary == c
            row["devices_trained"] = int(np.count_nonzero(trained[mine]))
            row["times_trained"] = int((trained[mine] * plan.device_insertions[mine]).sum())
        canaries.append(row)
    return canaries


def _write_outputs(run_dir: Path, result: dict, figures: bool) -> None:
    """The audit's files in the run dir (JSON, group CSV, and unless `figures` is off the plots,
    also logged to an active W&B run)."""
    from fleet.atomic import write_json

    write_json(run_dir / RESULT_FILE, result)
    write_csv(run_dir / GROUPS_FILE, result["groups"])
    if figures:
        figs = memorization_figures(result, read_track(run_dir))
        figs["memorization/exposure"].savefig(run_dir / PLOT_FILE, dpi=100)
        if "memorization/over_training" in figs:
            figs["memorization/over_training"].savefig(run_dir / TRACK_PLOT_FILE, dpi=100)
        log_to_wandb(result, figs)


GROUP_FIELDS = (
    "group",
    "devices",
    "repeats",
    "prob",
    "canaries",
    "devices_planned",
    "devices_trained",
    "insertions",
    "times_trained",
    "log_perplexity",
    "exposure",
    "exposure_lo",
    "exposure_hi",
    "exposure_min",
    "exposure_max",
    "saturated",
    "p_vs_control",
    "above_control",
    "exposure_extrapolated",
    "exposure_extrapolated_hi",
    "extracted",
    "extracted_top_b",
    "generic_hits",
)


def group_table(canaries: list[dict]) -> list[dict]:
    """One row per group (`GROUP_FIELDS`): its setting, planned against trained, the mean exposure
    by rank with its 95% interval, the test against the control group, extractions.

    devices_planned/devices_trained: devices holding the group's canaries, and how many of them
    trained at least once; insertions (planned canary examples, one pass of every device) against
    times_trained (canary examples the fleet trained on), both means per canary; the trained
    figures are None when the run's checkpoint lacks the shards' participation state. The
    control group (devices 0) has no test against itself. exposure_extrapolated_hi is the highest
    bootstrap upper end among the group's saturated canaries (None when none saturated).
    """
    control = np.array([c["exposure"] for c in canaries if c["devices"] == 0])
    out = []
    for g in sorted({c["group"] for c in canaries}):
        rows = [c for c in canaries if c["group"] == g]
        exposures = np.array([c["exposure"] for c in rows])
        mean, lo, hi = mean_interval(exposures)
        is_control = rows[0]["devices"] == 0
        p = math.nan if is_control else above_control(exposures, control)
        highs = [c["exposure_extrapolated_hi"] for c in rows if c.get("exposure_extrapolated_hi") is not None]
        has_trained = "times_trained" in rows[0]
        row = {
            "group": g,
            "devices": rows[0]["devices"],
            "repeats": rows[0]["repeats"],
            "prob": rows[0]["prob"],
            "canaries": len(rows),
            "devices_planned": sum(c["devices"] for c in rows),
            "devices_trained": sum(c["devices_trained"] for c in rows) if has_trained else None,
            "insertions": float(np.mean([c["insertions"] for c in rows])),
            "times_trained": float(np.mean([c["times_trained"] for c in rows])) if has_trained else None,
            "log_perplexity": float(np.mean([c["log_perplexity"] for c in rows])),
            "exposure": mean,
            "exposure_lo": None if math.isnan(lo) else lo,
            "exposure_hi": None if math.isnan(hi) else hi,
            "exposure_min": float(exposures.min()),
            "exposure_max": float(exposures.max()),
            "saturated": sum(c.get("saturated", False) for c in rows),
            "p_vs_control": None if math.isnan(p) else p,
            "above_control": None if math.isnan(p) else bool(p < ALPHA),
            "exposure_extrapolated": float(np.mean([c["exposure_extrapolated"] for c in rows])),
            "exposure_extrapolated_hi": max(highs) if highs else None,
            "extracted": sum(c["extracted"] for c in rows),
            "extracted_top_b": sum(c["extracted_top_b"] for c in rows),
            "generic_hits": sum(c.get("generic_hits", 0) > 0 for c in rows),
        }
        out.append({k: row[k] for k in GROUP_FIELDS})
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_bytes(path, buf.getvalue().encode())


def arm(cfg: Config) -> str:
    """The arm of the comparison a run is: no DP, clipping alone (z = 0), or DP with noise."""
    if not cfg.privacy.enabled:
        return "no DP"
    return "clip only" if cfg.privacy.noise_multiplier == 0 else "DP"


def run_label(run_dir: Path, cfg: Config) -> str:
    """`no DP`, or the privacy option, noise multiplier and the last epsilon in metrics.jsonl
    (the audit at the end of training runs before summary.json is written)."""
    if not cfg.privacy.enabled:
        return "no DP"
    eps = None
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for text in metrics.read_text().splitlines():
            try:
                eps = json.loads(text).get("epsilon") or eps
            except json.JSONDecodeError:
                break  # a torn last line from a crash
    if eps is not None and eps >= JSON_INF:
        return f"{cfg.privacy.name} z={cfg.privacy.noise_multiplier:g} eps=inf"
    return f"{cfg.privacy.name} z={cfg.privacy.noise_multiplier:g}" + (f" eps={eps:.3g}" if eps else "")
