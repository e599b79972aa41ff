"""End-to-end runs of the tracker (`track_lightning.py`'s entry point) on real
and generated video: a real talking face, a still photograph, a batch over a
folder with broken files, a run killed while writing, and the -v video.

The FLAME model is a STAND-IN: FLAME's real topology and real landmark
embeddings (from ../shared, third-party, never committed) with synthetic
blendshapes, so its landmarks sit on real facial features but its identity
and expression spaces are not FLAME's. Where ../shared is absent, the
procedural model of conftest is used instead. The fit is therefore not as
tight as with FLAME itself; bounds below say how they were chosen.

Each tracker run happens once per module (fixtures); pictures for a person to
look at go to test-artifacts/e2e/ (git-ignored).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from lightning_ft.cli import track_main
from lightning_ft.results import TRACKING_KEYS, is_finished, load_tracking
from lightning_ft.synthetic import clips

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "e2e"

# Crop size for the real-video runs: carphone's face is ~80 px tall in a
# 176x144 source, so 256 px crops already upsample it ~2x; 512 would only cost.
CROP = 256
# Tiny clips for the batch / kill / -v runs, where what matters is the
# bookkeeping, not the fit.
SMALL_CROP, SMALL_FRAMES = 128, 8


def _track(*args: str) -> int:
    return track_main([*map(str, args), "--no-emoca", "-q", "-d", "cpu"])


def _decoded_frame_count(path: Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream))


def _rotation_angles_deg(R: np.ndarray, R_ref: np.ndarray) -> np.ndarray:
    """Geodesic angle (degrees) of R[t] R_ref^T, [T]."""
    rel = R @ R_ref.T
    cos = np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)
    return np.degrees(np.arccos(cos))


def _mean_rotation(R: np.ndarray) -> np.ndarray:
    """Chordal L2 mean of rotations [T,3,3] (projection of the average)."""
    u, _, vt = np.linalg.svd(R.mean(0))
    return u @ np.diag([1, 1, np.linalg.det(u @ vt)]) @ vt


def _fitted_lmk68(result: dict, flame) -> np.ndarray:
    """68 landmarks [T,68,2] (crop px) recomputed from tracking.npz with the
    FLAME model and the README's camera: x = R X + t, u = f x/z + c."""
    from lightning_ft.fitter import head_rotation_flame

    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    T = len(result["frame_ids"])
    with torch.no_grad():
        out = flame(shape=t(result["shape"])[None].expand(T, -1), expression=t(result["expression"]),
                    jaw_pose=t(result["jaw_pose"]), eye_pose=t(result["eye_pose"]))
        R, tr = t(result["rotation"]), t(result["translation"])
        lmk = flame.landmarks68(out.vertices, head_rotation_flame(R))
        cam = torch.einsum("tij,tvj->tvi", R, lmk) + tr[:, None]
    uv = cam[..., :2] / cam[..., 2:3] * t(result["focal_length"]) + t(result["principal_point"])
    return uv.numpy().astype(np.float64)


def _save_png(path: Path, image: np.ndarray) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.partial.png"
    cv2.imwrite(str(tmp), np.ascontiguousarray(image[..., ::-1]))
    os.replace(tmp, path)
    return path


def _draw(image: np.ndarray, detected: np.ndarray, fitted: np.ndarray, scale: int = 2) -> np.ndarray:
    """Crop enlarged `scale`x with detected (green) and fitted (magenta) points."""
    import cv2

    big = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    for pts, colour in ((detected, (0, 230, 0)), (fitted, (255, 0, 255))):
        for x, y in pts:
            if np.isfinite(x) and np.isfinite(y):
                cv2.circle(big, (int(round((x + 0.5) * scale - 0.5)), int(round((y + 0.5) * scale - 0.5))),
                           2, colour, -1)
    return big


