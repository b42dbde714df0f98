"""The config engine shared by training, QAT and generation configs (see `engine`)."""
from lowbit.config.engine import (
           apply_override,
           build,
           choices,
           help_of,
           load,
           option,
           read_tree,
           show,
           to_dict,
           validate,
)

__all__ = ["apply_override", "build", "choices", "help_of", "load", "option", "read_tree", "show", "to_dict",
           "validate"]
