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

from .flame import FLAME, contour_rows
from .lbs import batch_rodrigues, rotation_matrix_to_axis_angle

# FLAME's head looks along +z; an OpenCV camera sees a frontal face with the
# model's y and z axes flipped.
FLIP_YZ = torch.diag(torch.tensor([1.0, -1.0, -1.0]))
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

    @property
    def contour_start(self) -> int:
        return self.n_static

    @property
    def dense_start(self) -> int:
        return self.n_static + 17 * self.n_rows

    @property
    def pupil_start(self) -> int:
        return self.dense_start + self.n_dense


def build_basis(flame: FLAME) -> LandmarkBasis:
    """Precompute the landmark-level arrays of `flame` (float64 -> float32)."""
    faces = flame.faces.cpu()
    dtype = torch.float64
    v_t = flame.v_template.cpu().to(dtype)
    dirs = flame.dirs.cpu().to(dtype)
    V = v_t.shape[0]
    posedirs = flame.posedirs.cpu().to(dtype).T.reshape(V, 3, -1)  # [V,3,36]
    weights = flame.weights.cpu().to(dtype)
    R = flame.dynamic_faces.shape[0]
    face_idx = torch.cat([flame.static_faces.cpu(), flame.dynamic_faces.cpu().reshape(-1),
                          flame.dense_faces.cpu()])
    bary = torch.cat([flame.static_bary.cpu(), flame.dynamic_bary.cpu().reshape(-1, 3),
                      flame.dense_bary.cpu()]).to(dtype)
    corner = faces[face_idx]  # [P,3]
    # Pupils: the most forward vertex of each eyeball (vertices skinned to an eye).
    pupils = []
    for k in (LEYE, REYE):
        ids = torch.nonzero(weights[:, k] > 0.5).flatten()
        if len(ids) == 0:
            raise ValueError("FLAME model has no vertices skinned to the eye joints")
        pupils.append(ids[torch.argmax(v_t[ids, 2])])
    corner = torch.cat([corner, torch.stack([torch.stack([p, p, p]) for p in pupils])])
    bary = torch.cat([bary, torch.tensor([[1.0, 0, 0], [1.0, 0, 0]], dtype=dtype)])

    def comb(a, w=None):  # a [V,...] -> [P,...], barycentric (optionally weighted)
        g = a[corner]  # [P,3,...]
        b = bary if w is None else bary * w[corner]
        return torch.einsum("pj,pj...->p...", b, g)

    J_reg_t = flame.joints_template.cpu().to(dtype)
    J_dirs = flame.joint_dirs.cpu().to(dtype)
    ks = (JAW, LEYE, REYE)
    f32 = lambda x: x.to(torch.float32).contiguous()  # noqa: E731
    return LandmarkBasis(
        M0=f32(comb(v_t)), MD=f32(comb(dirs)), MP=f32(comb(posedirs)),
        W0=f32(torch.stack([comb(v_t, weights[:, k]) for k in ks])),
        WD=f32(torch.stack([comb(dirs, weights[:, k]) for k in ks])),
        WP=f32(torch.stack([comb(posedirs, weights[:, k]) for k in ks])),
        omega=f32(torch.stack([(bary * weights[corner, k]).sum(1) for k in ks])),
        J0=f32(J_reg_t[list(ks)]), Jd=f32(J_dirs[list(ks)]),
        n_shape=flame.n_shape, n_exp=flame.n_exp, n_static=flame.static_faces.shape[0],
        n_rows=R, n_dense=flame.n_dense, mediapipe_indices=flame.mediapipe_indices.cpu().numpy(),
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
    max_iters: int = 20
    tol: float = 1e-3
    image_size: int = 512


# ----------------------------------------------------------------------------
# Model evaluation


def _skew(v: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(v[..., 0])
    return torch.stack([z, -v[..., 2], v[..., 1], v[..., 2], z, -v[..., 0], -v[..., 1], v[..., 0], z],
                       -1).reshape(v.shape[:-1] + (3, 3))


def _point_arrays(basis: LandmarkBasis, rows: torch.Tensor, shape: torch.Tensor):
    """Per-frame point arrays for the active points (static, contour of each
    frame's row, dense), with the shape folded in, plus the two pupils.

    Face points (P): M0 [T,P,3], ME [T,P,3,E], MP [T,P,3,36] and the jaw's
    W0 [T,P,3], WE [T,P,3,E], WP [T,P,3,36], omega [T,P].
    Pupils: pM0 [2,3], pME [2,3,E], pMP [2,3,36]; joints J0 [3,3], JE [3,3,E]
    (jaw, left eye, right eye).
    """
    S = basis.n_shape
    T = rows.shape[0]
    cs, ds, ps = basis.contour_start, basis.dense_start, basis.pupil_start
    contour_ids = cs + rows[:, None] * 17 + torch.arange(17)  # [T,17]
    fixed_ids = torch.cat([torch.arange(cs), torch.arange(ds, ps)])
    n = basis.n_static

    def gather(a):
        # a [P_all, ...] -> [T, 51 + 17 + M, ...]
        fixed = a[fixed_ids]
        cont = a[contour_ids]
        fixed = fixed.unsqueeze(0).expand((T,) + fixed.shape)
        return torch.cat([fixed[:, :n], cont, fixed[:, n:]], dim=1)

    M0 = basis.M0 + basis.MD[..., :S] @ shape
    W0 = basis.W0[0] + basis.WD[0][..., :S] @ shape
    J0 = basis.J0 + basis.Jd[..., :S] @ shape
    ME, WE = basis.MD[..., S:], basis.WD[0][..., S:]
    return dict(M0=gather(M0), ME=gather(ME), MP=gather(basis.MP), W0=gather(W0), WE=gather(WE),
                WP=gather(basis.WP[0]), omega=gather(basis.omega[0]),
                pM0=M0[ps:ps + 2], pME=ME[ps:ps + 2], pMP=basis.MP[ps:ps + 2], J0=J0, JE=basis.Jd[..., S:])


def active_point_layout(basis: LandmarkBasis) -> Dict[str, slice]:
    n = basis.n_static
    return {"lmk68_inner": slice(0, n), "contour": slice(n, n + 17),
            "dense": slice(n + 17, n + 17 + basis.n_dense),
            "pupils": slice(n + 17 + basis.n_dense, n + 19 + basis.n_dense)}


_GENERATORS = _skew(torch.eye(3))  # [3,3,3]: [e_i]x


def _feature_derivative(R: torch.Tensor) -> torch.Tensor:
    """d vec(exp([d]x) R - I) / dd at d = 0: [T,3(i),9]."""
    return torch.einsum("iab,tbc->tiac", _GENERATORS, R).reshape(R.shape[0], 3, 9)


def model_points(basis: LandmarkBasis, arrays, expression, jaw_R, eye_R, want_jacobian=False):
    """Model-space points [T,P+2,3] (face points, then left and right pupil)
    and optionally their Jacobians with respect to expression [T,P+2,3,E]
    and to left-increments of the jaw, left-eye and right-eye rotations
    [T,P+2,3,3] each.

    Face points follow the jaw: X = M + (Rj - I)(W - omega Jj); a pupil is
    skinned to its eye alone: X = Je + Re (M - Je).
    """
    a = arrays
    T = expression.shape[0]
    eye3 = torch.eye(3)
    feat = torch.cat([torch.zeros(T, 9), (jaw_R - eye3).reshape(T, 9),
                      (eye_R - eye3).reshape(T, 18)], 1)  # [T,36]
    Jk = a["J0"][None] + torch.einsum("kce,te->tkc", a["JE"], expression)  # [T,3,3]
    Jj = Jk[:, 0]
    M = a["M0"] + (a["ME"] @ expression[:, None, :, None])[..., 0] + (a["MP"] @ feat[:, None, :, None])[..., 0]
    W = a["W0"] + (a["WE"] @ expression[:, None, :, None])[..., 0] + (a["WP"] @ feat[:, None, :, None])[..., 0]
    Y = W - a["omega"][..., None] * Jj[:, None]  # [T,P,3]
    Aj = jaw_R - eye3
    X_face = M + Y @ Aj.transpose(1, 2)
    pM = a["pM0"][None] + torch.einsum("ice,te->tic", a["pME"], expression) + torch.einsum("icf,tf->tic", a["pMP"], feat)
    Je = Jk[:, 1:]  # [T,2,3]
    X_pup = Je + torch.einsum("tiab,tib->tia", eye_R, pM - Je)
    X = torch.cat([X_face, X_pup], 1)
    if not want_jacobian:
        return X, None
    E = expression.shape[1]
    P = X_face.shape[1]
    # Expression.
    WJ = a["WE"] - a["omega"][..., None, None] * a["JE"][0][None, None]  # [T,P,3,E]
    dF_de = a["ME"] + torch.einsum("tab,tpbe->tpae", Aj, WJ)
    pJE = a["JE"][1:]  # [2,3,E]
    dP_de = pJE[None] + torch.einsum("tiab,ibe->tiae", eye_R, a["pME"] - pJE)
    dX_de = torch.cat([dF_de, dP_de], 1)
    # Pose-corrective parts: d feat / d increment of each rotation.
    d_jaw = _feature_derivative(jaw_R)  # [T,3,9]
    d_le = _feature_derivative(eye_R[:, 0])
    d_re = _feature_derivative(eye_R[:, 1])
    Pf = a["MP"] + torch.einsum("tab,tpbf->tpaf", Aj, a["WP"])  # [T,P,3,36]
    Pp = torch.einsum("tiab,ibf->tiaf", eye_R, a["pMP"])  # [T,2,3,36]
    Pall = torch.cat([Pf, Pp], 1)  # [T,P+2,3,36]
    jac_jaw = torch.einsum("tpaf,tif->tpai", Pall[..., 9:18], d_jaw)
    jac_jaw[:, :P] += -_skew(Y @ jaw_R.transpose(1, 2))
    jac_le = torch.einsum("tpaf,tif->tpai", Pall[..., 18:27], d_le)
    jac_re = torch.einsum("tpaf,tif->tpai", Pall[..., 27:36], d_re)
    rel = torch.einsum("tiab,tib->tia", eye_R, pM - Je)  # Re (M - Je)
    jac_le[:, P] += -_skew(rel[:, 0])
    jac_re[:, P + 1] += -_skew(rel[:, 1])
    return X, (dX_de, jac_jaw, jac_le, jac_re)


def project(p: torch.Tensor, focal: torch.Tensor, pp: torch.Tensor) -> torch.Tensor:
    """Camera points [...,3] -> pixels [...,2]."""
    z = p[..., 2:3].clamp(min=1e-6)
    return p[..., :2] / z * focal + pp


def head_rotation_flame(R_cv: torch.Tensor) -> torch.Tensor:
    """Head rotation relative to a camera looking along FLAME's -z, for the
    yaw-dependent contour: FLIP_YZ @ R_cv (identity for a frontal face)."""
    return FLIP_YZ.to(R_cv) @ R_cv


# ----------------------------------------------------------------------------
# The solver


N_POSE = 6  # rotation increment (3) + translation (3)


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


def _residuals(basis, arrays, params, targets, focal, pp, cfg, free_blocks, want_jac, robust_w=None,
               neighbours=None):
    """Stacked weighted residuals r [T,N] and Jacobian J [T,N,D] of one frame each."""
    T = params.rotation.shape[0]
    E = params.expression.shape[1]
    jaw_R = batch_rodrigues(params.jaw)
    eye_R = batch_rodrigues(params.eyes.reshape(-1, 3)).reshape(T, 2, 3, 3)
    X, jac = model_points(basis, arrays, params.expression, jaw_R, eye_R, want_jacobian=want_jac)
    pcam = torch.einsum("tij,tpj->tpi", params.rotation, X) + params.translation[:, None]
    uv = project(pcam, focal, pp)
    lay = active_point_layout(basis)
    n_in = basis.n_static
    scale = 512.0 / cfg.image_size  # residuals in "512-pixel" units
    tgt = torch.cat([targets.lmk68[:, 17:], targets.lmk68[:, :17], targets.dense, targets.iris[:, [1, 0]]], 1)
    # pupils: basis order is (left eye, right eye) = mediapipe (473, 468)
    w_pt = torch.cat([torch.full((n_in,), cfg.w_lmk68), torch.full((17,), cfg.w_contour),
                      torch.full((basis.n_dense,), cfg.w_dense), torch.full((2,), cfg.w_iris)])
    valid = torch.isfinite(tgt).all(-1)
    diff = (uv - torch.nan_to_num(tgt)) * scale  # [T,P,2]
    w = w_pt[None] * valid
    if robust_w is not None:
        w = w * robust_w
    sw = w.sqrt()[..., None]
    r_pts = (diff * sw).reshape(T, -1)
    blocks_r = [r_pts]
    # Closure terms: 2-D differences of lid/lip pairs.
    idx68 = lambda i: (i - 17) if i >= 17 else n_in + i  # noqa: E731
    pa = torch.tensor([idx68(a) for a, b in CLOSURE_PAIRS])
    pb = torch.tensor([idx68(b) for a, b in CLOSURE_PAIRS])
    cw = (valid[:, pa] & valid[:, pb]).float() * cfg.w_closure
    r_clo = ((diff[:, pa] - diff[:, pb]) * cw.sqrt()[..., None]).reshape(T, -1)
    blocks_r.append(r_clo)
    # Priors (as residuals): expression ridge, jaw, eyes.
    r_exp = params.expression / cfg.sigma_expression
    jaw_sig = torch.tensor([cfg.sigma_jaw_open, cfg.sigma_jaw_side, cfg.sigma_jaw_side])
    r_jaw = params.jaw / jaw_sig
    r_eye = params.eyes / cfg.sigma_eyes
    blocks_r += [r_exp, r_jaw, r_eye]
    # Temporal prior against the neighbours' current mean (Jacobi form).
    if neighbours is not None:
        nb_R, nb_t, nb_e, nb_j, nb_y, nb_w = neighbours
        rel = rotation_matrix_to_axis_angle(params.rotation @ nb_R.transpose(1, 2))
        sqw = nb_w.sqrt()[:, None]
        blocks_r += [rel / cfg.smooth_rotation * sqw, (params.translation - nb_t) / cfg.smooth_translation * sqw,
                     (params.expression - nb_e) / cfg.smooth_expression * sqw,
                     (params.jaw - nb_j) / cfg.smooth_jaw * sqw, (params.eyes - nb_y) / cfg.smooth_eyes * sqw]
    r = torch.cat(blocks_r, 1)
    if not want_jac:
        return r, uv, diff, valid
    dX_de, dX_jaw, dX_le, dX_re = jac
    D = 15 + E
    L = _layout(E)
    # d uv / d pcam
    z = pcam[..., 2].clamp(min=1e-6)
    fx, fy = focal[0], focal[1]
    dproj = torch.zeros(T, pcam.shape[1], 2, 3)
    dproj[..., 0, 0] = fx / z
    dproj[..., 0, 2] = -fx * pcam[..., 0] / z ** 2
    dproj[..., 1, 1] = fy / z
    dproj[..., 1, 2] = -fy * pcam[..., 1] / z ** 2
    dproj = dproj * scale
    P = pcam.shape[1]
    Jp = torch.zeros(T, P, 2, D)
    # rotation left-increment of R: d(exp([d]x) R X)/dd = -[R X]x
    RX = pcam - params.translation[:, None]
    Jp[..., L["rot"]] = dproj @ (-_skew(RX))
    Jp[..., L["trans"]] = dproj
    dproj_R = dproj @ params.rotation[:, None]  # [T,P,2,3]
    Jp[..., L["exp"]] = dproj_R @ dX_de
    Jp[..., L["jaw"]] = dproj_R @ dX_jaw
    Jp[..., 9 + E:12 + E] = dproj_R @ dX_le
    Jp[..., 12 + E:15 + E] = dproj_R @ dX_re
    J_pts = (Jp * sw[..., None]).reshape(T, -1, D)
    J_clo = ((Jp[:, pa] - Jp[:, pb]) * cw.sqrt()[..., None, None]).reshape(T, -1, D)
    J_blocks = [J_pts, J_clo]
    Jprior = torch.zeros(T, E + 9, D)
    Jprior[:, :E, L["exp"]] = torch.eye(E) / cfg.sigma_expression
    Jprior[:, E:E + 3, L["jaw"]] = torch.diag(1 / jaw_sig)
    Jprior[:, E + 3:, L["eyes"]] = torch.eye(6) / cfg.sigma_eyes
    J_blocks.append(Jprior)
    if neighbours is not None:
        Jt = torch.zeros(T, 15 + E, D)
        Jt[:, :3, L["rot"]] = torch.eye(3) / cfg.smooth_rotation
        Jt[:, 3:6, L["trans"]] = torch.eye(3) / cfg.smooth_translation
        Jt[:, 6:6 + E, L["exp"]] = torch.eye(E) / cfg.smooth_expression
        Jt[:, 6 + E:9 + E, L["jaw"]] = torch.eye(3) / cfg.smooth_jaw
        Jt[:, 9 + E:, L["eyes"]] = torch.eye(6) / cfg.smooth_eyes
        J_blocks.append(Jt * sqw[..., None])
    J = torch.cat(J_blocks, 1)
    return r, uv, diff, valid, J


def _apply_step(params: FrameParams, step: torch.Tensor, E: int) -> FrameParams:
    L = _layout(E)
    out = params.clone()
    out.rotation = batch_rodrigues(step[:, L["rot"]]) @ params.rotation
    out.translation = params.translation + step[:, L["trans"]]
    out.expression = params.expression + step[:, L["exp"]]
    out.jaw = rotation_matrix_to_axis_angle(batch_rodrigues(step[:, L["jaw"]]) @ batch_rodrigues(params.jaw))
    eyes = []
    for i in range(2):
        s = step[:, L["eyes"]][:, 3 * i:3 * i + 3]
        eyes.append(rotation_matrix_to_axis_angle(batch_rodrigues(s) @ batch_rodrigues(params.eyes[:, 3 * i:3 * i + 3])))
    out.eyes = torch.cat(eyes, 1)
    return out


def _neighbour_means(params: FrameParams, order_ok: torch.Tensor):
    """Mean of each frame's previous and next frame (one side at the ends),
    and the number of neighbours (0, 1 or 2) as the prior's weight."""
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
    Rm = U @ Vh
    return (Rm, mean(params.translation), mean(params.expression), mean(params.jaw), mean(params.eyes),
            (wp + wn) / 2)


def fit_frames(basis: LandmarkBasis, targets: Targets, init: FrameParams, focal: torch.Tensor,
               pp: torch.Tensor, cfg: FitConfig = FitConfig(), free: Tuple[str, ...] = ("rot", "trans", "exp", "jaw", "eyes"),
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
    free_idx = torch.cat([torch.arange(L[b].start, L[b].stop) for b in free])
    contiguous = torch.ones(T, dtype=torch.bool) if contiguous is None else contiguous
    mu = torch.full((T,), 1e-3)
    robust = None
    history = []
    it = 0
    rows = contour_rows(head_rotation_flame(params.rotation), basis.n_rows)
    arrays = _point_arrays(basis, rows, params.shape)
    for it in range(1, cfg.max_iters + 1):
        nb = _neighbour_means(params, contiguous) if temporal else None
        r, uv, diff, valid, J = _residuals(basis, arrays, params, targets, focal, pp, cfg, free, True, robust, nb)
        cost = (r ** 2).sum(1)
        Jf = J[..., free_idx]
        H = Jf.transpose(1, 2) @ Jf
        g = Jf.transpose(1, 2) @ r[..., None]
        diagH = torch.diagonal(H, dim1=1, dim2=2)
        accepted = torch.zeros(T, dtype=torch.bool)
        for _ in range(4):  # LM: retry rejected frames with more damping
            A = H + torch.diag_embed(mu[:, None] * (diagH + 1e-6))
            step_f = -torch.linalg.solve(A, g)[..., 0]
            step = torch.zeros(T, 15 + E)
            step[:, free_idx] = step_f
            trial = _apply_step(params, step, E)
            r_new = _residuals(basis, arrays, trial, targets, focal, pp, cfg, free, False, robust, nb)[0]
            cost_new = (r_new ** 2).sum(1)
            ok = (cost_new < cost) & ~accepted
            for name in ("rotation", "translation", "expression", "jaw", "eyes"):
                getattr(params, name)[ok] = getattr(trial, name)[ok]
            mu = torch.where(ok, mu / 3, torch.where(accepted, mu, mu * 4)).clamp(1e-7, 1e7)
            accepted |= ok
            if accepted.all():
                break
        total_old = cost.sum().item()
        total_new = torch.where(accepted, cost_new, cost).sum().item()
        history.append(total_old)
        # Geman-McClure weights from the current per-point errors (after a
        # plain first iteration, so a bad start does not discard good points).
        err = diff.norm(dim=-1)
        s2 = cfg.robust_scale_px ** 2
        robust = (s2 / (s2 + err ** 2)) ** 2 if it >= 2 else None
        new_rows = contour_rows(head_rotation_flame(params.rotation), basis.n_rows)
        if not torch.equal(new_rows, rows):
            rows = new_rows
            arrays = _point_arrays(basis, rows, params.shape)
        # Converged when this iteration's accepted steps barely lowered the
        # cost (relative), after the robust weights have come in.
        if it >= 3 and (total_old - total_new) <= cfg.tol * max(total_old, 1e-12):
            break
    r, uv, diff, valid = _residuals(basis, arrays, params, targets, focal, pp, cfg, free, False)[:4]
    err = diff.norm(dim=-1) / (512.0 / cfg.image_size)
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
    arrays = _point_arrays(basis, rows, params.shape)
    X, _ = model_points(basis, arrays, params.expression, batch_rodrigues(params.jaw),
                        batch_rodrigues(params.eyes.reshape(-1, 3)).reshape(T, 2, 3, 3))
    uv = project(torch.einsum("tij,tpj->tpi", params.rotation, X) + params.translation[:, None], focal, pp)
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
    R0 = FLIP_YZ.expand(T, 3, 3).clone() if rotation is None else rotation.clone()
    # Model eye-corner distance vs. detected, for the depth.
    arr = _point_arrays(basis, torch.zeros(T, dtype=torch.long), shape)
    X = arr["M0"][0]  # [P,3] neutral points of frame 0 (static part first)
    eye_model = (X[36 - 17] - X[45 - 17]).norm()
    eye_img = (targets.lmk68[:, 36] - targets.lmk68[:, 45]).norm(dim=-1)
    eye_img = torch.where(torch.isfinite(eye_img), eye_img, torch.nanmedian(eye_img))
    z = focal.mean() * eye_model / eye_img.clamp(min=1.0)
    centre = torch.nanmean(targets.lmk68[:, 17:], dim=1)
    centre = torch.where(torch.isfinite(centre), centre, pp.expand_as(centre))
    model_centre = X[: 68 - 17].mean(0)
    t = torch.cat([(centre - pp) / focal * z[:, None], z[:, None]], 1) - torch.einsum("tij,j->ti", R0, model_centre)
    params = FrameParams(
        rotation=R0, translation=t,
        expression=torch.zeros(T, E) if expression is None else expression.clone(),
        jaw=torch.zeros(T, 3) if jaw is None else jaw.clone(),
        eyes=torch.zeros(T, 6), shape=shape.clone())
    rigid_cfg = replace(cfg, max_iters=10)
    return fit_frames(basis, targets, params, focal, pp, rigid_cfg, free=("rot", "trans"), temporal=False).params
