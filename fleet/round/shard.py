"""The shard: a Ray actor (`ShardCore`) owning a contiguous range of devices as columnar state.

The shard is where device identities live and stay. It answers check-in with a count, maps the
coordinator's ranks to its own available devices, plans their jobs, trains the accepted ones one
after another, clips each update and returns ONE sum. Nothing that leaves it names a device:
counts, arrival times by rank, sums and aggregate statistics only (docs/ARCHITECTURE.md, invariant 3).
"""

from __future__ import annotations

import ctypes
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from fleet.config import Config, FleetConfig
from fleet.learning.tasks import make_task
from fleet.phones import availability, dropout
from fleet.phones import participation as participation_shard
from fleet.phones.timing import Reason, job_seconds, plan
from fleet.privacy.clipping import clip
from fleet.privacy.mechanisms import limit_rounds
from fleet.round import checkpoint
from fleet.round.devices import device_columns, memory_eligible
from fleet.round.protocol import JobPlan, Mix, TrainReport

NEVER = np.iinfo(np.int32).min // 2  # the release index of a device never counted

# Fixed log-spaced bins for the update-norm histogram that shards release (mergeable exactly).
NORM_BINS = np.concatenate([[0.0], np.logspace(-4, 4, 33), [np.inf]])
# Fixed log10(FLOP/s) bins for the speed make-up of selected and reporting devices.
SPEED_BINS = np.concatenate([[-np.inf], np.arange(8.0, 11.51, 0.5), [np.inf]])


class ShardStateLost(RuntimeError):
    """A round call reached a shard that does not hold the round: Ray restarted it in between."""


