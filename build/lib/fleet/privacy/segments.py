"""Epsilon of the linear (correlated-noise) mechanisms, by dp-accounting: each segment one Gaussian
mechanism, segments composed.

DP-FTRL's trees (`fleet.privacy.tree`) and BLT's runs (`fleet.privacy.blt`) are matrix mechanisms:
every release of a segment is a post-processing of one Gaussian release of a linear map of the
segment's clipped sums, so the segment is one Gaussian mechanism whose squared L2 sensitivity is a
factor of S^2 that depends on how many steps the segment has released and on the participation
limit the shards enforced (each device at most once in any `separation` consecutive released
rounds): the mechanism's `factor(segment)`. Segments use independent noise and compose. Nothing here
depends on who was available or sampled: the figure is every device's.

A segment is accounted whole, step after step. One that is re-entered (a step that does not continue
the last one) would be two mechanisms sharing their inputs, which this accounting does not cover,
so it is refused: a mechanism starts a fresh segment instead (a secure resume after lost rounds).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fleet.privacy.accountant import ACCOUNTANTS, ORDERS


def up4(x: float) -> str:
    """x rounded UP to 4 significant digits, as printed for a noise multiplier that must meet a
    target (rounding to nearest could print a z just below the one found)."""
    if not (x > 0 and math.isfinite(x)):
        return f"{x:.4g}"
    scale = 10.0 ** (3 - math.floor(math.log10(x)))
    return f"{math.ceil(x * scale - 1e-9) / scale:.4g}"


class SegmentEntry(Protocol):
    """What a ledger entry of a segmented mechanism carries."""

    round: int
    step: int
    separation: int
    noise_multiplier: float

    @property
    def segment(self) -> int: ...

    def to_json(self) -> dict: ...


@dataclass
class Segment:
    """Releases of one segment: `steps` so far, under a participation limit of `separation`, and its
    first entry (where a mechanism keeps what the segment's factor reads, e.g. BLT's parameters)."""

    index: int
    steps: int
    separation: int
    first: Any = None


def extend(segments: list[Segment], r: SegmentEntry) -> list[Segment]:
    """The segments after release r (a new list): the next step of the last one, or a new one."""
    out = [Segment(s.index, s.steps, s.separation, s.first) for s in segments]
    last = out[-1] if out else None
    if last is not None and last.index == r.segment:
        if r.step != last.steps + 1:
            raise ValueError(
                f"ledger: segment {r.segment} re-entered at step {r.step} after {last.steps} steps; "
                "a segment is accounted whole, in order"
            )
        last.steps += 1
        last.separation = min(last.separation, r.separation)
    else:
        if r.step != 1 or any(s.index == r.segment for s in out):
            raise ValueError(
                f"ledger: segment {r.segment} starts at step {r.step}; a segment starts at step 1, once"
            )
        out.append(Segment(r.segment, 1, r.separation, r))
    return out


def gaussian_epsilon(z: float, kind: str, delta: float, interval: float = 1e-4) -> float:
    """Epsilon at delta of one Gaussian mechanism of noise multiplier z (noise std over the
    sensitivity). `pld`: the exact curve (dp-accounting's `GaussianPrivacyLoss`, the privacy loss of
    the Gaussian in closed form, whose delta(epsilon) is searched for the smallest epsilon, rounded
    up): a discretized PLD would only add its own pessimism, and for a small z its grid grows without
    bound. `rdp`: dp-accounting's RDP accountant. (`interval` is kept for the accountants' interface.)"""
    import dp_accounting
    from dp_accounting.pld import privacy_loss_mechanism
    from dp_accounting.rdp import rdp_privacy_accountant

    if z <= 0:
        return math.inf
    if kind == "rdp":
        relation = dp_accounting.NeighboringRelation.REPLACE_SPECIAL
        acc = rdp_privacy_accountant.RdpAccountant(list(ORDERS), relation)
        acc.compose(dp_accounting.GaussianDpEvent(z))
        return float(acc.get_epsilon(delta))
    loss = privacy_loss_mechanism.GaussianPrivacyLoss(z, sensitivity=1.0)
    if loss.get_delta_for_epsilon(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while loss.get_delta_for_epsilon(hi) > delta:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-12 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if loss.get_delta_for_epsilon(mid) > delta else (lo, mid)
    return hi


@dataclass
class SegmentAccountant:
    """The segments' epsilon over the recorded releases, with the sampled accountant's interface.
    A subclass says what one segment's squared sensitivity is (`factor`) and, where dp-accounting
    has a tighter RDP event for a segment, which (`rdp_event`)."""

    kind: str  # pld | rdp
    delta: float
    interval: float = 1e-4
    releases: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant: unknown value {self.kind!r}")
        self.segments: list[Segment] = []
        self._eps = 0.0
        releases, self.releases = self.releases, []
        self.load(releases)

    # ---- what a mechanism says ------------------------------------------------------------
    @classmethod
    def factor(cls, segment: Segment) -> float:
        """The segment's squared L2 sensitivity over S^2."""
        raise NotImplementedError

    @classmethod
    def rdp_event(cls, segment: Segment, z: float) -> Any:
        """A dp-accounting event for the segment tighter than the Gaussian of its factor, or None."""
        return None

    # ---- the figures ----------------------------------------------------------------------
    @classmethod
    def squared_sensitivity(cls, segments: Iterable[Segment]) -> float:
        """Sum of the segments' factors: the squared sensitivity of everything released, over S^2."""
        return float(sum(cls.factor(s) for s in segments))

    @classmethod
    def rho(cls, segments: Iterable[Segment], z: float) -> float:
        """zCDP of the segments: each is a Gaussian mechanism, rho = sensitivity^2 / (2 (zS)^2)."""
        return cls.squared_sensitivity(segments) / (2 * z * z)

    @classmethod
    def epsilon_of(cls, segments: list[Segment], z: float, kind: str, delta: float, interval: float) -> float:
        """Epsilon at delta of the segments, composed by dp-accounting."""
        import dp_accounting
        from dp_accounting.rdp import rdp_privacy_accountant

        if not segments:
            return 0.0
        if z <= 0:
            return math.inf
        if kind == "rdp":
            acc = rdp_privacy_accountant.RdpAccountant(
                list(ORDERS), dp_accounting.NeighboringRelation.REPLACE_SPECIAL
            )
            for s in segments:
                event = cls.rdp_event(s, z)
                acc.compose(
                    event
                    if event is not None
                    else dp_accounting.GaussianDpEvent(z / math.sqrt(cls.factor(s)))
                )
            return float(acc.get_epsilon(delta))
        # Gaussian mechanisms compose into one Gaussian: sensitivities add in quadrature.
        total = math.sqrt(2 * cls.rho(segments, z))  # sensitivity over the noise, summed
        return gaussian_epsilon(1.0 / total, kind, delta, interval)

    @classmethod
    def noise_for(cls, segments: list[Segment], target: float, kind: str, delta: float) -> float:
        """The smallest noise multiplier whose segments have epsilon <= target at delta (epsilon
        falls as z grows), to a relative 1e-6, rounded up."""
        if not target > 0:
            raise ValueError(f"target epsilon must be > 0 (got {target})")

        def eps(z: float) -> float:
            return cls.epsilon_of(segments, z, kind, delta, 1e-4)

        lo, hi = 1e-3, 1.0
        while eps(hi) > target:
            lo, hi = hi, hi * 2
            if hi > 1e6:
                raise ValueError(
                    f"no noise multiplier up to 1e6 reaches epsilon {target:g} at delta {delta:.3g}"
                )
        while hi - lo > 1e-6 * hi:
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if eps(mid) > target else (lo, mid)
        return hi

    @classmethod
    def planned_lines(
        cls, segments: list[Segment], noise: float | None, target: float | None, kinds: tuple, delta: float
    ) -> list[str]:
        """`fleet-privacy`'s lines for planned segments: rho and epsilon at z, or the z for a target."""
        out = []
        for kind in kinds:
            if target is not None and noise is None:
                z = cls.noise_for(segments, target, kind, delta)
                line = f"z = {up4(z)} gives epsilon <= {target:g} at delta = {delta:.3g} ({kind.upper()})"
                out.append(line)
            elif noise is not None and noise > 0:
                eps = cls.epsilon_of(segments, noise, kind, delta, 1e-4)
                out.append(f"epsilon = {eps:.4g} at delta = {delta:.3g} ({kind.upper()}; z = {noise:g})")
        if noise is not None and noise > 0:
            out.insert(0, f"rho = {cls.rho(segments, noise):.4g} (zCDP)")
        elif noise is not None:
            out = ["epsilon = inf (no noise)"]
        return out

    def _with(self, r: SegmentEntry) -> tuple[list[Segment], float]:
        segments = extend(self.segments, r)
        if math.isinf(self._eps) or r.noise_multiplier <= 0:
            return segments, math.inf
        return segments, self.epsilon_of(segments, r.noise_multiplier, self.kind, self.delta, self.interval)

    def epsilon(self) -> float:
        return self._eps

    def epsilon_with(self, r: SegmentEntry) -> float:
        return self._with(r)[1]

    def record(self, r: SegmentEntry) -> float:
        self.segments, self._eps = self._with(r)
        self.releases.append(r)
        return self._eps

    def snapshot(self) -> dict:
        return {"releases": len(self.releases)}

    def load(self, releases: Iterable[SegmentEntry], snapshot: dict | None = None) -> None:
        """Continue from a ledger: its segments, and their epsilon computed once (it depends only
        on each segment's steps and separation)."""
        self.releases, self.segments, self._eps = list(releases), [], 0.0
        for r in self.releases:
            self.segments = extend(self.segments, r)
        if self.releases:
            z = self.releases[-1].noise_multiplier
            if any(r.noise_multiplier <= 0 for r in self.releases):
                self._eps = math.inf
            else:
                self._eps = self.epsilon_of(self.segments, z, self.kind, self.delta, self.interval)
