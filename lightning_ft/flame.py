"""FLAME: file loading (without chumpy), batched LBS and landmark embeddings.

The released `generic_model.pkl` is a Python-2 pickle holding numpy arrays,
chumpy objects (`shapedirs` at least) and a scipy sparse `J_regressor`.
chumpy does not import on current numpy, so `load_flame_model` reads the pickle
with a restricted unpickler that maps chumpy classes to inert stubs and refuses
every class it does not know (a downloaded pickle never runs code here).

Model space: meters, +x the subject's left, +y up, +z out of the face.
Joints: 0 root, 1 neck, 2 jaw, 3 left eye, 4 right eye.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .errors import AssetError
from .lbs import barycentric_points, batch_rodrigues, lbs

# ----------------------------------------------------------------------------
# Restricted unpickling


class ChumpyStub:
    """Stands in for any chumpy class; keeps the pickled state untouched."""

    chumpy_class = "chumpy.ch.Ch"

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def to_array(self, key: str, path: Path) -> np.ndarray:
        state = getattr(self, "state", None)
        if isinstance(state, dict) and "x" in state:
            return np.asarray(state["x"])
        raise AssetError(
            f"{path}: entry '{key}' is a computed chumpy expression "
            f"({self.chumpy_class}), not a stored array; re-export the model with "
            "plain arrays (e.g. FLAME 2020 generic_model.pkl as released)"
        )


def _chumpy_stub(module: str, name: str) -> type:
    return type(name, (ChumpyStub,), {"chumpy_class": f"{module}.{name}"})


# Classes a FLAME/embedding pickle may legitimately reference.
_NUMPY_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}
_SPARSE_NAMES = {"csc_matrix", "csr_matrix", "coo_matrix"}
_BUILTINS_ALLOWED = {("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
                     ("__builtin__", "object"), ("builtins", "object"),
                     ("__builtin__", "set"), ("builtins", "set"),
                     ("__builtin__", "frozenset"), ("builtins", "frozenset"),
                     # Protocol-2 pickles written by Python 3 encode bytes so.
                     ("_codecs", "encode")}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: Path):
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if module == "chumpy" or module.startswith("chumpy."):
            return _chumpy_stub(module, name)
        if (module, name) in _NUMPY_ALLOWED:
            import importlib

            mod_name = module
            try:
                mod = importlib.import_module(mod_name)
            except ImportError:  # numpy 1.x <-> 2.x module rename
                alt = module.replace("numpy._core", "numpy.core") if "_core" in module else module.replace("numpy.core", "numpy._core")
                mod = importlib.import_module(alt)
            return getattr(mod, name)
        if module.startswith("scipy.sparse") and name in _SPARSE_NAMES:
            import scipy.sparse

            return getattr(scipy.sparse, name)
        if (module, name) in _BUILTINS_ALLOWED:
            return super().find_class(module, name)
        raise AssetError(
            f"{self.path}: refuses to load pickled object {module}.{name} "
            "(not part of a FLAME model file)"
        )


def read_pickle(path: Path) -> Any:
    """Read a (Python-2, latin1) pickle restricted to numpy/scipy/chumpy data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except AssetError:
        raise
    except FileNotFoundError:
        raise AssetError(f"{path}: file not found")
    except Exception as exc:  # truncated/corrupt pickles raise many types
        raise AssetError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None


def to_numpy(value: Any, key: str, path: Path) -> np.ndarray:
    """Array from a numpy array, chumpy stub, scipy sparse matrix or torch tensor."""
    if isinstance(value, ChumpyStub):
        return value.to_array(key, path)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if hasattr(value, "tocsc") or type(value).__name__ in _SPARSE_NAMES:
        return _sparse_to_dense(value)
    return np.asarray(value)


def _sparse_to_dense(mat: Any) -> np.ndarray:
    """Dense array from a sparse matrix, also one unpickled from an old scipy."""
    import scipy.sparse

    try:
        return np.asarray(mat.toarray())
    except Exception:
        # Old scipy pickles keep the CSC fields in __dict__ under older names.
        d = mat.__dict__
        shape = d.get("_shape", d.get("shape"))
        fmt = d.get("format", "csc")
        cls = scipy.sparse.csr_matrix if fmt == "csr" else scipy.sparse.csc_matrix
        return cls((d["data"], d["indices"], d["indptr"]), shape=shape).toarray()


# ----------------------------------------------------------------------------
# Model and embedding files


