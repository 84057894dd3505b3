"""Typed run configuration: dataclasses, YAML recipes, dotted overrides, validation.

A run is described by :class:`RunConfig`. Recipes are YAML files whose top-level keys are the
sections below; ``key.sub=value`` overrides on the command line are applied on top. Every unknown
key and every badly typed value fails here, before any process group starts, naming the key.

Parallel sizes use Megatron's own names and are passed into Megatron's ``TransformerConfig``
(which subclasses ``ModelParallelConfig``) by :mod:`solopo_mcore.models.builder`.

* :mod:`.sections`: the dataclasses (one docstring per field);
* :mod:`.values`: typed values and mappings from YAML;
* :mod:`.recipes`: recipe files and names, overrides, :func:`load_config`;
* :mod:`.validation`: whole-config checks, :func:`require_training_data`.
"""

from solopo_mcore.config.recipes import RECIPES_DIR, load_config, resolve_recipe, to_dict
from solopo_mcore.config.sections import (CheckpointConfig, ConfigError, DataConfig,
                                          DistributedConfig, LoggingConfig, ModelConfig, ObjectiveConfig,
                                          OptimizerConfig, ParallelConfig, RopeScalingConfig,
                                          RunConfig, TrainingConfig)
from solopo_mcore.config.validation import check_launch, require_training_data, validate

__all__ = ["RECIPES_DIR", "CheckpointConfig", "ConfigError", "DataConfig", "DistributedConfig",
           "LoggingConfig",
           "ModelConfig", "ObjectiveConfig", "OptimizerConfig", "ParallelConfig", "RopeScalingConfig", "RunConfig",
           "TrainingConfig", "check_launch", "load_config", "require_training_data", "resolve_recipe", "to_dict",
           "validate"]
