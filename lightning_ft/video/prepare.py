"""`prepare`: a video's face boxes, its smooth crop boxes and the FaceVideo
whose crops go into the frame cache on their first read."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import NoFaceError, UsageError, VideoError
from ..progress import progress as progress_bar
from .cache import CACHE_VERSION, CacheFill, FaceVideo, cache_file, load_cache, source_identity
from .crop import MIN_IMAGE_SIZE, smooth_crop_boxes
from .decode import FALLBACK_FPS, VideoInfo, decoded_frames, frame_to_rgb, in_background, probe
from .faceboxes import DETECT_MAX_SIDE, FaceBoxDetector, find_face_box

log = logging.getLogger(__name__)


def prepare(path, *, cache_dir, image_size: int = 512, fps: Optional[float] = None,
            progress: Optional[bool] = None, crop_scale: float = 2.0,
            cache_format: str = "jpeg", box_rate: Optional[float] = 15.0,
            still_box_rate: Optional[float] = 5.0,
            detector: Optional[FaceBoxDetector] = None) -> FaceVideo:
    """Decode, find the face, choose smooth square crops for the LMDB cache.

    Two streamed passes over the video: (1) here, face boxes on frames
    downscaled to at most DETECT_MAX_SIDE pixels (mediapipe BlazeFace,
    `FaceBoxDetector`), on about `still_box_rate` frames per second and the
    last, and on about `box_rate` (None: every frame) between two of those
    whose boxes differ (`_boxes_differ`; `still_box_rate` None: `box_rate`
    throughout); (2) on the first read of the crops
    (`FaceVideo.frames`), crop + resize to ``image_size`` with the smoothed
    boxes, handed to the reader and written to the cache in the background.
    A valid cache (same source path, size, mtime and settings) is reused
    without decoding. `detector`: the face-box detector of pass 1 (default:
    a new FaceBoxDetector, closed on return; one given is left open).
    Raises VideoError for unreadable input and NoFaceError when no frame has
    a face; UsageError for an `image_size` below MIN_IMAGE_SIZE.
    """
    path = Path(path)
    if cache_format not in ("jpeg", "raw"):
        raise UsageError(f"cache_format must be 'jpeg' or 'raw', got {cache_format!r}")
    if image_size < MIN_IMAGE_SIZE:
        raise UsageError(f"--image-size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    info = probe(path)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_path = cache_file(path, cache_dir)
    key = {"version": CACHE_VERSION, "source": source_identity(path), "image_size": image_size,
           "fps": fps, "crop_scale": crop_scale, "cache_format": cache_format,
           "box_rate": box_rate, "still_box_rate": still_box_rate, "box_moved": BOX_MOVED,
           "detect_max_side": DETECT_MAX_SIDE}
    cached = load_cache(cache_path, key)
    if cached is not None:
        return cached

    frame_ids, timestamps, face_boxes, examined = _face_box_pass(path, info, fps, box_rate, still_box_rate,
                                                                 detector, progress)
    found = _faces_found(path, face_boxes, examined)
    out_fps = _output_fps(timestamps, info.fps, fps)
    crop_boxes = smooth_crop_boxes(face_boxes, found, out_fps, scale=crop_scale)

    meta = {"key": key, "fps": out_fps, "image_size": [image_size, image_size],
            "source_size": [info.height, info.width], "n_frames": len(frame_ids)}
    arrays = dict(frame_ids=frame_ids, timestamps=timestamps, crop_boxes=crop_boxes,
                  face_found=found, face_boxes=face_boxes, face_examined=examined)
    # pass 2 runs when the crops are first read (`FaceVideo.frames`), so the
    # landmark detector gets them from memory while they go into the cache
    fill = CacheFill.encode(fps=fps, cache_format=cache_format, meta=meta, arrays=arrays,
                            progress=progress)
    return FaceVideo(source=path, frame_ids=frame_ids, timestamps=timestamps, fps=out_fps,
                     crop_boxes=crop_boxes, image_size=(image_size, image_size),
                     cache_path=cache_path, face_boxes=face_boxes, face_found=found,
                     face_examined=examined, source_size=(info.height, info.width), cache_fill=fill)


# Boxes of two frames examined at the still rate that differ by more than
# this fraction of the face's side (centre or size), or that found a face in
# only one of them, have the frames between them examined too. carphone's
# detector boxes move by a median 5 % over 5 frames (crop boxes at 5 boxes a
# second stay within 1 % of their side of those at 15), by over 15 % in 5-9 %
# of such spans.
BOX_MOVED = 0.15


def _boxes_differ(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> bool:
    if a is None or b is None:
        return True
    side = max(a[2] - a[0], a[3] - a[1])
    moved = np.hypot((b[0] + b[2] - a[0] - a[2]) / 2, (b[1] + b[3] - a[1] - a[3]) / 2)
    resized = abs(np.log(max(b[2] - b[0], b[3] - b[1]) / side))
    return bool(moved > BOX_MOVED * side or resized > BOX_MOVED)


def _face_box_pass(path: Path, info: VideoInfo, fps: Optional[float], box_rate: Optional[float],
                   still_box_rate: Optional[float], detector: Optional[FaceBoxDetector],
                   progress: Optional[bool]):
    """Pass 1 of `prepare` (its docstring says which frames are examined):
    frame_ids [T] int64, timestamps [T] float64 (s), face_boxes [T,4] float
    xyxy in source pixels (NaN where no box was found or the frame was not
    examined) and examined [T] bool. Raises VideoError when no frame
    decodes."""
    # pass 1: face boxes on small frames. The crop track is smoothed over
    # ~0.15 s, and a talking head mostly stays put: boxes a few times a second
    # place it as well as boxes on every other frame (crop boxes within 1 % of
    # their side on carphone and the 512 clip), at a third to a half of
    # BlazeFace's calls (~2.4 ms each, mostly graph overhead). Where the face
    # moves or appears, the frames in between are examined at `box_rate`.
    ids, times, boxes, examined = [], [], [], []
    own_detector = detector is None
    if own_detector:
        detector = FaceBoxDetector()
    last_box = None  # the last face box found, where the next is looked for first
    source_fps = fps if fps else (info.fps or FALLBACK_FPS)
    fine = max(1, int(round(source_fps / box_rate))) if box_rate else 1
    coarse = max(1, int(round(source_fps / still_box_rate)) // fine) * fine if still_box_rate else fine
    between: list = []  # (position, decoded frame) every `fine`-th since the last coarse one
    previous_box = None  # at the last frame examined at the coarse rate
    examined_any = False

    def examine(k: int, frame, small) -> Optional[np.ndarray]:
        nonlocal last_box
        box = find_face_box(detector, frame, small, last_box)
        last_box = box if box is not None else last_box
        examined[k] = True
        if box is not None:
            boxes[k] = box
        return box

    def examine_coarse(k: int, frame, small) -> None:
        nonlocal previous_box, last_box, examined_any
        box = examine(k, frame, small)
        if examined_any and _boxes_differ(previous_box, box):
            for j, frame_j in between:
                if not examined[j]:
                    examine(j, frame_j, None)
            last_box = box if box is not None else last_box
        between.clear()
        previous_box, examined_any = box, True

    try:
        # decoding and shrinking in a thread, beside the detector
        # (a face found near its last box needs no shrunk frame: skip it then)
        frames = in_background(_small_frames(path, fps, coarse, lambda: detector.far), maxsize=8,
                                name="lightning_ft-face-boxes")
        for k, (index, t, frame, at_coarse, small) in enumerate(progress_bar(
                frames, total=info.n_frames or None, desc=f"{path.name}: face boxes", enabled=progress)):
            ids.append(index)
            times.append(t)
            boxes.append(np.full(4, np.nan))
            examined.append(False)
            last_frame = frame
            if at_coarse:
                examine_coarse(k, frame, small)
            elif k % fine == 0:
                between.append((k, frame))
        if ids and not examined[-1]:
            # examine the last frame too, so the track does not end on a held box
            examine_coarse(len(ids) - 1, last_frame, None)
    finally:
        if own_detector:
            detector.close()
    if not ids:
        raise VideoError(f"{path}: no decodable video frame; the file is corrupt or truncated.")
    return (np.array(ids, dtype=np.int64), np.array(times, dtype=np.float64), np.array(boxes),
            np.array(examined))


def _faces_found(path: Path, face_boxes: np.ndarray, examined: np.ndarray) -> np.ndarray:
    """[T] bool, the frames with a face box; NoFaceError when there is none,
    the count of examined frames without one logged."""
    found = np.isfinite(face_boxes).all(axis=1)
    if not found.any():
        raise NoFaceError(f"{path}: no face found in any of {int(examined.sum())} examined "
                          f"frames; check that the video shows a face.")
    n_missing = int((examined & ~found).sum())
    if n_missing:
        log.info("%s: no face box in %d of %d examined frames; their crop boxes are interpolated",
                 path, n_missing, int(examined.sum()))
    return found


def _small_frames(path: Path, fps: Optional[float], every: int, skip_shrink: Callable[[], bool]):
    """``(index, seconds, av.VideoFrame, examine, small RGB or None)`` of the
    decoded frames: every `every`-th is to be examined by the face-box
    detector, and comes shrunk to DETECT_MAX_SIDE unless `skip_shrink()`."""
    for k, (index, t, frame) in enumerate(decoded_frames(path, fps)):
        examine = k % every == 0
        small = frame_to_rgb(frame, DETECT_MAX_SIDE) if examine and not skip_shrink() else None
        yield index, t, frame, examine, small


def _output_fps(timestamps: np.ndarray, source_fps: float, requested: Optional[float]) -> float:
    if len(timestamps) > 1 and timestamps[-1] > timestamps[0]:
        measured = (len(timestamps) - 1) / (timestamps[-1] - timestamps[0])
    else:
        measured = source_fps or (requested or FALLBACK_FPS)
    if requested is not None:
        return float(min(requested, measured)) if measured > 0 else float(requested)
    return float(measured)
