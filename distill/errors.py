"""Errors that end a command with a message rather than a traceback."""


class ConfigError(ValueError):
    """A recipe problem: names the recipe file and the offending key."""


class NonFiniteError(RuntimeError):
    """Training stopped: too many student steps in a row had a non-finite loss or gradient."""


class SettingError(ConfigError):
    """A bad value found by a recipe section's own check, which knows the key but not the
    recipe file; the loader re-raises it as a ``ConfigError`` naming the file."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def user_errors() -> tuple[type[BaseException], ...]:
    """What ``distill`` and ``python -m distill.train`` end with one line, ``distill: <message>``,
    rather than a traceback: recipe errors (``<file>: <key>: <message>``), files that are missing
    or unreadable, values a component refuses, and a diverged run."""
    return (ConfigError, NonFiniteError, OSError, ValueError)
