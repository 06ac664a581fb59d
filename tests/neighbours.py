"""Neighbouring runs: the same fleet, seed and secret randomness, one device's data changed.

The harness runs a fleet twice through the real round (in-process shards and coordinator), once
with the target device's update as it is ("push") and once with its data zeroed ("zero") or its
update invalid ("nan"), along one of the paths a run can take:

- `plain`: rounds one after another;
- `restart`: a shard rebuilt from its files between rounds (Ray restarting it);
- `resume`: a checkpoint, rounds released after it and lost, a new fleet resumed from the files;
- with `rng=secure`, the resume re-runs the lost rounds with fresh randomness.

"Secret" randomness is replayed, not shared by seed: the secure sampler draws from one stream per
run, seeded the same in both runs, and the noise is a spy (`SpyNoise`) whose every draw is its own
coordinate of the model. Every device's update is the unit vector of its release's own coordinate
(`tests.doubles.Neighbour`), so the released models show, release by release, which rounds' sums
(the matrix A) and which noise draws (B) each one carries: `true_sensitivity` then finds, by brute
force over every participation pattern the limit allows, what the mechanism that actually ran can
reveal of one device, independently of how the mechanism accounts itself.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from conftest import in_process_fleet, tiny_mean

from tests.doubles import Neighbour

LEAVES = 64  # model coordinates 0..63: one per release (its leaf)
NOISE0 = 64  # coordinates 64..: one per noise draw
DIM = 192

# A small fleet where a device takes part often, under a participation limit in rounds.
BASE = (
    "task.name=tests.doubles:Neighbour",
    f"task.mean_dim={DIM}",
    "fleet.population=24",
    "fleet.goal=4",
    "fleet.overselect=1.25",
    "fleet.min_reports=1",
    "fleet.failure_prob_mean=0",
    "fleet.low_memory_share=0",
    "fleet.min_separation_rounds=2",
    "privacy.clip_norm=1.0",  # each unit update is exactly at the clip: S = 1
    "privacy.delta=1e-3",
    "train.eval_every=1000",
    "train.server_lr=1.0",
)

MECHANISMS = {
    "fedavg_poisson": ("privacy=dp_fedavg",),
    "fedavg_fixed": ("privacy=dp_fedavg", "privacy.sampling=fixed_size", "privacy.accountant=rdp"),
    "fedavg_adaptive": ("privacy=dp_fedavg_adaptive", "privacy.initial_clip=1.0", "privacy.count_noise=2"),
    "ftrl": ("privacy=dp_ftrl", "train.server_optimizer=sgd", "privacy.restart_every=6"),
    "blt": ("privacy=dp_blt", "train.server_optimizer=sgd"),
}
PATHS = ("plain", "restart", "resume", "resume_secure")
ROUNDS, CHECKPOINT, LOST = 12, 5, 3


class _Secrets:
    """The run's secret draws, replayed: one stream a run, shared by every object of the run
    (a resumed coordinator goes on drawing from it, as a CSPRNG would give it fresh values)."""

    rng = random.Random(0)
    noise_keys: dict = {}


class SpyNoise:
    """A noise source whose k-th draw adds `std` to coordinate NOISE0 + k and nothing else. Keyed
    like the real source in reproducible mode (the same round and stream is the same draw: a
    re-run releases the same output), a fresh draw per call in secure mode. A scalar release
    (adaptive clipping's count) gets no noise: the harness follows the model, not the clip."""

    def __init__(self, mode: str, seed: int):
        self.mode = mode

    def add(self, x: np.ndarray, std: float, round_idx: int, stream: str) -> np.ndarray:
        out = np.asarray(x, dtype=np.float64).copy()
        if len(out) < NOISE0:
            return out
        key = (round_idx, stream) if self.mode == "reproducible" else len(_Secrets.noise_keys)
        k = _Secrets.noise_keys.setdefault(key, len(_Secrets.noise_keys))
        assert NOISE0 + k < len(out), "the harness ran out of noise coordinates"
        out[NOISE0 + k] += std
        return out

    def accounted_sensitivity(self, sensitivity: float, n: int, std: float) -> float:
        return sensitivity

    def describe(self) -> str:
        return "spy"


@dataclass
class Run:
    """What one run gave: the lines as they left the coordinator (lost rounds' too), the same lines
    before the telemetry filter (the harness's own bookkeeping), the privacy summary, the ledger,
    and each release's model, leaf and count of unit updates in its sum."""

    lines: list[dict] = field(default_factory=list)
    full: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    ledger: list[dict] = field(default_factory=list)
    models: list[np.ndarray] = field(default_factory=list)
    leaves: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    init: np.ndarray | None = None
    lost: list[int] = field(default_factory=list)  # positions in `lines` of the rounds lost to the crash
    target_counted: int = 0
    accounted: float | None = None  # DP-FTRL, BLT: the squared sensitivity their accounting rests on
    limit: int = 0


def config(mechanism: str, path: str, telemetry: str, *extra: str):
    rng = "secure" if path == "resume_secure" else "reproducible"
    return tiny_mean(*BASE, *MECHANISMS[mechanism], f"rng={rng}", f"privacy.telemetry={telemetry}", *extra)


def patch(monkeypatch) -> None:
    """The spy noise for every mechanism, and the secure sampler on the replayed stream."""
    import fleet.privacy.mechanisms as mechanisms
    import fleet.round.sampling as sampling

    monkeypatch.setattr(mechanisms, "NoiseSource", SpyNoise)
    # The sampler's own names only: anything else in the process may draw from the OS too.
    monkeypatch.setattr(sampling, "random", SimpleNamespace(SystemRandom=lambda: _Secrets.rng))
    monkeypatch.setattr(sampling, "os", SimpleNamespace(urandom=lambda n: _Secrets.rng.randbytes(n)))


def run(
    cfg,
    path: str,
    update: str,
    target: int,
    state_dir: Path,
    rounds: int = ROUNDS,
    checkpoint: int = CHECKPOINT,
    lost: int = LOST,
) -> Run:
    """One run of `rounds` rounds along `path` with the target's update `update` (see the module
    docstring); a resume checkpoints after `checkpoint` rounds and loses the next `lost`."""
    from fleet.round.shard import ShardCore

    Neighbour.TARGET, Neighbour.UPDATE = target, update
    _Secrets.rng, _Secrets.noise_keys = random.Random(12345), {}
    out = Run()
    shards, coord = in_process_fleet(cfg, 2, state_dir)
    out.init = coord.get_params().astype(np.float64)

    def step(coord) -> None:
        Neighbour.LEAF = coord.mechanism.releases
        full = {}
        outgoing = coord._outgoing
        coord._outgoing = lambda line, ev: full.update(line) or outgoing(line, ev)
        out.lines.append(_stable(coord.run_round()))
        coord._outgoing = outgoing
        out.full.append(full)
        if full.get("released"):
            out.models.append(coord.get_params().astype(np.float64))
            out.leaves.append(Neighbour.LEAF)
            out.counts.append(full["reported"] - (update == "zero" and _counted(shards, target, full)))

    if path in ("plain", "restart"):
        for i in range(rounds):
            if path == "restart" and i == checkpoint:  # rebuilt from its files, as Ray restarts it
                s = shards[0]
                t0 = cfg.fleet.start_hour * 3600.0
                shards[0] = coord.shards[0] = ShardCore(cfg, 0, s.start, s.stop, t0, str(state_dir))
            step(coord)
    else:
        for _ in range(checkpoint):
            step(coord)
        coord.checkpoint()
        for _ in range(lost):
            out.lost.append(len(out.lines))
            step(coord)
        shards, coord = in_process_fleet(cfg, 2, state_dir)  # the crash lost the old ones
        assert coord.resume() == checkpoint
        for _ in range(rounds - checkpoint):
            step(coord)
    out.summary = coord.privacy_summary()
    out.ledger = [r.to_json() for r in coord.mechanism.ledger.releases]
    rows = np.concatenate([s.cols["device_id"] for s in shards])
    out.target_counted = int(np.concatenate([s.participations for s in shards])[rows == target].sum())
    out.limit = coord.mechanism.limit_rounds(cfg)
    acc = coord.mechanism.accountant
    if getattr(acc, "segments", None):  # a matrix mechanism (DP-FTRL, BLT): its squared sensitivity
        out.accounted = acc.squared_sensitivity(acc.segments)
    return out


def _counted(shards, target: int, line: dict) -> bool:
    """Whether the target was in this round's sum (from the shards' private state: harness only)."""
    for s in shards:
        rows = np.flatnonzero(np.asarray(s.cols["device_id"]) == target)
        if len(rows) and s.last_release is not None and int(s.last_release[rows[0]]) == Neighbour.LEAF:
            return True
    return False


def _stable(line: dict) -> dict:
    """A line without its wall-clock timings (they differ between any two runs)."""
    return {k: v for k, v in line.items() if k not in ("wall_s", "timing")}


def target_for(cfg, state_dir: Path) -> int:
    """A device counted at least twice in a plain run (the most often counted one)."""
    Neighbour.TARGET = -1
    _Secrets.rng, _Secrets.noise_keys = random.Random(12345), {}
    shards, coord = in_process_fleet(cfg, 2, state_dir)
    for _ in range(ROUNDS):
        Neighbour.LEAF = coord.mechanism.releases
        coord.run_round()
    counts = np.concatenate([s.participations for s in shards])
    ids = np.concatenate([s.cols["device_id"] for s in shards])
    return int(ids[np.argmax(counts)])


def _mechanism_matrix(r: Run, sigma: float) -> tuple[list[int], np.ndarray]:
    """The released leaves and M = A^T (B B^T)^-1 A (see `true_sensitivity`)."""
    y = np.array(r.models) - r.init
    # A release made twice with the same value (a reproducible re-run) tells nothing more: once.
    _, first = np.unique(y, axis=0, return_index=True)
    y = y[np.sort(first)]
    used = sorted(set(r.leaves))
    count = {leaf: c for leaf, c in zip(r.leaves, r.counts, strict=True)}
    a = np.stack([y[:, leaf] / count[leaf] for leaf in used], axis=1)
    draws = y[:, NOISE0:]
    b = draws[:, np.any(np.abs(draws) > 1e-9, axis=0)] / sigma
    m = a.T @ np.linalg.inv(b @ b.T) @ a
    assert np.all(np.isfinite(m)), "the released models do not determine the mechanism"
    return used, m


def true_sensitivity(r: Run, sigma: float) -> float:
    """The squared L2 sensitivity (S = 1) of everything the run released, as one Gaussian
    mechanism y = A L + B Z with Z ~ N(0, sigma^2): max over the device's participation patterns
    (released rounds at least the limit apart, in release order, lost ones included) of
    mu^T (B B^T)^-1 mu, mu the shift of all the releases. rho = that / (2 sigma^2).

    The models give A (each release's coefficient on each leaf) and B (on each noise draw). The
    device's updates may point anywhere within the clip: the bound used is sum |M_ij| over the
    pattern with M = A^T (B B^T)^-1 A, which aligned updates attain when M >= 0."""
    used, m = _mechanism_matrix(r, sigma)
    best = 0.0
    for k in range(1, len(used) + 1):
        for pattern in itertools.combinations(range(len(used)), k):
            idx = [used[i] for i in pattern]
            if any(j - i < max(r.limit, 1) for i, j in itertools.pairwise(idx)):
                continue
            best = max(best, float(np.abs(m[np.ix_(pattern, pattern)]).sum()))
    return best


def round_multipliers(r: Run, sigma: float) -> np.ndarray:
    """Each released round's noise multiplier as the released models show it: sigma over the
    sensitivity of everything released to one device's unit update in that round alone."""
    _, m = _mechanism_matrix(r, sigma)
    return sigma / np.sqrt(np.diag(m))
