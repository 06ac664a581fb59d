"""Typed configuration: dataclasses registered with Hydra's ConfigStore, and validation.

The dataclasses are the schema: Hydra merges the YAML profiles in `conf/` onto them, so an unknown
key or a value of the wrong type is rejected by OmegaConf before anything starts. `validate`
adds the semantic checks (ranges, cross-field rules) and names the offending key in one line,
because a user sweeping hundreds of runs needs to see at once which override was wrong.
"""

from fleet.config.schema import (
    CONF_DIR,
    AvailabilityConfig,
    CanaryGroupConfig,
    Config,
    ConfigError,
    DataConfig,
    DropoutConfig,
    FleetConfig,
    MemorizationConfig,
    ModelConfig,
    PrivacyConfig,
    RayConfig,
    TaskConfig,
    TrackingConfig,
    TrainConfig,
    config_from_dict,
    register_configs,
)
from fleet.config.validation import (
    AVAILABILITY_MODELS,
    check_finite,
    check_known_keys,
    min_reports,
    validate,
    validate_data,
    validate_dropout,
    validate_fleet,
    validate_memorization,
)

__all__ = [
    "AVAILABILITY_MODELS",
    "CONF_DIR",
    "AvailabilityConfig",
    "CanaryGroupConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DropoutConfig",
    "FleetConfig",
    "MemorizationConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RayConfig",
    "TaskConfig",
    "TrackingConfig",
    "TrainConfig",
    "check_finite",
    "check_known_keys",
    "config_from_dict",
    "min_reports",
    "register_configs",
    "validate",
    "validate_data",
    "validate_dropout",
    "validate_fleet",
    "validate_memorization",
]
