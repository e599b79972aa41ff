"""Synthetic landmark sequences with known ground truth (for tests and
benchmarks of the fitting stage)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..flame import FLAME
from ..lbs import batch_rodrigues
from ..cameras import frontal_rotation
from ..fitter import IRIS_CENTRES, build_basis, head_rotation_flame


@dataclass
class SyntheticSequence:
    """Ground truth and detections of a synthetic talking head.

    lmk68 [T,68,2], lmk_dense [T,478,2] (NaN where mediapipe has no FLAME
    counterpart), clean_lmk68 [T,68,2] (noiseless); rotation [T,3,3],
    translation [T,3], expression [T,E], jaw [T,3], eyes [T,6], shape [S];
    vertices_cam [T,V,3] meters; focal px; image_size (H,W).
    """

    lmk68: np.ndarray
    lmk_dense: np.ndarray
    clean_lmk68: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    expression: np.ndarray
    jaw: np.ndarray
    eyes: np.ndarray
    shape: np.ndarray
    vertices_cam: np.ndarray
    focal: float
    image_size: tuple


def make_sequence(flame: FLAME, T: int = 60, focal: float = 1200.0, image_size: int = 512, noise_px: float = 1.0,
                  seed: int = 0, yaw_deg: float = 25.0, pitch_deg: float = 10.0, still: bool = False,
                  expression_scale: float = 1.0, distance_scale: float = 1.0, yaw: np.ndarray = None,
                  jaw_open: np.ndarray = None) -> SyntheticSequence:
    """Smooth head motion, talking jaw and expressions, seen by a pinhole
    camera with `focal` (px) at an image of image_size^2; 1 px noise.
    yaw, jaw_open: [T] radians replacing the generated head yaw and jaw
    opening (e.g. a fast turn, a jaw snap)."""
    rng = np.random.default_rng(seed)
    yaw_track = yaw
    tt = np.arange(T) / 25.0
    ph = rng.uniform(0, 2 * np.pi, size=8)
    if still:
        yaw = np.full(T, np.deg2rad(yaw_deg) * 0.3)
        pitch = np.full(T, np.deg2rad(pitch_deg) * 0.3)
        roll = np.zeros(T)
    else:
        yaw = np.deg2rad(yaw_deg) * np.sin(2 * np.pi * 0.25 * tt + ph[0])
        pitch = np.deg2rad(pitch_deg) * np.sin(2 * np.pi * 0.31 * tt + ph[1])
        roll = np.deg2rad(5) * np.sin(2 * np.pi * 0.17 * tt + ph[2])
    yaw = yaw_track if yaw_track is not None else yaw
    aa = torch.tensor(np.stack([pitch, yaw, roll], 1), dtype=torch.float32)
    R_head = batch_rodrigues(aa)  # rotation in FLAME's frame
    R_cv = frontal_rotation(R_head) @ R_head
    # Distance such that the face spans ~60 % of the image.
    z0 = focal * 0.16 / (0.6 * image_size) * distance_scale
    trans = np.stack([0.01 * np.sin(2 * np.pi * 0.2 * tt + ph[3]), 0.008 * np.sin(2 * np.pi * 0.23 * tt + ph[4]),
                      z0 + 0.03 * np.sin(2 * np.pi * 0.1 * tt + ph[5])], 1)
    if still:
        trans = np.tile(trans[:1], (T, 1))
    E = flame.n_exp
    K = 4
    freqs = rng.uniform(0.2, 1.0, size=(K, E))
    amps = rng.normal(size=(K, E)) * expression_scale * 0.5 / np.sqrt(K) * (1.0 / (1 + np.arange(E) / 10))
    expr = sum(amps[k] * np.sin(2 * np.pi * freqs[k] * tt[:, None] + rng.uniform(0, 6.28, size=E)) for k in range(K))
    jaw = np.zeros((T, 3))
    jaw[:, 0] = 0.12 * np.clip(np.sin(2 * np.pi * 1.3 * tt + ph[6]), 0, None) if jaw_open is None else jaw_open
    eyes = np.zeros((T, 6))
    eyes[:, 1] = eyes[:, 4] = 0.15 * np.sin(2 * np.pi * 0.4 * tt + ph[7])
    if still:
        expr[:] = expr[:1]
        jaw[:] = jaw[:1]
        eyes[:] = eyes[:1]
    shape = rng.normal(size=flame.n_shape) * 0.8
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    with torch.no_grad():
        out = flame(shape=t(shape)[None].expand(T, -1), expression=t(expr), jaw_pose=t(jaw), eye_pose=t(eyes))
        lmk68_model = flame.landmarks68(out.vertices, head_rotation_flame(R_cv))
        basis = build_basis(flame)
        pupils = _pupils(flame, out.vertices, basis)
        to_cam = lambda X: torch.einsum("tij,tpj->tpi", R_cv, X) + t(trans)[:, None]  # noqa: E731
        proj = lambda p: (p[..., :2] / p[..., 2:3] * focal + (image_size - 1) / 2.0).numpy()  # noqa: E731
        clean68 = proj(to_cam(lmk68_model))
        dense_pts = proj(to_cam(out.lmk_dense))
        iris = proj(to_cam(pupils))
        verts_cam = to_cam(out.vertices).numpy()
    dense = np.full((T, 478, 2), np.nan, np.float32)
    dense[:, basis.mediapipe_indices] = dense_pts
    dense[:, IRIS_CENTRES[0]] = iris[:, 1]  # subject's right eye = FLAME's right (joint 4)
    dense[:, IRIS_CENTRES[1]] = iris[:, 0]
    noisy68 = clean68 + rng.normal(size=clean68.shape) * noise_px
    noisy_dense = dense + rng.normal(size=dense.shape) * noise_px
    return SyntheticSequence(
        lmk68=noisy68.astype(np.float32), lmk_dense=noisy_dense.astype(np.float32), clean_lmk68=clean68,
        rotation=R_cv.numpy(), translation=trans, expression=expr, jaw=jaw, eyes=eyes, shape=shape,
        vertices_cam=verts_cam, focal=focal, image_size=(image_size, image_size))


def _pupils(flame: FLAME, vertices: torch.Tensor, basis) -> torch.Tensor:
    ids = []
    for k in (3, 4):
        cand = torch.nonzero(flame.weights[:, k] > 0.5).flatten()
        ids.append(cand[torch.argmax(flame.v_template[cand, 2])])
    return vertices[:, torch.stack(ids)]
