"""The audits, attached to a run as hooks: the driver calls the lists, never an audit by name.

Each entry is an import path `module:function`, imported when called (the audits load
matplotlib, scipy and dp-accounting, which a run without them never needs). A hook gets the
`Run` and decides for itself whether it applies; what it adds to `run.summary` goes to
summary.json and W&B.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleet.config import Config

# Before the actors start (what the shards must read when they are built); each returns the
# config the actors get (a copy naming what it wrote), or None to leave it as it is.
BEFORE_START = ("fleet.audits.memorization:before_start",)
# After every logged round, with the released weights (e.g. the canaries' exposure over training).
DURING_TRAINING = ("fleet.audits.memorization:during_training",)
# When training ends, before the W&B run is finished (their figures go to it).
AFTER_TRAINING = (
    "fleet.audits.memorization:after_training",
    "fleet.audits.participation:after_training",
    "fleet.audits.plan:after_training",
)


@dataclass
class Run:
    """What a hook may look at: the config, the run directory and, after training, the live
    shards, the metrics lines, the summary so far, why training stopped and a way to evaluate the
    model on given held-out devices; during training, the round just logged and a way to fetch
    the released weights (fetched only by a hook that needs them)."""

    cfg: Config
    run_dir: Path
    shards: list[Any] = field(default_factory=list)
    lines: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    stop_reason: str = ""
    evaluate_devices: Callable[[Any, Any], dict] | None = None
    round: int = 0
    weights: Callable[[], Any] | None = None


def _hook(path: str) -> Callable[[Run], Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def call(hooks: Sequence[str], run: Run) -> None:
    for path in hooks:
        _hook(path)(run)


def before_start(cfg: Config, run_dir: Path) -> Config:
    """The BEFORE_START hooks in turn, each given the config the previous one returned; the last
    is the config the actors are built with."""
    for path in BEFORE_START:
        cfg = _hook(path)(Run(cfg, run_dir)) or cfg
    return cfg
