"""Worker processes over one folder (`--workers N`, `-d 0,1,2,3`): real
child processes on real clips, a real SIGKILL."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_ft.errors import UsageError
from lightning_ft.synthetic import clips
from lightning_ft.workers import OverallProgress, resolve_devices, threads_per_worker

REPO = Path(__file__).resolve().parents[1]
CLIP_FRAMES, CROP = 16, 128
N_CLIPS = 4


def _track(*args, wait: bool = True, log: Path = None):
    """The CLI in a child process (as a user runs it): rc, stdout, stderr."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "track_lightning.py"), *map(str, args), "--no-emoca", "--image-size", str(CROP)]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log.with_suffix(".out"), "w"),
                                stderr=open(log.with_suffix(".err"), "w"), text=True)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return done.returncode, done.stdout, done.stderr


def _rows(stdout: str) -> dict:
    """Summary table rows: video path -> (status, detail)."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split(None, 3)
        if len(parts) >= 3 and parts[1] in ("done", "skipped", "failed", "not-run"):
            rows[parts[0]] = (parts[1], parts[3] if len(parts) > 3 else "")
    return rows


def _tracked_by(stderr: str) -> dict:
    """Video -> the workers that reported finishing it (done or failed)."""
    out = {}
    for m in re.finditer(r"^(\S+): (done|failed) by worker (\d+) ", stderr, re.M):
        out.setdefault(m.group(1), []).append((m.group(2), int(m.group(3))))
    return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("worker_clip")
    return clips.write_excerpt(clips.carphone_path(), d / "clip.mp4", n_frames=CLIP_FRAMES)


def _folder(root: Path, clip: Path, n: int = N_CLIPS) -> list:
    videos = []
    for i in range(n):
        video = root / f"clip{i}.mp4"
        video.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(clip, video)
        videos.append(video)
    return videos


# ----------------------------------------------------------------------------
# Device lists


def test_device_lists_resolve_like_a_single_device_and_refuse_missing_gpus():
    assert resolve_devices("cpu") == ["cpu"]
    assert resolve_devices("cpu", 3) == ["cpu"] * 3
    assert resolve_devices("cpu,cpu") == ["cpu", "cpu"]
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(UsageError, match=f"GPU {n_gpu} is not available"):
        resolve_devices(",".join(str(i) for i in range(n_gpu + 1)))
    if n_gpu == 0:
        with pytest.raises(UsageError, match="-d all: no GPU visible"):
            resolve_devices("all")
    for bad in ("0,,1", "cpu,"):
        with pytest.raises(UsageError, match="comma-separated"):
            resolve_devices(bad)
    with pytest.raises(UsageError, match="--workers 0"):
        resolve_devices("cpu", 0)
    with pytest.raises(UsageError, match="one worker runs per listed device"):
        resolve_devices("cpu,cpu", 3)


def test_gpu_lists_with_four_gpus_visible(monkeypatch):
    # the device count is what the CUDA driver would say on a 4-GPU node
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_devices("0,1,2,3") == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert resolve_devices("all") == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert resolve_devices("3,cuda:1") == ["cuda:3", "cuda:1"]
    assert resolve_devices("2") == ["cuda:2"]
    assert resolve_devices("1", 2) == ["cuda:1", "cuda:1"]
    with pytest.raises(UsageError, match="GPU 4 is not available, 4 GPU"):
        resolve_devices("0,4")


def test_threads_share_the_cores():
    assert threads_per_worker(1, cores=16) == 16
    assert threads_per_worker(4, cores=16) == 4
    assert threads_per_worker(3, cores=2) == 1


def test_plain_progress_is_a_line_per_finished_video_with_the_time_left():
    buf = io.StringIO()  # not a terminal
    display = OverallProgress(total=6, n_workers=2, enabled=True, stream=buf)
    display.refresh()
    assert buf.getvalue() == ""  # nothing ended, under PLAIN_PROGRESS_SECONDS
    display.done, display.failed, display.running, display.frames, display.busy_seconds = 2, 1, 2, 100, 20.0
    display.refresh(video_ended=True)
    line = buf.getvalue().strip()
    # 10 s per video, 3 videos left over 2 workers
    assert line.startswith("progress: 2 done, 1 failed, 2 running of 6; ") and line.endswith("; 0:00:15 left")
    quiet = io.StringIO()
    OverallProgress(total=6, n_workers=2, enabled=False, stream=quiet).refresh(video_ended=True)
    assert quiet.getvalue() == ""


# ----------------------------------------------------------------------------
# Real workers


@pytest.fixture(scope="module")
def two_workers_run(tmp_path_factory, clip, assets_dir):
    root = tmp_path_factory.mktemp("workers_run")
    videos = _folder(root / "videos", clip)
    broken = clips.write_truncated(clip, root / "videos" / "broken.mp4", keep_fraction=0.3)
    out = root / "out"
    rc, stdout, stderr = _track("--data", root / "videos", "--assets", assets_dir, "--out", out,
                                "-d", "cpu", "--workers", "2")
    return rc, stdout, stderr, videos, broken, out


def test_two_workers_track_every_video_once(two_workers_run):
    rc, stdout, stderr, videos, broken, out = two_workers_run
    assert rc == 1, stderr[-3000:]  # the broken video failed
    rows = _rows(stdout)
    assert {Path(v).name: rows[str(v)][0] for v in videos} == {v.name: "done" for v in videos}, stdout
    assert rows[str(broken)][0] == "failed"
    tracked = _tracked_by(stderr)
    for v in videos:
        assert [s for s, _ in tracked[str(v)]] == ["done"], (v, tracked)
        meta = json.loads((out / v.stem / "meta.json").read_text())
        assert meta["frames"]["total"] == CLIP_FRAMES
        assert meta["settings"]["device"] == "cpu"
    # a video one worker failed is not tried again by the other
    assert tracked[str(broken)] == [("failed", tracked[str(broken)][0][1])]
    assert not list(out.glob(".*.claim*")), "claims left behind"
    # one overall display: a plain line per finished video on a non-terminal
    assert f"progress: {N_CLIPS} done, 1 failed, 0 running of {N_CLIPS + 1}" in stderr


def _wait_for_claims(out: Path, n: int, proc, timeout: float = 600.0) -> dict:
    """Result name -> claim content, once `n` claims are held at once."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        held = {}
        for path in out.glob(".*.claim"):
            try:
                held[path.name[1:-len(".claim")]] = json.loads(path.read_text())
            except (OSError, ValueError):
                pass
        if len(held) >= n:
            return held
        assert proc.poll() is None, "the run ended before two workers were busy"
        time.sleep(0.02)
    raise AssertionError(f"never {n} claims at once")


