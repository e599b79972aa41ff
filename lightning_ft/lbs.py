"""Linear blend skinning for FLAME, kept pure and batched (as in smplx).

Every function takes batched tensors (`B` first) and model arrays; nothing
here knows about files. Units: meters, radians (axis-angle).

Joints are regressed from the shaped mesh by a linear regressor, so
``J_regressor @ (v_template + dirs @ coeffs)`` equals
``joints_template + joint_dirs @ coeffs`` with both terms precomputed once.
That identity lets the landmark fitting evaluate only the handful of
vertices its losses touch while still getting exact joint positions.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def batch_rodrigues(rot_vecs: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Axis-angle vectors [N,3] to rotation matrices [N,3,3]."""
    angle = torch.norm(rot_vecs + eps, dim=1, keepdim=True)  # [N,1]
    axis = rot_vecs / angle
    cos = torch.cos(angle)[:, :, None]
    sin = torch.sin(angle)[:, :, None]
    rx, ry, rz = axis[:, 0], axis[:, 1], axis[:, 2]
    zeros = torch.zeros_like(rx)
    K = torch.stack([zeros, -rz, ry, rz, zeros, -rx, -ry, rx, zeros], dim=1).view(-1, 3, 3)
    eye = torch.eye(3, dtype=rot_vecs.dtype, device=rot_vecs.device)[None]
    return eye + sin * K + (1 - cos) * torch.bmm(K, K)


def rotation_matrix_to_axis_angle(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [N,3,3] to axis-angle [N,3] (angles in [0, pi])."""
    # Through the quaternion: numerically stable at 0 and pi alike.
    m = R
    trace = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    qw = torch.sqrt(torch.clamp(1 + trace, min=1e-12)) / 2
    qx = torch.sqrt(torch.clamp(1 + m[:, 0, 0] - m[:, 1, 1] - m[:, 2, 2], min=1e-12)) / 2
    qy = torch.sqrt(torch.clamp(1 - m[:, 0, 0] + m[:, 1, 1] - m[:, 2, 2], min=1e-12)) / 2
    qz = torch.sqrt(torch.clamp(1 - m[:, 0, 0] - m[:, 1, 1] + m[:, 2, 2], min=1e-12)) / 2
    qx = torch.copysign(qx, m[:, 2, 1] - m[:, 1, 2])
    qy = torch.copysign(qy, m[:, 0, 2] - m[:, 2, 0])
    qz = torch.copysign(qz, m[:, 1, 0] - m[:, 0, 1])
    v = torch.stack([qx, qy, qz], dim=1)
    sin_half = torch.norm(v, dim=1)
    angle = 2 * torch.atan2(sin_half, qw)
    scale = torch.where(sin_half > 1e-8, angle / sin_half.clamp(min=1e-12), 2.0 / qw.clamp(min=1e-12))
    return v * scale[:, None]


def blend_shapes(coeffs: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Offsets [B,V,3] from coefficients [B,S] and directions [V,3,S]."""
    return torch.einsum("bs,vcs->bvc", coeffs, dirs)


def rigid_transforms(
    rot_mats: torch.Tensor, joints: torch.Tensor, parents: Tuple[int, ...]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chain local joint rotations along the kinematic tree.

    rot_mats [B,K,3,3], joints [B,K,3] (rest pose), parents with -1 at the root.
    Returns the posed joints [B,K,3] and the relative transforms [B,K,4,4]
    that map rest-pose points to posed points for each joint.
    """
    B, K = joints.shape[:2]
    rel_joints = joints.clone()
    parent_idx = torch.tensor([max(p, 0) for p in parents[1:]], device=joints.device)
    rel_joints[:, 1:] = joints[:, 1:] - joints[:, parent_idx]
    local = torch.cat(
        [F.pad(rot_mats, [0, 0, 0, 1]), F.pad(rel_joints[..., None], [0, 0, 0, 1], value=1.0)],
        dim=3,
    )  # [B,K,4,4]
    chain = [local[:, 0]]
    for k in range(1, K):
        chain.append(torch.matmul(chain[parents[k]], local[:, k]))
    world = torch.stack(chain, dim=1)
    posed_joints = world[:, :, :3, 3]
    # Remove the rest-pose joint location so the transform acts on rest points.
    rest = torch.matmul(world[:, :, :3, :3], joints[..., None])[..., 0]
    rel = world.clone()
    rel[:, :, :3, 3] = world[:, :, :3, 3] - rest
    return posed_joints, rel


def lbs(
    coeffs: torch.Tensor,
    pose: torch.Tensor,
    v_template: torch.Tensor,
    dirs: torch.Tensor,
    posedirs: torch.Tensor,
    joints_template: torch.Tensor,
    joint_dirs: torch.Tensor,
    parents: Tuple[int, ...],
    weights: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """FLAME/SMPL linear blend skinning.

    coeffs [B,S]: shape and expression coefficients, concatenated.
    pose [B,K*3]: axis-angle per joint (root first), radians.
    v_template [V,3], dirs [V,3,S], posedirs [(K-1)*9, V*3],
    joints_template [K,3], joint_dirs [K,3,S], weights [V,K].
    V may be any subset of the model's vertices (all arrays sliced alike).
    Returns posed vertices [B,V,3] and posed joints [B,K,3], meters.
    """
    B = coeffs.shape[0]
    K = joints_template.shape[0]
    v_shaped = v_template[None] + blend_shapes(coeffs, dirs)
    joints = joints_template[None] + blend_shapes(coeffs, joint_dirs)
    rot_mats = batch_rodrigues(pose.reshape(-1, 3)).view(B, K, 3, 3)
    eye = torch.eye(3, dtype=pose.dtype, device=pose.device)
    pose_feature = (rot_mats[:, 1:] - eye).reshape(B, -1)
    v_posed = v_shaped + torch.matmul(pose_feature, posedirs).view(B, -1, 3)
    posed_joints, rel = rigid_transforms(rot_mats, joints, parents)
    T = torch.einsum("vk,bkij->bvij", weights, rel)
    verts = torch.einsum("bvij,bvj->bvi", T[..., :3, :3], v_posed) + T[..., :3, 3]
    return verts, posed_joints


def barycentric_points(
    vertices: torch.Tensor, faces: torch.Tensor, face_idx: torch.Tensor, bary: torch.Tensor
) -> torch.Tensor:
    """Points on a mesh as barycentric combinations of face corners.

    vertices [B,V,3], faces [F,3] (long), face_idx [B,L] or [L], bary [B,L,3]
    or [L,3]. Returns [B,L,3].
    """
    B = vertices.shape[0]
    if face_idx.dim() == 1:
        face_idx = face_idx[None].expand(B, -1)
    if bary.dim() == 2:
        bary = bary[None].expand(B, -1, -1)
    corner_idx = faces[face_idx]  # [B,L,3]
    batch = torch.arange(B, device=vertices.device)[:, None, None]
    corners = vertices[batch, corner_idx]  # [B,L,3,3]
    return torch.einsum("blk,blkc->blc", bary.to(vertices.dtype), corners)
