"""End-to-end behaviour through the CLI: errors, --landmarks ground truth, resume."""

import json

import numpy as np
import pytest
import torch

from lightning_ft.cli import main, resolve_device, track_main
from lightning_ft.errors import UsageError
from lightning_ft.results import PER_FRAME_QUALITY_KEYS, TRACKING_KEYS, is_finished, load_tracking
from lightning_ft.synthetic.sequences import make_sequence

# One thread: two OpenMP threads spin against each other on the shared two cores.
torch.set_num_threads(1)


def test_missing_video_is_one_line_and_nonzero(capsys, tmp_path):
    rc = track_main(["--data", str(tmp_path / "missing.mp4")])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.strip().count("\n") == 0 and "missing.mp4" in err and "Traceback" not in err


def test_device_parsing():
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device(None) == "cpu"
        with pytest.raises(UsageError, match="GPU 7 is not available"):
            resolve_device("7")
    with pytest.raises(UsageError):
        resolve_device("gpu-seven")


@pytest.fixture(scope="module")
def gt_run(tmp_path_factory, flame_model, assets_dir):
    """A synthetic talking head (known focal, shape, motion) tracked from
    its noisy landmarks through the CLI."""
    d = tmp_path_factory.mktemp("gt")
    seq = make_sequence(flame_model, T=60, focal=1200.0, seed=3, noise_px=1.0)
    np.savez(d / "seq.npz", lmk68=seq.lmk68, lmk_dense=seq.lmk_dense, image_size=np.array([512, 512]))
    rc = track_main(["--landmarks", str(d / "seq.npz"), "--no-emoca", "--assets", str(assets_dir),
                     "--out", str(d / "out"), "-q"])
    assert rc == 0
    with np.load(d / "out" / "seq" / "tracking.npz") as z:
        result = {k: z[k] for k in z.files}
    meta = json.loads((d / "out" / "seq" / "meta.json").read_text())
    return seq, result, meta, d


def test_tracking_npz_has_exactly_the_contract_keys(gt_run):
    seq, r, meta, _ = gt_run
    T = seq.lmk68.shape[0]
    assert set(r) == set(TRACKING_KEYS) | set(PER_FRAME_QUALITY_KEYS)
    shapes = {"frame_ids": (T,), "valid": (T,), "shape": (100,), "expression": (T, 50), "jaw_pose": (T, 3),
              "neck_pose": (T, 3), "eye_pose": (T, 6), "rotation": (T, 3, 3), "translation": (T, 3),
              "focal_length": (2,), "principal_point": (2,), "image_size": (2,), "crop_boxes": (T, 4),
              "lmk68": (T, 68, 2), "lmk_dense": (T, 478, 2)}
    for k, s in shapes.items():
        assert r[k].shape == s, k
    assert meta["complete"] and meta["quality"]["mean_error_68_px"] > 0
    for k in ("jitter_68_fitted_px", "jitter_68_detected_px", "mean_error_dense_px"):
        assert np.isfinite(meta["quality"][k])
    assert set(meta["stage_seconds"]) >= {"calibration", "fitting", "smoothing", "total"}


def test_meta_json_has_its_entries_with_the_runs_figures(gt_run):
    seq, r, meta, _ = gt_run
    T = seq.lmk68.shape[0]
    assert list(meta) == ["video", "frames", "landmarks", "emoca", "model", "flame", "camera", "calibration",
                          "quality", "synthesis", "settings", "sources", "result_settings", "settings_fingerprint",
                          "versions", "stage_seconds", "complete"]
    assert meta["frames"] == {"total": T, "valid": int(r["valid"].sum()), "invalid": int((~r["valid"]).sum())}
    assert meta["landmarks"]["image_size"] == [512, 512] and meta["emoca"] == {"used": False}
    assert meta["camera"]["convention"].startswith("OpenCV: x right, y down, z forward")
    np.testing.assert_allclose(meta["camera"]["focal_length"], r["focal_length"], rtol=1e-6)
    np.testing.assert_allclose(meta["camera"]["principal_point"], r["principal_point"], rtol=1e-6)
    assert meta["model"]["name"] == "flame" and meta["flame"]["model_path"].endswith("generic_model.pkl")
    assert meta["video"]["landmarks_file"].endswith("seq.npz") and meta["synthesis"] is None
    assert meta["stage_seconds"]["total"] >= meta["stage_seconds"]["fitting"] > 0


