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

`--options` instead compares faster-inference candidates with the shipped
path (channels_last + folded BatchNorm, eager) on real face crops (carphone,
mediapipe landmarks, `crop_for_emoca`): TorchScript trace + freeze +
optimize_for_inference, torch.compile with inductor freezing, the two
encoders on two threads of one intra-op thread each, and int8 static
quantization (FX graph mode, x86 backend, per-channel weights, calibrated on
other carphone crops). For each: set-up time (paid once per process), frames
per CPU-second at 1 thread (robust to other jobs on the cores), frames/s at
2 threads, and the largest absolute and relative (to the code's largest
magnitude) difference of any output code from the shipped path.

    .venv/bin/python benchmarks/bench_emoca.py [--threads 2] [--reps 3] [--options]
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Tuple

# OpenMP's waiting (GOMP_SPINCOUNT) is read when torch loads: set it first, as a run does.
from lightning_ft.runtime import configure_threads  # isort: skip

configure_threads()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lightning_ft.emoca import CROP_SIZE, EmocaEncoder, crop_for_emoca  # noqa: E402

from lightning_ft.synthetic.emoca_files import synthetic_state_dict

# Multiply-adds of one ResNet-50 at 224 x 224 (4.09 G, the usual figure); the
# MLP heads add 0.1 %. Two encoders per frame, 2 FLOP per multiply-add.
GFLOP_PER_FRAME = 2 * 2 * 4.09
Codes = Callable[[torch.Tensor], Dict[str, torch.Tensor]]


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


# ----------------------------------------------------------------------------
# --options: candidates for faster CPU inference, each returning the same dict
# of codes as EmocaEncoder.forward.


def carphone_crops(n_frames: int) -> torch.Tensor:
    """EMOCA crops [n,3,224,224] (channels_last) of the first n carphone frames with a face."""
    from lightning_ft.landmarks import MeshTracker
    from lightning_ft.synthetic.clips import carphone_path
    from lightning_ft.video import iter_frames

    crops = []
    with MeshTracker() as mesh:
        for _, _, frame in iter_frames(carphone_path()):
            points = mesh(frame)
            if points is not None:
                crops.append(crop_for_emoca(frame, points)[0])
            if len(crops) == n_frames:
                break
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)
    return images.contiguous(memory_format=torch.channels_last)


def codes_from(flame_code: torch.Tensor, expression: torch.Tensor) -> Dict[str, torch.Tensor]:
    names = ("shape", "texture", "expression_coarse", "global_pose", "jaw_pose", "cam", "light")
    out = dict(zip(names, flame_code.split([100, 50, 50, 3, 3, 3, 27], dim=1)))
    out["light"] = out["light"].reshape(-1, 9, 3)
    out["expression"] = expression
    return out


class TwoEncoders(torch.nn.Module):
    """Both regressors as one module returning (E_flame code, E_expression code): traceable."""

    def __init__(self, model: EmocaEncoder):
        super().__init__()
        self.flame, self.expression = model.E_flame, model.E_expression

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.flame(images), self.expression(images)


def jit_frozen(model: EmocaEncoder, example: torch.Tensor) -> Codes:
    with torch.no_grad():
        traced = torch.jit.freeze(torch.jit.trace(TwoEncoders(model).eval(), example))
        optimized = torch.jit.optimize_for_inference(traced)
    return lambda images: codes_from(*optimized(images))


def inductor_frozen(model: EmocaEncoder, example: torch.Tensor) -> Codes:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # constant weights: prepacked oneDNN convolutions
    compiled = torch.compile(TwoEncoders(model).eval())
    compiled(example)  # compilation happens here, inside the timed set-up
    return lambda images: codes_from(*compiled(images))


def parallel_encoders(model: EmocaEncoder) -> Codes:
    """E_expression on a second Python thread, each encoder with one intra-op thread."""
    pool = ThreadPoolExecutor(1)

    def expression(images: torch.Tensor) -> torch.Tensor:
        torch.set_num_threads(1)  # OpenMP's thread count is per calling thread
        with torch.inference_mode():
            return model.E_expression(images)

    def run(images: torch.Tensor) -> Dict[str, torch.Tensor]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            pending = pool.submit(expression, images)
            return codes_from(model.E_flame(images), pending.result())
        finally:
            torch.set_num_threads(threads)

    return run


def int8_static(model: EmocaEncoder, calibration: torch.Tensor) -> Codes:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    quantized = []
    for encoder in (model.E_flame, model.E_expression):
        prepared = prepare_fx(encoder, get_default_qconfig_mapping("x86"), example_inputs=(calibration[:1],))
        with torch.no_grad():
            for image in calibration.split(1):
                prepared(image)
        quantized.append(convert_fx(prepared))
    return lambda images: codes_from(quantized[0](images), quantized[1](images))


def time_call(codes: Codes, images: torch.Tensor, reps: int) -> Tuple[float, float]:
    """(frames per wall second, frames per CPU second of this process), best of `reps`."""
    wall, cpu = float("inf"), float("inf")
    with torch.inference_mode():
        codes(images)
        for _ in range(reps):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            codes(images)
            wall = min(wall, time.perf_counter() - start_wall)
            cpu = min(cpu, time.process_time() - start_cpu)
    return len(images) / wall, len(images) / cpu


def compare_options(threads: int, reps: int) -> None:
    crops = carphone_crops(48)
    measured, calibration = crops[0::2][:16], crops[1::2][:16]  # disjoint frames
    model = synthetic_encoder("cpu").fold_batchnorm().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        reference = model(measured)
    candidates = (("shipped (eager)", lambda: model), ("jit freeze+ofi", lambda: jit_frozen(model, measured[:1])),
                  ("inductor freezing", lambda: inductor_frozen(model, measured[:8])),
                  ("parallel encoders", lambda: parallel_encoders(model)),
                  ("int8 static x86", lambda: int8_static(model, calibration)))
    print(f"batch 8 real crops; GFLOP/s = frames/s x {GFLOP_PER_FRAME:.1f}")
    print(f"{'option':18s} {'set-up s':>8s} {'fr/CPU-s 1 thr':>14s} {'GFLOP/s':>7s} "
          f"{'fr/s ' + str(threads) + ' thr':>9s} {'max abs':>8s} {'max rel':>8s} {'load':>5s}")
    for name, build in candidates:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        codes = build()
        setup_s = time.perf_counter() - start
        with torch.inference_mode():
            result = codes(measured)
        max_abs = max(float((result[k] - reference[k]).abs().max()) for k in reference)
        max_rel = max(float((result[k] - reference[k]).abs().max() / reference[k].abs().max()) for k in reference)
        wall_fps, _ = time_call(codes, measured[:8], reps)
        torch.set_num_threads(1)
        _, cpu_fps = time_call(codes, measured[:8], reps)
        print(f"{name:18s} {setup_s:8.1f} {cpu_fps:14.2f} {cpu_fps * GFLOP_PER_FRAME:7.1f} {wall_fps:9.2f} "
              f"{max_abs:8.1e} {max_rel:8.1e} {os.getloadavg()[0]:5.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--options", action="store_true", help="compare faster-inference candidates instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {args.threads} CPU threads, GOMP_SPINCOUNT="
          f"{os.environ.get('GOMP_SPINCOUNT')} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"load average {load:.1f} at start")
    if args.options:
        compare_options(args.threads, args.reps)
        print(f"load average {os.getloadavg()[0]:.1f} at end (other processes share these cores)")
        return
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
