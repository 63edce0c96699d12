"""Experiment configuration: typed sections (:mod:`.schema`) and YAML loading (:mod:`.loading`)."""

from __future__ import annotations

from medseg.config.loading import (
    checkpoint_config,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    migrate_config,
    parse_override,
    recipe_path,
)
from medseg.config.schema import (
    AugmentConfig,
    Config,
    ConfigError,
    DataConfig,
    InferConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PreprocessConfig,
    TrainConfig,
)

__all__ = [
    "AugmentConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "InferConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "PreprocessConfig",
    "TrainConfig",
    "checkpoint_config",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "migrate_config",
    "parse_override",
    "recipe_path",
]