def _project(r, flame_model):
    t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    from lightning_ft.fitter import head_rotation_flame

    T = r["rotation"].shape[0]
    with torch.no_grad():
        out = flame_model(shape=t(r["shape"])[None].expand(T, -1), expression=t(r["expression"]),
                          jaw_pose=t(r["jaw_pose"]), eye_pose=t(r["eye_pose"]))
        R, tr = t(r["rotation"]), t(r["translation"])
        lmk = flame_model.landmarks68(out.vertices, head_rotation_flame(R))
        cam = lambda X: torch.einsum("tij,tvj->tvi", R, X) + tr[:, None]  # noqa: E731
        p = cam(lmk)
        uv = p[..., :2] / p[..., 2:3] * t(r["focal_length"]) + t(r["principal_point"])
        return uv.numpy(), cam(out.vertices).numpy()


def test_ground_truth_recovery(gt_run, flame_model):
    seq, r, meta, _ = gt_run
    uv, verts = _project(r, flame_model)
    # The contract's projection (x,y,z) = R X + t, u = fx x/z + cx reproduces
    # the noiseless landmarks: the bound.
    reproj = np.linalg.norm(uv - seq.clean_lmk68, axis=-1).mean()
    assert reproj <= 1.0
    # Focal within the 5 %. The 3-D error's bound is a regression
    # bound above the 3 mm goal: with 1 px noise on 32 frames the
    # focal is a few percent off, and after the scale alignment a focal off
    # by x % leaves the head about x % too large or small (~0.8 mm per %).
    focal_err = abs(r["focal_length"][0] / seq.focal - 1)
    assert focal_err <= 0.05
    s = (verts * seq.vertices_cam).sum() / (verts ** 2).sum()
    aligned = np.linalg.norm(s * verts - seq.vertices_cam, axis=-1).mean()
    # 5.0 mm at -4.4 % focal since the frames are chosen without randomness
    # and the field-of-view prior (centred on 55 deg, this 512 px "source" is
    # a 24 deg lens) pulls by about 1 % (issue 20)
    assert aligned < 0.0055
    # calibration's own estimate of its focal spread is in meta.json, and the
    # actual error lies within a few of its sigmas
    predicted = meta["calibration"]["focal_rel_std"]
    assert 0 < predicted < 0.2 and focal_err < 3 * predicted
    print(f"reprojection {reproj:.3f} px, focal error {100 * focal_err:.1f} % (predicted std "
          f"{100 * predicted:.1f} %), vertex error "
          f"{1000 * np.linalg.norm(verts - seq.vertices_cam, axis=-1).mean():.2f} mm unaligned, "
          f"{1000 * aligned:.2f} mm after scale {s:.3f}")


def test_weakly_determined_focal_is_reported(tmp_path, flame_model, assets_dir, caplog):
    # A long lens (4000 px at 512 px) and 2 px noise leave little perspective:
    # the run says so once and meta.json carries the predicted spread.
    import logging

    caplog.set_level(logging.INFO, logger="lightning_ft")
    seq = make_sequence(flame_model, T=40, focal=4000.0, seed=1, noise_px=2.0)
    np.savez(tmp_path / "far.npz", lmk68=seq.lmk68, lmk_dense=seq.lmk_dense, image_size=np.array([512, 512]))
    rc = track_main(["--landmarks", str(tmp_path / "far.npz"), "--no-emoca", "--assets", str(assets_dir),
                     "--out", str(tmp_path / "out")])
    assert rc == 0
    warned = [r for r in caplog.records if "weakly determined" in r.getMessage()]
    # advice, named for the input, at INFO so that -q hides it (the figure is in meta.json)
    assert len(warned) == 1 and warned[0].levelname == "INFO" and "far.npz" in warned[0].getMessage()
    meta = json.loads((tmp_path / "out" / "far" / "meta.json").read_text())
    assert meta["calibration"]["focal_rel_std"] > 0.15


def test_finished_result_is_skipped_on_rerun(gt_run, assets_dir, capsys):
    seq, r, meta, d = gt_run
    before = (d / "out" / "seq" / "meta.json").stat().st_mtime_ns
    rc = track_main(["--landmarks", str(d / "seq.npz"), "--no-emoca", "--assets", str(assets_dir),
                     "--out", str(d / "out"), "-q"])
    assert rc == 0 and "skipped" in capsys.readouterr().out
    assert (d / "out" / "seq" / "meta.json").stat().st_mtime_ns == before


def test_assets_check_subcommand(assets_dir, capsys):
    rc = main(["assets", "check", "--assets", str(assets_dir)])
    out = capsys.readouterr().out
    assert "generic_model.pkl" in out and "present" in out
    assert rc == 3  # EMOCA and texture tiers are missing from this folder


def test_export_subcommand_writes_meshes(gt_run, capsys):
    seq, r, meta, d = gt_run
    rc = main(["export", str(d / "out" / "seq"), "--format", "mesh", "--out", str(d / "exported")])
    assert rc == 0
    objs = sorted((d / "exported").rglob("*.obj"))
    assert len(objs) == seq.lmk68.shape[0] + 1  # one per frame + the identity mesh
    info = json.loads(next((d / "exported").rglob("export_info.json")).read_text())
    assert info and "sha256" in json.dumps(info)


