"""Video decoding, face-centred crop and the LMDB frame cache.

Pixel convention used throughout: pixel centres at integer coordinates
(OpenCV), x right, y down. A crop box ``(x0, y0, x1, y1)`` spans source
pixel *edges*, so crop pixel ``(u, v)`` of an ``S x S`` crop has its centre
at source ``x = x0 + (u + 0.5) * (x1 - x0) / S - 0.5`` (see `crop_to_source`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import queue
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import av
import cv2
import lmdb
import numpy as np
from scipy.ndimage import gaussian_filter1d

from .errors import NoFaceError, UsageError, VideoError
from .progress import progress as progress_bar

log = logging.getLogger(__name__)

CACHE_VERSION = 1
# Largest side of the frame handed to the face-box detector in the first pass;
# BlazeFace full-range runs at 192x192, so more pixels only cost time.
DETECT_MAX_SIDE = 320
_META_KEY = b"__meta__"
# Above 1080p one frame's decoding nears the landmark detector's time per
# frame, and ffmpeg's own threads are worth their overhead.
_THREADED_DECODE_PIXELS = 1920 * 1088


@dataclass
class VideoInfo:
    """What a video file says about itself.

    width, height: pixels of the *upright* frame (after rotation metadata).
    fps: average frame rate (frames/s) as the container reports it.
    n_frames: frame count from the container, or an estimate from the duration.
    rotation: degrees counter-clockwise the stored frame is turned for display.
    """

    path: Path
    width: int
    height: int
    fps: float
    n_frames: int
    rotation: int
    codec: str


def _open(path: Path):
    if not path.exists():
        raise VideoError(f"{path}: file not found; check the path.")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: file is empty; re-export or re-copy the video.")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise VideoError(f"{path}: not a readable video, or truncated ({exc.__class__.__name__}: "
                         f"{exc}); check the file, convert it to mp4 (H.264) and retry.") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: contains no video stream; pass a video file.")
    return container


def _rotation_of(frame) -> int:
    """Display rotation (CCW degrees, multiple of 90) from the frame's display matrix."""
    rotation = frame.rotation
    if rotation is None:
        return 0
    rounded = int(round(rotation / 90.0)) * 90 % 360
    if abs(((rotation - rounded) + 180) % 360 - 180) > 1:
        log.warning("rotation of %.1f degrees is not a multiple of 90; using %d", rotation, rounded)
    return rounded


def probe(path) -> VideoInfo:
    """Read a video's size, rate, length, rotation and codec (decodes one frame).

    Raises VideoError naming the file when it is missing, empty, not a video,
    or has no decodable frame.
    """
    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        n_frames = int(stream.frames or 0)
        if n_frames == 0 and stream.duration is not None and fps > 0:
            n_frames = int(round(float(stream.duration * stream.time_base) * fps))
        first = None
        try:
            for first in container.decode(stream):
                break
        except av.error.FFmpegError as exc:
            raise VideoError(f"{path}: cannot decode the first frame ({exc}); "
                             "the file is corrupt or truncated.") from None
        if first is None:
            raise VideoError(f"{path}: no decodable video frame; the file is corrupt or truncated.")
        rotation = _rotation_of(first)
        width, height = first.width, first.height
        if rotation in (90, 270):
            width, height = height, width
        return VideoInfo(path=path, width=width, height=height, fps=fps, n_frames=n_frames,
                         rotation=rotation, codec=stream.codec_context.name)
    finally:
        container.close()


def _upright(image: np.ndarray, rotation: int) -> np.ndarray:
    # np.rot90 with k>0 turns counter-clockwise as displayed (y down), which is
    # the sense of the display matrix angle.
    k = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(image, k)) if k else image


