"""Camera conventions, projection and the conversions between them (numpy and torch, batched).

The one owner of axis flips and pinhole projection: every other module calls these.

LightningFT keeps every camera in the **OpenCV** convention: a point X in
FLAME model space (meters) maps to camera space by ``x = R @ X + t`` with
camera axes x right, y down, z forward (into the scene), and projects to
pixels as ``(fx * x/z + cx, fy * y/z + cy)``. ``R [...,3,3]`` and
``t [...,3]`` are world-to-camera ("extrinsics", w2c).

Pixel coordinates follow OpenCV: pixel (i, j) (column i, row j) has its
*centre* at (i, j), so an image of W x H pixels spans [-0.5, W-0.5] x
[-0.5, H-0.5] and a centred camera has (cx, cy) = ((W-1)/2, (H-1)/2). This
is what the landmark stage (mediapipe's normalised x * W, FAN, dlib),
the renderer and the fitting use, and what tracking.npz stores.

Several consumers measure pixels from the top-left *corner* instead (pixel
centres at i + 0.5): PyTorch3D's screen space and rasterizer, nvdiffrast
(VHAP's intrinsics), instant-ngp (INSTA). A coordinate there is ours plus
``CORNER_ORIGIN_OFFSET`` (0.5); see `opencv_to_corner_pixels`.

The consumers of our exports use two other camera-axis conventions:

- **OpenGL / NeRF** (Blender, instant-ngp, nerface, VHAP/GaussianAvatars
  ``transforms.json``): camera axes x right, y up, z backward (the camera looks
  along -z). ``transform_matrix`` is the 4x4 *camera-to-world* (c2w) matrix.
  The camera axes differ from OpenCV's by ``diag(1, -1, -1)``.
- **PyTorch3D** (``PerspectiveCameras``; metrical-tracker, lightning_track):
  camera axes x left, y up, z forward (``diag(-1, -1, 1)`` from OpenCV), and
  points are *row vectors*: ``X_view = X_world @ R + T``. So the stored ``R``
  is the transpose of the column-vector rotation. Intrinsics may be in NDC
  units: with ``s = min(H, W) / 2``, ``focal_ndc = focal_px / s`` and
  ``principal_ndc = -(principal_px + 0.5 - (W/2, H/2)) / s`` (the sign because
  NDC +x points left and +y up). PyTorch3D's own
  ``cameras_from_opencv_projection`` (pytorch3d/renderer/camera_conversions.py)
  uses the same formula *without* the 0.5, i.e. it reads K's principal point
  as a corner-origin coordinate; but its rasterizer and
  ``transform_points_screen`` put pixel i's centre at screen i + 0.5 (NDC
  ``-1 + (2i + 1)/S``, rasterize_meshes.py ``pix_to_ndc``). The 0.5 here makes
  a PyTorch3D camera land FLAME on the same pixels of the same image as ours.

Rotations in PyTorch3D's 6D representation (``matrix_to_rotation_6d``) are
the first two *rows* of the matrix, flattened; decoding runs Gram-Schmidt on
them (Zhou et al. 2019).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

# Axis flips between camera conventions; each is its own inverse.
OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0])
OPENCV_TO_PYTORCH3D = np.diag([-1.0, -1.0, 1.0])
# A head model looks along its +z with y up (FLAME, ICT); an OpenCV camera
# sees it frontal with R = diag(1, -1, -1), the same flip as OpenCV <-> OpenGL.
FRONTAL_ROTATION = OPENCV_TO_OPENGL
# Points closer than this (metres) are projected as if at it: keeps a bad
# solver step from dividing by zero.
MIN_DEPTH = 1e-6


# ----------------------------------------------------------------------------
# Rigid transforms


def rigid_matrix(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """4x4 matrices [...,4,4] from rotations R [...,3,3] and translations t [...,3]."""
    R = np.asarray(R, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    M = np.zeros(R.shape[:-2] + (4, 4))
    M[..., :3, :3] = R
    M[..., :3, 3] = t
    M[..., 3, 3] = 1.0
    return M


def invert_rigid(M: np.ndarray) -> np.ndarray:
    """Inverse [...,4,4] of rigid 4x4 matrices [...,4,4] (rotation + translation)."""
    M = np.asarray(M, dtype=np.float64)
    Rt = np.swapaxes(M[..., :3, :3], -1, -2)
    return rigid_matrix(Rt, -np.einsum("...ij,...j->...i", Rt, M[..., :3, 3]))


def opencv_to_opengl_c2w(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """OpenGL camera-to-world [...,4,4] from OpenCV world-to-camera R [...,3,3], t [...,3].

    The NeRF ``transform_matrix``: its columns are the camera's x (right),
    y (up) and z (backward) axes and its position, in world coordinates.
    """
    c2w_cv = invert_rigid(rigid_matrix(R, t))
    flip = np.eye(4)
    flip[:3, :3] = OPENCV_TO_OPENGL
    return c2w_cv @ flip


def opengl_c2w_to_opencv(c2w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """OpenCV world-to-camera (R [...,3,3], t [...,3]) from OpenGL camera-to-world [...,4,4]."""
    c2w_cv = np.array(c2w, dtype=np.float64)
    c2w_cv[..., :3, :3] = c2w_cv[..., :3, :3] @ OPENCV_TO_OPENGL
    w2c = invert_rigid(c2w_cv)
    return w2c[..., :3, :3], w2c[..., :3, 3]


def opencv_to_pytorch3d(R: np.ndarray, t: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """PyTorch3D (R [...,3,3], T [...,3]) from OpenCV world-to-camera R, t.

    PyTorch3D maps row vectors, ``X_view = X @ R_p3d + T_p3d``, into axes
    (left, up, forward): ``R_p3d = R^T diag(-1,-1,1)``, ``T_p3d = diag(-1,-1,1) t``.
    """
    R = np.asarray(R, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    return np.swapaxes(R, -1, -2) @ OPENCV_TO_PYTORCH3D, t @ OPENCV_TO_PYTORCH3D


def pytorch3d_to_opencv(R_p3d: np.ndarray, T_p3d: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """OpenCV world-to-camera (R [...,3,3], t [...,3]) from PyTorch3D R, T."""
    R_p3d = np.asarray(R_p3d, dtype=np.float64)
    T_p3d = np.asarray(T_p3d, dtype=np.float64)
    return OPENCV_TO_PYTORCH3D @ np.swapaxes(R_p3d, -1, -2), T_p3d @ OPENCV_TO_PYTORCH3D


# ----------------------------------------------------------------------------
# Intrinsics


def intrinsic_matrix(focal_px: np.ndarray, principal_px: np.ndarray) -> np.ndarray:
    """K [...,3,3] from focal lengths [...,2] (fx, fy) and principal points [...,2] (cx, cy), pixels."""
    f = np.asarray(focal_px, dtype=np.float64)
    p = np.asarray(principal_px, dtype=np.float64)
    K = np.zeros(np.broadcast_shapes(f.shape, p.shape)[:-1] + (3, 3))
    K[..., 0, 0], K[..., 1, 1] = f[..., 0], f[..., 1]
    K[..., 0, 2], K[..., 1, 2] = p[..., 0], p[..., 1]
    K[..., 2, 2] = 1.0
    return K


CORNER_ORIGIN_OFFSET = 0.5


def opencv_to_corner_pixels(xy: np.ndarray) -> np.ndarray:
    """Corner-origin pixel coordinates [...,2] (PyTorch3D screen, nvdiffrast,
    instant-ngp: pixel i spans [i, i+1]) from OpenCV coordinates [...,2] (centre at i)."""
    return np.asarray(xy, dtype=np.float64) + CORNER_ORIGIN_OFFSET


def corner_to_opencv_pixels(xy: np.ndarray) -> np.ndarray:
    """OpenCV pixel coordinates [...,2] (pixel centres on integers) from corner-origin ones [...,2]."""
    return np.asarray(xy, dtype=np.float64) - CORNER_ORIGIN_OFFSET


def centred_principal_point(image_size_hw: np.ndarray) -> np.ndarray:
    """The image centre [...,2] (cx, cy) = ((W-1)/2, (H-1)/2) in OpenCV pixels, from (H, W) [...,2]."""
    hw = np.asarray(image_size_hw, dtype=np.float64)
    return (hw[..., ::-1] - 1.0) / 2.0


def pixel_to_ndc_intrinsics(
    focal_px: np.ndarray, principal_px: np.ndarray, image_size_hw: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """PyTorch3D NDC (focal [...,2], principal point [...,2]) from OpenCV pixel intrinsics.

    principal_px is in OpenCV pixels (centres on integers); image_size_hw
    [...,2] is (H, W). NDC units are half the shorter image side, NDC +x/+y
    point left/up, and the NDC square's edges are the image edges, so a
    centred camera ((W-1)/2, (H-1)/2) has principal point (0, 0). Differs from
    PyTorch3D's `cameras_from_opencv_projection` by half a pixel on purpose
    (see the module docstring).
    """
    hw = np.asarray(image_size_hw, dtype=np.float64)
    wh = hw[..., ::-1]
    scale = hw.min(axis=-1, keepdims=True) / 2.0
    focal_ndc = np.asarray(focal_px, dtype=np.float64) / scale
    principal_ndc = -(opencv_to_corner_pixels(principal_px) - wh / 2.0) / scale
    return focal_ndc, principal_ndc


def ndc_to_pixel_intrinsics(
    focal_ndc: np.ndarray, principal_ndc: np.ndarray, image_size_hw: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """OpenCV pixel (focal [...,2], principal point [...,2]) from PyTorch3D NDC intrinsics;
    the inverse of `pixel_to_ndc_intrinsics`."""
    hw = np.asarray(image_size_hw, dtype=np.float64)
    wh = hw[..., ::-1]
    scale = hw.min(axis=-1, keepdims=True) / 2.0
    focal_px = np.asarray(focal_ndc, dtype=np.float64) * scale
    principal_px = corner_to_opencv_pixels(-np.asarray(principal_ndc, dtype=np.float64) * scale + wh / 2.0)
    return focal_px, principal_px


def focal_to_fov(focal_px: np.ndarray, size_px: np.ndarray) -> np.ndarray:
    """Full field of view (radians) along an image side of size_px pixels."""
    return 2.0 * np.arctan(np.asarray(size_px, dtype=np.float64) / (2.0 * np.asarray(focal_px, dtype=np.float64)))


def fov_to_focal(fov_rad: np.ndarray, size_px: np.ndarray) -> np.ndarray:
    """Focal length (pixels) from the full field of view along a side of size_px pixels."""
    return np.asarray(size_px, dtype=np.float64) / (2.0 * np.tan(np.asarray(fov_rad, dtype=np.float64) / 2.0))


# ----------------------------------------------------------------------------
# Projection and rotation representations


def frontal_rotation(like: torch.Tensor) -> torch.Tensor:
    """`FRONTAL_ROTATION` [3,3] as a tensor of like's dtype and device."""
    return torch.tensor(FRONTAL_ROTATION, dtype=like.dtype, device=like.device)


