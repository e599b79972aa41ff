"""Rasterizer speed: ms/frame at 512x512 for a FLAME-sized mesh (5023 V / 9976 F).

The mesh is a head-sized ellipsoid (Fibonacci points, convex hull, then the 66
faces at the back removed as a "neck hole" to reach FLAME's exact counts),
0.5 m in front of a camera whose focal length makes it fill most of the frame,
as a tracked face crop does. `--faces 25000 --verts 25000` gives an
ICT-FaceKit-sized head instead. Rows: the differentiable rasterizer (used by
synthesis) and the display renderer of the -v video (numba and PyTorch paths).

    .venv/bin/python benchmarks/bench_render.py [--device cuda] [--threads N]

`--pipeline` instead measures what issue 21 asks of -v: the CLI on the
250-frame 512x512 clip of benchmarks/run.py (no EMOCA, the FLAME stand-in),
alternately without and with -v, each run in a fresh process, printing per
run the tracking's wall seconds (meta.json's stage total, which ends before
-v), the -v stage's wall seconds (meta.json's "visualization") and their
ratio, and the process's wall and CPU seconds:

    .venv/bin/python benchmarks/bench_render.py --pipeline [--rounds 3]
"""

from __future__ import annotations

from lightning_ft.runtime import configure_threads, openmp_settings  # noqa: I001
configure_threads()  # before torch loads, as a run does
import argparse
import os
import time

import numpy as np
import torch
from scipy.spatial import ConvexHull

from lightning_ft import render_jit
from lightning_ft.cameras import project_screen  # noqa: E402
from lightning_ft.render import (DisplayRenderer, antialias, face_adjacency, interpolate,
                                 rasterize, render_shaded)

N_VERTS, N_FACES = 5023, 9976


def flame_sized_mesh(n_verts: int = N_VERTS, n_faces: int = N_FACES) -> tuple[np.ndarray, np.ndarray]:
    """A closed-then-opened ellipsoid with FLAME's vertex and face counts.

    Returns vertices [n_verts,3] (meters, OpenCV camera space, centred at
    z=0.5) and faces [n_faces,3] (at most 2 n_verts - 4) counter-clockwise
    seen from outside.
    """
    i = np.arange(n_verts) + 0.5
    polar = np.arccos(1 - 2 * i / n_verts)
    azimuth = np.pi * (1 + 5 ** 0.5) * i
    unit = np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar),
                     np.cos(polar)], axis=1)
    faces = ConvexHull(unit).simplices
    normal = np.cross(unit[faces[:, 1]] - unit[faces[:, 0]], unit[faces[:, 2]] - unit[faces[:, 0]])
    outward = (normal * unit[faces].mean(1)).sum(1) > 0
    faces = np.where(outward[:, None], faces, faces[:, [0, 2, 1]])
    # the back of the head points along +z (away from the camera)
    back = unit[faces].mean(1)[:, 2]
    faces = faces[np.argsort(back)[: n_faces]]
    verts = unit * np.array([0.08, 0.11, 0.095]) + np.array([0.0, 0.0, 0.5])
    return verts.astype(np.float32), faces.astype(np.int64)


