"""Validation: every setting checked before anything starts, each error naming its key."""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from fleet.config.schema import Config, ConfigError, DropoutConfig, FleetConfig, TrainConfig


def check_known_keys(obj: Any, prefix: str = "") -> None:
    """Reject keys the schema lacks. Hydra's `+key=value` adds them and `OmegaConf.to_object`
    sets them as stray attributes nothing reads, so a misspelt key would otherwise pass silently."""
    if not is_dataclass(obj):
        return
    names = {f.name for f in fields(obj)}
    for name, value in vars(obj).items():
        _check(name in names, f"{prefix}{name}", "no such key")
        check_known_keys(value, f"{prefix}{name}.")


AVAILABILITY_MODELS = ("diurnal", "markov", "trace", "always")


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def check_finite(obj: Any, prefix: str = "") -> None:
    """Reject inf and nan in every float setting: none of them means anything infinite, and a
    non-finite clip norm or noise multiplier would otherwise become a privacy claim."""
    if not is_dataclass(obj):
        return
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float):
            _check(math.isfinite(value), f"{prefix}{f.name}", f"must be finite (got {value})")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if isinstance(v, float):
                    _check(math.isfinite(v), f"{prefix}{f.name}[{i}]", f"must be finite (got {v})")
                check_finite(v, f"{prefix}{f.name}[{i}].")
        else:
            check_finite(value, f"{prefix}{f.name}.")


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"unknown value {value!r}; expected one of {', '.join(choices)}")


def min_reports(fleet: FleetConfig) -> int:
    if fleet.min_reports is None:
        return max(1, math.ceil(0.8 * fleet.goal))
    return fleet.min_reports


def validate_fleet(f: FleetConfig, key: str = "fleet") -> None:
    """Semantic checks on a fleet; raises ConfigError naming the key."""
    _check(f.population >= 1, f"{key}.population", f"must be >= 1 (got {f.population})")
    _check(f.goal >= 1, f"{key}.goal", f"must be >= 1 (got {f.goal})")
    _check(
        f.goal <= f.population,
        f"{key}.goal",
        f"must be <= {key}.population ({f.goal} > {f.population})",
    )
    _check(f.overselect >= 1.0, f"{key}.overselect", f"must be >= 1.0 (got {f.overselect})")
    _check(f.deadline_s > 0, f"{key}.deadline_s", f"must be > 0 (got {f.deadline_s})")
    mr = min_reports(f)
    _check(1 <= mr <= f.goal, f"{key}.min_reports", f"must be in [1, goal={f.goal}] (got {mr})")
    _check(f.min_separation_hours >= 0, f"{key}.min_separation_hours", "must be >= 0")
    _check(f.min_separation_rounds >= 0, f"{key}.min_separation_rounds", "must be >= 0")
    _check(f.round_interval_s >= 0, f"{key}.round_interval_s", "must be >= 0")
    _choice(f.id_mode, f"{key}.id_mode", ("index", "random"))
    for name in (
        "compute_flops_median",
        "downlink_median",
        "uplink_median",
        "memory_gb_median",
        "examples_median",
    ):
        v = getattr(f, name)
        _check(v > 0, f"{key}.{name}", f"must be > 0 (got {v})")
    for name in (
        "compute_flops_sigma",
        "downlink_sigma",
        "uplink_sigma",
        "memory_gb_sigma",
        "examples_sigma",
    ):
        v = getattr(f, name)
        _check(v >= 0, f"{key}.{name}", f"must be >= 0 (got {v})")
    for name in ("low_memory_share", "failure_prob_mean"):
        v = getattr(f, name)
        _check(0.0 <= v <= 1.0, f"{key}.{name}", f"must be in [0, 1] (got {v})")
    _check(f.failure_prob_mean < 1.0, f"{key}.failure_prob_mean", "must be < 1")
    _check(f.examples_max >= 1, f"{key}.examples_max", "must be >= 1")
    _check(len(f.timezones) >= 1, f"{key}.timezones", "needs at least one offset")
    if f.timezone_weights:
        _check(
            len(f.timezone_weights) == len(f.timezones)
            and all(w >= 0 for w in f.timezone_weights)
            and sum(f.timezone_weights) > 0,
            f"{key}.timezone_weights",
            "must be non-negative, one per time zone, not all zero",
        )
    a = f.availability
    ak = f"{key}.availability"
    _choice(a.model, f"{ak}.model", AVAILABILITY_MODELS)
    _check(0 <= a.night_share <= 1, f"{ak}.night_share", "must be in [0, 1]")
    _check(
        0 <= a.nightly_prob_min <= a.nightly_prob_max <= 1,
        f"{ak}.nightly_prob_min",
        "need 0 <= nightly_prob_min <= nightly_prob_max <= 1",
    )
    _check(0 < a.window_hours_median < 24, f"{ak}.window_hours_median", "must be in (0, 24)")
    _check(a.on_hours_mean > 0, f"{ak}.on_hours_mean", "must be > 0")
    _check(a.off_hours_mean > 0, f"{ak}.off_hours_mean", "must be > 0")
    if a.model == "trace":
        _check(bool(a.trace_path), f"{ak}.trace_path", "required when availability.model=trace")


