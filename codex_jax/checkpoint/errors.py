"""The error for a checkpoint that is damaged, edited or does not fit the model: it names file and tensor."""


class CheckpointIntegrityError(ValueError):
  """A checkpoint that cannot be trusted or used as asked; nothing from it has been returned."""
