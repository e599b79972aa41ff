"""Batched landmark fitting of all frames (Levenberg-Marquardt, per-frame blocks).

Speed comes from evaluating only the points the losses touch. FLAME's
landmarks are barycentric combinations of skinned vertices; with the root and
neck at rest (the head rotation lives in the camera extrinsics) every posed
vertex is ``v = v_p + sum_k w_k (R_k - I)(v_p - J_k)`` over jaw and eyes, so a
landmark is exactly

    X = M(c, f) + sum_k (R_k - I) (W_k(c, f) - omega_k J_k(c))

with M, W_k linear in the blendshape coefficients c and the pose-corrective
feature f, precomputed per landmark (`LandmarkBasis`). A frame's residuals
then cost a few small matrix products, and their Jacobian is analytic.

Camera: OpenCV pinhole, x right, y down, z forward; a model point X (meters,
FLAME space) maps to p = R X + t and projects to (fx p_x/p_z + cx, fy p_y/p_z + cy)
in crop pixels, pixel centres at integer coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..flame import contour_rows, rotation_yaw_degrees
from ..head_model import HeadModel
from ..cameras import frontal_rotation, project_points
from ..lbs import batch_rodrigues, rotation_matrix_to_axis_angle

JAW, LEYE, REYE = 2, 3, 4
# Eyelid and inner-lip pairs (iBUG indices) whose distances the closure terms fit.
CLOSURE_PAIRS = ((37, 41), (38, 40), (43, 47), (44, 46), (61, 67), (62, 66), (63, 65))
# mediapipe's refined-landmark iris centres: subject's right eye, left eye.
IRIS_CENTRES = (468, 473)


# ----------------------------------------------------------------------------
# Landmark basis


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
# Parameters and targets


@dataclass
class FrameParams:
    """Per-frame parameters. rotation [T,3,3] and translation [T,3] map FLAME
    space to OpenCV camera space (meters); expression [T,E]; jaw [T,3] and
    eyes [T,6] (left, right) axis-angle radians; shape [S] shared."""

    rotation: torch.Tensor
    translation: torch.Tensor
    expression: torch.Tensor
    jaw: torch.Tensor
    eyes: torch.Tensor
    shape: torch.Tensor

    def clone(self) -> "FrameParams":
        return FrameParams(*(getattr(self, f).clone() for f in
                             ("rotation", "translation", "expression", "jaw", "eyes", "shape")))

    def select(self, idx) -> "FrameParams":
        return FrameParams(self.rotation[idx], self.translation[idx], self.expression[idx],
                           self.jaw[idx], self.eyes[idx], self.shape)


@dataclass
class Targets:
    """Detected 2-D points in crop pixels, NaN where missing.
    lmk68 [T,68,2]; dense [T,M,2] (mediapipe points matching the dense
    embedding); iris [T,2,2] (right, left eye centres)."""

    lmk68: torch.Tensor
    dense: torch.Tensor
    iris: torch.Tensor

    @staticmethod
    def from_landmarks(lmk68: np.ndarray, lmk_dense: Optional[np.ndarray], basis: LandmarkBasis) -> "Targets":
        T = lmk68.shape[0]
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        if lmk_dense is None or lmk_dense.shape[1] < 478:
            dense = np.full((T, basis.n_dense, 2), np.nan, np.float32)
            iris = np.full((T, 2, 2), np.nan, np.float32)
        else:
            dense = lmk_dense[:, basis.mediapipe_indices]
            iris = lmk_dense[:, list(IRIS_CENTRES)]
        return Targets(t(lmk68), t(dense), t(iris))

    def select(self, idx) -> "Targets":
        return Targets(self.lmk68[idx], self.dense[idx], self.iris[idx])


@dataclass
class FitConfig:
    """Weights are inverse variances in the units noted (pixels at a 512 px
    crop; they scale with the crop size)."""

    w_lmk68: float = 1.0
    w_contour: float = 0.3          # detectors place the jaw line loosely
    w_dense: float = 1.0
    w_iris: float = 0.5
    w_closure: float = 1.0
    sigma_expression: float = 2.0   # expression coefficients ~ N(0, sigma^2)
    sigma_jaw_open: float = 0.3     # rad, rotation about x
    sigma_jaw_side: float = 0.03    # rad, y/z components
    sigma_eyes: float = 0.3
    sigma_shape: float = 1.0
    # Temporal prior: allowed frame-to-frame change (per frame at 25 fps).
    smooth_rotation: float = 0.02   # rad
    smooth_translation: float = 0.003  # m
    smooth_expression: float = 0.5
    smooth_jaw: float = 0.05
    smooth_eyes: float = 0.1
    robust_scale_px: float = 4.0    # Geman-McClure scale at 512 px
    # The robust weights are re-estimated after each of the first iterations
    # only, then held: re-weighting every iteration kept lowering the weights
    # of points the model cannot reach, and on real video the fit crept on
    # for 15+ iterations at ~1 % per iteration, its 68-point error rising.
    robust_updates: int = 3
    max_iters: int = 20
    tol: float = 1e-3
    image_size: int = 512
    # Hard bounds (lo, hi) of every expression coefficient, or None: each LM
    # step of `fit_frames` is projected onto them (ICT's ARKit-style weights
    # lie in [0, 1]); calibration runs without them
    # (`pipeline.calibration_fit_config` says why).
    expression_bounds: Optional[Tuple[float, float]] = None


def fit_config_for(model: "HeadModel", cfg: FitConfig) -> FitConfig:
    """`cfg` with the model's expression prior and bounds
    (`HeadModel.parameter_blocks`)."""
    block = model.parameter_blocks()["expression"]
    smooth = cfg.smooth_expression if block.temporal_sigma is None else block.temporal_sigma
    return replace(cfg, sigma_expression=block.sigma, expression_bounds=block.bounds, smooth_expression=smooth)


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


# ----------------------------------------------------------------------------
# Model evaluation
#
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
    (what a face point's Jacobian multiplies, see `_point_jacobians`); the
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


def _point_arrays(basis: LandmarkBasis, rows: torch.Tensor, shape: Optional[torch.Tensor] = None,
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


def _update_contour(arrays: Dict[str, torch.Tensor], basis: LandmarkBasis, folded: Dict[str, torch.Tensor],
                    rows: torch.Tensor, changed: torch.Tensor) -> None:
    """Regather the contour arrays c_* of `_point_arrays` in place for the
    frames whose rows `changed` [T]: a few frames switch rows per
    iteration, and regathering all took ~40 ms per fit of 250 frames."""
    t = torch.nonzero(changed).flatten()
    contour_ids = _contour_ids(basis, rows[t])
    for k in _CONTOUR_KEYS:
        if "c_" + k in arrays:
            arrays["c_" + k][t] = folded[k][contour_ids]


def _times_3x3(X: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
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
    return M + _times_3x3(Y, Aj.transpose(1, 2)), Y


def model_points(basis: LandmarkBasis, arrays, expression, jaw_R, eye_R):
    """Model-space points [T,P,3] (layout of `active_point_layout`) and the
    intermediate quantities their Jacobians reuse (`_point_jacobians`).

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


