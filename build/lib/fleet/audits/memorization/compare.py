"""Runs side by side (the users x frequency grid by arm), `fleet-audit`'s memorization part and
the sweep's comparison callback."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback

from fleet.audits.memorization.audit import GROUP_FIELDS, run_audit, write_csv
from fleet.audits.memorization.figures import group_name
from fleet.audits.memorization.plan import COMPARE_STEM, GROUPS_FILE, PLOT_FILE, RESULT_FILE, planted
from fleet.audits.memorization.statistics import CHANCE_BITS, TEST
from fleet.config import ConfigError
from fleet.round import checkpoint


def compare(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> dict:
    """Set audited runs side by side: a table by (run, cell) and one plot, written to out_dir
    (default: the runs' common parent, the sweep dir for a multirun) as memorization_compare.*.

    The plot has one column per cell of the users x frequency grid (the control first) and the
    runs side by side in each: mean exposure by rank with its 95% interval.
    """
    results = []
    for d in run_dirs:
        path = Path(d) / RESULT_FILE
        if not path.exists():
            raise ConfigError(f"RUN_DIR: no {RESULT_FILE} in {str(d)!r}; run fleet-audit {d} first")
        result = json.loads(path.read_text())
        if "interval" not in result:
            raise ConfigError(
                f"RUN_DIR: {path} was written by an older fleet (no intervals); "
                f"audit it again with fleet-audit {d}"
            )
        results.append(result)
    results.sort(key=lambda r: ARM_ORDER.get(r.get("arm"), len(ARM_ORDER)))
    out = Path(out_dir) if out_dir else _common_parent([Path(d) for d in run_dirs])
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "run": r["label"],
            "arm": r.get("arm"),
            "recall@1": r.get("recall@1"),
            **{k: g.get(k) for k in GROUP_FIELDS},
        }
        for r in results
        for g in r["groups"]
    ]
    write_csv(out / f"{COMPARE_STEM}.csv", rows)
    compare_figure(results).savefig(out / f"{COMPARE_STEM}.png", dpi=100)
    return {"out_dir": str(out), "rows": rows, "text": compare_text(rows, results)}


ARM_ORDER = {"no DP": 0, "clip only": 1, "DP": 2}


def compare_figure(results: list[dict]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 4.4), layout="constrained")
    ax = fig.subplots()
    cells = [group_name(g) for g in results[0]["groups"]]
    width = 0.8 / max(len(results), 1)
    for i, r in enumerate(results):
        x = np.arange(len(r["groups"])) - 0.4 + width * (i + 0.5)
        mean = np.array([g["exposure"] for g in r["groups"]])
        lo = np.array([g["exposure_lo"] for g in r["groups"]], dtype=float)  # None: NaN, no bar
        hi = np.array([g["exposure_hi"] for g in r["groups"]], dtype=float)
        lo, hi = np.where(np.isnan(lo), mean, lo), np.where(np.isnan(hi), mean, hi)
        recall = f", recall@1 {r['recall@1']:.3f}" if r.get("recall@1") is not None else ""
        ax.errorbar(
            x,
            mean,
            yerr=[mean - lo, hi - mean],
            fmt="o",
            capsize=3,
            color=f"C{i}",
            label=f"{r['label']}{recall}",
        )
        for xi, g in zip(x, r["groups"], strict=True):
            if g["extracted"]:
                label = f"{g['extracted']}/{g['canaries']}"
                ax.annotate(label, (xi, g["exposure"]), textcoords="offset points", xytext=(3, 6), fontsize=7)
    top = max(r["max_exposure"] for r in results)
    ax.axhline(top, color="0.5", ls="--", lw=1)
    ax.axhline(CHANCE_BITS, color="0.5", ls=":", lw=1)
    ax.set_xticks(np.arange(len(cells)), cells, rotation=20, fontsize=8)
    ax.set(ylabel="mean exposure by rank (bits), 95% interval", ylim=(-0.5, top + 1.5))
    ax.set_title("canary exposure by cell (dashed: log2|R|; dotted: chance; labels: extracted)", fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    return fig


def _common_parent(dirs: list[Path]) -> Path:
    import os

    common = Path(os.path.commonpath([d.resolve() for d in dirs]))
    return common.parent if len(dirs) == 1 else common


def _interval(r: dict) -> str:
    if r["exposure_lo"] is None:
        return f"{r['exposure']:5.2f}"
    return f"{r['exposure']:5.2f} [{r['exposure_lo']:5.2f}, {r['exposure_hi']:5.2f}]"


def compare_text(rows: list[dict], results: list[dict] | None = None) -> str:
    """The comparison as a fixed-width table, one line per (run, cell), then what it rests on."""
    head = (
        f"{'run':<26} {'recall':>6} {'cell':<13} {'devices':>9} {'examples':>15} "
        f"{'exposure [95% interval]':>24} {'p vs ctrl':>9} {'rank 1':>6} {'extr':>5} {'generic':>7} "
        f"{'extrap hi':>9}"
    )
    lines = [head]
    for r in rows:
        recall = f"{r['recall@1']:.3f}" if r.get("recall@1") is not None else "-"
        trained = "-" if r["devices_trained"] is None else r["devices_trained"]
        devices = f"{trained}/{r['devices_planned']}"
        done = "-" if r["times_trained"] is None else f"{r['times_trained']:.0f}"
        examples = f"{done} ({r['insertions']:.0f})"
        p = (
            "-"
            if r["p_vs_control"] is None
            else f"{r['p_vs_control']:.3g}" + ("*" if r["above_control"] else "")
        )
        hi = "-" if r["exposure_extrapolated_hi"] is None else f"{r['exposure_extrapolated_hi']:.1f}"
        lines.append(
            f"{r['run'][:26]:<26} {recall:>6} {group_name(r):<13} {devices:>9} {examples:>15} "
            f"{_interval(r):>24} {p:>9} {r['saturated']:>3}/{r['canaries']:<2} "
            f"{r['extracted']:>2}/{r['canaries']:<2} {r['generic_hits']:>4}/{r['canaries']:<2} {hi:>9}"
        )
    lines.append(
        "devices: trained at least once / planned; examples: canary examples trained on (one pass of every "
        "planted device), per canary; p: " + TEST + " (* below 0.05); rank 1: canaries ranked first, whose "
        "exposure is only >= log2|R|; extrap hi: the highest bootstrap upper end of their extrapolation."
    )
    if results:
        r0 = results[0]
        lines.append(
            f"|R| = {r0['references'] + 1:,} sampled of {r0.get('secret_space', 'the candidate space')}; "
            f"max exposure by rank log2|R| = {r0['max_exposure']:.2f} bits; chance {CHANCE_BITS:.2f} bits."
        )
    return "\n".join(lines)


def summary_text(result: dict) -> str:
    """One run's audit by cell, for the console."""
    rows = [{"run": result["label"], "recall@1": result.get("recall@1"), **g} for g in result["groups"]]
    return compare_text(rows, [result])


def cli(run_dir: Path, args: Any) -> int:
    """`fleet-audit RUN_DIR [--compare RUN_DIR...]`: audit a run (again), or compare runs.

    Alone, RUN_DIR's final model is audited and the table printed. With --compare, runs that
    have no memorization.json yet are audited first, then all are set side by side in their
    common parent (the sweep dir of a multirun).
    """
    from fleet.config import config_from_dict

    others = [Path(d) for d in (getattr(args, "compare", None) or [])]
    figures = not getattr(args, "no_figures", False)
    for d in [run_dir, *others]:
        if others and (d / RESULT_FILE).exists() and "interval" in json.loads((d / RESULT_FILE).read_text()):
            continue  # audited already, by this version (an older file is audited again)
        config_file = d / checkpoint.CONFIG_FILE
        if not config_file.exists():
            raise ConfigError(f"RUN_DIR: no {checkpoint.CONFIG_FILE} in {str(d)!r} (not a fleet run)")
        cfg = config_from_dict(json.loads(config_file.read_text()))
        if not planted(cfg):
            raise ConfigError(f"RUN_DIR: {str(d)!r} was trained without canaries (memorization=none)")
        result = run_audit(d, cfg, figures=figures)
        if not others:
            print(summary_text(result))
            print(f"written to {d / RESULT_FILE}, {GROUPS_FILE}" + (f", {PLOT_FILE}" if figures else ""))
    if others:
        out = compare([run_dir, *others])
        print(out["text"])
        print(f"written to {Path(out['out_dir']) / COMPARE_STEM}.csv and .png")
    return 0


class CompareSweep(Callback):
    """Hydra callback: when a multirun ends, compare the audited runs in its sweep dir.

    The `memorization` experiment registers it, so `fleet-train experiment=memorization
    --multirun` leaves SWEEP_DIR/memorization_compare.{csv,png} and prints the table and the
    sweep's wall time (the preset promises a bound on it).
    """

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        runs = sorted((p.parent for p in sweep.glob(f"*/{RESULT_FILE}")), key=lambda p: p.name)
        if runs:
            print(compare(runs, sweep)["text"])
            print(f"comparison written to {sweep / COMPARE_STEM}.csv and .png")
        if hasattr(self, "started"):
            print(f"sweep wall time: {time.perf_counter() - self.started:.0f} s ({len(runs)} audited runs)")
