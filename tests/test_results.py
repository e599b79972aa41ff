"""The results module: tracking.npz and meta.json written and read back,
their validation, and result identity (folder names, source records and what
makes a result reusable)."""

import json
import os

import numpy as np
import pytest

from lightning_ft.results import (HASH_SPAN, TRACKING_KEYS, ResultFileError, is_finished, load_tracking,
                                  result_differences, same_source, source_identity, write_result)
from lightning_ft.pipeline import RESULT_SETTINGS, TrackConfig, result_settings, settings_fingerprint
from lightning_ft.track import Camera, Track


def make_track(T=6, n_exp=4, n_shape=5, seed=0):
    """A Track and Camera of the documented shapes and stored dtypes."""
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    track = Track(frame_ids=np.arange(T, dtype=np.int64) * 2, valid=rng.uniform(size=T) > 0.2, shape=f32(n_shape),
                  expression=f32(T, n_exp), jaw_pose=f32(T, 3), neck_pose=np.zeros((T, 3), np.float32),
                  eye_pose=f32(T, 6), rotation=f32(T, 3, 3), translation=f32(T, 3), crop_boxes=f32(T, 4),
                  lmk68=f32(T, 68, 2), lmk_dense=f32(T, 478, 2), fps=np.float32(29.97),
                  reprojection_error_68_px=f32(T))
    camera = Camera(focal_length=np.array([800.0, 800.0], np.float32),
                    principal_point=np.array([255.5, 255.5], np.float32), image_size=np.array([512, 512], np.int64))
    return track, camera


def test_write_then_load_gives_the_same_track_camera_and_meta(tmp_path):
    track, camera = make_track()
    write_result(tmp_path / "clip", track, camera, {"quality": {"mean_error_68_px": 1.5}})
    loaded = load_tracking(tmp_path / "clip")
    for name, value in {**track.arrays(), **camera.arrays()}.items():
        got = getattr(loaded.camera if name in camera.arrays() else loaded.track, name)
        assert got.dtype == np.asarray(value).dtype and np.array_equal(got, value), name
    assert loaded.track.reprojection_error_dense_px is None and loaded.track.texture is None
    assert loaded.meta == {"quality": {"mean_error_68_px": 1.5}, "complete": True}
    with np.load(tmp_path / "clip" / "tracking.npz") as z:
        assert set(z.files) == set(TRACKING_KEYS) | {"reprojection_error_68_px"}


def test_write_result_is_atomic(tmp_path):
    track, camera = make_track()

    def boom(folder):
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        write_result(tmp_path / "clip", track, camera, {}, extra=boom)
    assert not (tmp_path / "clip").exists()
    assert list(tmp_path.iterdir()) == []
    write_result(tmp_path / "clip", track, camera, {"a": 1})
    assert is_finished(tmp_path / "clip")


def test_a_track_of_inconsistent_shapes_is_not_written(tmp_path):
    track, camera = make_track(T=6)
    track.translation = track.translation[:5]
    with pytest.raises(ValueError, match="translation"):
        write_result(tmp_path / "clip", track, camera, {})
    assert not (tmp_path / "clip").exists()


def _rewrite_npz(folder, **changes):
    with np.load(folder / "tracking.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del arrays[key]
    np.savez(folder / "tracking.npz", **arrays)


@pytest.mark.parametrize("change,said", [
    ({"lmk_dense": None}, "missing keys lmk_dense"),
    ({"focal_length": None, "fps": None}, "missing keys focal_length, fps"),
    ({"rotation": np.zeros((6, 3), np.float32)}, "'rotation' has shape (6, 3), expected (6, 3, 3)"),
    ({"principal_point": np.zeros(3, np.float32)}, "'principal_point' has shape (3,), expected (2,)"),
    ({"expression": np.zeros(6, np.float32)}, "'expression' must be [T,n_exp]"),
])
def test_a_result_missing_a_key_or_of_a_wrong_shape_is_one_line_naming_the_file(tmp_path, change, said):
    track, camera = make_track(T=6)
    write_result(tmp_path / "clip", track, camera, {})
    _rewrite_npz(tmp_path / "clip", **change)
    with pytest.raises(ResultFileError) as info:
        load_tracking(tmp_path / "clip")
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "clip" / "tracking.npz"))
    assert said in message


def test_missing_or_broken_files_are_one_line_naming_the_file(tmp_path):
    with pytest.raises(ResultFileError, match="tracking.npz: not found"):
        load_tracking(tmp_path / "nothing")
    track, camera = make_track()
    write_result(tmp_path / "clip", track, camera, {})
    (tmp_path / "clip" / "meta.json").write_text("{not json")
    with pytest.raises(ResultFileError, match="meta.json: not valid JSON"):
        load_tracking(tmp_path / "clip")
    (tmp_path / "clip" / "meta.json").unlink()
    with pytest.raises(ResultFileError, match="meta.json: not found"):
        load_tracking(tmp_path / "clip")
    (tmp_path / "clip" / "tracking.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ResultFileError, match="tracking.npz: unreadable"):
        load_tracking(tmp_path / "clip")


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
    write_result(folder, *make_track(),
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
    write_result(legacy, *make_track(), {})
    assert "older version" in result_differences(legacy, {"video": source_identity(video)}, settings)[0]
    assert json.loads((folder / "meta.json").read_text())["complete"]
