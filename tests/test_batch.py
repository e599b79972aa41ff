"""The folder run (lightning_ft/batch.py): settings checked before any work,
shards, result names, and the one-line errors of each."""

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from lightning_ft.batch import find_videos, parse_shard, result_names, run, select_shard
from lightning_ft.cli import track_main
from lightning_ft.errors import UsageError
from lightning_ft.pipeline import TrackConfig
from lightning_ft.synthetic import clips


# ----------------------------------------------------------------------------
# Settings checked before any work


def test_run_without_assets_stops_before_work(capsys, tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not looked at")
    rc = track_main(["--data", str(video), "--assets", str(tmp_path / "assets"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 3
    assert "generic_model.pkl" in err and "--no-emoca" in err
    assert not (tmp_path / "out").exists()


def test_unknown_export_format_is_refused_before_work(tmp_path, assets_dir, capsys):
    lm = tmp_path / "lm.npz"
    np.savez(lm, lmk68=np.zeros((2, 68, 2)), lmk_dense=np.zeros((2, 478, 2)), image_size=np.array([64, 64]))
    rc = track_main(["--landmarks", str(lm), "--no-emoca", "--assets", str(assets_dir), "--out",
                     str(tmp_path / "out"), "--export", "blender"])
    assert rc == 2 and "blender" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({"fps": -5.0}, "--fps -5.0: a positive frame rate"),
    ({"image_size": 32}, "--image-size 32: choose 64 to 4096 pixels"),
    ({"export": ["vhap", "obj"]}, "--export obj: unknown format"),
    ({"fov_deg": 0.5}, "--fov 0.5: must be a horizontal field of view"),
    ({"data": Path("/nonexistent/clip.mp4")}, "/nonexistent/clip.mp4: no such file or folder"),
])
def test_the_python_api_gets_the_clis_checks(tmp_path, change, message):
    """batch.run checks its settings itself (check_config), so a script that
    builds a TrackConfig gets the one-line errors the CLI gives, before any work."""
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not read: the check comes first")
    cfg = TrackConfig(data=video, out_dir=tmp_path / "out", assets_dir=tmp_path / "assets", model="ict")
    with pytest.raises(UsageError, match=re.escape(message)):
        run(replace(cfg, **change))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------
# Shards and result names


def test_bad_shard_is_a_usage_error(capsys, tmp_path, assets_dir):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "a.mp4").write_bytes(b"x")
    rc = track_main(["--data", str(tmp_path / "v"), "--assets", str(assets_dir), "--no-emoca", "--shard", "3/2"])
    assert rc == 2 and "--shard" in capsys.readouterr().err


def test_result_names_mirror_the_folder_and_keep_the_suffix_where_stems_collide(tmp_path):
    root = tmp_path / "data"
    files = ["car.mp4", "car.avi", "car.MKV", "car.mov", "solo.mp4", "a.mp4", "a/clip.mp4", "b/clip.mp4",
             "b/deep/x.webm"]
    videos = [root / f for f in files]
    names = dict(zip(files, result_names(videos, root)))
    assert [names[f] for f in ("car.mp4", "car.avi", "car.MKV", "car.mov")] == ["car.mp4", "car.avi", "car.MKV",
                                                                                "car.mov"]
    assert names["solo.mp4"] == "solo"  # a flat folder keeps the stem
    assert names["a/clip.mp4"] == "a/clip" and names["b/clip.mp4"] == "b/clip" and names["b/deep/x.webm"] == "b/deep/x"
    assert names["a.mp4"] == "a.mp4"  # its stem is the folder of a/clip's result
    assert len(set(n.casefold() for n in names.values())) == len(files)
    # a single file keeps its stem, as before
    assert result_names([tmp_path / "clip.mp4"], None) == ["clip"]


# ----------------------------------------------------------------------------
# --shard auto


def _slurm(monkeypatch, task_id, count, first, step=None, last=None):
    """The variables Slurm sets in an array task (None: not set)."""
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP",
                 "SLURM_ARRAY_TASK_MAX"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (("SLURM_ARRAY_TASK_ID", task_id), ("SLURM_ARRAY_TASK_COUNT", count),
                        ("SLURM_ARRAY_TASK_MIN", first), ("SLURM_ARRAY_TASK_STEP", step),
                        ("SLURM_ARRAY_TASK_MAX", last)):
        if value is not None:
            monkeypatch.setenv(name, str(value))


@pytest.mark.parametrize("first,step", [(0, None), (1, None), (10, 1), (0, 3)])
def test_shard_auto_partitions_the_videos_over_an_array(monkeypatch, tmp_path, first, step):
    for k in range(7):
        clips.write_empty(tmp_path / f"part{k % 2}" / f"v{k}.mp4")
    videos = find_videos(tmp_path)
    n = 3
    seen = []
    for task in range(n):
        _slurm(monkeypatch, first + task * (step or 1), n, first, step, last=first + (n - 1) * (step or 1))
        assert parse_shard("auto") == (task, n)
        seen.append(select_shard(videos, parse_shard("auto")))
    assert sorted(v for s in seen for v in s) == videos
    assert sum(len(s) for s in seen) == len(videos)


def test_shard_auto_without_slurm_is_one_line(monkeypatch, capsys, tmp_path):
    _slurm(monkeypatch, None, None, None)
    with pytest.raises(UsageError, match="SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT, SLURM_ARRAY_TASK_MIN"):
        parse_shard("auto")
    _slurm(monkeypatch, 5, 3, 1)  # --array=1,5,7: not evenly spaced
    with pytest.raises(UsageError, match="not evenly spaced"):
        parse_shard("auto")
    _slurm(monkeypatch, 3, 2, 3, last=17)  # --array=3,17: task 3 alone looks like shard 0/2
    with pytest.raises(UsageError, match="not evenly spaced"):
        parse_shard("auto")
    _slurm(monkeypatch, "x", 3, 0)
    with pytest.raises(UsageError, match="not integers"):
        parse_shard("auto")
    _slurm(monkeypatch, None, None, None)
    clips.write_empty(tmp_path / "v.mp4")
    rc = track_main(["--data", str(tmp_path), "--shard", "auto", "--out", str(tmp_path / "out"), "-d", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == UsageError.exit_code and err.count("\n") == 0 and "SLURM_ARRAY_TASK_ID" in err
