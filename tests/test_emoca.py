"""EMOCA v2 regressor: release loading, conformance with torchvision, crop, inference, conventions."""

from __future__ import annotations

import os
import pickle
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from scipy.spatial.transform import Rotation

from lightning_ft.emoca import (
    CROP_SIZE, EmocaEncoder, EmocaResult, crop_for_emoca, emoca_camera_to_translation,
    emoca_pose_to_opencv, find_checkpoint, load_checkpoint_tensors, load_emoca_or_none,
    read_simple_yaml, regress, robust_mean,
)
from lightning_ft.errors import AssetError, UsageError
from lightning_ft.synthetic.emoca_files import (
    CHECKPOINT_RELATIVE, synthetic_state_dict, write_checkpoint, write_synthetic_release,
)

torch.set_num_threads(2)
SEED = 3


@pytest.fixture(scope="session")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("emoca_assets")
    return write_synthetic_release(root, seed=SEED)


@pytest.fixture(scope="session")
def model(release) -> EmocaEncoder:
    return EmocaEncoder.from_release(release.parent)


@pytest.fixture(scope="session")
def reference_state() -> "OrderedDict[str, torch.Tensor]":
    return synthetic_state_dict(seed=SEED)


# ----------------------------------------------------------------------------
# Release structure and loading


def test_release_layout_and_cfg(release):
    assert release.name == "EMOCA_v2_lr_mse_20"
    assert find_checkpoint(release.parent) == release / CHECKPOINT_RELATIVE
    assert find_checkpoint(release) == release / CHECKPOINT_RELATIVE
    cfg = read_simple_yaml(release / "cfg.yaml")
    for stage in ("coarse", "detail"):
        model_cfg = cfg[stage]["model"]
        assert (model_cfg["n_shape"], model_cfg["n_tex"], model_cfg["n_exp"], model_cfg["n_pose"],
                model_cfg["n_cam"], model_cfg["n_light"]) == (100, 50, 50, 6, 3, 27)
        assert model_cfg["expression_backbone"] == "deca_clone"
        assert model_cfg["exp_deca_jaw_pose"] is False


def test_checkpoint_needs_lightning_for_plain_torch_load(release):
    # Like the real file: the pickle references pytorch_lightning classes.
    path = find_checkpoint(release)
    assert "pytorch_lightning" not in sys.modules
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    with pytest.raises(ModuleNotFoundError):
        torch.load(path, weights_only=False)


def test_loader_keeps_exactly_the_two_encoders(release, reference_state):
    path = find_checkpoint(release)
    everything = load_checkpoint_tensors(path, lambda key: True)
    assert set(everything) == set(reference_state)
    assert any(k.startswith("deca.E_detail.") for k in everything)
    assert any(k.startswith("deca.D_detail.") for k in everything)
    kept = load_checkpoint_tensors(path, lambda k: k.startswith(("deca.E_flame.", "deca.E_expression.")))
    assert len(kept) == 644
    for key, value in kept.items():
        assert value.dtype == reference_state[key].dtype
        assert torch.equal(value, reference_state[key]), key


def test_model_state_equals_file(model, reference_state):
    state = model.state_dict()
    assert len(state) == 644
    for key, value in state.items():
        assert torch.equal(value, reference_state["deca." + key]), key


def _torchvision_trunk(encoder_state) -> torch.nn.Module:
    net = torchvision.models.resnet50(weights=None)
    net.fc = torch.nn.Identity()
    net.load_state_dict(encoder_state, strict=True)
    return net.eval()


def test_backbone_and_heads_match_torchvision(model):
    images = torch.rand(2, 3, CROP_SIZE, CROP_SIZE, generator=torch.Generator().manual_seed(0))
    exp_trunk = _torchvision_trunk(model.E_expression.encoder.state_dict())
    flame_trunk = _torchvision_trunk(model.E_flame.encoder.state_dict())
    with torch.inference_mode():
        ours = model.E_expression.encoder(images)
        theirs = exp_trunk(images)
        assert ours.shape == (2, 2048)
        assert theirs.abs().max() > 0.05 and (theirs[0] - theirs[1]).abs().max() > 1e-3
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)

        out = model(images)
        flame_code = model.E_flame.layers(flame_trunk(images))
        exp_code = model.E_expression.layers(theirs)
    torch.testing.assert_close(out["expression"], exp_code, atol=1e-5, rtol=0)
    expected = {"shape": flame_code[:, :100], "texture": flame_code[:, 100:150],
                "expression_coarse": flame_code[:, 150:200], "global_pose": flame_code[:, 200:203],
                "jaw_pose": flame_code[:, 203:206], "cam": flame_code[:, 206:209],
                "light": flame_code[:, 209:236].reshape(2, 9, 3)}
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value, atol=1e-5, rtol=0)


