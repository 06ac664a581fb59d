"""The Coordinator: clock, secret sampler, round protocol, DP aggregation, server optimizer, accountant.

One round (DESIGN.md steps 1-3, 5-7):
1. check-in: each shard returns how many of its devices are available now;
2. secret uniform sampling over the whole fleet: `fixed_size` draws K = ceil(goal * overselect)
   ranks without replacement, `poisson` takes each available device with q_r = min(1, K /
   available_r) (privacy.sampling); a target epsilon that this round would pass stops here;
3. plan: shards return each selected device's arrival time (or drop reason) by rank; fixed_size
   accepts the first `goal` arrivals before the deadline (later ones are `after_goal`), poisson
   accepts every arrival before the deadline (its cohort is random and nothing caps it); with
   fewer than `min_reports` the round is abandoned and releases nothing;
5. shards train the accepted devices and return one clipped sum each;
6. Gaussian noise with std z*S is added once to the total, which is divided by the goal (fixed
   denominator) and applied with the server optimizer;
7. the round's release (q_r, n_r, m_r and the noise multiplier under the sampling's neighbouring
   relation) is appended to the ledger and accounted before the round's line leaves.

The coordinator never sees a device id: only counts, ranks, arrival times and sums. With
`privacy.telemetry=private` the line it returns holds only what is released and accounted.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from fleet.config import min_reports, separation_rounds
from fleet.learning.tasks import make_task
from fleet.phones import dropout
from fleet.phones.timing import Reason
from fleet.privacy import mechanism
from fleet.privacy.accountant import Accountant, pld_interval
from fleet.privacy.ftrl import FTRLServer
from fleet.privacy.ledger import LEDGER_FILE, Ledger
from fleet.privacy.mechanism import Release, default_delta
from fleet.privacy.noise import NoiseSource
from fleet.privacy.summary import privacy_summary
from fleet.round import checkpoint
from fleet.round.calls import ShardCrash, call_all
from fleet.round.sampling import Sampler, split_ranks
from fleet.round.server import ServerOptimizer
from fleet.round.shard import NORM_BINS, ShardCore

# What a metrics line holds under `privacy.telemetry=private`: the release (the model is not in
# the line), what is noised and accounted (the clip norm, moved by a noised count), the budget,
# and evaluations of the released model on held-out devices.
PRIVATE_KEYS = {"round", "released", "abandoned", "epsilon", "clip_norm", "incident", "stop"}


class Coordinator:
    """Runs rounds over the shards. Usable in-process (tests) or as a Ray actor (`fleet-train`)."""

    def __init__(self, cfg: Any, shards: list[Any], population: int, state_dir: str | None = None):
        self.cfg = cfg
        self.shards = shards
        self.state_dir = Path(state_dir) if state_dir else None
        self.incidents = {"shard_crash": 0, "shard_restart": 0}
        infos = call_all(shards, "info", [()] * len(shards))
        self._shard_pids = [info["pid"] for info in infos]
        self._incarnations = [info["incarnation"] for info in infos]
        self.population = population
        self.task = make_task(cfg, role="server")
        self.server = ServerOptimizer(
            self.task.init_params(),
            cfg.train.server_optimizer,
            cfg.train.server_lr,
            cfg.train.server_momentum,
        )
        self.params = self.server.params()
        self.sampler = Sampler(cfg.rng, cfg.seed)
        self.noise = NoiseSource(cfg.rng, cfg.seed)
        self.clock = cfg.fleet.start_hour * 3600.0
        self.round = 0
        self.releases_done = 0  # released rounds so far: the participation limit counts these
        self.private = cfg.privacy.telemetry == "private"
        p = cfg.privacy
        self.dp = bool(p.enabled)
        self.ftrl: FTRLServer | None = None
        self.separation = separation_rounds(cfg)
        self.clip_norm: float | None = None
        self.accountant: Accountant | None = None
        self.pure_noise_rounds = 0
        if self.dp:
            f = cfg.fleet
            self.clip_norm = p.initial_clip if p.adaptive else p.clip_norm
            self.delta = p.delta if p.delta is not None else default_delta(population)
            self.cohort = math.ceil(f.goal * f.overselect)
            plan = mechanism.noise_plan(p, f.goal)
            self.update_noise, self.count_noise = plan.update, plan.count_std
            # The multiplier accounted, under the sampling's neighbouring relation, from the noise
            # the round adds and the sensitivities it implies.
            self.accounted_noise = plan.accounted
            q_floor = min(1.0, self.cohort / population)  # every q_r is at least this
            if p.mechanism == "dp_ftrl":
                q_floor = 1.0  # no amplification: the interval for a Gaussian of the run's length
                std = p.noise_multiplier * p.clip_norm
                momentum = cfg.train.server_momentum if cfg.train.server_optimizer != "sgd" else 0.0
                self.ftrl = FTRLServer(
                    self.params,
                    cfg.train.server_lr,
                    momentum,
                    p.restart_every,
                    lambda tree, level, i: (
                        std * self.noise.normal(i, f"ftrl_node_{tree}_{level}", len(self.params))
                    ),
                )
            interval = pld_interval(q_floor, self.accounted_noise, cfg.train.rounds, self.delta)
            self.ledger = Ledger(self.state_dir / LEDGER_FILE if self.state_dir else None)
            self.accountant = Accountant(p.accountant, self.delta, interval)

    # ---- the round -----------------------------------------------------------------------
    def budget_exhausted(self) -> bool:
        """True when even the least exposed round (q_r at its floor, cohort / population) would
        pass privacy.target_epsilon: no round can be released any more."""
        target = self.cfg.privacy.target_epsilon
        if not self.dp or target is None:
            return False
        return self.accountant.epsilon_with(self._release(self.round, self.population)) > target

    def run_round(self) -> dict:
        """One round; a shard crash abandons it (nothing released) and the shard is recovered.

        Returns the round's metrics line; a line with `stop` set is a round that did not happen
        (releasing it would pass privacy.target_epsilon): nothing ran and the round counter stays.
        """
        wall0 = time.perf_counter()
        self.clock = dropout.next_active_time(self.cfg.dropout, self.clock)
        try:
            line = self._round(self.round, self.clock)
        except ShardCrash:
            self.incidents["shard_crash"] += 1
            self._recover_shards(self.round + 1)  # the abandoned round's journal records stand
            line = self._crash_line(self.round, self.clock)
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

    def _crash_line(self, r: int, t: float) -> dict:
        """Metrics of a round abandoned because a shard died: it released nothing."""
        return {
            "round": r,
            "sim_time": t,
            "hour_of_day": (t / 3600.0) % 24.0,
            "available": 0,
            "selected": 0,
            "reported": 0,
            "dropped": {reason_name(c): 0 for c in Reason if c != Reason.REPORTED},
            "abandoned": True,
            "released": False,
            "incident": "shard_crash",
            "round_duration_s": self.cfg.fleet.deadline_s,
            "wasted_flops": 0.0,
            "epsilon": self.accountant.epsilon() if self.dp else None,
            "clip_norm": self.clip_norm,
        }

    def _recover_shards(self, upto_round: int | None) -> None:
        """Wait for Ray to restart dead shards, then restore their state as of `upto_round`
        (None: everything recorded). A restarted shard has already restored itself from its
        files; this brings it to the round asked for."""
        if self.shards and isinstance(self.shards[0], ShardCore):
            return
        import ray

        for i, s in enumerate(self.shards):
            for attempt in range(600):
                try:
                    alive = ray.get(s.info.remote())
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                    time.sleep(0.1 * min(attempt + 1, 10))
            else:
                raise RuntimeError(f"shard {i} did not come back after a crash")
            if alive["pid"] != self._shard_pids[i]:
                if self.state_dir is not None:
                    ray.get(s.restore.remote(upto_round))
                self._shard_pids[i] = alive["pid"]
                self._incarnations[i] = alive["incarnation"]

    def _release(self, r: int, available: int) -> Release:
        """Round r's release as accounted, given how many devices are available."""
        p = self.cfg.privacy
        cohort = min(self.cohort, available)
        if self.ftrl is not None:  # no sampling assumption: where the round sits in its tree
            tree, step = self.ftrl.position()
            return Release(
                r, "tree", 1.0, int(available), int(cohort), self.accounted_noise, tree, step, self.separation
            )
        q = min(1.0, self.cohort / available) if available else 0.0
        return Release(r, p.sampling, q, int(available), int(cohort), self.accounted_noise)

    def _round(self, r: int, t: float) -> dict:
        f = self.cfg.fleet
        n = len(self.shards)
        poisson = self.dp and self.ftrl is None and self.cfg.privacy.sampling == "poisson"

        t0 = time.perf_counter()
        counts = call_all(self.shards, "check_in", [(r, t, self.releases_done)] * n)
        t_checkin = time.perf_counter() - t0
        total = int(sum(counts))

        release = self._release(r, total) if self.dp else None
        target = self.cfg.privacy.target_epsilon
        if release is not None and target is not None and total > 0:
            if self.accountant.epsilon_with(release) > target:
                return {"round": r, "stop": "target_epsilon", "epsilon": self.accountant.epsilon()}

        t0 = time.perf_counter()
        if poisson:
            ranks = self.sampler.draw_poisson(r, total, release.q)
        else:
            ranks = self.sampler.draw(r, total, math.ceil(f.goal * f.overselect))
        local = split_ranks(ranks, counts)
        t_sampling = time.perf_counter() - t0

        deadline = t + f.deadline_s
        t0 = time.perf_counter()
        plans = call_all(self.shards, "plan", [(r, t, deadline, lr) for lr in local])
        self._check_incarnations([p["incarnation"] for p in plans])
        arrival = np.concatenate([p["arrival"] for p in plans]) if plans else np.zeros(0)
        reason = np.concatenate([p["reason"] for p in plans]) if plans else np.zeros(0, np.int8)
        flops = np.concatenate([p["flops"] for p in plans]) if plans else np.zeros(0)
        done = np.concatenate([p["done"] for p in plans]) if plans else np.zeros(0)
        # Ties in arrival go to the lower global rank: the concatenation is in rank order.
        order = np.argsort(arrival, kind="stable")
        n_arrived = int(np.count_nonzero(reason == Reason.REPORTED))
        accepted = reason == Reason.REPORTED
        if not poisson:  # a fixed-size round closes on its goal; Poisson's cohort is not capped
            accepted = np.zeros(len(arrival), dtype=bool)
            accepted[order[: min(f.goal, n_arrived)]] = True
            reason[(reason == Reason.REPORTED) & ~accepted] = Reason.AFTER_GOAL
        n_accepted = int(accepted.sum())
        goal_time = float(arrival[order[f.goal - 1]]) if n_arrived >= f.goal else None
        if not poisson:
            close = goal_time if goal_time is not None else deadline
        elif np.any(reason == Reason.DEADLINE) or n_arrived == 0:
            close = deadline  # a Poisson round waits for every selected device
        else:
            close = float(arrival[accepted].max())
        t_plan = time.perf_counter() - t0

        abandoned = n_accepted < min_reports(f)
        metrics: dict[str, Any] = {}
        t_train = t_agg = 0.0
        invalid = 0
        invalid_flops = 0.0
        reported = 0
        reported_mix: dict = {}
        if not abandoned:
            t0 = time.perf_counter()
            sizes = np.cumsum([0] + [len(x) for x in local])
            params_arg = self._broadcast(self.params)
            results = call_all(
                self.shards,
                "train",
                [(r, t, params_arg, accepted[sizes[i] : sizes[i + 1]], self.clip_norm) for i in range(n)],
            )
            self._check_incarnations([res["incarnation"] for res in results])
            t_train = time.perf_counter() - t0
            t0 = time.perf_counter()
            reported = int(sum(res["count"] for res in results))
            invalid = int(sum(res["invalid"] for res in results))
            invalid_flops = float(sum(res["invalid_flops"] for res in results))
            reported_mix = _merge_mix([res["mix"] for res in results])
            metrics.update(self._aggregate(r, results, reported, release))
            t_agg = time.perf_counter() - t0

        dropped = {reason_name(c): int(np.count_nonzero(reason == c)) for c in Reason if c != Reason.REPORTED}
        dropped["invalid"] = invalid
        line = {
            "round": r,
            "sim_time": t,
            "hour_of_day": (t / 3600.0) % 24.0,
            "available": total,
            "waiting_for_limit": int(sum(p["waiting"] for p in plans)),
            "selected": int(len(ranks)),
            "q": release.q if release is not None else None,
            "reported": reported if not abandoned else n_accepted,
            "dropped": dropped,
            "abandoned": bool(abandoned),
            "released": not abandoned,
            "round_duration_s": close - t,
            "time_to_goal_s": goal_time - t if goal_time is not None else None,
            # Compute the real fleet would spend on jobs that trained but were not counted
            # (late arrivals, invalid updates), and on jobs that aborted part-way.
            "wasted_flops": float(flops[reason == Reason.AFTER_GOAL].sum()) + invalid_flops,
            "aborted_flops": float(
                (flops * done)[(reason != Reason.REPORTED) & (reason != Reason.AFTER_GOAL)].sum()
            ),
            "mix": {"selected": _merge_mix([p["mix"] for p in plans]), "reported": reported_mix},
            "epsilon": self.accountant.epsilon() if self.dp else None,
            "clip_norm": self.clip_norm,
            "timing": {
                "checkin_s": t_checkin,
                "sampling_s": t_sampling,
                "plan_s": t_plan,
                "training_s": t_train,
                "aggregation_s": t_agg,
            },
        }
        line.update(metrics)
        self.clock = close + f.round_interval_s
        return line

    def _check_incarnations(self, seen: list[str]) -> None:
        """Count shards that Ray restarted since the last call (each restored itself from its
        files when it came back, so its participation limit held)."""
        for i, inc in enumerate(seen):
            if inc != self._incarnations[i]:
                self.incidents["shard_restart"] += 1
                self._incarnations[i] = inc

    def _broadcast(self, params: np.ndarray) -> Any:
        """One copy of the weights per round: an object-store ref for Ray shards."""
        if self.shards and isinstance(self.shards[0], ShardCore):
            return params
        import ray

        return ray.put(params)

    def _aggregate(self, r: int, results: list[dict], reported: int, release: Release | None) -> dict:
        """Sum the shards' clipped sums, add noise once, average, apply; account the release."""
        total = np.sum([res["sum"] for res in results], axis=0)
        goal = self.cfg.fleet.goal
        out: dict[str, Any] = {
            "train_loss": sum(res["loss_sum"] for res in results) / max(reported, 1),
            "update_norm_mean": sum(res["norm_sum"] for res in results) / max(reported, 1),
            "clipped_sum_norm": float(np.linalg.norm(total)),
        }
        hist = np.sum([res["norm_hist"] for res in results], axis=0)
        out["update_norm_median"] = _hist_quantile(hist, 0.5)
        self.releases_done += 1
        if self.dp:
            if reported == 0:  # every update was invalid: this release is the noise alone
                out["pure_noise"] = True
                self.pure_noise_rounds += 1
            if self.ftrl is not None:
                self.params = self.ftrl.step(total, goal)
                out["noise_norm"] = self.ftrl.last_noise_norm
            else:
                std = self.update_noise * self.clip_norm
                noise = std * self.noise.normal(r, "update_noise", len(total))
                out["noise_norm"] = float(np.linalg.norm(noise))
                update = (total + noise) / goal  # fixed denominator, whatever the dropout
                if self.cfg.privacy.adaptive:
                    unclipped = sum(res["unclipped"] for res in results)
                    self._adapt_clip(r, unclipped, reported, goal)
                self.params = self.server.step(update.astype(np.float32))
            out["signal_to_noise"] = out["clipped_sum_norm"] / max(out["noise_norm"], 1e-30)
            # Committed before the line leaves: a crash after this point cannot lose the release.
            self.ledger.append(release)
            self.accountant.record(release)
        elif reported > 0:
            self.params = self.server.step((total / reported).astype(np.float32))
        return out

    def _adapt_clip(self, r: int, unclipped: int, reported: int, goal: int) -> None:
        """Geometric update of the clip norm toward the target quantile (Andrew et al. 2021).

        Each reported device's bit enters centred, as b - 1/2 (sensitivity 1/2 under zero-out,
        1 under replace-one), which is what the noise split of `mechanism.adaptive_split` assumes.
        """
        p = self.cfg.privacy
        centred = unclipped - reported / 2.0
        noised = centred + self.count_noise * float(self.noise.normal(r, "count_noise", 1)[0])
        fraction = noised / goal + 0.5
        self.clip_norm = float(self.clip_norm * math.exp(-p.clip_lr * (fraction - p.target_quantile)))

    # ---- checkpoints ---------------------------------------------------------------------
    def state(self) -> dict:
        """Everything needed to continue exactly; no device id is in it (invariant 3)."""
        return {
            "round": self.round,
            "clock": self.clock,
            "server": self.server.state(),
            "accountant": self.accountant.snapshot() if self.dp else None,
            "pld_interval": self.accountant.interval if self.dp else None,
            "clip_norm": self.clip_norm,
            "incidents": dict(self.incidents),
            "pure_noise_rounds": self.pure_noise_rounds,
            "releases_done": self.releases_done,
            "ftrl": self.ftrl.state() if self.ftrl is not None else None,
        }

    def checkpoint(self) -> int:
        """Shards write their state first; the coordinator's file then commits the checkpoint.

        A shard that dies meanwhile is recovered and the checkpoint retried.
        """
        n = len(self.shards)
        for attempt in range(3):
            try:
                call_all(self.shards, "save_state", [(self.round,)] * n)
                break
            except ShardCrash:
                self.incidents["shard_crash"] += 1
                self._recover_shards(self.round)
                if attempt == 2:
                    raise
        checkpoint.save_coordinator(self.state_dir, self.state())
        call_all(self.shards, "prune_state", [(self.round,)] * n)
        return self.round

    def resume(self) -> int:
        """Load the committed checkpoint and bring every shard to the same round.

        Rounds released after the checkpoint are re-run. In reproducible mode they draw the same
        cohort and noise and release the same outputs: their ledger entries and the shards'
        journal records are replaced. In secure mode each re-run is a new release with a fresh
        cohort: the lost rounds stay accounted and their participants stay recorded, so the
        participation limit still counts them.
        """
        state = checkpoint.load_coordinator(self.state_dir)
        self.round, self.clock = state["round"], state["clock"]
        self.server.load_state(state["server"])
        self.params = self.server.params()
        if self.ftrl is not None:
            self.ftrl.load_state(state["ftrl"])
            self.params = self.ftrl.params.copy()
        secure = self.cfg.rng == "secure"
        if self.dp:
            if not secure:
                self.ledger.truncate(self.round)
            if state.get("pld_interval"):
                self.accountant.interval = state["pld_interval"]
            self.accountant.load(self.ledger.releases, state.get("accountant"))
        self.clip_norm = state["clip_norm"]
        self.incidents.update(state["incidents"])
        self.pure_noise_rounds = state.get("pure_noise_rounds", 0)
        # In secure mode the rounds released after the checkpoint stay counted (their
        # participants' limits too): the next release comes after them.
        self.releases_done = len(self.accountant.releases) if self.dp else state["releases_done"]
        call_all(self.shards, "restore", [(None if secure else self.round,)] * len(self.shards))
        return self.round

    def get_incidents(self) -> dict:
        return dict(self.incidents)

    def evaluate(self) -> dict:
        return self.task.evaluate(self.params)

    def evaluate_devices(self, device_ids: np.ndarray, num_examples: np.ndarray) -> dict:
        """The model's metrics on given held-out devices (for metrics by group); {} if the task
        cannot evaluate arbitrary devices."""
        evaluate = getattr(self.task, "evaluate_devices", None)
        return evaluate(self.params, device_ids, num_examples) if evaluate else {}

    def get_params(self) -> np.ndarray:
        return self.params

    def releases(self) -> list[dict]:
        """The ledger, as dicts (what `fleet-privacy --run` and the audits read)."""
        return [r.to_json() for r in self.accountant.releases] if self.dp else []

    def privacy_summary(self) -> dict:
        """The epsilon and, beside it, what it covers, under which mechanism and assumptions."""
        return privacy_summary(
            self.cfg, self.population, self.accountant if self.dp else None, self.pure_noise_rounds
        )


def _merge_mix(mixes: list[dict]) -> dict:
    """Sum the shards' time-zone and speed counts."""
    tz: dict[str, int] = {}
    for m in mixes:
        for k, v in m["tz"].items():
            tz[k] = tz.get(k, 0) + v
    speed = np.sum([m["speed"] for m in mixes], axis=0).astype(int).tolist() if mixes else []
    return {"tz": tz, "speed": speed}


def reason_name(code: int) -> str:
    return Reason(code).name.lower()


def _hist_quantile(hist: np.ndarray, q: float) -> float | None:
    """Upper edge of the histogram bin holding the q-quantile (coarse, but mergeable)."""
    total = hist.sum()
    if total == 0:
        return None
    i = int(np.searchsorted(np.cumsum(hist), q * total))
    return float(NORM_BINS[min(i + 1, len(NORM_BINS) - 1)])
