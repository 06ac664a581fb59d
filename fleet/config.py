"""Typed configuration: dataclasses registered with Hydra's ConfigStore, and validation.

The dataclasses are the schema: Hydra merges the YAML profiles in `conf/` onto them, so an unknown
key or a value of the wrong type is rejected by OmegaConf before anything starts. `validate`
adds the semantic checks (ranges, cross-field rules) and names the offending key in one line,
because a user sweeping hundreds of runs needs to see at once which override was wrong.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

# The Hydra config tree (conf/ at the repository root, beside the package).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


class ConfigError(ValueError):
    """A bad configuration value; the message starts with the dotted key."""


@dataclass
class AvailabilityConfig:
    """When a phone is idle, charging and on an unmetered network (Bonawitz et al. 2019)."""

    model: str = "diurnal"  # diurnal | markov | trace | always
    # diurnal: a share of devices charge at night (start ~ N(mean, std) local hour), the rest
    # at a uniformly random hour; each night the window happens with a per-device probability.
    night_share: float = 0.45
    start_hour_mean: float = 22.5
    start_hour_std: float = 1.5
    window_hours_median: float = 6.0
    window_hours_sigma: float = 0.3
    nightly_prob_min: float = 0.5
    nightly_prob_max: float = 1.0
    # markov: alternating exponential on/off durations
    on_hours_mean: float = 2.0
    off_hours_mean: float = 6.0
    # trace: Parquet with columns device_id, start, end (simulated seconds)
    trace_path: str | None = None


@dataclass
class FleetConfig:
    """The population of phones and the round protocol that runs over it."""

    name: str = "small"
    population: int = 100_000
    path: str | None = None  # Parquet population (bring your own fleet)
    id_mode: str = "index"  # index | random (large random 63-bit ids)
    timezones: list[float] = field(default_factory=lambda: [1.0])  # UTC offsets, hours
    timezone_weights: list[float] = field(default_factory=list)
    compute_flops_median: float = 5e9  # achieved FLOP/s of on-device training
    compute_flops_sigma: float = 0.7  # lognormal: heavy-tailed speeds
    downlink_median: float = 2.5e6  # bytes/s
    downlink_sigma: float = 0.8
    uplink_median: float = 6e5  # bytes/s
    uplink_sigma: float = 0.8
    memory_gb_median: float = 4.0
    memory_gb_sigma: float = 0.4
    low_memory_share: float = 0.1  # share of devices under min_memory_gb (ineligible)
    min_memory_gb: float = 2.0
    failure_prob_mean: float = 0.05  # per-job failure probability, Beta-distributed per device
    examples_median: float = 48.0
    examples_sigma: float = 1.0  # lognormal: heavy-tailed example counts
    examples_max: int = 256
    availability: AvailabilityConfig = field(default_factory=AvailabilityConfig)
    # round protocol
    goal: int = 100
    overselect: float = 1.3  # select ceil(goal * overselect)
    deadline_s: float = 600.0
    min_reports: int | None = None  # default: 80% of the goal
    min_separation_hours: float = 24.0
    # a device is counted at most once in any this many consecutive released rounds (0: no
    # limit in rounds); DP-FTRL's guarantee rests on it
    min_separation_rounds: int = 0
    round_interval_s: float = 120.0  # simulated gap between rounds
    start_hour: float = 0.0  # UTC hour of day when the simulated clock starts


@dataclass
class ModelConfig:
    name: str = "cifg_small"
    cell: str = "cifg"  # cifg | lstm
    vocab_size: int = 2000  # words, without the 4 special tokens
    embed_dim: int = 32
    hidden_dim: int = 96
    proj_dim: int = 32
    seq_len: int = 20
    engine: str = "auto"  # auto (batched on a GPU, fused on CPU) | fused | reference | batched
    device: str = "auto"  # auto (cuda when the shard has a GPU, see ray.gpus_per_shard) | cpu | cuda[:N]
    batch_devices: int = 32  # batched engine: devices trained in lockstep
    init_scale: float = 0.1


@dataclass
class DataConfig:
    name: str = "synthetic"  # synthetic | arrow
    path: str | None = None  # arrow: corpus folder written by fleet-ingest
    ngram_order: int = 2
    zipf_a: float = 1.1  # word frequencies: Zipf exponent over the vocabulary
    branching: int = 24  # successors per context in the hidden language
    successor_zipf_a: float = 1.5  # how peaked what follows a word is (Zipf over its successors)
    device_topics: int = 8  # non-IID: per-device preferences over topics
    topic_alpha: float = 0.3  # Dirichlet concentration of a device's topic mix (small: skewed)
    topic_strength: float = 0.4  # share of steps that follow the topic (0: IID devices)
    max_examples_per_device: int = 256  # synthetic: examples(n=None); arrow: cap on stored ones
    eval_devices: int = 200
    eval_examples: int = 4000


@dataclass
class TaskConfig:
    """What is trained. The round does not know; tasks plug in (fleet.learning.tasks)."""

    name: str = "nwp"  # nwp | mean
    mean_dim: int = 8


@dataclass
class TrainConfig:
    rounds: int = 100
    client_epochs: int = 1
    batch_size: int = 16
    client_lr: float = 0.5
    server_optimizer: str = "sgdm"  # sgd | sgdm (Nesterov) | momentum (heavy ball) | adam
    server_lr: float = 1.0
    server_momentum: float = 0.9
    eval_every: int = 10
    checkpoint_every: int = 10  # rounds; also at the end and on Ctrl-C
    participation_audit: bool = True  # audit who trained and per-device epsilon at the end (DP runs)
    max_wall_seconds: float | None = None
    # guards (fleet.runtime.guards): stop, checkpointed, with exit code 3 when training diverges
    stop_on_divergence: bool = True
    divergence_factor: float = 4.0  # the training loss above this times its best ...
    divergence_rounds: int = 3  # ... for this many released rounds in a row
    guard_warmup_rounds: int = 20  # evaluations below their baseline count from this round on
    min_signal_to_noise: float = 0.02  # warn when the update's SNR stays below this ...
    guard_window: int = 20  # ... for this many released rounds
    max_pure_noise_rounds: int = 5  # stop after this many released rounds in a row with no valid update


@dataclass
class PrivacyConfig:
    """DP-FedAvg and its ledger (fleet.privacy; README "What epsilon means here")."""

    name: str = "dp_fedavg"
    enabled: bool = True
    mechanism: str = "dp_fedavg"  # dp_fedavg | dp_ftrl (tree aggregation, no sampling assumption)
    restart_every: int = 0  # dp_ftrl: a new tree every this many released rounds (0: never)
    noise_multiplier: float = 1.0
    clip_norm: float = 0.5
    delta: float | None = None  # default: 1 / population^1.1
    target_epsilon: float | None = None  # stop before this would be passed
    # poisson: each available device joins with q_r (zero-out neighbours); fixed_size: a cohort
    # drawn without replacement (replace-one neighbours: the sum's sensitivity is 2S)
    sampling: str = "poisson"
    accountant: str = "pld"  # pld | rdp (dp-accounting)
    telemetry: str = "full"  # full: research telemetry, not covered by epsilon | private: release only
    allow_zero_noise: bool = False  # z = 0 with DP on: clipping without noise, epsilon infinite
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    initial_clip: float = 0.1
    count_noise: float | None = None  # sigma_b; default goal / 20


@dataclass
class DropoutConfig:
    """Dropout scenarios on top of the fleet's own (per-device failure rates, closing windows,
    deadline); they compose with any fleet. `none` adds nothing."""

    name: str = "none"
    extra_failure: float = 0.0  # independent per-job failure probability added to every device
    # correlated outage: devices in these time zones (UTC offsets) are offline for a window
    outage_timezones: list[float] = field(default_factory=list)
    outage_all: bool = False  # the whole fleet goes offline instead
    outage_start_hour: float = 0.0  # simulated hours since the run's start
    outage_hours: float = 0.0
    # fleet-wide failure spike: jobs running in the window fail with this probability
    spike_start_hour: float = 0.0
    spike_hours: float = 0.0
    spike_failure: float = 0.0
    # battery / thermal: a job aborts with probability 1 - exp(-compute time / tau)
    battery_tau_minutes: float | None = None
    # diurnal trough: rounds may only start within [start, end) UTC hours of the day
    active_hours: list[float] = field(default_factory=list)


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local Ray; "auto" or ray://... to join a cluster
    num_cpus: int | None = None  # local Ray only; default: all cores
    shards: int = 0  # 0: one per CPU
    cpus_per_shard: float = 1.0  # each shard's placement-group bundle (and its actor) reserves these
    gpus_per_shard: float = 0.0
    placement_timeout_s: float = 300.0  # a cluster may take this long to find (or add) the nodes
    join_foreign: bool = (
        False  # let `auto` join a Ray another process started with ray.init, or another user's
    )
    dashboard: bool = False
    log_to_driver: bool = False


@dataclass
class TrackingConfig:
    """W&B: offline by default so every run is tracked with no network and no login."""

    mode: str = "offline"  # offline | online | disabled
    project: str = "fleet"
    entity: str | None = None
    group: str | None = None  # default in a multirun: one group per sweep
    tags: list[str] = field(default_factory=list)  # a multirun adds each job's overrides
    media: bool = True  # log the report's plots to W&B when the run ends


@dataclass
class CanaryGroupConfig:
    """`canaries` canaries, each planted on `devices` devices of its own (no device holds two).

    `devices: 0` is a control group: canaries drawn exactly as the others and never planted, so
    their exposure measures chance (about 1/ln 2 bits on average) under the same model.

    On each planted device the canary replaces `repeats` examples, or, if `prob` is set, each
    example independently with probability `prob` (Carlini et al. 2019; Thakkar et al. 2021).
    """

    devices: int = 1
    repeats: int = 1
    prob: float | None = None
    canaries: int = 1


@dataclass
class MemorizationConfig:
    """Secret-sharer canaries planted in the fleet's data, and the audit that measures them.

    `none` plants nothing. A canary is a prefix (`prefix` words shared by all canaries, or
    `prefix_words` random words of its own) followed by `secret_words` random words drawn from
    the corpus unigram over words (`secret_dist=unigram`) or uniformly (`uniform`).
    """

    name: str = "none"
    groups: list[CanaryGroupConfig] = field(default_factory=list)
    prefix: list[str] = field(default_factory=list)
    prefix_words: int = 3
    secret_words: int = 5
    secret_dist: str = "unigram"  # unigram | uniform
    references: int = 16384  # R fresh candidates the canary is ranked against (exposure by rank)
    samples: int = 65536  # candidates the skew-normal is fitted to (extrapolated exposure)
    beam_width: int = 10  # beam search from the prefix: extracted = top beam; also within the top b
    bootstrap: int = 20  # resamples for the extrapolation's interval (canaries ranked first only)
    generic_prefixes: int = 8  # beam search from this many prefixes no canary has, too
    track_every: int = 0  # rank exposure every this many rounds (0: final audit only)
    track_references: int = 1024  # candidates of that running rank (fixed for the run)
    audit: bool = True  # audit when training ends (fleet-audit RUN_DIR does it again)
    plan_path: str | None = None  # set by fleet.runtime.driver: RUN_DIR/canaries/plan.npz, read by the shards


@dataclass
class Config:
    fleet: FleetConfig = MISSING
    model: ModelConfig = MISSING
    privacy: PrivacyConfig = MISSING
    data: DataConfig = MISSING
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    memorization: MemorizationConfig = field(default_factory=MemorizationConfig)
    seed: int = 0
    rng: str = "reproducible"  # reproducible | secure
    resume: str | None = None  # RUN_DIR of a run to continue from its last checkpoint
    progress: bool = True
    verbose: bool = False


def config_from_dict(d: dict) -> Config:
    """A typed Config from a saved (resolved) config dict, validated by the schema."""
    d = {k: v for k, v in d.items() if k != "hydra"}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="fleet", name="base_fleet", node=FleetConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="privacy", name="base_privacy", node=PrivacyConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="dropout", name="base_dropout", node=DropoutConfig)
    cs.store(group="tracking", name="base_tracking", node=TrackingConfig)
    cs.store(group="ray", name="base_ray", node=RayConfig)
    cs.store(group="memorization", name="base_memorization", node=MemorizationConfig)


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


def separation_rounds(cfg: Any) -> int:
    """The participation limit in released rounds that the shards enforce.

    `fleet.min_separation_rounds`, and for DP-FTRL also `fleet.min_separation_hours` converted by
    the clock's worst case: a round lasts at most deadline_s + round_interval_s of simulated time,
    so two participations H hours apart are at least ceil(H x 3600 / (deadline_s +
    round_interval_s)) rounds apart; enforcing that many released rounds as well makes it hold
    whatever rounds are abandoned or however the clock jumps (dropout.active_hours).
    """
    f = cfg.fleet
    rounds = f.min_separation_rounds
    if getattr(cfg.privacy, "mechanism", "dp_fedavg") == "dp_ftrl" and f.min_separation_hours > 0:
        rounds = max(rounds, math.ceil(f.min_separation_hours * 3600.0 / (f.deadline_s + f.round_interval_s)))
    return int(rounds)


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


def validate_data(cfg: Any) -> None:
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


def validate_memorization(cfg: Any, key: str = "memorization") -> None:
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


def validate_privacy(cfg: Any) -> None:
    """The mechanism's settings: a bad number must never become a privacy claim."""
    p = cfg.privacy
    _choice(p.telemetry, "privacy.telemetry", ("full", "private"))
    if not p.enabled:
        return
    _check(p.noise_multiplier >= 0, "privacy.noise_multiplier", f"must be >= 0 (got {p.noise_multiplier})")
    _check(
        p.noise_multiplier > 0 or p.allow_zero_noise,
        "privacy.noise_multiplier",
        "0 adds no noise: epsilon is infinite. Set privacy.allow_zero_noise=true to clip without "
        "noise on purpose, or use privacy=none",
    )
    _check(p.clip_norm > 0, "privacy.clip_norm", f"must be > 0 (got {p.clip_norm})")
    _choice(p.mechanism, "privacy.mechanism", ("dp_fedavg", "dp_ftrl"))
    _choice(p.sampling, "privacy.sampling", ("poisson", "fixed_size"))
    _choice(p.accountant, "privacy.accountant", ("pld", "rdp"))
    if p.mechanism == "dp_ftrl":
        _check(p.restart_every >= 0, "privacy.restart_every", f"must be >= 0 (got {p.restart_every})")
        _check(not p.adaptive, "privacy.adaptive", "adaptive clipping is not available with dp_ftrl")
        _check(
            cfg.train.server_optimizer in ("sgd", "sgdm", "momentum"),
            "train.server_optimizer",
            "dp_ftrl's server is FTRL: sgd (plain), or sgdm / momentum (DP-FTRLM: heavy-ball "
            "momentum on the prefix sums; Nesterov has no FTRL form)",
        )
        return
    _check(
        not (p.accountant == "pld" and p.sampling == "fixed_size"),
        "privacy.accountant",
        "pld cannot account fixed_size sampling (dp-accounting has no PLD for sampling without "
        "replacement under replace-one); set privacy.accountant=rdp or privacy.sampling=poisson",
    )
    if p.delta is not None:
        _check(0 < p.delta < 1, "privacy.delta", f"must be in (0, 1) (got {p.delta})")
    if p.target_epsilon is not None:
        _check(p.target_epsilon > 0, "privacy.target_epsilon", f"must be > 0 (got {p.target_epsilon})")
    if p.adaptive:
        _check(p.initial_clip > 0, "privacy.initial_clip", f"must be > 0 (got {p.initial_clip})")
        _check(0 < p.target_quantile < 1, "privacy.target_quantile", "must be in (0, 1)")
        _check(p.clip_lr > 0, "privacy.clip_lr", f"must be > 0 (got {p.clip_lr})")
        sigma_b = p.count_noise if p.count_noise is not None else cfg.fleet.goal / 20.0
        _check(sigma_b > 0, "privacy.count_noise", f"must be > 0 (got {sigma_b})")
        _check(
            p.noise_multiplier < 2 * sigma_b,
            "privacy.noise_multiplier",
            f"adaptive clipping needs z < 2 * count_noise ({p.noise_multiplier} >= {2 * sigma_b}); "
            "raise privacy.count_noise or fleet.goal",
        )