# ----------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def e2e_assets(tmp_path_factory, real_embedding_dir, assets_dir):
    """assets/ with the FLAME tier: real topology + real embeddings stand-in
    when ../shared is present, else the procedural model."""
    if real_embedding_dir is None:
        return assets_dir
    from lightning_ft.synthetic.flame_files import write_synthetic_flame

    root = tmp_path_factory.mktemp("e2e_assets")
    write_synthetic_flame(root / "FLAME", template_obj=real_embedding_dir / "head_template_mesh.obj",
                          real_embeddings=real_embedding_dir)
    return root


@pytest.fixture(scope="module")
def e2e_flame(e2e_assets):
    from lightning_ft.batch import load_flame

    return load_flame(e2e_assets)


@pytest.fixture(scope="module")
def carphone_run(tmp_path_factory, e2e_assets):
    out = tmp_path_factory.mktemp("carphone_out")
    video = clips.carphone_path()
    rc = _track("--data", video, "--assets", e2e_assets, "--out", out, "--image-size", CROP)
    return rc, video, out / "carphone_pristine"


@pytest.fixture(scope="module")
def still_run(tmp_path_factory, e2e_assets):
    d = tmp_path_factory.mktemp("still")
    video = clips.write_still_clip(d / "astronaut_still.mp4", n_frames=40, fps=25, noise_std=2.0, crf=23)
    rc = _track("--data", video, "--assets", e2e_assets, "--out", d / "out", "--image-size", CROP)
    return rc, video, d / "out" / "astronaut_still"


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("small_clip")
    return clips.write_excerpt(clips.carphone_path(), d / "clip.mp4", n_frames=SMALL_FRAMES)


# ----------------------------------------------------------------------------
# 1. Real video


def test_carphone_result_contract(carphone_run, e2e_flame):
    rc, video, folder = carphone_run
    assert rc == 0
    assert is_finished(folder)
    r = load_tracking(folder).arrays()
    T = _decoded_frame_count(video)
    assert set(TRACKING_KEYS) <= set(r)
    expected = {"frame_ids": (T,), "valid": (T,), "shape": (e2e_flame.n_shape,),
                "expression": (T, e2e_flame.n_exp), "jaw_pose": (T, 3), "neck_pose": (T, 3), "eye_pose": (T, 6),
                "rotation": (T, 3, 3), "translation": (T, 3), "focal_length": (2,), "principal_point": (2,),
                "image_size": (2,), "crop_boxes": (T, 4), "lmk68": (T, 68, 2), "lmk_dense": (T, 478, 2),
                "fps": ()}
    assert {k: r[k].shape for k in expected} == expected
    np.testing.assert_array_equal(r["frame_ids"], np.arange(T))
    assert r["valid"].mean() >= 0.95
    np.testing.assert_array_equal(r["image_size"], [CROP, CROP])
    assert abs(float(r["fps"]) - 30000 / 1001) < 1e-3
    # Invalid frames are interpolated: every parameter is finite.
    for k in ("shape", "expression", "jaw_pose", "neck_pose", "eye_pose", "rotation", "translation",
              "focal_length", "principal_point", "crop_boxes"):
        assert np.isfinite(r[k]).all(), k
    np.testing.assert_allclose(r["rotation"] @ r["rotation"].transpose(0, 2, 1), np.eye(3)[None].repeat(T, 0),
                               atol=1e-4)
    assert (r["translation"][:, 2] > 0).all(), "head behind the camera"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["frames"]["total"] == T
    q = meta["quality"]
    for k in ("mean_error_68_px", "mean_error_dense_px", "jitter_68_fitted_px", "jitter_68_detected_px"):
        assert q[k] is not None and np.isfinite(q[k]), k


def test_carphone_fit_quality(carphone_run, e2e_flame, real_embedding_dir):
    rc, video, folder = carphone_run
    assert rc == 0
    q = json.loads((folder / "meta.json").read_text())["quality"]
    at512 = 512 / CROP
    # Measured 2.0-2.1 px at 256 (4.1-4.3 px at 512) with the real-topology
    # stand-in; 8 px at 512 leaves ~2x headroom and is still well below what a
    # wrong pose or scale gives (tens of px).
    if real_embedding_dir is None:
        pytest.skip("fit quality on a real face needs the real-topology stand-in (../shared/real-assets); "
                    "the procedural head has no real facial layout (CI has ../shared)")
    bound512 = 8.0
    assert q["mean_error_dense_px"] * at512 < bound512
    assert q["mean_error_68_px"] * at512 < 2 * bound512
    # The temporal prior and smoother must take out detector jitter.
    assert q["jitter_68_fitted_px"] < q["jitter_68_detected_px"]


