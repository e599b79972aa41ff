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


class DiskFullError(LightningFTError):
    """The output or cache disk is full (or a file-size limit is reached):
    nothing after it can succeed, so a folder run stops."""

    exit_code = 6


class OutputError(LightningFTError):
    """A result, cache or export file cannot be written (permissions, a
    read-only or missing folder)."""

    exit_code = 7


# Below this many free bytes a failed write is taken for a full disk.
_NEARLY_FULL_BYTES = 16 << 20


def disk_full_reason(exc: BaseException, path=None):
    """'no space left on device' / 'file size limit ... reached' when `exc`
    says so, else None. OSErrors carry an errno; LMDB reports a short write
    as a bare I/O error, so for those `path` (the file being written) is
    looked at: its disk nearly full, or its size at the process's file-size
    limit (ulimit -f)."""
    import errno
    import os
    import resource

    reasons = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EFBIG: "file size limit (ulimit -f) reached"}
    if isinstance(exc, OSError) and exc.errno in reasons:
        return reasons[exc.errno]
    text = str(exc)
    for code, marker in ((errno.ENOSPC, "No space left on device"), (errno.EDQUOT, "Disk quota exceeded"),
                         (errno.EFBIG, "File too large")):
        if marker in text:
            return reasons[code]
    if path is None or not (isinstance(exc, OSError) or "Input/output error" in text):
        return None
    try:
        st = os.statvfs(os.path.dirname(os.fspath(path)) or ".")
        if st.f_bavail * st.f_frsize < _NEARLY_FULL_BYTES:
            return reasons[errno.ENOSPC]
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and os.path.getsize(path) >= limit - (1 << 16):
            return f"file size limit (ulimit -f, {limit} bytes) reached"
    except OSError:
        pass
    return None
