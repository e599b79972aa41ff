"""CPU time of one ICT model forward (vertices) and of the landmark lookups.

    python benchmarks/bench_ict_forward.py [--batch 32] [--repeats 20]

Prints the median and the quartiles over repeats (ms), for: vertices from
shape + expression (one [V*3, 153] matmul), the same with the eye rotation
(two sphere fits and two rigid rotations), and with the 68 points (yaw
contour) and the dense mediapipe points; with and without autograd (backward
of a sum of squares included in the latter).
"""

from lightning_ft.runtime import configure_threads  # noqa: I001
configure_threads()  # before torch loads, as a run does
import argparse
import time

import numpy as np
import torch

from lightning_ft.ict import ICT


def timed(fn, repeats):
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - t))
    return np.percentile(out, [25, 50, 75])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    model = ICT.load()
    B = args.batch
    g = torch.Generator().manual_seed(0)
    shape, expression = torch.randn(B, 100, generator=g), torch.rand(B, 53, generator=g)
    eye_pose = 0.2 * torch.randn(B, 6, generator=g)
    R = torch.eye(3).expand(B, 3, 3)

    def full():
        v = model(shape, expression, eye_pose)
        return model.landmarks68(v, R), model.dense_landmarks(v)

    def backward():
        s, e, p = (x.clone().requires_grad_() for x in (shape, expression, eye_pose))
        v = model(s, e, p)
        (model.landmarks68(v, R).square().sum() + model.dense_landmarks(v).square().sum()
         + v.square().sum()).backward()

    print(f"ICT forward, B={B}, {model.n_vertices} vertices, torch threads {torch.get_num_threads()} "
          f"(ms: 25th / median / 75th percentile of {args.repeats})")
    with torch.no_grad():
        for name, fn in (("vertices (shape + expression)", lambda: model(shape, expression)),
                         ("vertices + eye rotation", lambda: model(shape, expression, eye_pose)),
                         ("+ 68 points and dense points", full)):
            q = timed(fn, args.repeats)
            print(f"  {name:34s} {q[0]:7.1f} {q[1]:7.1f} {q[2]:7.1f}")
    q = timed(backward, args.repeats)
    print(f"  {'all of it, forward + backward':34s} {q[0]:7.1f} {q[1]:7.1f} {q[2]:7.1f}")


if __name__ == "__main__":
    main()
