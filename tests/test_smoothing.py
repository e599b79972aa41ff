"""Tests of lightning_ft.smoothing: pykalman agreement and smoothing behaviour."""

import math

import numpy as np
import pytest
from pykalman import KalmanFilter
from scipy.spatial.transform import Rotation

from lightning_ft.errors import NoFaceError
from lightning_ft.smoothing import (
    NoiseModel,
    SmoothingConfig,
    initial_state,
    rts_smooth,
    second_difference_jitter,
    smooth_rotations,
    smooth_track,
    smooth_tracking,
    track_noise_std,
)
from lightning_ft.track import Track


def _pykalman_smooth(x, valid, q, r, model, dt, mean0, cov0):
    """One channel smoothed by pykalman with the same model, [T]."""
    n_steps = len(dt)
    if model == "random_walk":
        transition = np.ones((n_steps, 1, 1))
        transition_cov = (q * dt)[:, None, None]
        observation = np.array([[1.0]])
    else:
        transition = np.zeros((n_steps, 2, 2))
        transition[:, 0, 0] = transition[:, 1, 1] = 1.0
        transition[:, 0, 1] = dt
        transition_cov = np.zeros((n_steps, 2, 2))
        transition_cov[:, 0, 0] = dt**3 / 3.0
        transition_cov[:, 0, 1] = transition_cov[:, 1, 0] = dt**2 / 2.0
        transition_cov[:, 1, 1] = dt
        transition_cov *= q
        observation = np.array([[1.0, 0.0]])
    kf = KalmanFilter(
        transition_matrices=transition,
        observation_matrices=observation,
        transition_covariance=transition_cov,
        observation_covariance=np.array([[r]]),
        initial_state_mean=mean0,
        initial_state_covariance=cov0,
    )
    measurements = np.ma.masked_array(x[:, None], mask=~valid[:, None])
    return kf.smooth(measurements)[0][:, 0]


@pytest.mark.parametrize("model", ["constant_velocity", "random_walk"])
@pytest.mark.parametrize("variable_rate", [False, True])
@pytest.mark.parametrize("missing", [False, True])
def test_rts_smooth_matches_pykalman(model, variable_rate, missing):
    rng = np.random.default_rng(hash((model, variable_rate, missing)) % 2**32)
    n_frames = 60
    x = np.cumsum(rng.normal(size=(n_frames, 3)), axis=0) * [1.0, 0.01, 30.0]
    valid = np.ones(n_frames, dtype=bool)
    if missing:
        valid[[0, 1, 17, 30, 31, 32, 33, 59]] = False
        x[~valid] = np.nan
    timestamps = np.cumsum(rng.uniform(0.01, 0.08, n_frames)) if variable_rate else None
    q = np.array([2.0, 1e-3, 50.0])
    r = np.array([0.3, 1e-4, 10.0])
    smoothed = rts_smooth(x, valid, q, r, model, timestamps)

    dt = np.diff(timestamps) if variable_rate else np.ones(n_frames - 1)
    mean0, cov0 = initial_state(x, valid, r, model, dt)
    for channel in range(3):
        expected = _pykalman_smooth(x[:, channel], valid, q[channel], r[channel], model, dt, mean0[channel], cov0[channel])
        scale = np.abs(expected).max()
        np.testing.assert_allclose(smoothed[:, channel], expected, rtol=0, atol=1e-10 * scale)


def test_rts_smooth_explicit_prior_matches_pykalman():
    rng = np.random.default_rng(3)
    x = np.sin(np.linspace(0, 3, 40)) + rng.normal(scale=0.1, size=40)
    mean0, cov0 = np.array([[2.0, -1.0]]), np.array([[[0.5, 0.1], [0.1, 0.2]]])
    smoothed = rts_smooth(x, None, 0.05, 0.01, initial_mean=mean0, initial_cov=cov0)
    expected = _pykalman_smooth(x, np.ones(40, bool), 0.05, 0.01, "constant_velocity", np.ones(39), mean0[0], cov0[0])
    assert smoothed.shape == (40,)
    np.testing.assert_allclose(smoothed, expected, rtol=0, atol=1e-12)
    # The prior matters here (it is far from the data), so this also checks it is used.
    assert np.abs(smoothed[0] - rts_smooth(x, None, 0.05, 0.01)[0]) > 1e-3


