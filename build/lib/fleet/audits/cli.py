"""`fleet-audit RUN_DIR [--participation] [--memorization]`: audits of a finished (or stopped) run.

Each audit is a flag; with none, the memorization audit runs. The participation audit
(fleet.audits.participation) needs the shards' per-device participation state, which died with the
run's actors. It is not copied anywhere new: the run's own checkpoint already holds it
(RUN_DIR/state/shard_*.npz, arrays aligned to row index, no device ids; the config is
RUN_DIR/config.json). So the shards are rebuilt in-process from the config, given the state of
the last committed checkpoint, and audited over the rounds before it. Per-device state stays in
the run directory, out of logs and W&B, like the checkpoint it is. A run with no checkpoint
still gets the privacy part, which needs only the config and metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

from fleet.audits import participation
from fleet.config import Config, ConfigError
from fleet.round import checkpoint
from fleet.round.devices import fleet_size
from fleet.round.shard import ShardCore

log = logging.getLogger(__name__)


def load_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise ConfigError(f"RUN_DIR: no metrics.jsonl in {str(run_dir)!r}")
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            break  # a torn last line from a crash
    return lines


def rebuild_shards(cfg: Config, run_dir: Path) -> tuple[list[ShardCore], int | None]:
    """In-process shards of the run, with the participation state of its last committed checkpoint.

    Returns the shards and the checkpoint's round (None without a checkpoint: the shards then hold
    no participation). Read-only: unlike `ShardCore.restore`, nothing in the run dir is rewritten.
    """
    t0 = cfg.fleet.start_hour * 3600.0
    state_dir = run_dir / checkpoint.STATE_DIR
    saved = checkpoint.load_coordinator(state_dir) if state_dir.is_dir() else None
    if saved is None:
        return [ShardCore(cfg, 0, 0, fleet_size(cfg), t0)], None
    committed = int(saved["round"])
    name = re.compile(rf"shard_(\d+)_(\d+)_r{committed}\.npz")
    ranges = sorted(
        (int(m.group(1)), int(m.group(2))) for p in state_dir.iterdir() if (m := name.fullmatch(p.name))
    )
    shards = []
    for i, (start, stop) in enumerate(ranges):
        shard = ShardCore(cfg, i, start, stop, t0)
        state = checkpoint.load_shard(state_dir, start, stop, committed)
        shard.participations = state["participations"]
        shard.last_participation = state["last_participation"]
        shards.append(shard)
    return shards, committed


def participation_audit(run_dir: Path, args: argparse.Namespace) -> int:
    from fleet.config import config_from_dict

    config_file = run_dir / checkpoint.CONFIG_FILE
    if not config_file.exists():
        raise ConfigError(f"RUN_DIR: no {checkpoint.CONFIG_FILE} in {str(run_dir)!r} (not a fleet run)")
    cfg = config_from_dict(json.loads(config_file.read_text()))
    lines = load_lines(run_dir)
    shards, committed = rebuild_shards(cfg, run_dir)
    if committed is None:
        print("no checkpoint: participation not audited, privacy under the schedule only", file=sys.stderr)
    else:
        lines = [x for x in lines if x["round"] < committed]
    audit = participation.run_audit(
        cfg,
        shards,
        lines,
        run_dir,
        with_participation=committed is not None,
        cohort=args.cohort,
        figures=not args.no_figures,
    )
    print(participation.summary_text(audit))
    print(f"written to {run_dir / participation.OUT_DIR}")
    return 0


def memorization_audit(run_dir: Path, args: argparse.Namespace) -> int:
    from fleet.audits import memorization

    return memorization.cli(run_dir, args)


AUDITS: dict[str, Callable[[Path, argparse.Namespace], int]] = {
    "participation": participation_audit,
    "memorization": memorization_audit,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fleet-audit", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory written by fleet-train")
    parser.add_argument(
        "--participation", action="store_true", help="who trained, and per-device epsilon under availability"
    )
    parser.add_argument("--memorization", action="store_true", help="canary exposure (the default)")
    parser.add_argument(
        "--cohort",
        choices=("ledger", "goal"),
        default="ledger",
        help="participation: q per round as the run accounted it, or goal / available",
    )
    parser.add_argument("--no-figures", action="store_true", help="participation: the JSON only")
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="RUN_DIR",
        help="memorization: set these runs beside RUN_DIR (memorization_compare.* in their parent)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    run_dir = Path(args.run_dir)
    chosen = [name for name in AUDITS if getattr(args, name)] or ["memorization"]
    try:
        for name in chosen:
            rc = AUDITS[name](run_dir, args)
            if rc:
                sys.exit(rc)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
