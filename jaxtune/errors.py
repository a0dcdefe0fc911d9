"""The errors jaxtune raises for bad input: each names what is wrong and where, in one line.

The `jaxtune` command prints them as one line (no traceback) and exits with status 2; anything
else is a bug and keeps its traceback. Every layer raises these and none defines its own.
"""

from __future__ import annotations


class JaxtuneError(ValueError):
  """Bad input: a config, data file, checkpoint, mesh or prompt that cannot work."""


class ConfigError(JaxtuneError):
  """A configuration key is unknown, mistyped, or has an invalid value."""


class DataError(JaxtuneError):
  """A data file or record is malformed: `where` names the file and line, `reason` the field."""

  def __init__(self, where: str, reason: str):
    super().__init__(f"{where}: {reason}")
    self.where, self.reason = where, reason


class CheckpointError(JaxtuneError):
  """A checkpoint is missing, truncated, corrupt, in an unknown format or does not fit the
  model."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint's files are damaged: missing, unreadable, altered since they were saved (see
  its manifest), or holding non-finite values. Resuming moves such a checkpoint aside."""


class ShardingError(JaxtuneError):
  """The mesh does not fit the devices, or a shape does not fit the mesh."""


class GenerationError(JaxtuneError):
  """A prompt the model cannot continue: empty, or filling all of its positions."""


class TrainingError(RuntimeError):
  """Training cannot go on (a non-finite loss, gradient or update), or went on skipping most
  of its steps."""
