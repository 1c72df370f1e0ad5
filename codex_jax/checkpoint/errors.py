"""Checkpoint errors: one that is damaged, edited or does not fit the model (naming file and tensor); one that
could not be written."""


class CheckpointIntegrityError(ValueError):
  """A checkpoint that cannot be trusted or used as asked; nothing from it has been returned."""


class CheckpointWriteError(RuntimeError):
  """A save that failed in the background (a full disk, a lost mount); committed checkpoints are untouched."""
