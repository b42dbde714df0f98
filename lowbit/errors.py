"""User-facing errors. The CLI prints these as one line (no traceback) and exits with status 2."""


class LowbitError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(LowbitError, ValueError):
    """A config key, value or combination is invalid."""


class InputError(LowbitError, FileNotFoundError):
    """A model/data/checkpoint path is missing, unreadable or corrupt."""


class UnsupportedModelError(LowbitError, ValueError):
    """The architecture is not one lowbit can load into the 4-bit base."""


class TrainingError(LowbitError, RuntimeError):
    """Training cannot continue (NaN/Inf loss, disk full...); the last good checkpoint is kept."""