class ShardCore:
    """The shard's logic, usable in-process; `remote_shard_class` makes it a Ray actor.

    Constructed with a state dir that holds this range's checkpoint or journal (Ray restarting
    a crashed shard, or a resumed run), it restores everything recorded there before it answers
    anything: the participation limit is a privacy guarantee and must survive a restart even
    when no call fails. `incarnation` changes with every construction, so the coordinator can
    tell (and count) a restart it did not see fail.
    """

    def __init__(
        self, cfg: Config, index: int, start: int, stop: int, t0: float = 0.0, state_dir: str | None = None
    ):
        self.cfg = cfg
        self.state_dir = Path(state_dir) if state_dir else None
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        self.index = index
        self.start, self.stop = start, stop
        f: FleetConfig = cfg.fleet
        self.task = make_task(cfg, role="client")
        if "torch" in sys.modules:  # a torch task: one thread per shard process, measured faster on CPU
            sys.modules["torch"].set_num_threads(1)
        self.cols = device_columns(cfg, start, stop, getattr(self.task, "corpus", None))
        self.n = stop - start
        self.avail = availability.make(f.availability, self.cols, cfg.seed, t0)
        self.eligible = memory_eligible(f, self.cols)
        # float64: at t ~ 1e7 s float32 would round a participation time by up to a second, and a
        # device could come back that much before its limit ends.
        self.last_participation = np.full(self.n, -np.inf, dtype=np.float64)
        self.participations = np.zeros(self.n, dtype=np.uint16)
        self.sep_s = f.min_separation_hours * 3600.0
        # The limit in released rounds (DP-FTRL's guarantee rests on it): each device's last
        # release index, kept only when such a limit is in force (4 bytes a device).
        self.sep_rounds = limit_rounds(cfg)
        self.last_release = np.full(self.n, NEVER, dtype=np.int32) if self.sep_rounds > 0 else None
        self._release_idx = 0
        self._seq = 0  # the last journal record written or replayed
        self._bitmaps: tuple[int, np.ndarray] | None = None  # schedule_privacy's, by the times asked
        self._waiting = 0
        self.seed = cfg.seed
        self._round: int | None = None
        self._available: np.ndarray = np.zeros(0, dtype=np.int64)
        self._selected: np.ndarray = np.zeros(0, dtype=np.int64)
        self.incarnation = uuid.uuid4().hex
        if self.state_dir is not None:
            self.restore(None)
        _release_freed_memory()  # the build's temporaries: 3x the rows' own size if left resident

    # ---- round protocol ------------------------------------------------------------------
    def check_in(self, round_idx: int, t: float, release_idx: int | None = None) -> int:
        """Count devices available, eligible and outside their participation limits.

        `release_idx` is the index this round's release would have (the coordinator counts
        released rounds; by default the round index): a device counted at release j may be
        counted again from release j + the limit on."""
        ok = self.avail.available(t)
        ok &= self.eligible
        out = dropout.offline(self.cfg.dropout, t, self.cols["tz_offset_hours"])
        if out is not None:
            ok &= ~out
        before = int(np.count_nonzero(ok))
        if self.sep_s > 0:
            ok &= self.last_participation <= t - self.sep_s
        self._release_idx = round_idx if release_idx is None else int(release_idx)
        if self.last_release is not None:
            ok &= self.last_release.astype(np.int64) <= self._release_idx - self.sep_rounds
        self._round = round_idx
        self._available = np.flatnonzero(ok)
        self._waiting = before - len(self._available)  # available and eligible, but for their limit
        self._selected = self._available[:0]
        return int(len(self._available))

    def plan(self, round_idx: int, t: float, deadline: float, local_ranks: np.ndarray) -> JobPlan:
        """Map ranks to devices and plan their jobs; returns arrays in rank order, no ids."""
        self._expect(round_idx, "plan")
        idx = self._available[np.asarray(local_ranks, dtype=np.int64)]
        self._selected = idx
        ids = self.cols["device_id"][idx]
        flops = self.task.job_flops(self.cols["num_examples"][idx])
        duration = job_seconds(
            self.task.cost,
            flops,
            self.cols["downlink"][idx],
            self.cols["uplink"][idx],
            self.cols["flops"][idx],
        )
        compute_s = flops / self.cols["flops"][idx].astype(np.float64)
        tz = self.cols["tz_offset_hours"][idx]
        events = dropout.job_events(
            self.cfg.dropout,
            self.seed,
            round_idx,
            ids,
            t,
            duration,
            compute_s,
            tz,
            self.cols["failure_prob"][idx],
        )
        events[Reason.WINDOW_CLOSED] = self.avail.window_end(t, idx)
        events[Reason.DEADLINE] = np.full(len(idx), deadline)
        arrival, reason = plan(t, duration, events)
        # Share of each job done before it dropped (1 for jobs that finish): for wasted compute.
        stop = np.minimum.reduce(list(events.values())) if len(idx) else np.zeros(0)
        done = np.where(
            reason == Reason.REPORTED, 1.0, np.clip((stop - t) / np.maximum(duration, 1e-9), 0, 1)
        )
        return JobPlan(arrival, reason, flops, done, self._mix(idx), self._waiting, self.incarnation)

    def _expect(self, round_idx: int, what: str) -> None:
        if self._round is None:
            raise ShardStateLost(f"shard {self.index}: {what} for round {round_idx} after a restart")
        if round_idx != self._round:
            raise RuntimeError(f"shard {self.index}: {what} for round {round_idx} without check-in")

    def _mix(self, idx: np.ndarray) -> Mix:
        """Time-zone and speed make-up of a set of devices, as counts (no ids)."""
        tz, counts = np.unique(self.cols["tz_offset_hours"][idx], return_counts=True)
        speed = np.histogram(np.log10(self.cols["flops"][idx].astype(np.float64)), bins=SPEED_BINS)[0]
        return {"tz": {f"{z:+g}": int(c) for z, c in zip(tz, counts, strict=True)}, "speed": speed.tolist()}

    def train(
        self, round_idx: int, t: float, params: np.ndarray, accepted: np.ndarray, clip_norm: float | None
    ) -> TrainReport:
        """Train the accepted devices, clip each update, return one sum and aggregate stats."""
        self._expect(round_idx, "train")
        accepted = np.asarray(accepted, dtype=bool)
        idx = self._selected[accepted]
        order = getattr(self.task, "cohort_order", None)
        if order is not None:  # the task's preferred training order; the set of devices is the same
            perm = np.asarray(order(self.cols["num_examples"][idx]), dtype=np.int64)
            if not np.array_equal(np.sort(perm), np.arange(len(idx))):
                raise RuntimeError(f"shard {self.index}: task.cohort_order did not return a permutation")
            idx = idx[perm]
        if self.cfg.train.dry_run:
            self._took_part(round_idx, t, idx)
            return self._dry(idx, len(params))
        total = np.zeros(len(params), dtype=np.float64)
        counted: list[int] = []
        loss_sum, norm_sum, unclipped = 0.0, 0.0, 0
        norm_hist = np.zeros(len(NORM_BINS) - 1, dtype=np.int64)
        ids = self.cols["device_id"][idx]
        updates = self.task.client_updates(params, ids, self.cols["num_examples"][idx], round_idx)
        # zip stops at the cohort: a task yielding extra updates for a device cannot add them.
        for pos, (delta, loss) in zip(range(len(idx)), updates, strict=False):
            delta = np.asarray(delta, dtype=np.float32)
            if delta.shape != params.shape or not np.all(np.isfinite(delta)):
                continue  # dropped with reason `invalid`: never reaches the sum
            clipped, norm = clip(delta, clip_norm)
            total += clipped
            counted.append(pos)
            loss_sum += float(loss) if np.isfinite(loss) else 0.0
            norm_sum += norm
            unclipped += int(clip_norm is None or norm <= clip_norm)
            norm_hist[np.searchsorted(NORM_BINS, norm, side="right") - 1] += 1
        ok = np.zeros(len(idx), dtype=bool)
        ok[np.asarray(counted, dtype=np.int64)] = True
        done, bad = idx[ok], idx[~ok]  # bad: trained (or missing) but invalid, never in the sum
        self._took_part(round_idx, t, idx)
        return TrainReport(
            sum=total,
            count=len(done),
            invalid=len(bad),
            invalid_flops=float(self.task.job_flops(self.cols["num_examples"][bad]).sum()),
            mix=self._mix(done),
            loss_sum=loss_sum,
            norm_sum=norm_sum,
            unclipped=unclipped,
            norm_hist=norm_hist,
            incarnation=self.incarnation,
        )

    def _dry(self, idx: np.ndarray, dim: int) -> TrainReport:
        """A dry run's training (fleet-plan): every device sent the model returns a zero update,
        valid and within the clip, so the round's counts, participation and journal are a real
        run's whose updates were all valid, at no cost per device."""
        hist = np.zeros(len(NORM_BINS) - 1, dtype=np.int64)
        hist[0] = len(idx)
        return TrainReport(
            sum=np.zeros(dim, dtype=np.float64),
            count=len(idx),
            invalid=0,
            invalid_flops=0.0,
            mix=self._mix(idx),
            loss_sum=0.0,
            norm_sum=0.0,
            unclipped=len(idx),
            norm_hist=hist,
            incarnation=self.incarnation,
        )

    def _took_part(self, round_idx: int, t: float, idx: np.ndarray) -> None:
        """Every device sent the model has taken part, whatever it returned: were an invalid update
        exempt from the limit, a device's data would decide who could be sampled next. Recorded,
        and journaled (fsynced) so that a crash forgets nobody."""
        self._record_participation(idx, t, self._release_idx)
        if self.state_dir is not None:
            self._seq += 1
            record = (self._seq, round_idx, self._release_idx, t, idx)
            checkpoint.append_journal(self.state_dir, self.start, self.stop, record)

    def _record_participation(self, rows: np.ndarray, t: float, release: int) -> None:
        # Monotone: a record replayed out of order can never make a device look longer rested.
        self.last_participation[rows] = np.maximum(self.last_participation[rows], t)
        if self.last_release is not None:
            self.last_release[rows] = np.maximum(self.last_release[rows], release)
        self.participations[rows] = np.minimum(self.participations[rows].astype(np.int64) + 1, 65535)

    # ---- checkpoints and crash recovery --------------------------------------------------
    def save_state(self, round_idx: int) -> None:
        """Checkpoint the per-device state as of the start of `round_idx` (into the run dir), with the
        last journal record it includes. Files of later rounds go: this one holds all they held."""
        arrays = {"last_participation": self.last_participation, "participations": self.participations}
        if self.last_release is not None:
            arrays["last_release"] = self.last_release
        arrays.update({f"avail_{k}": v for k, v in self.avail.state().items()})
        arrays["journal_seq"] = np.int64(self._seq)
        checkpoint.save_shard(self.state_dir, self.start, self.stop, round_idx, arrays)
        checkpoint.drop_shards_after(self.state_dir, self.start, self.stop, round_idx)

    def prune_state(self, committed_round: int) -> None:
        """The coordinator committed `committed_round`: older files, and the journal records that
        file includes, are no longer needed."""
        saved = checkpoint.load_shard(self.state_dir, self.start, self.stop, committed_round)
        checkpoint.prune_shard(self.state_dir, self.start, self.stop, committed_round)
        if saved is not None:
            done = int(saved["journal_seq"])
            journal = checkpoint.read_journal(self.state_dir, self.start, self.stop)
            later = [rec for rec in journal if rec[0] > done]
            checkpoint.write_journal(self.state_dir, self.start, self.stop, later)

    def restore(self, upto_round: int | None) -> None:
        """State as of the start of `upto_round` (None: everything recorded): the newest checkpoint
        at or before it (or the fresh state if there is none), then every journal record after it.

        Used on resume (in reproducible mode the rounds from `upto_round` on are re-run and count
        the same devices again, so their records and any later files go; in secure mode nothing
        goes) and whenever a shard is built over existing files (Ray restarting it). Restoring
        twice gives the same state: each time starts from a file, or from nothing.
        """
        if upto_round is not None:
            checkpoint.drop_shards_after(self.state_dir, self.start, self.stop, upto_round)
        saved = checkpoint.load_shard(self.state_dir, self.start, self.stop, upto_round)
        self.last_participation[:] = -np.inf
        self.participations[:] = 0
        if self.last_release is not None:
            self.last_release[:] = NEVER
        done = 0
        if saved is not None:
            done = int(saved["journal_seq"])
            self.last_participation = saved["last_participation"].astype(np.float64)
            self.participations = saved["participations"].copy()
            if self.last_release is not None and "last_release" in saved:
                self.last_release = saved["last_release"].astype(np.int32)
            avail = {k[len("avail_") :]: saved[k].copy() for k in saved if k.startswith("avail_")}
            if avail:
                self.avail.load_state(avail)
        journal = checkpoint.read_journal(self.state_dir, self.start, self.stop)
        kept = [rec for rec in journal if upto_round is None or rec[1] < upto_round]
        for seq, _, release, t, rows in kept:
            if seq > done:
                self._record_participation(rows, t, release)
        checkpoint.write_journal(self.state_dir, self.start, self.stop, kept)  # no torn tail
        self._seq = max([done, *(rec[0] for rec in kept)])
        self._round = None

    # ---- introspection (aggregates only) -------------------------------------------------
    def info(self) -> dict:
        """Size and whereabouts: devices, bytes of per-device state, node, process and the Ray
        resources this shard holds (what the scale benchmark and the placement tests check)."""
        return {
            "index": self.index,
            "devices": self.n,
            "state_bytes": self._state_bytes(),
            "node_id": _ray_context("get_node_id", None),
            "pid": os.getpid(),
            "resources": _ray_context("get_assigned_resources", {}),
            "engine": _engine_name(self.task),
            "incarnation": self.incarnation,
        }

    def _state_bytes(self) -> int:
        """Columns, participation, eligibility and the availability model's own arrays (each
        array once: the model holds some columns by reference)."""
        arrays = [*self.cols.values(), self.last_participation, self.participations, self.eligible]
        arrays += [self.last_release] if self.last_release is not None else []
        arrays += [v for v in vars(self.avail).values() if isinstance(v, np.ndarray)]
        return int(sum({id(a): a.nbytes for a in arrays}.values()))

    # ---- participation audit (aggregates only; fleet.audits.participation) ----------------------
    def participation_stats(self) -> dict:
        """Who trained, as histograms over fixed bins: no id and no per-device row leaves."""
        return participation_shard.participation(
            self.cols, self.eligible, self.participations, self.last_participation, self.cfg.fleet
        )

    def schedule_privacy(
        self, times: np.ndarray, rdp: np.ndarray, orders: np.ndarray, delta: float, nominal: float
    ) -> dict:
        """Per-device epsilon under the real availability schedule, released as aggregates. Asked of
        a fresh availability model from the run's start, so a stateful one (markov) replays the
        states the run saw; the bitmaps are kept for a second ask at other noise (a plan's)."""
        f = self.cfg.fleet
        key = hash(np.asarray(times, dtype=np.float64).tobytes())
        if self._bitmaps is None or self._bitmaps[0] != key:
            avail = availability.make(f.availability, self.cols, self.seed, f.start_hour * 3600.0)

            def reachable(t: float) -> np.ndarray:  # as check_in sees the fleet, but the limit
                ok = avail.available(t) & self.eligible
                out = dropout.offline(self.cfg.dropout, t, self.cols["tz_offset_hours"])
                return ok if out is None else ok & ~out

            self._bitmaps = (key, participation_shard.availability_bitmaps(reachable, self.n, times))
        args = (self.cols, f, times, rdp, orders, delta, nominal)
        return participation_shard.schedule_privacy(self._bitmaps[1], *args)


