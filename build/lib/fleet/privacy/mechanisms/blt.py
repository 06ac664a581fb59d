"""BLT-DP-FTRL (McMahan et al. 2024): correlated Buffered-Linear-Toeplitz noise, no sampling assumed.

- **Cohort.** As DP-FTRL's: K = ceil(goal x overselect) drawn uniformly without replacement from
  the available devices, the first `goal` arrivals counted; no guarantee rests on how, only on the
  participation limit, each device at most once in any `limit_rounds(cfg)` consecutive released
  rounds, which the shards enforce.
- **Noise.** The strategy C is jax-privacy's BLT for the run's rounds and limit
  (`fleet.privacy.blt.strategy`, cached on disk). Round t releases y_t = (C G)_t + N(0, (zS)^2)
  from the mechanism's one noise source; the server optimizer then steps on g_hat_t / goal, with
  g_hat = C^-1 Y (`fleet.privacy.blt.Stream`): the round's clipped sum plus noise correlated
  across rounds so that it largely cancels in the model, a sum of the rounds' updates.
- **Accounting.** All of a segment's releases are one Gaussian mechanism of C G, of squared
  sensitivity S^2 max_u |C u|^2 over the participation patterns the limit allows, for the steps
  actually released (jax-privacy's min-separation sensitivity; a run longer than the BLT was
  optimized for is accounted for its real length). In secure mode OpenDP rounds each release's
  input onto its lattice; the rounding can differ in every round after a device's first
  participation, so sqrt(steps) times its per-release slack is added to the sensitivity
  (Minkowski). Segments compose (`fleet.privacy.segments`). The figure is every device's.
- **Resume.** Reproducible: rounds after the checkpoint are re-run with the same cohorts and noise
  and replace their entries; the buffers are part of the checkpoint, so the stream continues
  exactly. Secure: the lost rounds were released; continuing the checkpoint's stream would give
  the checkpoint's rounds a second set of correlated releases, so a fresh segment starts from the
  checkpoint's model (as DP-FTRL starts a fresh tree), the participation limit running on across
  both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fleet.config import Config
from fleet.privacy import blt
from fleet.privacy.accountant import pld_interval
from fleet.privacy.mechanisms.base import (
    ShardSums,
    check,
    check_gaussian,
)
from fleet.privacy.mechanisms.limited import LimitedMechanism
from fleet.privacy.segments import Segment, SegmentAccountant
from fleet.privacy.tree import sensitivity_factor as tree_factor

NOISE_STREAM = "blt_{segment}"
MAX_BUFFERS = 10  # jax-privacy: 3 to 7 are typical, 15+ fails numerically


@dataclass(frozen=True)
class BLTRelease:
    """One released BLT round as accounted: its segment and step, the participation limit (in
    released rounds) the shards enforced, the noise multiplier z, secure mode's per-release
    rounding slack over S, and the segment's BLT (so the ledger alone recomputes the figure)."""

    round: int
    segment: int
    step: int
    separation: int
    noise_multiplier: float
    slack: float
    buf_decay: tuple[float, ...]
    output_scale: tuple[float, ...]

    @property
    def strategy(self) -> blt.Strategy:
        return blt.Strategy(self.buf_decay, self.output_scale)

    def to_json(self) -> dict:
        d = asdict(self)
        d["buf_decay"], d["output_scale"] = list(self.buf_decay), list(self.output_scale)
        return d


class BLTAccountant(SegmentAccountant):
    """Each segment one Gaussian mechanism: factor (sqrt(max_u |C u|^2) + sqrt(steps) slack)^2."""

    @classmethod
    def factor(cls, segment: Segment) -> float:
        first: BLTRelease = segment.first
        exact = blt.sensitivity_squared(first.strategy, segment.steps, segment.separation) ** 0.5
        return (exact + segment.steps**0.5 * first.slack) ** 2


