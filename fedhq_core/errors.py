"""User-facing errors. Both carry a one-line message that names the field or file."""


class ConfigError(ValueError):
    """Invalid configuration; ``str(err)`` is a one-line message naming the field."""


class DataError(ValueError):
    """A dataset could not be read; the message names the file or directory."""


class CheckpointError(ValueError):
    """A checkpoint or run folder that cannot be used; the message names the file."""


class TooFewClients(RuntimeError):
    """A round kept fewer than ``min_clients`` accepted updates after all its attempts."""
