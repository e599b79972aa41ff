"""Synthetic FLAME-format files: `generic_model.pkl` (chumpy objects and a
scipy sparse `J_regressor`, as released), `landmark_embedding.npy` (DECA
format, dynamic tables as torch tensors) and `mediapipe_landmark_embedding.npz`.

Geometry comes from one of two sources:
- procedural (default): an ellipsoidal head with a nose, two eyeballs and a
  plausible 68-point layout; any vertex count;
- a real topology (`template_obj`, e.g. FLAME's `head_template_mesh.obj`) with
  real embeddings, when those third-party files are at hand (never committed).
Blendshapes, pose correctives and skinning weights are always synthetic:
smooth random fields with FLAME-like magnitudes (millimetres per unit).
"""

from __future__ import annotations

import copyreg
import pickle
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import scipy.sparse
import torch

N_SHAPE_TOTAL, N_EXP_TOTAL = 300, 100
N_CONTOUR_ROWS = 79


@dataclass
class FlameFiles:
    model: Path
    landmark_embedding: Path
    mediapipe_embedding: Path
    smplx_folder: Optional[Path] = None


# ----------------------------------------------------------------------------
# chumpy-style pickling without chumpy


def _fake_chumpy_class():
    """A class that pickles exactly as a leaf `chumpy.ch.Ch` does:
    NEWOBJ(chumpy.ch.Ch) followed by BUILD with a state dict holding 'x'."""
    mod = sys.modules.get("chumpy.ch")
    if mod is not None and hasattr(mod, "Ch") and getattr(mod, "_lightning_ft_fake", False):
        return mod.Ch

    class Ch:
        def __init__(self, x):
            self.x = x

        def __reduce_ex__(self, protocol):
            state = {"x": self.x, "_cache": {}, "_depends_on_deps": {}, "dterms": ("x",), "terms": ()}
            return (copyreg.__newobj__, (type(self),), state)

    Ch.__module__ = "chumpy.ch"
    Ch.__qualname__ = Ch.__name__ = "Ch"
    return Ch


def _pickle_with_fake_chumpy(obj, path: Path) -> None:
    """Pickle with protocol 2 while a fake `chumpy.ch` module is importable, so
    the stream names `chumpy.ch.Ch` exactly as the released file does."""
    saved = {k: sys.modules.get(k) for k in ("chumpy", "chumpy.ch")}
    pkg = types.ModuleType("chumpy")
    ch = types.ModuleType("chumpy.ch")
    Ch = obj.pop("__Ch__")
    ch.Ch = Ch
    ch._lightning_ft_fake = True
    pkg.ch = ch
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = pkg, ch
    try:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


# ----------------------------------------------------------------------------
# Geometry


def _ellipsoid(n_lat: int, n_lon: int, radii, centre) -> Tuple[np.ndarray, np.ndarray]:
    """Closed lat-long ellipsoid: vertices [V,3], faces [F,3] (outward, CCW)."""
    lat = np.linspace(0, np.pi, n_lat + 1)[1:-1]
    lon = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    # Pole axis along y; longitude 0 points to +z (the face).
    pts = np.stack([np.sin(la) * np.sin(lo), np.cos(la), np.sin(la) * np.cos(lo)], -1).reshape(-1, 3)
    verts = np.concatenate([[[0, 1, 0]], pts, [[0, -1, 0]]]) * np.asarray(radii) + np.asarray(centre)
    faces = []
    ring = lambda i, j: 1 + i * n_lon + (j % n_lon)  # noqa: E731
    for j in range(n_lon):
        faces.append([0, ring(0, j), ring(0, j + 1)])
    for i in range(n_lat - 2):
        for j in range(n_lon):
            a, b, c, d = ring(i, j), ring(i, j + 1), ring(i + 1, j), ring(i + 1, j + 1)
            faces += [[a, c, b], [b, c, d]]
    last = len(verts) - 1
    for j in range(n_lon):
        faces.append([last, ring(n_lat - 2, j + 1), ring(n_lat - 2, j)])
    faces = np.asarray(faces, dtype=np.int64)
    # Orient outward: flip faces whose normal points toward the centre.
    v = verts[faces]
    n = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    flip = np.einsum("fc,fc->f", n, v.mean(1) - centre) < 0
    faces[flip] = faces[flip][:, [0, 2, 1]]
    return verts, faces


