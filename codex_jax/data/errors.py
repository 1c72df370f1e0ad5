"""The one exception the data subsystem raises for problems a user can fix."""


class DataError(ValueError):
  """A corpus, tokenizer or pipeline setting that cannot be used as given."""
