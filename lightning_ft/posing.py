"""A head model posed in the camera: vertices and 68 landmarks per frame.

One function for every stage that needs the posed head (synthesis's
photometric fit, the -v video, the mesh export), through the head-model
interface (`head_model.HeadModel`), so FLAME and ICT pose alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from .cameras import project_points
from .fitter import FrameParams, head_rotation_flame
from .track import Camera, Track


def pose_in_camera(model, params: FrameParams, focal: Optional[torch.Tensor] = None,
                   principal_point: Optional[torch.Tensor] = None, neck_pose: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Camera-space vertices [B,V,3] (meters, OpenCV axes) of `params`'
    B frames and, with `focal` [2] and `principal_point` [2] (pixels), their
    projected 68 landmarks [B,68,2] (else None). Differentiable. The model
    is evaluated in the dtype of params.expression and shape (the model's
    own), the rigid transform and projection in that of params.rotation.
    neck_pose [B,3] axis-angle radians, or None: the neck at rest (the
    fitter has none; a track read from disk may)."""
    R, t = params.rotation, params.translation
    B = R.shape[0]
    vertices = model.posed_vertices(params.shape.expand(B, -1), params.expression, jaw_pose=params.jaw,
                                    eye_pose=params.eyes, neck_pose=neck_pose)
    vertices_cam = torch.einsum("bij,bvj->bvi", R, vertices.to(R.dtype)) + t[:, None]
    if focal is None:
        return vertices_cam, None
    landmarks = model.landmarks68(vertices, head_rotation_flame(R.to(vertices.dtype))).to(R.dtype)
    landmarks_cam = torch.einsum("bij,bvj->bvi", R, landmarks) + t[:, None]
    return vertices_cam, project_points(landmarks_cam, focal, principal_point)


@dataclass
class PosedFrames:
    """Some frames of a track, posed: frames [B] their indices in the track;
    vertices [B,V,3] camera space (meters); landmarks68 [B,68,2] crop
    pixels, or None."""

    frames: np.ndarray
    vertices: np.ndarray
    landmarks68: Optional[np.ndarray]


def posed_frames(model, track: Track, camera: Optional[Camera] = None, chunk: int = 64,
                 frames: Optional[np.ndarray] = None, dtype: Optional[torch.dtype] = None) -> Iterator[PosedFrames]:
    """`pose_in_camera` over a track, `chunk` frames at a time, so a long
    video never holds [T,V,3] in memory; landmarks where `camera` is given.
    frames: indices to pose (default all T). dtype: of the rigid transform
    and projection (default the model's; the model itself is evaluated in
    its own dtype)."""
    model_dtype = model.v_template.dtype
    dtype = dtype or model_dtype
    frames = np.arange(track.n_frames) if frames is None else np.asarray(frames)
    as_model = lambda a: torch.as_tensor(np.asarray(a), dtype=model_dtype)  # noqa: E731
    as_rigid = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype)  # noqa: E731
    focal = pp = None
    if camera is not None:
        focal, pp = as_rigid(camera.focal_length), as_rigid(camera.principal_point)
    for s in range(0, len(frames), chunk):
        sel = frames[s:s + chunk]
        with torch.no_grad():
            params = FrameParams(as_rigid(track.rotation[sel]), as_rigid(track.translation[sel]),
                                 as_model(track.expression[sel]), as_model(track.jaw_pose[sel]),
                                 as_model(track.eye_pose[sel]), as_model(track.shape))
            vertices, landmarks = pose_in_camera(model, params, focal, pp, neck_pose=as_model(track.neck_pose[sel]))
        yield PosedFrames(sel, vertices.numpy(), None if landmarks is None else landmarks.numpy())


class FramePoses:
    """Posed vertices and landmarks of frame t on demand, one chunk of
    frames held at a time (the -v video reads frames in order)."""

    def __init__(self, model, track: Track, camera: Camera, chunk: int = 64):
        self.model, self.track, self.camera, self.chunk = model, track, camera, chunk
        self.start, self.posed = -1, None

    def _at(self, t: int) -> int:
        """Frame t's row in the chunk held, after posing that chunk if needed."""
        if self.posed is None or not self.start <= t < self.start + self.chunk:
            self.start = (t // self.chunk) * self.chunk
            frames = np.arange(self.start, min(self.track.n_frames, self.start + self.chunk))
            self.posed = next(posed_frames(self.model, self.track, self.camera, self.chunk, frames=frames))
        return t - self.start

    def vertices(self, t: int) -> np.ndarray:
        """Camera-space vertices [V,3] (meters) of frame t."""
        row = self._at(t)
        return self.posed.vertices[row]

    def landmarks68(self, t: int) -> np.ndarray:
        """Projected 68 landmarks [68,2] (crop pixels) of frame t."""
        row = self._at(t)
        return self.posed.landmarks68[row]