def validate(cfg: Any) -> None:
    """Check a composed config (dataclass or DictConfig) before anything is started."""
    check_finite(cfg)
    validate_fleet(cfg.fleet)
    if cfg.task.name == "nwp":
        validate_data(cfg)
    _choice(cfg.rng, "rng", ("reproducible", "secure"))
    m = cfg.model
    _choice(m.engine, "model.engine", ("auto", "fused", "reference", "batched"))
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
    validate_privacy(cfg)
    t = cfg.train
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
    _check(cfg.ray.shards >= 0, "ray.shards", "must be >= 0")
    _check(cfg.ray.cpus_per_shard > 0, "ray.cpus_per_shard", f"must be > 0 (got {cfg.ray.cpus_per_shard})")
    _check(
        0 <= cfg.ray.gpus_per_shard <= 1,
        "ray.gpus_per_shard",
        f"must be in [0, 1]: a shard trains on one GPU; for more GPUs use more shards "
        f"(got {cfg.ray.gpus_per_shard})",
    )
    _check(cfg.ray.placement_timeout_s > 0, "ray.placement_timeout_s", "must be > 0")
    _choice(cfg.tracking.mode, "tracking.mode", ("offline", "online", "disabled"))
    validate_dropout(cfg.dropout)
    if cfg.ray.num_cpus is not None:
        _check(cfg.ray.num_cpus >= 1, "ray.num_cpus", f"must be >= 1 (got {cfg.ray.num_cpus})")
    validate_memorization(cfg)
    check_known_keys(cfg)
