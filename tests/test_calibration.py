"""Camera calibration: focal length and identity from sampled frames."""

import numpy as np
import pytest
import torch

from lightning_ft.calibration import calibrate, select_frames, yaw_proxy
from lightning_ft.optimize import Targets, build_basis
from lightning_ft.synthetic.sequences import make_sequence


@pytest.fixture(scope="module")
def basis(flame_model):
    return build_basis(flame_model)


# Noiseless landmarks isolate the solver from the noise-limited accuracy
# (benchmarks/bench_calibration.py measures that). These two cases came out
# 20 % and 10 % off before the contour correspondence was held within each
# LM step and the free focal moved the depths with it.
@pytest.mark.parametrize("focal, seed", [(800.0, 0), (2000.0, 2)])
def test_noiseless_focal_is_recovered(basis, flame_model, focal, seed):
    torch.set_num_threads(1)
    seq = make_sequence(flame_model, T=120, focal=focal, seed=seed, noise_px=0.0)
    targets = Targets.from_landmarks(seq.lmk68, seq.lmk_dense, basis)
    cal = calibrate(basis, targets, np.ones(120, bool), (512, 512))
    assert abs(cal.focal_px[0] / focal - 1) < 0.03
    assert cal.focal_px[0] == cal.focal_px[1]
    assert len(cal.frames) == 32
    np.testing.assert_allclose(cal.principal_point, [255.5, 255.5])


def test_frames_are_valid_spread_and_span_the_yaw(basis, flame_model):
    seq = make_sequence(flame_model, T=200, focal=1200.0, seed=1)
    valid = np.ones(200, bool)
    valid[50:90] = False
    yaw = yaw_proxy(seq.lmk68)
    frames = select_frames(valid, yaw, 32, seed=0)
    assert len(frames) == 32 and len(set(frames.tolist())) == 32
    assert valid[frames].all()
    np.testing.assert_array_equal(frames, select_frames(valid, yaw, 32, seed=0))
    ok = np.flatnonzero(valid)
    assert {ok[np.argmin(yaw[ok])], ok[np.argmax(yaw[ok])]} <= set(frames.tolist())
    assert frames.min() <= ok[2] and frames.max() >= ok[-3]
    few = valid[40:100]  # 20 valid frames: all of them
    np.testing.assert_array_equal(select_frames(few, yaw[40:100], 32), np.flatnonzero(few))


def test_predicted_focal_uncertainty_follows_the_landmark_noise(basis, flame_model):
    # The focal's standard deviation comes from the fit's curvature scaled by
    # the noise its residuals show: four times the noise, about four times
    # the spread; and the actual error stays within a few predicted sigmas
    # (benchmarks/bench_calibration.py: |z| < 2 in 23 of 24 cases).
    torch.set_num_threads(1)
    stds = []
    for noise in (0.5, 2.0):
        seq = make_sequence(flame_model, T=60, focal=1200.0, seed=1, noise_px=noise)
        targets = Targets.from_landmarks(seq.lmk68, seq.lmk_dense, basis)
        cal = calibrate(basis, targets, np.ones(60, bool), (512, 512))
        assert 0.003 < cal.focal_rel_std < 0.3
        assert abs(np.log(cal.focal_px[0] / 1200.0)) < 3 * cal.focal_rel_std
        stds.append(cal.focal_rel_std)
    assert 2.5 < stds[1] / stds[0] < 6