def test_folded_batchnorm_and_channels_last_give_same_codes(release, model):
    images = torch.rand(2, 3, CROP_SIZE, CROP_SIZE, generator=torch.Generator().manual_seed(1))
    fused = EmocaEncoder.from_release(release, fold_batchnorm=True).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        reference = model(images)
        result = fused(images.contiguous(memory_format=torch.channels_last))
    for name in reference:
        torch.testing.assert_close(result[name], reference[name], atol=2e-5, rtol=1e-4)


def test_wrong_input_size_is_a_usage_error(model):
    with pytest.raises(UsageError):
        model(torch.zeros(1, 3, 256, 256))


# ----------------------------------------------------------------------------
# Errors


def _message(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_missing_release_names_both_options(tmp_path):
    with pytest.raises(AssetError) as excinfo:
        load_emoca_or_none(tmp_path / "nowhere", no_emoca=False)
    assert "--no-emoca" in _message(excinfo) and "EMOCA_v2_lr_mse_20.zip" in _message(excinfo)
    (tmp_path / "EMOCA").mkdir()
    with pytest.raises(AssetError) as excinfo:
        EmocaEncoder.from_release(tmp_path / "EMOCA")
    assert "--no-emoca" in _message(excinfo)
    assert load_emoca_or_none(tmp_path / "nowhere", no_emoca=True) is None


def test_truncated_checkpoint(release, tmp_path):
    source = find_checkpoint(release)
    broken = tmp_path / "EMOCA_v2_lr_mse_20" / CHECKPOINT_RELATIVE
    broken.parent.mkdir(parents=True)
    with open(source, "rb") as f:
        broken.write_bytes(f.read(source.stat().st_size // 2))
    with pytest.raises(AssetError) as excinfo:
        EmocaEncoder.from_release(tmp_path)
    assert str(broken) in _message(excinfo)


def test_random_bytes_checkpoint(tmp_path):
    path = tmp_path / "EMOCA_v2_lr_mse_20" / CHECKPOINT_RELATIVE
    path.parent.mkdir(parents=True)
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(AssetError) as excinfo:
        EmocaEncoder.from_release(tmp_path)
    assert "not a PyTorch zip checkpoint" in _message(excinfo)


def test_missing_storage_record(release, tmp_path):
    source = find_checkpoint(release)
    target = tmp_path / "broken.ckpt"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        names = src.namelist()
        dropped = next(n for n in names if n.endswith("/data/3"))
        for name in names:
            if name != dropped:
                dst.writestr(name, src.read(name))
    with pytest.raises(AssetError) as excinfo:
        load_checkpoint_tensors(target, lambda key: key.startswith("deca.E_flame."))
    assert "missing or damaged" in _message(excinfo)


def test_wrong_architecture_checkpoint(tmp_path):
    # A DECA-like head (156 outputs) and no expression encoder: one clear error.
    state = OrderedDict([("deca.E_flame.layers.2.weight", torch.zeros(156, 1024)),
                         ("deca.E_flame.layers.2.bias", torch.zeros(156))])
    write_checkpoint(tmp_path / "EMOCA_v2_lr_mse_20" / CHECKPOINT_RELATIVE, state)
    with pytest.raises(AssetError) as excinfo:
        EmocaEncoder.from_release(tmp_path)
    text = _message(excinfo)
    assert "not the EMOCA v2 encoder architecture" in text
    assert "(156,) instead of (236,)" in text


def test_unsupported_config_is_refused(release, tmp_path):
    copy = tmp_path / "EMOCA_v2_lr_mse_20"
    copy.mkdir()
    cfg = (release / "cfg.yaml").read_text().replace("expression_backbone: deca_clone",
                                                     "expression_backbone: deca_parallel")
    (copy / "cfg.yaml").write_text(cfg)
    (copy / CHECKPOINT_RELATIVE).parent.mkdir(parents=True)
    os.symlink(find_checkpoint(release), copy / CHECKPOINT_RELATIVE)
    with pytest.raises(AssetError) as excinfo:
        EmocaEncoder.from_release(tmp_path)
    assert "deca_parallel" in _message(excinfo)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    data = pickle.dumps({"state_dict": OrderedDict(), "callbacks": {1: _Payload(marker)}}, protocol=2)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data)
    assert load_checkpoint_tensors(path, lambda key: True) == {}
    assert not marker.exists()


def test_find_checkpoint_uses_lowest_metric(tmp_path):
    folder = tmp_path / "EMOCA_v2_lr_mse_20" / "detail" / "checkpoints" / "deca-epoch=10-val_loss"
    folder.mkdir(parents=True)
    for name in ("dataloader_idx_0=3.9.ckpt", "dataloader_idx_0=3.25521111.ckpt", "last.ckpt"):
        (folder / name).write_bytes(b"")
    assert find_checkpoint(tmp_path).name == "dataloader_idx_0=3.25521111.ckpt"


# ----------------------------------------------------------------------------
# Crop


def _ramp_image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx, yy, np.full_like(xx, 77)], axis=-1).astype(np.uint8)


