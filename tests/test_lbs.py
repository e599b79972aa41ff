"""Linear blend skinning, pure and batched: rotations against scipy, and
skinning of a tiny two-joint skeleton against the rigid motions it must
produce."""

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from lightning_ft.lbs import barycentric_points, batch_rodrigues, blend_shapes, lbs, rotation_matrix_to_axis_angle


def _rotvecs(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    axis = rng.normal(size=(n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    return axis * rng.uniform(0.0, np.pi - 1e-3, size=(n, 1))


def test_batch_rodrigues_matches_scipy():
    v = _rotvecs(64)
    R = batch_rodrigues(torch.as_tensor(v, dtype=torch.float64))
    np.testing.assert_allclose(R.numpy(), Rotation.from_rotvec(v).as_matrix(), atol=1e-7)


def test_axis_angle_round_trip_near_zero_and_pi():
    v = np.concatenate([_rotvecs(64, seed=1), [[1e-9, 0, 0], [0, 0, 0], [np.pi - 1e-6, 0, 0], [0, 0, -np.pi + 1e-6]]])
    R = torch.as_tensor(Rotation.from_rotvec(v).as_matrix())
    back = rotation_matrix_to_axis_angle(R).numpy()
    # Axis-angle is unique up to the sign at pi: compare the rotations. The
    # quaternion's components are floored at 1e-6 / 2 (the sqrt's clamp), so
    # a rotation near the identity comes back within ~2e-6 rad.
    np.testing.assert_allclose(Rotation.from_rotvec(back).as_matrix(), R.numpy(), atol=3e-6)
    np.testing.assert_allclose(np.linalg.norm(back, axis=1), np.linalg.norm(v, axis=1), atol=3e-6)


def _two_joint_skeleton():
    """Root at the origin, a child joint at (0, 1, 0); vertex 0 follows the
    root, vertex 1 the child, vertex 2 half each. One shape direction moves
    vertex 1 and the child joint along x."""
    v_template = torch.tensor([[0.5, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    dirs = torch.zeros(3, 3, 1, dtype=torch.float64)
    dirs[1, 0, 0] = 1.0
    joints = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    joint_dirs = torch.zeros(2, 3, 1, dtype=torch.float64)
    joint_dirs[1, 0, 0] = 1.0
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    posedirs = torch.zeros(9, 9, dtype=torch.float64)
    return v_template, dirs, posedirs, joints, joint_dirs, (-1, 0), weights


def test_lbs_moves_a_tiny_skeleton_rigidly_per_joint():
    v_t, dirs, posedirs, joints, joint_dirs, parents, weights = _two_joint_skeleton()
    root, child = _rotvecs(2, seed=3)
    coeffs = torch.tensor([[0.25], [0.0]], dtype=torch.float64)  # two poses in one batch
    pose = torch.as_tensor(np.stack([np.concatenate([root, child]), np.zeros(6)]))
    verts, posed_joints = lbs(coeffs, pose, v_t, dirs, posedirs, joints, joint_dirs, parents, weights)
    Rr, Rc = Rotation.from_rotvec(root).as_matrix(), Rotation.from_rotvec(child).as_matrix()
    j1 = np.array([0.25, 1.0, 0.0])  # the child joint, shaped
    np.testing.assert_allclose(posed_joints[0].numpy(), [[0, 0, 0], Rr @ j1], atol=1e-12)
    # vertex 0 rotates with the root; vertex 1 about the child, then with the root
    np.testing.assert_allclose(verts[0, 0].numpy(), Rr @ [0.5, 0, 0], atol=1e-12)
    v1 = np.array([0.25, 2.0, 0.0])
    np.testing.assert_allclose(verts[0, 1].numpy(), Rr @ (Rc @ (v1 - j1) + j1), atol=1e-12)
    # vertex 2 blends the two transforms linearly
    v2 = np.array([0.0, 1.0, 1.0])
    blended = 0.5 * (Rr @ v2) + 0.5 * (Rr @ (Rc @ (v2 - j1) + j1))
    np.testing.assert_allclose(verts[0, 2].numpy(), blended, atol=1e-12)
    # the rest pose without shape returns the template
    np.testing.assert_allclose(verts[1].numpy(), v_t.numpy(), atol=1e-12)
    np.testing.assert_allclose(posed_joints[1].numpy(), joints.numpy(), atol=1e-12)


def test_pose_correctives_are_added_before_skinning():
    v_t, dirs, _, joints, joint_dirs, parents, weights = _two_joint_skeleton()
    posedirs = torch.zeros(9, 9, dtype=torch.float64)
    posedirs[0, 3] = 1.0  # feature (R_child - I)[0, 0] moves vertex 1 along x
    child = np.array([0.0, 0.0, 0.3])
    pose = torch.as_tensor(np.concatenate([np.zeros(3), child]))[None]
    verts, _ = lbs(torch.zeros(1, 1, dtype=torch.float64), pose, v_t, dirs, posedirs, joints, joint_dirs, parents,
                   weights)
    Rc = Rotation.from_rotvec(child).as_matrix()
    corrected = np.array([Rc[0, 0] - 1.0, 2.0, 0.0])
    np.testing.assert_allclose(verts[0, 1].numpy(), Rc @ (corrected - [0, 1, 0]) + [0, 1, 0], atol=1e-12)


def test_blend_shapes_and_barycentric_points():
    dirs = torch.arange(2 * 3 * 2, dtype=torch.float64).reshape(2, 3, 2)
    coeffs = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    np.testing.assert_allclose(blend_shapes(coeffs, dirs)[0].numpy(), dirs[..., 0] - dirs[..., 1])
    vertices = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2], [1, 2, 3]])
    bary = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.0, 0.5, 0.5]], dtype=torch.float64)
    pts = barycentric_points(vertices, faces, torch.tensor([0, 1]), bary)
    np.testing.assert_allclose(pts[0].numpy(), [[1 / 3, 1 / 3, 0], [0, 0.5, 0.5]], atol=1e-12)