def _decoded_frames(path: Path, fps: Optional[float]):
    """Yield ``(source index, seconds from the first frame, av.VideoFrame)`` (see iter_frames)."""
    if fps is not None and fps <= 0:
        raise UsageError(f"--fps must be positive, got {fps}")
    container = _open(path)
    try:
        stream = container.streams.video[0]
        if stream.codec_context.width * stream.codec_context.height > _THREADED_DECODE_PIXELS:
            stream.thread_type = "AUTO"
        else:
            # One decoding thread: it runs beside the detectors, which keep the
            # other cores busy, and ffmpeg's threads cost more than they save
            # (1080p: 1.22 ms CPU and wall per frame vs 2.56 ms CPU, 1.58 ms
            # wall with AUTO; 512 px: 0.60 vs 0.66 CPU).
            stream.codec_context.thread_count = 1
        time_base = float(stream.time_base) if stream.time_base else None
        # AVI stores no presentation times: ffmpeg hands out decoding-order
        # stamps, out of order where there are B-frames; its rate is constant
        if "avi" in container.format.name.split(","):
            time_base = None
        frame_period = 1.0 / float(stream.average_rate or stream.guessed_rate or 30)
        last_t = None
        start_time = None
        last_tick = -1
        index = -1
        decoded = container.decode(stream)
        while True:
            try:
                frame = next(decoded)
            except StopIteration:
                declared = int(stream.frames or 0)
                # mp4/mov declare their frame count; a cut-off file decodes fewer
                if declared and index + 1 < declared - max(2, declared // 100):
                    raise VideoError(f"{path}: only {index + 1} of {declared} frames could be "
                                     "decoded; the file is truncated; re-export or re-copy it.") from None
                if declared and index + 1 != declared:
                    log.warning("%s: decoded %d frames, the container declares %d",
                                path, index + 1, declared)
                break
            except av.error.FFmpegError as exc:
                if index < 0:
                    raise VideoError(f"{path}: cannot decode ({exc}); the file is corrupt.") from None
                raise VideoError(f"{path}: decoding failed after frame {index} ({exc}); "
                                 "the file is truncated or corrupt; re-export it.") from None
            index += 1
            if frame.pts is not None and time_base is not None:
                t = frame.pts * time_base
            else:
                t = index * frame_period
            if start_time is None:
                start_time = t
            t -= start_time
            if last_t is not None and t <= last_t:
                # a repeated or backwards stamp: keep the clock increasing
                t = last_t + frame_period
            last_t = t
            if fps is not None:
                # a frame up to a quarter tick early still counts for that tick:
                # millisecond PTS put 60 fps frame 2 at 33 ms, before the 33.3 ms tick
                tick_index = int(np.floor(t * fps + 0.25))
                if tick_index <= last_tick:
                    continue
                last_tick = tick_index
            yield index, float(t), frame
    finally:
        container.close()


def _to_rgb(frame, max_side: Optional[int] = None) -> np.ndarray:
    """Upright RGB uint8 array of an av.VideoFrame, optionally shrunk to `max_side`."""
    if max_side is not None and max(frame.width, frame.height) >= 2 * max_side:
        # Strong shrinks in one swscale pass (area averaging, colour
        # conversion of the small picture only): a 1080p frame to 320 px took
        # 4.9 ms as full-size RGB + OpenCV's area resize, 1.4 ms this way.
        s = max_side / max(frame.width, frame.height)
        small = frame.reformat(width=max(2, int(round(frame.width * s))), height=max(2, int(round(frame.height * s))),
                               format="rgb24", interpolation="AREA")
        return _upright(small.to_ndarray(), _rotation_of(frame))
    if _is_even_yuv420(frame):
        image = _yuv420_to_rgb(frame)
    else:
        image = _upright(frame.to_ndarray(format="rgb24"), _rotation_of(frame))
    if max_side is not None and max(image.shape[:2]) > max_side:
        s = max_side / max(image.shape[:2])
        size = (max(2, int(round(image.shape[1] * s))), max(2, int(round(image.shape[0] * s))))
        # area averaging only pays off (and is only fast) for large factors
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if s <= 0.5 else cv2.INTER_LINEAR)
    return image