def validate_data(cfg: Config) -> None:
    """Semantic checks on cfg.data (with cfg.model); raises ConfigError naming the key."""
    d = cfg.data

    def check(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"data.{key}: {msg}")

    check(d.name in ("synthetic", "arrow"), "name", f"unknown corpus {d.name!r}; expected synthetic or arrow")
    check(d.max_examples_per_device >= 1, "max_examples_per_device", "must be >= 1")
    check(d.eval_examples >= 1, "eval_examples", "must be >= 1")
    if d.name == "arrow":
        check(bool(d.path), "path", "required when data=arrow (a folder written by fleet-ingest)")
        check(
            (Path(d.path) / "meta.json").is_file(),
            "path",
            f"{str(d.path)!r} is not a corpus folder (no meta.json); write one with fleet-ingest",
        )
        return
    v = cfg.model.vocab_size
    check(d.ngram_order >= 2, "ngram_order", f"must be >= 2 (got {d.ngram_order})")
    check(d.zipf_a > 0, "zipf_a", f"must be > 0 (got {d.zipf_a})")
    check(d.successor_zipf_a >= 0, "successor_zipf_a", f"must be >= 0 (got {d.successor_zipf_a})")
    check(1 <= d.branching <= v, "branching", f"must be in [1, model.vocab_size={v}] (got {d.branching})")
    check(d.device_topics >= 1, "device_topics", "must be >= 1")
    check(d.topic_alpha > 0, "topic_alpha", f"must be > 0 (got {d.topic_alpha})")
    check(0 <= d.topic_strength <= 1, "topic_strength", f"must be in [0, 1] (got {d.topic_strength})")
    check(d.eval_devices >= 1, "eval_devices", "must be >= 1")


def validate_dropout(d: DropoutConfig, key: str = "dropout") -> None:
    for name in ("extra_failure", "spike_failure"):
        v = getattr(d, name)
        _check(0.0 <= v <= 1.0, f"{key}.{name}", f"must be in [0, 1] (got {v})")
    for name in ("outage_hours", "spike_hours", "outage_start_hour", "spike_start_hour"):
        v = getattr(d, name)
        _check(v >= 0, f"{key}.{name}", f"must be >= 0 (got {v})")
    if d.battery_tau_minutes is not None:
        _check(d.battery_tau_minutes > 0, f"{key}.battery_tau_minutes", "must be > 0")
    if d.active_hours:
        h = d.active_hours
        _check(
            len(h) == 2 and 0 <= h[0] < 24 and 0 <= h[1] <= 24 and h[0] != h[1],
            f"{key}.active_hours",
            f"must be [start, end) hours of the day (got {list(h)})",
        )


def validate_memorization(cfg: Config, key: str = "memorization") -> None:
    """Canary settings; the fleet's capacity for them is checked when the plan is drawn."""
    m = cfg.memorization
    _choice(m.secret_dist, f"{key}.secret_dist", ("unigram", "uniform"))
    _check(m.secret_words >= 1, f"{key}.secret_words", f"must be >= 1 (got {m.secret_words})")
    _check(m.prefix_words >= 0, f"{key}.prefix_words", f"must be >= 0 (got {m.prefix_words})")
    _check(m.references >= 1, f"{key}.references", f"must be >= 1 (got {m.references})")
    _check(m.samples >= 16, f"{key}.samples", f"must be >= 16 to fit a skew-normal (got {m.samples})")
    _check(m.beam_width >= 1, f"{key}.beam_width", f"must be >= 1 (got {m.beam_width})")
    if not m.groups:
        return
    _check(cfg.task.name == "nwp", f"{key}.groups", f"canaries need task.name=nwp (got {cfg.task.name!r})")
    words = (len(m.prefix) if m.prefix else m.prefix_words) + m.secret_words
    _check(
        words < cfg.model.seq_len,
        f"{key}.secret_words",
        f"prefix + secret ({words} words) + eos must fit model.seq_len={cfg.model.seq_len}",
    )
    for i, g in enumerate(m.groups):
        gk = f"{key}.groups[{i}]"
        _check(g.devices >= 0, f"{gk}.devices", f"must be >= 0, 0 for a control group (got {g.devices})")
        _check(g.canaries >= 1, f"{gk}.canaries", f"must be >= 1 (got {g.canaries})")
        _check(g.repeats >= 1, f"{gk}.repeats", f"must be >= 1 (got {g.repeats})")
        if g.prob is not None:
            _check(0 < g.prob <= 1, f"{gk}.prob", f"must be in (0, 1] (got {g.prob})")
    for name in ("bootstrap", "generic_prefixes", "track_every"):
        _check(getattr(m, name) >= 0, f"{key}.{name}", f"must be >= 0 (got {getattr(m, name)})")
    _check(m.track_references >= 1, f"{key}.track_references", f"must be >= 1 (got {m.track_references})")


