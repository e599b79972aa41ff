"""Results on disk: `<out>/<video stem>/tracking.npz` and `meta.json`.

A result folder is written under a temporary name and renamed into place
only when complete, so a killed run never leaves a folder that looks
finished; `meta.json` carries `"complete": true` as a second guard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

# The tracking.npz contract: exactly these keys (optional ones are added by
# later stages, e.g. synthesis's texture and lighting).
TRACKING_KEYS = ("frame_ids", "valid", "shape", "expression", "jaw_pose", "neck_pose", "eye_pose", "rotation",
                 "translation", "focal_length", "principal_point", "image_size", "crop_boxes", "lmk68",
                 "lmk_dense", "fps")


def result_dir(out_dir: Path, video_stem: str) -> Path:
    return Path(out_dir) / video_stem


def is_finished(folder: Path) -> bool:
    """True when `folder` holds a complete result (both files, meta complete)."""
    meta = Path(folder) / "meta.json"
    if not (Path(folder) / "tracking.npz").exists() or not meta.exists():
        return False
    try:
        return bool(json.loads(meta.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


# Bytes read from each end of a source for its content hash: a fast
# fingerprint (two reads, whatever the file's size) that, with the size,
# tells two different videos apart, also when a copy changed the mtime.
HASH_SPAN = 1 << 20


def source_identity(path: Path) -> Dict[str, Any]:
    """What a result was made from: absolute path, size (bytes), mtime (ns)
    and `head_tail_sha256`, a SHA-256 of the size and the first and last
    HASH_SPAN bytes."""
    path = Path(path)
    st = path.stat()
    h = hashlib.sha256(str(st.st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(HASH_SPAN))
        if st.st_size > HASH_SPAN:
            f.seek(max(HASH_SPAN, st.st_size - HASH_SPAN))
            h.update(f.read(HASH_SPAN))
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "head_tail_sha256": h.hexdigest()}


def same_source(recorded: Optional[Dict[str, Any]], current: Optional[Dict[str, Any]]) -> bool:
    """Same content (size and hash); path and mtime may differ (a moved or
    copied dataset keeps its results)."""
    if recorded is None or current is None:
        return recorded is current
    return (recorded.get("size"), recorded.get("head_tail_sha256")) == (current["size"], current["head_tail_sha256"])


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def result_differences(folder: Path, sources: Dict[str, Optional[Dict[str, Any]]],
                       settings: Dict[str, Any]) -> Optional[List[str]]:
    """How the finished result in `folder` differs from what this run would
    write: [] when it is the same sources and settings, a list of one-line
    reasons otherwise, None when `folder` holds no finished result.

    sources: name -> `source_identity` (or None), as recorded in meta.json's
    "sources"; settings: the run's result-shaping settings, as in
    meta.json's "result_settings" (compared key by key)."""
    if not is_finished(folder):
        return None
    meta = json.loads((Path(folder) / "meta.json").read_text())
    if "sources" not in meta or "result_settings" not in meta:
        return ["it records no source or settings (written by an older version)"]
    reasons = []
    for name, current in sources.items():
        recorded = meta["sources"].get(name)
        if not same_source(recorded, current):
            was = "none" if recorded is None else f"{recorded.get('path')} ({recorded.get('size')} bytes)"
            now = "none" if current is None else f"{current['path']} ({current['size']} bytes)"
            reasons.append(f"its {name} was {was}, now {now}")
    old, new = _flatten(json.loads(json.dumps(meta["result_settings"], default=_json_default))), \
        _flatten(json.loads(json.dumps(settings, default=_json_default)))
    changed = [f"{k} {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in sorted(set(old) | set(new))
               if old.get(k, "(unset)") != new.get(k, "(unset)")]
    if changed:
        reasons.append("settings differ: " + ", ".join(changed))
    return reasons


def check_writable(folder: Path, what: str, keep: bool = True) -> None:
    """Create `folder` if needed and write (then remove) a file in it, so an
    unwritable folder (read-only mount, immutable, a path through a regular
    file; root bypasses only permission bits) is reported before any work:
    UsageError naming `what` (e.g. '--out') and the folder. keep=False
    removes the folders it created."""
    from .errors import UsageError

    folder = Path(folder)
    created = [p for p in [folder, *folder.parents] if not os.path.lexists(p)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex[:8]}"
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        probe.unlink()
        if not keep:
            for p in created:  # deepest first
                p.rmdir()
    except OSError as exc:
        raise UsageError(f"{what} {folder}: cannot write there ({exc.strerror or exc}); choose a writable "
                         f"folder") from None


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_result(folder: Path, tracking: Dict[str, np.ndarray], meta: Dict[str, Any],
                 extra: Callable[[Path], None] = None) -> Path:
    """Write tracking.npz and meta.json (and whatever `extra(tmp_folder)`
    writes, e.g. the visualization) atomically as one folder."""
    missing = [k for k in TRACKING_KEYS if k not in tracking]
    if missing:
        raise ValueError(f"tracking result lacks keys {missing}")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # through memory: numpy leaves a ZipFile open on a failed write (a
        # full disk), whose finaliser then prints a traceback of its own
        buffer = io.BytesIO()
        np.savez(buffer, **tracking)
        (tmp / "tracking.npz").write_bytes(buffer.getbuffer())
        if extra is not None:
            extra(tmp)
        meta = dict(meta, complete=True)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=_json_default))
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_tracking(folder: Path) -> Dict[str, np.ndarray]:
    with np.load(Path(folder) / "tracking.npz") as d:
        return {k: d[k] for k in d.files}
