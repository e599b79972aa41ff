"""posing: a head model posed in the camera, against FLAME's own call and the
camera contract of tracking.npz, in any chunking."""

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from lightning_ft.fitter import head_rotation_flame
from lightning_ft.posing import FramePoses, pose_in_camera, posed_frames
from lightning_ft.track import Camera, Track


def _track(flame, T=9, seed=0):
    rng = np.random.default_rng(seed)
    rotation = np.diag([1.0, -1.0, -1.0]) @ Rotation.from_rotvec(rng.normal(scale=0.2, size=(T, 3))).as_matrix()
    translation = np.stack([rng.uniform(-0.02, 0.02, T), rng.uniform(-0.02, 0.02, T), rng.uniform(0.5, 0.7, T)], 1)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return Track(frame_ids=np.arange(T), valid=np.ones(T, bool), shape=f32(rng.normal(size=flame.n_shape)),
                 expression=f32(rng.normal(scale=0.5, size=(T, flame.n_exp))),
                 jaw_pose=f32(np.stack([rng.uniform(0, 0.2, T), np.zeros(T), np.zeros(T)], 1)),
                 neck_pose=np.zeros((T, 3), np.float32), eye_pose=f32(rng.normal(scale=0.1, size=(T, 6))),
                 rotation=f32(rotation), translation=f32(translation), crop_boxes=np.zeros((T, 4), np.float32),
                 lmk68=np.zeros((T, 68, 2), np.float32), lmk_dense=np.zeros((T, 478, 2), np.float32),
                 fps=np.float32(25.0))


CAMERA = Camera(np.array([900.0, 905.0], np.float32), np.array([255.5, 250.0], np.float32), np.array([512, 512]))


def _reference(flame, track):
    """FLAME's own forward pass, then p = R X + t and u = f x / z + c (the README's camera)."""
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    T = track.n_frames
    with torch.no_grad():
        out = flame(shape=t(track.shape)[None].expand(T, -1), expression=t(track.expression),
                             jaw_pose=t(track.jaw_pose), eye_pose=t(track.eye_pose))
        R = t(track.rotation)
        lmk = flame.landmarks68(out.vertices, head_rotation_flame(R))
    R, tr = track.rotation.astype(np.float64), track.translation.astype(np.float64)
    vertices = np.einsum("tij,tvj->tvi", R, out.vertices.numpy().astype(np.float64)) + tr[:, None]
    p = np.einsum("tij,tvj->tvi", R, lmk.numpy().astype(np.float64)) + tr[:, None]
    return vertices, p[..., :2] / p[..., 2:] * CAMERA.focal_length + CAMERA.principal_point


def test_posed_frames_match_flame_and_the_camera_contract_in_any_chunking(flame_model):
    track = _track(flame_model)
    vertices, landmarks = _reference(flame_model, track)
    for chunk in (4, 64):
        parts = list(posed_frames(flame_model, track, CAMERA, chunk=chunk))
        assert [len(p.frames) for p in parts] == ([4, 4, 1] if chunk == 4 else [9])
        np.testing.assert_allclose(np.concatenate([p.vertices for p in parts]), vertices, atol=2e-6)
        np.testing.assert_allclose(np.concatenate([p.landmarks68 for p in parts]), landmarks, atol=2e-3)
    picked = list(posed_frames(flame_model, track, frames=[7, 2], dtype=torch.float64))
    assert picked[0].landmarks68 is None and picked[0].vertices.dtype == np.float64
    np.testing.assert_array_equal(picked[0].frames, [7, 2])
    np.testing.assert_allclose(picked[0].vertices, vertices[[7, 2]], atol=2e-6)


def test_frame_poses_give_each_frame_of_its_chunk(flame_model):
    track = _track(flame_model, seed=1)
    vertices, landmarks = _reference(flame_model, track)
    poses = FramePoses(flame_model, track, CAMERA, chunk=4)
    for t in (0, 5, 3, 8):
        np.testing.assert_allclose(poses.vertices(t), vertices[t], atol=2e-6)
        np.testing.assert_allclose(poses.landmarks68(t), landmarks[t], atol=2e-3)


def test_pose_in_camera_is_differentiable(flame_model):
    params = _track(flame_model).to_torch()
    params.translation.requires_grad_(True)
    _, landmarks = pose_in_camera(flame_model, params, torch.tensor([900.0, 900.0]), torch.tensor([255.5, 255.5]))
    landmarks[..., 0].sum().backward()
    # d u / d t_x = f / z for every landmark: positive, about 900 / 0.6 per point
    assert (params.translation.grad[:, 0] > 68 * 900 / 0.8).all()
