"""Typed configuration: dataclasses are the single source of defaults.

A config is built from YAML files (``include:`` composes files, later keys win) plus ``--set key=value``
overrides, then checked field by field: unknown keys, wrong types and impossible values raise
``ConfigError`` with one line naming the key, before any expensive work starts.

    schema.py    the dataclasses: every key's type, default, range and one-line meaning
    loading.py   YAML + overrides -> a typed ``Config`` (``load_config``, ``config_from_dict``)
    rules.py     the checks: per-field ranges, then the rules across keys (``validate``)
"""
from vlpretrain.config.loading import build_dataclass, config_from_dict, load_config, parse_overrides
from vlpretrain.config.rules import ConfigError, check_rules, validate
from vlpretrain.config.schema import (
                                      STAGE_TRAINABLE,
                                      CheckpointConfig,
                                      Config,
                                      DataConfig,
                                      LanguageRatioConfig,
                                      LoggingConfig,
                                      ModelConfig,
                                      ParallelConfig,
                                      PretrainedConfig,
                                      ProfileConfig,
                                      SAMConfig,
                                      SigLIPConfig,
                                      SourceConfig,
                                      TrainConfig,
                                      trainable_parts,
)

__all__ = ["STAGE_TRAINABLE", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "LanguageRatioConfig",
           "LoggingConfig", "ModelConfig", "ParallelConfig", "PretrainedConfig", "ProfileConfig", "SAMConfig",
           "SigLIPConfig", "SourceConfig", "TrainConfig", "build_dataclass", "check_rules", "config_from_dict",
           "load_config", "parse_overrides", "trainable_parts", "validate"]