@dataclass
class FlameModelData:
    """The arrays of a FLAME model file, float64, as stored.

    v_template [V,3] m; faces [F,3]; shapedirs [V,3,S_total] (identity columns
    first, then expression); posedirs [V,3,P]; J_regressor [K,V]; parents [K]
    (-1 at the root); weights [V,K].
    """

    path: Path
    v_template: np.ndarray
    faces: np.ndarray
    shapedirs: np.ndarray
    posedirs: np.ndarray
    J_regressor: np.ndarray
    parents: Tuple[int, ...]
    weights: np.ndarray
    n_shape_total: int
    sha256: str
    version: str

    @property
    def n_expression_total(self) -> int:
        return self.shapedirs.shape[2] - self.n_shape_total


REQUIRED_MODEL_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights")
# FLAME releases store 300 identity components before the expression ones.
FLAME_SHAPE_COMPONENTS = 300


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_flame_model(path: Path) -> FlameModelData:
    """Read and validate `generic_model.pkl` (FLAME 2020/2023 structure)."""
    path = Path(path)
    raw = read_pickle(path)
    if not isinstance(raw, dict):
        raise AssetError(f"{path}: expected a dict of FLAME arrays, found {type(raw).__name__}")
    missing = [k for k in REQUIRED_MODEL_KEYS if k not in raw]
    if missing:
        raise AssetError(f"{path}: not a FLAME model, missing keys {', '.join(missing)}")
    arr = {k: to_numpy(raw[k], k, path) for k in REQUIRED_MODEL_KEYS}
    v_template = arr["v_template"].astype(np.float64)
    V = v_template.shape[0] if v_template.ndim == 2 else -1
    faces = arr["f"].astype(np.int64)
    shapedirs = arr["shapedirs"].astype(np.float64)
    posedirs = arr["posedirs"].astype(np.float64)
    J_regressor = arr["J_regressor"].astype(np.float64)
    kintree = arr["kintree_table"].astype(np.int64)
    weights = arr["weights"].astype(np.float64)
    K = kintree.shape[1] if kintree.ndim == 2 else -1
    problems = []
    if v_template.ndim != 2 or v_template.shape[1] != 3:
        problems.append(f"v_template has shape {v_template.shape}, expected [V,3]")
    if faces.ndim != 2 or faces.shape[1] != 3 or (faces.size and (faces.max() >= V or faces.min() < 0)):
        problems.append("f is not a [F,3] array of vertex indices")
    if shapedirs.ndim != 3 or shapedirs.shape[:2] != (V, 3):
        problems.append(f"shapedirs has shape {shapedirs.shape}, expected [V,3,S]")
    if kintree.ndim != 2 or kintree.shape[0] != 2:
        problems.append(f"kintree_table has shape {kintree.shape}, expected [2,K]")
    if posedirs.ndim != 3 or posedirs.shape[:2] != (V, 3) or posedirs.shape[2] != 9 * (K - 1):
        problems.append(f"posedirs has shape {posedirs.shape}, expected [V,3,{9 * (K - 1)}]")
    if J_regressor.shape != (K, V):
        problems.append(f"J_regressor has shape {J_regressor.shape}, expected [{K},{V}]")
    if weights.shape != (V, K):
        problems.append(f"weights has shape {weights.shape}, expected [{V},{K}]")
    if problems:
        raise AssetError(f"{path}: malformed FLAME model: {problems[0]}")
    if not np.all(np.isfinite(v_template)) or not np.all(np.isfinite(shapedirs)):
        raise AssetError(f"{path}: malformed FLAME model: non-finite values")
    parents_raw = kintree[0]
    # The root's parent is stored as 2**32-1 (uint32 -1) in the released file.
    parents = tuple(-1 if (p < 0 or p >= K) else int(p) for p in parents_raw)
    if parents[0] != -1 or any(parents[k] >= k for k in range(1, K)):
        raise AssetError(f"{path}: malformed FLAME model: kintree_table is not a tree rooted at joint 0")
    n_shape_total = min(FLAME_SHAPE_COMPONENTS, shapedirs.shape[2])
    sha = file_sha256(path)
    return FlameModelData(
        path=path, v_template=v_template, faces=faces, shapedirs=shapedirs, posedirs=posedirs,
        J_regressor=J_regressor, parents=parents, weights=weights, n_shape_total=n_shape_total,
        sha256=sha, version=_guess_version(raw, shapedirs),
    )


def _guess_version(raw: Dict[str, Any], shapedirs: np.ndarray) -> str:
    """Best-effort FLAME release label for meta.json and exports."""
    label = raw.get("flame_version") or raw.get("version")
    if isinstance(label, (str, bytes)):
        return label.decode() if isinstance(label, bytes) else label
    return "FLAME (version not recorded in file)"


