"""Typed exceptions raised by lmdata.

Library code raises these with a message that names the file, the value and what to do; only command-line
entry points turn them into exit codes. Each also derives from the builtin a caller would naturally catch
(``ValueError`` for bad data, ``FileNotFoundError`` for a missing path).
"""

from __future__ import annotations


class LmDataError(Exception):
    """Base class of every error lmdata raises on purpose."""


class ArgumentError(LmDataError, ValueError):
    """An API argument outside its range (batch size, context length, prefetch, sampler name, rank...)."""


class DatasetNotFoundError(LmDataError, FileNotFoundError):
    """A dataset path, directory or glob that names no readable shard."""


class ShardFormatError(LmDataError, ValueError):
    """A shard file whose bytes do not match any supported format (bad header, odd size, wrong dtype...)."""


class ManifestError(LmDataError, ValueError):
    """A ``manifest.json`` that cannot be parsed or disagrees with the shards beside it."""


class SamplerStateError(LmDataError, ValueError):
    """A sampler or loader state that cannot be loaded here (other world size, other dataset...)."""


class UnfinishedWriteError(LmDataError, ValueError):
    """A directory that an lmdata write started and did not finish (it still holds the write marker)."""


class ShardWriterError(LmDataError, ValueError):
    """A :class:`lmdata.ShardWriter` asked to write what it cannot (bad arguments, no tokens at all...)."""


class InputError(LmDataError, ValueError):
    """An input path that is missing, unreadable, empty, or not text."""


class OptionError(LmDataError, ValueError):
    """A --val-fraction or --shard-tokens value out of range."""


class OutputError(LmDataError, ValueError):
    """An output directory that prepare will not write into as it is (files it did not make are in the way), or
    cannot write (permissions, a full disk)."""


class OutputBusyError(LmDataError):
    """Another prepare holds the output directory's lock."""


class TokenizerError(LmDataError, ValueError):
    """An unknown, unavailable or unsuitable tokenizer."""
