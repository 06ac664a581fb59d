"""The interface every privacy mechanism implements, and what they share.

A mechanism owns everything its guarantee rests on, so that no other module re-implements one of
its rules (each place that did was where a new mechanism went wrong):

- its settings, checked before anything starts (`validate`, `check_budget`), and the
  participation limit the shards enforce (`limit_rounds`);
- how a round's cohort is drawn and closed (`cohort`);
- the clip norm the shards apply (`clip_norm`) and the noise it adds: its `NoiseSource` is called
  nowhere else;
- the released model (`params`): what checkpoints, evaluation and every audit read;
- the ledger entry of each release and the accountant that composes them, committed before the
  round's line leaves (`release`);
- its state, and what a resume does with rounds released after the checkpoint (`state`,
  `resume`): in reproducible mode they are re-run identically and replace their entries; in
  secure mode they were fresh releases and stay accounted;
- what it says: its header lines and its summary (`header`, `summary`).

The coordinator drives a round through `begin`, `cohort`, `clip_norm` and `release`, and never
asks which mechanism it holds. Adding a mechanism is a module in this package and a line in the
registry (`fleet.privacy.mechanisms.MECHANISMS`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from fleet.config import Config, ConfigError
from fleet.privacy.ledger import LEDGER_FILE, Ledger
from fleet.privacy.noise import NoiseSource

ACCOUNTANTS = ("pld", "rdp")


class ArgumentError(ValueError):
    """A missing or bad argument of an offline question (`fleet-privacy`): a usage error."""


# What every DP run's outputs say about the world the guarantee is stated in.
PUBLIC_WORLD = (
    "a device's presence, schedule, speed and example count are the simulated world, public on "
    "both sides: its job time, and so whether it makes the deadline, follows from them"
)


def default_delta(population: int) -> float:
    """delta = 1 / N^1.1: below 1/N, as user-level DP needs."""
    return float(population) ** -1.1


def run_delta(privacy: Any, population: int) -> float:
    return privacy.delta if privacy.delta is not None else default_delta(population)


def cohort_size(fleet: Any) -> int:
    """K = ceil(goal x overselect): the devices a round selects (or aims at, for Poisson)."""
    return math.ceil(fleet.goal * fleet.overselect)


def check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    check(value in choices, key, f"unknown value {value!r}; expected one of {', '.join(choices)}")


def check_gaussian(cfg: Config) -> None:
    """The settings every Gaussian mechanism reads: noise, clip, delta, budget, accountant."""
    p = cfg.privacy
    check(p.noise_multiplier >= 0, "privacy.noise_multiplier", f"must be >= 0 (got {p.noise_multiplier})")
    check(
        p.noise_multiplier > 0 or p.allow_zero_noise,
        "privacy.noise_multiplier",
        "0 adds no noise: epsilon is infinite. Set privacy.allow_zero_noise=true to clip without "
        "noise on purpose, or use privacy=none",
    )
    check(p.clip_norm > 0, "privacy.clip_norm", f"must be > 0 (got {p.clip_norm})")
    if p.delta is not None:
        check(0 < p.delta < 1, "privacy.delta", f"must be in (0, 1) (got {p.delta})")
    if p.target_epsilon is not None:
        check(p.target_epsilon > 0, "privacy.target_epsilon", f"must be > 0 (got {p.target_epsilon})")
    choice(p.accountant, "privacy.accountant", ACCOUNTANTS)


def check_delta_for(cfg: Config, population: int) -> float:
    """The run's delta, refused unless below 1 / population: with delta >= 1/N a mechanism that
    publishes one random device's data in the clear meets the guarantee, so it promises nothing
    (and dp-accounting's conversions break down on such deltas)."""
    delta = run_delta(cfg.privacy, population)
    problem = delta_problem(delta, population)
    check(
        problem is None,
        "privacy.delta",
        f"{problem}: a guarantee that may fail with that probability may fail for a whole device; "
        "leave it unset for 1 / N^1.1",
    )
    return delta


def delta_problem(delta: float, population: int) -> str | None:
    """Why `delta` promises nothing for a fleet of `population` devices, or None (the one rule,
    for the run's config and for `fleet-privacy`'s flags)."""
    if delta < 1.0 / population:
        return None
    return f"{delta:.3g} is not below 1 / population = {1.0 / population:.3g}"


@dataclass(frozen=True)
class Cohort:
    """How a round's cohort is drawn and closed, given how many devices are available.

    `q` is the chance that a device available in this round is selected; `size` the cohort aimed
    at (K, capped at the available count). `poisson`: each available device independently with
    q (the size is random), else exactly `size` of them. `closes_on_goal`: the first `goal`
    arrivals are counted and later ones are `after_goal`; else every arrival before the deadline.
    """

    q: float
    size: int
    poisson: bool
    closes_on_goal: bool


def sampled_cohort(cfg: Config, available: int) -> Cohort:
    """DP-FedAvg's cohort rule, which its no-DP and clip-only baselines share so that they differ
    from it in the noise alone: `poisson`, each available device with q_r = min(1, K / available_r)
    and every arrival before the deadline counted; `fixed_size`, exactly K and the first `goal`
    arrivals."""
    k = cohort_size(cfg.fleet)
    q = min(1.0, k / available) if available else 0.0
    poisson = cfg.privacy.sampling == "poisson"
    return Cohort(q, min(k, available), poisson=poisson, closes_on_goal=not poisson)


@dataclass(frozen=True)
class ShardSums:
    """What the shards return for the mechanism: the sum of the clipped valid updates, how many
    there were, and how many of them were at or under the clip norm (adaptive clipping's count)."""

    total: np.ndarray
    reported: int
    unclipped: int


class ModelStep(Protocol):
    """A server optimizer: moves the model along an update (post-processing of the release)."""

    def step(self, update: np.ndarray) -> np.ndarray: ...
    def params(self) -> np.ndarray: ...
    def state(self) -> dict: ...
    def load_state(self, state: dict) -> None: ...


ServerFactory = Callable[[np.ndarray], ModelStep]


class Mechanism(ABC):
    """A privacy mechanism over the fleet's rounds (see the module docstring)."""

    name: ClassVar[str]
    dp: ClassVar[bool] = True
    # True when a device's epsilon depends on how often it could be sampled (its availability):
    # the participation audit then computes it per device; False: every device has the run's.
    amplified_by_sampling: ClassVar[bool] = False

    def __init__(
        self,
        cfg: Config,
        population: int,
        init_params: np.ndarray,
        noise: NoiseSource,
        server: ServerFactory,
        state_dir: Path | None,
    ):
        self.cfg = cfg
        self.population = population
        self.noise = noise
        self.private = cfg.privacy.telemetry == "private"
        self.delta = run_delta(cfg.privacy, population)
        self.ledger = Ledger(Path(state_dir) / LEDGER_FILE if state_dir else None, self.parse)
        self.clip_norm: float | None = None
        self.accountant: Any = None
        self._pending: Any = None
        self._replay: list = []  # entries released before a reproducible resume, not yet re-run
        self.pure_noise_rounds = 0  # released rounds whose every update was invalid
        self.noise_sum: np.ndarray | None = None  # telemetry: the noise in the sum of released updates

    # ---- settings (class level: checked before anything starts) ---------------------------
    @classmethod
    @abstractmethod
    def validate(cls, cfg: Config) -> None:
        """Every setting the mechanism reads, one line naming the key (ConfigError)."""

    @classmethod
    def limit_rounds(cls, cfg: Config) -> int:
        """The participation limit in released rounds that the shards enforce (0: none)."""
        return int(cfg.fleet.min_separation_rounds)

    @classmethod
    def check_budget(cls, cfg: Config, population: int) -> None:
        """Refuse, before start-up, settings no round can meet once the population is known."""
        return None

    @classmethod
    def prepare(cls, cfg: Config) -> None:
        """Slow set-up worth doing once on the driver, before start-up, with its progress on the
        console (BLT optimizes its strategy and caches it): nothing by default."""
        return None

    @classmethod
    @abstractmethod
    def header(cls, cfg: Config, population: int) -> list[str]:
        """What the start-up header says of the mechanism: its first line names it."""

    @classmethod
    @abstractmethod
    def parse(cls, entry: dict) -> Any:
        """A ledger line as this mechanism's release entry."""

    @classmethod
    def recompute(cls, cfg: Config, entries: list, kind: str, delta: float, interval: float) -> float:
        """Epsilon of a run's ledger under accountant `kind` (`fleet-privacy --run`)."""
        return math.inf

    @classmethod
    def interval(cls, cfg: Config, population: int, accounted: float, delta: float) -> float:
        """The PLD discretisation interval a run with this accounted noise multiplier uses (the
        matrix mechanisms' PLD figure is exact and needs none)."""
        return 1e-4

    @classmethod
    def offline(cls, args: Any) -> list[str]:
        """`fleet-privacy --mechanism NAME ...`: the figure for planned settings, as lines to print
        (ArgumentError names a missing or bad argument)."""
        raise ArgumentError(f"--mechanism {cls.name}: no offline figure")

    # ---- the round ------------------------------------------------------------------------
    @property
    def releases(self) -> int:
        """Released rounds so far (the participation limit's clock); during a reproducible re-run,
        the ones re-released so far."""
        return len(self.ledger.releases) - len(self._replay)

    @abstractmethod
    def cohort(self, available: int) -> Cohort:
        """How this round's cohort is drawn and closed."""

    def begin(self, r: int, available: int) -> str | None:
        """Prepare round r's release (before anyone is sampled); a stop reason if releasing it
        would pass privacy.target_epsilon."""
        self._pending = self._entry(r, available)
        if self._replay and self._pending != self._replay[0]:
            # The re-run went another way (a round abandoned this time, say): what was released
            # before stays accounted, as after a secure resume; the re-run goes on as new releases.
            # (The shards dropped those rounds' participants when they restored for the re-run:
            # reproducible mode keeps no guarantee across such a divergence.)
            for lost in self._replay if self.accountant is not None else []:
                self.accountant.record(lost)
            self._replay = []
            self._after_lost(1)
            self._pending = self._entry(r, available)
        target = self.cfg.privacy.target_epsilon
        if self._replay or self.accountant is None or target is None or available <= 0:
            return None  # a release being made again was accounted when it was first made
        return "target_epsilon" if self.accountant.epsilon_with(self._pending) > target else None

    @abstractmethod
    def _entry(self, r: int, available: int) -> Any:
        """Round r's ledger entry, were it released."""

    @abstractmethod
    def release(self, r: int, sums: ShardSums) -> dict:
        """Noise, release and account round r (begun with `begin`); the release's metrics."""

    def _telemetry(self, sums: ShardSums, noise: np.ndarray | None = None, prefix_norm: float = 0.0) -> dict:
        """What a release says of itself (research telemetry; under private telemetry only the
        release leaves the coordinator): whether it was the noise alone (every update invalid), its
        noise's norm, the noise in the sum of the released updates so far (`noise`, this round's
        noise vector, is added up here; a mechanism whose release is already a prefix, the tree,
        gives that prefix's noise norm instead), and the signal over the noise."""
        out: dict[str, Any] = {}
        if sums.reported == 0:
            out["pure_noise"] = True
            self.pure_noise_rounds += 1
        if noise is not None:
            if self.noise_sum is None:
                self.noise_sum = np.zeros(noise.shape, dtype=np.float64)
            self.noise_sum += noise
            out["noise_norm"] = float(np.linalg.norm(noise))
            out["prefix_noise_norm"] = float(np.linalg.norm(self.noise_sum))
        else:
            out["noise_norm"] = out["prefix_noise_norm"] = prefix_norm
        out["signal_to_noise"] = float(np.linalg.norm(sums.total)) / max(out["noise_norm"], 1e-30)
        return out

    def _commit(self) -> None:
        """The round's entry into the ledger (fsynced) and the accountant: before its line leaves."""
        entry, self._pending = self._pending, None
        if self._replay:  # the same release again (reproducible re-run): it is accounted once
            self._replay.pop(0)
            if self.accountant is not None:
                self.accountant.record(entry)
            return
        self.ledger.append(entry)
        if self.accountant is not None:
            self.accountant.record(entry)

    @property
    @abstractmethod
    def params(self) -> np.ndarray:
        """The released model."""

    def epsilon(self) -> float | None:
        """The epsilon of the releases so far, as this run's lines show it."""
        return self.accountant.epsilon() if self.accountant is not None else None

    def accountant_of_all(self) -> Any:
        """The accountant over every release the ledger holds, including rounds released before a
        reproducible resume and not (yet) re-run: what a summary must state."""
        if not self._replay or self.accountant is None:
            return self.accountant
        acc = self.accountant
        return type(acc)(acc.kind, acc.delta, acc.interval, list(self.ledger.releases))

    # ---- state ----------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything needed to continue exactly (no device id); `model` is the released model."""
        return {
            "name": self.name,
            "model": self.params.copy(),
            "releases": self.releases,
            "clip_norm": self.clip_norm,
            "accountant": self.accountant.snapshot() if self.accountant is not None else None,
            "pld_interval": getattr(self.accountant, "interval", None),
            "pure_noise_rounds": self.pure_noise_rounds,
            "noise_sum": None if self.noise_sum is None else self.noise_sum.copy(),
            **self._state(),
        }

    @abstractmethod
    def _state(self) -> dict: ...

    @abstractmethod
    def _load(self, state: dict) -> None: ...

    def resume(self, state: dict, secure: bool) -> None:
        """Continue from a checkpoint. Reproducible: the rounds released after it are re-run with
        the same cohorts and noise; their entries stay in the ledger and each re-run release is
        matched against one (`begin`, `_commit`), so a resumed run that stops before re-running
        them all still accounts them. Secure: they were fresh releases and stay accounted
        (`_after_lost` says what else that means for the mechanism)."""
        committed = int(state["releases"])
        check(
            self.releases >= committed,
            "resume",
            f"the ledger holds {self.releases} releases, fewer than the {committed} the checkpoint "
            "counted: it was damaged or replaced, and the run's epsilon cannot be trusted",
        )
        self._replay = [] if secure else list(self.ledger.releases[committed:])
        self._load(state)
        self.clip_norm = state["clip_norm"]
        self.pure_noise_rounds = state.get("pure_noise_rounds", 0)
        saved = state.get("noise_sum")
        self.noise_sum = None if saved is None else np.array(saved, dtype=np.float64)
        if self.accountant is not None:
            if state.get("pld_interval"):
                self.accountant.interval = state["pld_interval"]
            self.accountant.load(self.ledger.releases[: self.releases], state.get("accountant"))
        if self.releases > committed:
            self._after_lost(self.releases - committed)

    def _after_lost(self, lost: int) -> None:
        """Secure resume: `lost` rounds were released after the checkpoint (nothing more to do
        unless the mechanism's state spans rounds, as a tree does)."""
        return None

    # ---- what it says ---------------------------------------------------------------------
    @abstractmethod
    def summary(self) -> dict:
        """The epsilon and, beside it, what it covers, under which mechanism and assumptions."""

    def _covers(self) -> dict:
        """The coverage and guarantee statements every DP summary carries."""
        cfg = self.cfg
        covers = (
            "the model (and the noised clip norm) only: metrics.jsonl holds nothing else"
            if self.private
            else "the model only; telemetry not covered (metrics.jsonl, W&B and reports hold un-noised "
            "per-round statistics: privacy.telemetry=private leaves them out)"
        )
        guarantee = (
            f"secure randomness (cohort from the OS CSPRNG; noise: {self.noise.describe()})"
            if cfg.rng == "secure"
            else "not a guarantee: reproducible randomness (the cohort and the noise follow from the "
            "seed in the config; use rng=secure)"
        )
        return {"covers": covers, "guarantee": guarantee, "public": PUBLIC_WORLD}
