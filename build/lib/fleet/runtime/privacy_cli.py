"""`fleet-privacy`: epsilon of a DP-FedAvg configuration, the noise that meets a target, or a run's.

    fleet-privacy --population 100000 --goal 100 --rounds 100 --noise 1.0
    fleet-privacy --population 100000 --goal 100 --rounds 100 --target-epsilon 2
    fleet-privacy --run outputs/DATE/TIME
    fleet-privacy --mechanism dp_ftrl --rounds 2000 --noise 7 --restart-every 200 --separation 200 \
        --delta 1e-10

The first two give the textbook figure: q = goal / population every round (every device always
available), with both of dp-accounting's accountants (PLD, the runs' default, and RDP), as the
start-up header of a run with the same settings prints it. `--overselect` gives q = ceil(goal x
overselect) / population, the smallest q a run can have. A run accounts each round's real q_r
instead: `--run RUN_DIR` recomputes that from the run's ledger (RUN_DIR/state/ledger.jsonl) with
the run's own accountant, and with the other one beside it. For DP-FTRL (`--mechanism dp_ftrl`)
there is no q: the figure rests on the participation limit (`--separation`, in released rounds)
and the trees (`--restart-every`), and it prints rho (zCDP) beside epsilon.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from fleet.privacy.calibrate import noise_for_ledger
from fleet.privacy.ledger import LEDGER_FILE, read
from fleet.privacy.mechanisms import MECHANISMS, mechanism_class, run_delta
from fleet.privacy.mechanisms.base import ArgumentError
from fleet.privacy.segments import up4


def _positive(kind: type, name: str, allow_zero: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: not a number: {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"{name}: must be finite and {'>=' if allow_zero else '>'} 0")
        return value

    return parse


def _delta(text: str) -> float:
    value = _positive(float, "--delta")(text)
    if value >= 1:
        raise argparse.ArgumentTypeError("--delta: must be below 1")
    return value


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="fleet-privacy", description=__doc__.split("\n")[0])
    ap.add_argument("--run", metavar="RUN_DIR", help="recompute a run's epsilon from its ledger")
    ap.add_argument("--population", type=_positive(int, "--population"), help="devices in the fleet")
    ap.add_argument("--goal", type=_positive(int, "--goal"), help="reports per round")
    ap.add_argument("--rounds", type=_positive(int, "--rounds", allow_zero=True), help="released rounds")
    ap.add_argument("--noise", type=_positive(float, "--noise", allow_zero=True), help="noise multiplier z")
    ap.add_argument("--target-epsilon", type=_positive(float, "--target-epsilon"), help="find the smallest z")
    ap.add_argument("--delta", type=_delta, help="default: 1 / population^1.1")
    ap.add_argument("--overselect", type=_positive(float, "--overselect"), help="q = ceil(goal x this) / N")
    ap.add_argument("--sampling", choices=("poisson", "fixed_size"), default="poisson")
    ap.add_argument("--accountant", choices=("pld", "rdp", "both"), default="both")
    ap.add_argument("--mechanism", choices=[k for k, m in MECHANISMS.items() if m.dp], default="dp_fedavg")
    ap.add_argument("--restart-every", type=_positive(int, "--restart-every", allow_zero=True), default=0)
    ap.add_argument("--separation", type=_positive(int, "--separation", allow_zero=True), default=0)
    args = ap.parse_args(argv)
    if args.run:
        sys.exit(run_epsilon(Path(args.run), args.target_epsilon))
    try:
        lines = MECHANISMS[args.mechanism].offline(args)
    except ArgumentError as e:
        ap.error(str(e))
    except ValueError as e:  # nothing meets the question (a target no noise below 1e4 reaches)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(lines))


def run_epsilon(run_dir: Path, target: float | None = None) -> int:
    """Print a run's epsilon recomputed from its ledger, with its accountant and the other; with a
    target, the noise multiplier that would have met it on the same released rounds (each round's
    own q_r for DP-FedAvg: the cohorts do not depend on the noise, so a run, or a dry run, is the
    plan for every z)."""
    from fleet.config import config_from_dict

    config_file = run_dir / "config.json"
    if not config_file.exists():
        print(f"error: --run: no config.json in {str(run_dir)!r} (not a fleet run)", file=sys.stderr)
        return 2
    cfg = config_from_dict(json.loads(config_file.read_text()))
    cls = mechanism_class(cfg.privacy)
    if not cls.dp:
        print("no DP in this run (privacy=none): epsilon is infinite")
        return 0
    releases = read(run_dir / "state" / LEDGER_FILE, cls.parse)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    priv = summary.get("privacy", {})
    population = summary.get("population") or _population(cfg)
    p = cfg.privacy
    delta = run_delta(p, population)
    z_acc = releases[0].noise_multiplier if releases else p.noise_multiplier
    interval = priv.get("pld_interval") or cls.interval(cfg, population, z_acc, delta)
    print(f"{run_dir}: {len(releases)} released rounds in the ledger ({cls.name})")
    for kind in [p.accountant] + [k for k in ("pld", "rdp") if k != p.accountant]:
        eps = cls.recompute(cfg, releases, kind, delta, interval)
        if math.isnan(eps):
            continue
        tag = "the run's accountant" if kind == p.accountant else "for comparison"
        print(f"epsilon = {eps:.4g} at delta = {delta:.3g} ({kind.upper()}, {tag})")
    if priv.get("epsilon") is not None:
        print(f"the run printed {priv['epsilon']:.4g}")
    if target is not None and releases:
        try:
            z = noise_for_ledger(cls, cfg, population, releases, p.accountant, delta, target)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(
            f"z = {up4(z)} gives epsilon <= {target:g} on these {len(releases)} released rounds "
            f"({p.accountant.upper()})"
        )
    return 0


def _population(cfg) -> int:
    from fleet.round.devices import fleet_size

    return fleet_size(cfg)


if __name__ == "__main__":
    main()
