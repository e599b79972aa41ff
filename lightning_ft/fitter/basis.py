"""Landmark-level head models for fitting: the basis and the point model.

Speed comes from evaluating only the points the losses touch. FLAME's
landmarks are barycentric combinations of skinned vertices; with the root and
neck at rest (the head rotation lives in the camera extrinsics) every posed
vertex is ``v = v_p + sum_k w_k (R_k - I)(v_p - J_k)`` over jaw and eyes, so a
landmark is exactly

    X = M(c, f) + sum_k (R_k - I) (W_k(c, f) - omega_k J_k(c))

with M, W_k linear in the blendshape coefficients c and the pose-corrective
feature f, precomputed per landmark (`LandmarkBasis`). A frame's residuals
then cost a few small matrix products, and their Jacobian is analytic.

Model points are in meters, in the head model's space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch

from ..cameras import frontal_rotation
from ..flame import contour_rows, rotation_yaw_degrees
from ..head_model import HeadModel

@dataclass
class LandmarkBasis:
    """Landmark-level linear pieces of FLAME for fitting.

    Points P = 51 static + R*17 contour (all yaw rows) + M dense + 2 pupils.
    M0 [P,3], MD [P,3,C] (C = n_shape + n_exp), MP [P,3,36]; per skinned joint
    k in (jaw, left eye, right eye): W0 [3,P,3], WD [3,P,3,C], WP [3,P,3,36],
    omega [3,P]; joints J0 [3,3], Jd [3,3,C] (jaw, eyes). Meters.
    """

    M0: torch.Tensor
    MD: torch.Tensor
    MP: torch.Tensor
    W0: torch.Tensor
    WD: torch.Tensor
    WP: torch.Tensor
    omega: torch.Tensor
    J0: torch.Tensor
    Jd: torch.Tensor
    n_shape: int
    n_exp: int
    n_static: int
    n_rows: int
    n_dense: int
    mediapipe_indices: np.ndarray
    has_jaw: bool = True

    @property
    def contour_start(self) -> int:
        return self.n_static

    @property
    def dense_start(self) -> int:
        return self.n_static + 17 * self.n_rows

    @property
    def pupil_start(self) -> int:
        return self.dense_start + self.n_dense


def build_basis(model: "HeadModel") -> LandmarkBasis:
    """Precompute the landmark-level arrays of a head model (FLAME, ICT;
    `head_model.HeadModel`) in float64, stored as float32.

    Models without pose correctives (ICT) get MP = 0; a model without a jaw
    joint (ICT, all jaw weights 0) leaves the jaw block out of every fit
    (`has_jaw`)."""
    parts = model.linear_parts()
    faces = model.faces.cpu()
    dtype = torch.float64
    v_t, dirs, weights = parts.v_template.to(dtype), parts.dirs.to(dtype), parts.weights.to(dtype)
    R = model.dynamic_faces.shape[0]
    face_idx = torch.cat([model.static_faces.cpu(), model.dynamic_faces.cpu().reshape(-1),
                          model.dense_faces.cpu()])
    bary = torch.cat([model.static_bary.cpu(), model.dynamic_bary.cpu().reshape(-1, 3),
                      model.dense_bary.cpu()]).to(dtype)
    corner = faces[face_idx]  # [P,3]
    # Pupils: the most forward vertex of each eyeball (vertices skinned to an eye).
    pupils = []
    for k in (1, 2):
        ids = torch.nonzero(weights[:, k] > 0.5).flatten()
        if len(ids) == 0:
            raise ValueError(f"{model.name} model has no vertices skinned to the eye joints")
        pupils.append(ids[torch.argmax(v_t[ids, 2])])
    corner = torch.cat([corner, torch.stack([torch.stack([p, p, p]) for p in pupils])])
    bary = torch.cat([bary, torch.tensor([[1.0, 0, 0], [1.0, 0, 0]], dtype=dtype)])

    def comb(a, w=None):  # a [V,...] -> [P,...], barycentric (optionally weighted)
        g = a[corner]  # [P,3,...]
        b = bary if w is None else bary * w[corner]
        return torch.einsum("pj,pj...->p...", b, g)

    P = corner.shape[0]
    if parts.posedirs is None:  # no pose correctives: the MP/WP arrays stay zero
        MP = torch.zeros(P, 3, 36, dtype=dtype)
        WP = [MP] * 3
    else:
        posedirs = parts.posedirs.to(dtype)
        MP = comb(posedirs)
        WP = [comb(posedirs, weights[:, k]) for k in range(3)]
    f32 = lambda x: x.to(torch.float32).contiguous()  # noqa: E731
    return LandmarkBasis(
        M0=f32(comb(v_t)), MD=f32(comb(dirs)), MP=f32(MP),
        W0=f32(torch.stack([comb(v_t, weights[:, k]) for k in range(3)])),
        WD=f32(torch.stack([comb(dirs, weights[:, k]) for k in range(3)])),
        WP=f32(torch.stack(WP)),
        omega=f32(torch.stack([(bary * weights[corner, k]).sum(1) for k in range(3)])),
        J0=f32(parts.joints), Jd=f32(parts.joint_dirs),
        n_shape=model.n_shape, n_exp=model.n_exp, n_static=model.static_faces.shape[0],
        n_rows=R, n_dense=model.n_dense, mediapipe_indices=model.mediapipe_indices.cpu().numpy(),
        has_jaw=bool((weights[:, 0] > 0).any()),
    )


# ----------------------------------------------------------------------------
# Model evaluation


def _skew(v: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(v[..., 0])
    return torch.stack([z, -v[..., 2], v[..., 1], v[..., 2], z, -v[..., 0], -v[..., 1], v[..., 0], z],
                       -1).reshape(v.shape[:-1] + (3, 3))


_GENERATORS = _skew(torch.eye(3))  # [3,3,3]: [e_i]x


def _feature_derivative(R: torch.Tensor) -> torch.Tensor:
    """d vec(exp([d]x) R - I) / dd at d = 0: [T,3(i),9]."""
    return torch.einsum("iab,tbc->tiac", _GENERATORS, R).reshape(R.shape[0], 3, 9)


# Active points, in this order: static 68-point landmarks (51), dense
# mediapipe points (M) -- together the "shared" points, the same for every
# frame -- then the 17 contour points of each frame's yaw row, then the two
# pupils. Shared points use plain matrix products over all frames; only the
# contour needs per-frame gathered arrays.


def active_point_layout(basis: LandmarkBasis) -> Dict[str, slice]:
    n, m = basis.n_static, basis.n_dense
    return {"lmk68_inner": slice(0, n), "dense": slice(n, n + m), "contour": slice(n + m, n + m + 17),
            "pupils": slice(n + m + 17, n + m + 19)}


_POSE = slice(9, 36)  # pose-corrective features of jaw and eyes (the neck stays at rest)
_ROT_FEATURES = {"jaw": slice(0, 9), "leye": slice(9, 18), "reye": slice(18, 27)}  # within _POSE


def fold_shape(basis: LandmarkBasis, shape: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Arrays of every basis point with the shape folded in: M0 [..,3],
    ME [..,3,E], MP [..,3,36], the jaw's W0, WE, WP, omega, and Q [..,6,E+27]
    (what a face point's Jacobian multiplies, see `point_jacobians`); the
    shared points' (static + dense) s_*, the pupils' p_*, joints J0 [3,3]
    and JE [3,3,E] (jaw, left eye, right eye). None depends on the contour
    rows, so a fit computes them once."""
    S = basis.n_shape
    JE = basis.Jd[..., S:]
    WE = basis.WD[0][..., S:]
    # Face points follow the jaw: X = M + Aj (W - omega Jj), so d X = [I | Aj] Q d(e, feat).
    Q = torch.cat([torch.cat([basis.MD[..., S:], WE - basis.omega[0][:, None, None] * JE[0]], 1),
                   torch.cat([basis.MP[..., _POSE], basis.WP[0][..., _POSE]], 1)], 2)
    out = {"M0": basis.M0 + basis.MD[..., :S] @ shape, "ME": basis.MD[..., S:], "MP": basis.MP,
           "W0": basis.W0[0] + basis.WD[0][..., :S] @ shape, "WE": WE, "WP": basis.WP[0],
           "omega": basis.omega[0], "Q": Q}
    cs, ds, ps = basis.contour_start, basis.dense_start, basis.pupil_start
    shared_ids = torch.cat([torch.arange(cs), torch.arange(ds, ps)])
    out.update({"s_" + k: a[shared_ids] for k, a in out.items()})
    out.update(p_M0=out["M0"][ps:ps + 2], p_ME=out["ME"][ps:ps + 2], p_MP=out["MP"][ps:ps + 2],
               J0=basis.J0 + basis.Jd[..., :S] @ shape, JE=JE)
    return out