def validate(cfg: Config) -> None:
    """Check a composed config (dataclass or DictConfig) before anything is started: everything but
    the privacy mechanism's own settings, which its class checks
    (`fleet.privacy.mechanisms.validate` runs both)."""
    check_finite(cfg)
    validate_fleet(cfg.fleet)
    _choice(cfg.plan.target_for, "plan.target_for", ("headline", "p99", "worst"))
    if cfg.plan.target_epsilon is not None:
        _check(
            cfg.plan.target_epsilon > 0, "plan.target_epsilon", f"must be > 0 (got {cfg.plan.target_epsilon})"
        )
    if cfg.task.name == "nwp":
        validate_data(cfg)
    _choice(cfg.rng, "rng", ("reproducible", "secure"))
    _validate_model(cfg)
    _validate_task(cfg)
    _choice(cfg.privacy.telemetry, "privacy.telemetry", ("full", "private"))
    _validate_train(cfg.train)
    _validate_ray(cfg)
    _choice(cfg.tracking.mode, "tracking.mode", ("offline", "online", "disabled"))
    validate_dropout(cfg.dropout)
    if cfg.ray.num_cpus is not None:
        _check(cfg.ray.num_cpus >= 1, "ray.num_cpus", f"must be >= 1 (got {cfg.ray.num_cpus})")
    validate_memorization(cfg)
    check_known_keys(cfg)


def _validate_model(cfg: Config) -> None:
    """The engine and the device it trains on (a GPU device needs a GPU engine and GPU shards)."""
    m = cfg.model
    _choice(m.engine, "model.engine", ("auto", "fused", "reference", "batched"))
    _choice(m.precision, "model.precision", ("auto", "fp32", "bf16"))
    _choice(m.kernels, "model.kernels", ("auto", "native", "torch"))
    _check(
        not (m.precision == "bf16" and m.engine == "reference"),
        "model.precision",
        "the reference engine is the plain fp32 one the others are tested against; "
        "use model.engine=auto, fused or batched for bf16",
    )
    _check(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(m.device)) is not None,
        "model.device",
        f"expected auto, cpu, cuda or cuda:N (got {m.device!r})",
    )
    _check(m.batch_devices >= 1, "model.batch_devices", f"must be >= 1 (got {m.batch_devices})")
    if str(m.device).startswith("cuda"):
        _check(
            m.engine not in ("fused", "reference"),
            "model.engine",
            f"{m.engine!r} runs on CPU only; use model.engine=batched (or auto) with model.device={m.device}",
        )
        _check(
            cfg.ray.gpus_per_shard > 0,
            "model.device",
            f"{m.device!r} needs a GPU for each shard: set ray.gpus_per_shard (1, or a fraction)",
        )


def _validate_task(cfg: Config) -> None:
    """A built-in task, or a user's `module:Class` that imports (on every node)."""
    if ":" not in cfg.task.name:  # "module:Class" plugs in a user's own task
        _choice(cfg.task.name, "task.name", ("nwp", "mean"))
    else:
        module, _, name = cfg.task.name.partition(":")
        try:
            found = hasattr(importlib.import_module(module), name)
        except ImportError as e:
            raise ConfigError(
                f"task.name: cannot import {module!r} ({e}); put it on PYTHONPATH (on every node)"
            ) from None
        _check(found, "task.name", f"module {module!r} has no {name!r}")


def _validate_train(t: TrainConfig) -> None:
    """Local and server optimisation, evaluation, checkpoints and the divergence guards."""
    _check(t.rounds >= 0, "train.rounds", f"must be >= 0 (got {t.rounds})")
    _check(t.client_epochs >= 1, "train.client_epochs", "must be >= 1")
    _check(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    _check(t.client_lr > 0, "train.client_lr", f"must be > 0 (got {t.client_lr})")
    _check(t.server_lr > 0, "train.server_lr", f"must be > 0 (got {t.server_lr})")
    _choice(t.server_optimizer, "train.server_optimizer", ("sgd", "sgdm", "momentum", "adam"))
    _check(t.eval_every >= 1, "train.eval_every", "must be >= 1")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
    _check(t.divergence_factor > 1, "train.divergence_factor", f"must be > 1 (got {t.divergence_factor})")
    _check(t.guard_window >= 1, "train.guard_window", "must be >= 1")
    _check(t.divergence_rounds >= 1, "train.divergence_rounds", "must be >= 1")
    _check(t.max_pure_noise_rounds >= 0, "train.max_pure_noise_rounds", "must be >= 0")


def _validate_ray(cfg: Config) -> None:
    """Shards, their resources, and how long to wait for placement and recovery."""
    _check(cfg.ray.shards >= 0, "ray.shards", "must be >= 0")
    _check(cfg.ray.cpus_per_shard > 0, "ray.cpus_per_shard", f"must be > 0 (got {cfg.ray.cpus_per_shard})")
    _check(
        0 <= cfg.ray.gpus_per_shard <= 1,
        "ray.gpus_per_shard",
        f"must be in [0, 1]: a shard trains on one GPU; for more GPUs use more shards "
        f"(got {cfg.ray.gpus_per_shard})",
    )
    _check(cfg.ray.placement_timeout_s > 0, "ray.placement_timeout_s", "must be > 0")
    _check(cfg.ray.recovery_timeout_s > 0, "ray.recovery_timeout_s", "must be > 0")
