"""The one error type of the preprocessor."""


class PreprocessError(ValueError):
  """Input the preprocessor cannot use; the message says which file, which
  frame where it applies, and what to do about it."""
