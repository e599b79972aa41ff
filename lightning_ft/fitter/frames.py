"""Batched landmark fitting of all frames (Levenberg-Marquardt, per-frame
blocks): `fit_frames`, its initialisation and `fit_sequence` in chunks."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from ..cameras import frontal_rotation, project_points
from ..flame import contour_rows
from ..lbs import batch_rodrigues
from .basis import (LandmarkBasis, active_point_layout, fold_shape, head_rotation_flame, model_jacobian_blocks,
                    model_points, point_arrays, times_3x3, update_contour)
from .layout import ALL_BLOCKS, FrameLayout, apply_step
from .params import FitConfig, FrameParams, Targets
from .residuals import neighbour_means, normal_equations, point_residuals, prior_cost, prior_terms
from .solver import (Damping, active_bounds, damping_scale, feasible_fraction, hold_coordinates,
                     relative_decrease_below)


@dataclass
class FitResult:
    """A fit's parameters, its LM iterations, the reprojection RMSE (crop
    pixels) of the 68 landmarks and of the dense points, and the total cost
    at the start of each iteration."""

    params: FrameParams
    iterations: int
    rmse68_px: float
    rmse_dense_px: float
    cost_history: list = field(default_factory=list)


# trial params -> (cost per frame [T], per-point errors [T,N] crop px)
TrialCost = Callable[[FrameParams], Tuple[torch.Tensor, torch.Tensor]]


def _expression_entries(g: torch.Tensor, free_idx: torch.Tensor, L: FrameLayout) -> torch.Tensor:
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
    L = FrameLayout(params.expression.shape[1])
    free = tuple(b for b in ALL_BLOCKS if b in free and (b != "jaw" or basis.has_jaw))
    free_idx = L.columns(free)
    contiguous = torch.ones(T, dtype=torch.bool) if contiguous is None else contiguous
    damping = Damping("fixed", torch.full((T,), 1e-3))
    robust = None
    history = []
    it = 0
    rows = contour_rows(head_rotation_flame(params.rotation), basis.n_rows)
    folded = fold_shape(basis, params.shape)
    jacobians = bool(model_jacobian_blocks(free))
    arrays = point_arrays(basis, rows, folded=folded, jacobians=jacobians)

    def rigid_points():
        # Expression, jaw and eyes fixed: the model-space points change only
        # with the contour rows, so a rigid fit computes them once per rows.
        return model_points(basis, arrays, params.expression, batch_rodrigues(params.jaw),
                            batch_rodrigues(params.eyes.reshape(-1, 3)).reshape(T, 2, 3, 3))[0]

    points = rigid_points() if set(free) <= {"rot", "trans"} else None
    for it in range(1, cfg.max_iters + 1):
        nb = neighbour_means(params, contiguous) if temporal else None
        r, H, g, err, valid = normal_equations(basis, arrays, params, targets, focal, pp, cfg, free, robust,
                                               points)
        terms = prior_terms(params, cfg, nb)
        cost = (r ** 2).sum(1) + prior_cost(terms)
        H, g = _add_identity_priors(H, g, terms, free_idx)
        at_bound = None
        if cfg.expression_bounds is not None and "exp" in free:
            H, g, at_bound = _hold_expression_bounds(H, g, params.expression, free_idx, L, cfg.expression_bounds)
        evaluate = partial(_trial_cost, basis, arrays, targets, focal, pp, cfg, robust, points, nb)
        accepted, cost_new = _damped_trials(params, H, g, at_bound, cost, err, damping, free, free_idx, L, cfg,
                                            evaluate)
        total_old = cost.sum().item()
        total_new = torch.where(accepted, cost_new, cost).sum().item()
        history.append(total_old)
        # Geman-McClure weights from the per-point errors after this step (a
        # plain first iteration, so a bad start does not discard good points;
        # weights from before the step lag behind and make the fit oscillate).
        if it <= cfg.robust_updates:
            robust = _robust_weights(err, cfg)
        new_rows = contour_rows(head_rotation_flame(params.rotation), basis.n_rows)
        changed = new_rows != rows
        if changed.any():
            rows = new_rows
            update_contour(arrays, basis, folded, rows, changed)
            if points is not None:
                points = rigid_points()
        # Converged when this iteration's accepted steps barely lowered the
        # cost (relative), after the robust weights have come in.
        if it >= 3 and relative_decrease_below(total_old, total_new, cfg.tol):
            break
    _, _, err, valid = point_residuals(basis, arrays, params, targets, focal, pp, cfg, points=points)
    rmse68, rmse_d = _rmse68_dense(basis, err, valid)
    return FitResult(params=params, iterations=it, rmse68_px=rmse68, rmse_dense_px=rmse_d, cost_history=history)


def _add_identity_priors(H: torch.Tensor, g: torch.Tensor, terms, free_idx: torch.Tensor):
    """(H, g) [T,D,D], [T,D] over the free columns `free_idx` with the
    per-frame prior `terms` (`prior_terms`: (a, w) pairs [T,W] of the full
    layout) added; their Jacobians are the identity, so they add to the
    diagonal."""
    for a, w in terms:
        H = H + torch.diag_embed(w[:, free_idx])
        g = g + (w * a)[:, free_idx]
    return H, g


def _hold_expression_bounds(H: torch.Tensor, g: torch.Tensor, expression: torch.Tensor, free_idx: torch.Tensor,
                            L: FrameLayout, bounds: Tuple[float, float]):
    """Projected LM's normal equations: (H, g) over the free columns with the
    expression coefficients at a bound whose gradient points out of the box
    held (`solver.active_bounds`), and at_bound [T,D] over the free columns:
    -1 at the lower bound, +1 at the upper, 0 elsewhere. expression [T,E]."""
    T = expression.shape[0]
    held = torch.zeros(T, L.width, dtype=torch.bool)
    held[:, L["exp"]] = active_bounds(expression, _expression_entries(g, free_idx, L), bounds)
    H, g = hold_coordinates(H, g, held[:, free_idx])
    lo, hi = bounds
    at_bound = torch.zeros(T, L.width)
    at_bound[:, L["exp"]] = (expression >= hi - 1e-6).float() - (expression <= lo + 1e-6).float()
    return H, g, at_bound[:, free_idx]


def _trial_cost(basis: LandmarkBasis, arrays: dict, targets: Targets, focal: torch.Tensor, pp: torch.Tensor,
                cfg: FitConfig, robust: Optional[torch.Tensor], points: Optional[torch.Tensor],
                nb: Optional[FrameParams], trial: FrameParams) -> Tuple[torch.Tensor, torch.Tensor]:
    """A trial's cost per frame [T] (weighted point residuals plus priors,
    the neighbour means `nb` held) and its per-point errors [T,N] (crop px)."""
    r, _, err, _ = point_residuals(basis, arrays, trial, targets, focal, pp, cfg, (), robust, points)
    return (r ** 2).sum(1) + prior_cost(prior_terms(trial, cfg, nb)), err


def _damped_step(H: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, damping: Damping,
                 at_bound: Optional[torch.Tensor]) -> torch.Tensor:
    """The LM step [T,D] over the free columns from the damped normal
    equations; with `at_bound` (`_hold_expression_bounds`), coefficients at a
    bound whose step points out of the box are held and the step solved
    again."""
    A = damping.damped(H, scale)
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
            H2, g2 = hold_coordinates(H, g, out)
            A = damping.damped(H2)
            step_f = -torch.linalg.solve(A, g2[..., None])[..., 0]
    return step_f


def _damped_trials(params: FrameParams, H: torch.Tensor, g: torch.Tensor, at_bound: Optional[torch.Tensor],
                   cost: torch.Tensor, err: torch.Tensor, damping: Damping, free: Tuple[str, ...],
                   free_idx: torch.Tensor, L: FrameLayout, cfg: FitConfig, evaluate: TrialCost):
    """One LM iteration's trials: up to 4 damped steps, each frame taking the
    first that lowers its cost [T] and the rejected ones retried with more
    damping. Updates `params`, `err` [T,N] and `damping` in place. evaluate:
    trial params -> (cost [T], err [T,N]) (`_trial_cost`). Returns the
    frames that took a step [T] bool and the last trial's cost [T]."""
    T, E = params.expression.shape
    scale = damping_scale(H)
    accepted = torch.zeros(T, dtype=torch.bool)
    for _ in range(4):  # LM: retry rejected frames with more damping
        step = torch.zeros(T, L.width)
        step[:, free_idx] = _damped_step(H, g, scale, damping, at_bound)
        trial = apply_step(params, step, E, free, cfg.expression_bounds)
        cost_new, err_new = evaluate(trial)
        if at_bound is not None:
            cost_new, err_new = _keep_shortened_steps(params, step, trial, cost_new, err_new, free, L, cfg, evaluate)
        ok = (cost_new < cost) & ~accepted
        err[ok] = err_new[ok]
        for name in ("rotation", "translation", "expression", "jaw", "eyes"):
            getattr(params, name)[ok] = getattr(trial, name)[ok]
        damping.update(ok, settled=accepted)
        accepted |= ok
        if accepted.all():
            break
    return accepted, cost_new


