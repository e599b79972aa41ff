"""Exports: each file set is read back with its consumer's loading logic
(re-implemented here from the consumer's public code) and the FLAME landmarks
projected through the exported camera, in that format's own convention, must
land on the native tracking.npz projection to 1e-3 px."""

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.transform import Rotation

from lightning_ft import export as ex
from lightning_ft.errors import LightningFTError, UsageError
from lightning_ft.flame import FLAME
from lightning_ft.results import load_tracking
from lightning_ft.synthetic.flame_files import write_synthetic_flame

torch.set_num_threads(1)

T, H, W = 5, 96, 96
FOCAL = np.array([310.0, 298.0])
PRINCIPAL = np.array([50.5, 44.25])
CENTRED = np.array([(W - 1) / 2, (H - 1) / 2])  # OpenCV pixels: centres on integers
TOL_PX = 1e-3
# Consumers that measure pixels from the image corner (PyTorch3D screen space,
# nvdiffrast in VHAP, instant-ngp in INSTA) put pixel i's centre at i + 0.5;
# tracking.npz puts it at i. Their coordinates minus this are ours.
CORNER_OFFSET = 0.5


@pytest.fixture(scope="module")
def flame_files(tmp_path_factory):
    return write_synthetic_flame(tmp_path_factory.mktemp("flame"), n_vertices=700, seed=3)


@pytest.fixture(scope="module")
def flame(flame_files):
    return FLAME(flame_files.model, flame_files.landmark_embedding, flame_files.mediapipe_embedding,
                 n_shape=20, n_exp=10, dtype=torch.float64)


