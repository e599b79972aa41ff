"""Temporal smoothing of tracked FLAME parameters.

A Rauch-Tung-Striebel (RTS) smoother, i.e. a Kalman filter followed by a
backward pass, applied independently to every channel of a track. It is
vectorised over channels with numpy and loops over frames only; it gives the
same result as `pykalman.KalmanFilter.smooth` for the same model (see
`tests/test_smoothing.py`) at a small fraction of the cost.

Motion models (per channel, time `t` in seconds or frames):

- ``'constant_velocity'``: state (position, velocity); the acceleration is
  white noise of spectral density ``process_var`` (units^2 / time^3). Over a
  step of ``dt`` the velocity changes by a random amount of variance
  ``process_var * dt``, so ``sqrt(process_var)`` is the standard deviation of
  the velocity change accumulated over one time unit.
- ``'random_walk'``: state (position); the velocity is white noise of
  spectral density ``process_var`` (units^2 / time).

Measurements are ``position + noise`` with per-frame variance
``measurement_var`` (units^2). Missing measurements (``valid`` False) get the
prediction only, so the smoother interpolates across them.

Away from the ends of a track the constant-velocity smoother is the
zero-phase low-pass ``1 / (1 + (f / f0)^4)`` with
``f0 = (process_var / (measurement_var * dt))^(1/4) / (2 pi)`` (the Wiener
smoother of the continuous model); `NoiseModel.cutoff_hz` reports it.
Because the process noise is defined per second, a 60 fps video gets the
same motion model as a 25 fps one; it has more measurements per second, so
it keeps somewhat more bandwidth (`f0` grows as ``fps^(1/4)``) at the same
residual noise level, which is what the Bayesian model implies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.spatial.transform import Rotation

from lightning_ft.errors import NoFaceError
from lightning_ft.track import Track

MODELS = ("constant_velocity", "random_walk")


def _time_steps(timestamps: np.ndarray | None, n_frames: int) -> np.ndarray:
    """Steps between consecutive frames, [T-1]; 1 (one frame) without timestamps."""
    if timestamps is None:
        return np.ones(max(n_frames - 1, 0))
    timestamps = np.asarray(timestamps, dtype=np.float64)
    if timestamps.shape != (n_frames,):
        raise ValueError(f"timestamps must have shape ({n_frames},), got {timestamps.shape}")
    steps = np.diff(timestamps)
    if not np.all(np.isfinite(steps)) or np.any(steps <= 0):
        raise ValueError("timestamps must be finite and strictly increasing")
    return steps


def _per_channel(value, n_channels: int, name: str, allow_zero: bool) -> np.ndarray:
    array = np.broadcast_to(np.asarray(value, dtype=np.float64), (n_channels,)).copy()
    if not np.all(np.isfinite(array)) or np.any(array < 0) or (not allow_zero and np.any(array == 0)):
        raise ValueError(f"{name} must be finite and {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return array


def initial_state(
    x: np.ndarray,
    valid: np.ndarray,
    measurement_var: np.ndarray,
    model: str,
    dt: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Broad data-scaled prior of the first frame's state, per channel.

    The position prior is centred on the first valid measurement with the
    variance of the channel's valid values (plus the measurement variance),
    so it is uninformative at the scale of the data without being so large
    that the first update loses precision; the velocity prior is zero with
    that variance divided by the squared median step.

    Args:
        x: [T, D] measurements.
        valid: [T] bool, at least one True.
        measurement_var: [D] per-frame measurement variance.
        model: one of `MODELS`.
        dt: [T-1] time steps.

    Returns:
        mean [D, S] and covariance [D, S, S], S = 2 (position, velocity) for
        the constant-velocity model and 1 for the random walk.
    """
    observed = x[valid]
    first = observed[0]
    spread = observed.var(axis=0) + measurement_var
    if model == "random_walk":
        return first[:, None].copy(), spread[:, None, None].copy()
    step = float(np.median(dt)) if dt.size else 1.0
    mean = np.stack([first, np.zeros_like(first)], axis=1)
    cov = np.zeros((x.shape[1], 2, 2))
    cov[:, 0, 0] = spread
    cov[:, 1, 1] = spread / step**2
    return mean, cov


