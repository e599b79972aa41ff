"""Photometric refinement (`--synthesis`): texture, lighting and a render-and-compare fit.

Starting from the landmark fit, FLAME is rendered with a PCA albedo (FLAME's
texture space) under 9-coefficient spherical-harmonics lighting and compared
with the frames inside a face-region mask, which corrects what landmarks do
not constrain (cheek and jaw outline, subtle expressions).

Appearance model
----------------
- Albedo: ``mean + sum_k c_k basis_k`` in FLAME's UV layout, RGB in 0..1, one
  coefficient vector per video (`TextureSpace`).
- Lighting: DECA's SH irradiance (`render.sh_shading`, OpenCV camera normals),
  colour = albedo * shading; coefficients [9,3] per video or per frame.
- Face region (`face_region_mask`): FLAME has a released `FLAME_masks.pkl`,
  but it is not among the required assets, so the region is built from what
  the tracker has: template vertices that face forward (normal z > 0.3 in
  FLAME space), lie between the chin and a little above the brows, and
  between the two ends of the jaw contour (frontal 68-point landmarks on the
  template); eyeballs (vertices skinned to the eye joints) are excluded. This
  drops hair, ears, neck, the back of the head and the eyes, whose appearance
  the texture space does not model.

Fitting
-------
Camera as in `cameras`: p = R X + t (OpenCV), u = fx x/z + cx, pixel centres
at integer coordinates; crops are downscaled to `SynthesisConfig.image_size`
(focal and principal point follow). The rendered face is composited over the
frame, ``pred = colour * a + (1 - a) * frame`` with `a` the antialiased
coverage of the face region, so the loss is the frame's own difference
outside the face and silhouette gradients (`render.antialias`) move the
cheek and jaw outline towards the image edge.

Two stages, both with Adam:
1. appearance: texture, lighting (one per frame in 'per_frame' mode) and
   the geometry of up to `appearance_frames` evenly spaced frames, jointly;
2. tracking: all valid frames in batches of `batch_size` (every frame of a
   batch at once), pose, expression and jaw (and per-frame lighting, starting
   from stage 1's average) with the texture fixed; photometric + landmark
   terms + small priors. Frames are independent given the texture (Adam's
   statistics are per element), so batching does not change the result.
The refined track is then smoothed (`smoothing.smooth_track`).

Lighting per frame is the default: on synthetic renders
(`benchmarks/bench_synthesis.py`, 64 px, landmark term off) with one light
both modes recover the geometry about equally (image-plane vertex error
1.59 px -> 0.105 px per video, 0.090 px per frame; rotation 3.8 -> 1.6 and
1.9 degrees), but with a light that turns over the clip per-video lighting
makes the fit worse than its start (2.1 px, 8.7 degrees) while per-frame
lighting still improves it (0.33 px, 3.0 degrees). Real videos change
exposure and white balance, so the robust choice wins.

Why Adam and not Gauss-Newton as in the landmark fit: the photometric
residual has one row per pixel and channel, a dense Jacobian through the
rasterizer would be [pixels x params] per frame and its curvature is only
valid within a pixel or so (texture edges, silhouettes); first-order steps
with per-parameter step sizes (Adam) handle the mixed units (radians,
metres, PCA units) and the non-smooth terms robustly, as DECA-style and
metrical-tracker-style photometric trackers do.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import AssetError, UsageError
from .flame import FLAME
from .lbs import batch_rodrigues
from .fitter import FrameParams
from .cameras import project_screen
from .posing import pose_in_camera
from .progress import progress as progress_bar
from .render import antialias, face_adjacency, rasterize, sh_shading, vertex_normals
from .smoothing import SmoothingConfig, smooth_track
from .track import Camera, Track

__all__ = [
    "TextureSpace",
    "load_texture_space",
    "read_obj_uvs",
    "face_region_mask",
    "SynthesisConfig",
    "SynthesisResult",
    "AlbedoTexture",
    "Rendering",
    "render_appearance",
    "refine",
]

log = logging.getLogger(__name__)

Frames = Union[Callable[[int], np.ndarray], Sequence[np.ndarray]]

# Landmark indices of the 68-point jaw contour (iBUG 0..16).
_CONTOUR = slice(0, 17)


# ----------------------------------------------------------------------------
# Texture space


@dataclass
class TextureSpace:
    """A linear albedo model in FLAME's UV layout.

    mean: [3,Ht,Wt] RGB albedo in 0..1, texture row 0 at the top (v = 1).
    basis: [K,3,Ht,Wt] RGB albedo change per unit coefficient.
    vt: [N,2] UV coordinates in 0..1 (u right, v up, as in OBJ files).
    ft: [F,3] indices into `vt` per mesh face (same face order as FLAME's `f`).
    source: 'FLAME_texture' or 'BFM'; path: the file read.
    """

    mean: torch.Tensor
    basis: torch.Tensor
    vt: torch.Tensor
    ft: torch.Tensor
    source: str
    path: Optional[Path] = None

    @property
    def n_components(self) -> int:
        return int(self.basis.shape[0])

    def face_uvs(self) -> torch.Tensor:
        """[F,3,2] UVs of every face corner."""
        return self.vt[self.ft]

    def albedo(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Albedo textures [B,3,Ht,Wt] for coefficients [B,K] (or [K] -> B = 1)."""
        if coeffs.dim() == 1:
            coeffs = coeffs[None]
        K = coeffs.shape[1]
        flat = self.basis[:K].reshape(K, -1)
        return (self.mean.reshape(1, -1) + coeffs @ flat).view(-1, *self.mean.shape)

    def resized(self, size: int) -> "TextureSpace":
        """The same space with textures resampled to size x size (antialiased)."""
        if self.mean.shape[-1] == size and self.mean.shape[-2] == size:
            return self
        rs = lambda a: F.interpolate(a, size=(size, size), mode="bilinear", align_corners=False,  # noqa: E731
                                     antialias=True)
        return TextureSpace(mean=rs(self.mean[None])[0], basis=rs(self.basis), vt=self.vt, ft=self.ft,
                            source=self.source, path=self.path)

    def to(self, device) -> "TextureSpace":
        return TextureSpace(self.mean.to(device), self.basis.to(device), self.vt.to(device),
                            self.ft.to(device), self.source, self.path)


def read_obj_uvs(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """UVs `vt [N,2]` and per-face UV indices `ft [F,3]` (0-based) of an OBJ
    file whose faces are written `f v/vt ...` (e.g. FLAME's head_template_mesh.obj)."""
    path = Path(path)
    if not path.exists():
        raise AssetError(f"{path}: not found; it comes with FLAME_embedding.zip (head_template_mesh.obj)")
    vt, ft = [], []
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("vt "):
                vt.append([float(x) for x in line.split()[1:3]])
            elif line.startswith("f "):
                corners = line.split()[1:]
                if len(corners) != 3 or any("/" not in c or not c.split("/")[1] for c in corners):
                    raise AssetError(f"{path}: faces must be triangles written 'f v/vt v/vt v/vt'; "
                                     f"got {line.strip()!r}")
                ft.append([int(c.split("/")[1]) - 1 for c in corners])
    if not vt or not ft:
        raise AssetError(f"{path}: no 'vt' lines or no faces; use FLAME's head_template_mesh.obj")
    return np.asarray(vt, dtype=np.float64), np.asarray(ft, dtype=np.int64)


def load_texture_space(path: Path, n_components: Optional[int] = None,
                       uv_obj: Optional[Path] = None) -> TextureSpace:
    """Read FLAME_texture.npz (`mean [H,W,3]`, `tex_dir [H,W,3,K]`, 0..255, BGR,
    with `vt`, `ft`) or DECA's FLAME_albedo_from_BFM.npz (`MU [1,H*W*3]`,
    `PC [H*W*3,K]`, 0..1, BGR, pixel-major like the former).

    The BFM file stores no UVs: it is laid out in FLAME's UV map, whose
    coordinates come from FLAME's `head_template_mesh.obj` (pass `uv_obj`; DECA
    reads the same OBJ). `uv_obj` also overrides the npz's own vt/ft.
    n_components: keep the first K components (all when None).
    Returns RGB albedo in 0..1 (`TextureSpace`).
    """
    path = Path(path)
    if not path.exists():
        raise AssetError(f"{path}: texture space not found; put FLAME_texture.npz (FLAME's TextureSpace.zip) "
                         f"into assets/FLAME/ or run without --synthesis")
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise AssetError(f"{path}: not a readable .npz texture space ({e}); download it again") from None
    try:
        if {"mean", "tex_dir"} <= keys:
            mean = np.asarray(data["mean"], dtype=np.float32)
            tex_dir = np.asarray(data["tex_dir"])
            if mean.ndim != 3 or mean.shape[2] != 3 or tex_dir.shape[:3] != mean.shape or tex_dir.ndim != 4:
                raise AssetError(f"{path}: expected mean [H,W,3] and tex_dir [H,W,3,K], got "
                                 f"{mean.shape} and {tex_dir.shape}; the file is damaged")
            K = tex_dir.shape[3] if n_components is None else min(n_components, tex_dir.shape[3])
            mean_hw3 = mean / 255.0
            basis_hw3k = np.asarray(tex_dir[..., :K], dtype=np.float32) / 255.0
            source = "FLAME_texture"
        elif {"MU", "PC"} <= keys:
            mu = np.asarray(data["MU"], dtype=np.float32).reshape(-1)
            pc = np.asarray(data["PC"])
            side = int(round(math.sqrt(mu.size / 3)))
            if side * side * 3 != mu.size or pc.ndim != 2 or pc.shape[0] != mu.size:
                raise AssetError(f"{path}: expected MU [1,H*W*3] of a square texture and PC [H*W*3,K], got "
                                 f"{data['MU'].shape} and {pc.shape}; the file is damaged")
            K = pc.shape[1] if n_components is None else min(n_components, pc.shape[1])
            mean_hw3 = mu.reshape(side, side, 3)
            basis_hw3k = np.asarray(pc[:, :K], dtype=np.float32).reshape(side, side, 3, K)
            source = "BFM"
        else:
            raise AssetError(f"{path}: neither a FLAME texture space (mean, tex_dir) nor a BFM albedo "
                             f"(MU, PC); keys are {sorted(keys)}")
        if uv_obj is not None:
            vt, ft = read_obj_uvs(uv_obj)
        elif {"vt", "ft"} <= keys:
            vt, ft = np.asarray(data["vt"], dtype=np.float64), np.asarray(data["ft"], dtype=np.int64)
        else:
            raise AssetError(f"{path}: has no UV coordinates (vt, ft); pass FLAME's head_template_mesh.obj "
                             f"(from FLAME_embedding.zip) as the UV source")
    finally:
        data.close()
    if vt.ndim != 2 or vt.shape[1] < 2 or ft.ndim != 2 or ft.shape[1] != 3:
        raise AssetError(f"{path}: expected vt [N,2] and ft [F,3], got {vt.shape} and {ft.shape}")
    if ft.size and (ft.min() < 0 or ft.max() >= vt.shape[0]):
        raise AssetError(f"{path}: ft refers to UVs beyond the {vt.shape[0]} in vt; the file is damaged")
    # BGR as released -> RGB; [H,W,3(,K)] -> channels first.
    mean_t = torch.from_numpy(np.ascontiguousarray(mean_hw3[..., ::-1].transpose(2, 0, 1)))
    basis_t = torch.from_numpy(np.ascontiguousarray(basis_hw3k[:, :, ::-1, :].transpose(3, 2, 0, 1)))
    return TextureSpace(mean=mean_t.float(), basis=basis_t.float(),
                        vt=torch.as_tensor(vt[:, :2], dtype=torch.float32),
                        ft=torch.as_tensor(ft, dtype=torch.long), source=source, path=path)


# ----------------------------------------------------------------------------
# Face region


def face_region_mask(flame: FLAME, normal_z_min: float = 0.3, brow_margin: float = 0.15,
                     chin_margin: float = 0.03) -> torch.Tensor:
    """[F] bool: faces of the photometric face region (see the module docstring).

    On the neutral template (FLAME space: y up, +z out of the face) a vertex
    is in the region when its normal's z exceeds `normal_z_min`, its height
    lies between the chin (contour point 8) minus `chin_margin` and the
    highest brow point plus `brow_margin`, both times the chin-to-brow height,
    and its x lies between the two ends of the frontal jaw contour; vertices
    skinned to an eye joint (weight > 0.5) are out. A face is in the region
    when all three of its vertices are.
    """
    with torch.no_grad():
        v = flame.v_template[None]
        faces = flame.faces
        normals = vertex_normals(v, faces)[0]
        lmk = flame.landmarks68(v, torch.eye(3, dtype=v.dtype, device=v.device)[None])[0]
        contour = lmk[_CONTOUR]
        brow_top = lmk[17:27, 1].max()
        chin = contour[8, 1]
        height = brow_top - chin
        x = v[0, :, 0]
        y = v[0, :, 1]
        keep = normals[:, 2] > normal_z_min
        keep &= (y <= brow_top + brow_margin * height) & (y >= chin - chin_margin * height)
        keep &= (x >= contour[:, 0].min()) & (x <= contour[:, 0].max())
        keep &= flame.weights[:, 3:5].sum(1) <= 0.5
        return keep[faces].all(1)


# ----------------------------------------------------------------------------
# Rendering


@dataclass
class Rendering:
    """colour: [B,H,W,3] RGB 0..1, the face region's colour times its coverage
    (zero elsewhere); coverage: [B,H,W] antialiased coverage of the face
    region in 0..1; region: [B,H,W] bool, pixel centres inside the region."""

    colour: torch.Tensor
    coverage: torch.Tensor
    region: torch.Tensor

    def composite(self, frames: torch.Tensor) -> torch.Tensor:
        """The rendering over `frames` [B,H,W,3]: colour + (1 - coverage) * frames."""
        return self.colour + (1.0 - self.coverage[..., None]) * frames


def _pixel_sh(normals: torch.Tensor, sh_coeffs: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """SH shading [N,3] of pixel normals [N,3] (OpenCV camera) lit by their frame's sh_coeffs [B,9,3]."""
    B = sh_coeffs.shape[0]
    if B == 1:
        return sh_shading(normals[None], sh_coeffs)[0]
    # group pixels by frame: the covered pixels are in ascending flat order, so frames are contiguous
    counts = torch.bincount(batch, minlength=B).tolist()
    parts = [sh_shading(n[None], sh_coeffs[b:b + 1])[0] for b, n in enumerate(torch.split(normals, counts))]
    return torch.cat(parts)


def render_appearance(vertices_cam: torch.Tensor, faces: torch.Tensor, face_uvs: torch.Tensor,
                      albedo_texture: torch.Tensor, sh_coeffs: torch.Tensor, focal: torch.Tensor,
                      principal_point: torch.Tensor, image_size: Tuple[int, int], region_faces: torch.Tensor,
                      adjacency: Optional[torch.Tensor] = None) -> Rendering:
    """Render the textured, SH-lit face region of B meshes.

    vertices_cam: [B,V,3] OpenCV camera space (meters); faces [F,3];
    face_uvs [F,3,2]; albedo_texture [1,3,Ht,Wt] (shared) or [B,3,Ht,Wt], RGB
    0..1; sh_coeffs [B,9,3] (DECA convention); focal [2], principal_point [2]
    pixels; image_size (H, W); region_faces [F] bool (`face_region_mask`).
    The whole mesh is rasterized (so hair or ears in front hide the face);
    only region pixels are shaded. Differentiable w.r.t. vertices, albedo and
    lighting, with silhouette gradients.
    """
    B = vertices_cam.shape[0]
    H, W = image_size
    screen = project_screen(vertices_cam, focal=focal, principal_point=principal_point)
    fragments = rasterize(screen, faces, (H, W))
    faces = faces.to(device=vertices_cam.device, dtype=torch.long)
    # Shade only the covered pixels (a face crop leaves much of the image to
    # the background): per pixel its batch, face and barycentrics.
    sel = fragments.covered
    if sel is None:
        sel = torch.nonzero(fragments.face_idx.reshape(-1) >= 0).squeeze(1)
    batch = torch.div(sel, H * W, rounding_mode="floor")
    face = fragments.face_idx.reshape(-1).index_select(0, sel)
    bary = fragments.bary.reshape(-1, 3).index_select(0, sel)  # [N,3], differentiable
    V = vertices_cam.shape[1]
    corners = (faces.index_select(0, face) + (batch * V)[:, None]).reshape(-1)

    def at_pixels(per_vertex: torch.Tensor) -> torch.Tensor:  # [B,V,C] -> [N,C]
        values = per_vertex.reshape(B * V, -1).index_select(0, corners).view(-1, 3, per_vertex.shape[-1])
        return (bary[..., None] * values).sum(1)

    normals = F.normalize(at_pixels(vertex_normals(vertices_cam, faces)), dim=-1, eps=1e-12)
    shading = _pixel_sh(normals, sh_coeffs, batch)
    uv_corner = face_uvs.to(vertices_cam.dtype).index_select(0, face)  # [N,3,2]
    uv = (bary[..., None] * uv_corner).sum(1)
    grid = torch.stack([uv[:, 0] * 2 - 1, 1 - uv[:, 1] * 2], dim=-1)
    if albedo_texture.shape[0] == 1:
        albedo = F.grid_sample(albedo_texture, grid.view(1, -1, 1, 2), mode="bilinear",
                               padding_mode="border", align_corners=False)[0, :, :, 0].T  # [N,3]
    else:
        # per-frame textures: sample each frame's pixels from its own texture
        albedo = torch.zeros(len(sel), 3, dtype=grid.dtype, device=grid.device)
        for b in range(B):
            m = batch == b
            albedo[m] = F.grid_sample(albedo_texture[b:b + 1], grid[m].view(1, -1, 1, 2), mode="bilinear",
                                      padding_mode="border", align_corners=False)[0, :, :, 0].T
    in_region = region_faces.to(face.device).index_select(0, face)
    # a camera saturates: clamping keeps over-bright pixels from pulling the fit
    values = torch.cat([(albedo * shading).clamp(0.0, 1.0), torch.ones_like(albedo[:, :1])], dim=-1)
    values = values * in_region[:, None].to(values.dtype)
    dense = torch.zeros(B * H * W, 4, dtype=values.dtype, device=values.device).index_put((sel,), values)
    region = torch.zeros(B * H * W, dtype=torch.bool, device=values.device).index_put(
        (sel,), in_region).view(B, H, W)
    dense = dense.view(B, H, W, 4)
    blended = antialias(dense, fragments, screen, faces, adjacency)
    return Rendering(colour=blended[..., :3], coverage=blended[..., 3], region=region)


# ----------------------------------------------------------------------------
# Configuration and result


@dataclass
class SynthesisConfig:
    """Settings of the photometric refinement.

    image_size: longest side (pixels) the crops are downscaled to for the fit.
    iterations: Adam steps per batch of frames (stage 2); appearance_iterations
        and appearance_frames: stage 1 (texture and lighting).
    lr_*: Adam step sizes (rotation rad, translation m, expression and texture
        in PCA units, jaw rad, lighting SH units); decayed by a cosine to
        `lr_final_fraction` of their value.
    w_photometric: weight of the mean absolute RGB error (0..1) in the region.
    w_landmark: weight of the mean squared 68-landmark error in units of the
        fit image's longest side; w_contour scales the jaw contour's share
        (the photometric term should place the outline).
    w_expression, w_jaw, w_texture: Gaussian priors (mean of squares).
    w_lighting_change: per-frame lighting only: prior on each frame's SH
        coefficients' squared distance from the video's (stage 1) average.
        Off by default: 0.05 did not help with one light and doubled the
        error under a changing light (bench_synthesis.py).
    lighting: 'per_frame' ([T,9,3]; invalid frames get the average) or
        'per_video' (one [9,3]); see the module docstring for the measurement.
    n_texture: texture components used; texture_size: side the texture is
        resampled to (DECA renders at 256).
    smoothing: noise models for the final `smooth_track`; None skips it.
    """

    image_size: int = 256
    batch_size: int = 16
    iterations: int = 40
    appearance_iterations: int = 80
    appearance_frames: int = 8
    lr_rotation: float = 0.008
    lr_translation: float = 0.0016
    lr_expression: float = 0.08
    lr_jaw: float = 0.008
    lr_texture: float = 0.08
    lr_lighting: float = 0.02
    lr_final_fraction: float = 0.1
    w_photometric: float = 1.0
    w_landmark: float = 20.0
    w_contour: float = 0.2
    w_expression: float = 1e-4
    w_jaw: float = 1e-3
    w_texture: float = 1e-4
    w_lighting_change: float = 0.0
    lighting: str = "per_frame"
    n_texture: int = 50
    texture_size: int = 256
    smoothing: Optional[SmoothingConfig] = field(default_factory=SmoothingConfig)


@dataclass
class AlbedoTexture:
    """Synthesis's fitted albedo, for the -v video.

    image: [Ht,Wt,3] float32 RGB in 0..1 in FLAME's UV layout (row 0 at v = 1),
    at the texture space's own resolution; face_uvs: [F,3,2] UVs of every
    face corner, FLAME's face order."""

    image: np.ndarray
    face_uvs: np.ndarray


@dataclass
class SynthesisResult:
    """track: the input track with its pose, expression and jaw refined (and
    smoothed) for all T frames (invalid frames interpolated by the smoother,
    or unchanged without smoothing).
    texture: [n_tex] per-video albedo coefficients. lighting: [T,9,3]
    ('per_frame') or [9,3] ('per_video') SH coefficients (DECA convention,
    RGB albedo 0..1). photometric_error_before / _after: mean absolute RGB
    error (0..1) over face-region pixels of the valid frames, with the
    landmark parameters and with the result (both with the fitted texture
    and lighting). photometric_error_per_frame: [T] after, NaN on invalid
    frames. seconds: wall time."""

    track: Track
    texture: np.ndarray
    lighting: np.ndarray
    photometric_error_before: float
    photometric_error_after: float
    photometric_error_per_frame: np.ndarray
    seconds: float
    image_size: Tuple[int, int] = (0, 0)
    lighting_mode: str = "per_video"


# ----------------------------------------------------------------------------
# Fitting


def _get_frame(frames: Frames, i: int) -> np.ndarray:
    return frames(i) if callable(frames) else frames[i]


def _load_batch(frames: Frames, idx: Sequence[int], size: Tuple[int, int], device) -> torch.Tensor:
    """Frames idx as [B,H,W,3] float RGB 0..1 at the fit size (antialiased resize)."""
    imgs = []
    for i in idx:
        a = np.asarray(_get_frame(frames, int(i)))
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise UsageError(f"synthesis: frame {i} must be an RGB uint8 image [H,W,3], got "
                             f"{a.dtype} {a.shape}")
        if imgs and a.shape != tuple(imgs[0].shape):
            raise UsageError(f"synthesis: frame {i} is {a.shape[:2]}, the others {tuple(imgs[0].shape[:2])}; "
                             f"all crops of a video must have one size")
        imgs.append(torch.from_numpy(np.ascontiguousarray(a)))
    x = torch.stack(imgs).to(device).permute(0, 3, 1, 2).float() / 255.0
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1).contiguous()


class _Scene:
    """Everything fixed during a fit: model, topology, camera at the fit size."""

    def __init__(self, flame: FLAME, tex: TextureSpace, focal: torch.Tensor, pp: torch.Tensor,
                 size: Tuple[int, int], scale: Tuple[float, float], cfg: SynthesisConfig):
        self.flame, self.tex, self.cfg = flame, tex, cfg
        self.faces = flame.faces
        self.face_uvs = tex.face_uvs()
        self.region = face_region_mask(flame)
        self.adjacency = face_adjacency(self.faces)
        self.size = size
        s = focal.new_tensor(scale)
        # pixel centres at integers: u' = (u + 0.5) s - 0.5
        self.scale = s
        self.focal = focal * s
        self.pp = (pp + 0.5) * s - 0.5
        self.norm = float(max(size))
        w = torch.ones(68, device=focal.device)
        w[_CONTOUR] = cfg.w_contour
        self.lmk_weight = w

    def to_fit_pixels(self, lmk: torch.Tensor) -> torch.Tensor:
        return (lmk + 0.5) * self.scale - 0.5

    def geometry(self, R: torch.Tensor, t: torch.Tensor, expression: torch.Tensor, jaw: torch.Tensor,
                 eyes: torch.Tensor, shape: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Camera-space vertices [B,V,3] and projected 68 landmarks [B,68,2] (fit pixels)."""
        return pose_in_camera(self.flame, FrameParams(R, t, expression, jaw, eyes, shape), self.focal, self.pp)

    def losses(self, verts, lmk_px, albedo_texture, sh, images, lmk_target):
        """Per-frame photometric (composited L1) and landmark losses [B], and the rendering."""
        r = render_appearance(verts, self.faces, self.face_uvs, albedo_texture, sh, self.focal, self.pp,
                              self.size, self.region, self.adjacency)
        diff = (r.composite(images) - images).abs().sum(dim=(1, 2, 3))
        # a constant normaliser: dividing by the live area would reward growing the face region
        photo = diff / (3.0 * r.coverage.detach().sum(dim=(1, 2)).clamp(min=1.0))
        ok = torch.isfinite(lmk_target).all(-1)
        d = torch.where(ok[..., None], lmk_px - torch.nan_to_num(lmk_target), torch.zeros_like(lmk_px))
        w = self.lmk_weight * ok
        lmk = ((d / self.norm).pow(2).sum(-1) * w).sum(-1) / w.sum(-1).clamp(min=1.0)
        return photo, lmk, r


def _region_error(r: Rendering, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean abs RGB error [B] over region pixel centres (hard mask, no blending)
    and the number of those pixels [B]."""
    m = r.region.to(images.dtype)
    colour = r.colour / r.coverage.clamp(min=1e-6)[..., None]  # un-premultiply (blending only at edges)
    err = ((colour - images).abs().mean(-1) * m).sum(dim=(1, 2))
    return err / m.sum(dim=(1, 2)).clamp(min=1.0), m.sum(dim=(1, 2))


def _cosine(step: int, n: int, final: float) -> float:
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * step / max(n - 1, 1)))


def _initial_lighting(scene: _Scene, verts, albedo_texture, images) -> torch.Tensor:
    """SH [9,3] with only the constant band set so that the mean rendered
    colour of the region matches the frames' mean colour there."""
    with torch.no_grad():
        sh = torch.zeros(verts.shape[0], 9, 3, device=verts.device)
        sh[:, 0] = 1.0
        r = render_appearance(verts, scene.faces, scene.face_uvs, albedo_texture, sh, scene.focal, scene.pp,
                              scene.size, scene.region, scene.adjacency)
        m = r.region[..., None].to(images.dtype)
        rendered = (r.colour * m).sum(dim=(0, 1, 2))
        observed = (images * m).sum(dim=(0, 1, 2))
        out = torch.zeros(9, 3, device=verts.device)
        out[0] = observed / rendered.clamp(min=1e-6)
        return out


def _fit_batch(scene: _Scene, init: FrameParams, images: torch.Tensor, lmk_target: torch.Tensor,
               texture: torch.Tensor, lighting: torch.Tensor, iterations: int, fit_appearance: bool,
               per_frame_light: bool):
    """Adam over one batch. lighting: [9,3] or [B,9,3]. Returns (params, texture,
    lighting, photometric error [B] at the first step)."""
    cfg = scene.cfg
    B = init.rotation.shape[0]
    dev = images.device
    rot = torch.zeros(B, 3, device=dev, requires_grad=True)
    trans = init.translation.clone().requires_grad_(True)
    expr = init.expression.clone().requires_grad_(True)
    jaw = init.jaw.clone().requires_grad_(True)
    tex = texture.clone().requires_grad_(fit_appearance)
    light = (lighting.expand(B, 9, 3) if per_frame_light and lighting.dim() == 2 else lighting).clone()
    light.requires_grad_(fit_appearance or per_frame_light)
    groups = [{"params": [rot], "lr": cfg.lr_rotation}, {"params": [trans], "lr": cfg.lr_translation},
              {"params": [expr], "lr": cfg.lr_expression}, {"params": [jaw], "lr": cfg.lr_jaw}]
    if fit_appearance:
        groups.append({"params": [tex], "lr": cfg.lr_texture})
    if light.requires_grad:
        groups.append({"params": [light], "lr": cfg.lr_lighting})
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.Adam(groups)
    R0 = init.rotation
    before = None

    def evaluate():
        R = batch_rodrigues(rot) @ R0
        verts, lmk_px = scene.geometry(R, trans, expr, jaw, init.eyes, init.shape)
        albedo = scene.tex.albedo(tex).clamp(0.0, 1.0)
        sh = light if light.dim() == 3 else light.expand(B, 9, 3)
        photo, lmk, r = scene.losses(verts, lmk_px, albedo, sh, images, lmk_target)
        return photo, lmk, r, albedo, sh, verts

    for step in range(iterations):
        photo, lmk, r, albedo, sh, verts = evaluate()
        if before is None:
            before = _region_error(r, images)[0].detach()
        prior = (cfg.w_expression * expr.pow(2).mean(-1) + cfg.w_jaw * jaw.pow(2).mean(-1))
        loss = (cfg.w_photometric * photo + cfg.w_landmark * lmk + prior).sum()
        if fit_appearance:
            loss = loss + cfg.w_texture * tex.pow(2).mean() * B
        if per_frame_light:
            ref = light.mean(0) if fit_appearance else lighting
            loss = loss + cfg.w_lighting_change * (light - ref).pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        factor = _cosine(step, iterations, cfg.lr_final_fraction)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        opt.step()
    with torch.no_grad():
        if before is None:
            before = _region_error(evaluate()[2], images)[0]
        R = batch_rodrigues(rot) @ R0
    params = FrameParams(R, trans.detach(), expr.detach(), jaw.detach(), init.eyes, init.shape)
    return params, tex.detach(), light.detach(), before


def _evaluate_errors(scene: _Scene, params: FrameParams, images: torch.Tensor, texture, lighting) -> torch.Tensor:
    with torch.no_grad():
        B = params.rotation.shape[0]
        verts, _ = scene.geometry(params.rotation, params.translation, params.expression, params.jaw,
                                  params.eyes, params.shape)
        albedo = scene.tex.albedo(texture).clamp(0.0, 1.0)
        sh = lighting if lighting.dim() == 3 else lighting.expand(B, 9, 3)
        r = render_appearance(verts, scene.faces, scene.face_uvs, albedo, sh, scene.focal, scene.pp,
                              scene.size, scene.region, scene.adjacency)
        return _region_error(r, images)


def _fit_appearance(scene: _Scene, frames: Frames, idx: np.ndarray, p_all: FrameParams, lmk_all: torch.Tensor,
                    size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: texture [n_tex] and lighting, jointly with the geometry of a
    few valid frames (`idx`) spread over the video. lighting: [9,3]; in
    per-frame mode the appearance frames' average, each frame's start."""
    cfg, dev = scene.cfg, scene.focal.device
    n_app = min(cfg.appearance_frames, len(idx))
    app_idx = idx[np.unique(np.linspace(0, len(idx) - 1, n_app).round().astype(int))]
    sel = torch.as_tensor(app_idx, device=dev)
    app_images = _load_batch(frames, app_idx, size, dev)
    app_init = p_all.select(sel)
    texture = torch.zeros(scene.tex.n_components, device=dev)
    per_frame = cfg.lighting == "per_frame"
    with torch.no_grad():
        verts, _ = scene.geometry(app_init.rotation, app_init.translation, app_init.expression, app_init.jaw,
                                  app_init.eyes, app_init.shape)
        lighting = _initial_lighting(scene, verts, scene.tex.albedo(texture).clamp(0, 1), app_images)
    _, texture, lighting, _ = _fit_batch(scene, app_init, app_images, lmk_all[sel], texture, lighting,
                                         cfg.appearance_iterations, fit_appearance=True, per_frame_light=per_frame)
    if per_frame:
        lighting = lighting.mean(0)
    return texture, lighting


def _fit_frames(scene: _Scene, frames: Frames, batches: List[np.ndarray], p_all: FrameParams,
                lmk_all: torch.Tensor, texture: torch.Tensor, lighting: torch.Tensor, size: Tuple[int, int],
                progress: Optional[bool]) -> Tuple[FrameParams, torch.Tensor, torch.Tensor]:
    """Stage 2: every valid frame, batch by batch, with the texture fixed:
    the refined params (all T frames; the others as given), per-frame
    lighting [T,9,3] (`lighting` everywhere in per-video mode) and the
    photometric error [T] at the start (NaN on frames not fitted)."""
    cfg, dev = scene.cfg, scene.focal.device
    T = p_all.rotation.shape[0]
    per_frame = cfg.lighting == "per_frame"
    refined = p_all.clone()
    light_frames = lighting.expand(T, 9, 3).clone()
    err_before = torch.full((T,), float("nan"), device=dev)
    for b in progress_bar(batches, total=len(batches), desc="synthesis", enabled=progress, unit="batch"):
        bt = torch.as_tensor(b, device=dev)
        images = _load_batch(frames, b, size, dev)
        out, _, light_b, before = _fit_batch(scene, p_all.select(bt), images, lmk_all[bt], texture,
                                             lighting, cfg.iterations, fit_appearance=False,
                                             per_frame_light=per_frame)
        for name in ("rotation", "translation", "expression", "jaw"):
            getattr(refined, name)[bt] = getattr(out, name)
        if per_frame:
            light_frames[bt] = light_b
        err_before[bt] = before
    return refined, light_frames, err_before


def refine(flame: FLAME, texture_space: TextureSpace, frames: Frames, track: Track, camera: Camera,
           cfg: SynthesisConfig = SynthesisConfig(), device: str = "cpu",
           progress: Optional[bool] = None, fps: float = 25.0,
           timestamps: Optional[np.ndarray] = None) -> SynthesisResult:
    """Refine a landmark track photometrically.

    flame: the FLAME model used for the landmark fit. texture_space: from
    `load_texture_space` (its ft must follow FLAME's face order).
    frames: T RGB uint8 crops [H,W,3] (a sequence, or a callable i -> crop).
    track: the landmark fit for all T frames; its `valid` frames are fitted,
    the others left to the smoother; its detected `lmk68` (crop pixels, NaN
    where missing) are the landmark term's targets.
    camera: the crops' camera (pixel centres at integers).
    fps / timestamps: for the final smoothing. progress: show a bar (None:
    when stderr is a terminal).
    """
    t_start = time.perf_counter()
    if cfg.lighting not in ("per_video", "per_frame"):
        raise UsageError(f"synthesis: lighting must be 'per_video' or 'per_frame', got {cfg.lighting!r}")
    valid = np.asarray(track.valid, dtype=bool)
    T = valid.shape[0]
    idx = np.flatnonzero(valid)
    if len(idx) == 0:
        raise UsageError("synthesis: no valid frame to refine")
    if texture_space.ft.shape[0] != flame.faces.shape[0]:
        raise AssetError(f"{texture_space.path}: texture UVs have {texture_space.ft.shape[0]} faces but the FLAME "
                         f"model has {flame.faces.shape[0]}; use the texture space that belongs to this model")
    dev = torch.device(device)
    flame_dev = flame if flame.v_template.device == dev else copy.deepcopy(flame).to(dev)
    tex = TextureSpace(texture_space.mean, texture_space.basis[:cfg.n_texture], texture_space.vt,
                       texture_space.ft, texture_space.source, texture_space.path)
    tex = tex.resized(cfg.texture_size).to(dev) if cfg.texture_size else tex.to(dev)

    first = np.asarray(_get_frame(frames, int(idx[0])))
    H0, W0 = first.shape[:2]
    s = min(1.0, cfg.image_size / max(H0, W0))
    size = (max(1, round(H0 * s)), max(1, round(W0 * s)))
    scale = (size[1] / W0, size[0] / H0)
    focal_t = torch.as_tensor(np.asarray(camera.focal_length, dtype=np.float32), device=dev)
    pp_t = torch.as_tensor(np.asarray(camera.principal_point, dtype=np.float32), device=dev)
    scene = _Scene(flame_dev, tex, focal_t, pp_t, size, scale, cfg)
    p_all = track.to_torch(device=dev)
    lmk_all = scene.to_fit_pixels(torch.as_tensor(np.asarray(track.lmk68, dtype=np.float32), device=dev))
    per_frame = cfg.lighting == "per_frame"
    texture, lighting = _fit_appearance(scene, frames, idx, p_all, lmk_all, size)
    batches = [idx[i:i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)]
    refined, light_frames, err_before = _fit_frames(scene, frames, batches, p_all, lmk_all, texture, lighting, size,
                                                    progress)

    # Smoothing, then the final error of what is returned.
    if cfg.smoothing is not None:
        # the eyes are not refined here: they keep the landmark track's smoothing
        smoothed = smooth_track(Track.from_torch(refined, like=track), fps, cfg.smoothing, timestamps=timestamps,
                                fields=("rotation", "translation", "expression", "jaw_pose"))
        sm = smoothed.to_torch(device=dev)
        refined = FrameParams(sm.rotation, sm.translation, sm.expression, sm.jaw, refined.eyes, refined.shape)
    err_after = torch.full((T,), float("nan"), device=dev)
    npix = torch.zeros(T, device=dev)
    for b in batches:
        bt = torch.as_tensor(b, device=dev)
        images = _load_batch(frames, b, size, dev)
        e, n = _evaluate_errors(scene, refined.select(bt), images, texture,
                                light_frames[bt] if per_frame else lighting)
        err_after[bt], npix[bt] = e, n
    vt = torch.as_tensor(idx, device=dev)
    pooled = lambda e: float((e[vt] * npix[vt]).sum() / npix[vt].sum().clamp(min=1))  # noqa: E731
    return SynthesisResult(
        track=Track.from_torch(refined, like=track),
        texture=texture.cpu().numpy(),
        lighting=(light_frames if per_frame else lighting).cpu().numpy(),
        photometric_error_before=pooled(err_before),
        photometric_error_after=pooled(err_after),
        photometric_error_per_frame=err_after.cpu().numpy(),
        seconds=time.perf_counter() - t_start,
        image_size=size,
        lighting_mode=cfg.lighting,
    )