def _keep_shortened_steps(params: FrameParams, step: torch.Tensor, trial: FrameParams, cost: torch.Tensor,
                          err: torch.Tensor, free: Tuple[str, ...], L: FrameLayout, cfg: FitConfig,
                          evaluate: TrialCost):
    """Where it costs less, the step [T,D] shortened to the first expression
    bound it meets in place of the clipped `trial` (updated in place).
    Returns the chosen trials' cost [T] and errors [T,N]."""
    # Clipping a weight that crosses a bound bends the step: on
    # carphone the clipped step raised the cost where the
    # unclipped one lowered it 50x as much, and the fit stalled
    # after 3 iterations (7.3 px). The step shortened to the
    # first bound it meets is a descent direction: each frame
    # keeps the better of the two.
    E = params.expression.shape[1]
    trial_cut = apply_step(params, step * feasible_fraction(params.expression, step[:, L["exp"]],
                                                            cfg.expression_bounds)[:, None],
                           E, free, cfg.expression_bounds)
    cost_cut, err_cut = evaluate(trial_cut)
    cut = cost_cut < cost
    if bool(cut.any()):
        for name in ("rotation", "translation", "expression", "jaw", "eyes"):
            getattr(trial, name)[cut] = getattr(trial_cut, name)[cut]
        cost, err = torch.where(cut, cost_cut, cost), torch.where(cut[:, None], err_cut, err)
    return cost, err


