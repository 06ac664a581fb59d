"""Training that goes wrong says so: divergence, nothing to learn from, and rounds abandoned.

The driver feeds every round's line to a `Guard`. It warns (a log line, and a W&B alert) when
- the training loss is not finite, or stays above `train.divergence_factor` times its best for
  `train.divergence_rounds` released rounds in a row (a noisy loss near its floor may spike once);
- an evaluation falls below its baseline (the unigram's, for next-word prediction) after
  `train.guard_warmup_rounds`;
- the update's signal-to-noise ratio (the clipped sum's norm over the noise's) stays below
  `train.min_signal_to_noise` for `train.guard_window` released rounds: the noise, not the
  data, is moving the model;
- `train.max_pure_noise_rounds` released rounds in a row had no valid update.
With `train.stop_on_divergence` (default on) the first two and the last stop the run: the driver
checkpoints, writes the summary and exits with code 3 and the one-line reason. The
signal-to-noise warning explains a divergence rather than being one (a DP run may sit at a low
ratio and still learn), so it never stops a run by itself.

`progress` summarises released and abandoned rounds and the top drop reasons for the bar and a
periodic log line; `abandonment` says, at the end of a run that abandoned most of its rounds,
why, and what to change.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fleet.config import Config, TrainConfig
from fleet.privacy.mechanisms import cohort_size


@dataclass
class Verdict:
    """What a round told the guard: warnings to show, and the reason to stop (if any)."""

    warnings: list[str] = field(default_factory=list)
    stop: str | None = None


class Guard:
    def __init__(self, train: TrainConfig):
        self.t = train
        self.best_loss = math.inf
        self.high_loss = 0
        self.low_snr = 0
        self.snr: list[float] = []
        self.pure_noise = 0
        self.exhausted = False  # the participation limit left q_r = 1 (warned once)
        self.warned: set[str] = set()

    def check(self, line: dict) -> Verdict:
        """What a round's line says: stop (why), or warnings, each given once."""
        v = Verdict()
        self._loss(line, v)
        self._below_baseline(line, v)
        self._exhaustion(line, v)
        self._signal_to_noise(line, v)
        self._pure_noise(line, v)
        self._explain_stop(v)
        v.warnings = [w for w in v.warnings if w not in self.warned or "released noise alone" in w]
        self.warned.update(v.warnings)
        return v

    def _loss(self, line: dict, v: Verdict) -> None:
        """A non-finite loss, or one over divergence_factor x its best for divergence_rounds."""
        t = self.t
        loss = line.get("train_loss")
        if loss is not None and line.get("released") and line.get("reported", 1) > 0:
            high = loss > t.divergence_factor * self.best_loss
            self.high_loss = self.high_loss + 1 if high else 0
            if not math.isfinite(loss):
                v.stop = f"the training loss is {loss} in round {line['round']}"
            elif self.high_loss >= t.divergence_rounds:
                v.stop = (
                    f"the training loss rose to {loss:.4g} in round {line['round']}, over "
                    f"{t.divergence_factor:g}x its best ({self.best_loss:.4g}) for {self.high_loss} rounds"
                )
            self.best_loss = min(self.best_loss, loss) if math.isfinite(loss) else self.best_loss

    def _below_baseline(self, line: dict, v: Verdict) -> None:
        """After the warm-up, a metric worse than the unigram baseline's."""
        t = self.t
        if line.get("round", 0) + 1 >= t.guard_warmup_rounds:
            for key, value in line.items():
                base = line.get(f"unigram_{key}")
                if (
                    isinstance(value, float)
                    and isinstance(base, float)
                    and value < base
                    and not key.startswith("unigram_")
                ):
                    v.stop = v.stop or (
                        f"{key} is {value:.4g} after round {line['round']}, "
                        f"below the unigram baseline's {base:.4g}"
                    )

    def _exhaustion(self, line: dict, v: Verdict) -> None:
        """The participation limit leaving q_r = 1 (warned once)."""
        waiting, available = line.get("waiting_for_limit"), line.get("available")
        if line.get("q") == 1.0 and waiting and available is not None and not self.exhausted:
            self.exhausted = True
            v.warnings.append(
                f"round {line['round']}: the participation limit is exhausting the fleet: every available "
                f"device was selected (q_r = 1, {available:,} devices) while {waiting:,} more wait out the "
                "limit. A round now costs the privacy of an unsampled one (no amplification: epsilon grows "
                "faster than planned) and may fall short of min_reports; raise the population, or lower "
                "fleet.goal, fleet.overselect or the limit (fleet.min_separation_hours or _rounds)"
            )

    def _signal_to_noise(self, line: dict, v: Verdict) -> None:
        """Released rounds whose update is mostly noise, guard_window in a row."""
        t = self.t
        snr = line.get("signal_to_noise")
        if snr is not None and line.get("released"):
            self.snr.append(snr)
            self.low_snr = self.low_snr + 1 if snr < t.min_signal_to_noise else 0
            if self.low_snr == t.guard_window:
                v.warnings.append(
                    f"signal-to-noise below {t.min_signal_to_noise:g} for {t.guard_window} released rounds "
                    f"(now {snr:.3g}): the noise moves the model more than the updates do; raise fleet.goal, "
                    "or lower privacy.noise_multiplier or train.server_lr"
                )

    def _pure_noise(self, line: dict, v: Verdict) -> None:
        """Released rounds with no valid update; max_pure_noise_rounds in a row stop."""
        t = self.t
        if line.get("released"):
            self.pure_noise = self.pure_noise + 1 if line.get("pure_noise") else 0
            if line.get("pure_noise"):
                v.warnings.append(f"round {line['round']} released noise alone: every update was invalid")
            if t.max_pure_noise_rounds and self.pure_noise >= t.max_pure_noise_rounds:
                v.stop = v.stop or (
                    f"{self.pure_noise} released rounds in a row had no valid update (NaN or Inf): "
                    "check train.client_lr and the task"
                )

    def _explain_stop(self, v: Verdict) -> None:
        """A stop says the signal-to-noise where it is low; off stop_on_divergence, it warns instead."""
        t = self.t
        if v.stop and self.snr:
            recent = sorted(self.snr[-t.guard_window :])[len(self.snr[-t.guard_window :]) // 2]
            if recent < 0.1:
                v.stop += (
                    f" (update signal-to-noise {recent:.2g}, median of the last rounds: the noise on the "
                    "average update, z S / goal a coordinate, moves the model more than the data does; "
                    "raise fleet.goal, or lower privacy.noise_multiplier, train.server_lr or "
                    "train.server_momentum)"
                )
        if v.stop and not t.stop_on_divergence:
            v.warnings.append(f"diverging: {v.stop} (train.stop_on_divergence=false: going on)")
            v.stop = None


def progress(lines: list[dict], top: int = 2) -> tuple[int, int, list[tuple[str, int]]]:
    """Released and abandoned rounds so far, and the most frequent drop reasons."""
    released = sum(1 for x in lines if x.get("released"))
    abandoned = sum(1 for x in lines if x.get("abandoned"))
    reasons: Counter = Counter()
    for x in lines:
        reasons.update({k: v for k, v in (x.get("dropped") or {}).items() if v})
    return released, abandoned, reasons.most_common(top)


def progress_text(lines: list[dict]) -> str:
    released, abandoned, top = progress(lines)
    text = f"{released} released, {abandoned} abandoned"
    if top:
        text += "; dropped most for " + ", ".join(f"{k} ({v:,})" for k, v in top)
    return text


def incident_text(line: dict) -> str | None:
    """One console line for a round in which the simulator's machinery failed (None: it did not):
    a shard that died and what became of it, or one that Ray restarted between calls."""
    r = line["round"]
    # Under private telemetry only `incident` is in the line: which shard died, and when, would say
    # which id range a crash came from.
    what = line.get("incident_detail", "a shard died")
    if line.get("incident") == "shard_lost":
        lost = ", ".join(map(str, line.get("lost_shards", []))) or "?"
        after = f" after {line['recovery_s']:.0f} s" if "recovery_s" in line else ""
        return (
            f"round {r}: {what} and shard(s) {lost} were not running again{after} "
            "(ray.recovery_timeout_s): no node could host them; the round released nothing and the run "
            "stops here"
        )
    if line.get("incident") == "shard_crash":
        back = ", ".join(map(str, line.get("restarted_shards", [])))
        again = f"; shard(s) {back} restarted in {line['recovery_s']:.1f} s" if back else ""
        return (
            f"round {r}: {what}{again}; the round was abandoned "
            "and released nothing (restarted shards restore their participation state from their files)"
        )
    if line.get("shard_restarts"):
        return (
            f"round {r}: Ray had restarted {line['shard_restarts']} shard(s) since the last round; each "
            "restored its participation state from its files and the round went on"
        )
    return None


# What to change for the drop reason that cost a run most: a longer deadline helps only the devices
# the deadline dropped; failures, outages and battery aborts strike whatever the deadline.
DROP_ADVICE = {
    "deadline": "raise fleet.deadline_s, or fleet.overselect",
    "window_closed": "raise fleet.overselect: jobs outlived the devices' idle windows, whatever the deadline",
    "invalid": "the updates were NaN or Inf: check train.client_lr and the task",
    "failure": "raise fleet.overselect: these drops do not depend on the deadline",
}


def abandonment(lines: list[dict], cfg: Config, population: int) -> str | None:
    """Why a run abandoned more than half its rounds, and what to change; None otherwise."""
    rounds = [x for x in lines if "abandoned" in x]
    crashed = [x for x in rounds if x["abandoned"] and x.get("incident")]
    abandoned = [x for x in rounds if x["abandoned"] and not x.get("incident")]
    if not rounds or 2 * (len(abandoned) + len(crashed)) <= len(rounds):
        return None
    f = cfg.fleet
    head = f"abandoned {len(abandoned) + len(crashed)} of {len(rounds)} rounds"
    if crashed:
        head += f" ({len(crashed)} to shard crashes: see the incidents above)"
        if not abandoned:
            return head
    head += f" ({len(abandoned)} with fewer than min_reports reports)"
    if "available" not in abandoned[0]:
        return head  # private telemetry: the counts that would say why were not released
    waiting = sum(x.get("waiting_for_limit", 0) for x in abandoned) / len(abandoned)
    available = sum(x["available"] for x in abandoned) / len(abandoned)
    reported = sum(x["reported"] for x in abandoned) / len(abandoned)
    causes = []
    if waiting > available:
        causes.append(
            f"participation limit: on average {waiting:,.0f} of {population:,} devices waited for it while "
            f"{available:,.0f} could be asked (lower fleet.min_separation_hours or "
            "fleet.min_separation_rounds, or raise the population)"
        )
    dropped: Counter = Counter()
    for x in abandoned:
        dropped.update(x.get("dropped") or {})
    if dropped:
        reason, n = dropped.most_common(1)[0]
        if n:
            causes.append(
                f"{reason}: {n / len(abandoned):,.0f} of a round's selected devices on average "
                f"({DROP_ADVICE.get(reason, DROP_ADVICE['failure'])})"
            )
    if available < cohort_size(f):
        causes.append(
            f"too few devices available: {available:,.0f} a round on average for a cohort of "
            f"{cohort_size(f)} (lower fleet.goal)"
        )
    causes.append(f"{reported:.0f} reports on average against min_reports {_min_reports(f)}")
    return head + ": " + "; ".join(causes)


def _min_reports(f: Any) -> int:
    from fleet.config import min_reports

    return min_reports(f)
