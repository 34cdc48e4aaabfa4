"""Errors a user can act on: each message names the file/field/key and what was expected."""


class VLError(Exception):
    """Base class of vl's user-facing errors (printed as one line by the entry points)."""


class DataError(VLError, ValueError):
    """A data file is missing, corrupt or malformed. The message starts with the file path."""


class ConfigError(VLError, ValueError):
    """A config value is invalid. The message names the key."""


class TrainingDiverged(VLError, RuntimeError):
    """A training loss, gradient or parameter became NaN/inf. The message names the step and the loss term."""