_CONTOUR_KEYS = ("M0", "ME", "MP", "W0", "WE", "WP", "omega", "Q")


def _contour_ids(basis: LandmarkBasis, rows: torch.Tensor) -> torch.Tensor:
    """Basis point index [T,17] of each frame's 17 contour points in its row."""
    return basis.contour_start + rows[:, None] * 17 + torch.arange(17)


def point_arrays(basis: LandmarkBasis, rows: torch.Tensor, shape: Optional[torch.Tensor] = None,
                  folded: Optional[Dict[str, torch.Tensor]] = None, jacobians: bool = True) -> Dict[str, torch.Tensor]:
    """The active points' arrays: those of `fold_shape` (given, or computed
    from `shape`) with the contour's c_* gathered per frame by `rows` [T]
    ([T,17,...]); c_Q, the largest, only for fits that form expression or
    pose Jacobians (`jacobians`)."""
    f = fold_shape(basis, shape) if folded is None else folded
    contour_ids = _contour_ids(basis, rows)
    out = {k: v for k, v in f.items() if k.startswith(("s_", "p_", "J"))}
    out.update({"c_" + k: f[k][contour_ids] for k in _CONTOUR_KEYS if jacobians or k != "Q"})
    return out


def held_contour_rows(head_rotation: torch.Tensor, n_rows: int, previous: Optional[torch.Tensor],
                      margin_deg: float = 0.25) -> torch.Tensor:
    """`contour_rows` with hysteresis: a frame keeps its previous row [T]
    while its yaw stays within 0.5 + margin_deg degrees of that row's yaw.
    Without it a frame whose yaw sits near a half degree flipped rows every
    iteration, each flip undoing the last step's gain: calibration spent its
    last 15 iterations moving the cost by ~4 per step, one flip each."""
    rows = contour_rows(head_rotation, n_rows)
    if previous is None:
        return rows
    half = (n_rows - 1) // 2
    previous_yaw = torch.where(previous > half, half - previous, previous).to(head_rotation.dtype)
    keep = (rotation_yaw_degrees(head_rotation) - previous_yaw).abs() < 0.5 + margin_deg
    return torch.where(keep, previous, rows)