def _point_jacobians(a, parts, G: torch.Tensor, jaw_R, eye_R, need) -> Dict[str, torch.Tensor]:
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
    G6 = torch.cat([Gf, _times_3x3(Gf, parts["Aj"])], -1)  # [T,Pf,2,6]
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
                v = _times_3x3(parts["Y"], jaw_R.transpose(1, 2))  # [T,Pf,3]
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


# ----------------------------------------------------------------------------
# Residuals


ALL_BLOCKS = ("rot", "trans", "exp", "jaw", "eyes")


def _layout(E: int) -> Dict[str, slice]:
    return {"rot": slice(0, 3), "trans": slice(3, 6), "exp": slice(6, 6 + E),
            "jaw": slice(6 + E, 9 + E), "eyes": slice(9 + E, 15 + E)}


@dataclass
class FitResult:
    params: FrameParams
    iterations: int
    rmse68_px: float
    rmse_dense_px: float
    cost_history: list = field(default_factory=list)


def _targets_in_layout(basis: LandmarkBasis, targets: Targets) -> torch.Tensor:
    """Targets [T,P,2] in the active point layout (pupils: left, right eye)."""
    return torch.cat([targets.lmk68[:, 17:], targets.dense, targets.lmk68[:, :17], targets.iris[:, [1, 0]]], 1)


def _point_weights(basis: LandmarkBasis, cfg: FitConfig) -> torch.Tensor:
    return torch.cat([torch.full((basis.n_static,), cfg.w_lmk68), torch.full((basis.n_dense,), cfg.w_dense),
                      torch.full((17,), cfg.w_contour), torch.full((2,), cfg.w_iris)])


def _closure_index(basis: LandmarkBasis) -> Tuple[torch.Tensor, torch.Tensor]:
    lay = active_point_layout(basis)

    def pos(i):  # iBUG index -> active point index
        return (i - 17) if i >= 17 else lay["contour"].start + i

    return (torch.tensor([pos(a) for a, _ in CLOSURE_PAIRS]), torch.tensor([pos(b) for _, b in CLOSURE_PAIRS]))