class BLTFTRL(LimitedMechanism):
    """DP-FTRL with BLT correlated noise and the run's server optimizer on the de-correlated sums."""

    name = "dp_blt"

    def __init__(self, cfg: Config, population: int, init_params: np.ndarray, noise, server, state_dir):
        super().__init__(cfg, population, init_params, noise, server, state_dir)
        p, t = cfg.privacy, cfg.train
        self.dim = len(init_params)
        self.server = server(init_params)
        self.stream = blt.Stream(self.planned(cfg), self.dim)
        self.segment = 0
        exact = p.clip_norm
        slack = noise.accounted_sensitivity(exact, self.dim, self.std) - exact if self.std > 0 else 0.0
        self.slack = slack / exact
        sens2 = blt.sensitivity_squared(self.stream.s, t.rounds, self.limit)
        interval = pld_interval(1.0, p.noise_multiplier / sens2**0.5, 1, self.delta) if self.std > 0 else 1e-3
        self.accountant = BLTAccountant(p.accountant, self.delta, interval)

    @classmethod
    def planned(cls, cfg: Config) -> blt.Strategy:
        """The BLT for the planned rounds and the enforced limit (optimized once, then cached)."""
        return blt.strategy(cfg.train.rounds, cls.limit_rounds(cfg), cfg.privacy.blt_max_buffers)

    # ---- settings -------------------------------------------------------------------------
    @classmethod
    def validate(cls, cfg: Config) -> None:
        p = cfg.privacy
        check_gaussian(cfg)
        check(not p.adaptive, "privacy.adaptive", "adaptive clipping is not available with dp_blt")
        check(
            1 <= p.blt_max_buffers <= MAX_BUFFERS,
            "privacy.blt_max_buffers",
            f"must be in 1..{MAX_BUFFERS} (got {p.blt_max_buffers}); 3 to 7 buffers are typical",
        )

    @classmethod
    def prepare(cls, cfg: Config) -> None:
        cls.planned(cfg)

    @classmethod
    def header(cls, cfg: Config, population: int) -> list[str]:
        p, n, b = cfg.privacy, cfg.train.rounds, cls.limit_rounds(cfg)
        s = cls.planned(cfg)
        sens = blt.sensitivity_squared(s, n, b)
        return [
            f"BLT-DP-FTRL, z={p.noise_multiplier:g}, clip S={p.clip_norm:g}, each device at most once "
            f"in {b} released rounds",
            f"BLT of {s.buffers} buffers (jax-privacy, for {n} rounds): squared sensitivity {sens:.4g} "
            f"(one tree of {n} rounds: {tree_factor(n, b)})",
        ]

    @classmethod
    def parse(cls, entry: dict) -> BLTRelease:
        d = {k: entry[k] for k in BLTRelease.__dataclass_fields__}
        d["buf_decay"], d["output_scale"] = tuple(d["buf_decay"]), tuple(d["output_scale"])
        return BLTRelease(**d)

    @classmethod
    def recompute(cls, cfg: Config, entries: list, kind: str, delta: float, interval: float) -> float:
        return BLTAccountant(kind, delta, interval, list(entries)).epsilon()

    @classmethod
    def offline(cls, args: Any) -> list[str]:
        """The BLT for --rounds and --separation (jax-privacy, cached), its sensitivity and epsilon
        beside tree aggregation's at the same z."""
        delta, kinds = cls.planned_question(args)
        n, b = args.rounds, max(args.separation, 1)
        s = blt.strategy(n, b)
        first = BLTRelease(0, 0, 1, b, 1.0, 0.0, s.buf_decay, s.output_scale)
        segments = [Segment(0, n, b, first)]
        out = [
            f"BLT of {s.buffers} buffers for {n} rounds, each device at most once in any {b} released "
            f"rounds: squared sensitivity {BLTAccountant.squared_sensitivity(segments):.4g} (one tree "
            f"of {n} rounds: {tree_factor(n, b)})"
        ]
        return out + BLTAccountant.planned_lines(segments, args.noise, args.target_epsilon, kinds, delta)

    # ---- the round ------------------------------------------------------------------------
    def _entry(self, r: int, available: int) -> BLTRelease:
        s = self.stream.s
        return BLTRelease(
            r,
            self.segment,
            self.stream.steps + 1,
            self.limit,
            self.cfg.privacy.noise_multiplier,
            self.slack,
            s.buf_decay,
            s.output_scale,
        )

    def release(self, r: int, sums: ShardSums) -> dict:
        g = np.asarray(sums.total, dtype=np.float64)
        step = self.stream.steps + 1
        y = self.noise.add(
            self.stream.correlated(g), self.std, step, NOISE_STREAM.format(segment=self.segment)
        )
        g_hat = self.stream.advance(g, y)
        out = self._telemetry(sums, g_hat - g)
        self.server.step((g_hat / self.cfg.fleet.goal).astype(np.float32))
        self._commit()
        return out

    @property
    def params(self) -> np.ndarray:
        return self.server.params()

    # ---- state ----------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "server": self.server.state(),
            "stream": self.stream.state(),
            "segment": self.segment,
        }

    def _load(self, state: dict) -> None:
        self.server.load_state(state["server"])
        self.stream = blt.Stream.from_state(state["stream"])
        self.segment = int(state["segment"])

    def _after_lost(self, lost: int) -> None:
        """Secure resume after released rounds were lost: a fresh segment (module docstring)."""
        self.segment = max(e.segment for e in self.ledger.releases) + 1
        self.stream = blt.Stream(self.stream.s, self.dim)

    # ---- what it says ---------------------------------------------------------------------
    def summary(self) -> dict:
        cfg, acc = self.cfg, self.accountant_of_all()
        p = cfg.privacy
        segments = acc.segments
        z = p.noise_multiplier
        out = {
            "dp": True,
            "epsilon": acc.epsilon(),
            "delta": acc.delta,
            "rho_zcdp": acc.rho(segments, z) if segments and z > 0 else None,
            "accountant": acc.kind,
            "pld_interval": acc.interval if acc.kind == "pld" else None,
            "mechanism": "BLT-DP-FTRL (buffered linear Toeplitz correlated noise, jax-privacy)",
            "event": "GaussianDpEvent(z / sqrt(BLT min-separation sensitivity)) per segment, composed",
            "blt": {**self.stream.s.to_json(), "buffers": self.stream.s.buffers},
            "segments": [
                {
                    "segment": s.index,
                    "steps": s.steps,
                    "separation": s.separation,
                    "sensitivity_squared": acc.factor(s),
                }
                for s in segments
            ],
            "noise_multiplier": z,
            "released_rounds": len(acc.releases),
            **self._whose(),
            **self._covers(),
        }
        if not self.private:
            out["pure_noise_rounds"] = self.pure_noise_rounds
        return out
