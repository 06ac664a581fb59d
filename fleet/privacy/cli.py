"""`fleet-privacy`: epsilon of a DP-FedAvg configuration, or the noise that meets a target.

    fleet-privacy --population 10000000 --goal 6500 --noise 7.0 --rounds 2000 --delta 1e-10
    fleet-privacy --population 100000 --goal 100 --rounds 100 --target-epsilon 2

Uses the same accountant (dp-accounting RDP, one sampled-Gaussian event per released round) as
training, so the numbers agree with what a run reports.
"""

from __future__ import annotations

import argparse
import sys

from fleet.coordinator import default_delta
from fleet.privacy.accountant import Mechanism, epsilon, noise_for_epsilon


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="fleet-privacy", description=__doc__.split("\n")[0])
    ap.add_argument("--population", type=int, required=True, help="devices in the fleet")
    ap.add_argument("--goal", type=int, required=True, help="reports per round (expected cohort)")
    ap.add_argument("--rounds", type=int, required=True, help="released rounds")
    ap.add_argument("--noise", type=float, help="noise multiplier z")
    ap.add_argument("--target-epsilon", type=float, help="find the smallest z meeting this epsilon")
    ap.add_argument("--delta", type=float, help="default: 1 / population^1.1")
    ap.add_argument("--sampling", choices=("poisson", "fixed_size"), default="poisson")
    args = ap.parse_args(argv)
    if (args.noise is None) == (args.target_epsilon is None):
        ap.error("give exactly one of --noise and --target-epsilon")
    if not 0 < args.goal <= args.population:
        ap.error("--goal must be in [1, --population]")
    if args.rounds < 0 or (args.noise is not None and args.noise < 0):
        ap.error("--rounds and --noise must be >= 0")
    delta = args.delta if args.delta is not None else default_delta(args.population)
    q = args.goal / args.population
    if args.noise is not None:
        eps = epsilon(Mechanism(args.sampling, args.population, args.goal, args.noise), args.rounds, delta)
        print(
            f"epsilon = {eps:.4g} at delta = {delta:.3g} "
            f"(q = {q:.3g}, z = {args.noise}, {args.rounds} rounds)"
        )
        return
    try:
        z = noise_for_epsilon(
            args.sampling, args.population, args.goal, args.rounds, delta, args.target_epsilon
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(
        f"noise multiplier z = {z:.4g} gives epsilon <= {args.target_epsilon} at delta = {delta:.3g} "
        f"(q = {q:.3g}, {args.rounds} rounds)"
    )


if __name__ == "__main__":
    main()
