"""Rasterizer speed: ms/frame at 512x512 for a FLAME-sized mesh (5023 V / 9976 F).

The mesh is a head-sized ellipsoid (Fibonacci points, convex hull, then the 66
faces at the back removed as a "neck hole" to reach FLAME's exact counts),
0.5 m in front of a camera whose focal length makes it fill most of the frame,
as a tracked face crop does. Run:

    .venv/bin/python benchmarks/bench_render.py [--device cuda] [--threads N]
"""

from __future__ import annotations

import lightning_ft  # noqa: F401, I001  (first: sets OpenMP's waiting before torch loads, as in a run)
import argparse
import os
import time

import numpy as np
import torch
from scipy.spatial import ConvexHull

from lightning_ft.render import (antialias, face_adjacency, interpolate, project,
                                 rasterize, render_shaded)

N_VERTS, N_FACES = 5023, 9976


def flame_sized_mesh() -> tuple[np.ndarray, np.ndarray]:
    """A closed-then-opened ellipsoid with FLAME's vertex and face counts.

    Returns vertices [5023,3] (meters, OpenCV camera space, centred at z=0.5)
    and faces [9976,3] counter-clockwise seen from outside.
    """
    i = np.arange(N_VERTS) + 0.5
    polar = np.arccos(1 - 2 * i / N_VERTS)
    azimuth = np.pi * (1 + 5 ** 0.5) * i
    unit = np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar),
                     np.cos(polar)], axis=1)
    faces = ConvexHull(unit).simplices
    normal = np.cross(unit[faces[:, 1]] - unit[faces[:, 0]], unit[faces[:, 2]] - unit[faces[:, 0]])
    outward = (normal * unit[faces].mean(1)).sum(1) > 0
    faces = np.where(outward[:, None], faces, faces[:, [0, 2, 1]])
    # the back of the head points along +z (away from the camera)
    back = unit[faces].mean(1)[:, 2]
    faces = faces[np.argsort(back)[: N_FACES]]
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
    args = parser.parse_args()
    print(lightning_ft.openmp_settings(), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    verts_np, faces_np = flame_sized_mesh()
    assert verts_np.shape == (N_VERTS, 3) and faces_np.shape == (N_FACES, 3)
    size = args.size
    # zoom 1: the ellipsoid spans ~80% of the frame height
    focal = args.zoom * 0.4 * size * 0.45 / 0.11
    K = torch.tensor([[focal, 0, (size - 1) / 2], [0, focal, (size - 1) / 2], [0, 0, 1]],
                     device=device)
    verts = torch.from_numpy(verts_np).to(device)[None].repeat(args.batch, 1, 1)
    faces = torch.from_numpy(faces_np).to(device)
    adjacency = face_adjacency(faces)
    colors = torch.rand(args.batch, N_VERTS, 3, device=device)

    def forward_only():
        with torch.no_grad():
            rasterize(project(verts, K), faces, size)

    def forward_cull():
        with torch.no_grad():
            rasterize(project(verts, K), faces, size, cull_backfaces=True)

    def shaded():
        with torch.no_grad():
            render_shaded(verts, faces, K, size)

    leaf = verts.clone().requires_grad_(True)

    def fwd_bwd(aa: bool):
        def run():
            leaf.grad = None
            screen = project(leaf, K)
            frags = rasterize(screen, faces, size)
            img = interpolate(frags, colors, faces)
            if aa:
                img = antialias(img, frags, screen, faces, adjacency)
            img.sum().backward()
        return run

    with torch.no_grad():
        frags = rasterize(project(verts, K), faces, size)
    coverage = frags.mask.float().mean().item()
    rows = [
        ("rasterize (no grad)", timed(forward_only, args.repeats, sync)),
        ("rasterize, cull back faces", timed(forward_cull, args.repeats, sync)),
        ("render_shaded (-v panel)", timed(shaded, args.repeats, sync)),
        ("rasterize+interpolate fwd+bwd", timed(fwd_bwd(False), args.repeats, sync)),
        ("  + antialias fwd+bwd", timed(fwd_bwd(True), args.repeats, sync)),
    ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device={device} threads={torch.get_num_threads()} size={size}x{size} "
          f"batch={args.batch} mesh={N_VERTS}V/{N_FACES}F zoom={args.zoom} coverage={coverage:.0%} "
          f"load_avg_1min={load:.1f}")
    print(f"{'stage':34s} {'wall ms/frame':>14s} {'cpu ms/frame':>13s}")
    for name, (wall, cpu) in rows:
        print(f"{name:34s} {wall / args.batch:14.1f} {cpu / args.batch:13.1f}")

if __name__ == "__main__":
    main()