def update_contour(arrays: Dict[str, torch.Tensor], basis: LandmarkBasis, folded: Dict[str, torch.Tensor],
                    rows: torch.Tensor, changed: torch.Tensor) -> None:
    """Regather the contour arrays c_* of `point_arrays` in place for the
    frames whose rows `changed` [T]: a few frames switch rows per
    iteration, and regathering all took ~40 ms per fit of 250 frames."""
    t = torch.nonzero(changed).flatten()
    contour_ids = _contour_ids(basis, rows[t])
    for k in _CONTOUR_KEYS:
        if "c_" + k in arrays:
            arrays["c_" + k][t] = folded[k][contour_ids]


def times_3x3(X: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """X @ M[t] for X [T,...,3] and M [T,3,3], as three broadcast
    multiply-adds: batched matrix products with 3x3 factors took 2x as long
    (and 4-8x with a broadcast batch dimension)."""
    Xf = X.reshape(X.shape[0], -1, 3)
    out = Xf[..., 0:1] * M[:, None, 0] + Xf[..., 1:2] * M[:, None, 1] + Xf[..., 2:3] * M[:, None, 2]
    return out.reshape(X.shape)


def _per_frame_contract(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_k A[t,p,c,k] x[t,k] -> [T,P,C], as a row vector times a matrix
    per frame: einsum's matrix-times-vector path took 5-6x longer."""
    T, P, C, K = A.shape
    return (x[:, None, :] @ A.reshape(T, P * C, K).transpose(1, 2)).reshape(T, P, C)


def _face_points(a: Dict[str, torch.Tensor], pre: str, expression, feat, Aj, Jj, shared: bool):
    """Face points X [T,P,3] and their jaw-relative Y [T,P,3] for one set."""
    if shared:
        M = a[pre + "M0"] + torch.einsum("pce,te->tpc", a[pre + "ME"], expression) \
            + torch.einsum("pcf,tf->tpc", a[pre + "MP"], feat)
        W = a[pre + "W0"] + torch.einsum("pce,te->tpc", a[pre + "WE"], expression) \
            + torch.einsum("pcf,tf->tpc", a[pre + "WP"], feat)
    else:
        M = a[pre + "M0"] + _per_frame_contract(a[pre + "ME"], expression) + _per_frame_contract(a[pre + "MP"], feat)
        W = a[pre + "W0"] + _per_frame_contract(a[pre + "WE"], expression) + _per_frame_contract(a[pre + "WP"], feat)
    Y = W - a[pre + "omega"][..., None] * Jj[:, None]
    return M + times_3x3(Y, Aj.transpose(1, 2)), Y


def model_points(basis: LandmarkBasis, arrays, expression, jaw_R, eye_R):
    """Model-space points [T,P,3] (layout of `active_point_layout`) and the
    intermediate quantities their Jacobians reuse (`point_jacobians`).

    Face points follow the jaw: X = M + (Rj - I)(W - omega Jj); a pupil is
    skinned to its eye alone: X = Je + Re (M - Je).
    """
    a = arrays
    T = expression.shape[0]
    eye3 = torch.eye(3)
    feat = torch.cat([torch.zeros(T, 9), (jaw_R - eye3).reshape(T, 9), (eye_R - eye3).reshape(T, 18)], 1)
    Jk = a["J0"][None] + torch.einsum("kce,te->tkc", a["JE"], expression)  # [T,3,3]
    Jj, Je = Jk[:, 0], Jk[:, 1:]
    Aj = jaw_R - eye3
    Xs, Ys = _face_points(a, "s_", expression, feat, Aj, Jj, True)
    Xc, Yc = _face_points(a, "c_", expression, feat, Aj, Jj, False)
    pM = a["p_M0"][None] + torch.einsum("ice,te->tic", a["p_ME"], expression) \
        + torch.einsum("icf,tf->tic", a["p_MP"], feat)
    rel = torch.einsum("tiab,tib->tia", eye_R, pM - Je)  # Re (M - Je)
    X = torch.cat([Xs, Xc, Je + rel], 1)
    return X, {"Aj": Aj, "Y": torch.cat([Ys, Yc], 1), "rel": rel}


def point_jacobians(a, parts, G: torch.Tensor, jaw_R, eye_R, need) -> Dict[str, torch.Tensor]:
    """Pixel Jacobians [T,P,2,K] of the blocks in `need` (exp: K=E; jaw,
    leye, reye: K=3, left-increments of the rotations), given G [T,P,2,3],
    the derivative of the pixels by the model-space points.

    The model-space Jacobians are never formed: a face point's derivative is
    [I | Aj] Q, so G [I | Aj] (six numbers per pixel row) times the constant
    Q of its point is one batched product for expression and pose correctives
    together.
    """
    if not need:  # a rigid fit: no model-space derivative to form
        return {}
    T, P = G.shape[:2]
    Ps = a["s_Q"].shape[0]
    Pf = P - 2
    Gf = G[:, :Pf]
    G6 = torch.cat([Gf, times_3x3(Gf, parts["Aj"])], -1)  # [T,Pf,2,6]
    K = a["s_Q"].shape[-1]
    E = K - 27
    face = torch.empty(T, Pf, 2, K)
    # Shared points: batch over points, frames and both pixel rows in the rows.
    face[:, :Ps] = torch.bmm(G6[:, :Ps].permute(1, 0, 2, 3).reshape(Ps, 2 * T, 6),
                             a["s_Q"]).reshape(Ps, T, 2, K).transpose(0, 1)
    face[:, Ps:] = G6[:, Ps:] @ a["c_Q"]
    Gp = G[:, Pf:]  # pupils [T,2,2,3]
    out = {}
    if "exp" in need:
        pJE = a["JE"][1:]
        d_p = pJE[None] + torch.einsum("tiab,ibe->tiae", eye_R, a["p_ME"] - pJE)  # [T,2,3,E]
        out["exp"] = torch.cat([face[..., :E], Gp @ d_p], 1)
    rots = [k for k in ("jaw", "leye", "reye") if k in need]
    if rots:
        pupil_pose = Gp @ (eye_R @ a["p_MP"][None, ..., _POSE])  # [T,2,2,27]
        pose = torch.cat([face[..., E:], pupil_pose], 1)  # [T,P,2,27]
        Rs = {"jaw": jaw_R, "leye": eye_R[:, 0], "reye": eye_R[:, 1]}
        # All joints in one product with a block matrix of the feature
        # derivatives: per joint, the [T,2P,9] x [T,9,3] products took 3x longer.
        D = torch.zeros(T, 27, 3 * len(rots))
        for i, k in enumerate(rots):
            D[:, _ROT_FEATURES[k], 3 * i:3 * i + 3] = _feature_derivative(Rs[k]).transpose(1, 2)
        d_all = (pose.reshape(T, P * 2, 27) @ D).reshape(T, P, 2, 3 * len(rots))
        for i, k in enumerate(rots):
            d = d_all[..., 3 * i:3 * i + 3]
            # Rigid parts: d(exp([d]x) R y)/dd = -[R y]x, and g^T (-[v]x) = (v x g)^T.
            if k == "jaw":
                v = times_3x3(parts["Y"], jaw_R.transpose(1, 2))  # [T,Pf,3]
                d[:, :Pf] += torch.linalg.cross(v[:, :, None].expand_as(Gf), Gf, dim=-1)
            else:
                e = 0 if k == "leye" else 1
                d[:, Pf + e] += torch.linalg.cross(parts["rel"][:, e, None].expand_as(Gp[:, e]), Gp[:, e], dim=-1)
            out[k] = d
    return out


def head_rotation_flame(R_cv: torch.Tensor) -> torch.Tensor:
    """Head rotation relative to a camera looking along FLAME's -z, for the
    yaw-dependent contour: FRONTAL_ROTATION @ R_cv (identity for a frontal face)."""
    return frontal_rotation(R_cv) @ R_cv


def model_jacobian_blocks(free) -> set:
    """The model-space Jacobians (`point_jacobians`) the free blocks need;
    none for a rigid fit."""
    return ({"exp", "jaw"} & set(free)) | ({"leye", "reye"} if "eyes" in free else set())

