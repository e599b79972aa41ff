"""Result identity: folder names, source records and what makes a result reusable."""

import json
import os

import numpy as np

from lightning_ft.output import (HASH_SPAN, TRACKING_KEYS, result_differences, same_source, source_identity,
                                 write_result)
from lightning_ft.pipeline import RESULT_SETTINGS, TrackConfig, result_names, result_settings, settings_fingerprint


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


def test_source_identity_follows_the_content_not_the_mtime(tmp_path):
    video = tmp_path / "v.mp4"
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 3 * HASH_SPAN, dtype=np.uint8).tobytes()
    video.write_bytes(data)
    first = source_identity(video)
    assert first["size"] == len(data) and first["path"] == str(video.resolve())
    os.utime(video, ns=(1, 1))  # a copy with another mtime is the same video
    assert same_source(first, source_identity(video))
    for where in (10, len(data) - 10):  # a changed byte at either end is another video
        changed = bytearray(data)
        changed[where] ^= 0xFF
        video.write_bytes(bytes(changed))
        assert not same_source(first, source_identity(video))
    video.write_bytes(data + b"\0")  # so is a longer file
    assert not same_source(first, source_identity(video))


def test_result_differences_name_the_source_and_the_settings(tmp_path):
    video, other = tmp_path / "a.mp4", tmp_path / "b.mp4"
    video.write_bytes(b"first video")
    other.write_bytes(b"another video")
    cfg = TrackConfig(data=video, out_dir=tmp_path / "out", assets_dir=tmp_path)
    settings = result_settings(cfg)
    assert set(settings) == set(RESULT_SETTINGS)
    folder = tmp_path / "out" / "a"
    assert result_differences(folder, {"video": source_identity(video)}, settings) is None
    write_result(folder, {k: np.zeros(1) for k in TRACKING_KEYS},
                 {"sources": {"video": source_identity(video)}, "result_settings": settings})
    assert result_differences(folder, {"video": source_identity(video)}, settings) == []
    reasons = result_differences(folder, {"video": source_identity(other)}, settings)
    assert len(reasons) == 1 and str(other.resolve()) in reasons[0]
    cfg.image_size, cfg.visualize = 256, True
    changed = result_settings(cfg)
    assert settings_fingerprint(changed) != settings_fingerprint(settings)
    reasons = result_differences(folder, {"video": source_identity(video)}, changed)
    assert reasons == ["settings differ: image_size 512 -> 256, visualize False -> True"]
    # a result written before sources were recorded is never taken for this video's
    legacy = tmp_path / "out" / "legacy"
    write_result(legacy, {k: np.zeros(1) for k in TRACKING_KEYS}, {})
    assert "older version" in result_differences(legacy, {"video": source_identity(video)}, settings)[0]
    assert json.loads((folder / "meta.json").read_text())["complete"]