def rts_smooth(
    x: np.ndarray,
    valid: np.ndarray | None = None,
    process_var: float | np.ndarray = 1.0,
    measurement_var: float | np.ndarray = 1.0,
    model: str = "constant_velocity",
    timestamps: np.ndarray | None = None,
    initial_mean: np.ndarray | None = None,
    initial_cov: np.ndarray | None = None,
) -> np.ndarray:
    """RTS-smoothed positions of D independent channels.

    Args:
        x: [T, D] (or [T]) measurements, any units. Values of invalid frames
            are ignored (they may be NaN).
        valid: [T] bool, False where a frame has no measurement; None means
            frames where every channel is finite.
        process_var: scalar, [D] or [T-1, D] (one value per step between
            frames); spectral density of the driving noise (see the module
            docstring), in units^2 / time^3 for 'constant_velocity' and
            units^2 / time for 'random_walk', where time is the unit of
            `timestamps` (frames when it is None).
        measurement_var: scalar or [D]; per-frame measurement variance, units^2.
        model: 'constant_velocity' or 'random_walk'.
        timestamps: [T] strictly increasing frame times (variable frame
            rate); None means one time unit per frame.
        initial_mean, initial_cov: [D, S] and [D, S, S] prior of the first
            frame's state; None uses `initial_state`.

    Returns:
        [T, D] (or [T]) smoothed positions; invalid frames get the smoother's
        interpolation (or, before the first / after the last valid frame,
        the model's extrapolation: a constant velocity continues).
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    x = np.asarray(x, dtype=np.float64)
    squeeze = x.ndim == 1
    if squeeze:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"x must have shape [T, D], got {x.shape}")
    n_frames, n_channels = x.shape
    if valid is None:
        valid = np.all(np.isfinite(x), axis=1)
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != (n_frames,):
        raise ValueError(f"valid must have shape ({n_frames},), got {valid.shape}")
    if not valid.any():
        raise ValueError("rts_smooth needs at least one valid frame")
    if not np.all(np.isfinite(x[valid])):
        raise ValueError("x has non-finite values in frames marked valid")
    if np.ndim(process_var) == 2:
        q = np.asarray(process_var, dtype=np.float64)
        if q.shape != (n_frames - 1, n_channels) or not np.all(np.isfinite(q)) or np.any(q <= 0):
            raise ValueError(f"process_var must be finite, > 0 and [{n_frames - 1}, {n_channels}] per step")
    else:
        q = np.broadcast_to(_per_channel(process_var, n_channels, "process_var", allow_zero=False),
                            (max(n_frames - 1, 0), n_channels))
    r = _per_channel(measurement_var, n_channels, "measurement_var", allow_zero=False)
    dt = _time_steps(timestamps, n_frames)
    if initial_mean is None or initial_cov is None:
        initial_mean, initial_cov = initial_state(x, valid, r, model, dt)
    if model == "random_walk":
        smoothed = _rts_random_walk(x, valid, q, r, dt, initial_mean, initial_cov)
    else:
        smoothed = _rts_constant_velocity(x, valid, q, r, dt, initial_mean, initial_cov)
    return smoothed[:, 0] if squeeze else smoothed


def _rts_constant_velocity(x, valid, q, r, dt, initial_mean, initial_cov):
    # The per-channel state covariance [[a, b], [b, c]] is kept as a [3, D]
    # array of its entries, so one step of all channels is a few vectorised
    # operations: the loops over frames hold only what is sequential, and the
    # smoother gains are computed for all frames at once between the passes.
    n_frames, n_channels = x.shape
    # Per step: the state transition [2, 2] and its action on (a, b, c) [3, 3].
    transition = np.zeros((n_frames - 1, 2, 2))
    transition[:, 0, 0] = transition[:, 1, 1] = 1.0
    transition[:, 0, 1] = dt
    cov_transition = np.zeros((n_frames - 1, 3, 3))
    cov_transition[:, 0, 0] = cov_transition[:, 1, 1] = cov_transition[:, 2, 2] = 1.0
    cov_transition[:, 0, 1] = 2.0 * dt
    cov_transition[:, 0, 2] = dt * dt
    cov_transition[:, 1, 2] = dt
    process_noise = np.stack([dt**3 / 3.0, dt**2 / 2.0, dt], axis=1)[:, :, None] * q[:, None, :]  # [T-1, 3, D]

    pred_mean = np.empty((n_frames, 2, n_channels))
    pred_cov = np.empty((n_frames, 3, n_channels))
    filt_mean = np.empty((n_frames, 2, n_channels))
    filt_cov = np.empty((n_frames, 3, n_channels))
    mean = initial_mean.T.copy()
    cov = np.stack([initial_cov[:, 0, 0], initial_cov[:, 0, 1], initial_cov[:, 1, 1]])
    for t in range(n_frames):
        if t > 0:
            mean = transition[t - 1] @ mean
            cov = cov_transition[t - 1] @ cov + process_noise[t - 1]
        pred_mean[t] = mean
        pred_cov[t] = cov
        if valid[t]:
            gain = cov[:2] / (cov[0] + r)  # [2, D]: position and velocity gains
            mean = mean + gain * (x[t] - mean[0])
            # P - K H P, entries (0,0), (0,1), (1,1).
            cov = cov - gain[[0, 0, 1]] * cov[[0, 1, 1]]
        filt_mean[t] = mean
        filt_cov[t] = cov

    # Smoother gains J = P_filt[t] F^T P_pred[t+1]^-1 for all t, [T-1, 2, 2, D].
    h = dt[:, None]
    fa, fb, fc = filt_cov[:-1, 0], filt_cov[:-1, 1], filt_cov[:-1, 2]
    pa, pb, pc = pred_cov[1:, 0], pred_cov[1:, 1], pred_cov[1:, 2]
    det = pa * pc - pb * pb
    m00, m01 = fa + h * fb, fb
    m10, m11 = fb + h * fc, fc
    smoother_gain = np.stack(
        [
            np.stack([m00 * pc - m01 * pb, m01 * pa - m00 * pb], axis=1),
            np.stack([m10 * pc - m11 * pb, m11 * pa - m10 * pb], axis=1),
        ],
        axis=1,
    ) / det[:, None, None]

    smoothed = np.empty((n_frames, n_channels))
    mean = filt_mean[-1]
    smoothed[-1] = mean[0]
    for t in range(n_frames - 2, -1, -1):
        mean = filt_mean[t] + (smoother_gain[t] * (mean - pred_mean[t + 1])).sum(axis=1)
        smoothed[t] = mean[0]
    return smoothed


def _rts_random_walk(x, valid, q, r, dt, initial_mean, initial_cov):
    n_frames, n_channels = x.shape
    pred_pos = np.empty((n_frames, n_channels))
    pred_var = np.empty((n_frames, n_channels))
    filt_pos = np.empty((n_frames, n_channels))
    filt_var = np.empty((n_frames, n_channels))
    step_noise = dt[:, None] * q
    pos, var = initial_mean[:, 0].copy(), initial_cov[:, 0, 0].copy()
    for t in range(n_frames):
        if t > 0:
            var = var + step_noise[t - 1]
        pred_pos[t], pred_var[t] = pos, var
        if valid[t]:
            gain = var / (var + r)
            pos = pos + gain * (x[t] - pos)
            var = var - gain * var
        filt_pos[t], filt_var[t] = pos, var
    smoothed = np.empty((n_frames, n_channels))
    smoothed[-1] = pos = filt_pos[-1]
    for t in range(n_frames - 2, -1, -1):
        pos = filt_pos[t] + filt_var[t] / pred_var[t + 1] * (pos - pred_pos[t + 1])
        smoothed[t] = pos
    return smoothed


def _unwrap_rotvecs(rotvecs: np.ndarray) -> np.ndarray:
    """Make a sequence of axis-angle vectors [N, 3] continuous.

    ``theta * n`` and ``(theta + 2 pi k) * n`` are the same rotation; at
    ``theta = pi`` the log map jumps to the opposite axis. Each vector is
    replaced by the equivalent one closest to its (already unwrapped)
    predecessor, so the sequence can be filtered as a plain 3-vector.
    """
    unwrapped = rotvecs.copy()
    angles = np.linalg.norm(rotvecs, axis=1)
    # A jump needs a step of nearly 2 pi between neighbours; most tracks have
    # none, so only frames after a large step enter the (sequential) loop.
    steps = np.linalg.norm(np.diff(rotvecs, axis=0), axis=1)
    if not np.any(steps > math.pi / 2):
        return unwrapped
    for i in range(1, len(rotvecs)):
        previous = unwrapped[i - 1]
        if angles[i] > 1e-9:
            axis = rotvecs[i] / angles[i]
        else:
            previous_norm = np.linalg.norm(previous)
            axis = previous / previous_norm if previous_norm > 1e-9 else np.array([1.0, 0.0, 0.0])
        # theta * axis + 2 pi k * axis for the k that lands nearest `previous`.
        k = round((float(previous @ axis) - angles[i]) / (2.0 * math.pi))
        unwrapped[i] = rotvecs[i] + 2.0 * math.pi * k * axis
    return unwrapped


def smooth_rotations(
    rotations: np.ndarray,
    valid: np.ndarray | None = None,
    process_var: float = 1.0,
    measurement_var: float = 1.0,
    model: str = "constant_velocity",
    timestamps: np.ndarray | None = None,
) -> np.ndarray:
    """Smoothed rotation matrices.

    The rotations are written as axis-angle vectors relative to their
    chordal mean, unwrapped so they stay continuous through 180 degrees,
    smoothed as three channels with `rts_smooth`, and mapped back; the output
    is orthonormal by construction (inputs need only be close to rotations).

    Args:
        rotations: [T, 3, 3] rotation matrices (values of invalid frames ignored).
        valid: [T] bool; None means all frames.
        process_var: rad^2 / time^3 (see `rts_smooth`), isotropic.
        measurement_var: per-frame variance of the rotation error, rad^2.
        model, timestamps: as in `rts_smooth`.

    Returns:
        [T, 3, 3] smoothed rotations; invalid frames interpolated.
    """
    rotations = np.asarray(rotations, dtype=np.float64)
    if rotations.ndim != 3 or rotations.shape[1:] != (3, 3):
        raise ValueError(f"rotations must have shape [T, 3, 3], got {rotations.shape}")
    n_frames = rotations.shape[0]
    valid = np.ones(n_frames, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if valid.shape != (n_frames,):
        raise ValueError(f"valid must have shape ({n_frames},), got {valid.shape}")
    if not valid.any():
        raise ValueError("smooth_rotations needs at least one valid frame")
    reference, relative = _rotations_to_tangent(rotations, valid)
    smoothed = rts_smooth(relative, valid, process_var, measurement_var, model, timestamps)
    return (reference * Rotation.from_rotvec(smoothed)).as_matrix()


def _rotations_to_tangent(rotations: np.ndarray, valid: np.ndarray) -> tuple[Rotation, np.ndarray]:
    """Chordal mean of the valid rotations and the unwrapped axis-angle
    vectors [T, 3] of every rotation relative to it (NaN where invalid)."""
    observed = Rotation.from_matrix(rotations[valid])
    reference = observed.mean()
    relative = np.full((rotations.shape[0], 3), np.nan)
    relative[valid] = _unwrap_rotvecs((reference.inv() * observed).as_rotvec())
    return reference, relative


@dataclass(frozen=True)
class NoiseModel:
    """How much one tracked quantity moves and how noisy its measurement is.

    Fields are scalars or one value per channel (e.g. per translation axis).

    Attributes:
        measurement_std: standard deviation of the per-frame measurement error,
            in the quantity's units (rad, m, expression coefficients).
        acceleration_std: standard deviation of the velocity change the
            motion model allows over one second (the square root of the
            white-noise acceleration's spectral density), in units / s^1.5.
            Larger values follow faster motion and smooth less.
    """

    measurement_std: float | tuple[float, ...]
    acceleration_std: float | tuple[float, ...]

    def process_var(self) -> np.ndarray:
        """Spectral density of the acceleration, units^2 / s^3 (scalar or [D])."""
        return np.square(np.asarray(self.acceleration_std, dtype=np.float64))

    def measurement_var(self) -> np.ndarray:
        """Per-frame measurement variance, units^2 (scalar or [D])."""
        return np.square(np.asarray(self.measurement_std, dtype=np.float64))

    def cutoff_hz(self, fps: float) -> np.ndarray:
        """Frequency (Hz) at which the smoother halves a sinusoid's amplitude.

        For the constant-velocity model away from the track's ends (the
        Wiener smoother ``1 / (1 + (f / f0)^4)``); scalar or [D].
        """
        return (self.process_var() * fps / self.measurement_var()) ** 0.25 / (2.0 * math.pi)


def _default_rotation() -> NoiseModel:
    # 0.5 deg per-frame error; about 3 Hz cutoff at 25 fps.
    return NoiseModel(measurement_std=math.radians(0.5), acceleration_std=0.62)


@dataclass(frozen=True)
class SmoothingConfig:
    """Per-quantity noise models for `smooth_tracking` (see `NoiseModel`).

    Defaults are first guesses from typical landmark-fit noise, chosen by
    their cutoff at 25 fps (`NoiseModel.cutoff_hz`): head rotation and
    translation about 3 Hz (depth less, it is measured worse), expression and
    jaw about 6 Hz (speech), eyes about 5 Hz. They are meant to be tuned
    against the fitting stage's reprojection error.

    Attributes:
        rotation: head rotation, rad (axis-angle tangent space, isotropic).
        translation: head translation, m; per axis (x, y, z of the camera).
        expression: FLAME expression coefficients (unitless).
        jaw: jaw pose axis-angle, rad.
        neck: neck pose axis-angle, rad.
        eyes: eye poses axis-angle (both eyes, 6 values), rad.
        model: 'constant_velocity' or 'random_walk' (then `acceleration_std`
            is read as the velocity's std per sqrt(second), units / s^0.5).
        noise_from_data: each channel's measurement std is the white noise
            its own track shows (`track_noise_std`), kept within 1/4 and 4
            times its `measurement_std`: the fit's real noise, e.g. the
            depth's, which grows with the squared distance over the focal
X
        maneuver_threshold, maneuver_gain, maneuver_passes: no stability
            bought with lag. After a pass, where a channel's smoothing
            residual summed over 3 frames (lag keeps one sign, noise does
            not), squared, in measurement variances, exceeds its chi-square
            mean by `maneuver_threshold` standard deviations, the motion is
            one the model did not expect (a fast turn, a jaw snap); that
            channel's steps within 2 frames of it get `maneuver_gain` times
            the process noise and the track is smoothed again (up to
            `maneuver_passes` times; 0: off). Depth (translation z) is left
            out (see `smooth_tracking`). Off by default: on carphone the
            passes fired on real jaw and head motion and the fitted 68-point
            jitter rose from 0.32 to 0.40-0.98 of the detector's (issue 20),
            while the landmark fit's own temporal prior already keeps a
            40 degree turn within 10 frames within 10 % of the unsmoothed
            error (tests/test_smoothing.py). Turn on for snap motions.
    """

    rotation: NoiseModel = field(default_factory=_default_rotation)
    translation: NoiseModel = field(
        default_factory=lambda: NoiseModel(measurement_std=(0.0005, 0.0005, 0.003), acceleration_std=0.05)
    )
    expression: NoiseModel = field(default_factory=lambda: NoiseModel(measurement_std=0.1, acceleration_std=28.0))
    jaw: NoiseModel = field(default_factory=lambda: NoiseModel(measurement_std=0.01, acceleration_std=2.8))
    neck: NoiseModel = field(default_factory=_default_rotation)
    eyes: NoiseModel = field(default_factory=lambda: NoiseModel(measurement_std=math.radians(2.0), acceleration_std=6.9))
    model: str = "constant_velocity"
    noise_from_data: bool = True
    maneuver_threshold: float = 16.0
    maneuver_gain: float = 1000.0
    maneuver_passes: int = 0


def track_noise_std(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-channel std of the white noise in a track [T, D]: the median
    absolute deviation of its second differences (over three valid frames)
    scaled to a std (1.4826) and divided by sqrt(6), the second difference's
    gain on white noise. Robust to a few fast moves; zeros with fewer than
    5 usable frames."""
    usable = valid[:-2] & valid[1:-1] & valid[2:]
    if usable.sum() < 5:
        return np.zeros(x.shape[1])
    second = (x[2:] - 2.0 * x[1:-1] + x[:-2])[usable]
    mad = np.median(np.abs(second - np.median(second, axis=0)), axis=0)
    return 1.4826 * mad / math.sqrt(6.0)


def depth_noise_std(depth_m, focal_px: float, face_size_m: float, landmark_std_px: float, n_points: int):
    """Std of a landmark fit's depth (m): a face of size S at depth z spans
    f S / z px, and its scale is known to landmark_std_px / sqrt(n) of that,
    so sigma_z = z^2 / (f S) * landmark_std_px / sqrt(n). Correlated detector
    noise (the whole mesh moving together) makes the real figure larger,
    which `track_noise_std` on the fitted depth picks up."""
    return np.square(depth_m) / (focal_px * face_size_m) * landmark_std_px / math.sqrt(n_points)


def _smooth_adaptive(channels, valid, process_var, measurement_var, may_boost, config, timestamps):
    """`rts_smooth` of all channels [T, D] with the maneuver passes of
    `SmoothingConfig` on the channels where may_boost [D] is True."""
    n_frames = channels.shape[0]
    if config.noise_from_data:
        measurement_var = np.clip(np.square(track_noise_std(channels, valid)), measurement_var,
                                  measurement_var * 16)
    q = np.tile(process_var, (max(n_frames - 1, 0), 1))
    result = rts_smooth(channels, valid, q, measurement_var, config.model, timestamps)
    if n_frames < 3:
        return result
    boosted = np.zeros(channels.shape, bool)
    for _ in range(config.maneuver_passes):
        # Lag leaves residuals of one sign over several frames; noise, and the
        # frame-to-frame zigzag of tracking detectors, averages out over them.
        z = np.where(valid[:, None], np.nan_to_num(channels - result) / np.sqrt(measurement_var), 0.0)
        window = np.stack([np.convolve(c, np.ones(3), "same") for c in z.T], axis=1) ** 2 / 3
        # per channel: at most chi-square with 1 degree of freedom where the model holds
        flagged = (window > 1.0 + config.maneuver_threshold * math.sqrt(2.0)) & may_boost & ~boosted
        if not flagged.any():
            break
        # the steps within 2 frames of a flagged frame
        near = np.zeros_like(flagged)
        for shift in range(-2, 3):
            near |= np.roll(flagged, shift, axis=0) & _no_wrap(n_frames, shift)[:, None]
        boosted |= near
        steps = boosted[:-1] | boosted[1:]
        q = np.where(steps, process_var * config.maneuver_gain, process_var)
        result = rts_smooth(channels, valid, q, measurement_var, config.model, timestamps)
    return result


def _no_wrap(n: int, shift: int) -> np.ndarray:
    """Frames that np.roll(., shift) filled from inside the array."""
    ok = np.ones(n, bool)
    if shift > 0:
        ok[:shift] = False
    elif shift < 0:
        ok[shift:] = False
    return ok


# Parameter key -> the SmoothingConfig field that describes it.
_VECTOR_KEYS = {
    "translation": "translation",
    "expression": "expression",
    "jaw_pose": "jaw",
    "neck_pose": "neck",
    "eye_pose": "eyes",
}


def _hold_ends(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Copy the first/last valid frame's value over the frames before/after it."""
    indices = np.flatnonzero(valid)
    values = values.copy()
    values[: indices[0]] = values[indices[0]]
    values[indices[-1] + 1 :] = values[indices[-1]]
    return values


def _channel_blocks(params: dict[str, np.ndarray], valid: np.ndarray,
                    config: SmoothingConfig) -> tuple[list, Rotation | None]:
    """The smoothed quantities as (key, [T, D] float64 values, NoiseModel)
    blocks, in channel order: the rotation first, as axis-angle vectors
    relative to the returned reference rotation (None without one), then
    the `_VECTOR_KEYS` present in `params`."""
    n_frames = valid.shape[0]
    blocks = []
    reference = None
    if "rotation" in params:
        rotations = np.asarray(params["rotation"], dtype=np.float64)
        if rotations.shape != (n_frames, 3, 3):
            raise ValueError(f"params['rotation'] must have shape ({n_frames}, 3, 3), got {rotations.shape}")
        reference, relative = _rotations_to_tangent(rotations, valid)
        blocks.append(("rotation", relative, config.rotation))
    for key, field_name in _VECTOR_KEYS.items():
        if key in params:
            values = np.asarray(params[key], dtype=np.float64)
            if values.ndim != 2 or values.shape[0] != n_frames:
                raise ValueError(f"params[{key!r}] must have shape [{n_frames}, D], got {values.shape}")
            blocks.append((key, values, getattr(config, field_name)))
    return blocks, reference


def smooth_tracking(
    params: dict[str, np.ndarray],
    valid: np.ndarray,
    fps: float,
    config: SmoothingConfig | None = None,
    timestamps: np.ndarray | None = None,
    pivot: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Smooth a track of per-frame FLAME parameters.

    Args:
        params: per-frame arrays, any subset of 'rotation' [T, 3, 3],
            'translation' [T, 3] (m), 'expression' [T, E], 'jaw_pose' [T, 3],
            'neck_pose' [T, 3], 'eye_pose' [T, 6] (axis-angle, rad). Other
            keys are returned unchanged.
        valid: [T] bool, frames whose parameters were measured.
        fps: frames per second (used when `timestamps` is None).
        config: noise models; None uses the defaults.
        timestamps: [T] frame times in seconds, for variable frame rate.
        pivot: [3] a model-space point (m), e.g. the face's centre: with
            'rotation' and 'translation' (X_cam = R X + t), the pivot's camera
            position R pivot + t is smoothed in place of t, and t recovered
            from it. A fit's rotation and translation errors are coupled
            through the lever arm between the model's origin and the face
            (ICT's origin lies 9 cm behind it): smoothed apart, a rotation
            error the translation had compensated moves the face.

    Returns:
        A new dict with the same keys; the known ones smoothed. Invalid
        frames between valid ones are interpolated by the smoother; invalid
        frames before the first / after the last valid frame repeat that
        frame's smoothed value (the motion model would extrapolate the last
        velocity indefinitely).

    Raises:
        NoFaceError: no frame is valid.
    """
    config = SmoothingConfig() if config is None else config
    valid = np.asarray(valid, dtype=bool)
    n_frames = valid.shape[0]
    if not valid.any():
        raise NoFaceError("no valid frame to smooth: the face was not tracked in any frame")
    if timestamps is None:
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps!r}")
        timestamps = np.arange(n_frames) / float(fps)
    # All quantities go through one `rts_smooth` call as channels of one
    # array (each with its own noise model): its cost is per frame, not per channel.
    use_pivot = pivot is not None and "rotation" in params and "translation" in params
    if use_pivot:
        pivot = np.asarray(pivot, dtype=np.float64)
        params = dict(params)
        params["translation"] = np.asarray(params["translation"], np.float64) + \
            np.asarray(params["rotation"], np.float64) @ pivot
    blocks, reference = _channel_blocks(params, valid, config)
    smoothed = dict(params)
    if not blocks:
        return smoothed
    widths = [values.shape[1] for _, values, _ in blocks]
    process_var = np.concatenate([np.broadcast_to(noise.process_var(), (w,)) for (_, _, noise), w in zip(blocks, widths)])
    measurement_var = np.concatenate(
        [np.broadcast_to(noise.measurement_var(), (w,)) for (_, _, noise), w in zip(blocks, widths)]
    )
    channels = np.concatenate([values for _, values, _ in blocks], axis=1)
    # The depth is left out of the maneuver passes: its slow wander is the
    # fit's correlated noise more often than motion (on carphone it was
    # flagged on 25-55 of 120 frames and the 68-point jitter rose by a fifth).
    may_boost = np.concatenate([np.array([True, True, False]) if key == "translation" else np.ones(w, bool)
                                for (key, _, _), w in zip(blocks, widths)])
    result = _smooth_adaptive(channels, valid, process_var, measurement_var, may_boost, config, timestamps)
    result = _hold_ends(result, valid)
    for (key, _, _), part in zip(blocks, np.split(result, np.cumsum(widths)[:-1], axis=1)):
        if key == "rotation":
            part = (reference * Rotation.from_rotvec(part)).as_matrix()
        smoothed[key] = part
    if use_pivot:
        smoothed["translation"] = smoothed["translation"] - smoothed["rotation"] @ pivot
    return smoothed


# The Track fields the landmark fit smooths (the neck is not fitted).
SMOOTHED_FIELDS = ("rotation", "translation", "expression", "jaw_pose", "eye_pose")


def smooth_track(
    track: Track,
    fps: float,
    config: SmoothingConfig | None = None,
    timestamps: np.ndarray | None = None,
    fields: tuple[str, ...] = SMOOTHED_FIELDS,
    pivot: np.ndarray | None = None,
) -> Track:
    """`track` with `fields` smoothed by `smooth_tracking` (float64, all T
    frames). The values of frames not in `track.valid` are not measurements:
    the smoother interpolates them. fps is used when `timestamps` [T]
    (seconds) is None; pivot: see `smooth_tracking`."""
    valid = np.asarray(track.valid, dtype=bool)
    measured = {}
    for name in fields:
        values = np.array(getattr(track, name), dtype=np.float64)
        values[~valid] = np.nan
        measured[name] = values
    return replace(track, **smooth_tracking(measured, valid, fps, config, timestamps=timestamps, pivot=pivot))


def second_difference_jitter(x: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Mean norm of the second temporal difference over runs of valid frames.

    ``|x[t+1] - 2 x[t] + x[t-1]|`` (trailing dimensions flattened) averaged
    over every t whose three frames are valid; units of x per frame^2, so it
    depends on the frame rate. Returns NaN when no three consecutive frames
    are valid.

    Args:
        x: [T, ...] per-frame values.
        valid: [T] bool; None means all frames.
    """
    x = np.asarray(x, dtype=np.float64)
    flat = x.reshape(x.shape[0], -1)
    valid = np.ones(x.shape[0], dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if flat.shape[0] < 3:
        return float("nan")
    usable = valid[:-2] & valid[1:-1] & valid[2:]
    if not usable.any():
        return float("nan")
    second = flat[2:] - 2.0 * flat[1:-1] + flat[:-2]
    return float(np.linalg.norm(second[usable], axis=1).mean())
