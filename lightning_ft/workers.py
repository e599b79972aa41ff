"""Several worker processes over one folder of videos: one per device
(`-d 0,1,2,3`, `-d all`) or `--workers N` on one device (the CPU).

Every worker runs the ordinary folder loop (`batch.run`) with its own
device; the per-video claims (`claims.py`) do the dividing: a worker passes
over a video another live process holds and takes the next one, so each
takes the next unclaimed video when it is free. A video one worker failed is
not tried again by the others in the same run (a marker in the run's
folder); a rerun tries it again.

Workers are child processes of `python -m lightning_ft.workers`, started by
subprocess rather than multiprocessing, because:
- a worker killed by a signal (SIGKILL, the out-of-memory killer, a crash in
  native code) is one pipe that ends and one exit status to read; a killed
  multiprocessing child can leave a shared Queue's lock held, which hangs the
  rest;
- each worker's log lines arrive on its own pipe, so the parent prints them
  above its one progress line instead of letting them cut through it.
Each worker tells the parent what it starts and finishes as JSON lines on
its stdout (prefixed with EVENT_PREFIX); the parent merges them into one
progress display and one summary table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, TextIO

from .errors import LightningFTError, UsageError
from .progress import NATIVE_NOISE
from .runtime import configure_threads

EVENT_PREFIX = "@lightning_ft-worker "
# Plain (non-terminal) progress: a line per finished video, and at least this often.
PLAIN_PROGRESS_SECONDS = 10.0


# ----------------------------------------------------------------------------
# Devices


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_devices(spec: Optional[str], workers: Optional[int] = None) -> List[str]:
    """The device of each worker: `-d 0,1,2,3` one per listed GPU, `-d all`
    one per visible GPU, one device (`-d 7`, `cpu`, default) `workers` times
    (default once). A GPU that is not there is a UsageError, as for `-d`."""
    from .cli import resolve_device

    if workers is not None and workers < 1:
        raise UsageError(f"--workers {workers}: at least 1")
    s = "" if spec is None else str(spec).strip().lower()
    if s == "all":
        import torch

        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not n_gpu:
            raise UsageError("-d all: no GPU visible (CUDA unavailable); use -d cpu --workers N")
        devices = [f"cuda:{i}" for i in range(n_gpu)]
    elif "," in s:
        parts = [p.strip() for p in s.split(",")]
        if not all(parts):
            raise UsageError(f"-d {spec}: expected a comma-separated list of GPU indices, e.g. 0,1,2,3")
        devices = [resolve_device(p) for p in parts]
    else:
        return [resolve_device(spec)] * (workers or 1)
    if workers is not None and workers != len(devices):
        raise UsageError(f"--workers {workers} with -d {spec}: one worker runs per listed device; "
                         f"leave out --workers (or list a device once per worker, e.g. -d 0,0,1,1)")
    return devices


def threads_per_worker(n_workers: int, cores: Optional[int] = None) -> int:
    """torch threads of each of `n_workers` workers sharing the cores."""
    return max(1, (cores or cpu_cores()) // n_workers)


# ----------------------------------------------------------------------------
# Inside a worker


class WorkerEvents:
    """`batch.run` hooks of one worker: events to the parent as JSON
    lines on `stream`; failure markers shared by the workers of one run."""

    def __init__(self, run_dir: Path, stream: TextIO):
        self.failed_dir = Path(run_dir) / "failed"
        self.stream = stream

    def _marker(self, name: str) -> Path:
        return self.failed_dir / hashlib.sha256(name.encode()).hexdigest()[:32]

    def _send(self, **event) -> None:
        try:
            self.stream.write(EVENT_PREFIX + json.dumps(event) + "\n")
            self.stream.flush()
        except BrokenPipeError:
            # the parent is gone: stop here (SystemExit passes the run loop's
            # per-video handler; the claim is released on the way out)
            raise SystemExit(1) from None

    def passed_over(self, name: str) -> Optional[str]:
        if self._marker(name).exists():
            return f"{name}: failed in another worker of this run"
        return None

    def started(self, name: str, folder: Path) -> None:
        self._send(event="start", name=name, folder=str(folder))

    def failing(self, name: str) -> None:
        """Mark `name` failed for this run's other workers; called while
        this worker still holds its claim, so none takes it up after."""
        self.failed_dir.mkdir(parents=True, exist_ok=True)
        self._marker(name).touch()

    def finished(self, outcome) -> None:
        if outcome.status == "failed":
            self.failing(outcome.name)
        frames = 0
        if outcome.status == "done":
            try:
                frames = int(json.loads((Path(outcome.detail) / "meta.json").read_text())["frames"]["total"])
            except (OSError, ValueError, KeyError, TypeError):
                frames = 0
        self._send(event="end", name=outcome.name, status=outcome.status, detail=outcome.detail,
                   seconds=outcome.seconds, frames=frames)


def worker_main(argv: Optional[List[str]] = None) -> int:
    """`python -m lightning_ft.workers RUN_DIR DEVICE THREADS`: the folder
    loop of the run whose config the parent left in RUN_DIR, on DEVICE."""
    run_dir, device, threads = (argv if argv is not None else sys.argv[1:])
    configure_threads()
    import torch

    torch.set_num_threads(int(threads))
    with open(Path(run_dir) / "config.pickle", "rb") as f:
        cfg, quiet = pickle.load(f)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    from .batch import run

    try:
        run(replace(cfg, device=device, progress=False), events=WorkerEvents(Path(run_dir), sys.stdout))
    except LightningFTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


# ----------------------------------------------------------------------------
# The parent


class _Worker:
    def __init__(self, index: int, device: str, proc: subprocess.Popen):
        self.index, self.device, self.proc = index, device, proc
        self.current: Optional[str] = None  # the video it is tracking
        self.open_streams = 2

    def describe(self) -> str:
        return f"worker {self.index} (pid {self.proc.pid}, {self.device})"


def _how_it_ended(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _format_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class OverallProgress:
    """One progress display over all workers: videos done / failed /
    running, frames per second, time left. A line rewritten about once a
    second on a terminal; elsewhere a plain line per finished video and at
    least every PLAIN_PROGRESS_SECONDS; nothing when disabled (-q)."""

    def __init__(self, total: int, n_workers: int, enabled: bool, stream: Optional[TextIO] = None):
        # sys.stderr when called, not when imported: the CLI's entry point replaces it
        stream = sys.stderr if stream is None else stream
        self.total, self.n_workers, self.enabled, self.stream = total, n_workers, enabled, stream
        self.done = self.failed = self.skipped = self.running = self.frames = 0
        self.busy_seconds = 0.0  # summed over the videos done
        self.t0 = time.monotonic()
        self.last_plain = self.t0
        self.bar = None
        if enabled and stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="video", file=stream, dynamic_ncols=True, leave=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} videos{postfix}")

    def seconds_left(self) -> Optional[float]:
        if not self.done:
            return None
        left = self.total - self.done - self.failed - self.skipped
        return self.busy_seconds / self.done * left / self.n_workers

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        return (f"{self.done} done, {self.failed} failed, {self.running} running"
                f"{f', {self.skipped} skipped' if self.skipped else ''} of {self.total}; "
                f"{self.frames / elapsed:.1f} frames/s; {_format_seconds(self.seconds_left())} left")

    def refresh(self, video_ended: bool = False) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = self.done + self.failed + self.skipped
            self.bar.set_postfix_str(self.line(), refresh=True)
            return
        now = time.monotonic()
        if video_ended or now - self.last_plain >= PLAIN_PROGRESS_SECONDS:
            self.last_plain = now
            print(f"progress: {self.line()}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A worker's log line, printed above the progress line."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# Which of a video's outcomes from several workers stands: a result over a
# failure over a reason it was left.
_RANK = {"done": 3, "failed": 2, "skipped": 1, "not-run": 0}


def _read_stream(worker: _Worker, kind: str, stream, events: "queue.Queue") -> None:
    for line in stream:
        events.put((worker, kind, line.rstrip("\n")))
    events.put((worker, kind, None))


def _video_list(cfg) -> List[str]:
    """The names (as `batch.run` reports them) of the videos of this run."""
    from .batch import input_videos

    if cfg.landmarks_file is not None:
        raise UsageError("--landmarks tracks one video: run it without --workers or a device list")
    videos, _ = input_videos(cfg)
    return [str(v) for v in videos]


def run_workers(cfg, devices: List[str], quiet: bool = False):
    """Track the videos of `cfg` with one worker process per entry of
    `devices`; returns one `batch.VideoOutcome` per video, in order."""
    from .batch import VideoOutcome, check_config

    cfg = check_config(cfg)  # the model chosen once, here, for every worker
    names = _video_list(cfg)
    threads = threads_per_worker(len(devices))
    run_dir = Path(tempfile.mkdtemp(prefix="lightning_ft-workers-"))
    try:
        with open(run_dir / "config.pickle", "wb") as f:
            pickle.dump((cfg, quiet), f)
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
        env["PYTHONUNBUFFERED"] = "1"
        display = OverallProgress(len(names), len(devices), enabled=cfg.progress is not False)
        outcomes: Dict[str, List] = {n: [] for n in names}
        events: "queue.Queue" = queue.Queue()
        workers = []
        for index, device in enumerate(devices):
            proc = subprocess.Popen([sys.executable, "-m", "lightning_ft.workers", str(run_dir), device, str(threads)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, bufsize=1, env=env)
            worker = _Worker(index, device, proc)
            workers.append(worker)
            for kind, stream in (("out", proc.stdout), ("err", proc.stderr)):
                threading.Thread(target=_read_stream, args=(worker, kind, stream, events), daemon=True).start()
        try:
            _follow(workers, events, outcomes, display, VideoOutcome)
        except BaseException:
            for w in workers:
                if w.proc.poll() is None:
                    w.proc.terminate()
            for w in workers:
                w.proc.wait()
            raise
        finally:
            display.close()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    merged = []
    for name in names:
        if outcomes[name]:
            merged.append(_best(outcomes[name]))
        else:
            merged.append(VideoOutcome(name, "failed", f"{name}: not run: every worker stopped before it", 0.0))
    return merged


def _best(outcomes):
    return max(outcomes, key=lambda o: _RANK.get(o.status, 0))


def _tally(display: OverallProgress, outcomes, workers) -> None:
    """Set the display's counts from each video's best outcome so far; a
    video a worker is tracking counts as running (another worker may have
    reported it as left to that one)."""
    running = {w.current for w in workers if w.current is not None}
    counts = {"done": 0, "failed": 0, "skipped": 0}
    for name, outs in outcomes.items():
        if outs and name not in running:
            status = _best(outs).status
            counts[status if status in counts else "skipped"] += 1
    display.running = len(running)
    display.done, display.failed, display.skipped = counts["done"], counts["failed"], counts["skipped"]


def _follow(workers, events, outcomes, display, VideoOutcome) -> None:
    """Read the workers' events and log lines until every worker has ended."""
    live = len(workers)
    while live:
        try:
            worker, kind, line = events.get(timeout=1.0)
        except queue.Empty:
            display.refresh()
            continue
        if line is None:
            worker.open_streams -= 1
            if worker.open_streams:
                continue
            returncode = worker.proc.wait()
            live -= 1
            how = _how_it_ended(returncode)
            if worker.current is not None:
                lost, worker.current = worker.current, None
                outcomes.setdefault(lost, []).append(VideoOutcome(
                    lost, "failed", f"{lost}: {worker.describe()} {how} while tracking it", 0.0))
                display.message(f"{worker.describe()} {how}; {lost} is lost, the others go on")
                _tally(display, outcomes, workers)
                display.refresh(video_ended=True)
            elif returncode != 0:
                display.message(f"{worker.describe()} {how}")
            continue
        if kind == "err" or not line.startswith(EVENT_PREFIX):
            if not NATIVE_NOISE.match(line.encode(errors="replace")):
                display.message(line)
            continue
        event = json.loads(line[len(EVENT_PREFIX):])
        if event["event"] == "start":
            worker.current = event["name"]
            _tally(display, outcomes, workers)
            display.refresh()
            continue
        outcome = VideoOutcome(event["name"], event["status"], event["detail"], event["seconds"])
        outcomes.setdefault(outcome.name, []).append(outcome)
        if worker.current == outcome.name:
            worker.current = None
        if outcome.status == "done":
            display.frames += event.get("frames", 0)
            display.busy_seconds += outcome.seconds
        if outcome.status in ("done", "failed") and display.enabled:
            # which worker did what: the log of a run says each video was tracked once
            display.message(f"{outcome.name}: {outcome.status} by {worker.describe()} in {outcome.seconds:.1f} s")
        _tally(display, outcomes, workers)
        display.refresh(video_ended=outcome.status in ("done", "failed"))


if __name__ == "__main__":
    sys.exit(worker_main())