@pytest.mark.parametrize("fps", [25.0, 60.0])
def test_cutoff_hz_is_the_half_amplitude_frequency(fps):
    noise = SmoothingConfig().rotation
    cutoff = float(noise.cutoff_hz(fps))
    t = np.arange(int(12 * fps)) / fps
    middle = slice(len(t) // 4, 3 * len(t) // 4)
    for frequency, expected_gain in [(cutoff, 0.5), (cutoff / 2, 1 / (1 + 1 / 16)), (2 * cutoff, 1 / 17)]:
        signal = np.sin(2 * np.pi * frequency * t)
        smoothed = rts_smooth(signal, None, noise.process_var(), noise.measurement_var(), timestamps=t)
        gain = smoothed[middle] @ signal[middle] / (signal[middle] @ signal[middle])
        assert gain == pytest.approx(expected_gain, abs=0.01)


def _head_motion(t):
    """A smooth head-like motion, [T, 3]: slow sway plus nodding, radians."""
    return np.stack(
        [0.3 * np.sin(2 * np.pi * 0.3 * t), 0.15 * np.sin(2 * np.pi * 0.8 * t + 1.0), 0.1 * np.sin(2 * np.pi * 1.1 * t)],
        axis=1,
    )


def test_noisy_smooth_signal_gets_closer_to_truth():
    fps = 25.0
    rng = np.random.default_rng(7)
    t = np.arange(200) / fps
    truth = {
        "translation": _head_motion(t) * 0.1 + [0.0, 0.0, 0.6],
        "expression": np.concatenate([_head_motion(t) * 4, _head_motion(t + 0.5) * 3], axis=1),
        "jaw_pose": _head_motion(t) * 0.2,
    }
    config = SmoothingConfig()
    noisy = {}
    for key, value in truth.items():
        field_name = {"jaw_pose": "jaw"}.get(key, key)
        noisy[key] = value + rng.normal(size=value.shape) * getattr(config, field_name).measurement_std
    valid = np.ones(len(t), dtype=bool)
    smoothed = smooth_tracking(noisy, valid, fps, config)
    for key in truth:
        jitter_before = second_difference_jitter(noisy[key])
        jitter_after = second_difference_jitter(smoothed[key])
        error_before = np.sqrt(np.mean((noisy[key] - truth[key]) ** 2))
        error_after = np.sqrt(np.mean((smoothed[key] - truth[key]) ** 2))
        assert jitter_after < jitter_before / 3, key
        assert error_after < 0.8 * error_before, key


def _yaw_turn(fps, noise_deg, seed):
    """Head facing the camera turning 30 deg at 60 deg/s; returns (t, yaw, measured R)."""
    t = np.arange(int(3 * fps)) / fps
    yaw = np.radians(np.clip((t - 1.0) * 60.0, 0.0, 30.0))
    # FLAME looks along +z, an OpenCV camera along -z of the face: a 180 deg base.
    facing = Rotation.from_euler("x", 180, degrees=True)
    noise = Rotation.from_rotvec(np.random.default_rng(seed).normal(scale=math.radians(noise_deg), size=(len(t), 3)))
    return t, yaw, facing, (facing * Rotation.from_euler("y", yaw) * noise).as_matrix()


@pytest.mark.parametrize("fps", [25.0, 60.0])
@pytest.mark.parametrize("noise_deg", [0.0, 0.5])
def test_head_turn_is_not_lagged(fps, noise_deg):
    t, yaw, facing, measured = _yaw_turn(fps, noise_deg, seed=int(fps))
    smoothed = smooth_tracking({"rotation": measured}, np.ones(len(t), bool), fps)["rotation"]
    yaw_smoothed = (facing.inv() * Rotation.from_matrix(smoothed)).as_euler("yxz")[:, 0]
    per_frame = math.radians(60.0) / fps
    assert np.abs(yaw_smoothed - yaw).max() < 1.5 * per_frame
    # Time at which half the turn is reached, compared with the truth's.
    half = math.radians(15.0)
    crossing = np.interp(half, np.maximum.accumulate(yaw_smoothed), t)
    assert abs(crossing - 1.25) < 1.0 / fps


def test_frame_rates_behave_alike():
    """The same noise-free head turn is rounded off alike at 25 and 60 fps."""
    errors = []
    for fps in (25.0, 60.0):
        t, yaw, facing, measured = _yaw_turn(fps, 0.0, seed=0)
        smoothed = smooth_tracking({"rotation": measured}, np.ones(len(t), bool), fps)["rotation"]
        yaw_smoothed = (facing.inv() * Rotation.from_matrix(smoothed)).as_euler("yxz")[:, 0]
        errors.append(np.abs(yaw_smoothed - yaw).max())
    # A per-frame tuning would smooth 60 fps far more in seconds (about 2.4x).
    assert 0.6 < errors[1] / errors[0] < 1.2


def test_invalid_frames_are_interpolated_and_ends_held():
    fps = 25.0
    t = np.arange(120) / fps
    truth = _head_motion(t) * 0.2
    valid = np.ones(len(t), dtype=bool)
    valid[:4] = valid[50:62] = valid[-5:] = False
    measured = truth.copy()
    measured[~valid] = 1e6  # garbage where nothing was measured
    smoothed = smooth_tracking({"jaw_pose": measured}, valid, fps)["jaw_pose"]
    assert np.all(np.isfinite(smoothed))
    gap = slice(50, 62)
    assert np.abs(smoothed[gap] - truth[gap]).max() < 0.01  # rad, over a 0.5 s gap
    first, last = np.flatnonzero(valid)[[0, -1]]
    np.testing.assert_array_equal(smoothed[:first], np.repeat(smoothed[first : first + 1], first, axis=0))
    np.testing.assert_array_equal(smoothed[last + 1 :], np.repeat(smoothed[last : last + 1], 5, axis=0))


def test_rts_smooth_interpolates_a_gap_in_linear_motion():
    x = np.arange(50.0) * 0.3
    valid = np.ones(50, dtype=bool)
    valid[20:35] = False
    smoothed = rts_smooth(np.where(valid, x, np.nan), valid, 1e-4, 1e-2)
    np.testing.assert_allclose(smoothed[20:35], x[20:35], atol=1e-3)


def _geodesic_deg(a, b):
    return np.degrees(np.linalg.norm((Rotation.from_matrix(a).inv() * Rotation.from_matrix(b)).as_rotvec(), axis=1))


def test_noisy_rotations_near_pi_do_not_flip():
    rng = np.random.default_rng(11)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    n_frames = 150
    truth = np.repeat(Rotation.from_rotvec(math.pi * axis).as_matrix()[None], n_frames, axis=0)
    angles = math.pi + rng.normal(scale=math.radians(3.0), size=n_frames)
    measured = Rotation.from_rotvec(angles[:, None] * axis).as_matrix()
    # About half the frames are past 180 deg, where the log map flips the axis.
    assert 0.3 < np.mean(Rotation.from_matrix(measured).as_rotvec() @ axis < 0) < 0.7
    smoothed = smooth_rotations(measured, None, process_var=1e-5, measurement_var=math.radians(3.0) ** 2)
    error, measured_error = _geodesic_deg(smoothed, truth), _geodesic_deg(measured, truth)
    assert np.sqrt(np.mean(error**2)) < 0.35 * np.sqrt(np.mean(measured_error**2))
    assert error.max() < 0.4 * measured_error.max()
    assert _geodesic_deg(smoothed[1:], smoothed[:-1]).max() < 0.5
    np.testing.assert_allclose(smoothed @ smoothed.transpose(0, 2, 1), np.broadcast_to(np.eye(3), smoothed.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(smoothed), 1.0, atol=1e-12)


@pytest.mark.parametrize("turns", [0.3, 1.3])
def test_rotation_sweep_through_pi_is_continuous(turns):
    fps = 25.0
    t = np.arange(150) / fps
    angles = np.linspace(math.pi - 1.0, math.pi - 1.0 + 2 * math.pi * turns, len(t))
    axis = np.array([0.0, 0.6, 0.8])
    truth = Rotation.from_rotvec(angles[:, None] * axis).as_matrix()
    smoothed = smooth_rotations(truth, None, process_var=0.4, measurement_var=math.radians(0.5) ** 2, timestamps=t)
    assert _geodesic_deg(smoothed, truth).max() < 0.5


def test_rotations_interpolate_over_invalid_frames():
    angles = np.linspace(0.0, 1.0, 40)
    truth = Rotation.from_rotvec(angles[:, None] * np.array([1.0, 0.0, 0.0])).as_matrix()
    valid = np.ones(40, dtype=bool)
    valid[15:25] = False
    measured = truth.copy()
    measured[~valid] = np.nan
    smoothed = smooth_rotations(measured, valid, process_var=1e-6, measurement_var=1e-4)
    assert _geodesic_deg(smoothed, truth).max() < 0.2


def test_second_difference_jitter_against_a_loop():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 2, 3))
    valid = rng.random(30) > 0.2
    norms = []
    for i in range(1, 29):
        if valid[i - 1] and valid[i] and valid[i + 1]:
            norms.append(math.sqrt(sum(float(v) ** 2 for v in (x[i + 1] - 2 * x[i] + x[i - 1]).ravel())))
    assert second_difference_jitter(x, valid) == pytest.approx(sum(norms) / len(norms), rel=1e-12)
    assert math.isnan(second_difference_jitter(x, np.tile([True, True, False], 10)))


