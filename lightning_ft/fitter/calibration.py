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
from functools import partial
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import NoFaceError
from .basis import LandmarkBasis, fold_shape, head_rotation_flame, held_contour_rows, point_arrays
from .frames import initial_params
from .layout import ALL_BLOCKS, CalibrationLayout, FrameLayout, apply_step
from .params import FitConfig, FrameParams, Targets
from .residuals import point_residuals, prior_terms
from .solver import Damping, damping_scale, gain_ratio, predicted_decrease, relative_decrease_below


@dataclass
class CalibrationConfig:
    """fov_prior_deg / fov_prior_sigma_log: the log-normal prior on the focal
    when the source frame is known (`SourceView`): centred on a horizontal
    field of view of the SOURCE video, one sigma in log focal (docs/camera.md
    says where the numbers come from). focal_prior_factor: the prior's
    centre (factor x crop width) when it is not."""

    n_frames: int = 32
    seed: int = 0                       # kept for old configs; frame choice is deterministic
    grid_factors: Sequence[float] = (0.5, 0.72, 1.0, 1.4, 2.0)
    iters: int = 12
    coarse_iters: int = 5               # LM iterations per focal of the coarse sweep
    free_iters: int = 20                # LM iterations of the final fit with the focal free
    focal_prior_factor: float = 2.5     # prior centre = factor * image width (px), source frame unknown
    focal_prior_sigma_log: float = 0.5  # weak: a factor e^0.5 = 1.65 is one sigma
    fov_prior_deg: float = 55.0         # horizontal field of view of the source video, prior centre
    fov_prior_sigma_log: float = 0.5    # one sigma: 35-81 deg horizontal, two: 21-109 deg
    sigma_shape: float = 1.0
    # The dense points' weight in calibration relative to fitting's (a knob
    # for `benchmarks/bench_camera.py sweep`). 0.3 narrowed the focal's spread
    # over variants of carphone and a 512 px clip with ICT calibrated from 32
    # frames (17.5 -> 17.1 %, 16.3 -> 12.3 %), but with ICT calibrated from 64
    # frames it widened carphone's (21.7 -> 34.6 %; the 512 px clip
    # 21.2 -> 17.7 %), raised ICT's synthetic face error (1.19 -> 1.50 mm) and
    # focal error (1.18 -> 1.55 %), and cost 0.4 s per run: full weight kept.
    dense_weight_scale: float = 1.0
    alternations: int = 4
    iters_per_alternation: int = 6


@dataclass
class SourceView:
    """Where the crops sit in the source video: width_px, the source frame's
    width (px); crop_scale, crop pixels per source pixel (the crop's size over
    the crop box's side in the source, the median over frames). A focal in
    crop pixels is the source focal times crop_scale."""

    width_px: float
    crop_scale: float

    @staticmethod
    def from_crop_boxes(crop_boxes: np.ndarray, image_size: tuple, source_width: float,
                        valid: Optional[np.ndarray] = None) -> "SourceView":
        boxes = np.asarray(crop_boxes, dtype=np.float64)
        if valid is not None and np.any(valid):
            boxes = boxes[np.asarray(valid, bool)]
        side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        return SourceView(float(source_width), float(max(image_size) / np.median(side)))

    def crop_focal(self, source_focal_px: float) -> float:
        return source_focal_px * self.crop_scale

    def source_focal(self, crop_focal_px: float) -> float:
        return crop_focal_px / self.crop_scale

    def fov_deg(self, crop_focal_px: float) -> float:
        """Horizontal field of view (degrees) of the source video."""
        return focal_to_fov_deg(self.source_focal(crop_focal_px), self.width_px)


def fov_deg_to_focal(fov_deg: float, width_px: float) -> float:
    """Pinhole focal (px) whose horizontal field of view over width_px is fov_deg."""
    return width_px / 2.0 / np.tan(np.deg2rad(fov_deg) / 2.0)


def focal_to_fov_deg(focal_px: float, width_px: float) -> float:
    return float(np.rad2deg(2.0 * np.arctan(width_px / 2.0 / focal_px)))


