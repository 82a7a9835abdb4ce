"""Exceptions that the command line turns into a clean one-line message instead of a traceback."""


class ClinadaptError(Exception):
    """Base class for errors caused by user input (files, names, options)."""


class UnknownNameError(ClinadaptError, KeyError):
    """A dataset, backbone, method or option name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(ClinadaptError, ValueError):
    """An invalid configuration value or key."""


class DataError(ClinadaptError, ValueError):
    """Input data that cannot be used: corrupt files, wrong shapes, NaN pixels, bad labels."""


class UnsafeCheckpointError(ClinadaptError):
    """A pickle checkpoint that the user has not explicitly trusted."""


class ChecksumWarning(UserWarning):
    """A local data file whose checksum differs from the official release."""


class BatchStatisticsWarning(UserWarning):
    """Test-time adaptation from batch statistics on batch norms that never held any."""
