"""Face-centred crops: crop boxes, crops of images and of decoded frames (lightning_ft.video.crop)."""

import av
import cv2
import numpy as np
import pytest
from scipy.ndimage import map_coordinates
from video_clips import rotated_clips

from lightning_ft import video


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return rotated_clips(tmp_path_factory.mktemp("clips"))


def test_crop_frame_matches_independent_sampling_and_pads_black():
    rng = np.random.default_rng(0)
    image = (rng.random((60, 80, 3)) * 255).astype(np.uint8)
    box = (50.0, -10.0, 110.0, 50.0)  # 60 px square, half outside right and top
    size = 40
    crop = video.crop_frame(image, box, size)
    u = np.arange(size)
    xs = box[0] + (u + 0.5) * 60 / size - 0.5
    ys = box[1] + (u + 0.5) * 60 / size - 0.5
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    expect = np.stack([map_coordinates(image[..., c].astype(float), [yy, xx], order=1, cval=0)
                       for c in range(3)], axis=-1)
    inside = (xx <= 79) & (yy >= 0)
    assert np.abs(crop[inside].astype(float) - expect[inside]).max() <= 1.0
    assert (crop[(xx > 80) | (yy < -1)] == 0).all()
    # crop_to_source inverts the mapping
    pts = np.array([[[0.0, 0.0], [39.0, 39.0]]])
    np.testing.assert_allclose(video.crop_to_source(pts, np.array([box]), (size, size))[0],
                               [[xs[0], ys[0]], [xs[-1], ys[-1]]])


def test_crop_frame_cuts_by_resize_where_it_can_and_samples_the_box(monkeypatch):
    # Most boxes are cut by cv2.resize from a window starting on a whole
    # pixel (within 1/32 px of the box); a box no window start reaches
    # (1 source px per crop pixel, origin on a half pixel) by warpAffine.
    # Either way the crop samples the box bilinearly, black outside.
    rng = np.random.default_rng(3)
    image = cv2.GaussianBlur((rng.random((120, 160, 3)) * 255).astype(np.uint8), (0, 0), 2.0)
    size = 48
    warps = []
    warp_affine = cv2.warpAffine

    def counting_warp(*args, **kwargs):
        warps.append(1)
        return warp_affine(*args, **kwargs)

    monkeypatch.setattr(cv2, "warpAffine", counting_warp)
    boxes = [(x0, y0, x0 + side, y0 + side) for x0, y0, side in
             zip(rng.uniform(-30, 130, 40), rng.uniform(-30, 90, 40), rng.uniform(12, 90, 40))]
    boxes.append((10.5, 20.5, 10.5 + size, 20.5 + size))
    u = np.arange(size)
    for box in boxes:
        crop = video.crop_frame(image, box, size)
        p = (box[2] - box[0]) / size
        xs, ys = box[0] + (u + 0.5) * p - 0.5, box[1] + (u + 0.5) * p - 0.5
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        expect = np.stack([map_coordinates(image[..., c].astype(float), [yy, xx], order=1, cval=0)
                           for c in range(3)], axis=-1)
        inside = (xx >= 0) & (xx <= 159) & (yy >= 0) & (yy <= 119)
        assert np.abs(crop[inside].astype(float) - expect[inside]).max(initial=0) <= 2.0, box
        assert (crop[(xx < -1) | (yy < -1) | (xx > 160) | (yy > 120)] == 0).all(), box
    assert warps[-1:] == [1]  # the unreachable box went through warpAffine
    assert len(warps) <= 10  # and few of the others (~13 % expected)


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_crop_of_decoded_frame_converts_only_the_box_and_matches_whole_frame(clips, rotation):
    # crop_video_frame colour-converts just the region under the box (in
    # upright pixels, through the rotation): the same crop as converting the
    # whole frame first, for boxes inside, across the edge and outside.
    container = av.open(str(clips[rotation]))
    frame = next(container.decode(video=0))
    container.close()
    whole = video.frame_to_rgb(frame)
    boxes = [(10.3, 5.7, 40.1, 35.5), (-12.2, 20.4, 30.6, 63.2), (50.5, -8.0, 70.5, 12.0),
             (-3.0, -4.0, 67.0, 66.0), (100.0, 100.0, 120.0, 120.0), (10.5, 10.5, 10.5, 10.5)]
    for box in boxes:  # upsampling (and a box of no size): straight from the region, exact
        np.testing.assert_array_equal(video.crop_video_frame(frame, box, 96),
                                      video.crop_frame(whole, box, 96))
    # shrinking >= 2x (area first): block edges may fall elsewhere than on
    # the whole frame, so close rather than equal
    for box in [(-20.0, -30.0, 84.0, 74.0), (4.2, 3.1, 44.2, 43.1)]:
        a = video.crop_video_frame(frame, box, 16).astype(int)
        b = video.crop_frame(whole, box, 16).astype(int)
        assert np.abs(a - b).mean() < 3


def test_smooth_crop_boxes_fills_gaps_and_reduces_jitter():
    rng = np.random.default_rng(1)
    t = np.arange(90)
    cx = 100 + 0.5 * t + rng.normal(0, 3, 90)
    boxes = np.stack([cx - 20, 50 - 20 + rng.normal(0, 3, 90), cx + 20, 50 + 20 + rng.normal(0, 3, 90)], 1)
    found = np.ones(90, bool)
    found[30:40] = False
    boxes[~found] = np.nan
    crops = video.smooth_crop_boxes(boxes, found, fps=30)
    assert np.isfinite(crops).all()
    side = crops[:, 2] - crops[:, 0]
    np.testing.assert_allclose(side, crops[:, 3] - crops[:, 1])
    np.testing.assert_allclose(side, 80, rtol=0.15)
    jitter_raw = np.abs(np.diff(cx[found][:29]))
    jitter_crop = np.abs(np.diff((crops[:29, 0] + crops[:29, 2]) / 2))
    assert jitter_crop.mean() < 0.5 * jitter_raw.mean()
    # the gap follows the motion (linear interpolation), not a stale box
    assert abs((crops[35, 0] + crops[35, 2]) / 2 - (100 + 0.5 * 35)) < 4
