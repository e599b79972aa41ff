"""Decoding: probe, upright RGB frames at a chosen rate, frame counts, and
the YUV->RGB conversion of a frame or of a region of it.

Frames are upright (rotation metadata applied); pixel centres at integer
coordinates (OpenCV), x right, y down.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import av
import cv2
import numpy as np

from ..errors import UsageError, VideoError

log = logging.getLogger(__name__)

# Above 1080p one frame's decoding nears the landmark detector's time per
# frame, and ffmpeg's own threads are worth their overhead.
_THREADED_DECODE_PIXELS = 1920 * 1088
# The frame rate assumed where a video (or a --landmarks file) states none:
# the rate of the talking-head datasets (HDTF, VFHQ) and of PAL video.
FALLBACK_FPS = 25.0


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


def frame_rotation(frame) -> int:
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
        rotation = frame_rotation(first)
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


def decoded_frames(path: Path, fps: Optional[float]):
    """Yield ``(source index, seconds from the first frame, av.VideoFrame)``,
    the frames `iter_frames(path, fps)` yields before their RGB conversion
    (`frame_to_rgb`), for callers that convert only what they need."""
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
        frame_period = 1.0 / float(stream.average_rate or stream.guessed_rate or FALLBACK_FPS)
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


def frame_to_rgb(frame, max_side: Optional[int] = None) -> np.ndarray:
    """Upright RGB uint8 array of an av.VideoFrame, optionally shrunk to `max_side`."""
    if max_side is not None and max(frame.width, frame.height) >= 2 * max_side:
        # Strong shrinks in one swscale pass (area averaging, colour
        # conversion of the small picture only): a 1080p frame to 320 px took
        # 4.9 ms as full-size RGB + OpenCV's area resize, 1.4 ms this way.
        s = max_side / max(frame.width, frame.height)
        small = frame.reformat(width=max(2, int(round(frame.width * s))), height=max(2, int(round(frame.height * s))),
                               format="rgb24", interpolation="AREA")
        return _upright(small.to_ndarray(), frame_rotation(frame))
    if is_even_yuv420(frame):
        image = yuv420_to_rgb(frame)
    else:
        image = _upright(frame.to_ndarray(format="rgb24"), frame_rotation(frame))
    if max_side is not None and max(image.shape[:2]) > max_side:
        s = max_side / max(image.shape[:2])
        size = (max(2, int(round(image.shape[1] * s))), max(2, int(round(image.shape[0] * s))))
        # area averaging only pays off (and is only fast) for large factors
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if s <= 0.5 else cv2.INTER_LINEAR)
    return image


def in_background(items: Iterator, maxsize: int, name: str) -> Iterator:
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
        return sum(1 for _ in decoded_frames(path, fps))
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
    for index, t, frame in decoded_frames(Path(path), fps):
        yield index, t, frame_to_rgb(frame, max_side)


def _plane(frame, i: int) -> np.ndarray:
    """Plane `i` of an av.VideoFrame as a [h, w] uint8 view of its buffer (no copy)."""
    plane = frame.planes[i]
    return np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, :plane.width]


def upright_size(frame, rotation: int) -> tuple:
    """(width, height) of the frame as displayed, turned by `rotation` degrees."""
    return (frame.height, frame.width) if rotation % 180 else (frame.width, frame.height)


def is_even_yuv420(frame) -> bool:
    """Whether an av.VideoFrame is yuv420p of even width and height (what
    `yuv420_to_rgb` converts)."""
    return frame.format.name == "yuv420p" and frame.width % 2 == 0 and frame.height % 2 == 0


def yuv420_to_rgb(frame, region: Optional[Sequence[int]] = None, rotation: Optional[int] = None) -> np.ndarray:
    """Upright RGB uint8 of an even-sized yuv420p av.VideoFrame, or of its
    `region` (x0, y0, x1, y1: even, upright pixels) alone, through OpenCV's
    I420 conversion (BT.601 limited range like swscale's default, within a
    few levels of it). The planes are turned upright as views, so only the
    region's pixels are copied and converted, and a crop has the same pixels
    as the same part of the whole frame. rotation: `frame_rotation(frame)`,
    when known."""
    k = ((frame_rotation(frame) if rotation is None else rotation) // 90) % 4
    y_plane, u_plane, v_plane = (np.rot90(_plane(frame, i), k) for i in range(3))
    x0, y0, x1, y1 = (0, 0, y_plane.shape[1], y_plane.shape[0]) if region is None else region
    h, w = y1 - y0, x1 - x0
    i420 = np.empty(h * w * 3 // 2, np.uint8)
    i420[:h * w].reshape(h, w)[:] = y_plane[y0:y1, x0:x1]
    quarter = h * w // 4
    i420[h * w:h * w + quarter].reshape(h // 2, w // 2)[:] = u_plane[y0 // 2:y1 // 2, x0 // 2:x1 // 2]
    i420[h * w + quarter:].reshape(h // 2, w // 2)[:] = v_plane[y0 // 2:y1 // 2, x0 // 2:x1 // 2]
    return cv2.cvtColor(i420.reshape(h * 3 // 2, w), cv2.COLOR_YUV2RGB_I420)
