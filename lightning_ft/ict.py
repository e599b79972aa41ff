"""ICT-FaceKit's "ICT Face Model Light" as a built-in head model (MIT licence).

The model file `lightning_ft/data/ict/ict_face_model_light.npz` is built from an
ICT-FaceKit checkout by `tools/convert_ict.py` (attribution and what was kept:
`lightning_ft/data/ict/README.md`). It ships with the package, so this model
needs no assets folder.

Model space is ICT-FaceKit's own: OBJ coordinates divided by 100 (meters), not
re-centred; +x the subject's left, +y up, +z out of the face (as FLAME). Vertex
k of the model is OBJ vertex `kept_vertex_ids[k]`. `shape[k]` weights
`identityNNN.obj - generic_neutral_mesh.obj` (ICT samples identities from a
standard normal, so the prior is N(0, 1)); `expression[:, j]` weights
`<expression_names[j]>.obj - generic_neutral_mesh.obj` (ARKit-style weights,
meant to lie in [0, 1]). Gaze is a rigid rotation of each eyeball about its
centre: ICT's eyeLook* shapes move the lids only, not the eyeballs.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .errors import AssetError
from .flame import contour_rows, file_sha256
from .lbs import barycentric_points, batch_rodrigues

DATA_DIR = Path(__file__).resolve().parent / "data" / "ict"
SHIPPED_MODEL = DATA_DIR / "ict_face_model_light.npz"
# sha256 of the shipped file; `tools/convert_ict.py` prints it. A mismatch means a
# corrupted or hand-edited file, or a rebuild whose hash was not recorded here.
SHIPPED_SHA256 = "92f5cd9d8a1c13be3000c1eca16e3107401a7df11ad3d3024d6ccb0c01ae11b6"
FORMAT_VERSION = 1
LICENSE_NAME = "MIT (ICT-FaceKit, USC Institute for Creative Technologies, 2020)"


class Geometry(NamedTuple):
    """One row of ICT Face Model Light's geometry table (its README)."""

    name: str
    n_vertices: int
    n_polygons: int
    kept: bool


# ICT-FaceKit README, "Face Model Topology": geometries in file order. Kept: what
# tracking, the -v video and exports use; dropped: eye-shader helper meshes and
# eyelash strips (lacrimal fluid, eye blend, eye occlusion, eyelashes).
ICT_LIGHT_LAYOUT: Tuple[Geometry, ...] = (
    Geometry("face", 9409, 9230, True),
    Geometry("head_neck", 1839, 1914, True),
    Geometry("mouth_socket", 2046, 2082, True),
    Geometry("eye_socket_left", 384, 404, True),
    Geometry("eye_socket_right", 384, 404, True),
    Geometry("gums_tongue", 2977, 2972, True),
    Geometry("teeth", 4412, 4490, True),
    Geometry("eyeball_left", 1570, 1598, True),
    Geometry("eyeball_right", 1570, 1598, True),
    Geometry("lacrimal_fluid_left", 204, 163, False),
    Geometry("lacrimal_fluid_right", 204, 163, False),
    Geometry("eye_blend_left", 24, 15, False),
    Geometry("eye_blend_right", 24, 15, False),
    Geometry("eye_occlusion_left", 152, 128, False),
    Geometry("eye_occlusion_right", 152, 128, False),
    Geometry("eyelashes_left", 684, 540, False),
    Geometry("eyelashes_right", 684, 540, False),
)
# Each eyeball is its sclera's vertices first, then its iris's (README "Eyeball Details").
ICT_LIGHT_SCLERA_VERTICES = 770

# Regions exposed as vertex masks: name -> geometries.
REGIONS: Dict[str, Tuple[str, ...]] = {
    "face": ("face",),
    "head_neck": ("head_neck",),
    "eye_sockets": ("eye_socket_left", "eye_socket_right"),
    "eyeballs": ("eyeball_left", "eyeball_right"),
    "mouth_interior": ("mouth_socket", "gums_tongue", "teeth"),
}


def _check_sha256(path: Path, expected: str) -> str:
    digest = file_sha256(path)
    if digest != expected:
        raise AssetError(
            f"{path}: sha256 {digest[:12]}... does not match the recorded {expected[:12]}...; "
            "the shipped ICT model file is damaged or was rebuilt without recording its hash "
            "(reinstall lightning-ft, or run tools/convert_ict.py and update SHIPPED_SHA256)")
    return digest


