"""Camera calibration: one focal length and one identity from sampled frames.

A joint fit of focal length and shape is ill-conditioned: a narrower face seen
from closer looks much like a wider face from farther, so shape soaks up
perspective. We fit shape and the per-frame poses and expressions by
Levenberg-Marquardt at a coarse grid of fixed focals (the per-frame blocks
are eliminated through their Schur complement, so a step costs little more
than per-frame fitting), with shape under its N(0, I) prior and a weak
log-normal prior on the focal; from the best grid point one more LM fit
frees the focal, moving every depth with it so that its Jacobian column
holds only the perspective change. Frames are chosen spread over time and
over head pose, since rotation is what separates depth structure from shape.
With 1 px landmark noise and 32 frames the focal is noise-limited to a few
percent at 800-1200 px on 512 px crops and to ~10 % at 2000 px
(benchmarks/bench_calibration.py). The fit's curvature along the focal,
scaled by the residuals' noise, predicts that spread (`focal_rel_std`):
2-5 % at 800-1200 px, 6-8 % at 2000 px there, and the errors fall within
two predicted sigmas in 23 of 24 cases. Started from the true parameters,
the same fit ends as far off (e.g. -3.3 % where ours gives -3.0 %), so
what remains is the information in 32 noisy frames, not the solver.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import NoFaceError
from .optimize import (ALL_BLOCKS, FitConfig, FrameParams, LandmarkBasis, Targets, _apply_step,
                       _param_vector_terms, _point_arrays, _vector_cost, fold_shape, head_rotation_flame,
                       held_contour_rows, initial_params, point_residuals)


@dataclass
class CalibrationConfig:
    n_frames: int = 32
    seed: int = 0
    grid_factors: Sequence[float] = (0.5, 0.72, 1.0, 1.4, 2.0)
    iters: int = 12
    coarse_iters: int = 5               # LM iterations per focal of the coarse sweep
    free_iters: int = 20                # LM iterations of the final fit with the focal free
    focal_prior_factor: float = 2.5     # prior centre = factor * image width (px)
    focal_prior_sigma_log: float = 0.5  # weak: a factor e^0.5 = 1.65 is one sigma
    sigma_shape: float = 1.0
    alternations: int = 4
    iters_per_alternation: int = 6


@dataclass
class Calibration:
    """focal_px [2] (fx = fy), principal_point [2] px, shape [n_shape],
    frames [K] indices used, focal_costs: (focal, cost) per grid point, then
    the final free-focal fit's; focal_rel_std: the focal's standard deviation
    relative to its value, as the fit's curvature and residuals predict it."""

    focal_px: np.ndarray
    principal_point: np.ndarray
    shape: np.ndarray
    frames: np.ndarray
    focal_costs: list
    focal_rel_std: float = float("nan")


