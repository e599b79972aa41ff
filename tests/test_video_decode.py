"""Decoding: probe, upright frames with their indices and times, rates (lightning_ft.video.decode)."""

import av
import cv2
import numpy as np
import pytest
from video_clips import CARPHONE, VFR_PTS_MS, H, W, read_marks, rotated_clips

from lightning_ft import video


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return rotated_clips(tmp_path_factory.mktemp("clips"))


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_rotated_vfr_clip_decodes_upright_with_indices_and_pts(clips, rotation):
    info = video.probe(clips[rotation])
    assert (info.width, info.height, info.rotation) == (W, H, rotation)
    decoded = list(video.iter_frames(clips[rotation]))
    assert [i for i, _, _ in decoded] == list(range(len(VFR_PTS_MS)))
    np.testing.assert_allclose([t for _, t, _ in decoded], np.array(VFR_PTS_MS) / 1000, atol=1e-6)
    for index, _, image in decoded:
        assert image.shape == (H, W, 3)
        top_left, bar = read_marks(image)
        assert top_left, f"frame {index} not upright"
        assert bar == index


@pytest.mark.parametrize("rotation", [0, 90, 270])
def test_strong_shrink_is_upright_and_area_averaged(clips, rotation):
    # Shrinking by 2x or more goes through swscale (one pass, conversion of
    # the small picture only): same picture as the full-size upright frame
    # area-averaged by OpenCV, the 90-degree turn included.
    full = [image for _, _, image in video.iter_frames(clips[rotation])]
    small = [image for _, _, image in video.iter_frames(clips[rotation], max_side=W // 2)]
    assert len(small) == len(full)
    for big, little in zip(full, small):
        assert little.shape == (H // 2, W // 2, 3)
        expected = cv2.resize(big, (W // 2, H // 2), interpolation=cv2.INTER_AREA)
        assert np.abs(little.astype(int) - expected).mean() < 4
        assert little[:8, :8].mean() > 180  # the top-left marker stays top-left


def test_fps_resampling_keeps_every_other_frame_of_60fps(clips):
    decoded = list(video.iter_frames(clips["cfr60"], fps=30))
    assert [i for i, _, _ in decoded] == list(range(0, 12, 2))
    assert [read_marks(im)[1] for _, _, im in decoded] == list(range(0, 12, 2))


def test_fps_resampling_on_vfr_never_duplicates_and_follows_ticks(clips):
    decoded = list(video.iter_frames(clips[0], fps=10))
    times = np.array([t for _, t, _ in decoded])
    # one frame per 100 ms tick that has a frame at or after it
    assert np.all(np.diff(times) > 0)
    assert [i for i, _, _ in decoded] == [0, 3, 5, 7, 8, 11]


def test_carphone_all_frames_in_order():
    info = video.probe(CARPHONE)
    assert (info.width, info.height, info.rotation, info.codec) == (176, 144, 0, "h264")
    frames = list(video.iter_frames(CARPHONE))
    assert [i for i, _, _ in frames] == list(range(120))
    np.testing.assert_allclose([t for _, t, _ in frames], np.arange(120) * 1001 / 30000, atol=1e-6)
    # independent decode + colour conversion of one frame with plain PyAV (swscale)
    with av.open(str(CARPHONE)) as c:
        for k, f in enumerate(c.decode(video=0)):
            if k == 57:
                diff = np.abs(frames[57][2].astype(int) - f.to_ndarray(format="rgb24"))
                assert diff.mean() < 2 and diff.max() <= 8  # rounding / chroma upsampling
                break
