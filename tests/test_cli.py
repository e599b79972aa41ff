"""Dataset runs through the command line: result identity, bad values,
unwritable folders, full disks and concurrent processes (real files, real
failures)."""

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_ft.cli import track_main
from lightning_ft.results import is_finished, load_tracking

REPO = Path(__file__).resolve().parents[1]
CROP = "96"

torch.set_num_threads(1)


def _track(*args):
    """track_main with its table captured: (exit code, stdout)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = track_main([str(a) for a in args])
    return rc, buf.getvalue()


def _rows(stdout: str) -> dict:
    rows = {}
    for line in stdout.splitlines():
        parts = line.split(None, 3)
        if len(parts) >= 2 and parts[1] in ("done", "skipped", "failed", "claimed", "not-run"):
            rows[parts[0]] = (parts[1], parts[3] if len(parts) > 3 else "")
    return rows


@pytest.fixture(scope="module")
def four_cars(tmp_path_factory):
    """car.mp4, car.avi, car.mkv, car.mov: four different carphone excerpts
    (6-9 frames), each in the container its suffix names."""
    from lightning_ft.synthetic.clips import carphone_path, write_excerpt

    data = tmp_path_factory.mktemp("cars") / "data"
    for n, suffix in enumerate((".mp4", ".avi", ".mkv", ".mov")):
        write_excerpt(carphone_path(), data / f"car{suffix}", n_frames=6 + n)
    return data


@pytest.fixture(scope="module")
def cars_run(four_cars, assets_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cars_out") / "out"
    rc, stdout = _track("--data", four_cars, "--assets", assets_dir, "--no-emoca", "--out", out, "--image-size",
                        CROP, "-q", "-d", "cpu")
    return rc, stdout, out


def test_four_files_with_one_stem_give_four_results(four_cars, cars_run):
    rc, stdout, out = cars_run
    assert rc == 0, stdout
    assert "4 done, 0 skipped, 0 failed" in stdout
    for n, suffix in enumerate((".mp4", ".avi", ".mkv", ".mov")):
        folder = out / f"car{suffix}"
        assert is_finished(folder)
        assert len(load_tracking(folder).track.frame_ids) == 6 + n
        meta = json.loads((folder / "meta.json").read_text())
        source = meta["sources"]["video"]
        assert source["path"] == str((four_cars / f"car{suffix}").resolve())
        assert source["size"] == (four_cars / f"car{suffix}").stat().st_size
        assert len(source["head_tail_sha256"]) == 64 and meta["result_settings"]["image_size"] == int(CROP)


def test_rerun_skips_only_the_same_source_and_settings(four_cars, cars_run, assets_dir, tmp_path):
    rc, _, out = cars_run
    assert rc == 0
    base = ["--data", four_cars, "--assets", assets_dir, "--no-emoca", "--out", out, "-q", "-d", "cpu"]
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/meta.json")}
    rc, stdout = _track(*base, "--image-size", CROP)
    assert rc == 0 and "0 done, 4 skipped" in stdout
    # other settings: kept, and the line says what differs and how to redo it
    rc, stdout = _track(*base, "--image-size", "64")
    rows = _rows(stdout)
    assert rc == 0 and len(rows) == 4
    for status, detail in rows.values():
        assert status == "skipped" and f"image_size {CROP} -> 64" in detail and "--overwrite" in detail
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/meta.json")} == stamps
    # another video under the same name is not taken for the one tracked
    moved = tmp_path / "data"
    moved.mkdir()
    (moved / "car.mp4").write_bytes((four_cars / "car.avi").read_bytes())
    (moved / "car.mov").write_bytes((four_cars / "car.mp4").read_bytes())
    (moved / "car.avi").write_bytes((four_cars / "car.avi").read_bytes())  # a copy: same content
    rc, stdout = _track(*(["--data", moved] + base[2:]), "--image-size", CROP)
    rows = _rows(stdout)
    assert rows[str(moved / "car.avi")][0] == "skipped" and "finished result in" in rows[str(moved / "car.avi")][1]
    for name in ("car.mp4", "car.mov"):
        status, detail = rows[str(moved / name)]
        assert status == "skipped" and "its video was" in detail and str((moved / name).resolve()) in detail


# ----------------------------------------------------------------------------
# Full disks


_TRACK = "import sys; from lightning_ft.cli import track_main; sys.exit(track_main(sys.argv[1:]))"


def _track_process(args, file_size_limit=None, timeout=120):
    """The CLI in a child process (optionally under a real file-size limit,
    RLIMIT_FSIZE: writes past it fail with EFBIG); (returncode, stdout,
    stderr, seconds)."""
    import resource

    def limit():
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _TRACK, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=limit)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0


def _leftovers(folder: Path) -> list:
    """Temporary files and folders a run must never leave behind."""
    return [p for p in folder.rglob("*") if ".partial-" in p.name or ".tmp-" in p.name]


@pytest.fixture(scope="module")
def two_clips(tmp_path_factory):
    from lightning_ft.synthetic.clips import carphone_path, write_excerpt

    data = tmp_path_factory.mktemp("two") / "data"
    write_excerpt(carphone_path(), data / "a.mp4", n_frames=20)
    write_excerpt(carphone_path(), data / "b.mp4", n_frames=8)
    return data


def test_full_disk_during_the_frame_cache_ends_the_batch_within_a_minute(two_clips, assets_dir, tmp_path):
    """A 20-frame clip's cache is one LMDB commit, which used to fail after
    the writer thread had taken its end marker: the run hung for ever."""
    out = tmp_path / "out"
    rc, stdout, stderr, seconds = _track_process(
        ["--data", two_clips, "--assets", assets_dir, "--no-emoca", "--out", out, "--image-size", "128", "-q",
         "-d", "cpu"], file_size_limit=32 << 10, timeout=60)
    assert seconds < 60
    assert rc == 6, stderr
    assert "Traceback" not in stderr
    rows = _rows(stdout)
    assert rows[str(two_clips / "a.mp4")][0] == "failed" and rows[str(two_clips / "b.mp4")][0] == "not-run"
    assert "file size limit" in rows[str(two_clips / "a.mp4")][1]
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and "1 video(s) not run" in stopped[0]
    assert _leftovers(out) == [] and not list(out.glob("*/meta.json"))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs: a real full disk (needs mount rights, as root in CI)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_while_writing_the_result(two_clips, assets_dir, tmp_path, small_tmpfs):
    rc, stdout, stderr, seconds = _track_process(
        ["--data", two_clips, "--assets", assets_dir, "--no-emoca", "--out", small_tmpfs, "--cache",
         tmp_path / "cache", "--image-size", "128", "-q", "-d", "cpu"], timeout=60)
    assert rc == 6 and "Traceback" not in stderr, stderr
    assert "no space left on device" in _rows(stdout)[str(two_clips / "a.mp4")][1]
    assert list(small_tmpfs.rglob("*")) == []


# ----------------------------------------------------------------------------
# Bad values and unwritable folders


@pytest.mark.parametrize("flag,value", [("--fps", "nan"), ("--fps", "0"), ("--fps", "-5"), ("--fps", "inf"),
                                        ("--image-size", "100000"), ("--image-size", "8"), ("--shard", "1/1/1")])
def test_bad_values_are_one_line_and_exit_2(flag, value, two_clips, assets_dir, tmp_path, capsys):
    rc = track_main(["--data", str(two_clips), "--assets", str(assets_dir), "--no-emoca", "--out",
                     str(tmp_path / "out"), flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and flag in err and value in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _unwritable_folders(tmp_path):
    """Folders root cannot write either: below a regular file (always), and
    an immutable folder (chattr +i) where the filesystem supports it."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    yield "below a file", blocker / "out"
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    if subprocess.run(["chattr", "+i", str(frozen)], capture_output=True).returncode == 0:
        try:
            yield "immutable", frozen
        finally:
            subprocess.run(["chattr", "-i", str(frozen)], check=True)