def _ibug68_layout() -> np.ndarray:
    """A plausible frontal iBUG-68 layout [68,2] in meters (x = the subject's
    left, y up, origin between the eyes); for procedural heads only.

    iBUG orders points as seen in the image of a frontal face, so each group
    starts on the subject's right side (negative model x).
    """
    theta = np.linspace(-np.pi / 2, np.pi / 2, 17)
    jaw = np.stack([0.07 * np.sin(theta), -0.005 - 0.095 * np.cos(theta)], 1)
    s = np.linspace(0, 1, 5)
    brow_r = np.stack([-0.055 + 0.043 * s, 0.025 + 0.007 * np.sin(np.pi * s)], 1)
    brow_l = brow_r[::-1] * [-1, 1]
    nose_bridge = np.stack([np.zeros(4), np.linspace(0.0, -0.03, 4)], 1)
    nostrils = np.stack([np.linspace(-0.014, 0.014, 5), -0.036 - 0.003 * (1 - np.abs(np.linspace(-1, 1, 5)))], 1)
    # Eyes start at the corner on the subject's right, run along the upper lid.
    a6 = np.pi - np.arange(6) * np.pi / 3
    eye_r = np.stack([-0.032 + 0.014 * np.cos(a6), 0.005 * np.sin(a6)], 1)
    eye_l = np.stack([0.032 + 0.014 * np.cos(a6), 0.005 * np.sin(a6)], 1)
    a12 = np.pi - np.arange(12) * np.pi / 6
    outer = np.stack([0.026 * np.cos(a12), -0.058 + 0.011 * np.sin(a12)], 1)
    a8 = np.pi - np.arange(8) * np.pi / 4
    inner = np.stack([0.018 * np.cos(a8), -0.058 + 0.004 * np.sin(a8)], 1)
    return np.concatenate([jaw, brow_r, brow_l, nose_bridge, nostrils, eye_r, eye_l, outer, inner])


def _nearest_faces(verts: np.ndarray, faces: np.ndarray, points: np.ndarray, rng=None) -> Tuple[np.ndarray, np.ndarray]:
    """For each 3-D point, the nearest face (among those with the closest
    centroids) and the barycentric coordinates of the point's projection
    onto it, clamped inside: nearby points get nearby embeddings, like the
    real tables whose contour moves smoothly with yaw."""
    centroids = verts[faces].mean(1)
    out_f, out_b = [], []
    for p in points:
        cand = np.argsort(((centroids - p) ** 2).sum(1))[:8]
        best = None
        for f in cand:
            a, b, c = verts[faces[f]]
            bary = _closest_barycentric(p, a, b, c)
            q = bary @ np.stack([a, b, c])
            d = ((q - p) ** 2).sum()
            if best is None or d < best[0]:
                best = (d, f, bary)
        out_f.append(best[1])
        out_b.append(best[2])
    return np.asarray(out_f, dtype=np.int64), np.asarray(out_b)


def _closest_barycentric(p, a, b, c) -> np.ndarray:
    """Barycentric coordinates of the point of triangle abc closest to p."""
    n = np.cross(b - a, c - a)
    n2 = (n ** 2).sum() + 1e-20
    q = p - ((p - a) @ n) / n2 * n
    v0, v1, v2 = b - a, c - a, q - a
    d00, d01, d11 = v0 @ v0, v0 @ v1, v1 @ v1
    d20, d21 = v2 @ v0, v2 @ v1
    den = d00 * d11 - d01 * d01 + 1e-20
    v = (d11 * d20 - d01 * d21) / den
    w = (d00 * d21 - d01 * d20) / den
    bary = np.clip(np.array([1 - v - w, v, w]), 0.02, None)
    return bary / bary.sum()


