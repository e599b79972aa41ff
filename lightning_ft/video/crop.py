"""Face-centred crops: smooth square crop boxes over a face-box track,
bilinear crops of an image or of a decoded frame, and the map from crop
pixels back to source pixels.

Pixel convention: pixel centres at integer coordinates (OpenCV), x right,
y down. A crop box ``(x0, y0, x1, y1)`` spans source pixel *edges*, so crop
pixel ``(u, v)`` of an ``S x S`` crop has its centre at source
``x = x0 + (u + 0.5) * (x1 - x0) / S - 0.5`` (see `crop_to_source`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d

from .decode import frame_rotation, frame_to_rgb, is_even_yuv420, upright_size, yuv420_to_rgb

# Smallest crop side (pixels) the tracker accepts (--image-size): below it the
# landmark detectors, which work at 192-256 px, see too few pixels of a face.
MIN_IMAGE_SIZE = 64
MAX_IMAGE_SIZE = 4096


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


def crop_video_frame(frame, box: Sequence[float], size: int) -> np.ndarray:
    """``crop_frame(frame_to_rgb(frame), box, size)``, colour-converting only the
    part of the frame under the box: a 1080p frame's full RGB conversion took
    6-9 ms, more than FaceMesh, for a crop that covers a tenth of it."""
    if not is_even_yuv420(frame):
        return crop_frame(frame_to_rgb(frame), box, size)
    rotation = frame_rotation(frame)
    width, height = upright_size(frame, rotation)
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
    region = yuv420_to_rgb(frame, (rx0, ry0, rx1, ry1), rotation)
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