def opencv_to_opengl_vectors(v: torch.Tensor) -> torch.Tensor:
    """Directions [...,3] (e.g. normals) from OpenCV camera axes to OpenGL's
    (x right, y up, z towards the viewer): `OPENCV_TO_OPENGL` applied."""
    return v * v.new_tensor([1.0, -1.0, -1.0])


def project_points(points_cam: torch.Tensor, focal: torch.Tensor, principal_point: torch.Tensor) -> torch.Tensor:
    """Pixels [...,2] of OpenCV camera-space points [...,3] (metres).

    focal: fx = fy in pixels, broadcast against points[..., :1] (e.g. [T,1,1]
    for [T,N,3]); principal_point: [...,2] broadcast likewise. Depth is
    clamped at `MIN_DEPTH`.
    """
    z = points_cam[..., 2:3].clamp(min=MIN_DEPTH)
    return points_cam[..., :2] / z * focal + principal_point


def project_screen(
    vertices_cam: torch.Tensor,
    K: Optional[torch.Tensor] = None,
    *,
    focal: Optional[torch.Tensor] = None,
    principal_point: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Screen coordinates for rasterization: [B,V,3] = (u, v) pixels and camera z.

    vertices_cam: [B,V,3] metres (OpenCV axes). K: [B,3,3] or [3,3] intrinsics
    in pixels (skew honoured); or `focal` ([B,2] or [2], fx, fy) and
    `principal_point` ([B,2] or [2]). No depth clamp: the rasterizer culls
    what lies behind the camera by its z.
    """
    if K is not None:
        K = torch.as_tensor(K, dtype=vertices_cam.dtype, device=vertices_cam.device)
        if K.dim() == 2:
            K = K.expand(vertices_cam.shape[0], 3, 3)
        fx, fy = K[:, 0, 0], K[:, 1, 1]
        skew = K[:, 0, 1]
        cx, cy = K[:, 0, 2], K[:, 1, 2]
    else:
        if focal is None or principal_point is None:
            raise ValueError("project_screen: give K or both focal and principal_point")
        focal = torch.as_tensor(focal, dtype=vertices_cam.dtype, device=vertices_cam.device)
        principal_point = torch.as_tensor(principal_point, dtype=vertices_cam.dtype, device=vertices_cam.device)
        focal = focal.expand(vertices_cam.shape[0], 2)
        principal_point = principal_point.expand(vertices_cam.shape[0], 2)
        fx, fy = focal[:, 0], focal[:, 1]
        cx, cy = principal_point[:, 0], principal_point[:, 1]
        skew = torch.zeros_like(fx)
    x, y, z = vertices_cam.unbind(-1)
    xn, yn = x / z, y / z
    u = fx[:, None] * xn + skew[:, None] * yn + cx[:, None]
    v = fy[:, None] * yn + cy[:, None]
    return torch.stack([u, v, z], dim=-1)


def project_opencv(points: np.ndarray, R: np.ndarray, t: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Pixels [...,N,2] of points [...,N,3] under OpenCV extrinsics R [...,3,3], t [...,3], K [...,3,3]."""
    cam = np.einsum("...ij,...nj->...ni", R, points) + np.asarray(t)[..., None, :]
    uvw = np.einsum("...ij,...nj->...ni", K, cam)
    return uvw[..., :2] / uvw[..., 2:3]


def matrix_to_rotation_6d(R: np.ndarray) -> np.ndarray:
    """PyTorch3D 6D rotation [...,6]: the first two rows of R [...,3,3], flattened."""
    R = np.asarray(R)
    return R[..., :2, :].reshape(R.shape[:-2] + (6,))


def rotation_6d_to_matrix(d6: np.ndarray) -> np.ndarray:
    """Rotation matrices [...,3,3] from PyTorch3D 6D vectors [...,6] (Gram-Schmidt on rows)."""
    d6 = np.asarray(d6, dtype=np.float64)
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = a1 / np.linalg.norm(a1, axis=-1, keepdims=True)
    b2 = a2 - (b1 * a2).sum(-1, keepdims=True) * b1
    b2 = b2 / np.linalg.norm(b2, axis=-1, keepdims=True)
    b3 = np.cross(b1, b2)
    return np.stack([b1, b2, b3], axis=-2)


def axis_angle_to_matrix(aa: np.ndarray) -> np.ndarray:
    """Rotation matrices [...,3,3] from axis-angle vectors [...,3] (radians)."""
    aa = np.asarray(aa, dtype=np.float64)
    theta = np.linalg.norm(aa, axis=-1, keepdims=True)
    safe = np.where(theta > 1e-12, theta, 1.0)
    k = aa / safe
    K = np.zeros(aa.shape[:-1] + (3, 3))
    K[..., 0, 1], K[..., 0, 2] = -k[..., 2], k[..., 1]
    K[..., 1, 0], K[..., 1, 2] = k[..., 2], -k[..., 0]
    K[..., 2, 0], K[..., 2, 1] = -k[..., 1], k[..., 0]
    s, c = np.sin(theta)[..., None], np.cos(theta)[..., None]
    return np.eye(3) + s * K + (1 - c) * (K @ K)


def matrix_to_axis_angle(R: np.ndarray) -> np.ndarray:
    """Axis-angle vectors [...,3] (angle in [0, pi]) from rotation matrices [...,3,3]."""
    from scipy.spatial.transform import Rotation

    R = np.asarray(R, dtype=np.float64)
    flat = Rotation.from_matrix(R.reshape(-1, 3, 3)).as_rotvec()
    return flat.reshape(R.shape[:-2] + (3,))