def read_model_file(path: Path) -> Dict[str, np.ndarray]:
    """Arrays of an ICT model file written by tools/convert_ict.py."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise AssetError(f"{path}: ICT model file not found") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise AssetError(f"{path}: not a readable ICT model file ({exc})") from None
    required = ("format_version", "v_template", "shapedirs", "expdirs", "faces", "expression_names",
                "kept_vertex_ids", "geometry_names", "geometry_vertex_ranges", "eyeball_vertex_ranges",
                "lmk68_faces", "lmk68_bary", "dynamic_faces", "dynamic_bary")
    missing = [k for k in required if k not in arrays]
    if missing:
        raise AssetError(f"{path}: not an ICT model file, missing {', '.join(missing)}")
    if int(arrays["format_version"]) != FORMAT_VERSION:
        raise AssetError(f"{path}: ICT model format {int(arrays['format_version'])}, expected {FORMAT_VERSION}")
    return arrays


def sphere_fit(points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Least-squares sphere through points [B,N,3]: centre [B,3], radius [B].

    The algebraic fit |p|^2 = 2 p.c + k about the points' mean decouples into
    the 3x3 system (P^T P) c = sum(p |p|^2) / 2 (batched, differentiable;
    `torch.linalg.inv` of a 3x3 measured ~300x faster than `solve` on CPU).
    """
    mean = points.mean(dim=1, keepdim=True)
    p = points - mean
    sq = (p * p).sum(-1, keepdim=True)
    rhs = (p * sq).sum(1, keepdim=True).transpose(1, 2) / 2  # [B,3,1]
    centre = (torch.linalg.inv(p.transpose(1, 2) @ p) @ rhs)[..., 0]
    radius = torch.sqrt(sq.mean((1, 2)) + (centre * centre).sum(-1))
    return centre + mean[:, 0], radius