def test_smooth_tracking_keys_config_and_errors():
    fps = 30.0
    rng = np.random.default_rng(2)
    t = np.arange(60) / fps
    params = {
        "rotation": Rotation.from_rotvec(_head_motion(t)).as_matrix(),
        "translation": _head_motion(t) * 0.1 + rng.normal(scale=0.002, size=(60, 3)),
        "expression": rng.normal(size=(60, 50)),
        "jaw_pose": rng.normal(scale=0.05, size=(60, 3)),
        "neck_pose": rng.normal(scale=0.05, size=(60, 3)),
        "eye_pose": rng.normal(scale=0.05, size=(60, 6)),
        "shape": np.ones(100),
    }
    valid = np.ones(60, dtype=bool)
    smoothed = smooth_tracking(params, valid, fps)
    assert set(smoothed) == set(params)
    assert smoothed["shape"] is params["shape"]
    for key, value in params.items():
        assert smoothed[key].shape == value.shape
    # A config is passed through: a noisier measurement model smooths harder.
    heavy = SmoothingConfig(expression=NoiseModel(measurement_std=1.0, acceleration_std=1.0))
    heavier = smooth_tracking({"expression": params["expression"]}, valid, fps, heavy)["expression"]
    assert second_difference_jitter(heavier) < 0.2 * second_difference_jitter(smoothed["expression"])
    with pytest.raises(NoFaceError):
        smooth_tracking(params, np.zeros(60, dtype=bool), fps)
    with pytest.raises(ValueError):
        rts_smooth(np.zeros((5, 2)), None, 1.0, 1.0, timestamps=np.array([0.0, 1.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError):
        rts_smooth(np.zeros((5, 2)), None, 1.0, 0.0)


def test_timestamps_matter_for_variable_frame_rate():
    rng = np.random.default_rng(9)
    t = np.cumsum(rng.choice([1 / 50, 1 / 15], size=150))
    truth = _head_motion(t)[:, :1]
    measured = truth + rng.normal(scale=0.005, size=truth.shape)
    noise = NoiseModel(measurement_std=0.005, acceleration_std=0.6)
    with_times = rts_smooth(measured, None, noise.process_var(), noise.measurement_var(), timestamps=t)
    as_uniform = rts_smooth(measured, None, noise.process_var(), noise.measurement_var(), timestamps=np.arange(150) * np.mean(np.diff(t)))
    assert np.sqrt(np.mean((with_times - truth) ** 2)) < 0.8 * np.sqrt(np.mean((as_uniform - truth) ** 2))


def _fast_motion_errors(flame_model, config, noise_px=1.0):
    """Per-frame mean vertex error (mm) of the unsmoothed fit and of the
    smoothed track on a synthetic head with 1 px landmark noise that turns
    40 deg within 10 frames and snaps its jaw open and shut (3 frames each),
    at 25 fps; the fit has the true focal and identity, so what differs is
    only the temporal model."""
    import torch

    from lightning_ft.fitter import FitConfig, Targets, build_basis, fit_sequence
    from lightning_ft.synthetic.sequences import make_sequence

    torch.set_num_threads(1)
    T = 70
    ramp = np.clip((np.arange(T) - 20) / 10.0, 0.0, 1.0)
    yaw = np.radians(-20.0 + 40.0 * (3 * ramp ** 2 - 2 * ramp ** 3))  # smoothstep: 40 deg in frames 20-30
    jaw = np.interp(np.arange(T), [0, 44, 47, 51, 54, T], [0.02, 0.02, 0.35, 0.35, 0.02, 0.02])
    seq = make_sequence(flame_model, T=T, focal=1200.0, seed=5, noise_px=noise_px, yaw=yaw, jaw_open=jaw)
    basis = build_basis(flame_model)
    targets = Targets.from_landmarks(seq.lmk68, seq.lmk_dense, basis)
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    res = fit_sequence(basis, targets, t([1200.0, 1200.0]), t([255.5, 255.5]), t(seq.shape), FitConfig(image_size=512))
    p = res.params
    raw = {"rotation": p.rotation.numpy(), "translation": p.translation.numpy(), "expression": p.expression.numpy(),
           "jaw_pose": p.jaw.numpy(), "eye_pose": p.eyes.numpy()}
    smoothed = smooth_tracking(raw, np.ones(T, bool), 25.0, config)

    def vertex_error_mm(d):
        with torch.no_grad():
            out = flame_model(shape=t(seq.shape)[None].expand(T, -1), expression=t(d["expression"]),
                              jaw_pose=t(d["jaw_pose"]), eye_pose=t(d["eye_pose"]))
            cam = torch.einsum("tij,tvj->tvi", t(d["rotation"]), out.vertices) + t(d["translation"])[:, None]
        return 1000 * np.linalg.norm(cam.numpy() - seq.vertices_cam, axis=-1).mean(1)

    return vertex_error_mm(raw), vertex_error_mm(smoothed)


def test_fast_turn_and_jaw_snap_are_not_lagged(flame_model):
    # Issue 20: no stability bought with lag. Over the turn's frames and over
    # the snap's (each with 2-4 frames after it) the smoothed track's vertex
    # error stays within 10 % of the unsmoothed fit's. (Per single frame the
    # fit's own noise scatters its error by +-50 %, which the smoother
    # averages: a per-frame bound would test the noise draw.)
    raw, smoothed = _fast_motion_errors(flame_model, SmoothingConfig())
    for frames in (slice(18, 34), slice(42, 58)):
        print(f"frames {frames.start}-{frames.stop - 1}: unsmoothed {raw[frames].mean():.2f} mm, "
              f"smoothed {smoothed[frames].mean():.2f} mm")
        assert smoothed[frames].mean() <= 1.1 * raw[frames].mean()


@pytest.mark.parametrize("fps", [25.0, 60.0])
def test_maneuver_passes_follow_a_turn_within_three_frames(fps):
    # 40 deg within 0.12 s (3 frames at 25 fps; 500 deg/s at the peak),
    # 0.3 deg noise: the constant-velocity model alone rounds it off by
    # several degrees; the maneuver passes raise its process noise there only.
    T = int(70 * fps / 25)
    ramp = np.clip((np.arange(T) - T // 3) / (0.12 * fps), 0.0, 1.0)
    yaw = np.radians(-20.0 + 40.0 * (3 * ramp ** 2 - 2 * ramp ** 3))
    facing = Rotation.from_euler("x", 180, degrees=True)
    noise = Rotation.from_rotvec(np.random.default_rng(3).normal(scale=math.radians(0.3), size=(T, 3)))
    measured = (facing * Rotation.from_euler("y", yaw) * noise).as_matrix()
    errors = {}
    for passes in (0, 3):  # the passes are off by default (see SmoothingConfig)
        smoothed = smooth_tracking({"rotation": measured}, np.ones(T, bool), fps,
                                   SmoothingConfig(maneuver_passes=passes))["rotation"]
        yaw_smoothed = (facing.inv() * Rotation.from_matrix(smoothed)).as_euler("yxz")[:, 0]
        errors[passes] = np.degrees(np.abs(yaw_smoothed - yaw)).max()
    assert errors[0] > 3.0  # the lag the passes remove
    assert errors[3] < 1.0
    # away from the turn the track stays smoothed: jitter well below the input's
    still = slice(0, T // 3 - 3)
    assert second_difference_jitter(smoothed[still]) < 0.5 * second_difference_jitter(measured[still])


def test_a_wobbling_depth_is_smoothed_by_its_own_noise():
    # A still head whose fitted depth wobbles by 8 mm per frame (a far or
    # long-lens camera: depth noise grows as z^2 / f), more than the
    # configured 3 mm: the noise estimated from the track sets the depth's
    # smoothing, which then removes as large a share of it as a correctly
    # configured model would; x and y are untouched by z's noise.
    rng = np.random.default_rng(11)
    T, fps = 120, 25.0
    truth = np.array([0.01, -0.02, 0.6])
    measured = truth + rng.normal(size=(T, 3)) * [0.0003, 0.0003, 0.008]
    rms = {}
    for from_data in (False, True):
        out = smooth_tracking({"translation": measured}, np.ones(T, bool), fps,
                              SmoothingConfig(noise_from_data=from_data))["translation"]
        rms[from_data] = np.sqrt(((out - truth) ** 2).mean(0))
    told = SmoothingConfig(noise_from_data=False, translation=NoiseModel((0.0003, 0.0003, 0.008), 0.05))
    out = smooth_tracking({"translation": measured}, np.ones(T, bool), fps, told)["translation"]
    rms_told = np.sqrt(((out - truth) ** 2).mean(0))
    assert rms[True][2] < 0.8 * rms[False][2]
    assert rms[True][2] < 1.1 * rms_told[2]
    assert np.all(rms[True][:2] < 0.0002)


def test_track_noise_std_finds_white_noise_under_motion():
    rng = np.random.default_rng(2)
    t = np.arange(2000) / 25.0
    x = np.stack([np.sin(2 * np.pi * 0.3 * t), 0.2 * t], 1) + rng.normal(size=(2000, 2)) * [0.01, 0.05]
    valid = np.ones(2000, bool)
    valid[500:520] = False
    np.testing.assert_allclose(track_noise_std(x, valid), [0.01, 0.05], rtol=0.1)


def test_smooth_track_smooths_its_fields_ignores_invalid_values_and_keeps_the_rest():
    fps, T = 25.0, 50
    rng = np.random.default_rng(4)
    t = np.arange(T) / fps
    valid = np.ones(T, bool)
    valid[20:23] = False
    rotation = Rotation.from_rotvec(_head_motion(t)).as_matrix()
    translation = _head_motion(t) * 0.1 + rng.normal(scale=0.002, size=(T, 3))
    track = Track(frame_ids=np.arange(T), valid=valid, shape=np.ones(10), expression=rng.normal(size=(T, 5)),
                  jaw_pose=rng.normal(scale=0.05, size=(T, 3)), neck_pose=rng.normal(scale=0.05, size=(T, 3)),
                  eye_pose=rng.normal(scale=0.05, size=(T, 6)), rotation=rotation, translation=translation,
                  crop_boxes=np.zeros((T, 4)), lmk68=np.zeros((T, 68, 2)), lmk_dense=np.zeros((T, 478, 2)), fps=fps)
    # what the fit left on invalid frames is not a measurement
    track.translation[~valid] = 5.0
    smoothed = smooth_track(track, fps)
    measured = {k: np.where(valid.reshape((T,) + (1,) * (getattr(track, k).ndim - 1)), getattr(track, k), np.nan)
                for k in ("rotation", "translation", "expression", "jaw_pose", "eye_pose")}
    expected = smooth_tracking(measured, valid, fps)
    for key, value in expected.items():
        np.testing.assert_allclose(getattr(smoothed, key), value, atol=1e-12, err_msg=key)
    assert np.abs(smoothed.translation[20:23]).max() < 0.2  # interpolated, not the 5 m left there
    assert smoothed.neck_pose is track.neck_pose and smoothed.lmk68 is track.lmk68  # not among its fields
    only_jaw = smooth_track(track, fps, fields=("jaw_pose",))
    assert only_jaw.expression is track.expression
    assert second_difference_jitter(only_jaw.jaw_pose) < 0.5 * second_difference_jitter(track.jaw_pose)
