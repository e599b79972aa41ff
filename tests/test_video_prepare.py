"""`prepare`: face boxes over a video, smooth crop boxes, errors for bad input (lightning_ft.video.prepare)."""

import av
import numpy as np
import pytest
from video_clips import CARPHONE

from lightning_ft import video
from lightning_ft.errors import LightningFTError, NoFaceError, UsageError, VideoError


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
        video.prepare(path, cache_dir=tmp_path / "cache", image_size=64)
    assert type(err.value) is expected
    message = str(err.value)
    assert path.name in message and "\n" not in message
    assert not list((tmp_path / "cache").glob("*.tmp-*")) if (tmp_path / "cache").exists() else True


def test_one_smallest_crop_size_for_prepare_and_the_cli(tmp_path, capsys):
    # prepare and the CLI's --image-size refuse the same sizes: below MIN_IMAGE_SIZE
    from lightning_ft.cli import track_main

    too_small = video.MIN_IMAGE_SIZE - 1
    with pytest.raises(UsageError, match=f"at least {video.MIN_IMAGE_SIZE}, got {too_small}"):
        video.prepare(CARPHONE, cache_dir=tmp_path / "cache", image_size=too_small)
    assert not (tmp_path / "cache").exists()
    rc = track_main(["--data", str(CARPHONE), "--model", "ict", "--out", str(tmp_path / "out"),
                     "--cache", str(tmp_path / "cache"), "--image-size", str(too_small)])
    err = capsys.readouterr().err
    assert rc == 2 and f"choose {video.MIN_IMAGE_SIZE} to" in err
    assert not (tmp_path / "out").exists()
