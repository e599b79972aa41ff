"""Photometric synthesis: speed (ms/frame) and per-video vs per-frame lighting.

Speed: a FLAME-sized synthetic model (FLAME's real topology from
../shared/real-assets/FLAME_embedding.zip when present, else a procedural
head of 5023 vertices), a 50-component texture space at 256x256, T textured
frames rendered at 512x512 and fitted at `--size` (default 256) with the
default `SynthesisConfig` (smoothing off: the frames are independent random
poses, not a motion). Prints wall and process-CPU time of `refine` and
of one Adam iteration (forward + backward) per frame.

Lighting: the same recovery experiment as the tests (64 px, perturbed pose
and expression, landmark term off) with 'per_video' and 'per_frame' lighting,
on frames lit by one light and on frames whose light turns over the clip.

    .venv/bin/python benchmarks/bench_synthesis.py [--frames 32] [--size 256] [--threads 2] [--skip-speed]
"""

from __future__ import annotations

from lightning_ft.runtime import configure_threads, openmp_settings  # noqa: I001
configure_threads()  # before torch loads, as a run does
import argparse
import sys
import tempfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from lightning_ft.flame import FLAME
from lightning_ft.synthesis import SynthesisConfig, load_texture_space, refine, render_appearance
from lightning_ft.synthetic.flame_files import write_synthetic_flame
from lightning_ft.synthetic.texture_files import (perturb_params, recovery_errors, render_textured_sequence,
                                                  write_synthetic_texture_for_mesh)

REPO = Path(__file__).resolve().parents[1]
REAL_ZIP = REPO.parent / "shared" / "real-assets" / "FLAME_embedding.zip"


def build_model(folder: Path, n_vertices: int) -> tuple[FLAME, str]:
    template = real = None
    if n_vertices >= 5000 and REAL_ZIP.exists():
        with zipfile.ZipFile(REAL_ZIP) as z:
            z.extractall(folder / "real")
        real = next((folder / "real").rglob("landmark_embedding.npy")).parent
        template = real / "head_template_mesh.obj"
    files = write_synthetic_flame(folder / "flame", n_vertices=n_vertices, seed=0, template_obj=template,
                                  real_embeddings=real)
    flame = FLAME(files.model, files.landmark_embedding, files.mediapipe_embedding)
    what = "FLAME topology (real template, synthetic blendshapes)" if template else "procedural head"
    return flame, f"{what}: {flame.n_vertices} vertices, {flame.faces.shape[0]} faces"


def errors(flame, p, truth, region_vertices, focal):
    """(rotation error deg, image-plane error of face-region vertices px)."""
    deg, _, px = recovery_errors(flame, p, truth, region_vertices, focal)
    return deg, px


