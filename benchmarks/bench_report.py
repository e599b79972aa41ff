"""Cost of `lightning-ft report` per video: a folder of N synthetic results
(T frames each, written with the project's writer, no -v videos), the report
written with and without per-video plots, alternating.

    python benchmarks/bench_report.py --videos 40 --frames 250 --repeats 2

Prints seconds and file size per run and the per-video cost of the plots.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from lightning_ft.results import track_from_arrays, write_result
from lightning_ft.report import write_report


def write_folder(out: Path, n: int, T: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        ang = np.cumsum(rng.normal(0, 0.01, (T, 3)), 0)
        from scipy.spatial.transform import Rotation

        R = np.diag([1.0, -1.0, -1.0]) @ Rotation.from_rotvec(ang).as_matrix()
        err = np.abs(rng.normal(2, 0.3, T)).astype(np.float32)
        tracking = {
            "frame_ids": np.arange(T), "valid": rng.random(T) > 0.02, "shape": np.zeros(100, np.float32),
            "expression": rng.normal(0, 0.5, (T, 50)).astype(np.float32), "jaw_pose": np.zeros((T, 3), np.float32),
            "neck_pose": np.zeros((T, 3), np.float32), "eye_pose": np.zeros((T, 6), np.float32),
            "rotation": R.astype(np.float32), "translation": np.tile([0, 0, 0.6], (T, 1)).astype(np.float32),
            "focal_length": np.array([900.0, 900.0], np.float32), "principal_point": np.array([255.5, 255.5]),
            "image_size": np.array([512, 512]), "crop_boxes": np.zeros((T, 4), np.float32),
            "lmk68": np.zeros((T, 68, 2), np.float32), "lmk_dense": np.zeros((T, 478, 2), np.float32),
            "fps": np.float32(25), "reprojection_error_68_px": err, "reprojection_error_dense_px": err * 0.7,
        }
        meta = {"frames": {"total": T, "valid": int(tracking["valid"].sum())},
                "calibration": {"focal_px": float(rng.normal(900, 30)), "focal_rel_std": 0.03},
                "quality": {"mean_error_68_px": float(err.mean()), "mean_error_dense_px": float(err.mean() * 0.7),
                            "jitter_68_fitted_px": 0.3, "jitter_68_detected_px": 1.2},
                "stage_seconds": {"total": T * 0.02}}
        write_result(out / f"clip_{i:04d}", *track_from_arrays(tracking, out), meta)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=40)
    ap.add_argument("--frames", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        write_folder(out, args.videos, args.frames)
        write_report(out, Path(tmp) / "warmup.html", plots="all")  # imports, font cache
        seconds = {"none": [], "all": []}
        for _ in range(args.repeats):
            for plots in ("none", "all"):
                t0 = time.perf_counter()
                path, _ = write_report(out, Path(tmp) / f"{plots}.html", plots=plots)
                seconds[plots].append(time.perf_counter() - t0)
                print(f"--plots {plots:4s}: {seconds[plots][-1]:6.2f} s, {path.stat().st_size / 2**20:5.2f} MiB")
        per_video = (np.median(seconds["all"]) - np.median(seconds["none"])) / args.videos
        print(f"{args.videos} videos of {args.frames} frames: plots cost {per_video:.2f} s per video (median)")


if __name__ == "__main__":
    main()