def _box_landmarks(x0, y0, x1, y1, n=40, seed=0):
    rng = np.random.default_rng(seed)
    pts = np.stack([rng.uniform(x0, x1, n), rng.uniform(y0, y1, n)], axis=1)
    pts[:4] = [[x0, y0], [x1, y1], [x0, y1], [x1, y0]]
    return pts


def test_crop_maps_pixels_through_its_affine():
    image = _ramp_image(200, 240)
    # Box 80 x 100 around (100, 100): side int(90 * 1.25) = 112, left = top = 44.
    crop, affine = crop_for_emoca(image, _box_landmarks(60, 50, 140, 150))
    assert crop.shape == (224, 224, 3) and crop.dtype == np.float32
    k = 112 / 224
    np.testing.assert_allclose(affine, [[k, 0, 44 + 0.5 * k - 0.5], [0, k, 44 + 0.5 * k - 0.5]])
    v, u = np.mgrid[0:224, 0:224]
    expected_x = affine[0, 0] * u + affine[0, 2]
    expected_y = affine[1, 1] * v + affine[1, 2]
    inner = (slice(2, -2), slice(2, -2))  # the resize filter is truncated at the crop border
    np.testing.assert_allclose(crop[..., 0][inner] * 255, expected_x[inner], atol=1e-3)
    np.testing.assert_allclose(crop[..., 1][inner] * 255, expected_y[inner], atol=1e-3)
    np.testing.assert_allclose(crop[..., 2], 77 / 255, atol=1e-6)


def test_crop_downscale_matches_torchvision_resize():
    # The original tracker: torchvision crop + resize(224, antialias=True) of a float frame.
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    landmarks = _box_landmarks(200, 120, 420, 380)
    crop, affine = crop_for_emoca(image, landmarks)
    side = int(((220) + (260)) / 2 * 1.25)
    left, top = int(310 - side / 2), int(250 - side / 2)
    frame = torch.from_numpy(image).permute(2, 0, 1).float()
    ref = torchvision.transforms.functional.crop(frame, top=top, left=left, height=side, width=side)
    ref = torchvision.transforms.functional.resize(ref, size=224, antialias=True)
    np.testing.assert_allclose(crop, ref.permute(1, 2, 0).numpy() / 255, atol=1e-4)
    assert affine[0, 2] == pytest.approx(left + 0.5 * side / 224 - 0.5)


def test_crop_outside_image_is_black():
    image = np.full((100, 100, 3), 200, np.uint8)
    crop, affine = crop_for_emoca(image, _box_landmarks(-20, 10, 40, 70))
    v, u = np.mgrid[0:224, 0:224]
    x = affine[0, 0] * u + affine[0, 2]
    assert np.all(crop[x < -1.5] == 0)
    assert np.allclose(crop[(x > 1.5) & (v > 2) & (v < 221)], 200 / 255, atol=1e-5)


# ----------------------------------------------------------------------------
# Inference


def test_regress_batches_and_marks_invalid_frames(model):
    rng = np.random.default_rng(2)
    frames = [rng.integers(0, 256, (160, 192, 3), dtype=np.uint8) for _ in range(5)]
    landmarks = np.stack([_box_landmarks(40 + i, 30, 150, 140 - i, seed=i) for i in range(5)])
    valid = np.array([True, True, False, True, True])
    result = regress(iter(frames), landmarks, valid, model, batch_size=3, progress=False)
    assert result.source == "emoca"
    assert np.isnan(result.shape[2]).all() and np.isnan(result.crop_to_image[2]).all()
    crops = np.stack([crop_for_emoca(frames[i], landmarks[i])[0] for i in (0, 1, 3, 4)])
    with torch.inference_mode():
        direct = model(torch.from_numpy(crops).permute(0, 3, 1, 2))
    for name in ("shape", "expression", "global_pose", "jaw_pose", "cam", "texture", "light"):
        value = getattr(result, name)
        assert value.dtype == np.float32 and value.shape[0] == 5
        np.testing.assert_allclose(value[valid], direct[name].numpy(), atol=1e-4, err_msg=name)
    np.testing.assert_allclose(result.identity, robust_mean(result.shape[valid]))
    with pytest.raises(UsageError):
        regress(iter(frames[:4]), landmarks, valid, model, progress=False)


def test_robust_mean_ignores_outlier_frames():
    rng = np.random.default_rng(4)
    center = rng.normal(size=100)
    codes = center + 0.05 * rng.normal(size=(40, 100))
    codes[[3, 17]] += 5.0
    robust = robust_mean(codes)
    assert np.abs(robust - center).max() < 0.05
    assert np.abs(codes.mean(axis=0) - center).max() > 0.2