def _surface_point(verts: np.ndarray, xy: np.ndarray, front_only=True) -> np.ndarray:
    """Front-most vertex position near each (x, y) (a cheap ray cast along -z)."""
    out = []
    for x, y in xy:
        d = (verts[:, 0] - x) ** 2 + (verts[:, 1] - y) ** 2
        near = np.argsort(d)[:6]
        k = near[np.argmax(verts[near, 2])]
        out.append([x, y, verts[k, 2]])
    return np.asarray(out)


def _procedural_head(n_vertices: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Head + nose + two eyeballs. Returns verts, faces, eyeball ids (left, right)."""
    eye_lat, eye_lon = 6, 8
    eye_v = 2 + (eye_lat - 1) * eye_lon
    head_budget = max(200, n_vertices - 2 * eye_v)
    n_lon = max(12, int(round(np.sqrt(head_budget * 2))))
    n_lat = max(6, int(round((head_budget - 2) / n_lon)) + 1)
    centre = np.array([0.0, 0.0, -0.02])
    hv, hf = _ellipsoid(n_lat, n_lon, (0.078, 0.11, 0.1), centre)
    # Nose: push vertices near the nose tip forward.
    nose_c = np.array([0.0, -0.02])
    r2 = ((hv[:, 0] - nose_c[0]) / 0.016) ** 2 + ((hv[:, 1] - nose_c[1]) / 0.03) ** 2
    front = hv[:, 2] > 0
    hv[:, 2] += np.where(front, 0.025 * np.exp(-r2), 0)
    # Eye sockets: slightly recessed.
    for ex in (-0.032, 0.032):
        r2e = ((hv[:, 0] - ex) / 0.016) ** 2 + ((hv[:, 1] - 0.0) / 0.01) ** 2
        hv[:, 2] -= np.where(front, 0.006 * np.exp(-r2e), 0)
    verts, faces = [hv], [hf]
    eyes = []
    offset = len(hv)
    for ex in (0.032, -0.032):  # left eye (+x) first: joint 3
        ez = _surface_point(hv, np.array([[ex, 0.0]]))[0, 2] - 0.012
        ev, ef = _ellipsoid(eye_lat, eye_lon, (0.012, 0.012, 0.012), np.array([ex, 0.0, ez]))
        verts.append(ev)
        faces.append(ef + offset)
        eyes.append(np.arange(offset, offset + len(ev)))
        offset += len(ev)
    return np.concatenate(verts), np.concatenate(faces), eyes[0], eyes[1]


def read_obj_topology(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """Vertices [V,3] and triangle vertex indices [F,3] of an OBJ file."""
    verts, faces = [], []
    with open(path) as f:
        for line in f:
            if line.startswith("v "):
                verts.append([float(x) for x in line.split()[1:4]])
            elif line.startswith("f "):
                faces.append([int(tok.split("/")[0]) - 1 for tok in line.split()[1:4]])
    return np.asarray(verts), np.asarray(faces, dtype=np.int64)


# ----------------------------------------------------------------------------
# Model arrays


def _smooth_fields(verts: np.ndarray, n: int, rng, scale: float, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """n smooth random displacement fields [V,3,n], decaying magnitudes."""
    c = verts - verts.mean(0)
    span = np.abs(c).max(0) + 1e-9
    u = c / span
    out = np.empty((len(verts), 3, n))
    for k in range(n):
        freq = rng.normal(size=(3, 3)) * (1.0 + 2.0 * k / max(n, 1))
        phase = rng.uniform(0, 2 * np.pi, size=3)
        amp = rng.normal(size=3)
        field = np.sin(u @ freq + phase) * amp
        # PCA-like decay, as in FLAME: the first components carry most of
        # the variance (total RMS over 100 components about 2.3x `scale`).
        out[:, :, k] = field * scale / (1 + k)
    if mask is not None:
        out *= mask[:, None, None]
    return out


def synthetic_model_arrays(verts: np.ndarray, faces: np.ndarray, left_eye: np.ndarray,
                           right_eye: np.ndarray, seed: int = 0) -> Dict[str, np.ndarray]:
    """FLAME model arrays for a head mesh (model space, meters)."""
    rng = np.random.default_rng(seed)
    V = len(verts)
    y = verts[:, 1]
    z = verts[:, 2]
    eyes = np.zeros(V, bool)
    eyes[left_eye] = True
    eyes[right_eye] = True
    mouth_y = -0.055 if verts[:, 1].max() < 0.5 else np.nan
    # Joints: root at the head centre, neck below, jaw behind the mouth, eyes.
    centre = verts[~eyes].mean(0)
    J = np.stack([
        centre,
        centre + [0, -0.06, -0.02],
        centre + [0, -0.03, 0.0],
        verts[left_eye].mean(0),
        verts[right_eye].mean(0),
    ])
    # Skinning weights: neck for the lower back of the head, jaw for the chin
    # region below the mouth, eyes for the eyeballs, root elsewhere.
    W = np.zeros((V, 5))
    jaw_line = (J[2, 1] - 0.025) if np.isnan(mouth_y) else mouth_y
    jaw_w = 1 / (1 + np.exp(-(jaw_line - y) / 0.006)) * (z > J[2, 2] - 0.02)
    neck_w = 1 / (1 + np.exp(-(J[1, 1] + 0.01 - y) / 0.01)) * (1 - jaw_w)
    W[:, 2] = jaw_w
    W[:, 1] = neck_w
    W[:, 0] = 1 - jaw_w - neck_w
    W[eyes] = 0
    W[left_eye, 3] = 1
    W[right_eye, 4] = 1
    # J_regressor: each joint as an average of nearby vertices (sparse).
    Jreg = np.zeros((5, V))
    for k in range(5):
        pool = left_eye if k == 3 else right_eye if k == 4 else np.where(~eyes)[0]
        d = np.linalg.norm(verts[pool] - J[k], axis=1)
        near = pool[np.argsort(d)[:8]]
        w = rng.uniform(0.5, 1.5, size=len(near))
        Jreg[k, near] = w / w.sum()
    face_mask = np.clip((z - z.min()) / (np.ptp(z) + 1e-9), 0, 1) ** 2
    shapedirs = np.concatenate([
        _smooth_fields(verts, N_SHAPE_TOTAL, rng, 0.008),
        _smooth_fields(verts, N_EXP_TOTAL, rng, 0.006, mask=face_mask),
    ], axis=2)
    shapedirs[eyes] = np.mean(shapedirs[eyes], axis=0, keepdims=True)  # eyeballs move rigidly
    posedirs = _smooth_fields(verts, 36, rng, 0.002, mask=face_mask)
    return {
        "v_template": verts.astype(np.float64),
        "f": faces.astype(np.uint32),
        "shapedirs": shapedirs,
        "posedirs": posedirs,
        "J_regressor": scipy.sparse.csc_matrix(Jreg),
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "weights": W,
        "J": Jreg @ verts,
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }


def _contour_table(verts, faces, layout_jaw_xy, rng) -> Tuple[np.ndarray, np.ndarray]:
    """Contour faces per yaw row: the jaw points slide around the head's side
    as it turns, like the real table (silhouette follows the visible edge)."""
    rows_f, rows_b = [], []
    for r in range(N_CONTOUR_ROWS):
        yaw = r if r <= 39 else 39 - r
        shift = np.deg2rad(yaw) * 0.03
        pts2 = layout_jaw_xy.copy()
        pts2[:, 0] = pts2[:, 0] + shift * np.cos(np.linspace(-1, 1, len(pts2)))
        pts = _surface_point(verts, pts2)
        f_idx, bary = _nearest_faces(verts, faces, pts, rng)
        rows_f.append(f_idx)
        rows_b.append(bary)
    return np.stack(rows_f), np.stack(rows_b)


def _load_embeddings(folder: Path):
    """FLAME's real landmark embeddings in `folder`: (the 68-point
    landmark_embedding.npy dict, the mediapipe_landmark_embedding.npz
    arrays), torch tensors as numpy arrays."""
    lmk_path = folder / "landmark_embedding.npy"
    mp_path = folder / "mediapipe_landmark_embedding.npz"
    lmk = np.load(lmk_path, allow_pickle=True, encoding="latin1")[()]
    lmk = {k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in lmk.items()}
    with np.load(mp_path) as d:
        mp = {k: d[k] for k in d.files}
    return lmk, mp


def _placed_embeddings(verts: np.ndarray, faces: np.ndarray, left_eye: np.ndarray, rng: np.random.Generator):
    """Landmark embeddings of the stand-in head verts [V,3] (m), faces [F,3]
    whose eyeballs start at the vertices `left_eye`: (the 68-point dict in
    landmark_embedding.npy's layout, the mediapipe embedding's arrays),
    placed on the surface with a generic iBUG layout."""
    layout = _ibug68_layout()
    # Place the layout on the surface, scaled to the head and centred
    # between the eyes.
    eye_y = verts[left_eye, 1].mean()
    pts = _surface_point(verts[: left_eye.min()], layout + [0, eye_y])
    static_f, static_b = _nearest_faces(verts, faces[: _n_head_faces(faces, left_eye)], pts[17:], rng)
    dyn_f, dyn_b = _contour_table(verts[: left_eye.min()], faces[: _n_head_faces(faces, left_eye)],
                                  layout[:17] + [0, eye_y], rng)
    full_f, full_b = _nearest_faces(verts, faces[: _n_head_faces(faces, left_eye)], pts, rng)
    lmk = {
        "static_lmk_faces_idx": static_f,
        "static_lmk_bary_coords": static_b,
        "dynamic_lmk_faces_idx": dyn_f,
        "dynamic_lmk_bary_coords": dyn_b,
        "full_lmk_faces_idx": full_f[None],
        "full_lmk_bary_coords": full_b[None],
    }
    # 105 points around brows, eyes, nose and lips: jittered layout points.
    base = np.concatenate([layout[17:], (layout[17:][:-1] + layout[17:][1:]) / 2])
    base = np.concatenate([base, base[:105 - len(base)] + [0.003, 0.002]])[:105]
    mp_pts = _surface_point(verts[: left_eye.min()], base + [0, eye_y])
    mp_f, mp_b = _nearest_faces(verts, faces[: _n_head_faces(faces, left_eye)], mp_pts, rng)
    mp = {
        "lmk_face_idx": mp_f.astype(np.uint32),
        "lmk_b_coords": mp_b,
        "landmark_indices": rng.choice(468, size=105, replace=False).astype(np.int64),
    }
    return lmk, mp


def write_synthetic_flame(
    folder: Path,
    n_vertices: int = 1200,
    seed: int = 0,
    template_obj: Optional[Path] = None,
    real_embeddings: Optional[Path] = None,
    smplx_copy: bool = False,
) -> FlameFiles:
    """Write generic_model.pkl, landmark_embedding.npy and
    mediapipe_landmark_embedding.npz into `folder` (the assets/FLAME layout).

    template_obj / real_embeddings: FLAME's head_template_mesh.obj and a folder
    with the real landmark_embedding.npy and mediapipe_landmark_embedding.npz
    (they index FLAME's faces) for a stand-in with real topology.
    smplx_copy: also write a plain-numpy copy in `folder/smplx/` that
    `smplx.FLAME` reads (FLAME_NEUTRAL.pkl, flame_static_embedding.pkl,
    flame_dynamic_embedding.npy), for conformance tests.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if template_obj is not None:
        verts, faces = read_obj_topology(template_obj)
        verts = verts - [0, np.median(verts[:, 1]), 0] if np.median(verts[:, 1]) > 0.5 else verts
        # Eyeballs: the two small closed components of FLAME's mesh.
        left_eye, right_eye = _eyeball_components(verts, faces)
    else:
        verts, faces, left_eye, right_eye = _procedural_head(n_vertices)
    model = synthetic_model_arrays(verts, faces, left_eye, right_eye, seed=seed)

    if real_embeddings is not None:
        lmk, mp = _load_embeddings(Path(real_embeddings))
    else:
        lmk, mp = _placed_embeddings(verts, faces, left_eye, rng)

    files = FlameFiles(
        model=folder / "generic_model.pkl",
        landmark_embedding=folder / "landmark_embedding.npy",
        mediapipe_embedding=folder / "mediapipe_landmark_embedding.npz",
    )
    to_pickle = dict(model)
    Ch = _fake_chumpy_class()
    to_pickle["shapedirs"] = Ch(model["shapedirs"])
    to_pickle["__Ch__"] = Ch
    _pickle_with_fake_chumpy(to_pickle, files.model)
    released = dict(lmk)
    # DECA's released file keeps the dynamic tables as torch tensors.
    released["dynamic_lmk_faces_idx"] = torch.as_tensor(lmk["dynamic_lmk_faces_idx"].astype(np.int64))
    released["dynamic_lmk_bary_coords"] = torch.as_tensor(lmk["dynamic_lmk_bary_coords"].astype(np.float32))
    np.save(files.landmark_embedding, np.array(released, dtype=object), allow_pickle=True)
    np.savez(files.mediapipe_embedding, **mp)

    if smplx_copy:
        files.smplx_folder = _write_smplx_copy(folder / "smplx", model, lmk)
    return files


def _n_head_faces(faces: np.ndarray, left_eye: np.ndarray) -> int:
    """Number of leading faces that belong to the head (eyeballs come last)."""
    return int(np.argmax(faces.min(1) >= left_eye.min())) or len(faces)


def _eyeball_components(verts: np.ndarray, faces: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Vertex ids of the two eyeball components (left = +x first)."""
    import scipy.sparse.csgraph as csgraph

    V = len(verts)
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    adj = scipy.sparse.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(V, V))
    n, labels = csgraph.connected_components(adj, directed=False)
    comps = sorted((np.where(labels == c)[0] for c in range(n)), key=len)
    small = [c for c in comps if 100 < len(c) < 2000][:2]
    if len(small) < 2:
        raise ValueError("template has no two eyeball components")
    small.sort(key=lambda c: -verts[c, 0].mean())
    return small[0], small[1]


def _write_smplx_copy(folder: Path, model: Dict[str, np.ndarray], lmk: Dict[str, np.ndarray]) -> Path:
    """The same model in the plain-numpy layout smplx reads.

    smplx selects the contour row from the *negated* yaw of the global
    rotation alone, DECA from the yaw of global @ neck: the rows are remapped
    so that both pick the same contour whenever the neck is not rotated.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "FLAME_NEUTRAL.pkl", "wb") as f:
        pickle.dump({k: v for k, v in model.items()}, f, protocol=2)
    with open(folder / "flame_static_embedding.pkl", "wb") as f:
        pickle.dump({"lmk_face_idx": lmk["static_lmk_faces_idx"].astype(np.int64),
                     "lmk_b_coords": lmk["static_lmk_bary_coords"]}, f, protocol=2)
    dyn_f, dyn_b = lmk["dynamic_lmk_faces_idx"], lmk["dynamic_lmk_bary_coords"]
    rows = np.arange(N_CONTOUR_ROWS)
    angle = np.where(rows <= 39, rows, 39 - rows)  # smplx angle of each row
    deca_row = np.where(-angle >= 0, -angle, 39 + angle)  # DECA row of the same yaw
    np.save(folder / "flame_dynamic_embedding.npy",
            np.array({"lmk_face_idx": dyn_f[deca_row], "lmk_b_coords": dyn_b[deca_row]}, dtype=object),
            allow_pickle=True)
    return folder
