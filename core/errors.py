"""Errors the user can act on: every message is one line that names the thing at fault and the fix."""
from __future__ import annotations


class EmofuseError(Exception):
    """Base of every error emofuse raises on purpose; the CLI prints it as one line, no traceback."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class ConfigError(EmofuseError):
    """A run config, preset or `--set` value is invalid."""


class PluginError(EmofuseError):
    """A component is unknown, claimed twice, or broken."""


class CheckpointError(EmofuseError):
    """A checkpoint is missing, corrupt, or not in safetensors form."""


class DataError(EmofuseError):
    """A data file or sample is unreadable, malformed or mislabelled."""

    def __init__(self, path: object, message: str, *, hint: str | None = None):
        self.path = str(path)
        super().__init__(f"{path}: {message}", hint=hint)


class MissingDependencyError(EmofuseError):
    """An optional package or offline model is not available."""
