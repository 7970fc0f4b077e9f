"""User-facing errors: one line, no traceback from the command-line tools."""


class DensevitError(Exception):
    """An error caused by the user's input (files, flags, weights); its message is one actionable line."""


class WeightsNotFoundError(DensevitError):
    """Pretrained weights could not be found locally nor downloaded. ``str()`` words the advice for Python
    (``weights=...``); :attr:`cli_message` words it for the command line (``--weights ...``)."""

    def __init__(self, message: str, cli_message: str = "") -> None:
        super().__init__(message)
        self.cli_message = cli_message or message


class RandomWeightsWarning(UserWarning):
    """Random weights are in use: the features exercise the code paths but mean nothing (every command prints
    it as one line on stderr)."""


class InvalidArgumentError(DensevitError, ValueError):
    """A bad argument value or shape (also a ``ValueError``, as these checks raised before)."""