def speed(args, tmp: Path) -> None:
    flame, what = build_model(tmp, 5023)
    tex_path = write_synthetic_texture_for_mesh(tmp / "FLAME_texture.npz", flame.v_template.numpy(),
                                                flame.faces.numpy(), size=256, n_comp=50)
    ts = load_texture_space(tex_path)
    t0 = time.perf_counter()
    seq = render_textured_sequence(flame, ts, T=args.frames, size=512, seed=0)
    print(f"model: {what}; texture 256x256x50; {args.frames} frames 512x512 rendered in "
          f"{time.perf_counter() - t0:.1f} s")
    init = perturb_params(seq.params, 1)
    # the synthetic frames have independent random poses, not a motion: no smoothing
    cfg = replace(SynthesisConfig(), image_size=args.size, batch_size=args.batch, smoothing=None)
    T = args.frames
    c0, t0 = time.process_time(), time.perf_counter()
    res = refine(flame, ts, list(seq.frames), init, seq.focal, seq.principal_point, seq.lmk68,
                 np.ones(T, bool), cfg, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n_iter = cfg.appearance_iterations * min(cfg.appearance_frames, T) + cfg.iterations * T
    print(f"\nrefine, fit size {res.image_size}, batch {cfg.batch_size}, {cfg.appearance_iterations} appearance "
          f"iterations x {min(cfg.appearance_frames, T)} frames + {cfg.iterations} iterations x {T} frames:")
    print(f"  {'wall s':>8} {'CPU s':>8} {'ms/frame':>9} {'ms/frame-iteration':>19}")
    print(f"  {wall:8.1f} {cpu:8.1f} {1000 * wall / T:9.0f} {1000 * wall / n_iter:19.1f}")
    print(f"  photometric error {res.photometric_error_before:.4f} -> {res.photometric_error_after:.4f}")
    rot0, px0 = errors(flame, init, seq.params, seq.region_vertices, seq.focal)
    rot1, px1 = errors(flame, res.params, seq.params, seq.region_vertices, seq.focal)
    print(f"  rotation error {rot0:.2f} -> {rot1:.2f} deg; face vertices {px0:.2f} -> {px1:.2f} px (512 px crop)")

    # Where one iteration's time goes: render forward, backward, at one batch.
    from lightning_ft.synthesis import _Scene  # the benchmark times internals
    B = min(args.batch, T)
    s = args.size / 512
    scene = _Scene(flame, ts.resized(cfg.texture_size), torch.as_tensor(seq.focal),
                   torch.as_tensor(seq.principal_point), (args.size, args.size), (s, s), cfg)
    p = seq.params.select(slice(0, B))
    images = torch.nn.functional.interpolate(torch.as_tensor(seq.frames[:B]).permute(0, 3, 1, 2).float() / 255,
                                             size=(args.size, args.size), mode="bilinear", antialias=True,
                                             align_corners=False).permute(0, 2, 3, 1)
    expr = p.expression.clone().requires_grad_(True)
    tex = torch.zeros(ts.n_components)

    def step(backward: bool):
        verts, lmk = scene.geometry(p.rotation, p.translation, expr, p.jaw, p.eyes, p.shape)
        albedo = scene.tex.albedo(tex).clamp(0, 1)
        photo, lm, _ = scene.losses(verts, lmk, albedo, torch.as_tensor(seq.lighting).expand(B, 9, 3),
                                    images, torch.as_tensor(seq.lmk68[:B]) * s)
        if backward:
            (photo.sum() + lm.sum()).backward()

    rows = []
    for name, bw in (("forward", False), ("forward+backward", True)):
        step(bw)
        walls, cpus = [], []
        for _ in range(3):
            c0, t0 = time.process_time(), time.perf_counter()
            step(bw)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        rows.append((name, 1000 * np.median(walls) / B, 1000 * min(cpus) / B))
    print(f"\none iteration at {args.size}x{args.size}, batch {B}:")
    print(f"  {'':18} {'wall ms/frame':>14} {'CPU ms/frame':>13}")
    for name, w, c in rows:
        print(f"  {name:18} {w:14.1f} {c:13.1f}")


def lighting_comparison(tmp: Path) -> None:
    flame, what = build_model(tmp / "small", 1200)
    tex_path = write_synthetic_texture_for_mesh(tmp / "small_texture.npz", flame.v_template.numpy(),
                                                flame.faces.numpy(), size=64, n_comp=8)
    ts = load_texture_space(tex_path)
    print(f"\nlighting per video vs per frame ({what}, 6 frames at 64 px, landmark term off, seeds 1-2):")
    print(f"  {'frames lit by':16} {'lighting':10} {'rot deg':>8} {'verts px':>9} {'photo err':>10} {'s':>6}")
    for varying in (False, True):
        for mode in ("per_video", "per_frame"):
            acc, acc0 = [], []
            for seed in (1, 2):
                seq = render_textured_sequence(flame, ts, T=6, size=64, seed=seed)
                frames = seq.frames
                if varying:
                    frames = relight(flame, ts, seq)
                init = perturb_params(seq.params, seed + 10)
                acc0.append(errors(flame, init, seq.params, seq.region_vertices, seq.focal))
                cfg = SynthesisConfig(image_size=64, texture_size=64, w_landmark=0.0, smoothing=None,
                                      iterations=60, appearance_iterations=60, batch_size=6, lighting=mode)
                t0 = time.perf_counter()
                res = refine(flame, ts, list(frames), init, seq.focal, seq.principal_point, seq.lmk68,
                             np.ones(6, bool), cfg, progress=False)
                acc.append((*errors(flame, res.params, seq.params, seq.region_vertices, seq.focal),
                            res.photometric_error_after, time.perf_counter() - t0))
            r, px, ph, sec = np.mean(acc, axis=0)
            if mode == "per_video":
                r0, px0 = np.mean(acc0, axis=0)
                print(f"  {'(initial)':16} {'':10} {r0:8.2f} {px0:9.3f}")
            print(f"  {'a turning light' if varying else 'one light':16} {mode:10} {r:8.2f} {px:9.3f} {ph:10.4f} "
                  f"{sec:6.1f}")


def relight(flame, ts, seq) -> np.ndarray:
    """Re-render `seq` with a light that turns from the left to the right."""
    from lightning_ft.synthesis import face_region_mask

    T = len(seq.frames)
    p = seq.params
    sh = torch.as_tensor(seq.lighting).repeat(T, 1, 1)
    sh[:, 1] = torch.linspace(-0.8, 0.8, T)[:, None]
    with torch.no_grad():
        out = flame(shape=p.shape.expand(T, -1), expression=p.expression, jaw_pose=p.jaw)
        verts = torch.einsum("tij,tvj->tvi", p.rotation, out.vertices) + p.translation[:, None]
        size = seq.frames.shape[1]
        r = render_appearance(verts, flame.faces, ts.face_uvs(), ts.albedo(torch.as_tensor(seq.texture)).clamp(0, 1),
                              sh, torch.as_tensor(seq.focal), torch.as_tensor(seq.principal_point), (size, size),
                              face_region_mask(flame))
        background = torch.as_tensor(seq.frames).float() / 255
        img = r.composite(background)  # same geometry: the face region is replaced
    return (img.clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-lighting", action="store_true")
    args = ap.parse_args()
    print(openmp_settings(), flush=True)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU")
    with tempfile.TemporaryDirectory() as d:
        if not args.skip_speed:
            speed(args, Path(d))
        if not args.skip_lighting:
            lighting_comparison(Path(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
