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

from fleet.privacy.accountant import epsilon_of, noise_for_epsilon, nominal_epsilon, pld_interval
from fleet.privacy.ledger import LEDGER_FILE, read
from fleet.privacy.mechanism import default_delta


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
    ap.add_argument("--mechanism", choices=("dp_fedavg", "dp_ftrl"), default="dp_fedavg")
    ap.add_argument("--restart-every", type=_positive(int, "--restart-every", allow_zero=True), default=0)
    ap.add_argument("--separation", type=_positive(int, "--separation", allow_zero=True), default=0)
    args = ap.parse_args(argv)
    if args.run:
        sys.exit(run_epsilon(Path(args.run)))
    if args.mechanism == "dp_ftrl":
        sys.exit(ftrl(args, ap))
    for name in ("population", "goal", "rounds"):
        if getattr(args, name) is None:
            ap.error(f"--{name} is required (or give --run RUN_DIR)")
    if (args.noise is None) == (args.target_epsilon is None):
        ap.error("give exactly one of --noise and --target-epsilon")
    if args.goal > args.population:
        ap.error("--goal must be <= --population")
    if args.overselect is not None and args.overselect < 1:
        ap.error("--overselect must be >= 1")
    delta = args.delta if args.delta is not None else default_delta(args.population)
    cohort = math.ceil(args.goal * args.overselect) if args.overselect else args.goal
    q = min(1.0, cohort / args.population)
    # Under replace-one (fixed_size) the sum's sensitivity is 2S: the accounted multiplier is z/2.
    scale = 2.0 if args.sampling == "fixed_size" else 1.0
    kinds = ("pld", "rdp") if args.accountant == "both" else (args.accountant,)
    if args.sampling == "fixed_size" and "pld" in kinds:
        kinds = ("rdp",)
        print("fixed_size sampling: RDP only (dp-accounting has no PLD for sampling without replacement)")
    what = "q = ceil(goal x overselect) / population" if args.overselect else "q = goal / population"
    print(f"{what} = {q:.4g}, every device always available (a run accounts each round's real q_r)")
    for kind in kinds:
        if args.noise is not None:
            eps = nominal_epsilon(kind, args.sampling, q, args.noise / scale, args.rounds, delta)
            print(
                f"epsilon = {eps:.4g} at delta = {delta:.3g} ({kind.upper()}; {args.sampling} sampling, "
                f"z = {args.noise:g}, {args.rounds} rounds)"
            )
            continue
        try:
            z = noise_for_epsilon(kind, args.sampling, q, args.rounds, delta, args.target_epsilon, scale)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(
            f"noise multiplier z = {z:.4g} gives epsilon <= {args.target_epsilon:g} at delta = {delta:.3g} "
            f"({kind.upper()}; {args.sampling} sampling, {args.rounds} rounds)"
        )


def ftrl(args: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
    """DP-FTRL: rounds split into trees of --restart-every, each device at most once in any
    --separation released rounds; rho (zCDP) and epsilon by both accountants."""
    from fleet.privacy import tree as tree_lib
    from fleet.privacy.accountant import TreeVersion, tree_epsilon, tree_rho

    if args.rounds is None or args.noise is None:
        ap.error("dp_ftrl needs --rounds and --noise")
    if args.delta is None and args.population is None:
        ap.error("give --delta (or --population for delta = 1 / population^1.1)")
    delta = args.delta if args.delta is not None else default_delta(args.population)
    size = args.restart_every or args.rounds
    trees = [
        TreeVersion(i, min(size, args.rounds - i * size), args.separation)
        for i in range(-(-args.rounds // size))
    ]
    k = tree_lib.participations(min(size, args.rounds), args.separation)
    print(
        f"{len(trees)} tree(s) of up to {size} rounds; each device at most once in any {args.separation} "
        f"released rounds: at most {k} participation(s) per tree"
    )
    if args.noise <= 0:
        print("epsilon = inf (no noise)")
        return 0
    print(f"rho = {tree_rho(trees, args.noise):.4g} (zCDP)")
    kinds = ("pld", "rdp") if args.accountant == "both" else (args.accountant,)
    for kind in kinds:
        eps = tree_epsilon(trees, args.noise, kind, delta, 1e-4)
        print(f"epsilon = {eps:.4g} at delta = {delta:.3g} ({kind.upper()}; z = {args.noise:g})")
    return 0


def run_epsilon(run_dir: Path) -> int:
    """Print a run's epsilon recomputed from its ledger, with its accountant and the other."""
    from fleet.config import config_from_dict
    from fleet.privacy.mechanism import noise_plan

    config_file = run_dir / "config.json"
    if not config_file.exists():
        print(f"error: --run: no config.json in {str(run_dir)!r} (not a fleet run)", file=sys.stderr)
        return 2
    cfg = config_from_dict(json.loads(config_file.read_text()))
    if not cfg.privacy.enabled:
        print("no DP in this run (privacy=none): epsilon is infinite")
        return 0
    releases = read(run_dir / "state" / LEDGER_FILE)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    priv = summary.get("privacy", {})
    population = summary.get("population") or _population(cfg)
    p, f = cfg.privacy, cfg.fleet
    delta = p.delta if p.delta is not None else default_delta(population)
    z_acc = noise_plan(p, f.goal).accounted
    interval = priv.get("pld_interval") or pld_interval(
        min(1.0, math.ceil(f.goal * f.overselect) / population), z_acc, cfg.train.rounds, delta
    )
    qs = [r.q for r in releases]
    span = f" (q_r {min(qs):.4g} to {max(qs):.4g})" if qs else ""
    print(f"{run_dir}: {len(releases)} released rounds in the ledger{span}, {p.sampling} sampling")
    kinds = [p.accountant] + [k for k in ("pld", "rdp") if k != p.accountant]
    for kind in kinds:
        if kind == "pld" and p.sampling != "poisson" and p.mechanism != "dp_ftrl":
            continue
        eps = epsilon_of(releases, kind, delta, interval)
        tag = "the run's accountant" if kind == p.accountant else "for comparison"
        print(f"epsilon = {eps:.4g} at delta = {delta:.3g} ({kind.upper()}, {tag})")
    if priv.get("epsilon") is not None:
        print(f"the run printed {priv['epsilon']:.4g}")
    return 0


def _population(cfg) -> int:
    from fleet.round.shard import fleet_size

    return fleet_size(cfg)


if __name__ == "__main__":
    main()