def combine_focals(estimates: Sequence[dict]) -> tuple:
    """One focal from several calibrations of the same camera: each entry
    has focal_source_px, focal_rel_std (its posterior std in log focal),
    prior_focal_source_px and prior_sigma_log (the prior it was fitted
    under). Each posterior already holds the prior, so the prior's precision
    is taken out of each and counted once: the product of the videos'
    likelihoods and one prior, in log focal. An estimate without a predicted
    std weighs as its prior alone (it adds nothing). Returns (focal source
    px, predicted relative std)."""
    mu0 = float(np.mean([np.log(e["prior_focal_source_px"]) for e in estimates]))
    p0 = 1.0 / float(np.mean([e["prior_sigma_log"] for e in estimates])) ** 2
    precision, weighted = p0, p0 * mu0
    for e in estimates:
        std = e["focal_rel_std"]
        if std is None or not np.isfinite(std) or std <= 0:
            continue
        # the data's own precision and mean, once the prior is divided out
        p_data = max(1.0 / std ** 2 - p0, 0.0)
        if p_data == 0.0:
            continue
        m_data = (np.log(e["focal_source_px"]) / std ** 2 - p0 * np.log(e["prior_focal_source_px"])) / p_data
        precision += p_data
        weighted += p_data * m_data
    return float(np.exp(weighted / precision)), float(1.0 / np.sqrt(precision))


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
    prior: Optional[dict] = None

    def describe(self, source: Optional[SourceView]) -> dict:
        """What calibration did, for meta.json."""
        f = float(self.focal_px[0])
        out = {"frames": self.frames.tolist(), "focal_costs": self.focal_costs, "focal_px": f,
               "focal_rel_std": float(self.focal_rel_std) if np.isfinite(self.focal_rel_std) else None,
               "prior": self.prior}
        if source is not None:
            out.update(source_width_px=source.width_px, crop_scale=source.crop_scale,
                       focal_source_px=source.source_focal(f), fov_deg=source.fov_deg(f))
        return out