def _robust_weights(err: torch.Tensor, cfg: FitConfig) -> torch.Tensor:
    """Geman-McClure weights [T,N] of per-point errors [T,N] (crop px),
    measured at 512 px so that `cfg.robust_scale_px` holds for any crop."""
    s2 = cfg.robust_scale_px ** 2
    err512 = err * (512.0 / cfg.image_size)
    return (s2 / (s2 + err512 ** 2)) ** 2


def _rmse68_dense(basis: LandmarkBasis, err: torch.Tensor, valid: torch.Tensor) -> Tuple[float, float]:
    """RMSE (crop px) of the valid 68 landmarks and of the valid dense points,
    from per-point errors and validity [T,N]; NaN where none is valid."""
    lay = active_point_layout(basis)
    v68 = torch.cat([valid[:, lay["contour"]], valid[:, lay["lmk68_inner"]]], 1)
    e68 = torch.cat([err[:, lay["contour"]], err[:, lay["lmk68_inner"]]], 1)
    rmse68 = float(e68[v68].pow(2).mean().sqrt()) if v68.any() else float("nan")
    vd, ed = valid[:, lay["dense"]], err[:, lay["dense"]]
    rmse_d = float(ed[vd].pow(2).mean().sqrt()) if vd.any() else float("nan")
    return rmse68, rmse_d


def predict_landmarks(basis: LandmarkBasis, params: FrameParams, focal, pp) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reprojected 68 landmarks [T,68,2] (iBUG order) and dense points [T,M,2]."""
    T = params.rotation.shape[0]
    rows = contour_rows(head_rotation_flame(params.rotation), basis.n_rows)
    arrays = point_arrays(basis, rows, params.shape, jacobians=False)
    X, _ = model_points(basis, arrays, params.expression, batch_rodrigues(params.jaw),
                        batch_rodrigues(params.eyes.reshape(-1, 3)).reshape(T, 2, 3, 3))
    uv = project_points(times_3x3(X, params.rotation.transpose(1, 2)) + params.translation[:, None], focal, pp)
    lay = active_point_layout(basis)
    lmk68 = torch.cat([uv[:, lay["contour"]], uv[:, lay["lmk68_inner"]]], 1)
    return lmk68, uv[:, lay["dense"]]


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
    arr = point_arrays(basis, torch.zeros(1, dtype=torch.long), shape, jacobians=False)
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