def make_result(folder: Path, flame, version="FLAME 2023", neck=False, seed=0, invalid=(),
                focal=FOCAL, principal=PRINCIPAL):
    """A tracking.npz + meta.json of the documented contract, with images."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    head = Rotation.from_rotvec(rng.normal(scale=0.25, size=(T, 3))).as_matrix()
    rotation = np.diag([1.0, -1.0, -1.0]) @ head  # facing an OpenCV camera
    translation = np.stack([rng.uniform(-0.02, 0.02, T), rng.uniform(-0.02, 0.02, T), rng.uniform(0.5, 0.7, T)], 1)
    valid = np.ones(T, bool)
    valid[list(invalid)] = False
    arrays = dict(
        frame_ids=np.arange(T) * 2 + 10, valid=valid,
        shape=rng.normal(scale=0.8, size=20).astype(np.float32),
        expression=rng.normal(scale=0.8, size=(T, 10)).astype(np.float32),
        jaw_pose=np.stack([rng.uniform(0, 0.3, T), rng.normal(scale=0.02, size=T), np.zeros(T)], 1).astype(np.float32),
        neck_pose=(rng.normal(scale=0.15, size=(T, 3)) if neck else np.zeros((T, 3))).astype(np.float32),
        eye_pose=rng.normal(scale=0.1, size=(T, 6)).astype(np.float32),
        rotation=rotation.astype(np.float32), translation=translation.astype(np.float32),
        focal_length=np.asarray(focal, np.float32), principal_point=np.asarray(principal, np.float32),
        image_size=np.array([H, W]), crop_boxes=np.tile([100.0, 50.0, 300.0, 250.0], (T, 1)),
        lmk68=rng.uniform(20, 70, size=(T, 68, 2)).astype(np.float32),
        lmk_dense=rng.uniform(20, 70, size=(T, 478, 2)).astype(np.float32), fps=np.array(25.0),
    )
    np.savez(folder / "tracking.npz", **arrays)
    meta = {"flame": {"version": version, "sha256": flame.sha256, "model_path": str(flame.data.path),
                      "n_shape": 20, "n_exp": 10},
            "video": {"path": "/data/clips/obama.mp4"}}
    (folder / "meta.json").write_text(json.dumps(meta))
    images = [rng.integers(0, 255, size=(H, W, 3), dtype=np.uint8) for _ in range(T)]
    return folder, images


def tracked_landmarks(flame, npz, global_pose=None, jaw=None, eyes=None, neck=None):
    """Model-space FLAME landmarks [T,L,3]: the 51 static iBUG points and the dense points."""
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
    n = npz["expression"].shape[0]
    out = flame(shape=t(npz["shape"])[None].expand(n, -1), expression=t(npz["expression"]),
                global_pose=None if global_pose is None else t(global_pose),
                neck_pose=t(npz["neck_pose"] if neck is None else neck),
                jaw_pose=t(npz["jaw_pose"] if jaw is None else jaw),
                eye_pose=t(npz["eye_pose"] if eyes is None else eyes))
    return torch.cat([out.lmk68[:, 17:], out.lmk_dense], 1).numpy()


def native_projection(flame, result_dir):
    """The tracking.npz contract: (x,y,z) = R X + t, pixel = (fx x/z + cx, fy y/z + cy)."""
    npz = dict(np.load(result_dir / "tracking.npz"))
    X = tracked_landmarks(flame, npz)
    x = np.einsum("tij,tnj->tni", npz["rotation"].astype(np.float64), X) + npz["translation"][:, None]
    return npz, npz["focal_length"] * x[..., :2] / x[..., 2:] + npz["principal_point"]


def gaussian_splatting_pixels(x, fovx, fovy, w, h):
    """3D Gaussian Splatting's projection (GaussianAvatars, FlashAvatar): a symmetric
    frustum from the field of view, then ndc2Pix(v, S) = ((v + 1) S - 1) / 2, which
    puts pixel centres on integers, like ours. x: [N,3] in the camera (OpenCV axes)."""
    ndc = np.stack([x[:, 0] / x[:, 2] / np.tan(fovx / 2), x[:, 1] / x[:, 2] / np.tan(fovy / 2)], 1)
    return ((ndc + 1) * [w, h] - 1) / 2


def largest_centred_span(c, size):
    """Brute force: the longest pixel run [start, start+n) whose centre start + (n-1)/2 is c."""
    spans = [(n, start) for start in range(size) for n in range(1, size - start + 1) if start + (n - 1) / 2 == c]
    n, start = max(spans)
    return start, n


# ----------------------------------------------------------------------------
# vhap: GaussianAvatars' readCamerasFromTransforms + VHAP's FlameHead


def test_vhap_round_trip_and_loader(tmp_path, flame):
    # GaussianAvatars' camera is a field of view: one focal length, centred
    # principal point; the exporter crops the images to centre (50.5, 44.5).
    result_dir, images = make_result(tmp_path / "res", flame, version="FLAME 2023",
                                     focal=[305.0, 305.0], principal=[50.5, 44.5])
    ex.export(result_dir, ["vhap"], tmp_path / "out", frames=images, flame=flame)
    root = tmp_path / "out" / "vhap"
    npz, native = native_projection(flame, result_dir)
    (x0, crop_w), (y0, crop_h) = largest_centred_span(50.5, W), largest_centred_span(44.5, H)

    tracked = np.load(root / "tracked_flame_params_30.npz")
    assert {"rotation", "translation", "neck_pose", "jaw_pose", "eyes_pose", "shape", "expr", "timestep_id",
            "n_processed_frames", "focal_length"} <= set(tracked.files)
    assert tracked["expr"].shape == (T, 100) and tracked["shape"].shape == (300,)
    assert int(tracked["n_processed_frames"]) == T
    # VHAP's export_as_nerf_dataset.py picks the file by the epoch after the last '_'.
    assert [int(p.stem.split("_")[-1]) for p in root.glob("tracked_flame_params*.npz")] == [30]

    frames = []
    for split in ("train", "val", "test"):
        frames += json.loads((root / f"transforms_{split}.json").read_text())["frames"]
    assert len(frames) == T
    for frame in frames:
        i = frame["timestep_index_original"]
        # GaussianAvatars readCamerasFromTransforms: OpenGL c2w -> COLMAP, invert;
        # intrinsics only from camera_angle_x and the image size.
        c2w = np.array(frame["transform_matrix"], dtype=np.float64)
        c2w[:3, 1:3] *= -1
        w2c = np.linalg.inv(c2w)
        w, h = frame["w"], frame["h"]
        assert (w, h) == (crop_w, crop_h)
        fovx = frame["camera_angle_x"]
        fx = w / (2 * np.tan(fovx / 2))
        fovy = 2 * np.arctan(h / (2 * fx))
        assert np.isclose(tracked["focal_length"].item() * max(h, w), frame["fl_x"], rtol=1e-6)
        img = np.asarray(Image.open(root / frame["file_path"]))
        assert img.shape == (h, w, 3)
        np.testing.assert_array_equal(img, images[i][y0:y0 + h, x0:x0 + w])
        p = dict(np.load(root / frame["flame_param_path"], allow_pickle=True))
        assert p["rotation"].shape == (1, 3) and p["eyes_pose"].shape == (1, 6) and p["expr"].shape == (1, 100)
        assert p["static_offset"].shape == (1, flame.n_vertices, 3)
        # VHAP's FlameHead: LBS with `rotation` as the root joint, then + translation.
        X = tracked_landmarks(flame, {"shape": p["shape"][:20], "expression": p["expr"][:, :10],
                                      "neck_pose": p["neck_pose"], "jaw_pose": p["jaw_pose"],
                                      "eye_pose": p["eyes_pose"]}, global_pose=p["rotation"])[0]
        X = X + p["translation"][0]
        x = X @ w2c[:3, :3].T + w2c[:3, 3]
        px = gaussian_splatting_pixels(x, fovx, fovy, w, h)
        assert np.abs(px + [x0, y0] - native[i]).max() < TOL_PX
        # VHAP's own renderer (nvdiffrast, corner origin) uses the explicit intrinsics instead.
        px = np.stack([frame["fl_x"] * x[:, 0] / x[:, 2] + frame["cx"], frame["fl_y"] * x[:, 1] / x[:, 2] + frame["cy"]], 1)
        assert np.abs(px - CORNER_OFFSET + [x0, y0] - native[i]).max() < TOL_PX
    info = json.loads((root / "export_info.json").read_text())
    assert info["flame"]["version"] == "FLAME 2023" and info["flame"]["sha256"] == flame.sha256
    assert any("cropped" in n for n in info["notes"])
    assert "centre at (i, j)" in info["pixel_convention"]["source"] and info["pixel_convention"]["written"]


@pytest.mark.parametrize("focal,principal,match", [
    ([305.0, 300.0], [48.0, 48.0], "single focal"),
    ([305.0, 305.0], [48.0, 44.25], "half-pixel"),
])
def test_vhap_refuses_cameras_gaussianavatars_cannot_hold(tmp_path, flame, focal, principal, match):
    result_dir, _ = make_result(tmp_path / "res", flame, focal=focal, principal=principal)
    with pytest.raises(UsageError, match=match):
        ex.export(result_dir, ["mesh", "vhap"], tmp_path / "out", flame=flame)
    assert not (tmp_path / "out").exists()  # refused before writing anything


# ----------------------------------------------------------------------------
# metrical: FlashAvatar's reader (opencv R, t, K) and metrical-tracker's PyTorch3D camera


def decode_6d(d6):
    """PyTorch3D rotation_6d_to_matrix: Gram-Schmidt on the two stored rows."""
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = a1 / np.linalg.norm(a1, axis=-1, keepdims=True)
    b2 = a2 - (b1 * a2).sum(-1, keepdims=True) * b1
    b2 /= np.linalg.norm(b2, axis=-1, keepdims=True)
    return np.stack([b1, b2, np.cross(b1, b2)], -2)


@pytest.mark.parametrize("principal", [PRINCIPAL, CENTRED], ids=["off-centre", "centred"])
def test_metrical_round_trip_and_loader(tmp_path, flame, principal):
    result_dir, images = make_result(tmp_path / "res", flame, version="FLAME 2020", invalid=(2,), principal=principal)
    ex.export(result_dir, ["metrical"], tmp_path / "out", frames=images, flame=flame)
    root = tmp_path / "out" / "metrical"
    npz, native = native_projection(flame, result_dir)
    ckpts = sorted((root / "checkpoint").glob("*.frame"))
    assert [p.name for p in ckpts] == [f"{n:05d}.frame" for n in range(T - 1)]
    kept = [i for i in range(T) if i != 2]
    for ckpt, i in zip(ckpts, kept):
        payload = torch.load(ckpt, weights_only=False)
        fl = payload["flame"]
        assert fl["exp"].shape == (1, 100) and fl["shape"].shape == (1, 300) and fl["eyes"].shape == (1, 12)
        assert fl["jaw"].shape == (1, 6) and fl["eyelids"].shape == (1, 2) and fl["sh"].shape == (1, 9, 3)
        assert payload["frame_id"] == ckpt.stem
        assert (root / "input" / f"{payload['frame_id']}.png").is_file()
        # Metrical's FLAME: identity global and neck rotation, 6D jaw and eyes.
        jaw = Rotation.from_matrix(decode_6d(fl["jaw"].astype(np.float64))).as_rotvec()
        eyes = Rotation.from_matrix(decode_6d(fl["eyes"].reshape(2, 6).astype(np.float64))).as_rotvec().reshape(1, 6)
        X = tracked_landmarks(flame, {"shape": fl["shape"][0, :20], "expression": fl["exp"][:, :10],
                                      "neck_pose": np.zeros((1, 3))}, jaw=jaw, eyes=eyes)[0]
        R, t, K = (payload["opencv"][k][0].astype(np.float64) for k in ("R", "t", "K"))
        x = X @ R.T + t
        # INSTA (scripts/transforms.py) copies K's cx, cy into instant-ngp's transforms.json;
        # instant-ngp: principal point cx/w, ray of uv = (i + 0.5)/w through
        # (uv - cx/w) w / fx, so a point lands at uv = fx x/(z w) + cx/w, i.e. corner pixels uv w.
        Hs, Ws = payload["img_size"]
        uv = np.stack([K[0, 0] * x[:, 0] / x[:, 2] / Ws + K[0, 2] / Ws,
                       K[1, 1] * x[:, 1] / x[:, 2] / Hs + K[1, 2] / Hs], 1)
        assert np.abs(uv * [Ws, Hs] - CORNER_OFFSET - native[i]).max() < TOL_PX
        # FlashAvatar (scene/__init__.py): w2cR, w2cT = opencv R, t; only K's focal lengths,
        # as fields of view; Gaussian Splatting centres the principal point itself.
        px = gaussian_splatting_pixels(x, 2 * np.arctan(Ws / (2 * K[0, 0])), 2 * np.arctan(Hs / (2 * K[1, 1])), Ws, Hs)
        if np.array_equal(principal, CENTRED):
            assert np.abs(px - native[i]).max() < TOL_PX
        else:  # off by exactly the principal point's offset from the centre
            assert np.abs(px + (principal - CENTRED) - native[i]).max() < TOL_PX
        # metrical-tracker: PerspectiveCameras(R=rotation_6d_to_matrix(R), T=t, focal_length=fl,
        # principal_point=pp, image_size=img_size).transform_points_screen (corner origin).
        c = payload["camera"]
        Rp = decode_6d(c["R"][0].astype(np.float64))
        Xv = X @ Rp + c["t"][0]
        ndc = c["fl"][0] * Xv[:, :2] / Xv[:, 2:] + c["pp"][0]
        s = min(Hs, Ws) / 2
        screen = np.stack([Ws / 2 - ndc[:, 0] * s, Hs / 2 - ndc[:, 1] * s], 1)
        assert np.abs(screen - CORNER_OFFSET - native[i]).max() < TOL_PX
        # The file is self-consistent as metrical-tracker writes it: 'opencv' is
        # PyTorch3D's opencv_from_cameras_projection of 'camera'.
        fl = np.broadcast_to(c["fl"][0].astype(np.float64), (2,))
        np.testing.assert_allclose(K[[0, 1], [0, 1]], fl * s, rtol=1e-6)
        np.testing.assert_allclose(K[:2, 2], -c["pp"][0].astype(np.float64) * s + [Ws / 2, Hs / 2], atol=1e-4)
        np.testing.assert_allclose(R, np.diag([-1.0, -1.0, 1.0]) @ Rp.T, atol=1e-6)
    info = json.loads((root / "export_info.json").read_text())
    assert any("left out" in n for n in info["notes"])
    assert any("FlashAvatar" in n for n in info["notes"]) != np.array_equal(principal, CENTRED)


@pytest.mark.parametrize("principal,noted", [(CENTRED, False), (CENTRED + [0.5, 0.0], True),
                                              (CENTRED + [0.0, -0.5], True)])
def test_metrical_records_principal_point_flashavatar_ignores(tmp_path, flame, principal, noted):
    # (W/2, H/2), the centre in a corner-origin convention, is half a pixel off ours.
    result_dir, _ = make_result(tmp_path / "res", flame, version="FLAME 2020", principal=principal)
    ex.export(result_dir, ["metrical"], tmp_path / "out", frames=None, flame=flame)
    info = json.loads((tmp_path / "out" / "metrical" / "export_info.json").read_text())
    assert any("FlashAvatar" in n for n in info["notes"]) == noted


def test_metrical_neck_is_folded_and_recorded(tmp_path, flame):
    result_dir, _ = make_result(tmp_path / "res", flame, version="FLAME 2020", neck=True)
    ex.export(result_dir, ["metrical"], tmp_path / "out", frames=None, flame=flame)
    info = json.loads((tmp_path / "out" / "metrical" / "export_info.json").read_text())
    assert any("neck" in n for n in info["notes"]) and any("no frame images" in n for n in info["notes"])
    assert not (tmp_path / "out" / "metrical" / "input").exists()


# ----------------------------------------------------------------------------
# lightning: LightningTrack's pickle, PyTorch3D camera on 512x512 frames, vertices x5


def test_lightning_round_trip_and_loader(tmp_path, flame):
    result_dir, images = make_result(tmp_path / "res", flame, version="FLAME 2020")
    npz = dict(np.load(result_dir / "tracking.npz"))
    npz["eye_pose"][:] = 0  # LightningTrack's FLAME has no eyes
    np.savez(result_dir / "tracking.npz", **npz)
    ex.export(result_dir, ["lightning"], tmp_path / "out", frames=images, flame=flame)
    root = tmp_path / "out" / "lightning"
    npz, native = native_projection(flame, result_dir)
    with open(root / "lightning.pkl", "rb") as f:
        data = pickle.load(f)
    calib = json.loads((root / "calibration.json").read_text())
    names = sorted(data, key=lambda x: int(x.split("_")[-1]))
    assert names == [f"obama_{int(i)}" for i in npz["frame_ids"]]
    size = calib["image_size"]
    for i, name in enumerate(names):
        d = data[name]
        assert d["transform_matrix"].shape == (3, 4) and d["emoca_pose"].shape == (6,)
        assert d["mica_shape"].shape == (100,) and d["emoca_expression"].shape == (50,)
        assert Image.open(root / "images" / f"{name}.png").size == (size, size)
        X = tracked_landmarks(flame, {"shape": d["mica_shape"][:20], "expression": d["emoca_expression"][None, :10],
                                      "neck_pose": np.zeros((1, 3)), "eye_pose": np.zeros((1, 6))},
                              global_pose=d["emoca_pose"][None, :3], jaw=d["emoca_pose"][None, 3:])[0]
        X = X * calib["verts_scale"]
        M = d["transform_matrix"].astype(np.float64)
        Xv = X @ M[:, :3] + M[:, 3]
        ndc = np.asarray(calib["focal_length"]) * Xv[:, :2] / Xv[:, 2:] + np.asarray(calib["principal_point"])
        screen512 = size / 2 - ndc * size / 2  # PyTorch3D screen, corner origin, 512x512
        # Resizing scales distances from the corner: back to the W x H crop, then to our pixels.
        px = screen512 * W / size - CORNER_OFFSET
        assert np.abs(px - native[i]).max() < TOL_PX
        # bbox: fractions of the image from its corner, around the detected 68 landmarks.
        lmk = npz["lmk68"][i].astype(np.float64)
        np.testing.assert_allclose(d["bbox"] * [W, H, W, H] - CORNER_OFFSET,
                                   np.concatenate([lmk.min(0), lmk.max(0)]), atol=1e-4)


def test_lightning_refuses_non_square_crop(tmp_path, flame):
    result_dir, _ = make_result(tmp_path / "res", flame, version="FLAME 2020")
    npz = dict(np.load(result_dir / "tracking.npz"))
    npz["image_size"] = np.array([H, W + 10])
    np.savez(result_dir / "tracking.npz", **npz)
    with pytest.raises(UsageError, match="square"):
        ex.export(result_dir, ["lightning"], tmp_path / "out", flame=flame)


# ----------------------------------------------------------------------------
# nerface: load_flame_data + its ray generation (OpenGL camera, -z forward)


def test_nerface_round_trip_and_loader(tmp_path, flame):
    result_dir, images = make_result(tmp_path / "res", flame, version="unknown")
    ex.export(result_dir, ["nerface"], tmp_path / "out", frames=images, flame=flame)
    root = tmp_path / "out" / "nerface"
    npz, native = native_projection(flame, result_dir)
    X = tracked_landmarks(flame, npz)  # nerface's head stays in FLAME model space
    seen = set()
    for split in ("train", "val", "test"):
        meta = json.loads((root / f"transforms_{split}.json").read_text())
        fx, fy, cx, cy = meta["intrinsics"]
        assert meta["frames"], split
        for frame in meta["frames"]:
            img = np.asarray(Image.open(root / (frame["file_path"] + ".png")))
            i = int(np.flatnonzero(npz["frame_ids"] == int(re.search(r"f_(\d+)", frame["file_path"]).group(1)))[0])
            np.testing.assert_array_equal(img, images[i])
            assert len(frame["expression"]) == 13
            c2w = np.array(frame["transform_matrix"])
            # nerface's get_ray_bundle: pixel (i, j) -> d = ((i - W cx)/fx, -(j - H cy)/fy, -1)
            # rotated by c2w, with i, j integer pixel indices (centres on integers, as ours)
            # and cx, cy fractions of the image size.
            h, w = img.shape[:2]
            x = (X[i] - c2w[:3, 3]) @ c2w[:3, :3]
            px = np.stack([w * cx + fx * x[:, 0] / -x[:, 2], h * cy - fy * x[:, 1] / -x[:, 2]], 1)
            assert np.abs(px - native[i]).max() < TOL_PX
            seen.add(i)
    assert seen == set(range(T))
    assert np.isclose(0.5 * W / np.tan(0.5 * meta["camera_angle_x"]), fx)
    info = json.loads((root / "export_info.json").read_text())
    assert info["flame"]["consumer_expects"] is None


# ----------------------------------------------------------------------------
# mesh


def read_obj(path):
    v, f = [], []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "v":
            v.append([float(p) for p in parts[1:4]])
        elif parts and parts[0] == "f":
            f.append([int(p.split("/")[0]) - 1 for p in parts[1:4]])
    return np.array(v), np.array(f)


def test_mesh_round_trip(tmp_path, flame):
    result_dir, _ = make_result(tmp_path / "res", flame)
    ex.export(result_dir, ["mesh"], tmp_path / "out", flame=flame)
    root = tmp_path / "out" / "mesh"
    npz, native = native_projection(flame, result_dir)
    faces_idx = torch.cat([flame.static_faces, flame.dense_faces]).numpy()
    bary = torch.cat([flame.static_bary, flame.dense_bary]).numpy()
    for i, fid in enumerate(npz["frame_ids"]):
        v, f = read_obj(root / "meshes" / f"{int(fid):05d}.obj")
        lmk = np.einsum("lk,lkc->lc", bary, v[f[faces_idx]])
        px = npz["focal_length"] * lmk[:, :2] / lmk[:, 2:] + npz["principal_point"]
        assert np.abs(px - native[i]).max() < TOL_PX
    v, f = read_obj(root / "identity.obj")
    assert v.shape == (flame.n_vertices, 3) and f.shape == tuple(flame.faces.shape)


# ----------------------------------------------------------------------------
# Errors, versions


def test_missing_and_corrupt_tracking(tmp_path, flame):
    with pytest.raises(LightningFTError, match="tracking.npz"):
        ex.export(tmp_path / "nothing", ["mesh"], flame=flame)
    result_dir, _ = make_result(tmp_path / "res", flame)
    (result_dir / "tracking.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(LightningFTError, match="tracking.npz"):
        ex.export(result_dir, ["mesh"], flame=flame)


def test_unknown_format(tmp_path, flame):
    result_dir, _ = make_result(tmp_path / "res", flame)
    with pytest.raises(UsageError, match="unknown format obj"):
        ex.export(result_dir, ["obj"], flame=flame)


def test_version_mismatch_refused_unless_allowed(tmp_path, flame):
    result_dir, _ = make_result(tmp_path / "res", flame, version="FLAME 2020", focal=[305.0, 305.0],
                                principal=[48.0, 48.0])
    with pytest.raises(UsageError, match="FLAME 2023"):
        ex.export(result_dir, ["mesh", "vhap"], tmp_path / "out", flame=flame)
    assert not (tmp_path / "out").exists()  # refused before writing anything
    ex.export(result_dir, ["vhap"], tmp_path / "out", flame=flame, allow_version_mismatch=True)
    info = json.loads((tmp_path / "out" / "vhap" / "export_info.json").read_text())
    assert any("allowed" in n for n in info["notes"])


def test_model_hash_must_match(tmp_path, flame):
    result_dir, _ = make_result(tmp_path / "res", flame)
    meta = json.loads((result_dir / "meta.json").read_text())
    meta["flame"]["sha256"] = "0" * 64
    (result_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="sha256"):
        ex.export(result_dir, ["mesh"], tmp_path / "out", flame=flame)


@pytest.mark.parametrize("name,raw,expected", [
    ("generic_model.pkl", {}, "2020"),
    ("flame2023.pkl", {}, "2023"),
    ("flame2023_no_jaw.pkl", {}, "2023"),
    ("FLAME2023_Open.pkl", {}, "2023-open"),
    ("model.pkl", {"flame_version": b"FLAME 2023 Open"}, "2023-open"),
    ("model.pkl", {}, "unknown"),
])
def test_detect_flame_version(name, raw, expected):
    assert ex.detect_flame_version(raw, Path("/assets/FLAME") / name) == expected


def test_flame_joints_in_chunks_match_one_batch(tmp_path, flame):
    result_dir, _ = make_result(tmp_path / "res", flame, neck=True)
    result = load_tracking(result_dir)
    whole = ex.evaluate_model(result, flame, chunk=128)
    parts = ex.evaluate_model(result, flame, chunk=2)
    np.testing.assert_allclose(parts.neck, whole.neck, atol=1e-12)
    np.testing.assert_allclose(parts.root, whole.root, atol=1e-12)
    # The root joint does not move when the neck turns; the neck joint is where it turns.
    assert not np.allclose(whole.root[0], whole.neck[0])


# ----------------------------------------------------------------------------
# `lightning-ft export` on a finished result writes the images its files name


@pytest.fixture(scope="module")
def tracked_clip(tmp_path_factory, flame_files):
    """A finished result of a 10-frame carphone excerpt (tracked through the CLI)."""
    import shutil

    from lightning_ft.cli import track_main
    from lightning_ft.synthetic.clips import carphone_path, write_excerpt

    d = tmp_path_factory.mktemp("export_images")
    assets_dir = d / "assets"
    (assets_dir / "FLAME").mkdir(parents=True)
    for p in (flame_files.model, flame_files.landmark_embedding, flame_files.mediapipe_embedding):
        shutil.copy(p, assets_dir / "FLAME" / p.name)
    clip = write_excerpt(carphone_path(), d / "clip.mp4", n_frames=10)
    rc = track_main(["--data", str(clip), "--assets", str(assets_dir), "--no-emoca", "--out", str(d / "out"),
                     "--image-size", "96", "-q", "-d", "cpu"])
    assert rc == 0
    return clip, d / "out" / "clip"


def _named_images(root: Path, fmt: str) -> list:
    if fmt == "vhap":
        frames = json.loads((root / "transforms.json").read_text())["frames"]
        return [root / f["file_path"] for f in frames]
    return [root / f"{f['file_path']}.png" for split in ("train", "val", "test")
            for f in json.loads((root / f"transforms_{split}.json").read_text())["frames"]]


def test_export_command_writes_every_image_its_transforms_name(tracked_clip, tmp_path, caplog):
    import cv2

    from lightning_ft.cli import main
    from lightning_ft.video import crop_frame, iter_frames

    clip, result = tracked_clip
    rc = main(["export", str(result), "--format", "vhap,nerface", "--out", str(tmp_path / "exp")])
    assert rc == 0
    r = load_tracking(result).track
    decoded = {i: image for i, _, image in iter_frames(clip)}
    for fmt in ("vhap", "nerface"):
        named = _named_images(tmp_path / "exp" / fmt, fmt)
        assert len(named) >= r.n_frames and all(p.is_file() for p in named), fmt
    # the images are the tracked crops: frame 3's crop box cut from frame 3
    image = cv2.cvtColor(cv2.imread(str(tmp_path / "exp" / "nerface" / "train" / "f_0003.png")), cv2.COLOR_BGR2RGB)
    expected = crop_frame(decoded[3], r.crop_boxes[3], 96)
    other = crop_frame(decoded[9], r.crop_boxes[9], 96)
    assert np.abs(image.astype(int) - expected).mean() < 1.0 < np.abs(image.astype(int) - other).mean()
    # the FLAME version note is said once, not once per check
    notes = [rec.getMessage() for rec in caplog.records if "FLAME version" in rec.getMessage()]
    assert len(notes) == len(set(notes))


def test_export_without_its_source_video_fails_in_one_line(tracked_clip, tmp_path, capsys):
    import shutil

    from lightning_ft.cli import main

    clip, result = tracked_clip
    moved_result = tmp_path / "result"
    shutil.copytree(result, moved_result)
    meta = json.loads((moved_result / "meta.json").read_text())
    meta["sources"]["video"]["path"] = str(tmp_path / "gone.mp4")
    meta["video"]["path"] = str(tmp_path / "gone.mp4")
    (moved_result / "meta.json").write_text(json.dumps(meta))
    rc = main(["export", str(moved_result), "--format", "vhap", "--out", str(tmp_path / "exp")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "gone.mp4" in err and "--video" in err
    assert not (tmp_path / "exp").exists()
    # where it moved: --video
    moved = str(shutil.copy(clip, tmp_path / "moved.mp4"))
    rc = main(["export", str(moved_result), "--format", "vhap", "--out", str(tmp_path / "exp"), "--video", moved])
    assert rc == 0 and len(list((tmp_path / "exp" / "vhap" / "images").glob("*.png"))) == 10
    # another video under the recorded path is refused
    shutil.copy(clip, tmp_path / "gone.mp4")
    with open(tmp_path / "gone.mp4", "ab") as f:
        f.write(b"\0" * 16)
    rc = main(["export", str(moved_result), "--format", "nerface", "--out", str(tmp_path / "exp2")])
    assert rc == 2 and "changed since tracking" in capsys.readouterr().err


def test_export_to_an_unwritable_folder_is_one_line(tracked_clip, tmp_path, capsys):
    from lightning_ft.cli import main

    _, result = tracked_clip
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # even root cannot create a folder below a file
    rc = main(["export", str(result), "--format", "mesh", "--out", str(blocker / "exp")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--out" in err and "Traceback" not in err


def test_mesh_with_a_neck_rotation_is_flames_own_neck(tmp_path, flame):
    """A result with a neck rotation gives the meshes FLAME poses with it:
    their landmarks land on the native projection, where the neck at rest
    would be pixels away."""
    result_dir, _ = make_result(tmp_path / "res", flame, neck=True)
    ex.export(result_dir, ["mesh"], tmp_path / "out", flame=flame)
    npz, native = native_projection(flame, result_dir)
    faces_idx = torch.cat([flame.static_faces, flame.dense_faces]).numpy()
    bary = torch.cat([flame.static_bary, flame.dense_bary]).numpy()
    v, f = read_obj(tmp_path / "out" / "mesh" / "meshes" / f"{int(npz['frame_ids'][0]):05d}.obj")
    lmk = np.einsum("lk,lkc->lc", bary, v[f[faces_idx]])
    px = npz["focal_length"] * lmk[:, :2] / lmk[:, 2:] + npz["principal_point"]
    assert np.abs(px - native[0]).max() < TOL_PX
    at_rest = tracked_landmarks(flame, npz, neck=np.zeros_like(npz["neck_pose"]))[0]
    x = at_rest @ npz["rotation"][0].astype(np.float64).T + npz["translation"][0]
    assert np.abs(npz["focal_length"] * x[:, :2] / x[:, 2:] + npz["principal_point"] - native[0]).max() > 3.0
