"""The exceptions that are the user's to fix, and how the launcher and the training processes
signal each other: exit codes and the files in the launcher's pid folder. Standard library only."""

from __future__ import annotations

from .validation import DataError


class ConfigError(ValueError):
    """A configuration value is missing, malformed or contradicts another; the message names the
    key, where it came from and the fix."""


class DatasetError(ValueError):
    """The data cannot be used as configured; the message says why and the fix."""


class ModelLoadError(ValueError):
    """The base model or tokenizer cannot be loaded; the message names the source and the fix."""


USER_ERRORS = (ConfigError, DataError, DatasetError, ModelLoadError)
"""Their message names the input and the fix; it is shown as is, without a traceback."""

EXIT_USER_ERROR = 2
EXIT_STOPPED = 143
"""Stopped by SIGTERM after saving a checkpoint (128 + 15, as a shell reports it)."""

PID_DIR_ENV = "FTSTACK_PID_DIR"
"""The launcher's folder where each training process leaves ``rank-N.pid``, so that SIGTERM reaches
the trainers directly rather than through torchrun (which kills them after 30 s, mid-checkpoint)."""

STOPPED_FILE = "stopped"
"""Left in the pid folder by rank 0 when the run stopped on request after saving a checkpoint."""

USER_ERROR_FILE = "user-error"
"""Left in the pid folder by a training process that stopped on a user error (it has written the
failure file and exits 0, so that torchrun does not print its traceback for the user's mistake)."""
