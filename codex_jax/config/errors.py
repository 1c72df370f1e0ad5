"""The error every bad configuration raises: it names the key, the value and the rule broken."""


class ConfigError(ValueError):
  """A configuration that cannot run. The message holds one line per problem."""

  def __init__(self, problems: list[str]):
    self.problems = list(problems)
    super().__init__("; ".join(self.problems))
