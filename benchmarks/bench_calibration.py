"""Calibration accuracy across focal lengths and seeds on synthetic talking
heads (known focal, 1 px landmark noise, 120 frames, 512x512, 32 sampled).

    python benchmarks/bench_calibration.py --focals 800 1200 2000 --seeds 0 1 2 3
    python benchmarks/bench_calibration.py --n-frames 64 --prior-sigma-log 0.3   # other calibration settings

Prints the estimated focal, its error, the standard deviation calibration
predicts for it (and the error in those units, z), CPU seconds and the final
profile points (focal px, cost) of each run; then how often |z| < 1 and < 2
(about 68 % and 95 % if the prediction holds).

The synthetic frames have no source video, so calibration's prior is the
crop-width one (`CalibrationConfig.focal_prior_sigma_log`); --prior-sigma-log
sets that prior's strength, to see what a change of the field-of-view
prior's (`fov_prior_sigma_log`, real videos) would cost here.
"""

from lightning_ft.runtime import configure_threads, openmp_settings  # noqa: I001
configure_threads()  # before torch loads, as a run does
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lightning_ft.fitter import CalibrationConfig, Targets, build_basis, calibrate
from lightning_ft.flame import FLAME
from lightning_ft.synthetic.flame_files import write_synthetic_flame
from lightning_ft.synthetic.sequences import make_sequence


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--focals", type=float, nargs="+", default=[800.0, 1200.0, 2000.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-frames", type=int, default=CalibrationConfig.n_frames, help="frames calibration fits")
    ap.add_argument("--prior-sigma-log", type=float, default=CalibrationConfig.focal_prior_sigma_log,
                    help="the focal prior's sigma in log focal")
    args = ap.parse_args()
    ccfg = CalibrationConfig(n_frames=args.n_frames, focal_prior_sigma_log=args.prior_sigma_log)
    print(openmp_settings(), f"| calibration frames {ccfg.n_frames}, prior sigma (log focal) "
          f"{ccfg.focal_prior_sigma_log}", flush=True)
    torch.set_num_threads(args.threads)
    files = write_synthetic_flame(Path(tempfile.mkdtemp()))
    flame = FLAME(files.model, files.landmark_embedding, files.mediapipe_embedding)
    basis = build_basis(flame)
    errors, z = [], []
    for focal in args.focals:
        for seed in args.seeds:
            seq = make_sequence(flame, T=args.frames, focal=focal, seed=seed)
            targets = Targets.from_landmarks(seq.lmk68, seq.lmk_dense, basis)
            c0 = time.process_time()
            cal = calibrate(basis, targets, np.ones(args.frames, bool), (512, 512), ccfg=ccfg)
            err = cal.focal_px[0] / focal - 1
            errors.append(abs(err))
            z.append(np.log1p(err) / cal.focal_rel_std)
            profile = [(round(f), round(c)) for f, c in cal.focal_costs]
            print(f"focal {focal:6.0f} seed {seed}: estimate {cal.focal_px[0]:7.1f} ({100 * err:+5.1f} %, "
                  f"predicted std {100 * cal.focal_rel_std:4.1f} %, z {z[-1]:+5.2f}), "
                  f"cpu {time.process_time() - c0:5.1f} s, profile {profile}", flush=True)
    z = np.abs(z)
    print(f"median |error| {100 * np.median(errors):.1f} %, within 5 %: {np.mean(np.array(errors) <= 0.05):.0%}; "
          f"|z| < 1: {np.mean(z < 1):.0%}, |z| < 2: {np.mean(z < 2):.0%}")


if __name__ == "__main__":
    main()