class ICT(nn.Module):
    """ICT Face Model Light: identity PCA + ARKit-style expression shapes +
    rigid eyeballs, with 68-point and mediapipe landmark embeddings.

    `ICT.load()` reads the shipped file. `ict(shape=[B,100], expression=[B,53],
    eye_pose=[B,6])` returns vertices [B,V,3] (meters, model space); omitted
    means zero. eye_pose is axis-angle (radians) of the left then the right
    eyeball, in model axes, about each eyeball's centre.

    Landmark attributes have FLAME's meaning and shapes: static_faces [51] /
    static_bary [51,3] (iBUG 17..67), dynamic_faces [R,17] / dynamic_bary
    [R,17,3] (the jaw contour per yaw row, `flame.contour_rows`), dense_faces
    [M] / dense_bary [M,3] / mediapipe_indices [M]; plus lmk68_faces [68] /
    lmk68_bary [68,3], the static 68 of ICT's README.

    Other attributes: n_shape, n_exp, expression_names [53], faces [F,3],
    v_template [V,3], shapedirs [V,3,100], expdirs [V,3,53] (views of `dirs`
    [V*3,153]), uv [T,2] / faces_uv [F,3] (ICT's texture coordinates),
    kept_vertex_ids [V] (OBJ vertex of each model vertex), region (vertex
    masks), geometry_vertex_ranges (ICT geometry -> (first, end)),
    eyeball_vertex_ids (left, right), eyeball_vertex_ranges [2,3] (first,
    first iris vertex, end), eyeball_centres [2,3] of the neutral mesh;
    name, license and sha256 for result metadata.
    """

    name = "ict"
    license = LICENSE_NAME
    # Priors, for fitters: ICT draws identity weights from N(0, 1) (its
    # sample_random.py), so shape has unit standard deviation; expression
    # weights are ARKit-style activations in [0, 1].
    shape_std = 1.0
    expression_range = (0.0, 1.0)

    def __init__(self, arrays: Dict[str, np.ndarray], path: Optional[Path] = None, sha256: str = "",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.path, self.sha256 = path, sha256
        t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)  # noqa: E731
        long = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
        v = arrays["v_template"]
        V = v.shape[0]
        shapedirs = arrays["shapedirs"].astype(np.float32)  # stored [S,V,3]
        expdirs = arrays["expdirs"].astype(np.float32)
        faces = arrays["faces"].astype(np.int64)
        if shapedirs.shape[1:] != (V, 3) or expdirs.shape[1:] != (V, 3) or faces.max() >= V or faces.min() < 0:
            raise AssetError(f"{path}: ICT model arrays disagree in their vertex count")
        self.n_shape, self.n_exp = shapedirs.shape[0], expdirs.shape[0]
        self.expression_names: List[str] = [str(s) for s in arrays["expression_names"]]
        self.kept_vertex_ids = arrays["kept_vertex_ids"].astype(np.int64)
        self.geometry_vertex_ranges = {str(n): tuple(int(x) for x in r) for n, r in
                                       zip(arrays["geometry_names"], arrays["geometry_vertex_ranges"])}
        self.register_buffer("v_template", t(v))
        # One [V*3, S+E] matrix: a forward is a single matmul, bound by reading it.
        dirs = np.concatenate([shapedirs, expdirs]).reshape(self.n_shape + self.n_exp, V * 3).T
        self.register_buffer("dirs", t(dirs))
        self.register_buffer("faces", long(faces))
        if "faces_uv" in arrays:
            self.register_buffer("faces_uv", long(arrays["faces_uv"]))
            self.register_buffer("uv", t(arrays["uv"]))
        ranges = arrays["eyeball_vertex_ranges"].astype(np.int64)  # [2 eyes, 3]: first, first iris, end
        if not (ranges[0, 2] <= ranges[1, 0] or ranges[1, 2] <= ranges[0, 0]):
            raise AssetError(f"{path}: the two eyeballs' vertex ranges overlap")
        self.eyeball_vertex_ranges = ranges
        self.eyeball_vertex_ids = tuple(np.arange(r[0], r[2]) for r in ranges)
        self._eye_slices = tuple((int(r[0]), int(r[2])) for r in ranges)
        for eye, r in zip(("left", "right"), ranges):
            # ICT's sclera mesh bulges into a cornea in front; its back half is a
            # sphere (0.6 mm spread against 2.2 mm for the whole sclera), so the
            # centre is fitted to the sclera vertices behind a first fit's centre.
            sclera = v[r[0]:r[1]].astype(np.float64)
            centre = sphere_fit(torch.as_tensor(sclera)[None])[0][0].numpy()
            self.register_buffer(f"sclera_fit_{eye}", long(np.flatnonzero(sclera[:, 2] < centre[2])))
        for region, parts in REGIONS.items():
            mask = np.zeros(V, dtype=bool)
            for part in parts:
                a, b = self.geometry_vertex_ranges[part]
                mask[a:b] = True
            self.register_buffer(f"region_{region}", torch.as_tensor(mask))
        lmk68_faces, lmk68_bary = arrays["lmk68_faces"].astype(np.int64), arrays["lmk68_bary"]
        self.register_buffer("lmk68_faces", long(lmk68_faces))
        self.register_buffer("lmk68_bary", t(lmk68_bary))
        self.register_buffer("static_faces", long(lmk68_faces[17:]))
        self.register_buffer("static_bary", t(lmk68_bary[17:]))
        self.register_buffer("dynamic_faces", long(arrays["dynamic_faces"]))
        self.register_buffer("dynamic_bary", t(arrays["dynamic_bary"]))
        M = arrays["dense_faces"].shape[0] if "dense_faces" in arrays else 0
        self.register_buffer("dense_faces", long(arrays["dense_faces"] if M else np.zeros(0)))
        self.register_buffer("dense_bary", t(arrays["dense_bary"] if M else np.zeros((0, 3))))
        self.register_buffer("mediapipe_indices",
                             long(arrays["mediapipe_indices"] if M else np.zeros(0)))
        F_count = faces.shape[0]
        for what in ("lmk68_faces", "dynamic_faces", "dense_faces"):
            idx = getattr(self, what)
            if idx.numel() and (idx.max() >= F_count or idx.min() < 0):
                raise AssetError(f"{path}: {what} refers to faces beyond the model's {F_count}")
        with torch.no_grad():
            self.register_buffer("eyeball_centres", self._eyeball_centres(self.v_template[None])[0])

    @classmethod
    def load(cls, path: Union[str, Path, None] = None, device: Union[str, torch.device] = "cpu",
             expected_sha256: Optional[str] = None) -> "ICT":
        """Load the shipped model (path None) or a file built by tools/convert_ict.py.

        The shipped file is checked against `SHIPPED_SHA256`; another path only
        when `expected_sha256` is given.
        """
        path = Path(path) if path is not None else SHIPPED_MODEL
        if path.resolve() == SHIPPED_MODEL.resolve():
            expected_sha256 = SHIPPED_SHA256
        if not path.is_file():
            raise AssetError(f"{path}: ICT model file not found")
        digest = _check_sha256(path, expected_sha256) if expected_sha256 else file_sha256(path)
        return cls(read_model_file(path), path=path, sha256=digest).to(device)

    # ------------------------------------------------------------------
    @property
    def n_vertices(self) -> int:
        return self.v_template.shape[0]

    @property
    def n_dense(self) -> int:
        return self.dense_faces.shape[0]

    @property
    def region(self) -> Dict[str, torch.Tensor]:
        """Vertex masks [V] bool: face, head_neck, eye_sockets, eyeballs, mouth_interior."""
        return {r: getattr(self, f"region_{r}") for r in REGIONS}

    def _eyeball_centres(self, vertices: torch.Tensor) -> torch.Tensor:
        """Centres [B,2,3] (left, right) of sphere fits to the back of each sclera of vertices [B,V,3]."""
        return torch.stack([sphere_fit(vertices[:, a:b].index_select(1, fit))[0] for (a, b), fit in
                            zip(self._eye_slices, (self.sclera_fit_left, self.sclera_fit_right))], dim=1)

    @property
    def shapedirs(self) -> torch.Tensor:
        """Identity deltas [V,3,n_shape], meters per unit weight (a view of `dirs`)."""
        return self.dirs.view(self.n_vertices, 3, -1)[..., :self.n_shape]

    @property
    def expdirs(self) -> torch.Tensor:
        """Expression deltas [V,3,n_exp], meters per unit weight (a view of `dirs`)."""
        return self.dirs.view(self.n_vertices, 3, -1)[..., self.n_shape:]

    def shaped(self, shape=None, expression=None, batch_size: Optional[int] = None) -> torch.Tensor:
        """v_template + shapedirs @ shape + expdirs @ expression, [B,V,3] (no eye rotation)."""
        B = batch_size or next((x.shape[0] for x in (shape, expression) if x is not None), 1)
        like = self.v_template
        if shape is None:
            shape = like.new_zeros(B, self.n_shape)
        if expression is None:
            expression = like.new_zeros(B, self.n_exp)
        if shape.shape[-1] != self.n_shape or expression.shape[-1] != self.n_exp:
            raise ValueError(f"expected shape [B,{self.n_shape}] and expression [B,{self.n_exp}], "
                             f"got {tuple(shape.shape)} and {tuple(expression.shape)}")
        coeffs = torch.cat([shape.to(like.dtype), expression.to(like.dtype)], dim=1)
        return torch.addmm(like.reshape(1, -1), coeffs, self.dirs.T).view(B, -1, 3)

    def forward(self, shape=None, expression=None, eye_pose=None) -> torch.Tensor:
        """Vertices [B,V,3] in meters, model space (see the module docstring)."""
        B = next((x.shape[0] for x in (shape, expression, eye_pose) if x is not None), 1)
        v = self.shaped(shape, expression, batch_size=B)
        if eye_pose is None:
            return v
        centres = self._eyeball_centres(v)  # identity-dependent
        R = batch_rodrigues(eye_pose.reshape(-1, 3).to(v.dtype)).view(B, 2, 3, 3)
        pieces, start = [], 0
        for eye in sorted(range(2), key=lambda k: self._eye_slices[k][0]):
            a, b = self._eye_slices[eye]
            c = centres[:, eye, None]
            pieces += [v[:, start:a], (v[:, a:b] - c) @ R[:, eye].transpose(1, 2) + c]
            start = b
        out = torch.cat(pieces + [v[:, start:]], dim=1)
        return out

    # ------------------------------------------------------------------
    def landmarks68(self, vertices: torch.Tensor, head_rotation: Optional[torch.Tensor] = None) -> torch.Tensor:
        """68 iBUG landmarks [B,68,3]; with head_rotation [B,3,3] (model to a
        camera looking along -z) the jaw contour (0..16) follows the head's yaw
        as FLAME's does, otherwise the README's static 68."""
        if head_rotation is None:
            return barycentric_points(vertices, self.faces, self.lmk68_faces, self.lmk68_bary)
        rows = contour_rows(head_rotation, self.dynamic_faces.shape[0])
        contour = barycentric_points(vertices, self.faces, self.dynamic_faces[rows], self.dynamic_bary[rows])
        inner = barycentric_points(vertices, self.faces, self.static_faces, self.static_bary)
        return torch.cat([contour, inner], dim=1)

    def dense_landmarks(self, vertices: torch.Tensor) -> torch.Tensor:
        """The embedded mediapipe points [B,M,3] (order of `mediapipe_indices`)."""
        return barycentric_points(vertices, self.faces, self.dense_faces, self.dense_bary)
