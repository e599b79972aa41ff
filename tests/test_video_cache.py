"""The frame cache: reuse, rebuild, interrupted and failed writes, stale temporaries (lightning_ft.video.cache)."""

import os
import shutil

import av
import numpy as np
import pytest
from video_clips import CARPHONE

from lightning_ft import video


def test_cache_reused_and_rebuilt_when_video_changes(tmp_path, monkeypatch):
    src = tmp_path / "clip.mp4"
    shutil.copy(CARPHONE, src)
    first = video.prepare(src, cache_dir=tmp_path / "cache", image_size=64)
    assert not first.cache_path.exists()  # pass 2 runs on the first read of the crops
    assert len(list(first.frames())) == 120 and first.cache_path.exists()
    opened = []
    real_open = av.open

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(av, "open", counting_open)
    again = video.prepare(src, cache_dir=tmp_path / "cache", image_size=64)
    assert opened == [str(src)]  # probed (one frame), not decoded
    assert again.cache_fill is None
    np.testing.assert_array_equal(again.crop_boxes, first.crop_boxes)
    np.testing.assert_array_equal(again.frame(3), first.frame(3))
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = video.prepare(src, cache_dir=tmp_path / "cache", image_size=64)
    changed.frame(3)
    assert opened == [str(src)] * 4  # probed, and both passes decoded again
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.cache_path.name]


def test_crops_stopped_early_leave_no_cache_and_are_made_again(tmp_path):
    fv = video.prepare(CARPHONE, cache_dir=tmp_path / "cache", image_size=64)
    crops = fv.frames()
    first = [next(crops) for _ in range(5)]
    crops.close()  # a reader that stops early (an error in the detector, Ctrl-C)
    assert list((tmp_path / "cache").iterdir()) == []
    again = list(fv.frames())
    assert len(again) == 120 and fv.cache_path.exists()
    for made, remade in zip(first, again):
        np.testing.assert_array_equal(made, remade)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [fv.cache_path.name]


def test_cache_writer_failure_ends_the_read_with_one_error(tmp_path):
    """The cache folder removed and replaced by a file after pass 1: the
    writer thread cannot open its LMDB; reading the crops stops with one
    error naming the cache, and no temporary file stays."""
    import shutil

    from lightning_ft.errors import OutputError
    from lightning_ft.synthetic.clips import carphone_path, write_excerpt
    from lightning_ft.video import prepare

    clip = write_excerpt(carphone_path(), tmp_path / "clip.mp4", n_frames=10)
    cache = tmp_path / "cache"
    fv = prepare(clip, cache_dir=cache, image_size=64, progress=False)
    shutil.rmtree(cache)
    cache.write_text("a file where the cache folder was")
    with pytest.raises(OutputError, match="frame cache"):
        for _ in fv.frames():
            pass
    assert {p.name for p in tmp_path.iterdir()} == {"clip.mp4", "cache"} and cache.is_file()


def test_stale_cache_temporaries_are_removed(tmp_path):
    """Temporaries of killed runs go: at once where the writer ran on this
    host; a live writer's stay, and so does another host's, or an unnamed
    host's, written a moment ago (another host may share the folder)."""
    import socket
    import subprocess
    import sys
    import time

    from lightning_ft.video import STALE_TMP_SECONDS, remove_stale_cache_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()
    old = time.time() - 2 * STALE_TMP_SECONDS
    files = {"killed": f"a-1.lmdb.tmp-{dead.pid}-1", "live": f"b-1.lmdb.tmp-{os.getpid()}-1@{here}",
             "recent": f"c-1.lmdb.tmp-{dead.pid}-2", "killed_here": f"e-1.lmdb.tmp-{dead.pid}-3@{here}",
             "other_host": f"f-1.lmdb.tmp-{dead.pid}-4@not-{here}", "cache": "d-1.lmdb"}
    for name in files.values():
        (tmp_path / name).write_bytes(b"\0" * 1000)
    for key in ("killed", "live", "cache"):
        os.utime(tmp_path / files[key], (old, old))
    assert remove_stale_cache_temporaries(tmp_path) == 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files[k] for k in ("live", "recent", "other_host",
                                                                                    "cache"))
