"""Residuals of a fit: weighted point and closure residuals with their
analytic Jacobians, the per-frame priors and the temporal prior, and the
per-frame Gauss-Newton blocks.

Camera: OpenCV pinhole, x right, y down, z forward; a model point X (meters,
model space) maps to p = R X + t and projects to (fx p_x/p_z + cx, fy p_y/p_z + cy)
in crop pixels, pixel centres at integer coordinates.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from ..cameras import project_points
from ..lbs import batch_rodrigues, rotation_matrix_to_axis_angle
from .basis import LandmarkBasis, active_point_layout, model_jacobian_blocks, model_points, point_jacobians, times_3x3
from .layout import FrameLayout
from .params import FitConfig, FrameParams, Targets

# Eyelid and inner-lip pairs (iBUG indices) whose distances the closure terms fit.
CLOSURE_PAIRS = ((37, 41), (38, 40), (43, 47), (44, 46), (61, 67), (62, 66), (63, 65))


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


def point_residuals(basis, arrays, params, targets, focal, pp, cfg, free=(), robust_w=None, points=None):
    """Weighted point and closure residuals r [T,N] (in 512-pixel units) and,
    for the blocks in `free` (of rot, trans, exp, jaw, eyes), the Jacobian
    J [T,N,D_free] with columns in `FrameLayout` order restricted to `free`;
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
    RX = times_3x3(X, params.rotation.transpose(1, 2))
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
    model_jac = point_jacobians(arrays, parts, G, jaw_R, eye_R, model_jacobian_blocks(free)) if points is None else {}
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
    """Prior standard deviations [FrameLayout(E).width] of a frame's
    parameters (inf = none)."""
    L = FrameLayout(E)
    s = torch.full((L.width,), float("inf"))
    s[L["exp"]] = cfg.sigma_expression
    s[L["jaw"]] = torch.tensor([cfg.sigma_jaw_open, cfg.sigma_jaw_side, cfg.sigma_jaw_side])
    s[L["eyes"]] = cfg.sigma_eyes
    return s


def _temporal_sigmas(cfg: FitConfig, E: int) -> torch.Tensor:
    """Standard deviations [FrameLayout(E).width] of the temporal prior on
    the change of each parameter from its neighbours' mean."""
    L = FrameLayout(E)
    s = torch.empty(L.width)
    s[L["rot"]], s[L["trans"]] = cfg.smooth_rotation, cfg.smooth_translation
    s[L["exp"]], s[L["jaw"]], s[L["eyes"]] = cfg.smooth_expression, cfg.smooth_jaw, cfg.smooth_eyes
    return s


def prior_terms(params: FrameParams, cfg: FitConfig, neighbours) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Prior and temporal terms as residual values a [T,D] with per-entry
    weights w [T,D] in the frame layout (D = FrameLayout(E).width; cost =
    sum w a^2; the Jacobian of a is the identity in the increment
    parametrisation). neighbours: `neighbour_means`, or None for no
    temporal prior."""
    T, E = params.expression.shape
    L = FrameLayout(E)
    a = torch.zeros(T, L.width)
    a[:, L["exp"]] = params.expression
    a[:, L["jaw"]] = params.jaw
    a[:, L["eyes"]] = params.eyes
    w = (1.0 / _prior_sigmas(cfg, E) ** 2).expand(T, -1).clone()
    terms = [(a, w)]
    if neighbours is not None:
        nb_R, nb_t, nb_e, nb_j, nb_y, nb_w = neighbours
        b = torch.zeros(T, L.width)
        b[:, L["rot"]] = rotation_matrix_to_axis_angle(params.rotation @ nb_R.transpose(1, 2))
        b[:, L["trans"]] = params.translation - nb_t
        b[:, L["exp"]] = params.expression - nb_e
        b[:, L["jaw"]] = params.jaw - nb_j
        b[:, L["eyes"]] = params.eyes - nb_y
        terms.append((b, nb_w[:, None] / _temporal_sigmas(cfg, E)[None] ** 2))
    return terms


def prior_cost(terms) -> torch.Tensor:
    """Per frame [T]: sum w a^2 over `prior_terms`."""
    return sum((w * a ** 2).sum(1) for a, w in terms)


def neighbour_means(params: FrameParams, order_ok: torch.Tensor):
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


def normal_equations(basis, arrays, params, targets, focal, pp, cfg, free, robust, points, block: int = 128):
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
        parts.append(normal_equations(basis, arr, params.select(sl), targets.select(sl), focal, pp, cfg, free,
                                       None if robust is None else robust[sl],
                                       None if points is None else points[sl], block))
    return tuple(torch.cat(x) for x in zip(*parts))


