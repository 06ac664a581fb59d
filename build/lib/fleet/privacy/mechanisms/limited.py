"""What the mechanisms that rest on the participation limit alone share (DP-FTRL's tree, BLT).

Their guarantee needs no sampling: cohorts are drawn uniformly without replacement (K =
ceil(goal x overselect), the first `goal` arrivals counted), but only the limit the shards enforce
is accounted. So they share the limit (`enforced_separation`), the cohort rule, the refusal of a
target the first release already passes, the checks of `fleet-privacy`'s planned questions, and
the summary lines that say whose figure it is.
"""

from __future__ import annotations

import math
from typing import Any

from fleet.config import Config
from fleet.privacy.mechanisms.base import (
    ArgumentError,
    Cohort,
    Mechanism,
    check,
    cohort_size,
    default_delta,
    run_delta,
)
from fleet.privacy.segments import gaussian_epsilon


def enforced_separation(cfg: Config) -> int:
    """The participation limit in released rounds a mechanism without sampling rests on:
    `fleet.min_separation_rounds`, and `fleet.min_separation_hours` converted by the clock's worst
    case: a round lasts at most deadline_s + round_interval_s of simulated time, so two
    participations H hours apart are at least ceil(H x 3600 / (deadline_s + round_interval_s))
    rounds apart; enforcing that many released rounds too makes it hold whatever rounds are
    abandoned or however the clock jumps (dropout.active_hours)."""
    f = cfg.fleet
    rounds = f.min_separation_rounds
    if f.min_separation_hours > 0:
        hours = math.ceil(f.min_separation_hours * 3600.0 / (f.deadline_s + f.round_interval_s))
        rounds = max(rounds, hours)
    return int(rounds)


class LimitedMechanism(Mechanism):
    """A mechanism resting on the participation limit alone (see the module docstring)."""

    limit: int

    def __init__(self, cfg: Config, *rest: Any):
        """A fixed clip, noise of z x clip a release, and the limit in released rounds: what every
        mechanism resting on the limit shares."""
        super().__init__(cfg, *rest)  # (population, init_params, noise, server, state_dir)
        p = cfg.privacy
        self.clip_norm = p.clip_norm
        self.std = p.noise_multiplier * p.clip_norm
        self.limit = self.limit_rounds(cfg)

    @classmethod
    def limit_rounds(cls, cfg: Config) -> int:
        return enforced_separation(cfg)

    @classmethod
    def check_budget(cls, cfg: Config, population: int) -> None:
        """A target below what the first release costs (one Gaussian of multiplier z) is refused."""
        p = cfg.privacy
        if p.target_epsilon is None or p.noise_multiplier <= 0:
            return
        one = gaussian_epsilon(p.noise_multiplier, p.accountant, run_delta(p, population))
        check(
            one <= p.target_epsilon,
            "privacy.target_epsilon",
            f"{p.target_epsilon:g} is unreachable: the first release alone costs {one:.4g} "
            f"(z = {p.noise_multiplier:g}, no sampling assumed); raise privacy.noise_multiplier",
        )

    @classmethod
    def planned_question(cls, args: Any) -> tuple[float, tuple[str, ...]]:
        """`fleet-privacy`'s planned question checked: (delta, the accountants asked)."""
        if args.rounds is None or (args.noise is None and args.target_epsilon is None):
            raise ArgumentError(f"{cls.name} needs --rounds and --noise (or --target-epsilon)")
        if args.delta is None and args.population is None:
            raise ArgumentError("give --delta (or --population for delta = 1 / population^1.1)")
        delta = args.delta if args.delta is not None else default_delta(args.population)
        return delta, ("pld", "rdp") if args.accountant == "both" else (args.accountant,)

    def cohort(self, available: int) -> Cohort:
        k = min(cohort_size(self.cfg.fleet), available)
        return Cohort(k / available if available else 0.0, k, poisson=False, closes_on_goal=True)

    def _whose(self) -> dict:
        """The summary's lines on what the figure rests on."""
        return {
            "sampling": "none assumed (cohorts drawn without replacement; the guarantee does not rest on it)",
            "neighbours": "one device's contribution replaced by nothing (zero-out), in every round it "
            "took part in",
            "device": f"every device: each takes part at most once in any {self.limit} consecutive "
            "released rounds (enforced in the shards, kept across crashes)",
            "participation_limit_rounds": self.limit,
            "textbook": None,
        }
