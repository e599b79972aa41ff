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
from lightning_ft.output import is_finished, load_tracking

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
        assert len(load_tracking(folder)["frame_ids"]) == 6 + n
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
