"""DP-FTRL (Kairouz et al. 2021): tree aggregation of the rounds' clipped sums, no sampling assumed.

- **Cohort.** Drawn uniformly without replacement from the available devices (K = ceil(goal x
  overselect)), the first `goal` arrivals counted, as for fixed-size DP-FedAvg; but no guarantee
  rests on how: only on the participation limit, each device at most once in any
  `limit_rounds(cfg)` consecutive released rounds, which the shards enforce.
- **Noise.** Each node of the tree is noised once, when its last leaf arrives, with N(0, (zS)^2)
  from the mechanism's noise source; a release is the sum of its cover's noised nodes
  (`fleet.privacy.tree`), the model FTRL's (`fleet.privacy.ftrl_server`).
- **Accounting.** Each tree is one Gaussian mechanism of squared sensitivity
  `tree.sensitivity_factor(steps, limit)` S^2; trees compose (`fleet.privacy.tree_accountant`).
  The figure does not depend on who was available or sampled: it is every device's.
- **Resume.** Reproducible: rounds after the checkpoint are re-run with the same cohorts and the
  same node noise, and replace their entries. Secure: those rounds were released with nodes of
  their own; continuing the checkpoint's tree would put the checkpoint's leaves into a second
  set of nodes (a true squared sensitivity far above the one accounted), so training continues
  in a fresh tree from the checkpoint's model. The lost rounds' tree stays accounted as it was
  released, the new tree is accounted as a tree of its own, and the participation limit runs on
  across both (the lost rounds stay counted), so the two compose as independent trees.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fleet.config import Config
from fleet.privacy import tree as tree_lib
from fleet.privacy.accountant import pld_interval
from fleet.privacy.ftrl_server import FTRLServer
from fleet.privacy.mechanisms.base import (
    ShardSums,
    check,
    check_gaussian,
)
from fleet.privacy.mechanisms.limited import LimitedMechanism
from fleet.privacy.tree_accountant import TreeAccountant, TreeRelease, planned_trees

NODE_STREAM = "ftrl_node_{tree}_{level}"


class TreeFTRL(LimitedMechanism):
    """DP-FTRL(M) with tree aggregation and optional restarts."""

    name = "dp_ftrl"

    def __init__(self, cfg: Config, population: int, init_params: np.ndarray, noise, server, state_dir):
        super().__init__(cfg, population, init_params, noise, server, state_dir)
        p, t = cfg.privacy, cfg.train
        # Each node's multiplier, with the sensitivity the noise source says to account.
        sens = noise.accounted_sensitivity(p.clip_norm, len(init_params), self.std) if self.std > 0 else 1.0
        self.accounted = self.std / sens
        momentum = t.server_momentum if t.server_optimizer != "sgd" else 0.0
        self.server = FTRLServer(init_params, t.server_lr, momentum, p.restart_every, self._noised_node)
        interval = pld_interval(1.0, self.accounted, t.rounds, self.delta)  # no amplification
        self.accountant = TreeAccountant(p.accountant, self.delta, interval)

    def _noised_node(self, tree: int, exact: np.ndarray, level: int, index: int) -> np.ndarray:
        return self.noise.add(exact, self.std, index, NODE_STREAM.format(tree=tree, level=level))

    # ---- settings -------------------------------------------------------------------------
    @classmethod
    def validate(cls, cfg: Config) -> None:
        p = cfg.privacy
        check_gaussian(cfg)
        check(p.restart_every >= 0, "privacy.restart_every", f"must be >= 0 (got {p.restart_every})")
        check(not p.adaptive, "privacy.adaptive", "adaptive clipping is not available with dp_ftrl")
        check(
            cfg.train.server_optimizer in ("sgd", "sgdm", "momentum"),
            "train.server_optimizer",
            "dp_ftrl's server is FTRL: sgd (plain), or sgdm / momentum (DP-FTRLM: heavy-ball "
            "momentum on the prefix sums; Nesterov has no FTRL form)",
        )

    @classmethod
    def header(cls, cfg: Config, population: int) -> list[str]:
        p = cfg.privacy
        restart = f"a new tree every {p.restart_every} rounds" if p.restart_every else "one tree"
        return [
            f"DP-FTRL, z={p.noise_multiplier:g}, clip S={p.clip_norm:g}, {restart}, each device at most "
            f"once in {cls.limit_rounds(cfg)} released rounds"
        ]

    @classmethod
    def parse(cls, entry: dict) -> TreeRelease:
        fields = ("round", "tree", "step", "separation", "noise_multiplier")
        return TreeRelease(**{k: entry[k] for k in fields})

    @classmethod
    def recompute(cls, cfg: Config, entries: list, kind: str, delta: float, interval: float) -> float:
        return TreeAccountant(kind, delta, interval, list(entries)).epsilon()

    @classmethod
    def offline(cls, args: Any) -> list[str]:
        """Rounds split into trees of --restart-every, each device at most once in any
        --separation released rounds: rho (zCDP) and epsilon by both accountants."""
        delta, kinds = cls.planned_question(args)
        size = args.restart_every or args.rounds
        trees = planned_trees(args.rounds, args.restart_every, args.separation)
        k = tree_lib.participations(min(size, args.rounds), args.separation)
        out = [
            f"{len(trees)} tree(s) of up to {size} rounds; each device at most once in any "
            f"{args.separation} released rounds: at most {k} participation(s) per tree, squared "
            f"sensitivity {TreeAccountant.squared_sensitivity(trees):g} (exact)"
        ]
        return out + TreeAccountant.planned_lines(trees, args.noise, args.target_epsilon, kinds, delta)

    # ---- the round ------------------------------------------------------------------------
    def _entry(self, r: int, available: int) -> TreeRelease:
        tree, step = self.server.position()
        return TreeRelease(r, tree, step, self.limit, self.accounted)

    def release(self, r: int, sums: ShardSums) -> dict:
        self.server.step(sums.total, self.cfg.fleet.goal)  # (every update invalid: a zero leaf)
        out = self._telemetry(sums, prefix_norm=self.server.last_noise_norm)  # the release is a prefix
        self._commit()
        return out

    @property
    def params(self) -> np.ndarray:
        return self.server.params.copy()

    # ---- state ----------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"ftrl": self.server.state()}

    def _load(self, state: dict) -> None:
        self.server.load_state(state["ftrl"])

    def _after_lost(self, lost: int) -> None:
        """Secure resume after released rounds were lost: a fresh tree (see the module docstring)."""
        self.server.restart(max(e.tree for e in self.ledger.releases) + 1)

    # ---- what it says ---------------------------------------------------------------------
    def summary(self) -> dict:
        cfg, acc = self.cfg, self.accountant_of_all()
        p = cfg.privacy
        trees = acc.trees
        once = all(tree_lib.participations(v.steps, v.separation) == 1 for v in trees)
        out = {
            "dp": True,
            "epsilon": acc.epsilon(),
            "delta": acc.delta,
            "rho_zcdp": acc.rho(trees, self.accounted) if trees and self.accounted > 0 else None,
            "accountant": acc.kind,
            "pld_interval": acc.interval if acc.kind == "pld" else None,
            "mechanism": "DP-FTRL (tree aggregation"
            + (", momentum)" if cfg.train.server_optimizer != "sgd" else ")"),
            "event": (
                "SingleEpochTreeAggregationDpEvent(z, steps) per tree"
                if once and acc.kind == "rdp"
                else "GaussianDpEvent(z / sqrt(tree sensitivity factor)) per tree"
            )
            + ", composed",
            "restart_every": p.restart_every,
            "trees": [{"tree": v.index, "steps": v.steps, "separation": v.separation} for v in trees],
            "noise_multiplier": p.noise_multiplier,
            "accounted_noise_multiplier": self.accounted,
            "released_rounds": len(acc.releases),
            **self._whose(),
            **self._covers(),
        }
        if not self.private:
            out["pure_noise_rounds"] = self.pure_noise_rounds
        return out
