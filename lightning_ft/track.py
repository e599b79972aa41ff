"""Track and Camera: what the tracker produces for one video, the one
currency between fitting, smoothing, synthesis, visualisation, the results
files and the exports.

Field names are the keys of tracking.npz (`lightning_ft.results`), so a
result read from disk and one fresh from the fit are the same object.
Camera convention (OpenCV): x right, y down, z forward; a model-space point
X is at p = R X + t in the camera (meters) and at u = fx x/z + cx,
v = fy y/z + cy in crop pixels, pixel centres on integers (the crop spans
[-0.5, W-0.5]).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Dict, Optional

import numpy as np
import torch

from .fitter import FrameParams

# Track fields that are per-frame head-model parameters, in FrameParams'
# order, with FrameParams' names for them.
POSE_FIELDS = {"rotation": "rotation", "translation": "translation", "expression": "expression",
               "jaw_pose": "jaw", "eye_pose": "eyes"}


@dataclass
class Camera:
    """One pinhole camera for the whole video, in crop pixels.

    focal_length [2] (fx, fy) and principal_point [2] (cx, cy) float32,
    crop pixels (OpenCV: pixel centres on integers); image_size [2] int64
    (H, W) of the crop."""

    focal_length: np.ndarray
    principal_point: np.ndarray
    image_size: np.ndarray

    @property
    def height(self) -> int:
        return int(self.image_size[0])

    @property
    def width(self) -> int:
        return int(self.image_size[1])

    def intrinsics(self) -> np.ndarray:
        """K [3,3] float64, crop pixels."""
        fx, fy = (float(v) for v in self.focal_length)
        cx, cy = (float(v) for v in self.principal_point)
        return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])

    def stored(self) -> "Camera":
        """This camera in tracking.npz's dtypes (float32, image_size int64)."""
        return Camera(np.asarray(self.focal_length, np.float32), np.asarray(self.principal_point, np.float32),
                      np.asarray(self.image_size, np.int64))

    def arrays(self) -> Dict[str, np.ndarray]:
        """The tracking.npz entries of the camera."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Track:
    """One head track over T frames (invalid frames interpolated).

    Per frame: frame_ids [T] int64 (index in the source video); valid [T]
    bool (landmarks found and fitted); expression [T,E] (FLAME coefficients
    or ICT blendshape weights); jaw_pose, neck_pose [T,3] and eye_pose [T,6]
    (left, right) axis-angle radians; rotation [T,3,3] and translation [T,3]
    (meters) from model space to the OpenCV camera; crop_boxes [T,4] xyxy
    source-video pixels; lmk68 [T,68,2] and lmk_dense [T,478,2] detected
    crop pixels, NaN where missing.
    Per video: shape [S] identity coefficients; fps frames per second.
    Optional: expression_names [E] (models with named expressions, e.g.
    ICT); texture [n_tex] and lighting [9,3] or [T,9,3] (SH, after
    synthesis); reprojection_error_68_px / _dense_px [T] float32 mean fit
    error per frame (crop pixels, NaN on invalid frames).

    As written to tracking.npz the float arrays are float32; the fit's own
    track before `stored()` holds float64 (NaN on invalid frames before
    smoothing)."""

    frame_ids: np.ndarray
    valid: np.ndarray
    shape: np.ndarray
    expression: np.ndarray
    jaw_pose: np.ndarray
    neck_pose: np.ndarray
    eye_pose: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    crop_boxes: np.ndarray
    lmk68: np.ndarray
    lmk_dense: np.ndarray
    fps: np.ndarray
    expression_names: Optional[np.ndarray] = None
    texture: Optional[np.ndarray] = None
    lighting: Optional[np.ndarray] = None
    reprojection_error_68_px: Optional[np.ndarray] = None
    reprojection_error_dense_px: Optional[np.ndarray] = None

    @property
    def n_frames(self) -> int:
        return int(self.frame_ids.shape[0])

    def shape_problems(self) -> list:
        """One line per field whose shape does not fit a track of
        n_frames frames ([] for a consistent track)."""
        T = self.n_frames
        expected = {"valid": (T,), "jaw_pose": (T, 3), "neck_pose": (T, 3), "eye_pose": (T, 6),
                    "rotation": (T, 3, 3), "translation": (T, 3), "crop_boxes": (T, 4)}
        problems = [f"'{name}' has shape {tuple(np.shape(getattr(self, name)))}, expected {shp}"
                    for name, shp in expected.items() if tuple(np.shape(getattr(self, name))) != shp]
        if np.ndim(self.expression) != 2 or np.shape(self.expression)[0] != T or np.ndim(self.shape) != 1:
            problems.append("'expression' must be [T,n_exp] and 'shape' [n_shape]")
        return problems

    def stored(self) -> "Track":
        """This track in tracking.npz's dtypes: float32 arrays, int64
        frame_ids, bool valid, float32 fps."""
        f32 = lambda a: None if a is None else np.asarray(a, np.float32)  # noqa: E731
        return replace(
            self, frame_ids=np.asarray(self.frame_ids, np.int64), valid=np.asarray(self.valid, bool),
            **{name: f32(getattr(self, name)) for name in
               ("shape", "expression", "jaw_pose", "neck_pose", "eye_pose", "rotation", "translation", "crop_boxes",
                "lmk68", "lmk_dense", "texture", "lighting", "reprojection_error_68_px",
                "reprojection_error_dense_px")},
            fps=np.float32(self.fps))

    def arrays(self) -> Dict[str, np.ndarray]:
        """The tracking.npz entries of the track (optional ones where set)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def to_torch(self, dtype: torch.dtype = torch.float32, device=None) -> FrameParams:
        """The fitter's form: FrameParams of all T frames as `dtype` tensors
        (shape [S] shared)."""
        t = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype, device=device)  # noqa: E731
        return FrameParams(*(t(getattr(self, name)) for name in POSE_FIELDS), t(self.shape))

    @classmethod
    def from_torch(cls, params: FrameParams, like: "Track") -> "Track":
        """`like` with its per-frame parameters and shape taken from `params`
        (float32, as stored); everything else (frames, landmarks, appearance)
        is kept."""
        n = lambda x: x.detach().cpu().numpy().astype(np.float32)  # noqa: E731
        return replace(like, shape=n(params.shape),
                       **{name: n(getattr(params, short)) for name, short in POSE_FIELDS.items()})