def _model_needs(free) -> set:
    """The model-space Jacobians (`_point_jacobians`) the free blocks need;
    none for a rigid fit."""
    return ({"exp", "jaw"} & set(free)) | ({"leye", "reye"} if "eyes" in free else set())


def point_residuals(basis, arrays, params, targets, focal, pp, cfg, free=(), robust_w=None, points=None):
    """Weighted point and closure residuals r [T,N] (in 512-pixel units) and,
    for the blocks in `free` (of rot, trans, exp, jaw, eyes), the Jacobian
    J [T,N,D_free] with columns in `_layout` order restricted to `free`;
    "focal" in `free` appends one column, d r / d log f (fx = fy = f).
    Also returns the per-point pixel errors [T,P] and validity [T,P].
    points: the model-space points [T,P,3] of `params`, when the caller
    holds them (a rigid fit: they do not change); then `free` may hold
    only rot, trans and focal."""
    T = params.rotation.shape[0]
    if points is None:
        jaw_R = batch_rodrigues(params.jaw)
        eye_R = batch_rodrigues(params.eyes.reshape(-1, 3)).reshape(T, 2, 3, 3)
        X, parts = model_points(basis, arrays, params.expression, jaw_R, eye_R)
    else:
        X = points
    RX = _times_3x3(X, params.rotation.transpose(1, 2))
    pcam = RX + params.translation[:, None]
    uv = project_points(pcam, focal, pp)
    scale = 512.0 / cfg.image_size  # residuals in "512-pixel" units
    tgt = _targets_in_layout(basis, targets)
    valid = torch.isfinite(tgt).all(-1)
    diff = (uv - torch.nan_to_num(tgt)) * scale  # [T,P,2]
    w = _point_weights(basis, cfg)[None] * valid
    if robust_w is not None:
        w = w * robust_w
    sw = w.sqrt()[..., None]
    pa, pb = _closure_index(basis)
    cw = ((valid[:, pa] & valid[:, pb]).float() * cfg.w_closure).sqrt()[..., None]
    r = torch.cat([(diff * sw).reshape(T, -1), ((diff[:, pa] - diff[:, pb]) * cw).reshape(T, -1)], 1)
    err = diff.norm(dim=-1) / scale
    if not free:
        return r, None, err, valid
    P = X.shape[1]
    z = pcam[..., 2].clamp(min=1e-6)
    fx, fy = focal[0], focal[1]
    du = torch.stack([fx / z, torch.zeros_like(z), -fx * pcam[..., 0] / z ** 2], -1) * scale  # [T,P,3]
    dv = torch.stack([torch.zeros_like(z), fy / z, -fy * pcam[..., 1] / z ** 2], -1) * scale
    dproj = torch.stack([du, dv], 2)  # [T,P,2,3] d uv / d pcam
    G = (dproj.reshape(T, P * 2, 3) @ params.rotation).reshape(T, P, 2, 3)  # d uv / d model point
    model_jac = _point_jacobians(arrays, parts, G, jaw_R, eye_R, _model_needs(free)) if points is None else {}
    blocks = []
    for b in ("rot", "trans", "exp", "jaw", "eyes"):
        if b not in free:
            continue
        if b == "rot":  # d(exp([d]x) R X)/dd = -[R X]x
            blocks.append(torch.linalg.cross(RX[:, :, None].expand_as(dproj), dproj, dim=-1))
        elif b == "trans":
            blocks.append(dproj)
        elif b == "eyes":
            blocks += [model_jac["leye"], model_jac["reye"]]
        else:
            blocks.append(model_jac[b])
    if "focal" in free:  # u = f x/z + cx: d u / d log f = u - cx
        blocks.append(((uv - pp) * scale)[..., None])
    D = sum(x.shape[-1] for x in blocks)
    n_cl = len(pa)
    J = torch.empty(T, 2 * (P + n_cl), D)
    Jp = J[:, :2 * P].view(T, P, 2, D)
    c = 0
    for x in blocks:
        Jp[..., c:c + x.shape[-1]] = x
        c += x.shape[-1]
    J[:, 2 * P:] = ((Jp[:, pa] - Jp[:, pb]) * cw[..., None]).reshape(T, -1, D)
    Jp.mul_(sw[..., None])
    return r, J, err, valid


