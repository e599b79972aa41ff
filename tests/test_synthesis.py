"""Photometric synthesis: texture-space loading, face region, appearance
rendering and recovery of perturbed parameters from textured renders."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from lightning_ft.errors import AssetError, UsageError
from lightning_ft.render import render_shaded
from lightning_ft.synthesis import (SynthesisConfig, face_region_mask, load_texture_space, refine,
                                    render_appearance)
from lightning_ft.track import Camera, Track
from lightning_ft.synthetic.texture_files import (perturb_params, recovery_errors, render_textured_sequence,
                                                  write_synthetic_bfm_albedo, write_synthetic_texture,
                                                  write_synthetic_texture_for_mesh)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def head_texture(flame_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("texture") / "FLAME_texture.npz"
    write_synthetic_texture_for_mesh(path, flame_model.v_template.numpy(), flame_model.faces.numpy(),
                                     size=64, n_comp=8, seed=0)
    return load_texture_space(path)


@pytest.fixture(scope="module")
def sequence(flame_model, head_texture):
    return render_textured_sequence(flame_model, head_texture, T=4, size=64, seed=1)


# ----------------------------------------------------------------------------
# Loading


def test_flame_texture_is_read_as_rgb_in_unit_range(tmp_path):
    path = write_synthetic_texture(tmp_path / "FLAME_texture.npz", size=16, n_comp=5, n_uv=40, n_faces=30)
    raw = np.load(path)
    ts = load_texture_space(path, n_components=3)
    assert ts.source == "FLAME_texture" and ts.n_components == 3
    # channel c of the RGB result is BGR channel 2 - c of the file, / 255
    np.testing.assert_allclose(ts.mean.numpy(), raw["mean"][..., ::-1].transpose(2, 0, 1) / 255.0, rtol=1e-6)
    np.testing.assert_allclose(ts.basis[2, 0].numpy(), raw["tex_dir"][:, :, 2, 2] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ts.ft.numpy(), raw["ft"])
    coeffs = torch.tensor([[0.5, -1.0, 2.0]])
    expected = ts.mean + 0.5 * ts.basis[0] - ts.basis[1] + 2.0 * ts.basis[2]
    torch.testing.assert_close(ts.albedo(coeffs)[0], expected)


def test_bfm_albedo_needs_the_template_uvs(tmp_path):
    path = write_synthetic_bfm_albedo(tmp_path / "FLAME_albedo_from_BFM.npz", size=8, n_comp=4)
    with pytest.raises(AssetError, match="head_template_mesh.obj"):
        load_texture_space(path)
    obj = tmp_path / "head_template_mesh.obj"
    obj.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0.1 0.2\nvt 0.9 0.2\nvt 0.1 0.8\nvt 0.5 0.5\n"
                   "f 1/1 2/2 3/4\nf 1/3 3/2 2/1\n")
    ts = load_texture_space(path, uv_obj=obj)
    assert ts.source == "BFM"
    np.testing.assert_array_equal(ts.ft.numpy(), [[0, 1, 3], [2, 1, 0]])
    mu = np.load(path)["MU"].reshape(-1)
    r, c = 3, 5  # pixel-major, channels BGR
    np.testing.assert_allclose(ts.mean[:, r, c].numpy(), mu[(r * 8 + c) * 3:(r * 8 + c) * 3 + 3][::-1], rtol=1e-6)


def test_broken_texture_files_raise_asset_errors(tmp_path):
    with pytest.raises(AssetError, match="not found"):
        load_texture_space(tmp_path / "missing.npz")
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(AssetError, match="corrupt.npz"):
        load_texture_space(bad)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, something=np.zeros(3))
    with pytest.raises(AssetError, match="neither"):
        load_texture_space(wrong)
    bad_ft = tmp_path / "bad_ft.npz"
    np.savez(bad_ft, mean=np.zeros((4, 4, 3)), tex_dir=np.zeros((4, 4, 3, 2)), vt=np.zeros((3, 2)),
             ft=np.array([[0, 1, 7]]))
    with pytest.raises(AssetError, match="beyond"):
        load_texture_space(bad_ft)


# ----------------------------------------------------------------------------
# Face region and rendering


def test_face_region_keeps_the_face_and_drops_eyes_and_back(flame_model):
    region = face_region_mask(flame_model)
    faces = flame_model.faces
    v = flame_model.v_template
    eye = flame_model.weights[:, 3:5].sum(1) > 0.5
    assert region.any()
    assert not region[eye[faces].any(1)].any()
    # the most forward non-eye vertex (the nose tip) is inside; nothing behind the centre is
    z = torch.where(eye, torch.full_like(v[:, 2], -np.inf), v[:, 2])
    assert region[(faces == torch.argmax(z)).any(1)].any()
    centre_z = 0.5 * (v[:, 2].min() + v[:, 2].max())
    assert not region[(v[faces][:, :, 2] < centre_z).any(1)].any()


def test_render_appearance_matches_render_shaded_in_the_region(flame_model, head_texture, sequence):
    """Independent path: render.render_shaded textures and lights the whole mesh."""
    p = sequence.params
    out = flame_model(shape=p.shape.expand(2, -1), expression=p.expression[:2], jaw_pose=p.jaw[:2])
    verts = torch.einsum("tij,tvj->tvi", p.rotation[:2], out.vertices) + p.translation[:2, None]
    albedo = head_texture.albedo(torch.as_tensor(sequence.texture)).clamp(0, 1)
    sh = torch.as_tensor(sequence.lighting).expand(2, 9, 3)
    focal, pp = torch.as_tensor(sequence.focal), torch.as_tensor(sequence.principal_point)
    region = face_region_mask(flame_model)
    r = render_appearance(verts, flame_model.faces, head_texture.face_uvs(), albedo, sh, focal, pp, (64, 64), region)
    K = torch.tensor([[focal[0], 0, pp[0]], [0, focal[1], pp[1]], [0, 0, 1.0]])
    rgb, _ = render_shaded(verts, flame_model.faces, K, 64, face_uvs=head_texture.face_uvs(),
                           texture=albedo.expand(2, -1, -1, -1), sh_coeffs=sh, smooth_edges=False)
    # away from blended edges the two agree
    inner = r.region & (r.coverage > 0.999)
    assert inner.sum() > 500
    torch.testing.assert_close(r.colour[inner], rgb[inner], atol=2e-5, rtol=1e-4)
    assert (r.colour[~r.region & (r.coverage == 0)] == 0).all()


# ----------------------------------------------------------------------------
# Fitting


def landmark_track(sequence, params, valid=None):
    """The landmark track and camera `refine` starts from: `params` on every
    frame, the sequence's detected 68 landmarks."""
    T = len(sequence.frames)
    base = Track(frame_ids=np.arange(T), valid=np.ones(T, bool) if valid is None else valid, shape=None,
                 expression=None, jaw_pose=None, neck_pose=np.zeros((T, 3), np.float32), eye_pose=None,
                 rotation=None, translation=None, crop_boxes=np.zeros((T, 4), np.float32),
                 lmk68=np.asarray(sequence.lmk68, np.float32), lmk_dense=np.full((T, 478, 2), np.nan, np.float32),
                 fps=np.float32(25.0))
    H, W = sequence.frames[0].shape[:2]
    return Track.from_torch(params, like=base), Camera(np.asarray(sequence.focal, np.float32),
                                                      np.asarray(sequence.principal_point, np.float32),
                                                      np.array([H, W], np.int64))


