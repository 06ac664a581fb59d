"""Typed configuration: dataclasses registered with Hydra's ConfigStore, and validation.

The dataclasses are the schema: Hydra merges the YAML profiles in `conf/` onto them, so an unknown
key or a value of the wrong type is rejected by OmegaConf before anything starts. `validate`
adds the semantic checks (ranges, cross-field rules) and names the offending key in one line,
because a user sweeping hundreds of runs needs to see at once which override was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

# The Hydra config tree (conf/ at the repository root, beside the package).
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


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
    # The local-training matmuls: auto (bf16 where the hardware has it and the model's GEMMs are
    # large enough to gain, see fleet.learning.engines.resolve_precision) | fp32 | bf16. The
    # weights a device starts from, its update, the clip, the sum and the noise are fp32 or wider
    # in every mode.
    precision: str = "auto"
    # The fused engine's bf16 kernels: auto (native ones, built with the machine's C compiler on
    # first use, where there is one; PyTorch's ops otherwise) | native (required) | torch.
    kernels: str = "auto"
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
    # fleet-plan: every round as it would run (check-in, sampling, timing, dropout, the limit, the
    # mechanism and its ledger) with no local training and no model: each update is zero
    dry_run: bool = False
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
    # dp_fedavg | dp_ftrl (tree aggregation) | dp_blt (BLT correlated noise): the last two assume
    # no sampling, only the participation limit
    mechanism: str = "dp_fedavg"
    restart_every: int = 0  # dp_ftrl: a new tree every this many released rounds (0: never)
    blt_max_buffers: int = 8  # dp_blt: jax-privacy chooses up to this many buffers
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
    # A crashed shard must be running again within this long (Ray restarts it, on another node if
    # its own is gone); past it the run checkpoints and stops with exit code 3 and a resume command.
    recovery_timeout_s: float = 120.0
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
    plan_path: str | None = None  # derived: the copy the actors get has RUN_DIR/canaries/plan.npz


@dataclass
class PlanConfig:
    """fleet-plan's calibration (fleet.audits.plan): the z that meets a target epsilon."""

    target_epsilon: float | None = None
    target_for: str = "headline"  # headline | p99 | worst


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
    plan: PlanConfig = field(default_factory=PlanConfig)
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
