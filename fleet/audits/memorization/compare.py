"""Runs side by side, `fleet-audit`'s memorization part and the sweep's comparison callback."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from fleet.audits.memorization.audit import GROUP_FIELDS, run_audit, write_csv
from fleet.audits.memorization.figures import _exposure_axes
from fleet.audits.memorization.plan import COMPARE_STEM, GROUPS_FILE, PLOT_FILE, RESULT_FILE, planted
from fleet.config import ConfigError
from fleet.round import checkpoint


def compare(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> dict:
    """Set audited runs side by side: a table by (run, group) and one plot, written to out_dir
    (default: the runs' common parent, the sweep dir for a multirun) as memorization_compare.*."""
    results = []
    for d in run_dirs:
        path = Path(d) / RESULT_FILE
        if not path.exists():
            raise ConfigError(f"RUN_DIR: no {RESULT_FILE} in {str(d)!r}; run fleet-audit {d} first")
        results.append(json.loads(path.read_text()))
    out = Path(out_dir) if out_dir else _common_parent([Path(d) for d in run_dirs])
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"run": r["label"], **{k: g.get(k) for k in GROUP_FIELDS}} for r in results for g in r["groups"]]
    write_csv(out / f"{COMPARE_STEM}.csv", rows)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, r in enumerate(results):
        gs = r["groups"]
        x = [max(g["insertions"], 1) for g in gs]
        ax.plot(x, [g["exposure"] for g in gs], "o-", color=f"C{i}", label=f"{r['label']}: rank")
        y_ext = [g["exposure_extrapolated"] for g in gs]
        ax.plot(x, y_ext, "x:", color=f"C{i}", label=f"{r['label']}: skew-normal")
        for g in gs:
            if g["extracted"]:
                ax.annotate(
                    f"{g['extracted']}/{g['canaries']}",
                    (max(g["insertions"], 1), g["exposure"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                    color=f"C{i}",
                )
    highest = max(g["exposure_extrapolated"] for r in results for g in r["groups"])
    _exposure_axes(ax, max(r["max_exposure"] for r in results), highest)
    ax.set_title("mean canary exposure by group (labels: canaries extracted)")
    ax.legend(loc="upper left", fontsize=8)
    fig.savefig(out / f"{COMPARE_STEM}.png", dpi=100)
    return {"out_dir": str(out), "rows": rows, "text": compare_text(rows)}


def _common_parent(dirs: list[Path]) -> Path:
    import os

    common = Path(os.path.commonpath([d.resolve() for d in dirs]))
    return common.parent if len(dirs) == 1 else common


def compare_text(rows: list[dict]) -> str:
    """The comparison as a fixed-width table, one line per (run, group)."""
    cols = ("devices", "repeats", "inserted", "exposure", "extrap", "extracted")
    lines = [f"{'run':<28} " + " ".join(f"{c:>{max(len(c), 7)}}" for c in cols)]
    for r in rows:
        rep = r["repeats"] if r["repeats"] is not None else f"p={r['prob']:g}"
        lines.append(
            f"{r['run'][:28]:<28} {r['devices']:>7} {rep!s:>7} {r['insertions']:>8.0f} {r['exposure']:>8.2f} "
            f"{r['exposure_extrapolated']:>7.2f} {r['extracted']:>4}/{r['canaries']:<4}"
        )
    return "\n".join(lines)


def summary_text(result: dict) -> str:
    """One run's audit by group, for the console."""
    rows = [{"run": result["label"], **g} for g in result["groups"]]
    return compare_text(rows) + f"\n(max exposure log2|R| = {result['max_exposure']:.2f} bits)"


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
        if others and (d / RESULT_FILE).exists():
            continue
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

    The `memorization` experiment registers it, so `fleet-train +experiment=memorization
    --multirun` leaves SWEEP_DIR/memorization_compare.{csv,png} and prints the table.
    """

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        runs = sorted((p.parent for p in sweep.glob(f"*/{RESULT_FILE}")), key=lambda p: p.name)
        if runs:
            print(compare(runs, sweep)["text"])
            print(f"comparison written to {sweep / COMPARE_STEM}.csv and .png")
