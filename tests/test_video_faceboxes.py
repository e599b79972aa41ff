"""Face boxes: BlazeFace, the short/full-range detector, the search near the last box (lightning_ft.video.faceboxes)."""

import cv2
import numpy as np

from lightning_ft import video


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
            assert model.fed_directly
            for picture in (image, image[40:, 20:300].copy(), blank):
                direct = model.process(picture)
                through_process = list(model.solution.process(picture).detections or [])
                assert direct == through_process
                assert bool(direct) == (picture is not blank)
        finally:
            model.close()


def test_full_range_model_set_up_only_where_the_short_range_one_misses(tmp_path):
    # a still portrait's face is large enough for the short-range model in
    # every examined frame, so the full-range graph is never built (the HD
    # test below has the other case)
    from lightning_ft.synthetic.clips import write_still_clip

    class RecordingDetector(video.FaceBoxDetector):
        full_asked = False

        @property
        def full(self):
            self.full_asked = True
            return video.FaceBoxDetector.full.fget(self)

    path = write_still_clip(tmp_path / "still.mp4", n_frames=20)
    detector = RecordingDetector()
    try:
        fv = video.prepare(path, cache_dir=tmp_path, image_size=64, progress=False, detector=detector)
    finally:
        detector.close()
    assert fv.face_found[fv.face_examined].all()
    assert not detector.full_asked and not detector.far


def test_hd_face_is_looked_for_near_its_last_box(tmp_path):
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
    counting = video.FaceBoxDetector()
    full = counting.full.process

    def process(image):
        calls["full"] += 1
        return full(image)

    counting.full.process = process
    try:
        fv = video.prepare(path, cache_dir=tmp_path / "cache", box_rate=None, still_box_rate=None,
                           progress=False, detector=counting)
    finally:
        counting.close()
    assert fv.face_found.all()
    assert calls["full"] == 1  # the first frame only
    detector = video.FaceBoxDetector()
    try:
        for (_, _, small), box in zip(video.iter_frames(path, max_side=video.DETECT_MAX_SIDE), fv.face_boxes):
            whole = video.detect_face_box(detector, small) * (1920 / small.shape[1])
            side = whole[2] - whole[0]
            assert np.abs((whole[:2] + whole[2:]) / 2 - (box[:2] + box[2:]) / 2).max() < 0.15 * side
            assert abs((box[2] - box[0]) / side - 1) < 0.15
    finally:
        detector.close()
