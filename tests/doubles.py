"""Test doubles: tasks with planted behaviour, importable by Ray workers as `tests.doubles:Name`."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fleet.learning.tasks.mean import MeanTask


class ZeroTask(MeanTask):
    """Every device's update is exactly zero: whatever the server releases is the noise."""

    def client_updates(self, params, device_ids, num_examples, round_idx) -> Iterator:
        for _ in device_ids:
            yield np.zeros_like(params), 0.0


class HugeTask(MeanTask):
    """Device data drives an enormous update (an adversary crafting its contribution)."""

    def client_updates(self, params, device_ids, num_examples, round_idx) -> Iterator:
        for dev in device_ids:
            yield np.full_like(params, 1e30 if dev % 2 else -3e6), 0.0


class SlowMean(MeanTask):
    """Slow enough local training that a kill lands mid-round."""

    def client_updates(self, params, device_ids, num_examples, round_idx) -> Iterator:
        for out in super().client_updates(params, device_ids, num_examples, round_idx):
            time.sleep(0.03)
            yield out


class SlowMeanSaysWhere(SlowMean):
    """SlowMean that writes, into the directory $FLEET_TEST_WHERE, a file named for its process
    holding the round and the largest device id it is training (ids are row indices: which shard
    range it is), so that a fault test can lose the node of a chosen shard. In round 1 the shard
    of ids from 25,000 then holds (up to a minute) before its first update: a kill lands while it
    trains, before it journals the round, never by chance of timing after."""

    def client_updates(self, params, device_ids, num_examples, round_idx) -> Iterator:
        where = os.environ.get("FLEET_TEST_WHERE")
        if where and len(device_ids):
            top = int(np.max(device_ids))
            Path(where, str(os.getpid())).write_text(f"{round_idx} {top}")
            if round_idx == 1 and top >= 25_000:
                time.sleep(60)
        yield from super().client_updates(params, device_ids, num_examples, round_idx)


class NaNForOddDevices(MeanTask):
    """Odd device ids send NaN or Inf in their update."""

    def client_updates(self, params, device_ids, num_examples, round_idx) -> Iterator:
        updates = super().client_updates(params, device_ids, num_examples, round_idx)
        for dev, (delta, loss) in zip(device_ids, updates, strict=True):
            if dev % 2:
                delta = delta.copy()
                delta[0] = np.nan if dev % 4 == 1 else np.inf
            yield delta, loss


class ReportsTwice(MeanTask):
    """A device that tries to contribute two updates in one round."""

    def client_updates(self, params, device_ids, num_examples, round_idx) -> Iterator:
        for _ in device_ids:
            big = np.full_like(params, 100.0)
            yield big, 0.0
            yield big, 0.0


class UnitPush(MeanTask):
    """Every device pushes hard along the all-ones direction (clipped to S on the shard)."""

    def client_updates(self, params, device_ids, num_examples, round_idx) -> Iterator:
        for _ in device_ids:
            yield np.full_like(params, 100.0), 0.0


class NeedsAGpu(MeanTask):
    """A client that refuses to start, as a shard asked for a GPU it cannot see does."""

    def __init__(self, cfg, role: str):
        super().__init__(cfg, role)
        if role == "client":
            from fleet.config import ConfigError

            raise ConfigError("model.device: 'cuda' but this shard sees no CUDA device")


class LargestFirst(MeanTask):
    """Asks for its cohort largest device first, and records the example counts it was handed."""

    seen: list[list[int]] = []

    def cohort_order(self, num_examples):
        return np.argsort(-np.asarray(num_examples), kind="stable")

    def client_updates(self, params, device_ids, num_examples, round_idx) -> Iterator:
        LargestFirst.seen.append([int(n) for n in num_examples])
        return super().client_updates(params, device_ids, num_examples, round_idx)


class NotAPermutation(MeanTask):
    def cohort_order(self, num_examples):
        return np.zeros(len(num_examples), dtype=np.int64)


class OneDevice(MeanTask):
    """Every device's update is zero but `TARGET`'s, which is `UPDATE`: "push" (100 along every
    coordinate, clipped to S on the shard), "pull" (the opposite), "zero", or "nan" (an invalid
    update: the device counts for nothing, the zero-out neighbour). The one-device experiment of
    a privacy attack: with everyone else silent, does anything released change with one device?
    Class attributes, so in-process tests set them (Ray workers would not see a change)."""

    TARGET = -1
    UPDATE = "push"

    def client_updates(self, params, device_ids, num_examples, round_idx) -> Iterator:
        for dev in device_ids:
            if int(dev) != OneDevice.TARGET:
                yield np.zeros_like(params), 0.0
            elif OneDevice.UPDATE == "nan":
                yield np.full_like(params, np.nan), 0.0
            else:
                sign = {"push": 100.0, "pull": -100.0, "zero": 0.0}[OneDevice.UPDATE]
                yield np.full_like(params, sign), 1.0 + sign


class AllInvalid(MeanTask):
    """Every update is NaN: a released round carries the noise alone."""

    def client_updates(self, params, device_ids, num_examples, round_idx) -> Iterator:
        for _ in device_ids:
            yield np.full_like(params, np.nan), 0.0


class Neighbour(MeanTask):
    """The neighbouring-runs harness's task (tests/neighbours.py). Every device sends the unit
    vector of coordinate `LEAF` (set by the harness before each round: the round's release index),
    so each released model shows which rounds' sums it contains; `TARGET` sends `UPDATE`: "push"
    (the same unit vector), "zero" (a valid zero update: its data zeroed) or "nan" (invalid).
    Evaluations are empty: the released model is the only output that may differ. Class
    attributes: in-process runs only."""

    TARGET = -1
    UPDATE = "push"
    LEAF = 0

    def client_updates(self, params, device_ids, num_examples, round_idx) -> Iterator:
        for dev in device_ids:
            unit = np.zeros_like(params)
            unit[Neighbour.LEAF] = 1.0
            if int(dev) != Neighbour.TARGET or Neighbour.UPDATE == "push":
                yield unit, 0.0
            elif Neighbour.UPDATE == "zero":
                yield np.zeros_like(params), 0.0
            else:
                yield np.full_like(params, np.nan), 0.0

    def evaluate(self, params) -> dict:
        return {}


# One file per test worker (pytest-xdist runs two Ray sessions side by side; the Ray workers inherit
# the worker's environment, so they read the same name).
NEIGHBOUR_FILE = (
    Path(tempfile.gettempdir())
    / f"fleet-neighbour-{os.getuid()}-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.json"
)


class NeighbourOnRay(MeanTask):
    """The neighbouring-runs task for Ray runs, whose workers cannot see a class attribute set in
    the test: `NEIGHBOUR_FILE` names the target and its update ("push": its own mean-task update,
    "zero", or "nan"), read when the task is built. Evaluations are empty: the released model is
    the only output that may differ."""

    def __init__(self, cfg, role: str):
        super().__init__(cfg, role)
        spec = json.loads(NEIGHBOUR_FILE.read_text()) if NEIGHBOUR_FILE.exists() else {}
        self.target, self.update = int(spec.get("target", -1)), spec.get("update", "push")

    def client_updates(self, params, device_ids, num_examples, round_idx) -> Iterator:
        updates = super().client_updates(params, device_ids, num_examples, round_idx)
        for dev, (delta, loss) in zip(device_ids, updates, strict=True):
            if int(dev) == self.target and self.update == "zero":
                delta = np.zeros_like(delta)
            elif int(dev) == self.target and self.update == "nan":
                delta = np.full_like(delta, np.nan)
            yield delta, loss

    def evaluate(self, params) -> dict:
        return {}