def test_neutral_result_for_no_emoca():
    result = EmocaResult.neutral(4)
    assert result.source == "neutral" and result.expression.shape == (4, 50)
    assert not result.shape.any() and not result.global_pose.any() and result.identity.shape == (100,)


# ----------------------------------------------------------------------------
# Conventions


def _project_opencv(R, t, points, focal, pp):
    cam = points @ R.T + t
    return focal * cam[:, :2] / cam[:, 2:] + pp


def test_frontal_pose_is_flip():
    np.testing.assert_allclose(emoca_pose_to_opencv(np.zeros((1, 3)))[0], np.diag([1.0, -1.0, -1.0]),
                               atol=1e-12)


def test_yaw_and_pitch_move_the_nose_the_right_way():
    nose = np.array([[0.0, 0.0, 0.1]])
    t, f, pp = np.array([0.0, 0.0, 1.0]), 1000.0, np.array([256.0, 256.0])
    # FLAME +x is the subject's left: turning the head to its left is +yaw about +y.
    yaw_left = emoca_pose_to_opencv(np.array([[0.0, np.radians(20), 0.0]]))[0]
    assert _project_opencv(yaw_left, t, nose, f, pp)[0, 0] > pp[0] + 10
    # Rotating about +x by + moves the nose down (-y in FLAME): image y grows.
    pitch_down = emoca_pose_to_opencv(np.array([[np.radians(15), 0.0, 0.0]]))[0]
    assert _project_opencv(pitch_down, t, nose, f, pp)[0, 1] > pp[1] + 10


def test_rotation_agrees_with_deca_orthographic_projection():
    rng = np.random.default_rng(5)
    poses = rng.normal(scale=0.5, size=(6, 3))
    points = rng.normal(scale=0.1, size=(30, 3))
    R_cv = emoca_pose_to_opencv(poses)
    R_torch = emoca_pose_to_opencv(torch.from_numpy(poses))
    np.testing.assert_allclose(R_torch.numpy(), R_cv, atol=1e-7)
    for pose, R in zip(poses, R_cv):
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-7)
        assert np.linalg.det(R) == pytest.approx(1.0)
        rotated = points @ Rotation.from_rotvec(pose).as_matrix().T  # FLAME's posed vertices
        deca_image = np.stack([rotated[:, 0], -rotated[:, 1]], axis=1)  # orth. proj., y flipped
        np.testing.assert_allclose((points @ R.T)[:, :2], deca_image, atol=1e-7)
        # The depth axis points away from the camera for points in front of the face.
        np.testing.assert_allclose((points @ R.T)[:, 2], -rotated[:, 2], atol=1e-7)


def test_camera_translation_reproduces_weak_perspective():
    rng = np.random.default_rng(6)
    cam = np.array([[8.5, 0.02, -0.03], [10.0, -0.01, 0.015]])
    affine = np.array([[[1.7, 0.0, 120.3], [0.0, 1.7, 80.9]], [[0.9, 0.0, 10.0], [0.0, 0.9, 30.0]]])
    points = rng.normal(scale=0.08, size=(50, 3))
    pp = np.array([320.0, 240.0])
    flip = np.diag([1.0, -1.0, -1.0])
    for focal in (1e6, 2000.0):
        t = emoca_camera_to_translation(cam, affine, focal, pp)
        for i in range(2):
            s, tx, ty = cam[i]
            ndc = np.stack([s * (points[:, 0] + tx), -s * (points[:, 1] + ty)], axis=1)
            crop_px = (ndc + 1) * CROP_SIZE / 2 - 0.5
            emoca_px = crop_px @ affine[i][:, :2].T + affine[i][:, 2]
            origin_emoca = (np.array([s * tx, -s * ty]) + 1) * CROP_SIZE / 2 - 0.5
            origin_px = affine[i][:, :2] @ origin_emoca + affine[i][:, 2]
            # The model origin lands exactly where EMOCA puts it ...
            origin = _project_opencv(flip, t[i], np.zeros((1, 3)), focal, pp)
            np.testing.assert_allclose(origin[0], origin_px, atol=1e-9)
            # ... and other points differ only by perspective: dz / (t_z - dz) of their
            # distance to the principal point.
            perspective_px = _project_opencv(flip, t[i], points, focal, pp)
            offset = np.linalg.norm(emoca_px - pp, axis=1)
            bound = 1.01 * np.abs(points[:, 2]) / (t[i, 2] - np.abs(points[:, 2])) * offset + 1e-9
            assert np.all(np.linalg.norm(perspective_px - emoca_px, axis=1) <= bound)
        if focal > 1e5:
            assert t[:, 2].min() > 100  # nearly orthographic: tiny perspective error
