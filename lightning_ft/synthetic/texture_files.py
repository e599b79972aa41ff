"""Synthetic texture spaces with the key names and layout of the real files.

`FLAME_texture.npz` (TextureSpace.zip): `mean [H,W,3]` and `tex_dir [H,W,3,K]`
with values in 0..255 (BGR, as released), UVs `vt [N,2]` in 0..1 and
`ft [F,3]` indices into `vt`. The real file has H = W = 512 and K = 200.
`FLAME_albedo_from_BFM.npz` (DECA): `MU [1, H*W*3]`, `PC [H*W*3, K]` in 0..1.
`write_synthetic_texture` holds random values (enough for loaders and shape
checks, not a face); `write_synthetic_texture_for_mesh` builds UVs and smooth
textures for a given mesh, and `render_textured_sequence` renders such a head
with known parameters (for the photometric synthesis tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez would append '.npz' to a name
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def write_synthetic_texture(path: Path, size: int = 64, n_comp: int = 8, n_uv: int = 300,
                            n_faces: int = 500, seed: int = 0) -> Path:
    """Write a FLAME_texture.npz stand-in (keys mean, tex_dir, vt, ft) to `path`."""
    rng = np.random.default_rng(seed)
    mean = rng.uniform(60.0, 200.0, size=(size, size, 3)).astype(np.float32)
    tex_dir = rng.normal(0.0, 10.0, size=(size, size, 3, n_comp)).astype(np.float32)
    vt = rng.uniform(0.0, 1.0, size=(n_uv, 2))
    ft = rng.integers(0, n_uv, size=(n_faces, 3), dtype=np.int64)
    return _save_npz_atomic(path, mean=mean, tex_dir=tex_dir, vt=vt, ft=ft)


def write_synthetic_bfm_albedo(path: Path, size: int = 64, n_comp: int = 8, seed: int = 0) -> Path:
    """Write a FLAME_albedo_from_BFM.npz stand-in (keys MU, PC) to `path`."""
    rng = np.random.default_rng(seed)
    n = size * size * 3
    mu = rng.uniform(0.2, 0.8, size=(1, n)).astype(np.float32)
    pc = rng.normal(0.0, 0.05, size=(n, n_comp)).astype(np.float32)
    return _save_npz_atomic(path, MU=mu, PC=pc)


def cylindrical_uvs(vertices: np.ndarray) -> np.ndarray:
    """Per-vertex UVs [V,2] in 0..1 from a cylindrical projection about FLAME's
    y axis: u from the angle around the head (0.5 = facing +z, the face),
    v from the height (bottom 0, top 1). The seam (u = 0 / 1) lies at the back
    of the head, where a frontal camera does not look."""
    v = np.asarray(vertices, dtype=np.float64)
    centre = 0.5 * (v.min(0) + v.max(0))
    d = v - centre
    u = np.arctan2(d[:, 0], d[:, 2]) / (2 * np.pi) + 0.5
    height = (d[:, 1] - d[:, 1].min()) / max(np.ptp(d[:, 1]), 1e-12)
    return np.stack([u, 0.05 + 0.9 * height], axis=1)


def _smooth_field(rng: np.random.Generator, size: int, n_waves: int, max_freq: float) -> np.ndarray:
    """A smooth random field [size,size] in about -1..1 (sum of plane waves)."""
    y, x = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    field = np.zeros((size, size))
    for _ in range(n_waves):
        fx, fy = rng.uniform(-max_freq, max_freq, size=2)
        field += np.cos(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
    return field / np.sqrt(n_waves)


def write_synthetic_texture_for_mesh(path: Path, vertices: np.ndarray, faces: np.ndarray, size: int = 64,
                                     n_comp: int = 8, seed: int = 0) -> Path:
    """Write a FLAME_texture.npz stand-in whose UVs fit a given mesh.

    vt = `cylindrical_uvs(vertices)` (one UV per vertex) and ft = `faces`, so a
    mesh with this topology is textured without seams on its front. The mean is
    a skin-like colour with smooth darker and lighter patches (structure for a
    photometric fit to lock on to); tex_dir holds `n_comp` smooth random
    fields. Layout as the real file: values 0..255, channels BGR, image row 0
    at v = 1 (the UV v axis points up, rows down).
    """
    rng = np.random.default_rng(seed)
    skin_rgb = np.array([190.0, 140.0, 115.0])
    pattern = _smooth_field(rng, size, 6, 6.0)
    mean_rgb = skin_rgb * (1.0 + 0.25 * pattern[..., None]) + 12.0 * np.stack(
        [_smooth_field(rng, size, 4, 4.0) for _ in range(3)], -1)
    mean_rgb = np.clip(mean_rgb, 10.0, 245.0)
    dirs_rgb = np.stack([np.stack([_smooth_field(rng, size, 3, 3.0) for _ in range(3)], -1)
                         for _ in range(n_comp)], -1) * 12.0  # [size,size,3,K]
    mean = mean_rgb[..., ::-1].astype(np.float32)  # BGR as released
    tex_dir = dirs_rgb[:, :, ::-1, :].astype(np.float32)
    vt = cylindrical_uvs(vertices)
    ft = np.asarray(faces, dtype=np.int64)
    return _save_npz_atomic(path, mean=mean, tex_dir=tex_dir, vt=vt, ft=ft)


@dataclass
class TexturedSequence:
    """Frames of a textured synthetic head with known parameters.

    frames: [T,H,W,3] uint8 RGB renders over a striped background;
    params: the true FrameParams; texture [K] and lighting [9,3] the true
    appearance; focal [2], principal_point [2] pixels; lmk68 [T,68,2] the true
    landmarks (pixels); region_vertices [V'] indices of the face-region
    vertices (for vertex errors).
    """

    frames: np.ndarray
    params: object
    texture: np.ndarray
    lighting: np.ndarray
    focal: np.ndarray
    principal_point: np.ndarray
    lmk68: np.ndarray
    region_vertices: np.ndarray


def render_textured_sequence(flame, texture_space, T: int = 4, size: int = 64, seed: int = 0,
                             n_expression: int = 10) -> TexturedSequence:
    """Render T frames of `flame` (a FLAME model) textured by `texture_space`
    (`lightning_ft.synthesis.TextureSpace` with UVs for its faces) with random
    head rotations (about 7 degrees), expressions (first `n_expression`
    components, unit scale), jaw opening and texture coefficients, under a
    fixed SH light, with the synthesis renderer; the face spans about 60 % of
    the image."""
    import torch

    from ..lbs import batch_rodrigues
    from ..cameras import frontal_rotation, project_points
    from ..fitter import FrameParams, head_rotation_flame
    from ..synthesis import face_region_mask, render_appearance

    rng = np.random.default_rng(seed)
    E = flame.n_exp
    focal = np.array([2.0 * size, 2.0 * size], np.float32)
    pp = np.array([(size - 1) / 2, (size - 1) / 2], np.float32)
    z0 = focal[0] * 0.16 / (0.6 * size)
    f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    R = batch_rodrigues(f32(rng.normal(0, 0.12, (T, 3))))
    R = frontal_rotation(R) @ R
    centre = flame.v_template.mean(0)
    t = f32(np.c_[rng.normal(0, 0.005, (T, 2)), np.full(T, z0)]) - torch.einsum("tij,j->ti", R, centre)
    expression = f32(rng.normal(0, 1.0, (T, E)) * (np.arange(E) < n_expression))
    jaw = torch.zeros(T, 3)
    jaw[:, 0] = f32(rng.uniform(0.0, 0.15, T))
    params = FrameParams(R, t, expression, jaw, torch.zeros(T, 6), torch.zeros(flame.n_shape))
    texture = f32(rng.normal(0, 1, texture_space.n_components))
    lighting = torch.zeros(9, 3)
    lighting[0] = f32([2.8, 2.7, 2.6])
    lighting[1:4] = f32([0.3, -0.4, 0.5])[:, None]
    region = face_region_mask(flame)
    with torch.no_grad():
        out = flame(shape=params.shape.expand(T, -1), expression=expression, jaw_pose=jaw, eye_pose=params.eyes)
        verts = torch.einsum("tij,tvj->tvi", R, out.vertices) + t[:, None]
        lmk = flame.landmarks68(out.vertices, head_rotation_flame(R))
        lmk_px = project_points(torch.einsum("tij,tvj->tvi", R, lmk) + t[:, None], f32(focal), f32(pp))
        r = render_appearance(verts, flame.faces, texture_space.face_uvs(),
                              texture_space.albedo(texture).clamp(0, 1), lighting.expand(T, 9, 3),
                              f32(focal), f32(pp), (size, size), region)
        x = torch.arange(size, dtype=torch.float32)
        stripes = 0.35 + 0.25 * torch.sin(x / 3.0)[None, :, None] * f32([1.0, 0.6, 0.3])
        frames = r.composite(stripes.expand(T, size, size, 3))
    frames = (frames.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return TexturedSequence(frames=frames, params=params, texture=texture.numpy(), lighting=lighting.numpy(),
                            focal=focal, principal_point=pp, lmk68=lmk_px.numpy(),
                            region_vertices=flame.faces[region].unique().numpy())


def perturb_params(p, seed: int):
    """Known parameters `p` (FrameParams) disturbed as a landmark fit might
    leave them: ~2.5 deg rotation, 3 mm translation, the first 10 expression
    components and the jaw opening; for synthesis recovery tests."""
    import torch

    from ..lbs import batch_rodrigues
    from ..fitter import FrameParams

    rng = np.random.default_rng(seed)
    T, E = p.expression.shape
    f32 = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return FrameParams(batch_rodrigues(f32(rng.normal(0, np.deg2rad(2.5), (T, 3)))) @ p.rotation,
                       p.translation + f32(rng.normal(0, 0.003, (T, 3))),
                       p.expression + f32(rng.normal(0, 0.7, (T, E)) * (np.arange(E) < 10)),
                       p.jaw + f32(np.c_[rng.normal(0, 0.05, T), np.zeros((T, 2))]), p.eyes, p.shape)


def recovery_errors(flame, p, truth, region_vertices, focal):
    """Mean rotation error (degrees), mean face-region vertex error (mm) and
    its image-plane part (pixels: what the photometric term sees; depth is
    weakly observable through perspective only) of `p` against `truth`."""
    import torch

    dR = p.rotation.transpose(1, 2) @ truth.rotation
    angle = torch.rad2deg(torch.acos(((dR.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)))

    def cam(q):
        out = flame(shape=q.shape.expand(len(q.rotation), -1), expression=q.expression, jaw_pose=q.jaw)
        return torch.einsum("tij,tvj->tvi", q.rotation, out.vertices) + q.translation[:, None]

    with torch.no_grad():
        a, b = cam(p)[:, region_vertices], cam(truth)[:, region_vertices]
        d = (a - b).norm(dim=-1).mean() * 1000
        px = (a[..., :2] / a[..., 2:] - b[..., :2] / b[..., 2:]).norm(dim=-1).mean() * float(np.mean(focal))
    return float(angle.mean()), float(d), float(px)
