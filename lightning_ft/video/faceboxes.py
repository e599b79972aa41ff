"""Face boxes: mediapipe's BlazeFace models, the detector that switches
between its short- and full-range models, and a face box of a whole frame
or of the region around the last one.

Boxes are ``(x0, y0, x1, y1)`` pixel edges of the image they were found in,
x right, y down.
"""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

from .decode import frame_rotation, frame_to_rgb, is_even_yuv420, upright_size, yuv420_to_rgb

# Largest side of the frame handed to the face-box detector in the first pass;
# BlazeFace full-range runs at 192x192, so more pixels only cost time.
DETECT_MAX_SIDE = 320


class BlazeFace:
    """One mediapipe BlazeFace model: ``process(image)`` gives its
    detections (mediapipe Detection protos) of an RGB uint8 image."""

    def __init__(self, model_selection: int, min_confidence: float):
        from .._mediapipe import DirectGraph, import_mediapipe
        mp = import_mediapipe()

        from mediapipe.framework.formats import detection_pb2

        self.solution = mp.solutions.face_detection.FaceDetection(
            model_selection=model_selection, min_detection_confidence=min_confidence)
        self._graph = DirectGraph.make(self.solution, "detections")
        self._parse = detection_pb2.Detection.FromString

    @property
    def fed_directly(self) -> bool:
        """Whether images go straight into the model's graph (the pinned
        mediapipe's internals were found), not through `solution.process`."""
        return self._graph is not None

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
    rotation = frame_rotation(frame)
    width, height = upright_size(frame, rotation)
    side = NEAR_GROW * max(box[2] - box[0], box[3] - box[1])
    if not side <= 0.5 * max(width, height):
        return None
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x0, y0 = (max(0, int(v - side / 2)) // 2 * 2 for v in (cx, cy))
    x1 = min(width, int(np.ceil(cx + side / 2))) // 2 * 2
    y1 = min(height, int(np.ceil(cy + side / 2))) // 2 * 2
    if x1 - x0 < 16 or y1 - y0 < 16:
        return None
    if is_even_yuv420(frame):
        region = yuv420_to_rgb(frame, (x0, y0, x1, y1), rotation)
    else:
        region = frame_to_rgb(frame)[y0:y1, x0:x1]
    k = NEAR_SIDE / max(region.shape[:2])
    small = cv2.resize(region, (max(2, round(region.shape[1] * k)), max(2, round(region.shape[0] * k))),
                       interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR)
    found = detect_face_boxes(detector.short, small)
    if not len(found):
        return None
    scale = np.array([region.shape[1] / small.shape[1], region.shape[0] / small.shape[0]] * 2)
    return found[0] * scale + np.array([x0, y0, x0, y0])


def find_face_box(detector: FaceBoxDetector, frame, small: Optional[np.ndarray],
                  last_box: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """Face box [4] in upright source pixels of a decoded frame, or None:
    near `last_box` first where the whole frame needs the full-range model,
    else in the whole frame shrunk to `small` (RGB, larger side
    DETECT_MAX_SIDE; made here when not given)."""
    if last_box is not None and detector.far:
        box = detect_face_box_near(detector, frame, last_box)
        if box is not None:
            return box
    if small is None:
        small = frame_to_rgb(frame, DETECT_MAX_SIDE)
    box = detect_face_box(detector, small)
    return None if box is None else box * (upright_size(frame, frame_rotation(frame))[0] / small.shape[1])