def test_emoca_tier_runs_end_to_end(tmp_path, assets_dir):
    """With an EMOCA release present (synthetic weights of the real structure)
    the tracker initialises from it and records that in meta.json."""
    import shutil

    from lightning_ft.synthetic.clips import carphone_path, write_excerpt
    from lightning_ft.synthetic.emoca_files import write_synthetic_release

    assets = tmp_path / "assets"
    shutil.copytree(assets_dir, assets)
    write_synthetic_release(assets / "EMOCA")
    clip = write_excerpt(carphone_path(), tmp_path / "clip.mp4", n_frames=6)
    rc = track_main(["--data", str(clip), "--assets", str(assets), "--out", str(tmp_path / "out"),
                     "--image-size", "128", "-q", "-d", "cpu"])
    assert rc == 0
    meta = json.loads((tmp_path / "out" / "clip" / "meta.json").read_text())
    assert meta["emoca"]["used"] and "emoca" in meta["stage_seconds"]
    assert np.isfinite(meta["quality"]["mean_error_68_px"])


# ----------------------------------------------------------------------------
# --synthesis


def _assets_with(assets_dir, tmp_path, texture_files):
    """A copy of the FLAME-tier assets with `texture_files(flame_folder)` added."""
    import shutil

    assets = tmp_path / "assets"
    shutil.copytree(assets_dir, assets)
    texture_files(assets / "FLAME")
    return assets


@pytest.fixture(scope="module")
def synthesis_run(tmp_path_factory, assets_dir, flame_model):
    """A few carphone frames tracked with --synthesis -v (`batch.run`, as
    the CLI calls it, with few Adam steps: what is checked here is the
    plumbing, not the fit): the procedural FLAME and a smooth skin-coloured
    texture space whose UVs fit it."""
    from lightning_ft.batch import run
    from lightning_ft.pipeline import TrackConfig
    from lightning_ft.synthesis import SynthesisConfig
    from lightning_ft.synthetic.clips import carphone_path, write_excerpt
    from lightning_ft.synthetic.texture_files import write_synthetic_texture_for_mesh

    d = tmp_path_factory.mktemp("synthesis")
    assets = _assets_with(assets_dir, d, lambda folder: write_synthetic_texture_for_mesh(
        folder / "FLAME_texture.npz", flame_model.v_template.numpy(), flame_model.faces.numpy(), size=64, n_comp=8))
    clip = write_excerpt(carphone_path(), d / "clip.mp4", n_frames=4)
    cfg = TrackConfig(data=clip, out_dir=d / "out", assets_dir=assets, visualize=True, synthesis=True,
                      no_emoca=True, image_size=128, progress=False,
                      synthesis_config=SynthesisConfig(iterations=4, appearance_iterations=8))
    outcomes = run(cfg)
    return [o.status for o in outcomes], assets, d / "out" / "clip"


def test_synthesis_adds_texture_lighting_and_photometric_errors(synthesis_run):
    status, _, folder = synthesis_run
    assert status == ["done"] and is_finished(folder)
    with np.load(folder / "tracking.npz") as z:
        r = {k: z[k] for k in z.files}
    T = len(r["frame_ids"])
    assert set(r) == set(TRACKING_KEYS) | set(PER_FRAME_QUALITY_KEYS) | {"texture", "lighting"}
    assert r["texture"].shape == (8,)  # all 8 components of the file (fewer than SynthesisConfig.n_texture)
    assert r["lighting"].shape == (T, 9, 3)  # per-frame lighting, the default
    assert np.isfinite(r["texture"]).all() and np.isfinite(r["lighting"]).all()
    meta = json.loads((folder / "meta.json").read_text())
    s = meta["synthesis"]
    assert s["lighting_mode"] == "per_frame" and s["texture_space"] == "FLAME_texture"
    assert 0 < s["photometric_error_after"] < 1 and 0 < s["photometric_error_before"] < 1
    assert s["settings"]["iterations"] == 4
    assert {"synthesis", "visualization"} <= set(meta["stage_seconds"])