def select_frames(valid: np.ndarray, features: Optional[np.ndarray], n: int, seed: int = 0) -> np.ndarray:
    """Up to n valid frames chosen for what they tell about the focal, with
    no randomness: half spread evenly in time (ends included), half at
    even quantiles of the first feature (the yaw: rotation is what separates
    depth structure from shape), and where those coincide, farthest-point
    sampling over all features ([T] or [T,K], e.g. `pose_features`: yaw,
    pitch, log face size, each scaled by its spread over the valid frames),
    so the frames that add the most pose or depth change come next. Ties go
    to the earlier frame. `seed` is unused (kept for callers of the former,
    seeded version)."""
    idx = np.flatnonzero(valid)
    if len(idx) == 0:
        raise NoFaceError("no valid frame to calibrate on")
    if len(idx) <= n:
        return idx
    chosen = np.zeros(len(idx), bool)
    chosen[np.linspace(0, len(idx) - 1, n // 2).round().astype(int)] = True
    if features is None:
        x = (np.arange(len(idx), dtype=np.float64) / len(idx))[:, None]
    else:
        x = np.asarray(features, dtype=np.float64)[idx].reshape(len(idx), -1)
        x = np.where(np.isfinite(x), x, np.nanmedian(x, axis=0) if np.isfinite(x).any() else 0.0)
        spread = x.std(axis=0)
        x = (x - x.mean(axis=0)) / np.where(spread > 1e-9, spread, 1.0)
        order = np.argsort(x[:, 0], kind="stable")
        chosen[order[np.linspace(0, len(idx) - 1, n - int(chosen.sum())).round().astype(int)]] = True
    dist = np.full(len(idx), np.inf)
    for k in np.flatnonzero(chosen):
        dist = np.minimum(dist, ((x - x[k]) ** 2).sum(1))
    while chosen.sum() < n:
        k = int(np.argmax(np.where(chosen, -1.0, dist)))
        chosen[k] = True
        dist = np.minimum(dist, ((x - x[k]) ** 2).sum(1))
    return idx[chosen]


def yaw_proxy(lmk68: np.ndarray) -> np.ndarray:
    """Left-right asymmetry of the nose tip between the outer eye corners [T]."""
    a = lmk68[:, 30, 0] - lmk68[:, 36, 0]
    b = lmk68[:, 45, 0] - lmk68[:, 30, 0]
    return (a - b) / np.maximum(a + b, 1e-6)


def pose_features(lmk68: np.ndarray) -> np.ndarray:
    """Per-frame cues [T,3] of what separates focal from shape: yaw (nose tip
    between the eye corners), pitch (nose tip between the eye line and the
    chin) and log face size (eye-corner span plus nose-bridge-to-chin
    length; it changes with the distance, i.e. depth)."""
    eyes_y = (lmk68[:, 36, 1] + lmk68[:, 45, 1]) / 2
    pitch = (lmk68[:, 30, 1] - eyes_y) / np.maximum(lmk68[:, 8, 1] - eyes_y, 1e-6)
    size = np.linalg.norm(lmk68[:, 45] - lmk68[:, 36], axis=-1) + np.linalg.norm(lmk68[:, 8] - lmk68[:, 27], axis=-1)
    return np.stack([yaw_proxy(lmk68), pitch, np.log(np.maximum(size, 1e-6))], axis=1)


def _joint_linearize(full: LandmarkBasis, arrays, S: int, params: FrameParams, shape, log_f, targets, pp, cfg,
                     want_jac: bool, want_focal: bool = True):
    """Point residuals r [T,N]; with want_jac also the per-frame Jacobian
    A [T,N,D] (`FrameLayout(E)`) and the shared one B [T,N,S+1] (shape, log
    focal; `CalibrationLayout`). `full` is the basis with shape taken as
    expression, `arrays` its `point_arrays` for the current contour rows."""
    T = params.rotation.shape[0]
    f = torch.exp(log_f).reshape(1).expand(2)
    coeffs = torch.cat([shape.expand(T, -1), params.expression], 1)
    p = FrameParams(params.rotation, params.translation, coeffs, params.jaw, params.eyes, torch.zeros(0))
    if not want_jac:
        return point_residuals(full, arrays, p, targets, f, pp, cfg)[0]
    r, J = point_residuals(full, arrays, p, targets, f, pp, cfg, ALL_BLOCKS + (("focal",) if want_focal else ()))[:2]
    layout = CalibrationLayout(S, params.expression.shape[1])
    # Slices joined with cat: indexing the last dimension with an index
    # tensor (a strided gather) took 10x as long.
    A = torch.cat([J[..., cols] for cols in layout.frame_columns], -1)
    B = torch.cat([J[..., cols] for cols in layout.shared_columns], -1)
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
    # Nielsen's rule (`solver.Damping`): mu / 3 per taken step overshot here
    # and paid for it in rejected trials, each a Schur solve and a residual
    # evaluation. One mu for the whole joint system, in float64 like its solves.
    damping = Damping("nielsen", torch.tensor(1e-3, dtype=torch.float64))
    n_shared = S if fix_focal else S + 1
    prior_diag = torch.cat([torch.full((S,), 1 / ccfg.sigma_shape ** 2, dtype=torch.float64),
                            torch.tensor([1 / ccfg.focal_prior_sigma_log ** 2], dtype=torch.float64)])[:n_shared]
    total = partial(_joint_cost, cfg=cfg, ccfg=ccfg, log_f0=log_f0)

    # The yaw-dependent contour correspondence is held fixed within a step and
    # updated between steps, as in fit_frames: a trial scored with its own
    # rows is a different cost than the one linearized, and LM then stalls
    # (the focal profile came out jagged, 10-20 % off on noiseless data).
    rows = None
    depth_column = FrameLayout(E)["trans"].start + 2  # tz

    def linearize(params, shape, log_f):
        nonlocal rows
        rows = held_contour_rows(head_rotation_flame(params.rotation), full.n_rows, rows)
        arrays = point_arrays(full, rows, folded=folded)
        r, A, B = _joint_linearize(full, arrays, S, params, shape, log_f, targets, pp, cfg, True, not fix_focal)
        if not fix_focal:
            # The focal moves with every depth (a dolly zoom: tz scales with
            # f), so its column holds only the perspective change. Against a
            # fixed depth it is nearly the depth columns' sum, and the Schur
            # complement, the difference of two large numbers, lost it in
            # float32: free-focal LM stalled where it started.
            B[..., -1] += params.translation[:, None, 2] * A[..., depth_column]
        return arrays, r, A, B

    arrays, r, A, B = linearize(params, shape, log_f)
    cost = total(r, params, shape, log_f)
    stale = False
    for _ in range(iters):
        Hff, Hfs, Hss, gf, gs = _joint_normal_equations(A, B, r, params, shape, log_f, cfg, ccfg, log_f0, prior_diag)
        Hfs_gf = torch.cat([Hfs, gf], -1)
        Hfs_flat = Hfs.reshape(-1, n_shared)
        dff, dss = damping_scale(Hff), damping_scale(Hss)
        improved, converged = False, False
        for _ in range(6):
            df, ds = _schur_step(damping.damped(Hff, dff), damping.damped(Hss, dss), Hfs_gf, Hfs_flat, gs)
            trial, shape_t, log_f_t = _apply_joint_step(params, shape, log_f, df, ds, fix_focal)
            r_t = _joint_linearize(full, arrays, S, trial, shape_t, log_f_t, targets, pp, cfg, False)
            cost_t = total(r_t, trial, shape_t, log_f_t)
            if cost_t < cost:
                predicted = float(predicted_decrease([(gf[..., 0], df, dff), (gs, ds, dss)], damping.mu))
                damping.update(True, gain_ratio(cost - cost_t, predicted))
                converged = relative_decrease_below(cost, cost_t, 1e-6)
                params, shape, log_f, cost = trial, shape_t, log_f_t, cost_t
                improved = True
                break
            damping.update(False)
        if not improved or converged:
            stale = improved  # a step was taken after the last linearization
            break
        arrays, r, A, B = linearize(params, shape, log_f)
        cost = total(r, params, shape, log_f)  # under the new rows
    params.shape = shape
    noise_var = _residual_noise(r, params.rotation.shape[0] * A.shape[-1] + n_shared)
    log_f_std = None
    if not fix_focal:  # at the final estimate
        if stale:
            _, r, A, B = linearize(params, shape, log_f)
        log_f_std = _log_focal_std(A, B, r, params, cfg, prior_diag)
    return params, log_f, cost, log_f_std, noise_var


def _joint_cost(r: torch.Tensor, params: FrameParams, shape: torch.Tensor, log_f: torch.Tensor, cfg: FitConfig,
                ccfg: CalibrationConfig, log_f0: float) -> float:
    """The joint fit's cost: point residuals r [T,N], the per-frame priors,
    the shape prior and the log-normal focal prior around log_f0.

    Costs, normal equations and solves are in float64: in float32 their sums
    depend on the summation order, i.e. on the thread count, and along the
    flat focal-shape valley that was enough to move the focal by 30 %
    between two runs of the same file (issue 20). The Jacobians stay float32."""
    return float((r.double() ** 2).sum()
                 + sum((w.double() * a.double() ** 2).sum() for a, w in prior_terms(params, cfg, None))
                 + (shape.double() ** 2).sum() / ccfg.sigma_shape ** 2
                 + ((float(log_f) - log_f0) / ccfg.focal_prior_sigma_log) ** 2)


def _joint_normal_equations(A: torch.Tensor, B: torch.Tensor, r: torch.Tensor, params: FrameParams,
                            shape: torch.Tensor, log_f: torch.Tensor, cfg: FitConfig, ccfg: CalibrationConfig,
                            log_f0: float, prior_diag: torch.Tensor):
    """The joint fit's Gauss-Newton system in float64 from the per-frame
    Jacobian A [T,N,D], the shared one B [T,N,n] and residuals r [T,N]:
    Hff [T,D,D], Hfs [T,D,n], Hss [n,n] (`_hessian_blocks`), the per-frame
    gradient gf [T,D,1] and the shared gs [n], priors included."""
    n_shared = prior_diag.shape[0]
    terms = [(a.double(), w.double()) for a, w in prior_terms(params, cfg, None)]  # identity Jacobians
    A64, B64, r64 = A.double(), B.double(), r.double()
    Hff, Hfs, Hss = _hessian_blocks(A64, B64, terms, prior_diag)
    gf = (r64[:, None] @ A64)[:, 0]  # row vector times J: 5x faster than J^T r (strided)
    for a, w in terms:
        gf = gf + w * a
    gf = gf[..., None]
    gs = B64.reshape(-1, n_shared).T @ r64.reshape(-1) + torch.cat(
        [shape.double() / ccfg.sigma_shape ** 2,
         torch.tensor([(float(log_f) - log_f0) / ccfg.focal_prior_sigma_log ** 2], dtype=torch.float64)])[:n_shared]
    return Hff, Hfs, Hss, gf, gs


def _schur_step(Hff_d: torch.Tensor, Hss_d: torch.Tensor, Hfs_gf: torch.Tensor, Hfs_flat: torch.Tensor,
                gs: torch.Tensor):
    """The damped step (df [T,D], ds [n]) of the joint system with the
    per-frame blocks eliminated: Hff_d [T,D,D] and Hss_d [n,n] damped,
    Hfs_gf [T,D,n+1] the coupling blocks beside the per-frame gradient,
    Hfs_flat [T*D,n] the coupling blocks stacked, gs [n]."""
    n_shared = Hss_d.shape[0]
    X = _spd_solve(Hff_d, Hfs_gf)
    Hinv_Hfs, Hinv_gf = X[..., :-1], X[..., -1:]
    reduced = Hfs_flat.T @ X.reshape(-1, n_shared + 1)  # [Hfs' Hff^-1 Hfs | Hfs' Hff^-1 gf]
    schur = Hss_d - reduced[:, :-1]
    rhs = gs - reduced[:, -1]
    ds = -torch.linalg.solve(schur, rhs)
    df = -(Hinv_gf[..., 0] + Hinv_Hfs @ ds)
    return df, ds


def _apply_joint_step(params: FrameParams, shape: torch.Tensor, log_f: torch.Tensor, df: torch.Tensor,
                      ds: torch.Tensor, fix_focal: bool):
    """(trial params, shape [S], log focal) after the step df [T,D] of the
    per-frame blocks and ds [S] or [S+1] of the shared ones; a focal step
    scales every depth with it (`_joint_fit`'s dolly-zoom column)."""
    S = shape.shape[0]
    trial = apply_step(params, df.float(), params.expression.shape[1])
    if not fix_focal:
        trial.translation[:, 2] *= torch.exp(ds[S]).float()
    shape_t = shape + ds[:S].float()
    log_f_t = log_f if fix_focal else log_f + ds[S].float()
    return trial, shape_t, log_f_t


def _residual_noise(r: torch.Tensor, n_params: int):
    """(noise variance per point coordinate, share of it common to all
    frames) of residuals r [T,N] left by a fit of n_params unknowns; the
    weights assume 1 px (`_prior_scale` says what the share is for)."""
    r64 = r.double()
    noise_var = float((r64 ** 2).sum()) / max(1, r.numel() - n_params)
    common = float((r64.mean(0) ** 2).sum() / ((r64 ** 2).sum() / r64.shape[0]).clamp_min(1e-30))
    return noise_var, common


def _hessian_blocks(A: torch.Tensor, B: torch.Tensor, terms, prior_diag: torch.Tensor):
    """Gauss-Newton blocks of the joint fit, in A's dtype: per-frame Hff
    [T,D,D] with the per-frame prior `terms` (`prior_terms`), Hfs
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
    Hff, Hfs, Hss = _hessian_blocks(A, B, prior_terms(params, cfg, None), prior_diag)
    schur = Hss - (Hfs.transpose(1, 2) @ _spd_solve(Hff, Hfs)).sum(0)
    n_params = A.shape[0] * A.shape[-1] + B.shape[-1]
    noise_var = float((r ** 2).sum()) / max(1, r.numel() - n_params)
    var = float(torch.linalg.inv(schur)[-1, -1]) * noise_var
    return float(np.sqrt(var)) if var > 0 else float("nan")


def calibrate(basis: LandmarkBasis, targets: Targets, valid: np.ndarray, image_size: tuple,
              cfg: FitConfig = FitConfig(), ccfg: CalibrationConfig = CalibrationConfig(),
              init_shape: Optional[np.ndarray] = None, source: Optional[SourceView] = None,
              fixed_focal_px: Optional[float] = None) -> Calibration:
    """Fit one focal length and identity on up to `ccfg.n_frames` frames.

    targets: all frames (crop pixels); valid [T]; image_size (H, W).
    source: where the crops sit in the source video; with it the focal's
    prior is the real-lens field of view (`ccfg.fov_prior_deg`), without it
    a focal of `ccfg.focal_prior_factor` crop widths.
    fixed_focal_px: a known focal (crop pixels); then only the identity
    (and the sampled frames' poses) are fitted.

    Runs its CPU work on one thread: float32 Jacobians summed in another
    order (2 threads instead of 1) moved carphone's focal by 3.7 % along its
    flat profile, the float64 normal equations notwithstanding; the matrices
    are small (32 frames) and gain little from a second thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _calibrate(basis, targets, valid, image_size, cfg, ccfg, init_shape, source, fixed_focal_px)
    finally:
        torch.set_num_threads(threads)


def _focal_prior(ccfg: CalibrationConfig, source: Optional[SourceView], width_px: float):
    """The log-normal focal prior: (centre focal in crop px, sigma in log
    focal, its description for meta.json); the real-lens field of view where
    the source frame is known, else `ccfg.focal_prior_factor` crop widths."""
    if source is not None:
        f0 = source.crop_focal(fov_deg_to_focal(ccfg.fov_prior_deg, source.width_px))
        sigma_log = ccfg.fov_prior_sigma_log
        prior = {"kind": "field_of_view", "fov_deg": ccfg.fov_prior_deg, "sigma_log": sigma_log,
                 "focal_px": f0}
    else:
        f0 = ccfg.focal_prior_factor * width_px
        sigma_log = ccfg.focal_prior_sigma_log
        prior = {"kind": "crop_width", "factor": ccfg.focal_prior_factor, "sigma_log": sigma_log, "focal_px": f0}
    return f0, sigma_log, prior


def _calibrate_fixed_focal(basis: LandmarkBasis, sub: Targets, frames: np.ndarray, pp: torch.Tensor,
                           shape0: torch.Tensor, f: float, cfg: FitConfig, ccfg: CalibrationConfig,
                           log_f0: float) -> Calibration:
    """Calibration at a known focal f (crop px): the identity alone, fitted
    on the sampled frames `sub` (indices `frames`)."""
    focal = torch.tensor([f, f], dtype=torch.float32)
    params = initial_params(basis, sub, focal, pp, shape=shape0, cfg=cfg)
    params, _, cost, _, _ = _joint_fit(basis, sub, params, torch.tensor(float(np.log(f))), pp, cfg, ccfg, log_f0,
                                       iters=ccfg.iters + ccfg.free_iters)
    return Calibration(focal_px=np.array([f, f]), principal_point=pp.numpy().astype(np.float64),
                       shape=params.shape.numpy().astype(np.float64), frames=frames,
                       focal_costs=[(f, float(cost))], focal_rel_std=0.0, prior={"kind": "fixed", "focal_px": f})


def _prior_scale(noise_var: float, common: float, K: int):
    """(factor on the focal prior's weight, rho) for a fit on K frames whose
    residuals show noise_var per coordinate, a share `common` of it repeated
    by every frame; rho is that share in excess of independent noise.

    The landmark term's weights assume 1 px noise; where the residuals show
    more (detector noise, and a head model that cannot reach the face),
    the landmarks know the focal that much less, so the prior keeps its
    strength relative to them: its weight is scaled by the residual
    variance (never weakened below its own sigma). Without this, a 7 px
    misfit outweighed the field-of-view prior 50-fold and real clips ran off
    towards 100-degree or 10-degree lenses. And what every frame repeats
    (a misfit of the face's shape, the same photograph in every frame) is
    not averaged out over K frames: with a share rho of the residual
    variance common to all frames (rho = 1/K for independent noise), K
    frames weigh as K / (1 + (K - 1) rho_excess) independent ones."""
    rho = min(1.0, max(0.0, (common - 1.0 / K) * K / max(K - 1, 1)))
    return max(1.0, noise_var) * (1.0 + (K - 1) * rho), rho


def _calibrate(basis, targets, valid, image_size, cfg, ccfg, init_shape, source, fixed_focal_px) -> Calibration:
    H, W = image_size
    cfg = replace(cfg, w_dense=cfg.w_dense * ccfg.dense_weight_scale)
    pp = torch.tensor([(W - 1) / 2.0, (H - 1) / 2.0], dtype=torch.float32)  # OpenCV: pixel centres at integer coordinates
    frames = select_frames(valid, pose_features(targets.lmk68.numpy()), ccfg.n_frames, ccfg.seed)
    sub = targets.select(torch.as_tensor(frames))
    shape0 = torch.zeros(basis.n_shape) if init_shape is None else torch.as_tensor(init_shape, dtype=torch.float32)
    f0, sigma_log, prior = _focal_prior(ccfg, source, W)
    ccfg = replace(ccfg, focal_prior_sigma_log=sigma_log)
    log_f0 = float(np.log(f0))
    if fixed_focal_px is not None:
        return _calibrate_fixed_focal(basis, sub, frames, pp, shape0, float(fixed_focal_px), cfg, ccfg, log_f0)
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
            params, _, cost, _, noise_var = _joint_fit(basis, sub, params, torch.tensor(float(np.log(f))), pp, cfg,
                                                       ccfg, log_f0, iters=iters)
            out.append((f, cost, params, noise_var))
            prev_f = f
            if start is not None:  # every focal from the given basin
                params, prev_f = start, start_f
        return out

    coarse = profile(ccfg.grid_factors, None, None, ccfg.coarse_iters)
    k = int(np.argmin([c for _, c, _, _ in coarse]))
    # A minimum at the edge of the grid: walk on (within the prior's reach).
    step = ccfg.grid_factors[1] / ccfg.grid_factors[0]
    for _ in range(3):
        if k not in (0, len(coarse) - 1):
            break
        factor = coarse[k][0] / f0 * (step if k else 1 / step)
        extra = profile([factor], coarse[k][2], coarse[k][0])
        coarse = sorted(coarse + extra, key=lambda x: x[0])
        k = int(np.argmin([c for _, c, _, _ in coarse]))
    # From the best grid point's basin, LM with the focal free: with the
    # contour correspondence held within each step the valley is smooth, and
    # it reaches the profile's minimum in one fit (the older refits of the
    # grid neighbours and a parabola through them cost 3 fits and missed it
    # by several percent on noiseless data: the profile is not a parabola
    # over a 1.4x focal step).
    best_f, _, start, (noise_var, common) = coarse[k]
    prior_scale, rho = _prior_scale(noise_var, common, len(frames))
    prior["common_residual_share"] = rho
    ccfg = replace(ccfg, focal_prior_sigma_log=ccfg.focal_prior_sigma_log / np.sqrt(prior_scale))
    prior["residual_variance_px2"] = noise_var
    best_params, log_f, cost, log_f_std, _ = _joint_fit(basis, sub, start, torch.tensor(float(np.log(best_f))), pp,
                                                        cfg, ccfg, log_f0, iters=ccfg.free_iters, fix_focal=False)
    best_f = float(torch.exp(log_f))
    results = [(float(f), float(c)) for f, c, _, _ in coarse] + [(best_f, float(cost))]
    return Calibration(
        focal_px=np.array([best_f, best_f], dtype=np.float64), principal_point=pp.numpy().astype(np.float64),
        shape=best_params.shape.numpy().astype(np.float64), frames=frames, focal_costs=results,
        focal_rel_std=log_f_std, prior=prior)
