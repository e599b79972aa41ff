"""Track and Camera: the fitter's torch form and back, shapes, stored dtypes."""

import numpy as np
import pytest
import torch

from lightning_ft.fitter import FrameParams
from lightning_ft.track import Camera, Track


def make_track(T=7, n_exp=5, n_shape=4, seed=1, dtype=np.float64):
    rng = np.random.default_rng(seed)
    a = lambda *shape: rng.normal(size=shape).astype(dtype)  # noqa: E731
    return Track(frame_ids=np.arange(T), valid=np.arange(T) % 3 != 0, shape=a(n_shape), expression=a(T, n_exp),
                 jaw_pose=a(T, 3), neck_pose=np.zeros((T, 3), dtype), eye_pose=a(T, 6), rotation=a(T, 3, 3),
                 translation=a(T, 3), crop_boxes=a(T, 4), lmk68=a(T, 68, 2), lmk_dense=a(T, 478, 2), fps=25.0)


def test_to_torch_gives_the_fitters_params_of_every_frame():
    track = make_track()
    params = track.to_torch()
    assert isinstance(params, FrameParams)
    pairs = {"rotation": params.rotation, "translation": params.translation, "expression": params.expression,
             "jaw_pose": params.jaw, "eye_pose": params.eyes, "shape": params.shape}
    for name, tensor in pairs.items():
        assert tensor.dtype == torch.float32 and tuple(tensor.shape) == getattr(track, name).shape, name
        np.testing.assert_array_equal(tensor.numpy(), getattr(track, name).astype(np.float32), err_msg=name)
    assert track.to_torch(dtype=torch.float64).rotation.dtype == torch.float64


def test_from_torch_round_trips_and_keeps_what_the_fitter_does_not_hold():
    track = make_track(dtype=np.float32)
    params = track.to_torch()
    params.expression = params.expression + 1.0  # a refinement changed it
    back = Track.from_torch(params, like=track)
    np.testing.assert_array_equal(back.expression, track.expression + np.float32(1.0))
    for name in ("rotation", "translation", "jaw_pose", "eye_pose", "shape"):
        assert getattr(back, name).dtype == np.float32
        np.testing.assert_array_equal(getattr(back, name), getattr(track, name), err_msg=name)
    for name in ("frame_ids", "valid", "crop_boxes", "lmk68", "lmk_dense", "neck_pose"):
        assert getattr(back, name) is getattr(track, name), name
    assert track.expression is not back.expression  # `like` is not changed


def test_shape_problems_name_each_field_that_does_not_fit():
    track = make_track(T=7)
    assert track.shape_problems() == []
    track.eye_pose = track.eye_pose[:, :3]
    track.valid = track.valid[:6]
    problems = track.shape_problems()
    assert len(problems) == 2
    assert any("'eye_pose' has shape (7, 3), expected (7, 6)" in p for p in problems)
    assert any("'valid'" in p for p in problems)


@pytest.mark.parametrize("name", ["expression", "shape"])
def test_shape_problems_catch_a_flat_expression_or_a_batched_shape(name):
    track = make_track()
    setattr(track, name, getattr(track, name)[..., None] if name == "shape" else getattr(track, name)[:, 0])
    assert track.shape_problems() == ["'expression' must be [T,n_exp] and 'shape' [n_shape]"]


def test_stored_casts_to_the_file_dtypes_and_keeps_values():
    track = make_track()
    stored = track.stored()
    assert stored.frame_ids.dtype == np.int64 and stored.valid.dtype == bool
    assert stored.rotation.dtype == np.float32 and stored.fps.dtype == np.float32
    np.testing.assert_array_equal(stored.translation, track.translation.astype(np.float32))
    assert stored.texture is None and "texture" not in stored.arrays()
    camera = Camera(np.array([800.25, 801.5]), np.array([255.5, 250.0]), np.array([512, 480])).stored()
    assert camera.focal_length.dtype == np.float32 and camera.image_size.dtype == np.int64
    assert (camera.height, camera.width) == (512, 480)
    np.testing.assert_array_equal(camera.intrinsics(), [[800.25, 0, 255.5], [0, 801.5, 250.0], [0, 0, 1]])
