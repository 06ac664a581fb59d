"""DP-FedAvg (McMahan et al. 2018): clipped updates, Gaussian noise on their sum, amplified by a
secret sample of the available devices; with adaptive clipping (Andrew et al. 2021) as an option.

- **Sampling.** `poisson`: each available device joins with q_r = min(1, K / available_r), K =
  ceil(goal x overselect); every arrival before the deadline counts (nothing caps the cohort).
  `fixed_size`: exactly K of them, the first `goal` arrivals count. The neighbouring relation and
  the sensitivity each implies are in `fleet.privacy.sampled`.
- **Noise.** N(0, (z_update S)^2) on the sum of the clipped updates, once, after summing (the
  shards clip to `clip_norm`), divided by the goal (a fixed denominator, also when fewer report);
  with adaptive clipping a noised count of centred bits moves S, and z is split between the two
  so that the round's multiplier stays z (`sampled.adaptive_split`).
- **Accounting.** Each released round is its own dp-accounting event with its own q_r, composed by
  `fleet.privacy.accountant` (PLD by default, RDP on request): the epsilon of a device available
  in every released round, an upper bound for every device. Under a participation limit q_r
  depends on who was sampled before, so with private telemetry the figure is published once, at
  the end.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fleet.config import Config
from fleet.privacy import sampled
from fleet.privacy.accountant import Accountant, epsilon_of, noise_for_epsilon, nominal_epsilon, pld_interval
from fleet.privacy.mechanisms.base import (
    ArgumentError,
    Cohort,
    ShardSums,
    check,
    check_gaussian,
    choice,
    cohort_size,
    default_delta,
    delta_problem,
    run_delta,
    sampled_cohort,
)
from fleet.privacy.mechanisms.server_model import ServerModel
from fleet.privacy.sampled import SampledRelease

# What the amplification accounting takes for granted and the simulator does not always give
# (README, "What it does not model"): measured there, not yet accounted.
ASSUMES = (
    "that no round is abandoned after its cohort is drawn (a run that abandons rounds for too few "
    "reports can have a larger figure), and that q_r does not depend on earlier cohorts (under a "
    "participation limit it does; the figure is that of the cohorts drawn)"
)


class GaussianFedAvg(ServerModel):
    """DP-FedAvg with Poisson or fixed-size sampling, fixed or adaptive clipping."""

    name = "dp_fedavg"
    amplified_by_sampling = True

    def __init__(self, cfg: Config, population: int, init_params: np.ndarray, noise, server, state_dir):
        super().__init__(cfg, population, init_params, noise, server, state_dir)
        p, f = cfg.privacy, cfg.fleet
        self.server = server(init_params)
        self.plan = sampled.noise_plan(p, f.goal)
        self.clip_norm = p.initial_clip if p.adaptive else p.clip_norm
        self.accounted = self._accounted_multiplier(len(init_params))
        self.accountant = Accountant(
            p.accountant, self.delta, self.interval(cfg, population, self.accounted, self.delta)
        )

    def _accounted_multiplier(self, dim: int) -> float:
        """The release's multiplier under the sampling's relation, with the sensitivities the noise
        source says to account (secure mode's sampler adds its rounding slack). The slack follows
        the noise's scale to within a factor of 2 (its lattice is a power of 2 below std); with an
        adaptive clip the scale moves every round, so the largest relative slack any clip norm can
        give, twice the one at the first, is accounted."""
        s, plan = sampled.sampling(self.cfg.privacy.sampling), self.plan
        if plan.update <= 0:
            return 0.0
        clip = self.clip_norm
        exact = s.sum_sensitivity * clip
        slack = self.noise.accounted_sensitivity(exact, dim, plan.update * clip) - exact
        if self.cfg.privacy.adaptive:
            slack *= 2
        inv = ((exact + slack) / (plan.update * clip)) ** 2
        if plan.count_std is not None:
            count = self.noise.accounted_sensitivity(s.count_sensitivity, 1, plan.count_std)
            inv += (count / plan.count_std) ** 2
        return inv**-0.5

    # ---- settings -------------------------------------------------------------------------
    @classmethod
    def validate(cls, cfg: Config) -> None:
        p = cfg.privacy
        check_gaussian(cfg)
        choice(p.sampling, "privacy.sampling", tuple(sampled.SAMPLINGS))
        check(
            not (p.accountant == "pld" and p.sampling == "fixed_size"),
            "privacy.accountant",
            "pld cannot account fixed_size sampling (dp-accounting has no PLD for sampling without "
            "replacement under replace-one); set privacy.accountant=rdp or privacy.sampling=poisson",
        )
        if p.adaptive:
            check(p.initial_clip > 0, "privacy.initial_clip", f"must be > 0 (got {p.initial_clip})")
            check(0 < p.target_quantile < 1, "privacy.target_quantile", "must be in (0, 1)")
            check(p.clip_lr > 0, "privacy.clip_lr", f"must be > 0 (got {p.clip_lr})")
            sigma_b = p.count_noise if p.count_noise is not None else cfg.fleet.goal / 20.0
            check(sigma_b > 0, "privacy.count_noise", f"must be > 0 (got {sigma_b})")
            check(
                p.noise_multiplier < 2 * sigma_b,
                "privacy.noise_multiplier",
                f"adaptive clipping needs z < 2 * count_noise ({p.noise_multiplier} >= {2 * sigma_b}); "
                "raise privacy.count_noise or fleet.goal",
            )

    @classmethod
    def check_budget(cls, cfg: Config, population: int) -> None:
        """A target epsilon below what one round costs even at the smallest q_r (every device
        available: K / population) is refused, naming the z that would allow the planned rounds."""
        p, f = cfg.privacy, cfg.fleet
        if p.target_epsilon is None:
            return
        delta = run_delta(p, population)
        q_floor = min(1.0, cohort_size(f) / population)
        z_acc = sampled.noise_plan(p, f.goal).accounted
        one = nominal_epsilon(p.accountant, p.sampling, q_floor, z_acc, 1, delta)
        if one > p.target_epsilon:
            scale = p.noise_multiplier / z_acc if z_acc > 0 else 1.0
            z = noise_for_epsilon(
                p.accountant, p.sampling, q_floor, cfg.train.rounds, delta, p.target_epsilon, scale
            )
            check(
                False,
                "privacy.target_epsilon",
                f"{p.target_epsilon:g} is unreachable: one round costs at least {one:.4g} (q >= "
                f"{cohort_size(f)} / {population}, z = {p.noise_multiplier:g}); "
                f"privacy.noise_multiplier={z:.4g} would allow {cfg.train.rounds} rounds",
            )

    @classmethod
    def header(cls, cfg: Config, population: int) -> list[str]:
        """The mechanism, then the textbook figure for the planned rounds, as `fleet-privacy` prints
        it for the same settings, and what the run accounts instead."""
        p, f = cfg.privacy, cfg.fleet
        clip = f"adaptive clip from {p.initial_clip:g}" if p.adaptive else f"clip S={p.clip_norm:g}"
        k = cohort_size(f)
        q, delta = min(1.0, k / population), run_delta(p, population)
        eps = textbook_epsilon(cfg, population, cfg.train.rounds)
        command = (
            f"fleet-privacy --population {population} --goal {f.goal} --overselect {f.overselect:g} "
            f"--rounds {cfg.train.rounds} --noise {p.noise_multiplier:g}"
            + (f" --sampling {p.sampling} --accountant {p.accountant}" if p.sampling != "poisson" else "")
        )
        return [
            f"DP-FedAvg, z={p.noise_multiplier:g}, {clip}, {p.sampling} sampling",
            f"privacy: textbook epsilon after {cfg.train.rounds} rounds {eps:.4g} at delta {delta:.3g} "
            f"(q = ceil(goal x overselect) / population = {q:.3g}, {p.accountant.upper()}; {command}"
            + (" (adaptive clipping: --noise is the total)" if p.adaptive else "")
            + f"); the run accounts each round's real q_r = min(1, {k} / available)",
        ]

    @classmethod
    def parse(cls, entry: dict) -> SampledRelease:
        fields = ("round", "sampling", "q", "available", "cohort", "noise_multiplier")
        return SampledRelease(**{k: entry[k] for k in fields})

    @classmethod
    def interval(cls, cfg: Config, population: int, accounted: float, delta: float) -> float:
        """Forecast from the smallest q_r a round can have (every device available)."""
        q_floor = min(1.0, cohort_size(cfg.fleet) / population)
        return pld_interval(q_floor, accounted, cfg.train.rounds, delta)

    @classmethod
    def recompute(cls, cfg: Config, entries: list, kind: str, delta: float, interval: float) -> float:
        if kind == "pld" and cfg.privacy.sampling != "poisson":
            return math.nan  # dp-accounting has no PLD for it (see `validate`)
        return epsilon_of(entries, kind, delta, interval)

    @classmethod
    def offline(cls, args: Any) -> list[str]:
        """The textbook figure (q = goal / population, or ceil(goal x overselect) / population with
        --overselect, every device always available) by both accountants, or the z that meets
        --target-epsilon."""
        for name in ("population", "goal", "rounds"):
            if getattr(args, name) is None:
                raise ArgumentError(f"--{name} is required (or give --run RUN_DIR)")
        if (args.noise is None) == (args.target_epsilon is None):
            raise ArgumentError("give exactly one of --noise and --target-epsilon")
        if args.goal > args.population:
            raise ArgumentError("--goal must be <= --population")
        if args.overselect is not None and args.overselect < 1:
            raise ArgumentError("--overselect must be >= 1")
        delta = args.delta if args.delta is not None else default_delta(args.population)
        if problem := delta_problem(delta, args.population):
            raise ArgumentError(f"--delta: {problem}")
        k = cohort_size(args) if args.overselect else args.goal
        q = min(1.0, k / args.population)
        # Under replace-one (fixed_size) the sum's sensitivity is 2S: the accounted multiplier is z/2.
        scale = 1.0 / sampled.sampling(args.sampling).sum_sensitivity
        kinds = ("pld", "rdp") if args.accountant == "both" else (args.accountant,)
        out = []
        if args.sampling == "fixed_size" and "pld" in kinds:
            kinds = ("rdp",)
            out.append(
                "fixed_size sampling: RDP only (dp-accounting has no PLD for sampling without replacement)"
            )
        what = "q = ceil(goal x overselect) / population" if args.overselect else "q = goal / population"
        out.append(f"{what} = {q:.4g}, every device always available (a run accounts each round's real q_r)")
        for kind in kinds:
            if args.noise is not None:
                eps = nominal_epsilon(kind, args.sampling, q, args.noise * scale, args.rounds, delta)
                out.append(
                    f"epsilon = {eps:.4g} at delta = {delta:.3g} ({kind.upper()}; {args.sampling} sampling, "
                    f"z = {args.noise:g}, {args.rounds} rounds)"
                )
                continue
            z = noise_for_epsilon(kind, args.sampling, q, args.rounds, delta, args.target_epsilon, 1 / scale)
            out.append(
                f"noise multiplier z = {z:.4g} gives epsilon <= {args.target_epsilon:g} at delta = "
                f"{delta:.3g} ({kind.upper()}; {args.sampling} sampling, {args.rounds} rounds)"
            )
        return out

    # ---- the round ------------------------------------------------------------------------
    def cohort(self, available: int) -> Cohort:
        return sampled_cohort(self.cfg, available)

    def _entry(self, r: int, available: int) -> SampledRelease:
        c = self.cohort(available)
        return SampledRelease(r, self.cfg.privacy.sampling, c.q, int(available), c.size, self.accounted)

    def release(self, r: int, sums: ShardSums) -> dict:
        std = self.plan.update * self.clip_norm
        noised = self.noise.add(sums.total, std, r, "update_noise")
        out = self._telemetry(sums, noised - sums.total)
        update = noised / self.cfg.fleet.goal  # fixed denominator, whatever the dropout
        if self.cfg.privacy.adaptive:
            self._adapt_clip(r, sums)
        self.server.step(update.astype(np.float32))
        self._commit()
        return out

    def _adapt_clip(self, r: int, sums: ShardSums) -> None:
        """Geometric update of the clip norm toward the target quantile (Andrew et al. 2021).

        Each reported device's bit enters centred, as b - 1/2 (sensitivity 1/2 under zero-out,
        1 under replace-one), which is what the noise split of `sampled.adaptive_split` assumes.
        """
        p = self.cfg.privacy
        centred = np.array([sums.unclipped - sums.reported / 2.0])
        noised = float(self.noise.add(centred, self.plan.count_std, r, "count_noise")[0])
        fraction = noised / self.cfg.fleet.goal + 0.5
        self.clip_norm = float(self.clip_norm * math.exp(-p.clip_lr * (fraction - p.target_quantile)))

    # ---- what it says ---------------------------------------------------------------------
    def summary(self) -> dict:
        cfg, acc = self.cfg, self.accountant_of_all()
        p = cfg.privacy
        qs = np.array([r.q for r in acc.releases]) if acc.releases else np.zeros(0)
        s = sampled.sampling(p.sampling)
        k = cohort_size(cfg.fleet)
        out = {
            "dp": True,
            "epsilon": acc.epsilon(),
            "delta": acc.delta,
            "accountant": acc.kind,
            "pld_interval": acc.interval if acc.kind == "pld" else None,
            "mechanism": "DP-FedAvg",
            "sampling": p.sampling,
            "event": (
                "PoissonSampledDpEvent(q_r, GaussianDpEvent(z_accounted))"
                if p.sampling == "poisson"
                else "SampledWithoutReplacementDpEvent(available_r, cohort_r, GaussianDpEvent(z_accounted))"
            )
            + " per released round, composed",
            "neighbours": s.neighbours,
            "device": "a device available in every released round (an upper bound for every device)",
            "noise_multiplier": p.noise_multiplier,
            "accounted_noise_multiplier": self.accounted,
            "released_rounds": len(acc.releases),
            "textbook": {
                "q": min(1.0, k / self.population),
                "epsilon": textbook_epsilon(cfg, self.population, len(acc.releases)),
                "note": "q = ceil(goal x overselect) / population, every device always available: "
                "real availability does not give it",
            },
            **self._covers(),
            "assumes": ASSUMES,
        }
        if self.private:  # the per-round q_r and their span would describe the secret samples
            out["depends_on"] = (
                "how many devices were available in each released round, which under a participation "
                "limit depends on who was sampled before: published once, at the end"
            )
            return out
        out["q"] = {
            "min": float(qs.min()) if len(qs) else None,
            "median": float(np.median(qs)) if len(qs) else None,
            "max": float(qs.max()) if len(qs) else None,
            "rule": f"min(1, {k} / available_r)",
        }
        out["pure_noise_rounds"] = self.pure_noise_rounds
        return out


def textbook_epsilon(cfg: Config, population: int, rounds: int) -> float:
    """Epsilon of `rounds` releases at q = K / population (every device always available), as the
    run's accountant would account them: the figure a deployment plan usually quotes."""
    p, f = cfg.privacy, cfg.fleet
    q = min(1.0, cohort_size(f) / population)
    z_acc = sampled.noise_plan(p, f.goal).accounted
    return nominal_epsilon(p.accountant, p.sampling, q, z_acc, rounds, run_delta(p, population))
