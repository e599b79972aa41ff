"""Synthetic landmark sequences of a head model with bounded, ARKit-style
expression weights (ICT), with known ground truth, for tests and
benchmarks of fitting with `--model ict`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..lbs import barycentric_points, batch_rodrigues
from ..cameras import frontal_rotation
from ..optimize import IRIS_CENTRES, head_rotation_flame


@dataclass
class ICTSequence:
    """Ground truth and detections. lmk68 [T,68,2], lmk_dense [T,478,2]
    (1 px noise; NaN where the model has no embedding), clean_lmk68 and
    clean_dense (noiseless); rotation [T,3,3], translation [T,3] (model ->
    OpenCV camera, meters); expression [T,E] in [0, 1]; eyes [T,6]; shape
    [S] (|shape| <= 2 sd); vertices_cam [T,V,3] meters; focal px;
    image_size (H, W)."""

    lmk68: np.ndarray
    lmk_dense: np.ndarray
    clean_lmk68: np.ndarray
    clean_dense: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    expression: np.ndarray
    eyes: np.ndarray
    shape: np.ndarray
    vertices_cam: np.ndarray
    focal: float
    image_size: tuple


def bounded_expression_track(T: int, E: int, rng: np.random.Generator, fps: float = 25.0,
                             active_share: float = 0.35, names=None) -> np.ndarray:
    """Weights [T,E] in [0, 1]: about `active_share` of the shapes move, each
    as a smooth rectified sum of two sines (rising from and falling back to
    0, peaks 0.3-1), the rest stay at 0, as in a talking face where most
    blendshapes rest at any moment; jawOpen (if named) opens and closes
    like speech."""
    tt = np.arange(T) / fps
    out = np.zeros((T, E))
    for j in range(E):
        if rng.uniform() > active_share:
            continue
        f = rng.uniform(0.2, 0.9, 2)
        ph = rng.uniform(0, 2 * np.pi, 2)
        wave = 0.6 * np.sin(2 * np.pi * f[0] * tt + ph[0]) + 0.4 * np.sin(2 * np.pi * f[1] * tt + ph[1])
        out[:, j] = np.clip(wave, 0, None) * rng.uniform(0.3, 1.0)
    if names is not None and "jawOpen" in names:
        j = list(names).index("jawOpen")
        out[:, j] = 0.6 * np.clip(np.sin(2 * np.pi * 1.3 * tt + rng.uniform(0, 6.3)), 0, None)
    return np.clip(out, 0.0, 1.0)


def make_ict_sequence(model, T: int = 120, focal: float = 1200.0, image_size: int = 512, noise_px: float = 1.0,
                      seed: int = 0, yaw_deg: float = 25.0, pitch_deg: float = 10.0,
                      eye_rad: float = 0.15) -> ICTSequence:
    """Smooth head motion (yaw +-yaw_deg, pitch +-pitch_deg, roll +-5 deg),
    a bounded expression track, rigid gaze, identity ~ N(0, 1) clipped to
    2 sd, seen by a pinhole camera with `focal` px at image_size^2 (the face
    ~60 % of the image); `noise_px` Gaussian noise on the 68 and 478 points.
    `model`: a `head_model.HeadModel` without a jaw joint (ICT)."""
    rng = np.random.default_rng(seed)
    tt = np.arange(T) / 25.0
    ph = rng.uniform(0, 2 * np.pi, size=8)
    yaw = np.deg2rad(yaw_deg) * np.sin(2 * np.pi * 0.25 * tt + ph[0])
    pitch = np.deg2rad(pitch_deg) * np.sin(2 * np.pi * 0.31 * tt + ph[1])
    roll = np.deg2rad(5) * np.sin(2 * np.pi * 0.17 * tt + ph[2])
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    R_head = batch_rodrigues(t(np.stack([pitch, yaw, roll], 1)))
    R_cv = frontal_rotation(R_head) @ R_head
    shape = np.clip(rng.normal(size=model.n_shape), -2.0, 2.0)
    expr = bounded_expression_track(T, model.n_exp, rng, names=getattr(model, "expression_names", None))
    eyes = np.zeros((T, 6))
    eyes[:, 1] = eyes[:, 4] = eye_rad * np.sin(2 * np.pi * 0.4 * tt + ph[7])
    eyes[:, 0] = eyes[:, 3] = 0.5 * eye_rad * np.sin(2 * np.pi * 0.3 * tt + ph[6])
    with torch.no_grad():
        verts = model.posed_vertices(t(shape)[None].expand(T, -1), t(expr), eye_pose=t(eyes))
        # the face's centre (the model's own origin need not be there), for the distance
        centre = verts[0].mean(0)
        z0 = focal * 0.16 / (0.6 * image_size)
        trans = np.stack([0.01 * np.sin(2 * np.pi * 0.2 * tt + ph[3]), 0.008 * np.sin(2 * np.pi * 0.23 * tt + ph[4]),
                          z0 + 0.03 * np.sin(2 * np.pi * 0.1 * tt + ph[5])], 1)
        trans = trans - torch.einsum("tij,j->ti", R_cv, centre).numpy()
        lmk68_model = model.landmarks68(verts, head_rotation_flame(R_cv))
        dense_model = barycentric_points(verts, model.faces, model.dense_faces, model.dense_bary)
        parts = model.linear_parts()
        pupil_ids = []  # as optimize.build_basis picks them: the most forward eyeball vertex
        for k in (1, 2):
            ids = torch.nonzero(parts.weights[:, k] > 0.5).flatten()
            pupil_ids.append(ids[torch.argmax(parts.v_template[ids, 2])])
        pupils = verts[:, torch.stack(pupil_ids)]
        to_cam = lambda X: torch.einsum("tij,tpj->tpi", R_cv, X) + t(trans)[:, None]  # noqa: E731
        proj = lambda p: (p[..., :2] / p[..., 2:3] * focal + (image_size - 1) / 2.0).numpy()  # noqa: E731
        clean68 = proj(to_cam(lmk68_model))
        dense_pts = proj(to_cam(dense_model))
        iris = proj(to_cam(pupils))
        verts_cam = to_cam(verts).numpy()
    dense = np.full((T, 478, 2), np.nan, np.float64)
    dense[:, model.mediapipe_indices.cpu().numpy()] = dense_pts
    dense[:, IRIS_CENTRES[0]] = iris[:, 1]  # subject's right eye = the model's right (eye 2)
    dense[:, IRIS_CENTRES[1]] = iris[:, 0]
    noisy68 = clean68 + rng.normal(size=clean68.shape) * noise_px
    noisy_dense = dense + rng.normal(size=dense.shape) * noise_px
    return ICTSequence(
        lmk68=noisy68.astype(np.float32), lmk_dense=noisy_dense.astype(np.float32), clean_lmk68=clean68,
        clean_dense=dense, rotation=R_cv.numpy(), translation=trans, expression=expr, eyes=eyes, shape=shape,
        vertices_cam=verts_cam, focal=focal, image_size=(image_size, image_size))