def _in_background(items: Iterator, maxsize: int, name: str) -> Iterator:
    """Iterate `items` in a daemon thread, at most `maxsize` items ahead of the consumer.

    PyAV decoding and OpenCV release the GIL, so the producer's work runs
    beside the consumer's (mediapipe releases it too). An exception of the
    producer is raised in the consumer; closing the returned generator stops
    the producer and closes `items`.
    """
    handoff: queue.Queue = queue.Queue(maxsize)
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        handoff.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            handoff.put((False, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            handoff.put((False, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            has_item, value = handoff.get()
            if has_item:
                yield value
            elif value is None:
                return
            else:
                raise value
    finally:
        stop.set()
        while thread.is_alive():
            try:
                handoff.get(timeout=0.05)
            except queue.Empty:
                pass


def count_frames(path, fps: Optional[float] = None) -> int:
    """Frames `iter_frames(path, fps)` yields. Without `fps`, counted from
    the demuxed packets (no decoding), which holds for the intra/inter
    coded streams ffmpeg emits one frame per packet for."""
    path = Path(path)
    if fps is not None:
        return sum(1 for _ in _decoded_frames(path, fps))
    container = _open(path)
    try:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)
    except av.error.FFmpegError as exc:
        raise VideoError(f"{path}: cannot read ({exc}); the file is corrupt.") from None
    finally:
        container.close()


def iter_frames(path, fps: Optional[float] = None, *, max_side: Optional[int] = None,
                ) -> Iterator[tuple[int, float, np.ndarray]]:
    """Stream ``(source frame index, pts seconds, RGB uint8 [H,W,3])`` upright frames.

    The index counts decoded frames from 0 in presentation order; times come
    from presentation timestamps (variable frame rate safe; relative to the
    first frame). With `fps`, the first frame at or after each tick of a clock
    at `fps` (less a quarter tick, for rounded timestamps) is kept, so a 60 fps
    video at ``fps=30`` keeps every other frame; frames are never duplicated,
    so a source slower than `fps` is returned whole. `max_side` shrinks frames
    so that their larger side is at most this many pixels.
    """
    for index, t, frame in _decoded_frames(Path(path), fps):
        yield index, t, _to_rgb(frame, max_side)


# ----------------------------------------------------------------- face boxes

class BlazeFace:
    """One mediapipe BlazeFace model: ``process(image)`` gives its
    detections (mediapipe Detection protos) of an RGB uint8 image."""

    def __init__(self, model_selection: int, min_confidence: float):
        from ._mediapipe import DirectGraph, import_mediapipe
        mp = import_mediapipe()

        from mediapipe.framework.formats import detection_pb2

        self.solution = mp.solutions.face_detection.FaceDetection(
            model_selection=model_selection, min_detection_confidence=min_confidence)
        self._graph = DirectGraph.make(self.solution, "detections")
        self._parse = detection_pb2.Detection.FromString

    def process(self, image: np.ndarray) -> list:
        if self._graph is None:
            return list(self.solution.process(image).detections or [])
        return [self._parse(data) for data in self._graph(image)]

    def close(self) -> None:
        self.solution.close()


class FaceBoxDetector:
    """mediapipe BlazeFace: the short-range model (fast) and the full-range
    one (small faces), the one that found the last face first, the other
    where it finds nothing. A video whose face only the full-range model
    sees (measured on a 1080p clip: every frame) then pays one model per
    frame, not both (9.6 -> 6.7 ms)."""

    def __init__(self, min_confidence: float = 0.5):
        self._min_confidence = min_confidence
        self.short = self._make(0)
        self._full = None
        self._far = False

    def _make(self, model_selection: int) -> BlazeFace:
        return BlazeFace(model_selection, self._min_confidence)

    @property
    def full(self):
        """The full-range model, set up on first use: where the short-range
        one finds every face it is never needed, and its graph's set-up and
        closing cost ~10 ms a video."""
        if self._full is None:
            self._full = self._make(1)
        return self._full

    def process(self, image: np.ndarray) -> list:
        """Detections (mediapipe Detection protos) of an RGB uint8 image."""
        detections = (self.full if self._far else self.short).process(image)
        if not detections:
            detections = (self.short if self._far else self.full).process(image)
            if detections:
                self._far = not self._far
        return detections

    @property
    def far(self) -> bool:
        """The last face came from the full-range model (too small in the
        shrunk frame for the short-range one)."""
        return self._far

    def close(self) -> None:
        self.short.close()
        if self._full is not None:
            self._full.close()


def _face_detector() -> FaceBoxDetector:
    return FaceBoxDetector()


def detect_face_boxes(detector, image: np.ndarray) -> np.ndarray:
    """All face boxes ``[N,4]`` (x0, y0, x1, y1 pixel edges) in `image`, most confident first."""
    h, w = image.shape[:2]
    detections = sorted(detector.process(image), key=lambda d: -d.score[0])
    boxes = [d.location_data.relative_bounding_box for d in detections]
    return np.array([[b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h]
                     for b in boxes], dtype=np.float64).reshape(-1, 4)


def detect_face_box(detector, image: np.ndarray) -> Optional[np.ndarray]:
    """Most confident face box ``[4]`` (x0, y0, x1, y1 pixel edges) in `image`, or None.

    One face per video: with several, the most confident one is followed.
    """
    boxes = detect_face_boxes(detector, image)
    return boxes[0] if len(boxes) else None


# Where only the full-range model sees the face in the shrunk frame (HD
# video: DETECT_MAX_SIDE leaves it too small for the short-range one), it is
# looked for first in a square region NEAR_GROW times its last box around
# that box, shrunk to the short-range model's NEAR_SIDE input: 2.6 ms (+0.5
# for the region) against 7.3 ms for the full-range model on a 1080p clip.
NEAR_GROW = 2.0
NEAR_SIDE = 128


def detect_face_box_near(detector: FaceBoxDetector, frame, box: np.ndarray) -> Optional[np.ndarray]:
    """The most confident face box ``[4]`` (upright source pixels) that the
    short-range model finds in the region around `box` of a decoded frame;
    None when it finds none, or when the region would not be much smaller
    than the frame (nothing to save there)."""
    rotation = _rotation_of(frame)
    width, height = _upright_size(frame, rotation)
    side = NEAR_GROW * max(box[2] - box[0], box[3] - box[1])
    if not side <= 0.5 * max(width, height):
        return None
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x0, y0 = (max(0, int(v - side / 2)) // 2 * 2 for v in (cx, cy))
    x1 = min(width, int(np.ceil(cx + side / 2))) // 2 * 2
    y1 = min(height, int(np.ceil(cy + side / 2))) // 2 * 2
    if x1 - x0 < 16 or y1 - y0 < 16:
        return None
    if _is_even_yuv420(frame):
        region = _yuv420_to_rgb(frame, (x0, y0, x1, y1), rotation)
    else:
        region = _to_rgb(frame)[y0:y1, x0:x1]
    k = NEAR_SIDE / max(region.shape[:2])
    small = cv2.resize(region, (max(2, round(region.shape[1] * k)), max(2, round(region.shape[0] * k))),
                       interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR)
    found = detect_face_boxes(detector.short, small)
    if not len(found):
        return None
    scale = np.array([region.shape[1] / small.shape[1], region.shape[0] / small.shape[0]] * 2)
    return found[0] * scale + np.array([x0, y0, x0, y0])


def smooth_crop_boxes(face_boxes: np.ndarray, found: np.ndarray, fps: float, *,
                      scale: float = 2.0, center_sigma_s: float = 0.15,
                      size_sigma_s: float = 0.5) -> np.ndarray:
    """Square crop boxes ``[T,4]`` that follow the face boxes smoothly.

    face_boxes: [T,4] detector boxes (pixels), rows with ``found=False`` ignored.
    The centre and side are linearly interpolated over frames without a face
    (held at the ends), then smoothed with a zero-phase Gaussian of
    `center_sigma_s` / `size_sigma_s` seconds so the box does not jitter with
    the detector. side = `scale` x the larger side of the face box.
    """
    face_boxes = np.asarray(face_boxes, dtype=np.float64)
    found = np.asarray(found, dtype=bool)
    if not found.any():
        raise ValueError("no face box to smooth")
    t = np.arange(len(found), dtype=np.float64)
    cx = (face_boxes[:, 0] + face_boxes[:, 2]) / 2
    cy = (face_boxes[:, 1] + face_boxes[:, 3]) / 2
    side = scale * np.maximum(face_boxes[:, 2] - face_boxes[:, 0], face_boxes[:, 3] - face_boxes[:, 1])
    tracks = []
    for values, sigma_s in ((cx, center_sigma_s), (cy, center_sigma_s), (side, size_sigma_s)):
        filled = np.interp(t, t[found], values[found])
        sigma = sigma_s * max(fps, 1.0)
        if sigma > 0 and len(filled) > 1:
            filled = gaussian_filter1d(filled, sigma, mode="nearest")
        tracks.append(filled)
    cx, cy, side = tracks
    return np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], axis=1)


def crop_frame(image: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
    """Crop a square box (pixel edges, may leave the frame) and resize to size x size.

    Outside the frame is black. Strong downscales go through an area resize
    first so the crop does not alias.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    pixel = (x1 - x0) / size  # source pixels per crop pixel
    if pixel >= 2.0:
        factor = int(pixel)
        small = cv2.resize(image, (max(1, image.shape[1] // factor), max(1, image.shape[0] // factor)),
                           interpolation=cv2.INTER_AREA)
        sx = image.shape[1] / small.shape[1]
        sy = image.shape[0] / small.shape[0]
        image, x0, x1, y0, y1 = small, x0 / sx, x1 / sx, y0 / sy, y1 / sy
        pixel = (x1 - x0) / size
    pixel_y = (y1 - y0) / size
    if pixel > 0 and abs(pixel_y - pixel) <= 1e-9 * pixel:
        crop = _crop_by_resize(image, x0, y0, pixel, size)
        if crop is not None:
            return crop
    # maps crop pixel centre u to source x = x0 + (u + .5) * pixel - .5
    m = np.array([[pixel, 0.0, x0 + 0.5 * pixel - 0.5],
                  [0.0, pixel_y, y0 + 0.5 * pixel_y - 0.5]])
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


# A bilinear 512x512 crop by cv2.warpAffine (per-pixel coordinates) took
# 2.2 ms, beside FaceMesh's ~4; cv2.resize (separable) 0.8 ms. resize maps
# output pixel v to input x = (v + 0.5) * pixel - 0.5 from the first pixel
# it is given, so it cuts the crop exactly when the box starts a whole
# number m of crop pixels past a whole pixel a: a + m * pixel = x0. Among
# _RESIZE_SHIFTS consecutive m one such start usually lies within
# _RESIZE_TOL of x0 (warpAffine itself rounds positions to 1/32 px), else
# warpAffine cuts it.
_RESIZE_SHIFTS = 32
_RESIZE_TOL = 1.0 / 32


def _resize_start(v0: float, pixel: float) -> Optional[tuple]:
    """(a, m): whole pixel `a` and crop pixels `m` with a + m * pixel nearest
    `v0`, m from ceil(1 / pixel) (so the first sample is past pixel a) on;
    None when none lies within _RESIZE_TOL."""
    m = np.ceil(1.0 / pixel) + np.arange(_RESIZE_SHIFTS)
    start = v0 - m * pixel
    err = np.abs(start - np.round(start))
    k = int(np.argmin(err))
    if err[k] > _RESIZE_TOL:
        return None
    return int(np.round(start[k])), int(m[k])


def _resize_lead(pixel: float) -> int:
    """How far (pixels) before the box `_crop_by_resize` may read."""
    return int(np.ceil((1.0 / pixel + _RESIZE_SHIFTS) * pixel)) + 1


def _crop_by_resize(image: np.ndarray, x0: float, y0: float, pixel: float, size: int) -> Optional[np.ndarray]:
    """crop_frame's bilinear crop through cv2.resize (see _resize_start), or
    None where the box does not start close enough to a resize lattice."""
    sx, sy = _resize_start(x0, pixel), _resize_start(y0, pixel)
    if sx is None or sy is None:
        return None
    (ax, mx), (ay, my) = sx, sy
    # the window reaches the last sample's right neighbour and gives resize
    # enough output for the crop (it rounds window / pixel)
    w = max(int(np.ceil(x0 - ax + (size - 0.5) * pixel)) + 2, int(np.ceil((mx + size + 1) * pixel)))
    h = max(int(np.ceil(y0 - ay + (size - 0.5) * pixel)) + 2, int(np.ceil((my + size + 1) * pixel)))
    height, width = image.shape[:2]
    cx0, cy0, cx1, cy1 = max(0, ax), max(0, ay), min(width, ax + w), min(height, ay + h)
    if cx1 <= cx0 or cy1 <= cy0:  # the window lies wholly outside the image
        return np.zeros((size, size) + image.shape[2:], image.dtype)
    window = image[cy0:cy1, cx0:cx1]
    if (cx0, cy0, cx1, cy1) != (ax, ay, ax + w, ay + h):  # black outside the image
        window = cv2.copyMakeBorder(window, cy0 - ay, ay + h - cy1, cx0 - ax, ax + w - cx1,
                                    cv2.BORDER_CONSTANT, value=(0, 0, 0))
    scaled = cv2.resize(window, None, fx=1.0 / pixel, fy=1.0 / pixel, interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(scaled[my:my + size, mx:mx + size])


def _plane(frame, i: int) -> np.ndarray:
    """Plane `i` of an av.VideoFrame as a [h, w] uint8 view of its buffer (no copy)."""
    plane = frame.planes[i]
    return np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, :plane.width]


def _upright_size(frame, rotation: int) -> tuple:
    """(width, height) of the frame as displayed, turned by `rotation` degrees."""
    return (frame.height, frame.width) if rotation % 180 else (frame.width, frame.height)


def _is_even_yuv420(frame) -> bool:
    return frame.format.name == "yuv420p" and frame.width % 2 == 0 and frame.height % 2 == 0


def _yuv420_to_rgb(frame, region: Optional[Sequence[int]] = None, rotation: Optional[int] = None) -> np.ndarray:
    """Upright RGB uint8 of an even-sized yuv420p av.VideoFrame, or of its
    `region` (x0, y0, x1, y1: even, upright pixels) alone, through OpenCV's
    I420 conversion (BT.601 limited range like swscale's default, within a
    few levels of it). The planes are turned upright as views, so only the
    region's pixels are copied and converted, and a crop has the same pixels
    as the same part of the whole frame. rotation: `_rotation_of(frame)`,
    when known."""
    k = ((_rotation_of(frame) if rotation is None else rotation) // 90) % 4
    y_plane, u_plane, v_plane = (np.rot90(_plane(frame, i), k) for i in range(3))
    x0, y0, x1, y1 = (0, 0, y_plane.shape[1], y_plane.shape[0]) if region is None else region
    h, w = y1 - y0, x1 - x0
    i420 = np.empty(h * w * 3 // 2, np.uint8)
    i420[:h * w].reshape(h, w)[:] = y_plane[y0:y1, x0:x1]
    quarter = h * w // 4
    i420[h * w:h * w + quarter].reshape(h // 2, w // 2)[:] = u_plane[y0 // 2:y1 // 2, x0 // 2:x1 // 2]
    i420[h * w + quarter:].reshape(h // 2, w // 2)[:] = v_plane[y0 // 2:y1 // 2, x0 // 2:x1 // 2]
    return cv2.cvtColor(i420.reshape(h * 3 // 2, w), cv2.COLOR_YUV2RGB_I420)


def crop_video_frame(frame, box: Sequence[float], size: int) -> np.ndarray:
    """``crop_frame(_to_rgb(frame), box, size)``, colour-converting only the
    part of the frame under the box: a 1080p frame's full RGB conversion took
    6-9 ms, more than FaceMesh, for a crop that covers a tenth of it."""
    if not _is_even_yuv420(frame):
        return crop_frame(_to_rgb(frame), box, size)
    rotation = _rotation_of(frame)
    width, height = _upright_size(frame, rotation)
    x0, y0, x1, y1 = (float(v) for v in box)
    pixel = (x1 - x0) / size
    # Region edges on a grid of 2 (chroma pairs) and of crop_frame's area
    # shrink factor, so its blocks fall where they would on the whole frame.
    shrink = int(pixel) if pixel >= 2.0 else 1
    grid = 2 * shrink
    # and reaching as far before the box as crop_frame's resize may read
    lead = (_resize_lead(pixel / shrink) * shrink if pixel > 0 else 0) + 2
    rx0, ry0 = (max(0, (int(np.floor(v)) - lead) // grid * grid) for v in (x0, y0))
    rx1 = min(width, -(-(int(np.ceil(x1)) + 2) // grid) * grid)
    ry1 = min(height, -(-(int(np.ceil(y1)) + 2) // grid) * grid)
    if rx1 <= rx0 or ry1 <= ry0:  # the box lies wholly outside the frame
        return np.zeros((size, size, 3), np.uint8)
    region = _yuv420_to_rgb(frame, (rx0, ry0, rx1, ry1), rotation)
    return crop_frame(region, (x0 - rx0, y0 - ry0, x1 - rx0, y1 - ry0), size)


def crop_to_source(points: np.ndarray, crop_boxes: np.ndarray, image_size) -> np.ndarray:
    """Map crop pixel coordinates ``[T,N,2]`` to source pixels through ``crop_boxes [T,4]``."""
    h, w = image_size
    boxes = np.asarray(crop_boxes, dtype=np.float64)[:, None, :]
    sx = (boxes[..., 2] - boxes[..., 0]) / w
    sy = (boxes[..., 3] - boxes[..., 1]) / h
    out = np.empty(np.shape(points), dtype=np.float64)
    out[..., 0] = boxes[..., 0] + (points[..., 0] + 0.5) * sx - 0.5
    out[..., 1] = boxes[..., 1] + (points[..., 1] + 0.5) * sy - 0.5
    return out


# ----------------------------------------------------------------- the cache

def _array_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _source_identity(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class FaceVideo:
    """Face-centred crops of one video, stored in an LMDB cache.

    frame_ids: [T] int64 source frame index of each output frame.
    timestamps: [T] float64 seconds (presentation time from the first frame).
    fps: output frame rate (frames/s).
    crop_boxes: [T,4] float64 (x0, y0, x1, y1) in upright source pixels
        (pixel edges), square, may extend outside the frame.
    face_boxes: [T,4] float64 detector face boxes (source pixels), NaN where
        none was found; crop boxes of such frames are interpolated.
    face_found: [T] bool, whether the box detector saw a face in that frame.
    face_examined: [T] bool, whether the box detector ran on that frame.
    image_size: (H, W) of the crops. cache_path: the LMDB file.
    """

    source: Path
    frame_ids: np.ndarray
    timestamps: np.ndarray
    fps: float
    crop_boxes: np.ndarray
    image_size: tuple
    cache_path: Path
    face_boxes: np.ndarray = None
    face_found: np.ndarray = None
    face_examined: np.ndarray = None
    source_size: tuple = None  # (H, W) of the upright source frames
    _env: object = field(default=None, repr=False, compare=False)
    _fill: Optional["_CacheFill"] = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.frame_ids)

    def _open(self):
        if self._env is None:
            try:
                self._env = lmdb.open(str(self.cache_path), readonly=True, lock=False,
                                      subdir=False, readahead=False)
            except lmdb.Error as exc:
                raise VideoError(f"{self.cache_path}: frame cache unreadable ({exc}); "
                                 "delete it to rebuild.") from None
        return self._env

    def frames(self, indices: Optional[Iterable[int]] = None) -> Iterator[np.ndarray]:
        """RGB uint8 [H,W,3] crops, in the order asked.

        While the cache is not written yet, all frames in order (no `indices`)
        come straight from the decoder as the cache is filled; asking for
        `indices` first fills the cache.
        """
        if self._fill is not None and indices is None:
            return self._crops_while_caching()
        self.write_cache()
        return self._cached_frames(indices)

    def write_cache(self) -> None:
        """Decode, crop and store every frame in the cache, unless already done."""
        if self._fill is not None:
            for _ in progress_bar(self._crops_while_caching(), total=len(self),
                                  desc=f"{self.source.name}: crop", enabled=self._fill.progress):
                pass

    def _crops_while_caching(self) -> Iterator[np.ndarray]:
        yield from _crops_into_cache(self, self._fill)
        self._fill = None

    def _cached_frames(self, indices: Optional[Iterable[int]]) -> Iterator[np.ndarray]:
        env = self._open()
        if indices is None:
            indices = range(len(self))
        with env.begin(buffers=True) as txn:
            for i in indices:
                if not 0 <= i < len(self):
                    raise IndexError(f"frame {i} out of range 0..{len(self) - 1}")
                data = txn.get(f"{i:08d}".encode())
                if data is None:
                    raise VideoError(f"{self.cache_path}: frame {i} missing; delete the cache to rebuild.")
                yield _decode_image(bytes(data), self.image_size)

    def frame(self, i: int) -> np.ndarray:
        return next(self.frames([i]))

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


@dataclass
class _CacheFill:
    """What pass 2 needs besides the FaceVideo: the decoding rate and the cache's contents."""

    fps: Optional[float]
    cache_format: str
    meta: bytes  # JSON, stored under _META_KEY
    arrays: bytes  # npz of the FaceVideo arrays
    progress: Optional[bool]


def _cropped_frames(face_video: FaceVideo, fps: Optional[float]) -> Iterator[np.ndarray]:
    """Decode the source again and crop the frames of `face_video` with its crop boxes."""
    size = face_video.image_size[0]
    wanted = iter(zip(face_video.frame_ids, face_video.crop_boxes))
    want_id, want_box = next(wanted)
    n_out = 0
    for index, _, frame in _decoded_frames(face_video.source, fps):
        if index != want_id:
            continue
        yield crop_video_frame(frame, want_box, size)
        n_out += 1
        nxt = next(wanted, None)
        if nxt is None:
            break
        want_id, want_box = nxt
    if n_out != len(face_video):
        raise VideoError(f"{face_video.source}: second decoding pass gave {n_out} of {len(face_video)} "
                         "frames; the file changed while reading; retry.")


def _write_cache(tmp_path: Path, crops: Iterable[np.ndarray], fill: _CacheFill) -> int:
    """Encode `crops` into a new LMDB at `tmp_path` with the FaceVideo arrays; returns the count."""
    env = lmdb.open(str(tmp_path), subdir=False, lock=False, map_size=1 << 40,
                    writemap=False, meminit=False)
    try:
        n_out = 0
        txn = env.begin(write=True)
        for crop in crops:
            txn.put(f"{n_out:08d}".encode(), _encode_image(crop, fill.cache_format))
            n_out += 1
            if n_out % 256 == 0:
                txn.commit()
                txn = env.begin(write=True)
        txn.put(b"__arrays__", fill.arrays)
        txn.put(_META_KEY, fill.meta)
        txn.commit()
        env.sync(True)
    finally:
        env.close()
    return n_out


def _crops_into_cache(face_video: FaceVideo, fill: _CacheFill) -> Iterator[np.ndarray]:
    """Yield the crops of `face_video` in order from a decoding thread while a
    writer thread JPEG-encodes them into a temporary LMDB, renamed into place
    once all frames are in (so an interrupted run leaves no partial cache)."""
    cache_path = face_video.cache_path
    # The host in the name lets a rerun on this host remove a killed writer's
    # file at once, while a cache folder shared by hosts keeps others' files.
    tmp_path = cache_path.with_name(cache_path.name + f".tmp-{os.getpid()}-{threading.get_ident()}@{socket.gethostname()}")
    to_write: queue.Queue = queue.Queue(maxsize=16)
    stored: list = []  # the writer's frame count, or its exception

    def crops_to_write():
        while (crop := to_write.get()) is not None:
            yield crop

    def write():
        try:
            stored.append(_write_cache(tmp_path, crops_to_write(), fill))
        except BaseException as exc:  # raised by the consumer below
            stored.append(exc)

    writer = threading.Thread(target=write, name="lightning_ft-cache-writer", daemon=True)

    def hand_over(item) -> None:
        # A writer that failed takes nothing more (it may have failed after
        # taking the end marker, at its last commit): never wait on it.
        while writer.is_alive():
            try:
                to_write.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    writer.start()
    complete = False
    try:
        for crop in _in_background(_cropped_frames(face_video, fill.fps), maxsize=8,
                                   name="lightning_ft-crop"):
            if stored:
                break  # the writer failed; its error is raised below
            hand_over(crop)
            yield crop
        hand_over(None)
        writer.join()
        if isinstance(stored[0], BaseException):
            raise cache_write_error(stored[0], face_video.source, cache_path, tmp_path)
        os.replace(tmp_path, cache_path)
        complete = True
    finally:
        if not complete:
            # an error, or the consumer stopped early: no partial cache stays
            hand_over(None)
            writer.join()
            try:
                tmp_path.unlink(missing_ok=True)
            except OSError:  # its folder is gone or unusable: nothing was left there
                pass


def cache_write_error(exc: BaseException, source: Path, cache_path: Path, tmp_path: Path) -> BaseException:
    """The frame cache writer's failure as the error to raise: DiskFullError
    for a full disk or file-size limit, OutputError naming the cache for
    other LMDB or OS errors; anything else unchanged. tmp_path: the file
    being written (still there)."""
    from .errors import DiskFullError, OutputError, disk_full_reason

    reason = disk_full_reason(exc, tmp_path)
    if reason is not None:
        return DiskFullError(f"{source}: {reason} in {cache_path.parent} while writing its frame cache")
    if isinstance(exc, (lmdb.Error, OSError)):
        return OutputError(f"{cache_path}: cannot write the frame cache ({exc}); check the --cache folder")
    return exc


def _encode_image(image: np.ndarray, cache_format: str) -> bytes:
    if cache_format == "raw":
        return b"R" + image.tobytes()
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise VideoError("JPEG encoding of a crop failed")
    return b"J" + data.tobytes()


def _decode_image(data: bytes, image_size) -> np.ndarray:
    if data[:1] == b"R":
        return np.frombuffer(data, dtype=np.uint8, offset=1).reshape(*image_size, 3).copy()
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8, offset=1), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# A cache temporary whose writer is not a live process here is removed once
# it is this old (another host sharing the cache folder writes it at every
# 256th frame at least); any is removed after STALE_TMP_ANY_SECONDS.
STALE_TMP_SECONDS = 600.0
STALE_TMP_ANY_SECONDS = 6 * 3600.0


def remove_stale_cache_temporaries(cache_dir: Path) -> int:
    """Delete `*.lmdb.tmp-<pid>-<thread>@<host>` files killed runs left in
    `cache_dir`: at once where the writer ran on this host and is gone; a
    file of another host (or of an older version, without a host) when its
    pid is not running here and it is STALE_TMP_SECONDS old, or when it is
    STALE_TMP_ANY_SECONDS old. Returns the bytes freed."""
    import time

    freed = 0
    now = time.time()
    here = socket.gethostname()
    for tmp in Path(cache_dir).glob("*.lmdb.tmp-*"):
        try:
            st = tmp.stat()
            owner, _, host = tmp.name.rsplit(".tmp-", 1)[1].partition("@")
            pid = int(owner.split("-")[0])
        except (OSError, ValueError, IndexError):
            continue
        age = now - st.st_mtime
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if host == here:
            stale = not alive
        else:
            stale = (age > STALE_TMP_SECONDS and not alive and not host) or age > STALE_TMP_ANY_SECONDS
        if stale:
            try:
                tmp.unlink()
                freed += st.st_size
            except OSError:
                pass
    return freed


def cache_file(path: Path, cache_dir: Path) -> Path:
    """The LMDB file that caches `path`'s crops: one per source path."""
    digest = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{Path(path).stem}-{digest}.lmdb"


def _load_cache(cache_path: Path, expected: dict) -> Optional[FaceVideo]:
    if not cache_path.exists():
        return None
    try:
        env = lmdb.open(str(cache_path), readonly=True, lock=False, subdir=False)
    except lmdb.Error as exc:
        log.warning("%s: unreadable frame cache (%s); rebuilding", cache_path, exc)
        return None
    with env.begin() as txn:
        meta_raw = txn.get(_META_KEY)
        arrays_raw = txn.get(b"__arrays__")
    env.close()
    if meta_raw is None or arrays_raw is None:
        return None
    meta = json.loads(meta_raw)
    if meta.get("key") != expected:
        log.info("%s: cache is for another video version or settings; rebuilding", cache_path)
        return None
    arrays = np.load(io.BytesIO(arrays_raw))
    return FaceVideo(source=Path(expected["source"]["path"]), frame_ids=arrays["frame_ids"],
                     timestamps=arrays["timestamps"], fps=meta["fps"],
                     crop_boxes=arrays["crop_boxes"], image_size=tuple(meta["image_size"]),
                     cache_path=cache_path, face_boxes=arrays["face_boxes"],
                     face_found=arrays["face_found"], face_examined=arrays["face_examined"],
                     source_size=tuple(meta["source_size"]))


def prepare(path, *, cache_dir, image_size: int = 512, fps: Optional[float] = None,
            progress: Optional[bool] = None, crop_scale: float = 2.0,
            cache_format: str = "jpeg", box_rate: Optional[float] = 15.0,
            still_box_rate: Optional[float] = 5.0) -> FaceVideo:
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
    without decoding. Raises VideoError for unreadable input and NoFaceError
    when no frame has a face.
    """
    path = Path(path)
    if cache_format not in ("jpeg", "raw"):
        raise UsageError(f"cache_format must be 'jpeg' or 'raw', got {cache_format!r}")
    if image_size < 16:
        raise UsageError(f"--image-size must be at least 16, got {image_size}")
    info = probe(path)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_path = cache_file(path, cache_dir)
    key = {"version": CACHE_VERSION, "source": _source_identity(path), "image_size": image_size,
           "fps": fps, "crop_scale": crop_scale, "cache_format": cache_format,
           "box_rate": box_rate, "still_box_rate": still_box_rate, "box_moved": BOX_MOVED,
           "detect_max_side": DETECT_MAX_SIDE}
    cached = _load_cache(cache_path, key)
    if cached is not None:
        return cached

    # pass 1: face boxes on small frames. The crop track is smoothed over
    # ~0.15 s, and a talking head mostly stays put: boxes a few times a second
    # place it as well as boxes on every other frame (crop boxes within 1 % of
    # their side on carphone and the 512 clip), at a third to a half of
    # BlazeFace's calls (~2.4 ms each, mostly graph overhead). Where the face
    # moves or appears, the frames in between are examined at `box_rate`.
    ids, times, boxes, examined = [], [], [], []
    detector = _face_detector()
    last_box = None  # the last face box found, where the next is looked for first
    source_fps = fps if fps else (info.fps or 30.0)
    fine = max(1, int(round(source_fps / box_rate))) if box_rate else 1
    coarse = max(1, int(round(source_fps / still_box_rate)) // fine) * fine if still_box_rate else fine
    between: list = []  # (position, decoded frame) every `fine`-th since the last coarse one
    previous_box = None  # at the last frame examined at the coarse rate
    examined_any = False

    def examine(k: int, frame, small) -> Optional[np.ndarray]:
        nonlocal last_box
        box = _find_face_box(detector, frame, small, last_box)
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
        frames = _in_background(_small_frames(path, fps, coarse, lambda: detector.far), maxsize=8,
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
        detector.close()
    if not ids:
        raise VideoError(f"{path}: no decodable video frame; the file is corrupt or truncated.")
    face_boxes = np.array(boxes)
    found = np.isfinite(face_boxes).all(axis=1)
    examined = np.array(examined)
    if not found.any():
        raise NoFaceError(f"{path}: no face found in any of {int(examined.sum())} examined "
                          f"frames; check that the video shows a face.")
    n_missing = int((examined & ~found).sum())
    if n_missing:
        log.info("%s: no face box in %d of %d examined frames; their crop boxes are interpolated",
                 path, n_missing, int(examined.sum()))
    frame_ids = np.array(ids, dtype=np.int64)
    timestamps = np.array(times, dtype=np.float64)
    out_fps = _output_fps(timestamps, info.fps, fps)
    crop_boxes = smooth_crop_boxes(face_boxes, found, out_fps, scale=crop_scale)

    meta = {"key": key, "fps": out_fps, "image_size": [image_size, image_size],
            "source_size": [info.height, info.width], "n_frames": len(frame_ids)}
    arrays = _array_bytes(frame_ids=frame_ids, timestamps=timestamps, crop_boxes=crop_boxes,
                          face_found=found, face_boxes=face_boxes, face_examined=examined)
    # pass 2 runs when the crops are first read (`FaceVideo.frames`), so the
    # landmark detector gets them from memory while they go into the cache
    fill = _CacheFill(fps=fps, cache_format=cache_format, meta=json.dumps(meta).encode(),
                      arrays=arrays, progress=progress)
    return FaceVideo(source=path, frame_ids=frame_ids, timestamps=timestamps, fps=out_fps,
                     crop_boxes=crop_boxes, image_size=(image_size, image_size),
                     cache_path=cache_path, face_boxes=face_boxes, face_found=found,
                     face_examined=examined, source_size=(info.height, info.width), _fill=fill)


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


def _find_face_box(detector: FaceBoxDetector, frame, small: Optional[np.ndarray],
                   last_box: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """Face box [4] in upright source pixels: near the last one first where
    the whole frame needs the full-range model, else in the whole frame
    shrunk to `small` (made here when not given)."""
    if last_box is not None and detector.far:
        box = detect_face_box_near(detector, frame, last_box)
        if box is not None:
            return box
    if small is None:
        small = _to_rgb(frame, DETECT_MAX_SIDE)
    box = detect_face_box(detector, small)
    return None if box is None else box * (_upright_size(frame, _rotation_of(frame))[0] / small.shape[1])


def _small_frames(path: Path, fps: Optional[float], every: int, skip_shrink: Callable[[], bool]):
    """``(index, seconds, av.VideoFrame, examine, small RGB or None)`` of the
    decoded frames: every `every`-th is to be examined by the face-box
    detector, and comes shrunk to DETECT_MAX_SIDE unless `skip_shrink()`."""
    for k, (index, t, frame) in enumerate(_decoded_frames(path, fps)):
        examine = k % every == 0
        small = _to_rgb(frame, DETECT_MAX_SIDE) if examine and not skip_shrink() else None
        yield index, t, frame, examine, small


def _output_fps(timestamps: np.ndarray, source_fps: float, requested: Optional[float]) -> float:
    if len(timestamps) > 1 and timestamps[-1] > timestamps[0]:
        measured = (len(timestamps) - 1) / (timestamps[-1] - timestamps[0])
    else:
        measured = source_fps or (requested or 30.0)
    if requested is not None:
        return float(min(requested, measured)) if measured > 0 else float(requested)
    return float(measured)
