"""One error type for bad configuration: it names the offending key and how to fix it."""


class ConfigError(ValueError):
    """A configuration value that cannot work. ``str(err)`` is one line: ``key: problem; fix``."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


class DataError(ValueError):
    """Input data that cannot be used (malformed file, too-short corpus, missing split). One line, names the file."""