def test_carphone_saved_parameters_reproduce_the_fit(carphone_run, e2e_flame):
    """Landmarks recomputed from tracking.npz alone (FLAME + the README's
    camera) land where meta.json says the fit is; also the picture."""
    rc, video, folder = carphone_run
    assert rc == 0
    r = load_tracking(folder).arrays()
    q = json.loads((folder / "meta.json").read_text())["quality"]
    fitted = _fitted_lmk68(r, e2e_flame)
    ok = r["valid"]
    err = np.linalg.norm(fitted[ok] - r["lmk68"][ok], axis=-1)
    mean_err = float(np.nanmean(err))
    # Same figure up to the pixel-centre convention (<= 0.5 px) and float32.
    assert abs(mean_err - q["mean_error_68_px"]) < 0.6 + 0.05 * q["mean_error_68_px"]

    from lightning_ft.video import crop_frame, iter_frames

    t_show = int(np.flatnonzero(ok)[len(np.flatnonzero(ok)) // 2])
    frame = next(img for i, _, img in iter_frames(video) if i == int(r["frame_ids"][t_show]))
    crop = crop_frame(frame, r["crop_boxes"][t_show], CROP)
    _save_png(ARTIFACTS / "carphone_landmarks_detected_green_fitted_magenta.png",
              _draw(crop, r["lmk68"][t_show], fitted[t_show]))


# ----------------------------------------------------------------------------
# 2. A still face holds still


def test_still_face_holds_still(still_run, real_embedding_dir):
    if real_embedding_dir is None:
        pytest.skip("stillness of a real photograph's fit needs the real-topology stand-in "
                    "(../shared/real-assets); the procedural head has no real facial layout (CI has ../shared)")
    rc, video, folder = still_run
    assert rc == 0 and is_finished(folder)
    r = load_tracking(folder).arrays()
    q = json.loads((folder / "meta.json").read_text())["quality"]
    assert r["valid"].all()
    R, t = r["rotation"].astype(np.float64), r["translation"].astype(np.float64)
    angle = _rotation_angles_deg(R, _mean_rotation(R))
    t_std_mm = t.std(0) * 1000
    report = {"rotation_rms_deg": float(np.sqrt((angle ** 2).mean())), "rotation_max_deg": float(angle.max()),
              "translation_std_mm_xyz": t_std_mm.round(3).tolist(),
              "jitter_68_fitted_px": q["jitter_68_fitted_px"], "jitter_68_detected_px": q["jitter_68_detected_px"]}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "still_face_figures.json").write_text(json.dumps(report, indent=2))
    print(report)
    # A photograph cannot move: what is left is detector and codec noise
    # through the fit. Measured (40 frames, 256 px crop, real-topology
    # stand-in): rotation RMS 0.28 deg, max 1.07 deg (frame 0, the smoother's
    # boundary), translation std 0.17 / 0.25 / 0.54 mm (x / y / z).
    # Bounds: 0.5 deg RMS moves a point 100 px from the rotation axis by
    # < 1 px; 2 deg for the worst frame; 0.5 mm sideways is ~0.6 px at the
    # fitted f ~ 320 px and 0.27 m; depth, the weakest direction of a
    # monocular fit, gets 3 mm (~1 % of the distance).
    assert report["rotation_rms_deg"] < 0.5
    assert report["rotation_max_deg"] < 2.0
    assert t_std_mm[0] < 0.5 and t_std_mm[1] < 0.5
    assert t_std_mm[2] < 3.0
    assert q["jitter_68_fitted_px"] < q["jitter_68_detected_px"]


@pytest.mark.xfail(strict=True, reason="known gap (issue 5; FLAME's real shape space is license-gated): with the "
                   "stand-in's synthetic shape space the identity absorbs head pitch on a frontal photograph "
                   "(measured -33 to -41 deg, |shape| 61-98; "
                   "a shape prior scaled with the frame count fixed this but cost focal accuracy and stillness)")
def test_frontal_photograph_is_fitted_frontal_with_a_plausible_identity(still_run, e2e_flame):
    """The astronaut looks into the camera: the fitted head must too, and the
    identity must stay within the prior's range (coefficients are in units
    of the prior's standard deviation, sigma_shape = 1)."""
    rc, video, folder = still_run
    assert rc == 0
    r = load_tracking(folder).arrays()
    forward = r["rotation"].astype(np.float64) @ np.array([0.0, 0.0, 1.0])  # FLAME +z: out of the face
    pitch = np.degrees(np.arctan2(forward[:, 1], -forward[:, 2])).mean()
    yaw = np.degrees(np.arctan2(forward[:, 0], -forward[:, 2])).mean()
    shape_rms = float(np.sqrt(np.mean(r["shape"].astype(np.float64) ** 2)))
    print({"pitch_deg": pitch, "yaw_deg": yaw, "shape_rms_sigma": shape_rms})
    from lightning_ft.video import crop_frame, iter_frames

    frame = next(img for _, _, img in iter_frames(video))
    _save_png(ARTIFACTS / "still_landmarks_detected_green_fitted_magenta.png",
              _draw(crop_frame(frame, r["crop_boxes"][0], CROP), r["lmk68"][0], _fitted_lmk68(r, e2e_flame)[0]))
    # The photograph's head is within a few degrees of frontal (a fit of the
    # same landmarks with the identity held at the mean gives pitch -4.6,
    # yaw -1.8 deg); 15 deg allows for the stand-in model.
    assert abs(pitch) < 15 and abs(yaw) < 15
    # 3 sigma RMS over all coefficients is already an extreme face.
    assert shape_rms < 3.0


# ----------------------------------------------------------------------------
# 3. Batch over a folder


@pytest.fixture(scope="module")
def batch(tmp_path_factory, small_clip, e2e_assets):
    root = tmp_path_factory.mktemp("batch")
    data, out = root / "videos", root / "out"
    # Two copies with the same file name in different folders: their
    # results must not collide.
    for sub in ("a", "b"):
        (data / sub).mkdir(parents=True)
        shutil.copy(small_clip, data / sub / "clip.mp4")
    clips.write_truncated(small_clip, data / "c" / "broken.mp4", keep_fraction=0.3)
    clips.write_empty(data / "d" / "empty.mp4")
    return data, out


def _rows(stdout: str) -> dict:
    """Summary table rows: video path -> status."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] in ("done", "skipped", "failed"):
            rows[parts[0]] = parts[1]
    return rows


@pytest.fixture(scope="module")
def batch_first_run(batch, e2e_assets):
    data, out = batch
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = _track("--data", data, "--assets", e2e_assets, "--out", out, "--image-size", SMALL_CROP)
    return rc, buf.getvalue()


def test_batch_goes_on_after_failures(batch, batch_first_run):
    data, out = batch
    rc, stdout = batch_first_run
    assert rc != 0
    rows = _rows(stdout)
    assert rows == {str(data / "a" / "clip.mp4"): "done", str(data / "b" / "clip.mp4"): "done",
                    str(data / "c" / "broken.mp4"): "failed", str(data / "d" / "empty.mp4"): "failed"}
    assert "2 done, 0 skipped, 2 failed" in stdout
    for stem in ("a/clip", "b/clip"):
        assert is_finished(out / stem)
        assert len(load_tracking(out / stem).track.frame_ids) == SMALL_FRAMES
    assert not (out / "c/broken").exists() and not (out / "d/empty").exists()


def test_batch_rerun_skips_shards_partition_and_overwrite_redoes(batch, batch_first_run, e2e_assets, capsys):
    import contextlib
    import io

    data, out = batch
    assert is_finished(out / "a/clip")

    def run(*extra):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = _track("--data", data, "--assets", e2e_assets, "--out", out, "--image-size", SMALL_CROP, *extra)
        return rc, _rows(buf.getvalue())

    stamp = {s: (out / s / "meta.json").stat().st_mtime_ns for s in ("a/clip", "b/clip")}
    rc, rows = run()
    assert rc != 0  # the broken files still fail
    assert rows[str(data / "a" / "clip.mp4")] == "skipped" and rows[str(data / "b" / "clip.mp4")] == "skipped"
    # Shards are computed from the sorted list; finished videos are skipped,
    # so the partition is seen without tracking anything again.
    _, s0 = run("--shard", "0/2")
    _, s1 = run("--shard", "1/2")
    assert set(s0).isdisjoint(s1)
    assert set(s0) | set(s1) == set(rows)
    assert all(len(s) == 2 for s in (s0, s1))
    # --overwrite redoes only what its shard selects.
    a_shard = s0 if str(data / "a" / "clip.mp4") in s0 else s1
    rc, rows_ow = run("--overwrite", "--shard", "0/2" if a_shard is s0 else "1/2")
    assert rows_ow[str(data / "a" / "clip.mp4")] == "done"
    assert is_finished(out / "a/clip")
    assert (out / "a/clip" / "meta.json").stat().st_mtime_ns != stamp["a/clip"]
    assert (out / "b/clip" / "meta.json").stat().st_mtime_ns == stamp["b/clip"]


# ----------------------------------------------------------------------------
# 4. Kill-safety


_KILL_WHILE_WRITING = """
import os, signal, sys
import lightning_ft.pipeline as pipeline
real_write = pipeline.write_result
def write_then_die(folder, track, camera, meta, extra=None):
    def die(tmp_folder):
        # tracking.npz is already in the temporary folder: the worst moment.
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(folder, track, camera, meta, extra=die)
pipeline.write_result = write_then_die
from lightning_ft.cli import track_main
sys.exit(track_main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def killed_then_rerun(tmp_path_factory, small_clip, e2e_assets):
    """A run SIGKILLed mid-write, what it left behind, then a rerun with -v
    (one tracker run serves the kill-safety and the -v tests)."""
    out = tmp_path_factory.mktemp("killed") / "out"
    args = ["--data", str(small_clip), "--assets", str(e2e_assets), "--out", str(out), "--image-size",
            str(SMALL_CROP)]
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _KILL_WHILE_WRITING, *args, "--no-emoca", "-q", "-d", "cpu"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    left = {p.name: is_finished(p) for p in out.iterdir() if p.name != ".cache"} if out.exists() else {}
    rc = _track(*args, "-v")
    return proc, left, rc, out / "clip"


def test_killed_run_leaves_nothing_finished_and_rerun_completes(killed_then_rerun):
    proc, left, rc, folder = killed_then_rerun
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert any(name.startswith(".clip.partial-") for name in left), f"the kill did not happen mid-write: {left}"
    assert not any(left.values()), f"a killed run left a finished-looking folder: {left}"
    assert "clip" not in left
    assert rc == 0, "the rerun (with -v) failed"
    assert is_finished(folder)
    assert len(load_tracking(folder).track.frame_ids) == SMALL_FRAMES


# ----------------------------------------------------------------------------
# 5. -v


def test_visualization_video(killed_then_rerun):
    _, _, rc, folder = killed_then_rerun
    assert rc == 0
    vis = folder / "visualization.mp4"
    assert is_finished(folder) and vis.exists()
    with av.open(str(vis)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    assert len(frames) == SMALL_FRAMES
    # Three panels of the crop's size side by side.
    assert frames[0].shape[0] >= SMALL_CROP and frames[0].shape[1] >= 3 * SMALL_CROP
    _save_png(ARTIFACTS / "visualization_frame.png", frames[len(frames) // 2])
