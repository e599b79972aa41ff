"""The landmark fit: exact landmark-level FLAME, analytic Jacobians, recovery,
robustness, chunking; the parameter layouts."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from lightning_ft.fitter import (ALL_BLOCKS, CalibrationLayout, FitConfig, FrameLayout, FrameParams, Targets,
                                 apply_step, build_basis, fit_frames, fit_sequence, head_rotation_flame,
                                 initial_params, point_residuals, predict_landmarks)
from lightning_ft.fitter.basis import point_arrays
from lightning_ft.fitter.residuals import normal_equations
from lightning_ft.flame import contour_rows
from lightning_ft.synthetic.sequences import make_sequence

FOCAL = torch.tensor([1200.0, 1200.0])
PP = torch.tensor([255.5, 255.5])


@pytest.fixture(scope="module")
def basis(flame_model):
    return build_basis(flame_model)


@pytest.fixture(scope="module")
def seq(flame_model):
    return make_sequence(flame_model, T=40, focal=1200.0, seed=5, noise_px=1.0)


def _gt(seq):
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    return FrameParams(t(seq.rotation), t(seq.translation), t(seq.expression), t(seq.jaw), t(seq.eyes), t(seq.shape))


def _err(basis, params, seq):
    pred, _ = predict_landmarks(basis, params, FOCAL, PP)
    return float(np.linalg.norm(pred.numpy() - seq.clean_lmk68, axis=-1).mean())


def test_landmark_basis_is_exact(basis, seq):
    # The landmark-level model at the true parameters reproduces the full
    # FLAME's projected landmarks (which generated the sequence).
    assert _err(basis, _gt(seq), seq) < 1e-3


def test_jacobian_matches_finite_differences(basis, seq):
    torch.manual_seed(0)
    p = _gt(seq).select(slice(0, 3))
    p.jaw = p.jaw + 0.1
    p.eyes = p.eyes + 0.05
    tg = Targets.from_landmarks(seq.lmk68[:3], seq.lmk_dense[:3], basis)
    rows = contour_rows(head_rotation_flame(p.rotation), basis.n_rows)
    arrays = point_arrays(basis, rows, p.shape)
    cfg = FitConfig()
    r, J = point_residuals(basis, arrays, p, tg, FOCAL, PP, cfg, ALL_BLOCKS)[:2]
    E = p.expression.shape[1]
    L = FrameLayout(E)
    exp, jaw, eyes = L["exp"], L["jaw"], L["eyes"]
    for col in [0, 2, 4, exp.start, exp.start + E // 2, jaw.start, jaw.start + 1, eyes.start, eyes.stop - 1]:
        # Expression enters linearly before projection: a larger step keeps
        # float32 rounding out of the difference quotient.
        eps = 2e-2 if exp.start <= col < exp.stop else 1e-3
        step = torch.zeros(3, L.width)
        step[:, col] = eps
        rp = point_residuals(basis, arrays, apply_step(p, step, E), tg, FOCAL, PP, cfg)[0]
        step[:, col] = -eps
        rm = point_residuals(basis, arrays, apply_step(p, step, E), tg, FOCAL, PP, cfg)[0]
        num = (rp - rm) / (2 * eps)
        scale = num.abs().max().clamp(min=1e-3)
        assert (num - J[..., col]).abs().max() / scale < 2e-2, col
    # The calibration's focal column: d r / d log f, the other columns unchanged.
    r_f, J_f = point_residuals(basis, arrays, p, tg, FOCAL, PP, cfg, ALL_BLOCKS + ("focal",))[:2]
    assert torch.equal(r_f, r) and torch.equal(J_f[..., :-1], J)
    eps = 1e-3
    rp = point_residuals(basis, arrays, p, tg, FOCAL * np.exp(eps), PP, cfg)[0]
    rm = point_residuals(basis, arrays, p, tg, FOCAL * np.exp(-eps), PP, cfg)[0]
    num = (rp - rm) / (2 * eps)
    assert (num - J_f[..., -1]).abs().max() / num.abs().max() < 1e-2


def test_normal_equations_in_frame_blocks_equal_the_whole(basis, seq):
    # fit_frames forms J^T J and J^T r a block of frames at a time (cache);
    # blocks of 16 over 40 frames (16, 16, 8) must give the one-block result.
    p = _gt(seq)
    p.jaw = p.jaw + 0.1
    tg = Targets.from_landmarks(seq.lmk68, seq.lmk_dense, basis)
    arrays = point_arrays(basis, contour_rows(head_rotation_flame(p.rotation), basis.n_rows), p.shape)
    robust = torch.rand(40, arrays["s_M0"].shape[0] + 19)
    whole = normal_equations(basis, arrays, p, tg, FOCAL, PP, FitConfig(), ALL_BLOCKS, robust, None, block=40)
    blocks = normal_equations(basis, arrays, p, tg, FOCAL, PP, FitConfig(), ALL_BLOCKS, robust, None, block=16)
    for a, b in zip(whole, blocks):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-3)


def test_fit_recovers_from_a_rigid_start(basis, seq):
    tg = Targets.from_landmarks(seq.lmk68, seq.lmk_dense, basis)
    init = initial_params(basis, tg, FOCAL, PP, shape=_gt(seq).shape)
    res = fit_frames(basis, tg, init, FOCAL, PP)
    assert _err(basis, res.params, seq) < 0.6 < _err(basis, init, seq)
    assert res.iterations < FitConfig().max_iters  # stopped on convergence


def test_one_bad_landmark_does_not_drag_the_frame(basis, seq):
    lmk = seq.lmk68.copy()
    lmk[:, 30] += 60.0  # the nose tip detected 60 px off in every frame
    tg = Targets.from_landmarks(lmk, seq.lmk_dense, basis)
    init = initial_params(basis, tg, FOCAL, PP, shape=_gt(seq).shape)
    res = fit_frames(basis, tg, init, FOCAL, PP)
    pred, _ = predict_landmarks(basis, res.params, FOCAL, PP)
    others = np.delete(np.arange(68), 30)
    err = np.linalg.norm(pred.numpy()[:, others] - seq.clean_lmk68[:, others], axis=-1).mean()
    assert err < 1.0
    # ... and the fitted nose stays near the true nose, not the outlier.
    nose_err = np.linalg.norm(pred.numpy()[:, 30] - seq.clean_lmk68[:, 30], axis=-1).mean()
    assert nose_err < 5.0
    # Without the robust weights (no re-estimation at all) the outlier pulls.
    plain = fit_frames(basis, tg, init, FOCAL, PP, FitConfig(robust_updates=0))
    pred_plain, _ = predict_landmarks(basis, plain.params, FOCAL, PP)
    assert np.linalg.norm(pred_plain.numpy()[:, 30] - seq.clean_lmk68[:, 30], axis=-1).mean() > 2 * nose_err


def test_chunks_agree_with_one_batch(basis, seq):
    tg = Targets.from_landmarks(seq.lmk68, seq.lmk_dense, basis)
    shape = _gt(seq).shape
    whole = fit_sequence(basis, tg, FOCAL, PP, shape, chunk=512)
    chunked = fit_sequence(basis, tg, FOCAL, PP, shape, chunk=16, overlap=6)
    assert chunked.params.rotation.shape[0] == seq.lmk68.shape[0]
    assert abs(_err(basis, chunked.params, seq) - _err(basis, whole.params, seq)) < 0.1


def test_temporal_prior_lowers_jitter(basis, seq):
    tg = Targets.from_landmarks(seq.lmk68, seq.lmk_dense, basis)
    init = initial_params(basis, tg, FOCAL, PP, shape=_gt(seq).shape)
    with_prior = fit_frames(basis, tg, init, FOCAL, PP, temporal=True).params
    without = fit_frames(basis, tg, init, FOCAL, PP, temporal=False).params
    jit = lambda p: np.abs(np.diff(p.translation.numpy(), 2, axis=0)).mean()  # noqa: E731
    assert jit(with_prior) < jit(without)


def test_frame_layout_names_every_block_once():
    L = FrameLayout(7)
    widths = {"rot": 3, "trans": 3, "exp": 7, "jaw": 3, "eyes": 6}
    assert [L[b].stop - L[b].start for b in ALL_BLOCKS] == [widths[b] for b in ALL_BLOCKS]
    assert [L[b].start for b in ALL_BLOCKS[1:]] == [L[b].stop for b in ALL_BLOCKS[:-1]]
    assert L["rot"].start == 0 and L.width == sum(widths.values())
    assert L.columns(("rot", "jaw")).tolist() == [0, 1, 2, 13, 14, 15]


def test_calibration_layout_splits_the_joint_jacobian(basis, seq):
    # Calibration takes shape as the first expression coefficients of a
    # widened basis; its frame columns must be the per-frame Jacobian of the
    # plain basis, its shape columns the residuals' derivative by the shape.
    p = _gt(seq).select(slice(0, 3))
    p.jaw = p.jaw + 0.1
    tg = Targets.from_landmarks(seq.lmk68[:3], seq.lmk_dense[:3], basis)
    cfg = FitConfig()
    S, E = basis.n_shape, basis.n_exp
    rows = contour_rows(head_rotation_flame(p.rotation), basis.n_rows)
    r, J = point_residuals(basis, point_arrays(basis, rows, p.shape), p, tg, FOCAL, PP, cfg, ALL_BLOCKS)[:2]
    full = replace(basis, n_shape=0, n_exp=S + E)
    joint = FrameParams(p.rotation, p.translation, torch.cat([p.shape.expand(3, -1), p.expression], 1), p.jaw,
                        p.eyes, torch.zeros(0))
    J_joint = point_residuals(full, point_arrays(full, rows, torch.zeros(0)), joint, tg, FOCAL, PP, cfg,
                              ALL_BLOCKS + ("focal",))[1]
    layout = CalibrationLayout(S, E)
    assert J_joint.shape[-1] == layout.joint.width + 1
    A = torch.cat([J_joint[..., c] for c in layout.frame_columns], -1)
    B = torch.cat([J_joint[..., c] for c in layout.shared_columns], -1)
    assert A.shape[-1] == FrameLayout(E).width and B.shape[-1] == S + 1
    torch.testing.assert_close(A, J, rtol=1e-3, atol=1e-3)
    for k in (0, S - 1):
        eps = 2e-2
        shifted = [p.clone(), p.clone()]
        shifted[0].shape[k] += eps
        shifted[1].shape[k] -= eps
        rp, rm = (point_residuals(basis, point_arrays(basis, rows, q.shape), q, tg, FOCAL, PP, cfg)[0] for q in shifted)
        num = (rp - rm) / (2 * eps)
        assert (num - B[..., k]).abs().max() / num.abs().max().clamp(min=1e-3) < 2e-2