def test_photometric_fit_recovers_perturbed_pose_and_expression(flame_model, head_texture, sequence):
    """Landmark term off: only the rendering can bring the parameters back.
    The frames have one light, so the per-video lighting model is exact."""
    init = perturb_params(sequence.params, seed=2)
    cfg = SynthesisConfig(image_size=64, texture_size=64, w_landmark=0.0, smoothing=None, iterations=80,
                          lighting="per_video", appearance_iterations=60, batch_size=4)
    T = len(sequence.frames)
    res = refine(flame_model, head_texture, list(sequence.frames), *landmark_track(sequence, init), cfg)
    assert res.track.n_frames == T
    rot0, _, px0 = recovery_errors(flame_model, init, sequence.params, sequence.region_vertices, sequence.focal)
    rot1, _, px1 = recovery_errors(flame_model, res.track.to_torch(), sequence.params, sequence.region_vertices,
                                   sequence.focal)
    assert rot1 < rot0 / 2, (rot0, rot1)
    assert px1 < px0 / 2, (px0, px1)
    assert res.photometric_error_after < res.photometric_error_before / 2
    assert res.texture.shape == (head_texture.n_components,) and res.lighting.shape == (9, 3)
    assert np.isfinite(res.photometric_error_per_frame).all()


def test_per_frame_lighting_invalid_frames_and_smoothing(flame_model, head_texture, sequence):
    init = perturb_params(sequence.params, seed=3)
    T = len(sequence.frames)
    valid = np.ones(T, bool)
    valid[2] = False
    calls = []

    def frames(i):
        calls.append(i)
        return sequence.frames[i]

    cfg = SynthesisConfig(image_size=48, texture_size=32, lighting="per_frame", iterations=3,
                          appearance_iterations=3, batch_size=2)
    res = refine(flame_model, head_texture, frames, *landmark_track(sequence, init, valid), cfg)
    assert 2 not in calls  # invalid frames are never read
    assert res.image_size == (48, 48)
    assert res.lighting.shape == (T, 9, 3)
    assert np.isnan(res.photometric_error_per_frame[2]) and np.isfinite(res.photometric_error_per_frame[valid]).all()
    # the smoother fills the invalid frame between its neighbours
    refined = res.track.to_torch()
    assert torch.isfinite(refined.rotation[2]).all()
    t = refined.translation
    assert (t[2] - 0.5 * (t[1] + t[3])).norm() < 0.5 * (t[1] - t[3]).norm() + 1e-3
    assert not torch.allclose(t[2], init.translation[2])  # the input value was not kept