def select_frames(valid: np.ndarray, yaw_proxy: Optional[np.ndarray], n: int, seed: int = 0) -> np.ndarray:
    """Up to n valid frames, half spread evenly in time, half chosen to span
    the head-pose range (by a yaw proxy), seeded and deterministic."""
    idx = np.flatnonzero(valid)
    if len(idx) == 0:
        raise NoFaceError("no valid frame to calibrate on")
    if len(idx) <= n:
        return idx
    rng = np.random.default_rng(seed)
    even = idx[np.linspace(0, len(idx) - 1, n // 2).round().astype(int)]
    chosen = set(even.tolist())
    if yaw_proxy is not None:
        order = idx[np.argsort(yaw_proxy[idx])]
        for q in np.linspace(0, len(order) - 1, n - len(chosen)).round().astype(int):
            chosen.add(int(order[q]))
    rest = np.setdiff1d(idx, np.fromiter(chosen, int))
    while len(chosen) < n and len(rest):
        k = rng.integers(len(rest))
        chosen.add(int(rest[k]))
        rest = np.delete(rest, k)
    return np.sort(np.fromiter(chosen, int))


def yaw_proxy(lmk68: np.ndarray) -> np.ndarray:
    """Left-right asymmetry of the nose tip between the outer eye corners [T]."""
    a = lmk68[:, 30, 0] - lmk68[:, 36, 0]
    b = lmk68[:, 45, 0] - lmk68[:, 30, 0]
    return (a - b) / np.maximum(a + b, 1e-6)


def _joint_linearize(full: LandmarkBasis, arrays, S: int, params: FrameParams, shape, log_f, targets, pp, cfg,
                     want_jac: bool, want_focal: bool = True):
    """Point residuals r [T,N]; with want_jac also the per-frame Jacobian
    A [T,N,15+E] (layout of `_layout(E)`) and the shared one B [T,N,S+1]
    (shape, log focal). `full` is the basis with shape taken as expression,
    `arrays` its `_point_arrays` for the current contour rows."""
    T = params.rotation.shape[0]
    f = torch.exp(log_f).reshape(1).expand(2)
    coeffs = torch.cat([shape.expand(T, -1), params.expression], 1)
    p = FrameParams(params.rotation, params.translation, coeffs, params.jaw, params.eyes, torch.zeros(0))
    if not want_jac:
        return point_residuals(full, arrays, p, targets, f, pp, cfg)[0]
    r, J = point_residuals(full, arrays, p, targets, f, pp, cfg, ALL_BLOCKS + (("focal",) if want_focal else ()))[:2]
    E = params.expression.shape[1]
    # Slices joined with cat: indexing the last dimension with an index
    # tensor (a strided gather) took 10x as long.
    A = torch.cat([J[..., :6], J[..., 6 + S:15 + S + E]], -1)
    B = torch.cat([J[..., 6:6 + S], J[..., 15 + S + E:]], -1)
    return r, A, B


def _spd_solve(H: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """H^-1 rhs for damped Gauss-Newton blocks H [...,n,n] (symmetric
    positive definite) and many right-hand sides: the inverse from the
    Cholesky factor times rhs (for [32,65,65] blocks and 101 columns, 2.2 ms
    against 6.1 ms for cholesky_solve and 8.5 ms for LU); LU where float32
    rounding leaves a block indefinite."""
    L, info = torch.linalg.cholesky_ex(H)
    if bool((info == 0).all()):
        return torch.cholesky_inverse(L) @ rhs
    return torch.linalg.solve(H, rhs)


def _joint_fit(basis: LandmarkBasis, targets: Targets, params: FrameParams, log_f: torch.Tensor, pp, cfg: FitConfig,
               ccfg: CalibrationConfig, log_f0: float, iters: int = 40, fix_focal: bool = True):
    """Levenberg-Marquardt on the sampled frames with shared shape (and
    focal unless fixed), solved through the Schur complement of the
    per-frame blocks. Returns (params with .shape, log focal, cost)."""
    S, E = basis.n_shape, basis.n_exp
    full = replace(basis, n_shape=0, n_exp=S + E)
    folded = fold_shape(full, torch.zeros(0))
    shape = params.shape.clone()
    params = params.clone()
    mu, nu = 1e-3, 2.0
    n_shared = S if fix_focal else S + 1
    sigma_shape = ccfg.sigma_shape
    prior_diag = torch.cat([torch.full((S,), 1 / sigma_shape ** 2),
                            torch.tensor([1 / ccfg.focal_prior_sigma_log ** 2])])[:n_shared]

    def total(r, params, shape, log_f):
        return float((r ** 2).sum() + _vector_cost(_param_vector_terms(params, cfg, None)).sum()
                     + (shape ** 2).sum() / sigma_shape ** 2
                     + ((log_f - log_f0) / ccfg.focal_prior_sigma_log) ** 2)

    # The yaw-dependent contour correspondence is held fixed within a step and
    # updated between steps, as in fit_frames: a trial scored with its own
    # rows is a different cost than the one linearized, and LM then stalls
    # (the focal profile came out jagged, 10-20 % off on noiseless data).
    rows = None

    def linearize(params, shape, log_f):
        nonlocal rows
        rows = held_contour_rows(head_rotation_flame(params.rotation), full.n_rows, rows)
        arrays = _point_arrays(full, rows, folded=folded)
        r, A, B = _joint_linearize(full, arrays, S, params, shape, log_f, targets, pp, cfg, True, not fix_focal)
        if not fix_focal:
            # The focal moves with every depth (a dolly zoom: tz scales with
            # f), so its column holds only the perspective change. Against a
            # fixed depth it is nearly the depth columns' sum, and the Schur
            # complement, the difference of two large numbers, lost it in
            # float32: free-focal LM stalled where it started.
            B[..., -1] += params.translation[:, None, 2] * A[..., 5]
        return arrays, r, A, B

    arrays, r, A, B = linearize(params, shape, log_f)
    cost = total(r, params, shape, log_f)
    stale = False
    for _ in range(iters):
        terms = _param_vector_terms(params, cfg, None)  # per-frame priors (identity Jacobians)
        Hff, Hfs, Hss = _hessian_blocks(A, B, terms, prior_diag)
        gf = (r[:, None] @ A)[:, 0]  # row vector times J: 5x faster than J^T r (strided)
        for a, w in terms:
            gf = gf + w * a
        gf = gf[..., None]
        gs = B.reshape(-1, n_shared).T @ r.reshape(-1) + torch.cat(
            [shape / sigma_shape ** 2, ((log_f - log_f0) / ccfg.focal_prior_sigma_log ** 2).reshape(1)])[:n_shared]
        Hfs_gf = torch.cat([Hfs, gf], -1)
        Hfs_flat = Hfs.reshape(-1, n_shared)
        dff = torch.diagonal(Hff, dim1=1, dim2=2) + 1e-6  # LM's scaling of the damping
        dss = torch.diagonal(Hss) + 1e-6
        improved, rel = False, 0.0
        for _ in range(6):
            Hff_d = Hff + torch.diag_embed(mu * dff)
            Hss_d = Hss + mu * torch.diag(dss)
            X = _spd_solve(Hff_d, Hfs_gf)
            Hinv_Hfs, Hinv_gf = X[..., :-1], X[..., -1:]
            reduced = Hfs_flat.T @ X.reshape(-1, n_shared + 1)  # [Hfs' Hff^-1 Hfs | Hfs' Hff^-1 gf]
            schur = Hss_d - reduced[:, :-1]
            rhs = gs - reduced[:, -1]
            ds = -torch.linalg.solve(schur, rhs)
            df = -(Hinv_gf[..., 0] + Hinv_Hfs @ ds)
            trial = _apply_step(params, df, E)
            if not fix_focal:
                trial.translation[:, 2] *= torch.exp(ds[S])
            shape_t = shape + ds[:S]
            log_f_t = log_f if fix_focal else log_f + ds[S]
            r_t = _joint_linearize(full, arrays, S, trial, shape_t, log_f_t, targets, pp, cfg, False)
            cost_t = total(r_t, trial, shape_t, log_f_t)
            if cost_t < cost:
                # Nielsen's damping: mu follows the gain ratio (actual over
                # predicted decrease) instead of /3 per accepted step, which
                # overshot and paid for it in rejected trials (each a solve
                # and a residual evaluation)
                predicted = float(-(gf[..., 0] * df).sum() - (gs * ds).sum()
                                  + mu * (dff * df ** 2).sum() + mu * (dss * ds ** 2).sum())
                rho = (cost - cost_t) / max(predicted, 1e-30)
                rel = (cost - cost_t) / cost
                params, shape, log_f, cost = trial, shape_t, log_f_t, cost_t
                mu, nu = max(mu * max(1 / 3, 1 - (2 * rho - 1) ** 3), 1e-7), 2.0
                improved = True
                break
            mu, nu = min(mu * nu, 1e7), nu * 2
        if not improved or rel < 1e-6:
            stale = improved  # a step was taken after the last linearization
            break
        arrays, r, A, B = linearize(params, shape, log_f)
        cost = total(r, params, shape, log_f)  # under the new rows
    params.shape = shape
    log_f_std = None
    if not fix_focal:  # at the final estimate
        if stale:
            _, r, A, B = linearize(params, shape, log_f)
        log_f_std = _log_focal_std(A, B, r, params, cfg, prior_diag)
    return params, log_f, cost, log_f_std


def _hessian_blocks(A: torch.Tensor, B: torch.Tensor, terms, prior_diag: torch.Tensor):
    """Gauss-Newton blocks of the joint fit, in A's dtype: per-frame Hff
    [T,D,D] with the per-frame prior `terms` (`_param_vector_terms`), Hfs
    [T,D,n] and the shared Hss [n,n] with the shape (and focal) prior
    `prior_diag` [n]. Frame and point sums as one matrix product each
    (einsum took 2-17x longer for these shapes)."""
    Hff = A.transpose(1, 2) @ A
    for _, w in terms:  # identity Jacobians
        Hff = Hff + torch.diag_embed(w.to(A.dtype))
    B_flat = B.reshape(-1, B.shape[-1])
    return Hff, A.transpose(1, 2) @ B, B_flat.T @ B_flat + torch.diag(prior_diag.to(A.dtype))


def _log_focal_std(A: torch.Tensor, B: torch.Tensor, r: torch.Tensor, params: FrameParams, cfg: FitConfig,
                   prior_diag: torch.Tensor) -> float:
    """Standard deviation of the log focal (~ its relative error) from the
    Gauss-Newton posterior at the fit: the last entry of the inverse Schur
    complement of the per-frame blocks, scaled by the noise variance the
    landmark residuals show (the weights assume 1 px; real detectors are
    worse, and the stand-in model's misfit counts as noise too). In float64:
    in float32 the Schur complement's cancellation left negative variances
    where the priors are weak."""
    A, B, r = A.double(), B.double(), r.double()
    Hff, Hfs, Hss = _hessian_blocks(A, B, _param_vector_terms(params, cfg, None), prior_diag)
    schur = Hss - (Hfs.transpose(1, 2) @ _spd_solve(Hff, Hfs)).sum(0)
    n_params = A.shape[0] * A.shape[-1] + B.shape[-1]
    noise_var = float((r ** 2).sum()) / max(1, r.numel() - n_params)
    var = float(torch.linalg.inv(schur)[-1, -1]) * noise_var
    return float(np.sqrt(var)) if var > 0 else float("nan")


def calibrate(basis: LandmarkBasis, targets: Targets, valid: np.ndarray, image_size: tuple,
              cfg: FitConfig = FitConfig(), ccfg: CalibrationConfig = CalibrationConfig(),
              init_shape: Optional[np.ndarray] = None) -> Calibration:
    """Fit one focal length and identity on up to `ccfg.n_frames` frames.

    targets: all frames (crop pixels); valid [T]; image_size (H, W).
    """
    H, W = image_size
    pp = torch.tensor([(W - 1) / 2.0, (H - 1) / 2.0], dtype=torch.float32)  # OpenCV: pixel centres at integer coordinates
    frames = select_frames(valid, yaw_proxy(targets.lmk68.numpy()), ccfg.n_frames, ccfg.seed)
    sub = targets.select(torch.as_tensor(frames))
    shape0 = torch.zeros(basis.n_shape) if init_shape is None else torch.as_tensor(init_shape, dtype=torch.float32)
    f0 = ccfg.focal_prior_factor * W
    log_f0 = float(np.log(f0))
    # A coarse profile of the focal first (every other unknown refitted at
    # each grid focal) finds the basin: LM with a free focal from a cold
    # start wanders along the long, flat focal-shape valley.
    def profile(factors, start: Optional[FrameParams], start_f: Optional[float], iters: int = ccfg.iters):
        out, params, prev_f = [], start, start_f
        for factor in factors:
            f = f0 * factor
            if params is None:
                focal = torch.tensor([f, f], dtype=torch.float32)
                params = initial_params(basis, sub, focal, pp, shape=shape0, cfg=cfg)
            else:  # warm start: same poses and shape, depth scaled with the focal
                params = params.clone()
                params.translation = params.translation * (f / prev_f)
            params, _, cost, _ = _joint_fit(basis, sub, params, torch.tensor(float(np.log(f))), pp, cfg, ccfg,
                                            log_f0, iters=iters)
            out.append((f, cost, params))
            prev_f = f
            if start is not None:  # every focal from the given basin
                params, prev_f = start, start_f
        return out

    coarse = profile(ccfg.grid_factors, None, None, ccfg.coarse_iters)
    k = int(np.argmin([c for _, c, _ in coarse]))
    # A minimum at the edge of the grid: walk on (within the prior's reach).
    step = ccfg.grid_factors[1] / ccfg.grid_factors[0]
    for _ in range(3):
        if k not in (0, len(coarse) - 1):
            break
        factor = coarse[k][0] / f0 * (step if k else 1 / step)
        extra = profile([factor], coarse[k][2], coarse[k][0])
        coarse = sorted(coarse + extra, key=lambda x: x[0])
        k = int(np.argmin([c for _, c, _ in coarse]))
    # From the best grid point's basin, LM with the focal free: with the
    # contour correspondence held within each step the valley is smooth, and
    # it reaches the profile's minimum in one fit (the older refits of the
    # grid neighbours and a parabola through them cost 3 fits and missed it
    # by several percent on noiseless data: the profile is not a parabola
    # over a 1.4x focal step).
    best_f, _, start = coarse[k]
    best_params, log_f, cost, log_f_std = _joint_fit(basis, sub, start, torch.tensor(float(np.log(best_f))), pp,
                                                     cfg, ccfg, log_f0, iters=ccfg.free_iters, fix_focal=False)
    best_f = float(torch.exp(log_f))
    results = [(float(f), float(c)) for f, c, _ in coarse] + [(best_f, float(cost))]
    return Calibration(
        focal_px=np.array([best_f, best_f], dtype=np.float64), principal_point=pp.numpy().astype(np.float64),
        shape=best_params.shape.numpy().astype(np.float64), frames=frames, focal_costs=results,
        focal_rel_std=log_f_std)