def _prior_sigmas(cfg: FitConfig, E: int) -> torch.Tensor:
    """Prior standard deviations of all 15+E per-frame parameters (inf = none)."""
    s = torch.full((15 + E,), float("inf"))
    L = _layout(E)
    s[L["exp"]] = cfg.sigma_expression
    s[L["jaw"]] = torch.tensor([cfg.sigma_jaw_open, cfg.sigma_jaw_side, cfg.sigma_jaw_side])
    s[L["eyes"]] = cfg.sigma_eyes
    return s


def _temporal_sigmas(cfg: FitConfig, E: int) -> torch.Tensor:
    s = torch.empty(15 + E)
    L = _layout(E)
    s[L["rot"]], s[L["trans"]] = cfg.smooth_rotation, cfg.smooth_translation
    s[L["exp"]], s[L["jaw"]], s[L["eyes"]] = cfg.smooth_expression, cfg.smooth_jaw, cfg.smooth_eyes
    return s


def _param_vector_terms(params: FrameParams, cfg: FitConfig, neighbours) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prior and temporal terms as residual values a [T,15+E] with per-entry
    weights w [T,15+E] (cost = sum w a^2; Jacobian of a is the identity in
    the increment parametrisation)."""
    T, E = params.expression.shape
    L = _layout(E)
    a = torch.zeros(T, 15 + E)
    a[:, L["exp"]] = params.expression
    a[:, L["jaw"]] = params.jaw
    a[:, L["eyes"]] = params.eyes
    w = (1.0 / _prior_sigmas(cfg, E) ** 2).expand(T, -1).clone()
    terms = [(a, w)]
    if neighbours is not None:
        nb_R, nb_t, nb_e, nb_j, nb_y, nb_w = neighbours
        b = torch.zeros(T, 15 + E)
        b[:, L["rot"]] = rotation_matrix_to_axis_angle(params.rotation @ nb_R.transpose(1, 2))
        b[:, L["trans"]] = params.translation - nb_t
        b[:, L["exp"]] = params.expression - nb_e
        b[:, L["jaw"]] = params.jaw - nb_j
        b[:, L["eyes"]] = params.eyes - nb_y
        terms.append((b, nb_w[:, None] / _temporal_sigmas(cfg, E)[None] ** 2))
    return terms


def _vector_cost(terms) -> torch.Tensor:
    return sum((w * a ** 2).sum(1) for a, w in terms)


def _apply_step(params: FrameParams, step: torch.Tensor, E: int, free=ALL_BLOCKS,
                bounds: Optional[Tuple[float, float]] = None) -> FrameParams:
    """params moved by step [T,15+E] (`_layout`); blocks not in `free` are
    copied unchanged (their rotation updates are most of a rigid fit's step).
    bounds: the expression is projected onto [lo, hi] (a projected LM step;
    the trial's cost is that of the projected point)."""
    L = _layout(E)
    T = step.shape[0]
    rotation = (batch_rodrigues(step[:, L["rot"]]) @ params.rotation if "rot" in free
                else params.rotation.clone())
    translation = params.translation + step[:, L["trans"]] if "trans" in free else params.translation.clone()
    expression = params.expression + step[:, L["exp"]] if "exp" in free else params.expression.clone()
    if bounds is not None and "exp" in free:
        expression = expression.clamp(bounds[0], bounds[1])
    jaw, eyes = params.jaw.clone(), params.eyes.clone()
    joints = [k for k in ("jaw", "eyes") if k in free]
    if joints:
        # jaw and eye rotations composed as one batch of [T*n,3] vectors: for
        # calibration's 32 frames each tiny op costs more in dispatch than in work
        current = torch.cat([getattr(params, k) for k in joints], 1).reshape(-1, 3)
        delta = torch.cat([step[:, L[k]] for k in joints], 1).reshape(-1, 3)
        moved = rotation_matrix_to_axis_angle(batch_rodrigues(delta) @ batch_rodrigues(current)).reshape(T, -1)
        if "jaw" in free:
            jaw, moved = moved[:, :3], moved[:, 3:]
        if "eyes" in free:
            eyes = moved
    return FrameParams(rotation, translation, expression, jaw, eyes, params.shape.clone())


def active_bounds(expression: torch.Tensor, grad: torch.Tensor, bounds: Optional[Tuple[float, float]]) -> torch.Tensor:
    """[T,E] bool: expression coefficients at a bound whose gradient
    `grad` [T,E] points out of the box. A projected step moves them nowhere,
    and their unconstrained step only bends everyone else's: LM then
    rejected trial after trial (calibration stalled tens of percent off the
    focal on heads with most weights at 0). Projected Newton holds them."""
    if bounds is None:
        return torch.zeros_like(expression, dtype=torch.bool)
    lo, hi = bounds
    return ((expression <= lo + 1e-6) & (grad > 0)) | ((expression >= hi - 1e-6) & (grad < 0))


def hold_coordinates(H: torch.Tensor, g: torch.Tensor, held: torch.Tensor, coupling: Optional[torch.Tensor] = None):
    """(H, g, coupling) with the coordinates `held` [T,D] removed from
    per-frame normal equations H [T,D,D], g [T,D] (their step comes out 0)
    and from the rows of a shared-parameter coupling block [T,D,n]."""
    if not bool(held.any()):
        return H, g, coupling
    keep = (~held).to(H.dtype)
    H = H * keep[:, :, None] * keep[:, None, :] + torch.diag_embed(held.to(H.dtype))
    g = g * keep.reshape(g.shape[:2] + (1,) * (g.dim() - 2))
    if coupling is not None:
        coupling = coupling * keep[:, :, None]
    return H, g, coupling


def _neighbour_means(params: FrameParams, order_ok: torch.Tensor):
    """Mean of each frame's previous and next frame (one side at the ends),
    and the number of neighbours (0, 1 or 2) / 2 as the prior's weight."""
    T = params.rotation.shape[0]
    idx_prev = torch.clamp(torch.arange(T) - 1, min=0)
    idx_next = torch.clamp(torch.arange(T) + 1, max=T - 1)
    has_prev = (torch.arange(T) > 0) & order_ok
    has_next = (torch.arange(T) < T - 1) & torch.cat([order_ok[1:], torch.tensor([False])])
    wp, wn = has_prev.float(), has_next.float()
    n = (wp + wn).clamp(min=1)

    def mean(a):
        sh = (T,) + (1,) * (a.dim() - 1)
        return (a[idx_prev] * wp.view(sh) + a[idx_next] * wn.view(sh)) / n.view(sh)

    Rm = mean(params.rotation)
    U, _, Vh = torch.linalg.svd(Rm)
    d = torch.det(U @ Vh)
    U = U.clone()
    U[:, :, 2] *= d[:, None]
    return (U @ Vh, mean(params.translation), mean(params.expression), mean(params.jaw), mean(params.eyes),
            (wp + wn) / 2)


# ----------------------------------------------------------------------------
# The solver

def _normal_equations(basis, arrays, params, targets, focal, pp, cfg, free, robust, points, block: int = 128):
    """(r [T,N], J^T J [T,D,D], J^T r [T,D], per-point errors [T,P],
    validity [T,P]): `point_residuals` with each frame's Gauss-Newton
    blocks in place of J, formed `block` frames at a time: the Jacobians of
    a block stay in cache and are never held for all frames (at 1000 frames
    J alone is ~95 MB)."""
    T = params.rotation.shape[0]
    if T <= block:
        r, J, err, valid = point_residuals(basis, arrays, params, targets, focal, pp, cfg, free, robust, points)
        return r, J.transpose(1, 2) @ J, (r[:, None] @ J)[:, 0], err, valid  # r J: 5x faster than J^T r
    parts = []
    for s in range(0, T, block):
        sl = slice(s, min(T, s + block))
        arr = {k: (v[sl] if k.startswith("c_") else v) for k, v in arrays.items()}
        parts.append(_normal_equations(basis, arr, params.select(sl), targets.select(sl), focal, pp, cfg, free,
                                       None if robust is None else robust[sl],
                                       None if points is None else points[sl], block))
    return tuple(torch.cat(x) for x in zip(*parts))


def _feasible_fraction(expression: torch.Tensor, step: torch.Tensor, bounds: Tuple[float, float]) -> torch.Tensor:
    """Per frame [T], the largest fraction (<= 1) of the expression step
    [T,E] that keeps every weight inside `bounds` (weights already at a
    bound and moving out do not count: clipping keeps them there)."""
    lo, hi = bounds
    room = torch.where(step < 0, (lo - expression) / step.clamp(max=-1e-12),
                       torch.where(step > 0, (hi - expression) / step.clamp(min=1e-12), torch.ones_like(step)))
    room = torch.where(room > 1e-9, room, torch.ones_like(room))
    return room.clamp(max=1.0).amin(1)


def g_full_exp(g: torch.Tensor, free_idx: torch.Tensor, L: Dict[str, slice]) -> torch.Tensor:
    """The expression entries [T,E] of a gradient over the free columns."""
    pos = {int(c): i for i, c in enumerate(free_idx)}
    return g[:, [pos[c] for c in range(L["exp"].start, L["exp"].stop)]]


def fit_frames(basis: LandmarkBasis, targets: Targets, init: FrameParams, focal: torch.Tensor,
               pp: torch.Tensor, cfg: FitConfig = FitConfig(), free: Tuple[str, ...] = ALL_BLOCKS,
               temporal: bool = True, contiguous: Optional[torch.Tensor] = None) -> FitResult:
    """Levenberg-Marquardt over all frames at once, one block per frame.

    init: starting parameters (T frames); focal [2], pp [2] in crop pixels.
    free: which parameter blocks move; the others stay at `init`.
    temporal: a prior between consecutive frames (Jacobi: neighbours fixed
    within an iteration). contiguous [T] bool: frame t follows frame t-1
    (False breaks the prior, e.g. across a gap of invalid frames).
    """
    params = init.clone()
    T = params.rotation.shape[0]
    E = params.expression.shape[1]
    L = _layout(E)
    free = tuple(b for b in ALL_BLOCKS if b in free and (b != "jaw" or basis.has_jaw))
    free_idx = torch.cat([torch.arange(L[b].start, L[b].stop) for b in free])
    contiguous = torch.ones(T, dtype=torch.bool) if contiguous is None else contiguous
    mu = torch.full((T,), 1e-3)
    robust = None
    history = []
    it = 0
    rows = contour_rows(head_rotation_flame(params.rotation), basis.n_rows)
    folded = fold_shape(basis, params.shape)
    jacobians = bool(_model_needs(free))
    arrays = _point_arrays(basis, rows, folded=folded, jacobians=jacobians)

    def rigid_points():
        # Expression, jaw and eyes fixed: the model-space points change only
        # with the contour rows, so a rigid fit computes them once per rows.
        return model_points(basis, arrays, params.expression, batch_rodrigues(params.jaw),
                            batch_rodrigues(params.eyes.reshape(-1, 3)).reshape(T, 2, 3, 3))[0]

    points = rigid_points() if set(free) <= {"rot", "trans"} else None
    for it in range(1, cfg.max_iters + 1):
        nb = _neighbour_means(params, contiguous) if temporal else None
        r, H, g, err, valid = _normal_equations(basis, arrays, params, targets, focal, pp, cfg, free, robust,
                                                points)
        terms = _param_vector_terms(params, cfg, nb)
        cost = (r ** 2).sum(1) + _vector_cost(terms)
        for a, w in terms:  # identity Jacobians: diagonal additions
            H = H + torch.diag_embed(w[:, free_idx])
            g = g + (w * a)[:, free_idx]
        at_bound = None
        if cfg.expression_bounds is not None and "exp" in free:
            held = torch.zeros(T, 15 + E, dtype=torch.bool)
            held[:, L["exp"]] = active_bounds(params.expression, g_full_exp(g, free_idx, L), cfg.expression_bounds)
            H, g, _ = hold_coordinates(H, g, held[:, free_idx])
            lo, hi = cfg.expression_bounds
            at_bound = torch.zeros(T, 15 + E)  # -1 at the lower bound, +1 at the upper
            at_bound[:, L["exp"]] = (params.expression >= hi - 1e-6).float() - (params.expression <= lo + 1e-6).float()
            at_bound = at_bound[:, free_idx]
        diagH = torch.diagonal(H, dim1=1, dim2=2)
        accepted = torch.zeros(T, dtype=torch.bool)
        for _ in range(4):  # LM: retry rejected frames with more damping
            A = H + torch.diag_embed(mu[:, None] * (diagH + 1e-6))
            step_f = -torch.linalg.solve(A, g[..., None])[..., 0]
            if at_bound is not None:
                # A coefficient at a bound whose gradient points inwards can
                # still get a Newton step outwards (through its coupling to
                # the others); clipped, the rest of the step is no longer a
                # descent direction and every damping was rejected (the fit
                # stopped after 3 iterations 13.7 px off on carphone). Hold
                # those too and solve again.
                out = at_bound * step_f > 0
                if bool(out.any()):
                    H2, g2, _ = hold_coordinates(H, g, out)
                    A = H2 + torch.diag_embed(mu[:, None] * (torch.diagonal(H2, dim1=1, dim2=2) + 1e-6))
                    step_f = -torch.linalg.solve(A, g2[..., None])[..., 0]
            step = torch.zeros(T, 15 + E)
            step[:, free_idx] = step_f
            trial = _apply_step(params, step, E, free, cfg.expression_bounds)
            r_new, _, err_new, _ = point_residuals(basis, arrays, trial, targets, focal, pp, cfg, (), robust, points)
            cost_new = (r_new ** 2).sum(1) + _vector_cost(_param_vector_terms(trial, cfg, nb))
            if at_bound is not None:
                # Clipping a weight that crosses a bound bends the step: on
                # carphone the clipped step raised the cost where the
                # unclipped one lowered it 50x as much, and the fit stalled
                # after 3 iterations (7.3 px). The step shortened to the
                # first bound it meets is a descent direction: each frame
                # keeps the better of the two.
                trial_cut = _apply_step(params, step * _feasible_fraction(params.expression, step[:, L["exp"]],
                                                                          cfg.expression_bounds)[:, None],
                                        E, free, cfg.expression_bounds)
                r_cut, _, err_cut, _ = point_residuals(basis, arrays, trial_cut, targets, focal, pp, cfg, (), robust,
                                                       points)
                cost_cut = (r_cut ** 2).sum(1) + _vector_cost(_param_vector_terms(trial_cut, cfg, nb))
                cut = cost_cut < cost_new
                if bool(cut.any()):
                    for name in ("rotation", "translation", "expression", "jaw", "eyes"):
                        getattr(trial, name)[cut] = getattr(trial_cut, name)[cut]
                    cost_new, err_new = torch.where(cut, cost_cut, cost_new), torch.where(cut[:, None], err_cut, err_new)
            ok = (cost_new < cost) & ~accepted
            err[ok] = err_new[ok]
            for name in ("rotation", "translation", "expression", "jaw", "eyes"):
                getattr(params, name)[ok] = getattr(trial, name)[ok]
            mu = torch.where(ok, mu / 3, torch.where(accepted, mu, mu * 4)).clamp(1e-7, 1e7)
            accepted |= ok
            if accepted.all():
                break
        total_old = cost.sum().item()
        total_new = torch.where(accepted, cost_new, cost).sum().item()
        history.append(total_old)
        # Geman-McClure weights from the per-point errors after this step (a
        # plain first iteration, so a bad start does not discard good points;
        # weights from before the step lag behind and make the fit oscillate).
        if it <= cfg.robust_updates:
            s2 = cfg.robust_scale_px ** 2
            err512 = err * (512.0 / cfg.image_size)
            robust = (s2 / (s2 + err512 ** 2)) ** 2
        new_rows = contour_rows(head_rotation_flame(params.rotation), basis.n_rows)
        changed = new_rows != rows
        if changed.any():
            rows = new_rows
            _update_contour(arrays, basis, folded, rows, changed)
            if points is not None:
                points = rigid_points()
        # Converged when this iteration's accepted steps barely lowered the
        # cost (relative), after the robust weights have come in.
        if it >= 3 and (total_old - total_new) <= cfg.tol * max(total_old, 1e-12):
            break
    _, _, err, valid = point_residuals(basis, arrays, params, targets, focal, pp, cfg, points=points)
    lay = active_point_layout(basis)
    v68 = torch.cat([valid[:, lay["contour"]], valid[:, lay["lmk68_inner"]]], 1)
    e68 = torch.cat([err[:, lay["contour"]], err[:, lay["lmk68_inner"]]], 1)
    rmse68 = float(e68[v68].pow(2).mean().sqrt()) if v68.any() else float("nan")
    vd, ed = valid[:, lay["dense"]], err[:, lay["dense"]]
    rmse_d = float(ed[vd].pow(2).mean().sqrt()) if vd.any() else float("nan")
    return FitResult(params=params, iterations=it, rmse68_px=rmse68, rmse_dense_px=rmse_d, cost_history=history)


def predict_landmarks(basis: LandmarkBasis, params: FrameParams, focal, pp) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reprojected 68 landmarks [T,68,2] (iBUG order) and dense points [T,M,2]."""
    T = params.rotation.shape[0]
    rows = contour_rows(head_rotation_flame(params.rotation), basis.n_rows)
    arrays = _point_arrays(basis, rows, params.shape, jacobians=False)
    X, _ = model_points(basis, arrays, params.expression, batch_rodrigues(params.jaw),
                        batch_rodrigues(params.eyes.reshape(-1, 3)).reshape(T, 2, 3, 3))
    uv = project_points(_times_3x3(X, params.rotation.transpose(1, 2)) + params.translation[:, None], focal, pp)
    lay = active_point_layout(basis)
    lmk68 = torch.cat([uv[:, lay["contour"]], uv[:, lay["lmk68_inner"]]], 1)
    return lmk68, uv[:, lay["dense"]]


# ----------------------------------------------------------------------------
# Initialisation


def initial_params(basis: LandmarkBasis, targets: Targets, focal: torch.Tensor, pp: torch.Tensor,
                   shape: Optional[torch.Tensor] = None, expression: Optional[torch.Tensor] = None,
                   jaw: Optional[torch.Tensor] = None, rotation: Optional[torch.Tensor] = None,
                   cfg: FitConfig = FitConfig()) -> FrameParams:
    """Frontal (or given) rotation, depth from the eye distance, then a rigid
    fit of rotation and translation alone."""
    T = targets.lmk68.shape[0]
    E = basis.n_exp
    shape = torch.zeros(basis.n_shape) if shape is None else shape
    R0 = frontal_rotation(torch.empty(0)).expand(T, 3, 3).clone() if rotation is None else rotation.clone()
    arr = _point_arrays(basis, torch.zeros(1, dtype=torch.long), shape, jacobians=False)
    X = arr["s_M0"][:basis.n_static]  # neutral static landmarks (iBUG 17..67)
    eye_model = (X[36 - 17] - X[45 - 17]).norm()
    eye_img = (targets.lmk68[:, 36] - targets.lmk68[:, 45]).norm(dim=-1)
    eye_img = torch.where(torch.isfinite(eye_img), eye_img, torch.nanmedian(eye_img))
    z = focal.mean() * eye_model / eye_img.clamp(min=1.0)
    centre = torch.nanmean(targets.lmk68[:, 17:], dim=1)
    centre = torch.where(torch.isfinite(centre), centre, pp.expand_as(centre))
    model_centre = X.mean(0)
    t = torch.cat([(centre - pp) / focal * z[:, None], z[:, None]], 1) - torch.einsum("tij,j->ti", R0, model_centre)
    if expression is not None and cfg.expression_bounds is not None:
        expression = expression.clamp(*cfg.expression_bounds)
    params = FrameParams(
        rotation=R0, translation=t,
        expression=torch.zeros(T, E) if expression is None else expression.clone(),
        jaw=torch.zeros(T, 3) if jaw is None else jaw.clone(),
        eyes=torch.zeros(T, 6), shape=shape.clone())
    rigid_cfg = replace(cfg, max_iters=8)
    return fit_frames(basis, targets, params, focal, pp, rigid_cfg, free=("rot", "trans"), temporal=False).params


def fit_sequence(basis: LandmarkBasis, targets: Targets, focal: torch.Tensor, pp: torch.Tensor,
                 shape: torch.Tensor, cfg: FitConfig = FitConfig(), contiguous: Optional[torch.Tensor] = None,
                 rotation: Optional[torch.Tensor] = None, expression: Optional[torch.Tensor] = None,
                 jaw: Optional[torch.Tensor] = None, chunk: int = 512, overlap: int = 16) -> FitResult:
    """Initialise and fit T frames in overlapping chunks, so memory stays
    bounded for long videos (the Jacobians are [chunk, ~360, 65] floats).

    Within a chunk the temporal prior couples all frames; across chunks the
    `overlap` frames are fitted by both and each keeps its inner half.
    Optional per-frame initial rotation [T,3,3], expression [T,E], jaw [T,3].
    """
    T = targets.lmk68.shape[0]
    contiguous = torch.ones(T, dtype=torch.bool) if contiguous is None else contiguous
    if T <= chunk:
        starts = [0]
    else:
        starts = list(range(0, T - overlap, chunk - overlap))
    pieces, iters, rms68, rmsd = [], [], [], []
    keep_from = 0
    for n, s in enumerate(starts):
        e = min(T, s + chunk)
        sl = slice(s, e)
        sub = targets.select(sl)
        pick = lambda a: None if a is None else a[sl]  # noqa: E731
        init = initial_params(basis, sub, focal, pp, shape=shape, expression=pick(expression), jaw=pick(jaw),
                              rotation=pick(rotation), cfg=cfg)
        cont = contiguous[sl].clone()
        cont[0] = False
        res = fit_frames(basis, sub, init, focal, pp, cfg, contiguous=cont)
        last = n == len(starts) - 1
        keep_to = e if last else e - overlap // 2
        pieces.append(res.params.select(slice(keep_from - s, keep_to - s)))
        keep_from = keep_to
        iters.append(res.iterations)
        rms68.append((res.rmse68_px, e - s))
        rmsd.append((res.rmse_dense_px, e - s))
        if last:
            break
    cat = lambda name: torch.cat([getattr(p, name) for p in pieces])  # noqa: E731
    params = FrameParams(cat("rotation"), cat("translation"), cat("expression"), cat("jaw"), cat("eyes"), shape)
    wmean = lambda xs: float(np.sqrt(sum(v ** 2 * w for v, w in xs) / sum(w for _, w in xs)))  # noqa: E731
    return FitResult(params=params, iterations=max(iters), rmse68_px=wmean(rms68), rmse_dense_px=wmean(rmsd))
