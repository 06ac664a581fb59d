"""The Coordinator: clock, secret sampler, round protocol, DP aggregation, server optimizer, accountant.

One round (DESIGN.md steps 1-3, 5-7):
1. check-in: each shard returns how many of its devices are available now;
2. secret uniform sampling of ceil(goal * overselect) ranks over the whole fleet;
3. plan: shards return each selected device's arrival time (or drop reason) by rank; the first
   `goal` arrivals before the deadline are accepted, later arrivals are `after_goal`; with fewer
   than `min_reports` the round is abandoned and releases nothing;
5. shards train the accepted devices and return one clipped sum each;
6. Gaussian noise with std z*S is added once to the total, which is divided by the goal (fixed
   denominator) and applied with the server optimizer;
7. the accountant records one event per released round.

The coordinator never sees a device id: only counts, ranks, arrival times and sums.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from fleet import checkpoint, dropout
from fleet.config import min_reports
from fleet.privacy.accountant import Accountant, Mechanism
from fleet.privacy.noise import NoiseSource
from fleet.sampling import Sampler, split_ranks
from fleet.shard import NORM_BINS, ShardCore
from fleet.tasks import make_task
from fleet.timing import Reason


class ShardCrash(RuntimeError):
    """A shard actor died during a call."""


def call_all(shards: list[Any], method: str, args: list[tuple]) -> list[Any]:
    """Call `method` on every shard, in parallel for Ray actors, in turn for in-process shards."""
    if shards and isinstance(shards[0], ShardCore):
        return [getattr(s, method)(*a) for s, a in zip(shards, args, strict=True)]
    import ray

    try:
        return ray.get([getattr(s, method).remote(*a) for s, a in zip(shards, args, strict=True)])
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
        raise ShardCrash(f"a shard died during {method}") from e


def default_delta(population: int) -> float:
    """delta = 1 / N^1.1: below 1/N, as user-level DP needs."""
    return float(population) ** -1.1


class ServerOptimizer:
    """The server optimizer applied to the averaged update (a pseudo-gradient of -update)."""

    def __init__(self, params: np.ndarray, kind: str, lr: float, momentum: float):
        import torch  # here, not at module level: the driver imports this module and needs no torch

        self.weights = torch.nn.Parameter(torch.from_numpy(params.astype(np.float32).copy()))
        if kind == "sgd":
            self.opt = torch.optim.SGD([self.weights], lr=lr)
        elif kind == "sgdm":
            self.opt = torch.optim.SGD([self.weights], lr=lr, momentum=momentum, nesterov=True)
        elif kind == "adam":
            self.opt = torch.optim.Adam([self.weights], lr=lr)
        else:
            raise ValueError(f"train.server_optimizer: unknown value {kind!r}")

    def step(self, update: np.ndarray) -> np.ndarray:
        import torch

        self.weights.grad = torch.from_numpy(-update.astype(np.float32))
        self.opt.step()
        return self.params()

    def params(self) -> np.ndarray:
        return self.weights.detach().numpy().copy()

    def state(self) -> dict:
        return {"weights": self.params(), "opt": self.opt.state_dict()}

    def load_state(self, state: dict) -> None:
        import torch

        with torch.no_grad():
            self.weights.copy_(torch.from_numpy(state["weights"]))
        self.opt.load_state_dict(state["opt"])


class Coordinator:
    """Runs rounds over the shards. Usable in-process (tests) or as a Ray actor (`fleet-train`)."""

    def __init__(self, cfg: Any, shards: list[Any], population: int, state_dir: str | None = None):
        self.cfg = cfg
        self.shards = shards
        self.state_dir = Path(state_dir) if state_dir else None
        self.incidents = {"shard_crash": 0}
        self._shard_pids = [info["pid"] for info in call_all(shards, "info", [()] * len(shards))]
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
        p = cfg.privacy
        self.dp = bool(p.enabled)
        self.clip_norm: float | None = None
        self.accountant: Accountant | None = None
        if self.dp:
            self.clip_norm = p.initial_clip if p.adaptive else p.clip_norm
            self.delta = p.delta if p.delta is not None else default_delta(population)
            self.accountant = Accountant(
                Mechanism(p.sampling, population, cfg.fleet.goal, p.noise_multiplier), self.delta
            )
            self.count_noise = p.count_noise if p.count_noise is not None else cfg.fleet.goal / 20.0
            self.update_noise = self._update_noise_multiplier()

    def _update_noise_multiplier(self) -> float:
        """z for the update sum; with adaptive clipping, the split that keeps the total at z."""
        p = self.cfg.privacy
        z = p.noise_multiplier
        if not p.adaptive or z == 0:
            return z
        if z >= 2 * self.count_noise:
            raise ValueError(
                f"privacy.noise_multiplier: adaptive clipping needs z < 2 * count_noise "
                f"({z} >= {2 * self.count_noise})"
            )
        return (z**-2 - (2 * self.count_noise) ** -2) ** -0.5

    # ---- the round -----------------------------------------------------------------------
    def budget_exhausted(self) -> bool:
        """True when one more released round would pass privacy.target_epsilon."""
        target = self.cfg.privacy.target_epsilon
        if not self.dp or target is None:
            return False
        return self.accountant.epsilon_after_next() > target

    def run_round(self) -> dict:
        """One round; a shard crash abandons it (nothing released) and the shard is recovered."""
        wall0 = time.perf_counter()
        self.clock = dropout.next_active_time(self.cfg.dropout, self.clock)
        try:
            line = self._round(self.round, self.clock)
        except ShardCrash:
            self.incidents["shard_crash"] += 1
            self._recover_shards(self.round + 1)  # the abandoned round's journal records stand
            line = self._crash_line(self.round, self.clock)
            self.clock += self.cfg.fleet.deadline_s + self.cfg.fleet.round_interval_s
        self.round += 1
        if self.round % self.cfg.train.eval_every == 0:
            line.update(self.evaluate())
        line["wall_s"] = time.perf_counter() - wall0
        return line

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

    def _recover_shards(self, upto_round: int) -> None:
        """Wait for Ray to restart dead shards, then restore their state as of `upto_round`."""
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

    def _round(self, r: int, t: float) -> dict:
        f = self.cfg.fleet
        n = len(self.shards)

        t0 = time.perf_counter()
        counts = call_all(self.shards, "check_in", [(r, t)] * n)
        t_checkin = time.perf_counter() - t0
        total = int(sum(counts))

        t0 = time.perf_counter()
        ranks = self.sampler.draw(r, total, math.ceil(f.goal * f.overselect))
        local = split_ranks(ranks, counts)
        t_sampling = time.perf_counter() - t0

        deadline = t + f.deadline_s
        t0 = time.perf_counter()
        plans = call_all(self.shards, "plan", [(r, t, deadline, lr) for lr in local])
        arrival = np.concatenate([p["arrival"] for p in plans]) if plans else np.zeros(0)
        reason = np.concatenate([p["reason"] for p in plans]) if plans else np.zeros(0, np.int8)
        flops = np.concatenate([p["flops"] for p in plans]) if plans else np.zeros(0)
        done = np.concatenate([p["done"] for p in plans]) if plans else np.zeros(0)
        # Ties in arrival go to the lower global rank: the concatenation is in rank order.
        order = np.argsort(arrival, kind="stable")
        n_arrived = int(np.count_nonzero(reason == Reason.REPORTED))
        accepted = np.zeros(len(arrival), dtype=bool)
        accepted[order[: min(f.goal, n_arrived)]] = True
        reason[(reason == Reason.REPORTED) & ~accepted] = Reason.AFTER_GOAL
        n_accepted = int(accepted.sum())
        close = float(arrival[order[f.goal - 1]]) if n_arrived >= f.goal else deadline
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
            t_train = time.perf_counter() - t0
            t0 = time.perf_counter()
            reported = int(sum(res["count"] for res in results))
            invalid = int(sum(res["invalid"] for res in results))
            invalid_flops = float(sum(res["invalid_flops"] for res in results))
            reported_mix = _merge_mix([res["mix"] for res in results])
            metrics.update(self._aggregate(r, results, reported))
            t_agg = time.perf_counter() - t0

        dropped = {reason_name(c): int(np.count_nonzero(reason == c)) for c in Reason if c != Reason.REPORTED}
        dropped["invalid"] = invalid
        line = {
            "round": r,
            "sim_time": t,
            "hour_of_day": (t / 3600.0) % 24.0,
            "available": total,
            "selected": int(len(ranks)),
            "reported": reported if not abandoned else n_accepted,
            "dropped": dropped,
            "abandoned": bool(abandoned),
            "released": not abandoned,
            "round_duration_s": close - t,
            "time_to_goal_s": close - t if n_arrived >= f.goal else None,
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

    def _broadcast(self, params: np.ndarray) -> Any:
        """One copy of the weights per round: an object-store ref for Ray shards."""
        if self.shards and isinstance(self.shards[0], ShardCore):
            return params
        import ray

        return ray.put(params)

    def _aggregate(self, r: int, results: list[dict], reported: int) -> dict:
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
        if self.dp:
            std = self.update_noise * self.clip_norm
            noise = std * self.noise.normal(r, "update_noise", len(total))
            out["noise_norm"] = float(np.linalg.norm(noise))
            out["signal_to_noise"] = out["clipped_sum_norm"] / max(out["noise_norm"], 1e-30)
            update = (total + noise) / goal  # fixed denominator, whatever the dropout
            if self.cfg.privacy.adaptive:
                self._adapt_clip(r, results, goal)
            self.accountant.record(r)
        elif reported > 0:
            update = total / reported
        else:
            return out
        self.params = self.server.step(update.astype(np.float32))
        return out

    def _adapt_clip(self, r: int, results: list[dict], goal: int) -> None:
        """Geometric update of the clip norm toward the target quantile (Andrew et al. 2021)."""
        p = self.cfg.privacy
        b = sum(res["unclipped"] for res in results)
        b_noised = b + self.count_noise * float(self.noise.normal(r, "count_noise", 1)[0])
        self.clip_norm = float(self.clip_norm * math.exp(-p.clip_lr * (b_noised / goal - p.target_quantile)))

    # ---- checkpoints ---------------------------------------------------------------------
    def state(self) -> dict:
        """Everything needed to continue exactly; no device id is in it (invariant 3)."""
        return {
            "round": self.round,
            "clock": self.clock,
            "server": self.server.state(),
            "accountant": self.accountant.state() if self.dp else None,
            "clip_norm": self.clip_norm,
            "incidents": dict(self.incidents),
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
        """Load the committed checkpoint and bring every shard to the same round."""
        state = checkpoint.load_coordinator(self.state_dir)
        self.round, self.clock = state["round"], state["clock"]
        self.server.load_state(state["server"])
        self.params = self.server.params()
        if self.dp:
            self.accountant.load_state(state["accountant"])
        self.clip_norm = state["clip_norm"]
        self.incidents.update(state["incidents"])
        call_all(self.shards, "restore", [(self.round,)] * len(self.shards))
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

    def privacy_summary(self) -> dict:
        if not self.dp:
            return {"dp": False, "epsilon": None}
        return {
            "dp": True,
            "epsilon": self.accountant.epsilon(),
            "delta": self.delta,
            "released_rounds": self.accountant.released,
            "noise_multiplier": self.cfg.privacy.noise_multiplier,
            "update_noise_multiplier": self.update_noise,
            "sampling": self.cfg.privacy.sampling,
            "q": self.cfg.fleet.goal / self.population,
        }


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
