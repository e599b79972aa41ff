"""Dataset-run integrity, measured through the command line in child
processes (issue 17):

  1. a folder of car.mp4, car.avi, car.mkv, car.mov (four different
     carphone excerpts, each in its suffix's container): results written;
  2. a full disk (the output under RLIMIT_FSIZE = 32 KiB, a real EFBIG on
     the frame cache's commit): seconds until the run exits by itself,
     its exit code and last line;
  3. a folder run SIGKILLed once its first result is finished, then rerun:
     what the rerun tracks and skips;
  4. one run alone over the 4 clips, then two runs started together on one
     fresh output folder: wall seconds (each way once; the machine is
     shared, so these are single noisy samples).

    .venv/bin/python benchmarks/bench_integrity.py [--frames 120] [--image-size 512] [--together-first]

The FLAME model is benchmarks/run.py's stand-in (speed follows FLAME 2020's
sizes, not its values).
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

TRACK = "import sys; from lightning_ft.cli import track_main; sys.exit(track_main(sys.argv[1:]))"


def start(args, file_size_limit=None) -> subprocess.Popen:
    def limit():
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", TRACK, *map(str, args)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit)


def summary_line(stdout: str) -> str:
    return next((line for line in stdout.splitlines() if " done, " in line), stdout.strip()[-200:])


def main() -> int:
    from run import load_average, make_assets

    from lightning_ft.synthetic.clips import carphone_path, write_excerpt

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=120, help="frames of the longest clip (carphone has 120)")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--together-first", action="store_true", help="time the two runs before the one run")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_integrity-"))
    assets = tmp / "assets"
    print(f"assets: {make_assets(assets)}; load average {load_average()}")
    data = tmp / "cars"
    for n, suffix in enumerate((".mp4", ".avi", ".mkv", ".mov")):
        write_excerpt(carphone_path(), data / f"car{suffix}", n_frames=args.frames - 3 * n)
    common = ["--data", data, "--assets", assets, "--no-emoca", "--image-size", args.image_size, "-q", "-d", "cpu"]

    def run_alone():
        t0 = time.monotonic()
        p = start(common + ["--out", tmp / "alone"])
        out, err = p.communicate()
        results = sorted(q.parent.name for q in (tmp / "alone").glob("*/meta.json"))
        print(f"1. four files, one stem: exit {p.returncode}, {summary_line(out)}; results {results}")
        return time.monotonic() - t0

    def run_together():
        t0 = time.monotonic()
        procs = [start(common + ["--out", tmp / "together"]) for _ in range(2)]
        outs = [q.communicate()[0] for q in procs]
        return time.monotonic() - t0, outs

    # 1 and 4: one run alone, two runs together on one output folder
    if args.together_first:
        together, outs = run_together()
        alone = run_alone()
    else:
        alone = run_alone()
        together, outs = run_together()
    print(f"4. one run alone {alone:.1f} s; two runs together {together:.1f} s (ratio {together / alone:.2f}); "
          f"{' | '.join(summary_line(o) for o in outs)}; results "
          f"{len(list((tmp / 'together').glob('*/meta.json')))}; load average {load_average()}")

    # 2: a full disk
    t0 = time.monotonic()
    p = start(common + ["--out", tmp / "full"], file_size_limit=32 << 10)
    try:
        out, err = p.communicate(timeout=600)
        seconds = f"{time.monotonic() - t0:.1f} s"
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        seconds = "did not end within 600 s (killed)"
    last = err.strip().splitlines()[-1] if err.strip() else ""
    print(f"2. full disk (RLIMIT_FSIZE 32 KiB): ended after {seconds}, exit {p.returncode}; last line: {last}")

    # 3: killed after the first result, then rerun
    out_dir = tmp / "killed"
    p = start(common + ["--out", out_dir])
    while not list(out_dir.glob("*/meta.json")) and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    finished = sorted(q.parent.name for q in out_dir.glob("*/meta.json"))
    claims = len(list(out_dir.glob(".*.claim")))
    t0 = time.monotonic()
    p = start(common + ["--out", out_dir])
    out, _ = p.communicate()
    print(f"3. killed with {finished} finished and {claims} claim left; rerun {time.monotonic() - t0:.1f} s, "
          f"exit {p.returncode}: {summary_line(out)}")
    print(f"(files in {tmp}; remove when done)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