def test_visualization_after_synthesis_shows_the_fitted_appearance(synthesis_run, flame_model):
    """The right panel of frame 0 matches synthesis's own renderer
    (`render_appearance`) with the saved texture and lighting inside the face
    region, and is far from the grey display shading."""
    import av

    from lightning_ft.render import render_shaded
    from lightning_ft.synthesis import face_region_mask, load_texture_space, render_appearance

    status, assets, folder = synthesis_run
    assert status == ["done"]
    result = load_tracking(folder)
    r = {**result.track.arrays(), **result.camera.arrays()}
    with av.open(str(folder / "visualization.mp4")) as container:
        frame0 = next(container.decode(container.streams.video[0])).to_ndarray(format="rgb24")
    H, W = (int(v) for v in r["image_size"])
    panel = frame0[:H, 2 * W:3 * W].astype(np.float64)

    verts = torch.as_tensor(_project(r, flame_model)[1][:1])
    space = load_texture_space(assets / "FLAME" / "FLAME_texture.npz")
    albedo = space.albedo(torch.as_tensor(r["texture"])).clamp(0, 1)
    focal, pp = torch.as_tensor(r["focal_length"]), torch.as_tensor(r["principal_point"])
    with torch.no_grad():
        fitted = render_appearance(verts, flame_model.faces, space.face_uvs(), albedo,
                                   torch.as_tensor(r["lighting"][:1]), focal, pp, (H, W), face_region_mask(flame_model))
        K = torch.tensor([[focal[0], 0, pp[0]], [0, focal[1], pp[1]], [0, 0, 1.0]])
        grey, _ = render_shaded(verts, flame_model.faces, K, (H, W))
    # region pixels fully covered, two pixels away from its edge (H.264 halves the chroma resolution)
    inner = (fitted.region & (fitted.coverage > 0.999)).numpy()[0]
    inner = inner & np.roll(inner, 2, 0) & np.roll(inner, -2, 0) & np.roll(inner, 2, 1) & np.roll(inner, -2, 1)
    assert inner.sum() > 200
    err = np.abs(panel[inner] - 255 * fitted.colour[0].numpy()[inner]).mean()
    err_grey = np.abs(panel[inner] - 255 * grey[0].numpy()[inner]).mean()
    assert err < 6, (err, err_grey)
    assert err_grey > 4 * err, (err, err_grey)


@pytest.mark.parametrize("texture_files", ["none", "bfm_only", "bfm_and_obj"])
def test_synthesis_without_the_texture_space_stops_before_work(texture_files, tmp_path, assets_dir, capsys):
    """FLAME_texture.npz missing: an asset error before any work, also when
    DECA's BFM albedo (which `assets check` accepts) is there without FLAME's
    head_template_mesh.obj to give it UVs; with both, the run goes on (here
    to the unreadable video)."""
    from lightning_ft.synthetic.texture_files import write_synthetic_bfm_albedo

    def add(folder):
        if texture_files != "none":
            write_synthetic_bfm_albedo(folder / "FLAME_albedo_from_BFM.npz", size=8, n_comp=2)
        if texture_files == "bfm_and_obj":
            (folder / "head_template_mesh.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nvt 1 0\n"
                                                           "vt 0 1\nf 1/1 2/2 3/3\n")

    assets = _assets_with(assets_dir, tmp_path, add)
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not looked at")
    rc = track_main(["--data", str(video), "--assets", str(assets), "--out", str(tmp_path / "out"), "--no-emoca",
                     "--synthesis"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if texture_files == "bfm_and_obj":
        assert rc not in (0, 3) and "clip.mp4" in err, err
        return
    assert rc == 3, err
    assert "FLAME_texture.npz" in err and "--synthesis" in err
    assert ("head_template_mesh.obj" in err) == (texture_files == "bfm_only"), err
    assert not (tmp_path / "out").exists()


def test_poor_fit_is_warned_and_recorded(gt_run, flame_model, assets_dir, tmp_path, caplog):
    """Landmarks whose points are shuffled within each frame cannot be
    explained by any head: the run says so and meta.json records it; the
    ground-truth run's good fit does not."""
    seq, r, meta, _ = gt_run
    assert meta["quality"]["poor_fit"] is False and meta["quality"]["poor_fit_limit_px"] == 0.03 * 512
    rng = np.random.default_rng(0)
    shuffled = seq.lmk68[:, rng.permutation(68)]
    np.savez(tmp_path / "bad.npz", lmk68=shuffled, lmk_dense=seq.lmk_dense, image_size=np.array([512, 512]))
    rc = track_main(["--landmarks", str(tmp_path / "bad.npz"), "--no-emoca", "--assets", str(assets_dir),
                     "--out", str(tmp_path / "out"), "-q"])
    assert rc == 0
    bad = json.loads((tmp_path / "out" / "bad" / "meta.json").read_text())["quality"]
    assert bad["poor_fit"] is True and bad["mean_error_68_px"] > bad["poor_fit_limit_px"]
    warned = [r.getMessage() for r in caplog.records if "poor fit" in r.getMessage()]
    assert len(warned) == 1 and "bad.npz" in warned[0]
    assert not [r for r in caplog.records if "poor fit" in r.getMessage() and "seq.npz" in r.getMessage()]
