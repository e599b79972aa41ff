"""Time the batched RTS smoother against pykalman on the same model.

    .venv/bin/python benchmarks/bench_smoothing.py

For tracks of 250 and 5000 frames with D = 70 channels (about the size of a
FLAME track: 50 expression + 3 jaw + 3 neck + 6 eyes + 3 translation + 3
rotation + spare), prints the milliseconds of `rts_smooth` on all channels,
the milliseconds of pykalman's `KalmanFilter.smooth` on a subset of channels
(it handles one channel per call) scaled to all channels, their ratio, and
the largest difference between the two on the subset. Also times
`smooth_tracking` on a full parameter dict.
"""

import math
import time

import numpy as np
from pykalman import KalmanFilter
from scipy.spatial.transform import Rotation

from lightning_ft.smoothing import initial_state, rts_smooth, smooth_tracking

N_CHANNELS = 70
PROCESS_VAR = 0.4
MEASUREMENT_VAR = 1e-4
FPS = 25.0


def best_time(function, repeats):
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def pykalman_channel(x, valid, mean0, cov0, dt):
    transition = np.array([[1.0, dt], [0.0, 1.0]])
    transition_cov = PROCESS_VAR * np.array([[dt**3 / 3, dt**2 / 2], [dt**2 / 2, dt]])
    kf = KalmanFilter(
        transition_matrices=transition,
        observation_matrices=np.array([[1.0, 0.0]]),
        transition_covariance=transition_cov,
        observation_covariance=np.array([[MEASUREMENT_VAR]]),
        initial_state_mean=mean0,
        initial_state_covariance=cov0,
    )
    return kf.smooth(np.ma.masked_array(x[:, None], mask=~valid[:, None]))[0][:, 0]


def main():
    rng = np.random.default_rng(0)
    print(f"constant-velocity RTS, D={N_CHANNELS} channels, {FPS:g} fps, 5% frames missing")
    print(
        f"{'frames':>7} {'rts_smooth ms':>14} {'pykalman ms (scaled)':>21} {'subset':>7} {'ratio':>7} "
        f"{'max diff':>9} {'smooth_tracking ms':>19}"
    )
    for n_frames, n_subset in ((250, 5), (5000, 1)):
        t = np.arange(n_frames) / FPS
        # Head-like motion: a few slow sinusoids per channel, plus measurement noise.
        frequencies = rng.uniform(0.1, 2.0, size=(3, N_CHANNELS))
        phases = rng.uniform(0, 2 * np.pi, size=(3, N_CHANNELS))
        x = 0.2 * np.sin(2 * np.pi * frequencies * t[:, None, None] + phases).sum(axis=1)
        x += rng.normal(scale=math.sqrt(MEASUREMENT_VAR), size=x.shape)
        valid = rng.random(n_frames) > 0.05
        ours_s, smoothed = best_time(lambda: rts_smooth(x, valid, PROCESS_VAR, MEASUREMENT_VAR, timestamps=t), 3)

        mean0, cov0 = initial_state(x, valid, np.full(N_CHANNELS, MEASUREMENT_VAR), "constant_velocity", np.diff(t))
        start = time.perf_counter()
        reference = [pykalman_channel(x[:, d], valid, mean0[d], cov0[d], 1.0 / FPS) for d in range(n_subset)]
        pykalman_s = (time.perf_counter() - start) / n_subset * N_CHANNELS
        max_diff = max(np.abs(reference[d] - smoothed[:, d]).max() for d in range(n_subset))

        params = {
            "rotation": Rotation.from_rotvec(x[:, :3]).as_matrix(),
            "translation": x[:, 3:6],
            "expression": x[:, 6:56],
            "jaw_pose": x[:, 56:59],
            "neck_pose": x[:, 59:62],
            "eye_pose": x[:, 62:68],
        }
        tracking_s, _ = best_time(lambda: smooth_tracking(params, valid, FPS), 3)
        print(
            f"{n_frames:>7} {ours_s * 1e3:>14.1f} {pykalman_s * 1e3:>21.0f} {n_subset:>7} "
            f"{pykalman_s / ours_s:>6.0f}x {max_diff:>9.1e} {tracking_s * 1e3:>19.1f}"
        )


if __name__ == "__main__":
    main()
