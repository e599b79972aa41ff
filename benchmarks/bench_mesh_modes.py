"""mediapipe FaceMesh's tracking mode against two alternatives, on the still
photograph of issue 20 (the astronaut, 60 frames, 2 grey levels of noise,
CRF 23) and, with `--track`, through the whole pipeline (ICT, --no-emoca).

    python benchmarks/bench_mesh_modes.py                 # landmarks only, about 10 s
    python benchmarks/bench_mesh_modes.py --track still   # + bench_camera.py still per mode
    python benchmarks/bench_mesh_modes.py --track variants

Modes:
- ``track``: what `landmarks.MeshTracker` does (``static_image_mode=False``):
  mediapipe cuts each frame's face region from the previous frame's points.
- ``static``: ``static_image_mode=True``: the face detector's box on every frame.
- ``double``: tracking mode, each frame meshed twice and the two point sets
  averaged.

On a still face the tracking mode's region feedback settles into a
period-2 cycle (the points' scale alternates frame to frame); the landmarks
part prints the mean norm of the points' second difference, the amplitude
of that alternation (half the mean |scale[t] - scale[t+1]| over the mean
scale) and the seconds per mode. `--track` reruns `bench_camera.py`'s
`still` or `variants` with `MeshTracker` switched to each mode (a benchmark
override; the tracker itself always runs ``track``).
"""

from lightning_ft.runtime import configure_threads  # noqa: I001
configure_threads()
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_camera  # noqa: E402  (its still photograph and its `still` / `variants`)
from lightning_ft import landmarks  # noqa: E402

MODES = ("track", "static", "double")


class _ModeTracker(landmarks.MeshTracker):
    """MeshTracker run in one of `MODES` (what `use_mode` installs)."""

    mode = "track"

    def __init__(self, static: bool = False, min_confidence: float = 0.5):
        super().__init__(static=static or self.mode == "static", min_confidence=min_confidence)

    def __call__(self, image):
        points = super().__call__(image)
        if self.mode != "double" or points is None:
            return points
        again = super().__call__(image)
        return points if again is None else (points + again) / 2


def use_mode(mode: str) -> None:
    _ModeTracker.mode = mode
    landmarks.MeshTracker = _ModeTracker


def landmark_figures(frames: list, mode: str) -> dict:
    use_mode(mode)
    with landmarks.MeshTracker() as mesh:  # the first graph of a process loads the models
        mesh(frames[0])
    with landmarks.MeshTracker() as mesh:
        t0 = time.perf_counter()
        points = np.stack([mesh(f) for f in frames]).astype(np.float64)
        seconds = time.perf_counter() - t0
    scale = np.sqrt(((points - points.mean(1, keepdims=True)) ** 2).sum(2).mean(1))
    second = np.linalg.norm(np.diff(points, 2, axis=0), axis=2).mean()
    return {"seconds": seconds, "second_difference_px": float(second),
            "alternation_pct": float(100 * np.abs(np.diff(scale)).mean() / 2 / scale.mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--track", choices=("still", "variants"), help="also run bench_camera.py's still or variants")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = ap.parse_args()
    frames, _ = bench_camera.decode(bench_camera.still_clip())
    print("| mode | points' 2nd difference (px) | scale alternation | seconds (60 frames, 512 px) |")
    print("| --- | ---: | ---: | ---: |")
    for mode in args.modes:
        f = landmark_figures(frames, mode)
        print(f"| {mode} | {f['second_difference_px']:.3f} | {f['alternation_pct']:.3f} % | {f['seconds']:.2f} |",
              flush=True)
    if args.track:
        for mode in args.modes:
            use_mode(mode)
            print(f"\n## mesh mode {mode}", flush=True)
            sys.argv = ["bench_camera.py", args.track]
            bench_camera.main()


if __name__ == "__main__":
    main()
