"""Results on disk: `<out>/<video stem>/tracking.npz` and `meta.json`: their
schema, writing and reading (the one place that knows the file layout).

A result folder is written under a temporary name and renamed into place
only when complete, so a killed run never leaves a folder that looks
finished; `meta.json` carries `"complete": true` as a second guard.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .errors import UsageError
from .track import Camera, Track

# The tracking.npz contract: exactly these keys (optional ones are added by
# later stages, e.g. synthesis's texture and lighting).
TRACKING_KEYS = ("frame_ids", "valid", "shape", "expression", "jaw_pose", "neck_pose", "eye_pose", "rotation",
                 "translation", "focal_length", "principal_point", "image_size", "crop_boxes", "lmk68",
                 "lmk_dense", "fps")
# Optional per-frame quality the tracker adds ([T] float32, crop pixels, NaN
# on invalid frames): mean reprojection error of the landmark fit, for the
# dataset report's plots over time.
PER_FRAME_QUALITY_KEYS = ("reprojection_error_68_px", "reprojection_error_dense_px")
CAMERA_KEYS = ("focal_length", "principal_point", "image_size")


class ResultFileError(UsageError):
    """A tracking result folder is missing files or they are unreadable."""


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


def write_result(folder: Path, track: Track, camera: Camera, meta: Dict[str, Any],
                 extra: Callable[[Path], None] = None) -> Path:
    """Write tracking.npz (the track and camera as they are, see
    `Track.stored`) and meta.json (with "complete": true), and whatever
    `extra(tmp_folder)` writes, e.g. the visualization, atomically as one
    folder. ValueError for a track whose shapes do not fit together."""
    problems = track.shape_problems()
    if problems:
        raise ValueError(f"{folder}: track not written: {'; '.join(problems)}")
    tracking = {**track.arrays(), **camera.arrays()}
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


@dataclass
class LoadedResult:
    """A result folder as read: its track, camera and meta.json (a dict)."""

    path: Path
    track: Track
    camera: Camera
    meta: Dict[str, Any]

    @property
    def flame_info(self) -> Dict[str, Any]:
        return dict(self.meta.get("flame", {}))

    @property
    def model_name(self) -> str:
        """'flame' or 'ict' (results written before the 'model' entry are FLAME's)."""
        return str(self.meta.get("model", {}).get("name", "flame"))

    def arrays(self) -> Dict[str, np.ndarray]:
        """tracking.npz's entries, as read (keys of the schema only)."""
        return {**self.track.arrays(), **self.camera.arrays()}

    @property
    def video_name(self) -> str:
        video = self.meta.get("video", {})
        return Path(video.get("path", "video")).stem or "video"


def track_from_arrays(arrays: Dict[str, np.ndarray], source: Path) -> Tuple[Track, Camera]:
    """tracking.npz's entries as a Track and Camera; ResultFileError naming
    `source` where a key is missing or a shape is wrong. Keys outside the
    schema are ignored."""
    missing = [k for k in TRACKING_KEYS if k not in arrays]
    if missing:
        raise ResultFileError(f"{source}: missing keys {', '.join(missing)}; re-run tracking")
    camera = Camera(**{k: arrays[k] for k in CAMERA_KEYS})
    bad = [f"'{k}' has shape {camera.arrays()[k].shape}, expected (2,)" for k in CAMERA_KEYS
           if tuple(arrays[k].shape) != (2,)]
    known = {f for f in Track.__dataclass_fields__}
    track = Track(**{k: v for k, v in arrays.items() if k in known})
    bad += track.shape_problems()
    if bad:
        raise ResultFileError(f"{source}: {bad[0]}; re-run tracking")
    track.valid = track.valid.astype(bool)
    return track, camera


def load_tracking(folder: Path) -> LoadedResult:
    """Read FOLDER/tracking.npz and FOLDER/meta.json, checking keys and
    shapes: ResultFileError, one line naming the file, for a file that is
    missing, unreadable or not of the schema."""
    folder = Path(folder)
    npz_path, meta_path = folder / "tracking.npz", folder / "meta.json"
    if not npz_path.is_file():
        raise ResultFileError(f"{npz_path}: not found; pass the folder that `lightning-ft track` wrote")
    try:
        with np.load(npz_path, allow_pickle=False) as d:
            arrays = {k: d[k] for k in d.files}
    except Exception as exc:  # zipfile/ValueError/OSError for truncated or foreign files
        raise ResultFileError(f"{npz_path}: unreadable ({type(exc).__name__}: {exc}); re-run tracking") from None
    track, camera = track_from_arrays(arrays, npz_path)
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ResultFileError(f"{meta_path}: not found; it is written beside tracking.npz by tracking") from None
    except (OSError, ValueError) as exc:
        raise ResultFileError(f"{meta_path}: not valid JSON ({exc}); re-run tracking") from None
    return LoadedResult(path=folder, track=track, camera=camera, meta=meta)


def failure_path(out_dir: Path, video_stem: str) -> Path:
    """`<out>/<video stem>.failed.json`: why a video has no result (the
    dataset report and a rerun read it; a later success removes it)."""
    return Path(out_dir) / f"{video_stem}.failed.json"


def write_failure(out_dir: Path, video_stem: str, video: str, error: BaseException,
                  seconds: float) -> Optional[Path]:
    """Record a failed video as one small JSON file, written atomically."""
    import datetime

    path = failure_path(out_dir, video_stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"video": str(video), "error": str(error), "error_type": type(error).__name__,
              "seconds": float(seconds),
              "failed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, path)
    except OSError as exc:
        # The record is a courtesy: a full disk must not stop the batch that
        # reported the failure (a rerun still retries the video).
        tmp.unlink(missing_ok=True)
        logging.getLogger("lightning_ft").warning("%s: could not record the failure (%s)", path, exc)
        return None
    return path


def clear_failure(out_dir: Path, video_stem: str) -> None:
    failure_path(out_dir, video_stem).unlink(missing_ok=True)