@dataclass
class LandmarkEmbedding:
    """The 68-point embedding (DECA/EMOCA `landmark_embedding.npy`).

    static_faces [51], static_bary [51,3]: iBUG points 17..67.
    dynamic_faces [R,17], dynamic_bary [R,17,3]: contour (iBUG 0..16) per yaw
    row; row y for yaw y in 0..39 degrees, row 39-y for y in -1..-39.
    """

    static_faces: np.ndarray
    static_bary: np.ndarray
    dynamic_faces: np.ndarray
    dynamic_bary: np.ndarray
    full_faces: Optional[np.ndarray] = None
    full_bary: Optional[np.ndarray] = None


def load_landmark_embedding(path: Path) -> LandmarkEmbedding:
    """Read `landmark_embedding.npy`: a 0-d object array holding a dict whose
    dynamic entries are torch tensors in the released file (numpy elsewhere)."""
    path = Path(path)
    try:
        raw = np.load(path, allow_pickle=True, encoding="latin1")
        d = raw[()] if isinstance(raw, np.ndarray) and raw.dtype == object else raw
    except FileNotFoundError:
        raise AssetError(f"{path}: file not found")
    except Exception as exc:
        raise AssetError(f"{path}: not a readable landmark embedding ({type(exc).__name__}: {exc})") from None
    keys = ("static_lmk_faces_idx", "static_lmk_bary_coords", "dynamic_lmk_faces_idx", "dynamic_lmk_bary_coords")
    if not isinstance(d, dict) or any(k not in d for k in keys):
        raise AssetError(f"{path}: not a DECA-format landmark embedding (needs keys {', '.join(keys)})")
    a = {k: to_numpy(v, k, path) for k, v in d.items() if k in keys or k.startswith("full_lmk")}
    emb = LandmarkEmbedding(
        static_faces=a["static_lmk_faces_idx"].astype(np.int64).reshape(-1),
        static_bary=a["static_lmk_bary_coords"].astype(np.float64).reshape(-1, 3),
        dynamic_faces=a["dynamic_lmk_faces_idx"].astype(np.int64),
        dynamic_bary=a["dynamic_lmk_bary_coords"].astype(np.float64),
        full_faces=a.get("full_lmk_faces_idx"),
        full_bary=a.get("full_lmk_bary_coords"),
    )
    R, C = emb.dynamic_faces.shape[:2] if emb.dynamic_faces.ndim == 2 else (0, 0)
    if emb.static_faces.shape[0] + C != 68 or emb.dynamic_bary.shape != (R, C, 3) or R < 1:
        raise AssetError(
            f"{path}: landmark embedding has {emb.static_faces.shape[0]} static and "
            f"{C} contour points, expected 51 + 17 = 68"
        )
    return emb


@dataclass
class MediapipeEmbedding:
    """metrical-tracker's `mediapipe_landmark_embedding.npz`.

    faces [M], bary [M,3], mediapipe_indices [M]: which of mediapipe's 478
    points each FLAME point corresponds to (group order, not sorted).
    """

    faces: np.ndarray
    bary: np.ndarray
    mediapipe_indices: np.ndarray


def load_mediapipe_embedding(path: Path) -> MediapipeEmbedding:
    path = Path(path)
    try:
        with np.load(path) as d:
            keys = ("lmk_face_idx", "lmk_b_coords", "landmark_indices")
            missing = [k for k in keys if k not in d.files]
            if missing:
                raise AssetError(f"{path}: not a mediapipe embedding, missing keys {', '.join(missing)}")
            emb = MediapipeEmbedding(
                faces=d["lmk_face_idx"].astype(np.int64),
                bary=d["lmk_b_coords"].astype(np.float64),
                mediapipe_indices=d["landmark_indices"].astype(np.int64),
            )
    except AssetError:
        raise
    except FileNotFoundError:
        raise AssetError(f"{path}: file not found")
    except Exception as exc:
        raise AssetError(f"{path}: not a readable npz ({type(exc).__name__}: {exc})") from None
    M = emb.faces.shape[0]
    if emb.bary.shape != (M, 3) or emb.mediapipe_indices.shape != (M,) or M == 0:
        raise AssetError(f"{path}: mediapipe embedding arrays disagree in length")
    if emb.mediapipe_indices.min() < 0 or emb.mediapipe_indices.max() >= 478:
        raise AssetError(f"{path}: mediapipe embedding indices outside 0..477")
    return emb


# ----------------------------------------------------------------------------
# Contour selection


