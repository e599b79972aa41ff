"""Per-video claims, so processes sharing one output folder (reruns of job
array shards, several workers) each track a video once.

A claim is a small JSON file beside the result folder, `<out>/.<name>.claim`,
holding the owner's host, pid, process start time, start time and a random
token. It is created complete and atomically (written under a unique name,
then hard-linked into place, which fails when the claim exists; O_EXCL where
the filesystem has no hard links), refreshed every HEARTBEAT_SECONDS while
held, and removed on release. A claim is stale, and taken over, when its
owner is gone: on the same host, its pid is not running (or is another
process now); on another host, it has not been refreshed for `stale_after`
seconds.

    with claim(result_folder) as held:
        if held:
            ...  # track it
        else:
            print(held.owner)  # who has it
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

HEARTBEAT_SECONDS = 60.0
# A claim from another host not refreshed for this long is abandoned
# (its host died or lost the filesystem); allows for clock skew between hosts.
STALE_AFTER_SECONDS = 3600.0


def claim_path(result_folder: Path) -> Path:
    folder = Path(result_folder)
    return folder.parent / f".{folder.name}.claim"


def _process_start(pid: int) -> Optional[int]:
    """Start time of `pid` in clock ticks since boot (Linux), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class Claim:
    """The outcome of `claim`: true when this process holds it; `owner` is
    the claim file's content (this process's, or the other holder's)."""

    def __init__(self, path: Path, held: bool, owner: Optional[dict]):
        self.path, self.held, self.owner = path, held, owner

    def __bool__(self) -> bool:
        return self.held

    def describe(self) -> str:
        o = self.owner or {}
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(o["started"])) if "started" in o else "?"
        return f"pid {o.get('pid', '?')} on {o.get('host', '?')} since {since}"


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half-written by a foreign tool: judged by its age alone


def is_stale(path: Path, owner: Optional[dict], stale_after: float = STALE_AFTER_SECONDS) -> bool:
    """Whether the claim at `path` with content `owner` is abandoned."""
    if owner is None:
        return True
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        pid = owner["pid"]
        if not _pid_running(pid):
            return True
        start = _process_start(pid)
        return owner.get("pid_start") is not None and start is not None and start != owner["pid_start"]
    try:
        return time.time() - path.stat().st_mtime > stale_after
    except FileNotFoundError:
        return True


def _create(path: Path, content: dict) -> bool:
    """Put `content` at `path` if no claim is there; atomic."""
    data = json.dumps(content).encode()
    tmp = path.with_name(f"{path.name}.new-{content['token']}")
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this filesystem
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(path: Path, seen: dict) -> None:
    """Remove the stale claim `seen` from `path`, unless it was replaced meanwhile."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read(aside) != seen:
        # a live claim made after we looked: put it back if nobody else came
        try:
            os.link(aside, path)
        except OSError:
            pass
    aside.unlink(missing_ok=True)


def try_claim(result_folder: Path, stale_after: float = STALE_AFTER_SECONDS) -> Claim:
    """Claim `result_folder` for this process (taking over a stale claim);
    call `release` on a held claim. Raises OSError where the folder cannot
    be written."""
    path = claim_path(result_folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
               "started": time.time(), "token": uuid.uuid4().hex}
    for _ in range(3):
        if _create(path, content):
            return Claim(path, True, content)
        owner = _read(path)
        if owner is None:  # released between the two calls
            continue
        if not is_stale(path, owner, stale_after):
            return Claim(path, False, owner)
        _take_over(path, owner)
    return Claim(path, False, _read(path))


def clear_stale(result_folder: Path, stale_after: float = STALE_AFTER_SECONDS) -> bool:
    """Remove the claim of `result_folder` if it is stale (a process killed
    after finishing the result, before releasing it); True if removed."""
    path = claim_path(result_folder)
    owner = _read(path)
    if owner is None or not is_stale(path, owner, stale_after):
        return False
    _take_over(path, owner)
    return True


def release(held: Claim) -> None:
    """Remove a claim this process holds (only if it is still its own)."""
    if held.held and (_read(held.path) or {}).get("token") == held.owner["token"]:
        held.path.unlink(missing_ok=True)
    held.held = False


@contextmanager
def claim(result_folder: Path, stale_after: float = STALE_AFTER_SECONDS,
          heartbeat: float = HEARTBEAT_SECONDS) -> Iterator[Claim]:
    """`try_claim` for the duration of the block: refreshed every
    `heartbeat` seconds while held, released at the end (also on errors)."""
    held = try_claim(result_folder, stale_after)
    stop = threading.Event()
    beat = None
    if held:
        def refresh():
            while not stop.wait(heartbeat):
                try:
                    os.utime(held.path)
                except OSError:
                    pass

        beat = threading.Thread(target=refresh, name="lightning_ft-claim", daemon=True)
        beat.start()
    try:
        yield held
    finally:
        stop.set()
        if beat is not None:
            beat.join()
        release(held)