def _engine_name(task: Any) -> str | None:
    """The task's local-training engine, its precision and where it runs ("FusedEngine bf16 on
    cpu"), if it has one."""
    engine = getattr(task, "engine", None)
    if engine is None:
        return None
    precision = getattr(engine, "precision", None)
    name = type(engine).__name__ + (f" {precision}" if precision else "")
    why = getattr(engine, "native_unavailable", None)
    name += f" (PyTorch ops, not the native kernels: {why})" if why else ""
    return f"{name} on {getattr(engine, 'device', 'cpu')}"


def _ray_context(ask: str, default: Any) -> Any:
    """`ray.get_runtime_context().<ask>()` inside a Ray worker, `default` outside one."""
    try:
        import ray

        return getattr(ray.get_runtime_context(), ask)() if ray.is_initialized() else default
    except Exception:  # outside a Ray worker
        return default


def _release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc; elsewhere nothing to do).

    Building rows makes many column-sized temporaries. glibc raises its mmap threshold to the
    largest block freed (up to 32 MiB), so after the first few, temporaries of a few MiB come
    from the heap, and once freed they stay resident: measured 180 bytes a device after the build
    instead of the rows' 55. `malloc_trim` returns them in a few milliseconds.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def remote_shard_class(num_cpus: float, num_gpus: float) -> Any:
    import ray

    # Ray restarts a crashed shard by re-running its constructor, which restores its participation
    # state from its files before it answers anything.
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=0)(ShardCore)


__all__ = ["ShardCore", "Reason", "remote_shard_class", "NORM_BINS"]