def rotation_yaw_degrees(R: torch.Tensor) -> torch.Tensor:
    """Yaw [B] (degrees) of rotations [B,3,3] in DECA's Euler convention."""
    sy = torch.sqrt(R[:, 0, 0] ** 2 + R[:, 1, 0] ** 2)
    return torch.atan2(-R[:, 2, 0], sy) * (180.0 / np.pi)


def contour_rows(head_rotation: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Row [B] of the dynamic contour table for head rotations [B,3,3].

    head_rotation is the rotation of the head relative to a camera looking
    along FLAME's -z axis (global @ neck in plain FLAME use). Yaw is rounded
    to whole degrees; rows 0..39 hold yaw 0..39, rows 40..78 yaw -1..-39.
    """
    half = (n_rows - 1) // 2
    yaw = torch.round(rotation_yaw_degrees(head_rotation)).long().clamp(-half, half)
    return torch.where(yaw < 0, half - yaw, yaw)


# ----------------------------------------------------------------------------
# The model


@dataclass
class FlameOutput:
    """vertices [B,V,3], lmk68 [B,68,3] (iBUG order), lmk_dense [B,M,3],
    joints [B,K,3]; meters, FLAME model space."""

    vertices: torch.Tensor
    lmk68: torch.Tensor
    lmk_dense: torch.Tensor
    joints: torch.Tensor


class FLAME(nn.Module):
    """FLAME head model with the 68-point and mediapipe landmark embeddings.

    ``FLAME(model_path, landmark_embedding_path, mediapipe_embedding_path,
    n_shape=100, n_exp=50)`` and then ``flame(shape=..., expression=...,
    global_pose=..., neck_pose=..., jaw_pose=..., eye_pose=...)`` with tensors
    shape [B,n_shape], expression [B,n_exp], poses [B,3] (eye_pose [B,6]),
    axis-angle radians; omitted means zero.
    """

    def __init__(
        self,
        model_path: Path,
        landmark_embedding_path: Path,
        mediapipe_embedding_path: Path,
        n_shape: int = 100,
        n_exp: int = 50,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        data = load_flame_model(model_path)
        if n_shape > data.n_shape_total or n_exp > data.n_expression_total:
            raise AssetError(
                f"{model_path}: model has {data.n_shape_total} shape and "
                f"{data.n_expression_total} expression components; asked for {n_shape} and {n_exp}"
            )
        lmk = load_landmark_embedding(landmark_embedding_path)
        mp = load_mediapipe_embedding(mediapipe_embedding_path)
        F_count = data.faces.shape[0]
        for name, faces in (("68-point", np.concatenate([lmk.static_faces, lmk.dynamic_faces.ravel()])),
                            ("mediapipe", mp.faces)):
            if faces.max() >= F_count or faces.min() < 0:
                raise AssetError(f"{model_path}: {name} landmark embedding refers to faces beyond the model's {F_count}")
        self.data = data
        self.n_shape, self.n_exp = n_shape, n_exp
        self.parents = data.parents
        self.sha256, self.version = data.sha256, data.version
        dirs = np.concatenate(
            [data.shapedirs[:, :, :n_shape],
             data.shapedirs[:, :, data.n_shape_total:data.n_shape_total + n_exp]], axis=2)
        t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)  # noqa: E731
        self.register_buffer("v_template", t(data.v_template))
        self.register_buffer("dirs", t(dirs))
        self.register_buffer("posedirs", t(data.posedirs.reshape(-1, data.posedirs.shape[2]).T))
        self.register_buffer("joints_template", t(data.J_regressor @ data.v_template))
        self.register_buffer("joint_dirs", t(np.einsum("kv,vcs->kcs", data.J_regressor, dirs)))
        self.register_buffer("weights", t(data.weights))
        self.register_buffer("faces", torch.as_tensor(data.faces, dtype=torch.long))
        self.register_buffer("static_faces", torch.as_tensor(lmk.static_faces))
        self.register_buffer("static_bary", t(lmk.static_bary))
        self.register_buffer("dynamic_faces", torch.as_tensor(lmk.dynamic_faces))
        self.register_buffer("dynamic_bary", t(lmk.dynamic_bary))
        self.register_buffer("dense_faces", torch.as_tensor(mp.faces))
        self.register_buffer("dense_bary", t(mp.bary))
        self.register_buffer("mediapipe_indices", torch.as_tensor(mp.mediapipe_indices))

    @property
    def n_vertices(self) -> int:
        return self.v_template.shape[0]

    @property
    def n_dense(self) -> int:
        return self.dense_faces.shape[0]

    # -- the head-model interface (lightning_ft.head_model.HeadModel) --------

    name = "flame"
    rotation_parameters = ("jaw_pose", "eye_pose")

    def parameter_blocks(self) -> Dict[str, "ParameterBlock"]:
        from .head_model import ParameterBlock

        return {"shape": ParameterBlock("shape", self.n_shape, 1.0),
                "expression": ParameterBlock("expression", self.n_exp, 2.0)}

    def linear_parts(self) -> "LinearParts":
        """Jaw and eyes (joints 2, 3, 4) with FLAME's pose correctives; the
        root and neck stay at rest (the head rotation is the camera's)."""
        from .head_model import LinearParts

        d = torch.float64
        V = self.v_template.shape[0]
        ks = [2, 3, 4]
        return LinearParts(v_template=self.v_template.cpu().to(d), dirs=self.dirs.cpu().to(d),
                           posedirs=self.posedirs.cpu().to(d).T.reshape(V, 3, -1),
                           weights=self.weights.cpu().to(d)[:, ks], joints=self.joints_template.cpu().to(d)[ks],
                           joint_dirs=self.joint_dirs.cpu().to(d)[ks])

    def posed_vertices(self, shape, expression, jaw_pose=None, eye_pose=None, neck_pose=None) -> torch.Tensor:
        """Vertices [B,V,3] with the root at rest (and the neck, without neck_pose)."""
        return self(shape=shape, expression=expression, jaw_pose=jaw_pose, eye_pose=eye_pose,
                    neck_pose=neck_pose).vertices

    def model_meta(self) -> dict:
        return {"name": "flame", "version": self.version, "licence": "FLAME licence (non-commercial research use; "
                "https://flame.is.tue.mpg.de)", "sha256": self.sha256, "n_shape": self.n_shape,
                "n_exp": self.n_exp, "n_vertices": self.n_vertices}

    def pose_vector(self, B: int, global_pose=None, neck_pose=None, jaw_pose=None, eye_pose=None) -> torch.Tensor:
        """Concatenate the joint rotations [B,15]; None means zero."""
        like = self.v_template
        z = lambda n: torch.zeros(B, n, dtype=like.dtype, device=like.device)  # noqa: E731
        parts = [global_pose if global_pose is not None else z(3),
                 neck_pose if neck_pose is not None else z(3),
                 jaw_pose if jaw_pose is not None else z(3),
                 eye_pose if eye_pose is not None else z(6)]
        return torch.cat(parts, dim=1)

    def coefficients(self, B: int, shape=None, expression=None) -> torch.Tensor:
        like = self.v_template
        shape = shape if shape is not None else torch.zeros(B, self.n_shape, dtype=like.dtype, device=like.device)
        expression = expression if expression is not None else torch.zeros(B, self.n_exp, dtype=like.dtype, device=like.device)
        if shape.shape[-1] != self.n_shape or expression.shape[-1] != self.n_exp:
            raise ValueError(f"expected shape [B,{self.n_shape}] and expression [B,{self.n_exp}]")
        return torch.cat([shape, expression], dim=1)

    def head_rotation(self, pose: torch.Tensor) -> torch.Tensor:
        """Rotation [B,3,3] of the head (global then neck) for contour selection."""
        R = batch_rodrigues(pose[:, :6].reshape(-1, 3)).view(-1, 2, 3, 3)
        return torch.matmul(R[:, 0], R[:, 1])

    def landmarks68(self, vertices: torch.Tensor, head_rotation: torch.Tensor) -> torch.Tensor:
        """68 iBUG landmarks [B,68,3] with the contour chosen by head yaw."""
        rows = contour_rows(head_rotation, self.dynamic_faces.shape[0])
        contour = barycentric_points(vertices, self.faces, self.dynamic_faces[rows], self.dynamic_bary[rows])
        inner = barycentric_points(vertices, self.faces, self.static_faces, self.static_bary)
        return torch.cat([contour, inner], dim=1)

    def forward(self, shape=None, expression=None, global_pose=None, neck_pose=None,
                jaw_pose=None, eye_pose=None) -> FlameOutput:
        B = next((x.shape[0] for x in (shape, expression, global_pose, neck_pose, jaw_pose, eye_pose)
                  if x is not None), 1)
        coeffs = self.coefficients(B, shape, expression)
        pose = self.pose_vector(B, global_pose, neck_pose, jaw_pose, eye_pose)
        verts, joints = lbs(coeffs, pose, self.v_template, self.dirs, self.posedirs,
                            self.joints_template, self.joint_dirs, self.parents, self.weights)
        lmk68 = self.landmarks68(verts, self.head_rotation(pose))
        dense = barycentric_points(verts, self.faces, self.dense_faces, self.dense_bary)
        return FlameOutput(vertices=verts, lmk68=lmk68, lmk_dense=dense, joints=joints)
