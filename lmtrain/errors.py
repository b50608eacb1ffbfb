"""Typed exceptions raised by lmtrain; only the command-line entry points turn them into exit codes."""

from __future__ import annotations


class LmTrainError(Exception):
    """Base class of every error lmtrain raises on purpose."""


class CheckpointError(LmTrainError, ValueError):
    """A checkpoint that cannot be loaded: damaged, unsafe, or made for another model."""


class InsufficientDiskError(LmTrainError, OSError):
    """Not enough free disk space for a checkpoint; nothing was written."""


class ConfigError(LmTrainError, ValueError):
    """One or more invalid settings; the message lists every problem found."""


class NonFiniteLossError(LmTrainError):
    """The loss or gradient norm became NaN or infinite; training stopped before the optimizer step."""


class RunDirBusyError(LmTrainError):
    """Another process holds the run directory's lock."""
