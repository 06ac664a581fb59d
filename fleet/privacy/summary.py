"""What a run's epsilon is, in one dict: the figure, the mechanism and what it covers.

summary.json, the console summary, W&B and fleet-report all show this; its statement of coverage
and guarantee is what every output with an epsilon carries (README: "What epsilon means here").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fleet.config import separation_rounds
from fleet.privacy import mechanism
from fleet.privacy.accountant import Accountant, nominal_epsilon, tree_rho


def privacy_summary(
    cfg: Any, population: int, accountant: Accountant | None, pure_noise_rounds: int = 0
) -> dict:
    """What a run's epsilon is, in one dict: the figure, the mechanism and the statement of what
    it covers (summary.json, the console summary, W&B and fleet-report all show this)."""
    p, f = cfg.privacy, cfg.fleet
    covers = (
        "the model (and the noised clip norm) only: metrics.jsonl holds nothing else"
        if p.telemetry == "private"
        else "the model only; telemetry not covered (metrics.jsonl, W&B and reports hold un-noised "
        "per-round statistics: privacy.telemetry=private leaves them out)"
    )
    if not p.enabled or accountant is None:
        return {"dp": False, "epsilon": None, "covers": "nothing: no DP (privacy=none)"}
    guarantee = (
        "secure randomness (cohort and noise from the OS CSPRNG)"
        if cfg.rng == "secure"
        else "not a guarantee: reproducible randomness (the cohort and the noise follow from the seed "
        "in the config; use rng=secure)"
    )
    if p.mechanism == "dp_ftrl":
        return _ftrl_summary(cfg, accountant, covers, guarantee, pure_noise_rounds)
    qs = np.array([r.q for r in accountant.releases]) if accountant.releases else np.zeros(0)
    cohort = math.ceil(f.goal * f.overselect)
    s = mechanism.sampling(p.sampling)
    z_acc = accountant.releases[0].noise_multiplier if accountant.releases else None
    textbook = nominal_epsilon(
        accountant.kind,
        p.sampling,
        f.goal / population,
        z_acc if z_acc is not None else 0.0,
        len(accountant.releases),
        accountant.delta,
    )
    return {
        "dp": True,
        "epsilon": accountant.epsilon(),
        "delta": accountant.delta,
        "accountant": accountant.kind,
        "pld_interval": accountant.interval if accountant.kind == "pld" else None,
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
        "accounted_noise_multiplier": z_acc,
        "released_rounds": len(accountant.releases),
        "q": {
            "min": float(qs.min()) if len(qs) else None,
            "median": float(np.median(qs)) if len(qs) else None,
            "max": float(qs.max()) if len(qs) else None,
            "rule": f"min(1, {cohort} / available_r)",
        },
        "textbook": {
            "q": f.goal / population,
            "epsilon": textbook,
            "note": "q = goal / population, every device always available: "
            "real availability does not give it",
        },
        "pure_noise_rounds": pure_noise_rounds,
        "covers": covers,
        "guarantee": guarantee,
    }


def _ftrl_summary(cfg: Any, accountant: Accountant, covers: str, guarantee: str, pure_noise: int) -> dict:
    """DP-FTRL's figure: no sampling assumption, only the participation limit the shards enforced."""
    from fleet.privacy import tree as tree_lib

    p = cfg.privacy
    trees = accountant.trees()
    b = separation_rounds(cfg)
    once = all(tree_lib.participations(v.steps, v.separation) == 1 for v in trees)
    return {
        "dp": True,
        "epsilon": accountant.epsilon(),
        "delta": accountant.delta,
        "rho_zcdp": tree_rho(trees, p.noise_multiplier) if trees and p.noise_multiplier > 0 else None,
        "accountant": accountant.kind,
        "pld_interval": accountant.interval if accountant.kind == "pld" else None,
        "mechanism": "DP-FTRL (tree aggregation"
        + (", momentum)" if cfg.train.server_optimizer == "sgdm" else ")"),
        "sampling": "none assumed (cohorts drawn without replacement; the guarantee does not rest on it)",
        "event": (
            "SingleEpochTreeAggregationDpEvent(z, steps) per tree"
            if once and accountant.kind == "rdp"
            else "GaussianDpEvent(z / sqrt(tree sensitivity factor)) per tree"
        )
        + ", composed",
        "neighbours": mechanism.sampling("tree").neighbours,
        "device": f"every device: each takes part at most once in any {b} consecutive released rounds "
        "(enforced in the shards, kept across crashes)",
        "participation_limit_rounds": b,
        "restart_every": p.restart_every,
        "trees": [{"tree": v.tree, "steps": v.steps, "separation": v.separation} for v in trees],
        "noise_multiplier": p.noise_multiplier,
        "accounted_noise_multiplier": p.noise_multiplier,
        "released_rounds": len(accountant.releases),
        "q": {"min": None, "median": None, "max": None, "rule": "no sampling assumption"},
        "textbook": None,
        "pure_noise_rounds": pure_noise,
        "covers": covers,
        "guarantee": guarantee,
    }
