"""Results on disk: `<out>/<video stem>/tracking.npz` and `meta.json`.

A result folder is written under a temporary name and renamed into place
only when complete, so a killed run never leaves a folder that looks
finished; `meta.json` carries `"complete": true` as a second guard.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np

# The tracking.npz contract: exactly these keys (optional ones are added by
# later stages, e.g. synthesis's texture and lighting).
TRACKING_KEYS = ("frame_ids", "valid", "shape", "expression", "jaw_pose", "neck_pose", "eye_pose", "rotation",
                 "translation", "focal_length", "principal_point", "image_size", "crop_boxes", "lmk68",
                 "lmk_dense", "fps")
# Optional per-frame quality the tracker adds ([T] float32, crop pixels, NaN
# on invalid frames): mean reprojection error of the landmark fit, for the
# dataset report's plots over time.
PER_FRAME_QUALITY_KEYS = ("reprojection_error_68_px", "reprojection_error_dense_px")


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
        np.savez(tmp / "tracking.npz", **tracking)
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
