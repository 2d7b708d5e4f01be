"""The errors a user can cause, each one line (``str(err)``) naming the key, file or path and the
fix, each with the exit code the command line ends with (``exit_code``)."""

EXIT_CONFIG, EXIT_DIVERGED, EXIT_STORAGE, EXIT_INTERRUPTED = 2, 3, 4, 130


class ConfigError(ValueError):
    """A configuration value that cannot work. ``str(err)`` is one line: ``key: problem; fix``."""

    exit_code = EXIT_CONFIG

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


class DataError(ValueError):
    """Input data that cannot be used (malformed file, too-short corpus, missing split). One line, names the file."""

    exit_code = EXIT_CONFIG


class StorageError(OSError):
    """A file the run must write could not be written (disk full, no permission). One line, names the path."""

    exit_code = EXIT_STORAGE
