"""`fleet-plan`: the epsilon a deployment will really have, before any device trains.

    fleet-plan experiment=gboard_es                                # the plan of the Gboard-scale run
    fleet-plan privacy=dp_ftrl --target-epsilon 8                  # and the z that meets epsilon 8
    fleet-plan --target-epsilon 8 --for p99 fleet.population=1e6   # for 99% of the devices

It takes the config `fleet-train` takes (the same Hydra overrides), runs every round of that fleet
with no local training and no model (`train.dry_run`: the same check-in, sampler, timing, dropout,
deadline, participation limit, mechanism and ledger; in reproducible mode the training run's
ledger entry for entry), and prints the plan (`fleet.audits.plan`): the headline epsilon the run
would print, each device's under the real schedule beside the textbook figure, with a target the
smallest z that meets it, and the deployment's shape. RUN_DIR/plan/ holds plan.json and the
figures; the run directory is a dry run's (metrics.jsonl, ledger, summary.json, W&B offline).

What a plan leaves out: whether the model trains well (no model runs), and anything that depends
on the data's values (a device whose update is invalid still takes part, as in training).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from fleet.audits.plan import TARGETS, summary_text

# What makes a training config a plan: no training, no model-side audits, every round's figures
# kept (the plan is not a release: it reads no device's data, only the simulated world).
DRY = (
    "train.dry_run=true",
    "train.participation_audit=false",  # the plan computes its own per-device figures
    "train.min_signal_to_noise=0",  # zero updates: no signal to warn about
    "privacy.telemetry=full",
    "memorization.audit=false",
    "memorization.track_every=0",
)


def main(argv: list[str] | None = None) -> None:
    from fleet.runtime.cli import USER_ERRORS, load_config, one_line

    ap = argparse.ArgumentParser(prog="fleet-plan", description=__doc__.split("\n")[0])
    ap.add_argument("--target-epsilon", type=float, help="find the smallest z that meets this epsilon")
    ap.add_argument("--for", dest="target_for", choices=TARGETS, default="headline", help="whose epsilon")
    ap.add_argument("--out", help="the plan's run directory (default outputs/plan/DATE/TIME)")
    args, overrides = ap.parse_known_args(argv)
    if any(o.startswith("-") for o in overrides):
        ap.error(f"unknown option {next(o for o in overrides if o.startswith('-'))}")
    asked = [*overrides, *DRY, f"plan.target_for={args.target_for}"]
    if args.target_epsilon is not None:
        asked.append(f"plan.target_epsilon={args.target_epsilon}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    logging.getLogger("fleet").setLevel(logging.INFO)
    try:
        cfg = load_config(asked)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    run_dir = Path(args.out or Path("outputs") / "plan" / time.strftime("%Y-%m-%d/%H-%M-%S"))
    if (run_dir / "state").exists() or (run_dir / "metrics.jsonl").exists():
        print(f"error: --out: {str(run_dir)!r} already holds a run; give a new directory", file=sys.stderr)
        sys.exit(2)
    run_dir.mkdir(parents=True, exist_ok=True)
    sys.exit(run(cfg, run_dir))


def run(cfg, run_dir: Path) -> int:
    from fleet.runtime.cli import USER_ERRORS, one_line
    from fleet.runtime.driver import train

    try:
        train(cfg, run_dir)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    plan = json.loads((run_dir / "plan" / "plan.json").read_text())
    print(summary_text(plan))
    print(f"plan: {run_dir / 'plan' / 'plan.json'}")
    return 0


if __name__ == "__main__":
    main()
