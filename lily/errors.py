"""The library's own error types."""


class LilyConfigError(ValueError):
    """A method configuration that is invalid or does not fit the model."""


class MergeError(RuntimeError):
    """The adapter cannot be folded into the frozen weight (its output depends on the data)."""
