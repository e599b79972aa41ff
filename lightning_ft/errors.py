"""The one exception hierarchy of LightningFT.

Errors are raised where a problem is found, with a message that names the file
and says what to do; the CLI catches `LightningFTError` once, prints the
message as one line and exits with `exit_code`.
"""


class LightningFTError(Exception):
    """Base class: an expected failure with a user-facing one-line message."""

    exit_code = 1


class UsageError(LightningFTError):
    """Bad command-line arguments or options (e.g. a GPU that is not there)."""

    exit_code = 2


class AssetError(LightningFTError):
    """A model file is missing, unreadable or has the wrong structure."""

    exit_code = 3


class VideoError(LightningFTError):
    """A video (or landmark file) cannot be read or decoded."""

    exit_code = 4


class NoFaceError(LightningFTError):
    """No face was found in any frame of a video."""

    exit_code = 5