def test_refine_rejects_mismatched_texture_and_frames(flame_model, head_texture, sequence, tmp_path):
    other = load_texture_space(write_synthetic_texture(tmp_path / "t.npz", size=8, n_comp=2, n_faces=17))
    with pytest.raises(AssetError, match="17 faces"):
        refine(flame_model, other, list(sequence.frames), *landmark_track(sequence, sequence.params),
               SynthesisConfig())
    frames = list(sequence.frames)
    frames[1] = frames[1][:32]
    with pytest.raises(UsageError, match="one size"):
        refine(flame_model, head_texture, frames, *landmark_track(sequence, sequence.params),
               replace(SynthesisConfig(), iterations=1, appearance_iterations=1))


def test_real_template_uvs_and_face_region(real_embedding_dir, tmp_path):
    """FLAME's own head_template_mesh.obj: its UVs load for a BFM albedo, and
    the face region on FLAME's topology is the front of the face."""
    if real_embedding_dir is None:
        pytest.skip("../shared/real-assets not beside this checkout")
    from lightning_ft.flame import FLAME
    from lightning_ft.synthetic.flame_files import write_synthetic_flame

    obj = real_embedding_dir / "head_template_mesh.obj"
    bfm = write_synthetic_bfm_albedo(tmp_path / "FLAME_albedo_from_BFM.npz", size=8, n_comp=2)
    ts = load_texture_space(bfm, uv_obj=obj)
    assert ts.vt.shape == (5118, 2) and ts.ft.shape == (9976, 3)
    assert float(ts.vt.min()) >= 0.0 and float(ts.vt.max()) <= 1.0
    f = write_synthetic_flame(tmp_path / "flame", template_obj=obj, real_embeddings=real_embedding_dir)
    flame = FLAME(f.model, f.landmark_embedding, f.mediapipe_embedding)
    region = face_region_mask(flame)
    faces, v = flame.faces, flame.v_template
    share = float(region.float().mean())
    assert 0.05 < share < 0.5, share
    centre = v[faces[region]].mean((0, 1))
    lmk = flame.landmarks68(v[None], torch.eye(3)[None])[0]
    # the region's centre lies near the nose, between the eyes and the mouth
    assert lmk[48:68, 1].mean() < centre[1] < lmk[36:48, 1].mean()
    assert abs(float(centre[0])) < 0.01