@pytest.mark.parametrize("which", ["--out", "--cache"])
def test_unwritable_output_or_cache_is_reported_before_work(which, two_clips, assets_dir, tmp_path, capsys):
    tried = 0
    for kind, folder in _unwritable_folders(tmp_path):
        out = folder if which == "--out" else tmp_path / "out"
        extra = ["--cache", str(folder)] if which == "--cache" else []
        t0 = time.monotonic()
        rc = track_main(["--data", str(two_clips), "--assets", str(assets_dir), "--no-emoca", "--out", str(out),
                         "-q", *extra])
        err = capsys.readouterr().err
        assert rc == 2, (kind, err)
        assert err.count("\n") == 1 and which in err and str(folder) in err and "Traceback" not in err, kind
        assert time.monotonic() - t0 < 5, "it must fail before loading models or decoding"
        tried += 1
    assert tried >= 1


def test_landmarks_must_have_the_video_frame_count(two_clips, assets_dir, tmp_path, capsys):
    lm = tmp_path / "lm.npz"
    np.savez(lm, lmk68=np.zeros((25, 68, 2)), lmk_dense=np.zeros((25, 478, 2)), image_size=np.array([144, 176]))
    rc = track_main(["--data", str(two_clips / "a.mp4"), "--landmarks", str(lm), "--assets", str(assets_dir),
                     "--no-emoca", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "25 frames" in err and "has 20" in err and err.count("\n") == 1
    assert not list((tmp_path / "out").glob("*/meta.json")) if (tmp_path / "out").exists() else True


def test_one_list_of_video_suffixes_for_files_and_folders(tmp_path, assets_dir, capsys):
    """A .gif is found in a folder as it is accepted alone; a file with
    another suffix is refused alone as it is passed over in a folder."""
    import av

    from lightning_ft.batch import VIDEO_SUFFIXES, find_videos

    gif = tmp_path / "data" / "anim.gif"
    gif.parent.mkdir()
    with av.open(str(gif), "w", format="gif") as c:
        s = c.add_stream("gif", rate=10)
        s.width, s.height, s.pix_fmt = 32, 32, "rgb8"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 60 * i, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    (tmp_path / "data" / "notes.txt").write_text("not a video")
    assert ".gif" in VIDEO_SUFFIXES
    assert find_videos(tmp_path / "data") == [gif] and find_videos(gif) == [gif]
    from lightning_ft.video import count_frames

    assert count_frames(gif) == 3  # PyAV decodes it
    rc = track_main(["--data", str(tmp_path / "data" / "notes.txt"), "--assets", str(assets_dir), "--no-emoca",
                     "--out", str(tmp_path / "out")])
    assert rc == 2 and "not a video file suffix" in capsys.readouterr().err


def test_fps_above_the_source_rate_is_capped_and_said(two_clips, assets_dir, tmp_path, caplog):
    rc, stdout = _track("--data", two_clips / "b.mp4", "--assets", assets_dir, "--no-emoca", "--out",
                        tmp_path / "out", "--image-size", CROP, "--fps", "1000", "-q", "-d", "cpu")
    assert rc == 0, stdout
    said = [r.getMessage() for r in caplog.records if "--fps 1000" in r.getMessage()]
    assert len(said) == 1 and "b.mp4" in said[0] and "29.970" in said[0]
    meta = json.loads((tmp_path / "out" / "b" / "meta.json").read_text())
    assert abs(meta["video"]["fps"] - 29.97) < 0.01 and meta["video"]["fps_requested"] == 1000
    assert abs(float(load_tracking(tmp_path / "out" / "b").track.fps) - 29.97) < 0.01


# ----------------------------------------------------------------------------
# Concurrent and killed runs


def _start(args):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", _TRACK, *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_concurrent_runs_track_each_video_once(four_cars, assets_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--data", four_cars, "--assets", assets_dir, "--no-emoca", "--out", out, "--image-size", CROP, "-q",
            "-d", "cpu"]
    procs = [_start(args) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    rows = [_rows(stdout) for stdout, _ in results]
    for video in sorted(four_cars.iterdir()):
        statuses = sorted(r[str(video)][0] for r in rows)
        assert statuses == ["done", "skipped"], (video, rows)
        assert is_finished(out / video.name)
    assert not list(out.glob(".*.claim")) and _leftovers(out) == []


def test_killed_run_rerun_finishes_only_what_is_missing(four_cars, assets_dir, tmp_path):
    """SIGKILL a folder run once its first result is finished: the rerun
    takes over the dead process's claim, skips the finished result and
    tracks the rest."""
    out = tmp_path / "out"
    args = ["--data", four_cars, "--assets", assets_dir, "--no-emoca", "--out", out, "--image-size", CROP, "-q",
            "-d", "cpu"]
    proc = _start(args)
    deadline = time.monotonic() + 300
    while not list(out.glob("*/meta.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    first = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/meta.json")}
    assert 1 <= len(first) < 4 and len(list(out.glob(".*.claim"))) <= 1, first
    rc, stdout = _track(*args)
    rows = _rows(stdout)
    assert rc == 0 and f"{4 - len(first)} done, {len(first)} skipped" in stdout, stdout
    for name, stamp in first.items():
        assert rows[str(four_cars / name)][0] == "skipped"
        assert (out / name / "meta.json").stat().st_mtime_ns == stamp
    assert len(list(out.glob("*/meta.json"))) == 4 and not list(out.glob(".*.claim")) and _leftovers(out) == []


def test_a_rerun_on_the_frame_cache_fits_the_same_landmarks_and_focal(two_clips, assets_dir, tmp_path):
    """The first run detects on the crops as they are cut, a rerun finds the
    JPEG frame cache: it must fit the first run's points, so the same video
    with the same settings gives the same camera."""
    import numpy as np

    out = tmp_path / "out"
    args = ["--data", two_clips / "a.mp4", "--assets", assets_dir, "--no-emoca", "--out", out, "--image-size",
            CROP, "-q", "-d", "cpu"]
    results = []
    for extra in ([], ["--overwrite"]):
        rc, stdout = _track(*args, *extra)
        assert rc == 0, stdout
        with np.load(out / "a" / "tracking.npz") as d:
            results.append({k: d[k] for k in ("lmk68", "lmk_dense", "focal_length")})
    assert len(list((out / ".cache").glob("*.lmdb"))) == 1, "the rerun read the first run's frame cache"
    np.testing.assert_array_equal(results[0]["lmk68"], results[1]["lmk68"])
    np.testing.assert_array_equal(results[0]["lmk_dense"], results[1]["lmk_dense"])
    np.testing.assert_allclose(results[0]["focal_length"], results[1]["focal_length"], rtol=1e-3)


# ----------------------------------------------------------------------------
# Messages


def test_messages_name_the_video_and_the_final_path(two_clips, assets_dir, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="lightning_ft")
    rc, stdout = _track("--data", two_clips / "b.mp4", "--assets", assets_dir, "--no-emoca", "--out",
                        tmp_path / "out", "--image-size", "64", "-v", "-d", "cpu")
    assert rc == 0, stdout
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if ".partial-" in m], messages
    wrote = [m for m in messages if "visualization.mp4" in m]
    assert wrote == [f"{two_clips / 'b.mp4'}: wrote {tmp_path / 'out' / 'b' / 'visualization.mp4'}"]
    assert (tmp_path / "out" / "b" / "visualization.mp4").is_file()
    for m in messages:
        if "focal length" in m or "poor fit" in m:
            assert m.startswith(str(two_clips / "b.mp4")), m


def test_third_party_log_noise_is_silenced_and_q_hides_advice(two_clips, assets_dir, tmp_path):
    """A real run of the command in its own process (mediapipe writes its
    W0000 lines to file descriptor 2, below Python)."""
    args = ["--data", two_clips / "b.mp4", "--assets", assets_dir, "--no-emoca", "--image-size", "64", "-d", "cpu"]
    rc, _, stderr, _ = _track_process(args + ["--out", tmp_path / "loud"], timeout=300)
    assert rc == 0, stderr
    assert "68-point landmarks" in stderr  # our own messages still come through
    assert not [line for line in stderr.splitlines() if line[:5] in ("W0000", "I0000") or "TensorFlow Lite" in line
                or "absl::InitializeLog" in line], stderr
    # carphone's far face leaves the focal weakly determined: advice that -q hides
    assert "b.mp4: focal length" in stderr and "weakly determined" in stderr
    rc, _, quiet, _ = _track_process(args + ["--out", tmp_path / "quiet", "-q"], timeout=300)
    assert rc == 0 and "weakly determined" not in quiet, quiet


def test_assets_check_prints_the_absolute_path(assets_dir, tmp_path, capsys, monkeypatch):
    from lightning_ft.cli import main

    monkeypatch.chdir(assets_dir.parent)
    main(["assets", "check", "--assets", assets_dir.name])
    assert capsys.readouterr().out.splitlines()[0] == f"assets in {assets_dir.resolve()}"


def test_stage_bars_show_on_a_terminal(capsys):
    from lightning_ft.progress import elapsed_bar

    with elapsed_bar("clip.mp4: fitting", enabled=True, every=0.05):
        time.sleep(0.2)
    assert "clip.mp4: fitting" in capsys.readouterr().err
    with elapsed_bar("clip.mp4: calibration", enabled=False):
        pass
    assert capsys.readouterr().err == ""


def test_an_output_folder_inside_the_data_folder_is_not_read_as_input(two_clips, assets_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(two_clips / "b.mp4", data / "b.mp4")
    out = data / "results"
    args = ["--data", data, "--assets", assets_dir, "--no-emoca", "--out", out, "--image-size", "64", "-q", "-d",
            "cpu", "-v"]
    rc, stdout = _track(*args)
    assert rc == 0 and (out / "b" / "visualization.mp4").is_file(), stdout
    rc, stdout = _track(*args)
    # one video, skipped: the result's visualization.mp4 was not taken for a second input
    assert rc == 0 and stdout.startswith(f"{data / 'b.mp4'}: skipped") and stdout.count("\n") == 1, stdout
