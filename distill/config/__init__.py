"""The recipe: its schema (``schema``), how a YAML recipe and overrides are read and type
checked (``load``), the checks of combinations and files (``checks``), and the keys that
moved (``moved``). ``from distill import config as config_lib; config_lib.load(...)``.
"""

from distill.config.checks import check_eval, teacher_scheduler_config, validate
from distill.config.load import (describe, describe_methods, dump, fill_teacher_defaults, from_dict, load, load_eval,
                                 to_dict, to_flat_dict)
from distill.config.schema import (Config, DataConfig, EvalConfig, OptimConfig, OptimizerConfig, StudentConfig,
                                   TeacherConfig, TrainConfig)
from distill.errors import ConfigError
from distill.sections import LoraConfig, local_or_hub

__all__ = ["Config", "ConfigError", "DataConfig", "EvalConfig", "LoraConfig", "OptimConfig", "OptimizerConfig",
           "StudentConfig", "TeacherConfig", "TrainConfig", "check_eval", "describe", "describe_methods", "dump",
           "fill_teacher_defaults", "from_dict", "load", "load_eval", "local_or_hub", "teacher_scheduler_config", "to_dict", "to_flat_dict", "validate"]
