"""EMOCA v2 encoder throughput (frames/s): both ResNet-50 encoders per frame.

Random weights from the synthetic release (the real checkpoint is
license-gated). They are scaled like trained weights so activations stay of
order one: PyTorch's default init shrinks activations through 50 layers into
float32 denormals, which run many times slower on x86 and would make the
timing meaningless. Variants measured in the same run: NCHW, channels_last, and
channels_last with BatchNorm folded into the convolutions. CPU at batch 1
and 32 (goal >= 10 frames/s at the best batch on a 2-core CPU); CUDA, when
present, at batch 32 and 128, fp32 and fp16 autocast (goal >= 500 frames/s).
Each figure is the best of `--reps` timed forward passes after one warm-up.

    .venv/bin/python benchmarks/bench_emoca.py [--threads 2] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from lightning_ft.emoca import CROP_SIZE, EmocaEncoder
from lightning_ft.synthetic.emoca_files import synthetic_state_dict


def frames_per_second(model: EmocaEncoder, batch: int, device: str, channels_last: bool,
                      reps: int, fp16: bool = False) -> float:
    images = torch.rand(batch, 3, CROP_SIZE, CROP_SIZE, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=fp16 and device == "cuda")
    best = float("inf")
    with torch.inference_mode(), autocast:
        model(images)  # warm-up (allocations, kernel selection)
        for _ in range(reps):  # best of `reps`: the cores are shared with other jobs
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(images)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return batch / best


def synthetic_encoder(device: str) -> EmocaEncoder:
    state = synthetic_state_dict(seed=0, include_ignored=False)
    model = EmocaEncoder()
    model.load_state_dict({key[len("deca."):]: value for key, value in state.items()}, strict=True)
    return model.eval().to(device)


def variants(device: str):
    yield "nchw", synthetic_encoder(device), False
    yield "channels_last", synthetic_encoder(device).to(memory_format=torch.channels_last), True
    folded = synthetic_encoder(device).fold_batchnorm().to(memory_format=torch.channels_last)
    yield "channels_last+folded_bn", folded, True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {args.threads} CPU threads, load average {load:.1f} at start")
    print(f"{'device':6s} {'variant':26s} {'batch':>5s} {'frames/s':>9s} {'vs nchw':>8s}")
    for device, batches in (("cpu", (1, 32)),) + ((("cuda", (32, 128)),) if torch.cuda.is_available() else ()):
        baseline = {}
        for name, model, channels_last in variants(device):
            for batch in batches:
                reps = args.reps if device == "cuda" or batch == 1 else max(2, args.reps // 2)
                fps = frames_per_second(model, batch, device, channels_last, reps)
                baseline.setdefault(batch, fps)
                print(f"{device:6s} {name:26s} {batch:5d} {fps:9.2f} {fps / baseline[batch]:7.2f}x", flush=True)
                if device == "cuda":
                    fps16 = frames_per_second(model, batch, device, channels_last, reps, fp16=True)
                    print(f"{device:6s} {name + ' fp16':26s} {batch:5d} {fps16:9.2f} "
                          f"{fps16 / baseline[batch]:7.2f}x", flush=True)
    if not torch.cuda.is_available():
        print("no CUDA device: GPU rows not measured")
    print(f"load average {os.getloadavg()[0]:.1f} at end (other processes share these cores)")


if __name__ == "__main__":
    main()