@pytest.fixture(scope="module")
def killed_worker_run(tmp_path_factory, clip, assets_dir):
    root = tmp_path_factory.mktemp("killed_worker")
    videos = _folder(root / "videos", clip)
    out = root / "out"
    proc = _track("--data", root / "videos", "--assets", assets_dir, "--out", out, "-d", "cpu", "--workers", "2",
                  wait=False, log=root / "first")
    try:
        held = _wait_for_claims(out, 2, proc)
        # the worker on the earlier video: the other one has passed it, so it is lost to this run
        victim = min(held)
        os.kill(held[victim]["pid"], signal.SIGKILL)
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = (rc, (root / "first.out").read_text(), (root / "first.err").read_text())
    mtimes = {v.stem: (out / v.stem / "meta.json").stat().st_mtime_ns for v in videos
              if (out / v.stem / "meta.json").exists()}
    second = _track("--data", root / "videos", "--assets", assets_dir, "--out", out, "-d", "cpu", "--workers", "2",
                    "-q")
    return videos, out, victim, first, mtimes, second


def test_a_killed_worker_loses_only_its_video_and_a_rerun_does_only_that(killed_worker_run):
    videos, out, victim, (rc, stdout, stderr), mtimes, (rc2, stdout2, stderr2) = killed_worker_run
    assert rc == 1, stderr[-3000:]
    rows = _rows(stdout)
    lost = str(next(v for v in videos if v.stem == victim))
    assert rows[lost][0] == "failed" and "killed by SIGKILL" in rows[lost][1], stdout
    assert {v: s for v, (s, _) in rows.items() if v != lost} == {str(v): "done" for v in videos if str(v) != lost}
    assert sorted(mtimes) == sorted(v.stem for v in videos if str(v) != lost)
    # the rerun: the dead worker's claim is stale (its pid is gone), the finished three are left as they are
    assert rc2 == 0, stderr2[-3000:]
    rows2 = _rows(stdout2)
    assert rows2[lost][0] == "done"
    assert {v: s for v, (s, _) in rows2.items() if v != lost} == {str(v): "skipped" for v in videos
                                                                  if str(v) != lost}
    for stem, mtime in mtimes.items():
        assert (out / stem / "meta.json").stat().st_mtime_ns == mtime
    assert json.loads((out / victim / "meta.json").read_text())["frames"]["total"] == CLIP_FRAMES
    assert "progress:" not in stderr2  # -q
    assert not list(out.glob(".*.claim*"))


def test_workers_pass_over_a_video_another_live_process_holds(tmp_path, clip, assets_dir):
    from lightning_ft.claims import claim

    videos = _folder(tmp_path / "videos", clip, n=3)
    out = tmp_path / "out"
    with claim(out / videos[0].stem) as held:  # this test process: alive for the whole run
        assert held
        rc, stdout, stderr = _track("--data", tmp_path / "videos", "--assets", assets_dir, "--out", out,
                                    "-d", "cpu", "--workers", "2")
    assert rc == 0, stderr[-3000:]
    rows = _rows(stdout)
    assert rows[str(videos[0])][0] == "skipped" and f"pid {os.getpid()}" in rows[str(videos[0])][1]
    assert {v: rows[str(v)][0] for v in videos[1:]} == {v: "done" for v in videos[1:]}
    assert not (out / videos[0].stem).exists()
    assert str(videos[0]) not in _tracked_by(stderr)
