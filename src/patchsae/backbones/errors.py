"""The error raised on bad backbone input."""


class BackboneError(ValueError):
    """A backbone cannot be loaded or used as asked; the message says why and how to fix it."""