def timed(fn, repeats: int, sync) -> tuple[float, float]:
    """(median wall ms, min process-CPU ms) over `repeats` calls after one warm-up.

    The CPU time is reported too because this machine is shared: wall time
    includes waiting for other processes, CPU time (summed over threads) does not.
    """
    fn()
    sync()
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        sync()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return 1000 * float(np.median(wall)), 1000 * float(np.min(cpu))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--zoom", type=float, default=1.0,
                        help="focal-length factor; 2 makes the head overflow the crop")
    parser.add_argument("--verts", type=int, default=N_VERTS)
    parser.add_argument("--faces", type=int, default=N_FACES)
    parser.add_argument("--pipeline", action="store_true",
                        help="time the tracker without and with -v instead (see the module docstring)")
    parser.add_argument("--rounds", type=int, default=3, help="--pipeline: rounds of (without, with -v)")
    args = parser.parse_args()
    print(openmp_settings(), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pipeline:
        pipeline_rounds(args.rounds)
        return
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    n_verts, n_faces = args.verts, args.faces
    verts_np, faces_np = flame_sized_mesh(n_verts, n_faces)
    assert verts_np.shape == (n_verts, 3) and faces_np.shape == (n_faces, 3)
    size = args.size
    # zoom 1: the ellipsoid spans ~80% of the frame height
    focal = args.zoom * 0.4 * size * 0.45 / 0.11
    K = torch.tensor([[focal, 0, (size - 1) / 2], [0, focal, (size - 1) / 2], [0, 0, 1]],
                     device=device)
    verts = torch.from_numpy(verts_np).to(device)[None].repeat(args.batch, 1, 1)
    faces = torch.from_numpy(faces_np).to(device)
    adjacency = face_adjacency(faces)
    colors = torch.rand(args.batch, n_verts, 3, device=device)

    def forward_only():
        with torch.no_grad():
            rasterize(project_screen(verts, K), faces, size)

    def forward_cull():
        with torch.no_grad():
            rasterize(project_screen(verts, K), faces, size, cull_backfaces=True)

    def shaded():
        with torch.no_grad():
            render_shaded(verts, faces, K, size)

    leaf = verts.clone().requires_grad_(True)

    def fwd_bwd(aa: bool):
        def run():
            leaf.grad = None
            screen = project_screen(leaf, K)
            frags = rasterize(screen, faces, size)
            img = interpolate(frags, colors, faces)
            if aa:
                img = antialias(img, frags, screen, faces, adjacency)
            img.sum().backward()
        return run

    with torch.no_grad():
        frags = rasterize(project_screen(verts, K), faces, size)
    coverage = frags.mask.float().mean().item()
    display_rows = []
    if args.batch == 1:
        backends = (["numba"] if render_jit.available() and device.type == "cpu" else []) + ["torch"]
        for backend in backends:
            renderer = DisplayRenderer(faces, size, device=device, backend=backend)
            same = (renderer.rasterize(project_screen(verts, K)[0]).face_idx() == frags.face_idx[0]).float().mean()
            print(f"display renderer ({backend}): same face as rasterize at {same:.4%} of the pixels")
            display_rows += [
                (f"display rasterize ({backend})",
                 timed(lambda r=renderer: r.rasterize(project_screen(verts, K)[0]), args.repeats, sync)),
                (f"display render_image ({backend}, -v)",
                 timed(lambda r=renderer: r.render_image(verts[0], K), args.repeats, sync)),
            ]
    rows = display_rows + [
        ("rasterize (no grad)", timed(forward_only, args.repeats, sync)),
        ("rasterize, cull back faces", timed(forward_cull, args.repeats, sync)),
        ("render_shaded (-v panel)", timed(shaded, args.repeats, sync)),
        ("rasterize+interpolate fwd+bwd", timed(fwd_bwd(False), args.repeats, sync)),
        ("  + antialias fwd+bwd", timed(fwd_bwd(True), args.repeats, sync)),
    ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device={device} threads={torch.get_num_threads()} size={size}x{size} "
          f"batch={args.batch} mesh={n_verts}V/{n_faces}F zoom={args.zoom} coverage={coverage:.0%} "
          f"load_avg_1min={load:.1f}")
    print(f"{'stage':34s} {'wall ms/frame':>14s} {'cpu ms/frame':>13s}")
    for name, (wall, cpu) in rows:
        print(f"{name:34s} {wall / args.batch:14.1f} {cpu / args.batch:13.1f}")

def pipeline_rounds(rounds: int) -> None:
    """The CLI on benchmarks/run.py's 250-frame 512 px clip, alternately
    without and with -v, each run a fresh process (as a user runs it: the
    -v figure includes importing and loading the compiled renderer)."""
    import json
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    import run as bench_run  # benchmarks/run.py: the clip and the FLAME stand-in

    if not bench_run.REAL_EMBEDDING_ZIP.exists():  # a worktree further from ../shared
        for folder in here.parents:
            candidate = folder / "shared" / "real-assets" / "FLAME_embedding.zip"
            if candidate.exists():
                bench_run.REAL_EMBEDDING_ZIP = candidate
                break
    clip = bench_run.astronaut_clip(250)
    work = Path(tempfile.mkdtemp(prefix="lightning_ft_bench_vis_"))
    try:
        print(bench_run.make_assets(work / "assets"), flush=True)
        print(f"clip {clip.name}; numba {'available' if render_jit.available() else 'absent'}")
        print(f"{'round':>5s} {'-v':>3s} {'tracking s':>10s} {'-v s':>6s} {'-v / tracking':>13s} "
              f"{'process wall s':>14s} {'process CPU s':>13s}  load avg before")
        for r in range(rounds):
            for visualize in (False, True):
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)  # as in run.py: no frame cache reused
                cmd = [sys.executable, str(here.parent / "track_lightning.py"), "--data", str(clip), "--no-emoca",
                       "--assets", str(work / "assets"), "--out", str(out), "-q", "-d", "cpu"]
                if visualize:
                    cmd.append("-v")
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                child = subprocess.Popen(cmd, cwd=here.parent, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
                _, status, usage = os.wait4(child.pid, 0)
                wall = time.perf_counter() - t0
                if os.waitstatus_to_exitcode(status) != 0:
                    raise SystemExit(f"tracker exited with {os.waitstatus_to_exitcode(status)}: {' '.join(cmd)}")
                seconds = json.loads((out / clip.stem / "meta.json").read_text())["stage_seconds"]
                vis = seconds.get("visualization", float("nan"))
                print(f"{r:5d} {'yes' if visualize else 'no':>3s} {seconds['total']:10.2f} {vis:6.2f} "
                      f"{vis / seconds['total']:13.2f} {wall:14.2f} {usage.ru_utime + usage.ru_stime:13.2f}"
                      f"  {load:.1f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
