"""The Coordinator: the clock, the secret sampler and the round protocol over the shards.

One round (docs/ARCHITECTURE.md, "One round"; the numbers are its steps):
1. check-in: each shard returns how many of its devices are available now;
2. the mechanism prepares the round's release (a target epsilon that it would pass stops here)
   and says how the cohort is drawn: K = ceil(goal * overselect) ranks without replacement, or
   each available device with q_r = min(1, K / available_r) (Poisson); the secret sampler draws;
3. plan: shards return each selected device's arrival time (or drop reason) by rank; a cohort
   that closes on its goal accepts the first `goal` arrivals before the deadline (later ones are
   `after_goal`), a Poisson cohort every arrival before the deadline (nothing caps it); with
   fewer than `min_reports` the round is abandoned and releases nothing;
5. shards train the accepted devices and return one clipped sum each;
6. the privacy mechanism (`fleet.privacy.mechanisms`) releases the round: its noise, its model
   step, its ledger entry and its accounting, before the round's line leaves.

The coordinator never asks which mechanism it holds: how the cohort is drawn and closed, the
clip norm, the noise and what is accounted are the mechanism's.

The coordinator never sees a device id: only counts, ranks, arrival times and sums. With
`privacy.telemetry=private` the line it returns holds only what is released and accounted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from fleet.config import Config, min_reports
from fleet.learning.tasks import make_task
from fleet.phones import dropout
from fleet.phones.timing import Reason
from fleet.privacy import mechanisms
from fleet.privacy.mechanisms import ShardSums
from fleet.round import checkpoint
from fleet.round.calls import ShardCrash, call_all
from fleet.round.closing import Closing, close_cohort
from fleet.round.protocol import TrainReport, merge_mix
from fleet.round.sampling import Sampler, split_ranks
from fleet.round.server import ServerOptimizer
from fleet.round.shard import NORM_BINS, ShardCore

# The round's timed phases: each round line's `timing` (wall seconds, telemetry).
PHASES = ("checkin_s", "sampling_s", "plan_s", "training_s", "aggregation_s")

# What a metrics line holds under `privacy.telemetry=private`: the release (the model is not in
# the line), what is noised and accounted (the clip norm, moved by a noised count), and
# evaluations of the released model on held-out devices. Not the epsilon: under a participation
# limit each round's q_r depends on who was sampled before, so the figure is published once, in
# the summary.
PRIVATE_KEYS = {"round", "released", "abandoned", "clip_norm", "incident", "stop"}


class Coordinator:
    """Runs rounds over the shards. Usable in-process (tests) or as a Ray actor (`fleet-train`)."""

    def __init__(self, cfg: Config, shards: list[Any], population: int, state_dir: str | None = None):
        self.cfg = cfg
        self.shards = shards
        self.state_dir = Path(state_dir) if state_dir else None
        self.incidents = {"shard_crash": 0, "shard_restart": 0, "shard_lost": 0}
        self._lost: set[int] = set()  # shards not running again within ray.recovery_timeout_s
        infos = call_all(shards, "info", [()] * len(shards))
        self._incarnations = [info["incarnation"] for info in infos]
        self.population = population
        t = cfg.train
        # A dry run (fleet-plan) has no model: a one-coordinate stand-in carries the mechanism.
        self.task = None if t.dry_run else make_task(cfg, role="server")

        def server(params: np.ndarray) -> ServerOptimizer:
            return ServerOptimizer(params, t.server_optimizer, t.server_lr, t.server_momentum)

        # The mechanism holds the released model, the noise, the ledger and the accountant.
        init = np.zeros(1, dtype=np.float32) if self.task is None else self.task.init_params()
        self.mechanism = mechanisms.build(cfg, population, init, server, self.state_dir)
        self.sampler = Sampler(cfg.rng, cfg.seed)
        self.clock = cfg.fleet.start_hour * 3600.0
        self.round = 0
        self.private = cfg.privacy.telemetry == "private"

    # ---- the round -----------------------------------------------------------------------
    def run_round(self) -> dict:
        """One round; a shard crash abandons it (nothing released) and the shard is recovered.

        Returns the round's metrics line; a line with `stop` set is a round that did not happen
        (releasing it would pass privacy.target_epsilon): nothing ran and the round counter stays.
        """
        wall0 = time.perf_counter()
        self.clock = dropout.next_active_time(self.cfg.dropout, self.clock)
        try:
            line = self._round(self.round, self.clock)
        except ShardCrash as e:
            self.incidents["shard_crash"] += 1
            line = self._crash_line(self.round, self.clock, str(e))
            line.update(self._recover_shards())  # the abandoned round's journal records stand
            self.clock += self.cfg.fleet.deadline_s + self.cfg.fleet.round_interval_s
        if line.get("stop"):
            return self._outgoing(line, {})
        self.round += 1
        evaluation = self.evaluate() if self.round % self.cfg.train.eval_every == 0 else {}
        line.update(evaluation)
        line["wall_s"] = time.perf_counter() - wall0
        return self._outgoing(line, evaluation)

    def _outgoing(self, line: dict, evaluation: dict) -> dict:
        """The line as it leaves the coordinator. Under private telemetry: only the release, what
        is noised and accounted, and evaluations of the released model on held-out devices."""
        if not self.private:
            return line
        return {k: v for k, v in line.items() if k in PRIVATE_KEYS or k in evaluation}

    def _crash_line(self, r: int, t: float, why: str) -> dict:
        """Metrics of a round abandoned because a shard died: it released nothing, and what it
        would have counted is unknown (None: a gap in every plot, not a drop to zero)."""
        return {
            "round": r,
            "sim_time": t,
            "hour_of_day": (t / 3600.0) % 24.0,
            "available": None,
            "selected": None,
            "reported": None,
            "dropped": {},
            "abandoned": True,
            "released": False,
            "incident": "shard_crash",
            "incident_detail": why,
            "round_duration_s": self.cfg.fleet.deadline_s,
            "wasted_flops": None,
            "epsilon": self.mechanism.epsilon(),
            "clip_norm": self.mechanism.clip_norm,
        }

    def _recover_shards(self) -> dict:
        """Wait, up to `ray.recovery_timeout_s` in all, for Ray to restart the dead shards (on
        another node if theirs is gone). A restarted shard restores everything recorded in its
        files (its newest checkpoint and every journal record after it) before it answers, so
        nothing more is asked of it: restoring it again would give the same state.

        Returns what the round's line says of the recovery: the shards restarted, how long it
        took, and the shards still not running at the deadline (the run then stops; `checkpoint`
        skips them: their files and journal already hold their state)."""
        if self.shards and isinstance(self.shards[0], ShardCore):
            return {}
        import ray

        t0 = time.monotonic()
        deadline = t0 + self.cfg.ray.recovery_timeout_s
        restarted, lost = [], []
        for i, s in enumerate(self.shards):
            alive = None
            while alive is None and time.monotonic() < deadline:
                try:
                    alive = ray.get(s.info.remote(), timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                except (
                    ray.exceptions.RayActorError,
                    ray.exceptions.ActorUnavailableError,
                    ray.exceptions.GetTimeoutError,
                ):
                    time.sleep(0.2)
            if alive is None:
                lost.append(i)
            elif alive["incarnation"] != self._incarnations[i]:
                restarted.append(i)
                self._incarnations[i] = alive["incarnation"]
        out: dict[str, Any] = {"recovery_s": time.monotonic() - t0, "restarted_shards": restarted}
        if lost:
            self._lost = set(lost)
            self.incidents["shard_lost"] += len(lost)
            out.update({"incident": "shard_lost", "lost_shards": lost})
        return out

    def _round(self, r: int, t: float) -> dict:
        """Check-in, the secret sample, the plans, how the cohort closes, training and the
        release, in that order (docs/ARCHITECTURE.md, steps 1-6); returns the round's line."""
        f = self.cfg.fleet
        mech = self.mechanism
        timing = dict.fromkeys(PHASES, 0.0)
        with _timed(timing, "checkin_s"):
            counts = call_all(self.shards, "check_in", [(r, t, mech.releases)] * len(self.shards))
        total = int(sum(counts))
        stop = mech.begin(r, total)
        if stop is not None:
            return {"round": r, "stop": stop, "epsilon": mech.epsilon()}
        with _timed(timing, "sampling_s"):
            cohort = mech.cohort(total)
            if cohort.poisson:
                ranks = self.sampler.draw_poisson(r, total, cohort.q)
            else:
                ranks = self.sampler.draw(r, total, cohort.size)
            local = split_ranks(ranks, counts)
        deadline = t + f.deadline_s
        with _timed(timing, "plan_s"):
            plans = call_all(self.shards, "plan", [(r, t, deadline, lr) for lr in local])
            restarts = self._check_incarnations([p.incarnation for p in plans])
            closing = close_cohort(plans, cohort.closes_on_goal, f.goal, deadline)
        abandoned = closing.n_accepted < min_reports(f)
        results: list[TrainReport] = []
        metrics: dict[str, Any] = {}
        reported = closing.n_accepted  # an abandoned round: the arrivals it had, none trained
        if not abandoned:
            with _timed(timing, "training_s"):
                results = self._train(r, t, local, closing.accepted)
            restarts += self._check_incarnations([res.incarnation for res in results])
            reported = int(sum(res.count for res in results))
            with _timed(timing, "aggregation_s"):
                metrics = self._aggregate(r, results, reported)
        line = {"round": r, "sim_time": t, "hour_of_day": (t / 3600.0) % 24.0, "available": total}
        line.update(self._telemetry(t, closing, results, reported, abandoned))
        line.update({"selected": int(len(ranks)), "q": cohort.q, "epsilon": mech.epsilon()})
        line.update({"clip_norm": mech.clip_norm, "timing": timing, **metrics})
        if restarts:  # Ray restarted a shard between calls; it restored itself, the round went on
            line["shard_restarts"] = restarts
        self.clock = closing.close + f.round_interval_s
        return line

    def _train(self, r: int, t: float, local: list[np.ndarray], accepted: np.ndarray) -> list[TrainReport]:
        """Every shard trains the accepted devices among the ranks it was sent, from one
        broadcast copy of the weights, and clips with the mechanism's norm."""
        sizes = np.cumsum([0] + [len(x) for x in local])
        params = self._broadcast(self.mechanism.params)
        clip_norm = self.mechanism.clip_norm
        args = [(r, t, params, accepted[sizes[i] : sizes[i + 1]], clip_norm) for i in range(len(local))]
        return call_all(self.shards, "train", args)

    @staticmethod
    def _telemetry(
        t: float, closing: Closing, results: list[TrainReport], reported: int, abandoned: bool
    ) -> dict:
        """The round's funnel, drop reasons, duration and compute: un-noised telemetry."""
        reason, flops = closing.reason, closing.flops
        dropped = {reason_name(c): int(np.count_nonzero(reason == c)) for c in Reason if c != Reason.REPORTED}
        dropped["invalid"] = int(sum(res.invalid for res in results))
        aborted = (reason != Reason.REPORTED) & (reason != Reason.AFTER_GOAL)
        late = float(flops[reason == Reason.AFTER_GOAL].sum())
        reported_mix = merge_mix([x.mix for x in results]) if results else {}
        return {
            "waiting_for_limit": closing.waiting,
            "reported": reported,
            "dropped": dropped,
            "abandoned": bool(abandoned),
            "released": not abandoned,
            "round_duration_s": closing.close - t,
            "time_to_goal_s": closing.goal_time - t if closing.goal_time is not None else None,
            # Compute the real fleet would spend on jobs that trained but were not counted
            # (late arrivals, invalid updates), and on jobs that aborted part-way.
            "wasted_flops": late + float(sum(res.invalid_flops for res in results)),
            "aborted_flops": float((flops * closing.done)[aborted].sum()),
            "mix": {"selected": closing.mix, "reported": reported_mix},
        }

    def _check_incarnations(self, seen: list[str]) -> int:
        """Count shards that Ray restarted since the last call (each restored itself from its
        files when it came back, so its participation limit held); returns how many."""
        n = 0
        for i, inc in enumerate(seen):
            if inc != self._incarnations[i]:
                n += 1
                self._incarnations[i] = inc
        self.incidents["shard_restart"] += n
        return n

    def _broadcast(self, params: np.ndarray) -> Any:
        """One copy of the weights per round: an object-store ref for Ray shards."""
        if self.shards and isinstance(self.shards[0], ShardCore):
            return params
        import ray

        return ray.put(params)

    def _aggregate(self, r: int, results: list[TrainReport], reported: int) -> dict:
        """Sum the shards' clipped sums and hand them to the mechanism, which releases the round
        (noise, model step, ledger and accountant); the rest is telemetry."""
        total = np.sum([res.sum for res in results], axis=0)
        out: dict[str, Any] = {
            "train_loss": sum(res.loss_sum for res in results) / max(reported, 1),
            "update_norm_mean": sum(res.norm_sum for res in results) / max(reported, 1),
            "clipped_sum_norm": float(np.linalg.norm(total)),
        }
        hist = np.sum([res.norm_hist for res in results], axis=0)
        out["update_norm_median"] = _hist_quantile(hist, 0.5)
        unclipped = int(sum(res.unclipped for res in results))
        out.update(self.mechanism.release(r, ShardSums(total, reported, unclipped)))
        return out

    # ---- checkpoints ---------------------------------------------------------------------
    def state(self) -> dict:
        """Everything needed to continue exactly; no device id is in it (invariant 3)."""
        return {
            "round": self.round,
            "clock": self.clock,
            "mechanism": self.mechanism.state(),
            "incidents": dict(self.incidents),
        }

    def checkpoint(self) -> int:
        """Shards write their state first; the coordinator's file then commits the checkpoint.

        A shard that dies meanwhile is recovered and the checkpoint retried. A shard lost for good
        (not running again within `ray.recovery_timeout_s`) writes nothing: its newest file and
        the journal records after it already hold its state as of this round, and a resume
        restores it from them.
        """
        for attempt in range(3):
            live = [s for i, s in enumerate(self.shards) if i not in self._lost]
            try:
                call_all(live, "save_state", [(self.round,)] * len(live))
                break
            except ShardCrash:
                self.incidents["shard_crash"] += 1
                self._recover_shards()
                if attempt == 2:
                    raise
        checkpoint.save_coordinator(self.state_dir, self.state())
        call_all(live, "prune_state", [(self.round,)] * len(live))
        return self.round

    def resume(self) -> int:
        """Load the committed checkpoint and bring every shard to the same round.

        Rounds released after the checkpoint are re-run. In reproducible mode they draw the same
        cohort and noise and release the same outputs: the mechanism drops their ledger entries
        and the shards their journal records. In secure mode each re-run is a new release with a
        fresh cohort: the lost rounds stay accounted (the mechanism decides what else follows)
        and their participants stay recorded, so the participation limit still counts them.
        """
        state = checkpoint.load_coordinator(self.state_dir)
        self.round, self.clock = state["round"], state["clock"]
        secure = self.cfg.rng == "secure"
        self.mechanism.resume(state["mechanism"], secure)
        self.incidents.update(state["incidents"])
        call_all(self.shards, "restore", [(None if secure else self.round,)] * len(self.shards))
        return self.round

    def get_incidents(self) -> dict:
        return dict(self.incidents)

    def evaluate(self) -> dict:
        """The released model's evaluation. Under private telemetry without the task's baseline
        (the unigram's recall comes from the training users' word counts: their data, un-noised)."""
        if self.task is None:
            return {}
        out = self.task.evaluate(self.mechanism.params)
        baseline = getattr(self.task, "baseline", None)
        if self.private and baseline is not None:
            out = {k: v for k, v in out.items() if k not in baseline()}
        return out

    def evaluate_devices(self, device_ids: np.ndarray, num_examples: np.ndarray) -> dict:
        """The model's metrics on given held-out devices (for metrics by group); {} if the task
        cannot evaluate arbitrary devices."""
        evaluate = getattr(self.task, "evaluate_devices", None) if self.task is not None else None
        return evaluate(self.mechanism.params, device_ids, num_examples) if evaluate else {}

    def get_params(self) -> np.ndarray:
        """The released model."""
        return self.mechanism.params

    def releases(self) -> list[dict]:
        """The ledger, as dicts (what `fleet-privacy --run` and the audits read)."""
        return [r.to_json() for r in self.mechanism.ledger.releases] if self.mechanism.dp else []

    def privacy_summary(self) -> dict:
        """The epsilon and, beside it, what it covers, under which mechanism and assumptions."""
        return self.mechanism.summary()


@contextmanager
def _timed(timing: dict[str, float], key: str) -> Iterator[None]:
    """Wall seconds of a phase of the round, into `timing[key]` (telemetry)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timing[key] = time.perf_counter() - t0


def reason_name(code: int) -> str:
    return Reason(code).name.lower()


def _hist_quantile(hist: np.ndarray, q: float) -> float | None:
    """Upper edge of the histogram bin holding the q-quantile (coarse, but mergeable)."""
    total = hist.sum()
    if total == 0:
        return None
    i = int(np.searchsorted(np.cumsum(hist), q * total))
    return float(NORM_BINS[min(i + 1, len(NORM_BINS) - 1)])
