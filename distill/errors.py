"""Errors that end a command with a message rather than a traceback."""


class NonFiniteError(RuntimeError):
    """Training stopped: too many student steps in a row had a non-finite loss or gradient."""
