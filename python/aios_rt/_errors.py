"""The exception hierarchy of aios, shared by the runtime (`aios_rt`, whose
native module raises these classes) and the trainer (`aios_train`).

Each class also derives from the standard exception that fits, so code that
catches ``ValueError`` or ``OSError`` keeps working. This module imports
nothing from aios, so the native module can load it while `aios_rt` is still
initialising.
"""


class AiosError(Exception):
    """Base class of every aios error."""


class FormatError(AiosError, ValueError):
    """A weight, adapter or store file is corrupt, truncated or inconsistent."""


class ConfigError(AiosError, ValueError):
    """A model configuration is invalid (or was written by a newer aios)."""


class InputError(AiosError, ValueError):
    """An argument is invalid (length, steps, sampler, path, ...)."""


class TokenizerError(AiosError):
    """The tokenizer is missing or failed."""


class AiosIOError(AiosError, OSError):
    """An operating-system I/O error (missing file, full disk, permissions)."""


class NumericError(AiosError, ArithmeticError):
    """The model produced NaN or infinite values."""
