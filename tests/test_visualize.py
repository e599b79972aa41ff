"""Tests of the -v visualization video (lightning_ft/visualize.py)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from lightning_ft.errors import LightningFTError
from lightning_ft.cameras import project_screen
from lightning_ft.render import rasterize
from lightning_ft.visualize import write_visualization
from test_render import icosphere

torch.set_num_threads(1)

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
H, W, T = 96, 128, 5


def scene():
    """T frames: a textured-noise crop, a sphere drifting right, landmarks on known spots."""
    # smooth content: H.264 with 4:2:0 chroma cannot keep per-pixel colour noise
    ys, xs = np.mgrid[0:H, 0:W]
    base = np.stack([70 + 40 * np.sin(xs / 9.0), 90 + 30 * np.cos(ys / 7.0),
                     80 + 0.3 * xs], axis=-1).round().astype(np.uint8)
    frames = [np.roll(base, t, axis=1) for t in range(T)]
    verts, faces = icosphere(2)
    vertices = np.stack([verts * 0.1 + [0.01 * t, 0.0, 0.6] for t in range(T)])
    K = np.array([[150.0, 0, (W - 1) / 2], [0, 150.0, (H - 1) / 2], [0, 0, 1]])
    detected = np.full((T, 68, 2), np.nan)
    fitted = np.full((T, 68, 2), np.nan)
    detected[:, 0] = [20.0, 20.0]
    fitted[:, 1] = [100.0, 70.0]
    valid = np.array([True, True, False, True, True])
    return frames, vertices, faces, K, detected, fitted, valid


def decode(path: Path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        info = (stream.codec_context.name, stream.average_rate, stream.codec_context.pix_fmt)
        images = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    return info, np.stack(images)


def test_video_has_three_panels_landmarks_mesh_and_invalid_marks(tmp_path):
    frames, vertices, faces, K, detected, fitted, valid = scene()
    out = tmp_path / "sub" / "clip_vis.mp4"
    returned = write_visualization(out, iter(frames), vertices, faces, K, detected, fitted,
                                   fps=30000 / 1001, valid=valid)
    assert returned == out and out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["clip_vis.mp4"]
    (codec, rate, pix_fmt), video = decode(out)
    assert (codec, rate, pix_fmt) == ("h264", Fraction(30000, 1001), "yuv420p")
    assert video.shape == (T, H, 3 * W, 3)
    ARTIFACTS.mkdir(exist_ok=True)
    from PIL import Image
    Image.fromarray(video[2]).save(ARTIFACTS / "visualize_test_frame.png")

    video = video.astype(np.float64)
    for t in range(T):
        crop, overlay, mesh = video[t, :, :W], video[t, :, W:2 * W], video[t, :, 2 * W:]
        inner = (slice(6, H - 6), slice(6, W - 6))  # away from the invalid border
        assert np.abs(crop[inner] - frames[t][inner]).mean() < 6
        # mesh coverage from an independent rasterization of the same sphere
        screen = project_screen(torch.from_numpy(vertices[t:t + 1]), torch.from_numpy(K))
        covered = rasterize(screen, torch.from_numpy(faces), (H, W)).mask[0].numpy()
        covered_inner = covered[inner]
        mesh_inner = mesh[inner].mean(-1)
        assert mesh_inner[covered_inner].mean() > mesh_inner[~covered_inner].mean() + 60
        # the overlay differs from the crop only where the mesh is (and the dots)
        diff = np.abs(overlay[inner] - crop[inner]).mean(-1)
        assert diff[covered_inner].mean() > 15 > diff[~covered_inner].mean()
        green = overlay[20, 20]
        magenta = overlay[70, 100]
        assert green[1] > 180 and green[0] < 80 and green[2] < 80
        assert magenta[0] > 180 and magenta[2] > 180 and magenta[1] < 80
        border = video[t, 1, W // 2]
        if valid[t]:
            assert not (border[0] > 200 and border[1] < 50)
        else:
            assert border[0] > 200 and border[1] < 50 and border[2] < 50


def test_odd_sizes_callable_meshes_and_uv_textures(tmp_path):
    frames, vertices, faces, K, detected, fitted, valid = scene()
    odd = [f[:95, :127] for f in frames]
    uv = np.random.default_rng(0).uniform(0, 1, size=(len(faces), 3, 2))
    texture = np.zeros((8, 8, 3), np.uint8)
    texture[..., 2] = 255  # pure blue
    out = write_visualization(tmp_path / "odd.mp4", odd, lambda t: vertices[t], faces,
                              (K[[0, 1], [0, 1]], K[:2, 2]), detected, fitted, fps=25,
                              valid=np.ones(T, bool), textures=texture, face_uvs=uv)
    (_, rate, _), video = decode(out)
    assert rate == 25 and video.shape == (T, 96, 3 * 127 + 1, 3)
    centre = video[0, 48, 2 * 127 + 64].astype(int)
    assert centre[2] > 100 and centre[0] < 60 and centre[1] < 60


def test_sh_lighting_per_frame_and_per_video(tmp_path):
    """Only the constant SH band set: the grey mesh is lit uniformly, by
    each frame's own coefficients when they are given per frame."""
    from lightning_ft.errors import UsageError
    from lightning_ft.render import DECA_SH_CONSTANTS

    frames, vertices, faces, K, detected, fitted, valid = scene()
    irradiance = 0.2 * (1 + np.arange(T))
    lighting = np.zeros((T, 9, 3))
    lighting[:, 0] = irradiance[:, None] / DECA_SH_CONSTANTS[0]
    for name, light, expected in (("per_frame", lighting, irradiance), ("per_video", lighting[2], irradiance[[2] * T])):
        out = write_visualization(tmp_path / f"{name}.mp4", frames, vertices, faces, K, detected, fitted, fps=25,
                                  valid=np.ones(T, bool), lighting=light)
        _, video = decode(out)
        for t in range(T):
            col = 2 * W + int(round((W - 1) / 2 + 150 * 0.01 * t / 0.6))
            patch = video[t, H // 2 - 3:H // 2 + 4, col - 3:col + 4].astype(float)
            # render_shaded's default albedo is 0.75 grey
            assert abs(patch.mean() - 255 * 0.75 * expected[t]) < 4, (name, t, patch.mean())
    with pytest.raises(UsageError, match="lighting"):
        write_visualization(tmp_path / "bad.mp4", frames, vertices, faces, K, detected, fitted, fps=25,
                            valid=valid, lighting=lighting[:3])
    assert not (tmp_path / "bad.mp4").exists()


def test_a_failure_leaves_no_partial_file_and_keeps_the_old_one(tmp_path):
    frames, vertices, faces, K, detected, fitted, valid = scene()
    out = tmp_path / "clip_vis.mp4"
    out.write_bytes(b"previous result")

    def broken_frames():
        yield frames[0]
        yield frames[1]
        raise RuntimeError("decoder died")

    with pytest.raises(RuntimeError, match="decoder died"):
        write_visualization(out, broken_frames(), vertices, faces, K, detected, fitted,
                            fps=25, valid=valid)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip_vis.mp4"]


def test_frame_count_mismatch_is_reported(tmp_path):
    frames, vertices, faces, K, detected, fitted, valid = scene()
    with pytest.raises(LightningFTError, match="3 frames for 5"):
        write_visualization(tmp_path / "a.mp4", frames[:3], vertices, faces, K, detected,
                            fitted, fps=25, valid=valid)
    with pytest.raises(LightningFTError, match="more frames"):
        write_visualization(tmp_path / "b.mp4", frames + frames, vertices, faces, K,
                            detected, fitted, fps=25, valid=valid)
    assert list(tmp_path.iterdir()) == []


def test_frames_match_those_composed_from_the_differentiable_renderer():
    """The -v panels from the display renderer against the same panels
    composed from `render_shaded` (the differentiable rasterizer, with its
    antialiased coverage), as the video was made before: >= 99% of the
    pixels agree within one grey level, the rest lie on the mesh outline."""
    from lightning_ft.render import DisplayRenderer, render_shaded
    from lightning_ft.visualize import BACKGROUND_RGB, compose_frame

    frames, vertices, faces, K, detected, fitted, valid = scene()
    renderer = DisplayRenderer(faces, (H, W))
    alpha = 0.5
    for t in (0, 2, 4):
        verts = torch.from_numpy(vertices[t]).float()
        K_t = torch.from_numpy(K).float()
        image, mask = renderer.render_image(verts, K_t, background=BACKGROUND_RGB)
        frame = compose_frame(frames[t], image, mask, detected[t], fitted[t], bool(valid[t]), alpha)

        rgb, cover = render_shaded(verts[None], torch.from_numpy(faces), K_t, (H, W))
        shaded = np.round(rgb[0].numpy() * 255)
        cover = cover[0].numpy()[..., None]
        crop = frames[t].astype(np.float64)
        empty_panel = np.broadcast_to(np.asarray(BACKGROUND_RGB, np.uint8), (H, W, 3))
        reference = compose_frame(frames[t], empty_panel, np.zeros((H, W), bool),
                                  detected[t], fitted[t], bool(valid[t]), alpha).astype(np.float64)
        overlay = crop * (1 - alpha * cover) + shaded * alpha * cover
        mesh = shaded + np.asarray(BACKGROUND_RGB) * (1 - cover)
        dots = np.abs(reference[:, W:2 * W] - crop).max(-1) > 0  # landmarks and border
        reference[:, W:2 * W] = np.where(dots[..., None], reference[:, W:2 * W], np.round(overlay))
        border = np.abs(reference[:, 2 * W:] - np.asarray(BACKGROUND_RGB)).max(-1) > 0
        reference[:, 2 * W:] = np.where(border[..., None], reference[:, 2 * W:], np.round(mesh))

        off = np.abs(frame.astype(np.float64) - reference).max(-1) > 1
        assert mask.mean() > 0.1
        assert off.mean() < 0.01, off.mean()
        outline = (cover[..., 0] > 0) & (cover[..., 0] < 1)
        grown = outline.copy()
        for axis in (0, 1):
            grown |= np.roll(outline, 1, axis) | np.roll(outline, -1, axis)
        panels_off = off[:, W:2 * W] | off[:, 2 * W:]
        assert not (panels_off & ~grown).any()
        assert not off[:, :W].any()


def test_video_is_the_same_with_the_numba_and_the_pytorch_renderer(tmp_path, monkeypatch):
    from lightning_ft import render_jit

    if not render_jit.available():
        pytest.skip("numba does not import here: only the PyTorch path runs")
    frames, vertices, faces, K, detected, fitted, valid = scene()
    jit = write_visualization(tmp_path / "numba.mp4", frames, vertices, faces, K, detected, fitted,
                              fps=25, valid=valid)
    monkeypatch.setattr(render_jit, "available", lambda: False)
    plain = write_visualization(tmp_path / "torch.mp4", frames, vertices, faces, K, detected, fitted,
                                fps=25, valid=valid)
    _, a = decode(jit)
    _, b = decode(plain)
    assert a.shape == b.shape == (T, H, 3 * W, 3)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 0.05


def test_track_visualization_draws_the_posed_head_where_posing_projects_it(tmp_path, flame_model):
    """`write_track_visualization`: a FLAME track posed by `posing` lands in
    the right panel (shaded mesh) around its projected nose, not elsewhere."""
    from scipy.spatial.transform import Rotation

    from lightning_ft.posing import FramePoses
    from lightning_ft.track import Camera, Track
    from lightning_ft.visualize import write_track_visualization

    n, size = 4, 96
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    rotation = np.diag([1.0, -1.0, -1.0]) @ Rotation.from_rotvec([[0.0, 0.1 * t, 0.0] for t in range(n)]).as_matrix()
    track = Track(frame_ids=np.arange(n), valid=np.ones(n, bool), shape=np.zeros(flame_model.n_shape, np.float32),
                  expression=np.zeros((n, flame_model.n_exp), np.float32), jaw_pose=np.zeros((n, 3), np.float32),
                  neck_pose=np.zeros((n, 3), np.float32), eye_pose=np.zeros((n, 6), np.float32),
                  rotation=f32(rotation), translation=f32(np.tile([0.0, 0.0, 0.8], (n, 1))),
                  crop_boxes=np.zeros((n, 4), np.float32), lmk68=np.full((n, 68, 2), np.nan, np.float32),
                  lmk_dense=np.full((n, 478, 2), np.nan, np.float32), fps=np.float32(25.0))
    camera = Camera(f32([200.0, 200.0]), f32([(size - 1) / 2] * 2), np.array([size, size]))
    frames = [np.full((size, size, 3), 30, np.uint8) for _ in range(n)]
    out = write_track_visualization(tmp_path / "v.mp4", iter(frames), flame_model, track, camera, progress=False)
    _, video = decode(out)
    assert video.shape == (n, size, 3 * size, 3)
    poses = FramePoses(flame_model, track, camera)
    for t in range(n):
        u, v = poses.landmarks68(t)[30].round().astype(int)  # nose tip
        shaded = video[t, :, 2 * size:].astype(int)
        assert shaded[v, u].sum() > 3 * 60  # the lit mesh, not the dark background
        assert shaded[2, 2].sum() < 3 * 40 and shaded[-3, -3].sum() < 3 * 40  # corners: background
