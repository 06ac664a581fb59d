"""The audit of a trained run: every canary measured, with how often its devices trained."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from fleet import rng
from fleet.atomic import atomic_write_bytes
from fleet.audits.memorization.figures import log_to_wandb, memorization_figures
from fleet.audits.memorization.plan import (
    AUDIT_STREAM,
    GROUPS_FILE,
    PLOT_FILE,
    RESULT_FILE,
    plan_file,
    word_distribution,
)
from fleet.audits.memorization.scoring import measure
from fleet.config import ConfigError
from fleet.learning.data.canaries import CanaryPlan
from fleet.round import checkpoint


def load_weights(run_dir: Path) -> tuple[np.ndarray, int]:
    """The final server weights of a run (its last checkpoint) and that checkpoint's round."""
    saved = checkpoint.load_coordinator(run_dir / checkpoint.STATE_DIR)
    if saved is None:
        raise ConfigError(f"RUN_DIR: no checkpoint in {str(run_dir)!r} (state/{checkpoint.COORDINATOR_FILE})")
    return np.asarray(saved["server"]["weights"], dtype=np.float32), int(saved["round"])


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


def run_audit(run_dir: str | Path, cfg: Any, figures: bool = True) -> dict:
    """Audit the final model of a run with canaries; writes memorization.json/.csv/.png there.

    R, the samples and the beam width are cfg.memorization's (change them on a copy of the
    run's config to audit again differently). When a W&B run is active (the end of
    `fleet.runtime.driver.train`), the figures and a few aggregates are logged to it. Returns the result.
    """
    from fleet.atomic import write_json
    from fleet.learning.data.corpus import make_corpus
    from fleet.learning.model import build_model, set_flat

    run_dir = Path(run_dir)
    m = cfg.memorization
    references, samples, beam_width = m.references, m.samples, m.beam_width
    plan = CanaryPlan.load(plan_file(run_dir))
    weights, committed = load_weights(run_dir)
    model = build_model(cfg.model)
    set_flat(model, weights)
    model.eval()
    corpus = make_corpus(cfg)
    vocab = corpus.vocab()

    seed = int(np.random.SeedSequence([cfg.seed, rng.stream_id(AUDIT_STREAM)]).generate_state(1)[0])
    word_p = word_distribution(corpus, m.secret_dist)
    got = measure(model, plan.prefixes, plan.secrets, word_p, references, samples, beam_width, seed)
    trained = times_trained(run_dir, plan.device_rows, committed)
    devices, insertions = plan.devices(), plan.insertions()

    def words(ids: np.ndarray) -> str:
        return " ".join(vocab[int(i)] for i in ids)

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
            "exposure_extrapolated": float(got["exposure_extrapolated"][c]),
            "extracted": bool(got["extracted"][c]),
            "extracted_top_b": bool(got["extracted_top_b"][c]),
            "prefix": words(plan.prefixes[c]),
            "secret": words(plan.secrets[c]),
            "top_beam": words(got["top_beam"][c]),
        }
        if trained is not None:
            mine = plan.device_canary == c
            row["devices_trained"] = int(np.count_nonzero(trained[mine]))
            row["times_trained"] = int((trained[mine] * plan.device_insertions[mine]).sum())
        canaries.append(row)
    result = {
        "run_dir": str(run_dir),
        "label": run_label(run_dir, cfg),
        "round": committed,
        "references": references,
        "max_exposure": math.log2(references + 1),
        "samples": samples,
        "beam_width": beam_width,
        "secret_words": int(plan.secrets.shape[1]),
        "secret_dist": m.secret_dist,
        "canaries": canaries,
        "groups": group_table(canaries),
    }
    write_json(run_dir / RESULT_FILE, result)
    write_csv(run_dir / GROUPS_FILE, result["groups"])
    if figures:
        figs = memorization_figures(result)
        figs["memorization/exposure"].savefig(run_dir / PLOT_FILE, dpi=100)
        log_to_wandb(result, figs)
    return result


GROUP_FIELDS = (
    "group",
    "devices",
    "repeats",
    "prob",
    "canaries",
    "insertions",
    "times_trained",
    "log_perplexity",
    "exposure",
    "exposure_min",
    "exposure_max",
    "exposure_extrapolated",
    "extracted",
    "extracted_top_b",
)


def group_table(canaries: list[dict]) -> list[dict]:
    """One row per group (`GROUP_FIELDS`): its setting, mean exposures, how many were extracted.

    times_trained (canary examples the fleet trained on, mean per canary) is None when the run's
    checkpoint lacks the shards' participation state.
    """
    out = []
    for g in sorted({c["group"] for c in canaries}):
        rows = [c for c in canaries if c["group"] == g]
        row = {
            "group": g,
            "devices": rows[0]["devices"],
            "repeats": rows[0]["repeats"],
            "prob": rows[0]["prob"],
            "canaries": len(rows),
            "insertions": float(np.mean([c["insertions"] for c in rows])),
            "log_perplexity": float(np.mean([c["log_perplexity"] for c in rows])),
            "exposure": float(np.mean([c["exposure"] for c in rows])),
            "exposure_min": float(np.min([c["exposure"] for c in rows])),
            "exposure_max": float(np.max([c["exposure"] for c in rows])),
            "exposure_extrapolated": float(np.mean([c["exposure_extrapolated"] for c in rows])),
            "extracted": sum(c["extracted"] for c in rows),
            "extracted_top_b": sum(c["extracted_top_b"] for c in rows),
            "times_trained": (
                float(np.mean([c["times_trained"] for c in rows])) if "times_trained" in rows[0] else None
            ),
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


def run_label(run_dir: Path, cfg: Any) -> str:
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
    return f"{cfg.privacy.name} z={cfg.privacy.noise_multiplier:g}" + (f" eps={eps:.3g}" if eps else "")
