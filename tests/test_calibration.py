"""Camera calibration: focal length and identity from sampled frames."""

import numpy as np
import pytest
import torch

from lightning_ft.fitter import Targets, build_basis, calibrate, select_frames, yaw_proxy
from lightning_ft.synthetic.sequences import make_sequence


@pytest.fixture(scope="module")
def basis(flame_model):
    return build_basis(flame_model)


# Noiseless landmarks isolate the solver from the noise-limited accuracy
# (benchmarks/bench_calibration.py measures that). These two cases came out
# 20 % and 10 % off before the contour correspondence was held within each
# LM step and the free focal moved the depths with it.
@pytest.mark.parametrize("focal, seed", [(800.0, 0), (2000.0, 2)])
def test_noiseless_focal_is_recovered(basis, flame_model, focal, seed):
    torch.set_num_threads(1)
    seq = make_sequence(flame_model, T=120, focal=focal, seed=seed, noise_px=0.0)
    targets = Targets.from_landmarks(seq.lmk68, seq.lmk_dense, basis)
    cal = calibrate(basis, targets, np.ones(120, bool), (512, 512))
    assert abs(cal.focal_px[0] / focal - 1) < 0.03
    assert cal.focal_px[0] == cal.focal_px[1]
    assert len(cal.frames) == 32
    np.testing.assert_allclose(cal.principal_point, [255.5, 255.5])


def test_frames_are_valid_spread_and_span_the_yaw(basis, flame_model):
    seq = make_sequence(flame_model, T=200, focal=1200.0, seed=1)
    valid = np.ones(200, bool)
    valid[50:90] = False
    yaw = yaw_proxy(seq.lmk68)
    frames = select_frames(valid, yaw, 32, seed=0)
    assert len(frames) == 32 and len(set(frames.tolist())) == 32
    assert valid[frames].all()
    np.testing.assert_array_equal(frames, select_frames(valid, yaw, 32, seed=0))
    ok = np.flatnonzero(valid)
    assert {ok[np.argmin(yaw[ok])], ok[np.argmax(yaw[ok])]} <= set(frames.tolist())
    assert frames.min() <= ok[2] and frames.max() >= ok[-3]
    few = valid[40:100]  # 20 valid frames: all of them
    np.testing.assert_array_equal(select_frames(few, yaw[40:100], 32), np.flatnonzero(few))


def test_predicted_focal_uncertainty_follows_the_landmark_noise(basis, flame_model):
    # The focal's standard deviation comes from the fit's curvature scaled by
    # the noise its residuals show: four times the noise, about four times
    # the spread; and the actual error stays within a few predicted sigmas
    # (benchmarks/bench_calibration.py: |z| < 2 in 23 of 24 cases).
    torch.set_num_threads(1)
    stds = []
    for noise in (0.5, 2.0):
        seq = make_sequence(flame_model, T=60, focal=1200.0, seed=1, noise_px=noise)
        targets = Targets.from_landmarks(seq.lmk68, seq.lmk_dense, basis)
        cal = calibrate(basis, targets, np.ones(60, bool), (512, 512))
        assert 0.003 < cal.focal_rel_std < 0.3
        assert abs(np.log(cal.focal_px[0] / 1200.0)) < 3 * cal.focal_rel_std
        stds.append(cal.focal_rel_std)
    assert 2.5 < stds[1] / stds[0] < 6


# ----------------------------------------------------------------------------
# Issue 20: a camera you can trust


def _source_for(crop_focal: float, fov_deg: float, width: float = 1920.0):
    """A SourceView in which `crop_focal` (crop px) is a lens of `fov_deg`
    horizontal degrees on a `width` px wide source."""
    from lightning_ft.fitter import SourceView, fov_deg_to_focal

    return SourceView(width, crop_focal / fov_deg_to_focal(fov_deg, width))


def test_fov_conversions_and_crop_geometry():
    from lightning_ft.fitter import SourceView, focal_to_fov_deg, fov_deg_to_focal

    assert fov_deg_to_focal(90.0, 1000.0) == pytest.approx(500.0)
    assert focal_to_fov_deg(fov_deg_to_focal(63.0, 176.0), 176.0) == pytest.approx(63.0)
    # 96 px crop boxes of a 176 px wide source, cropped to 512 px
    boxes = np.array([[10.0, 5.0, 106.0, 101.0]] * 5 + [[0.0, 0.0, 500.0, 500.0]])
    valid = np.array([True] * 5 + [False])
    src = SourceView.from_crop_boxes(boxes, (512, 512), 176.0, valid)
    assert src.crop_scale == pytest.approx(512 / 96)
    assert src.source_focal(src.crop_focal(150.0)) == pytest.approx(150.0)
    assert src.fov_deg(src.crop_focal(fov_deg_to_focal(60.0, 176.0))) == pytest.approx(60.0)


def test_well_observed_focal_is_not_pulled_by_the_fov_prior(basis, flame_model):
    # 1200 px on the crop is a 30 deg lens here, 2 prior sigmas from the
    # prior's 55 deg: 1 px landmarks still decide.
    torch.set_num_threads(1)
    seq = make_sequence(flame_model, T=60, focal=1200.0, seed=1, noise_px=1.0)
    targets = Targets.from_landmarks(seq.lmk68, seq.lmk_dense, basis)
    cal = calibrate(basis, targets, np.ones(60, bool), (512, 512), source=_source_for(1200.0, 30.0))
    assert abs(np.log(cal.focal_px[0] / 1200.0)) < max(0.05, 2.5 * cal.focal_rel_std)
    assert cal.prior["kind"] == "field_of_view"


def test_weakly_observed_focal_falls_back_to_real_lenses(basis, flame_model):
    # A long lens at a distance with 4 px landmark noise: perspective says
    # little. The answer stays within the field of view of real lenses
    # instead of running off towards an orthographic camera.
    torch.set_num_threads(1)
    seq = make_sequence(flame_model, T=40, focal=4000.0, seed=1, noise_px=4.0, yaw_deg=10.0, pitch_deg=4.0)
    targets = Targets.from_landmarks(seq.lmk68, seq.lmk_dense, basis)
    source = _source_for(4000.0, 40.0)
    cal = calibrate(basis, targets, np.ones(40, bool), (512, 512), source=source)
    fov = source.fov_deg(cal.focal_px[0])
    assert 20.0 < fov < 110.0, fov


def test_same_focal_whatever_the_thread_count(basis, flame_model):
    # Issue 20: the same file tracked twice gave 13,992 and 19,461 px.
    seq = make_sequence(flame_model, T=60, focal=1600.0, seed=4, noise_px=1.5)
    targets = Targets.from_landmarks(seq.lmk68, seq.lmk_dense, basis)
    focals, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            cal = calibrate(basis, targets, np.ones(60, bool), (512, 512), source=_source_for(1600.0, 40.0))
            focals.append(cal.focal_px[0])
            assert torch.get_num_threads() == n  # calibration gives the caller's threads back
    finally:
        torch.set_num_threads(threads)
    assert max(focals) / min(focals) - 1 < 1e-3, focals


def test_fixed_focal_fits_identity_only(basis, flame_model):
    torch.set_num_threads(1)
    seq = make_sequence(flame_model, T=40, focal=1000.0, seed=2, noise_px=0.5)
    targets = Targets.from_landmarks(seq.lmk68, seq.lmk_dense, basis)
    cal = calibrate(basis, targets, np.ones(40, bool), (512, 512), fixed_focal_px=1000.0)
    assert cal.focal_px.tolist() == [1000.0, 1000.0] and cal.prior["kind"] == "fixed"
    assert np.corrcoef(cal.shape[:10], seq.shape[:10])[0, 1] > 0.8


def test_combine_focals_counts_the_prior_once():
    from lightning_ft.fitter import combine_focals

    prior = {"prior_focal_source_px": 1000.0, "prior_sigma_log": 0.5}
    # Two videos whose data alone say 1200 px with std 0.1 in log focal: each
    # posterior is pulled to the prior a little; combined, the data's
    # precision doubles and the prior counts once.
    p0, pd = 1 / 0.5 ** 2, 1 / 0.1 ** 2
    post_mean = (pd * np.log(1200.0) + p0 * np.log(1000.0)) / (pd + p0)
    one = {"focal_source_px": float(np.exp(post_mean)), "focal_rel_std": float((pd + p0) ** -0.5), **prior}
    focal, std = combine_focals([one, dict(one)])
    expected = np.exp((2 * pd * np.log(1200.0) + p0 * np.log(1000.0)) / (2 * pd + p0))
    assert focal == pytest.approx(expected, rel=1e-9)
    assert std == pytest.approx((2 * pd + p0) ** -0.5)
    # an estimate without a predicted std adds nothing
    assert combine_focals([one, {**one, "focal_rel_std": None}])[0] == pytest.approx(one["focal_source_px"])


def test_cli_focal_and_fov_fix_the_camera(tmp_path, flame_model, assets_dir):
    import json

    from lightning_ft.cli import track_main

    seq = make_sequence(flame_model, T=30, focal=1200.0, seed=3, noise_px=1.0)
    np.savez(tmp_path / "seq.npz", lmk68=seq.lmk68, lmk_dense=seq.lmk_dense, image_size=np.array([512, 512]))
    for flag, value, focal in (("--focal", "1200", 1200.0), ("--fov", "60", 256.0 / np.tan(np.radians(30.0)))):
        out = tmp_path / flag.strip("-")
        rc = track_main(["--landmarks", str(tmp_path / "seq.npz"), "--no-emoca", "--assets", str(assets_dir),
                         "--out", str(out), "-q", flag, value])
        assert rc == 0
        with np.load(out / "seq" / "tracking.npz") as z:
            assert z["focal_length"][0] == pytest.approx(focal, rel=1e-5)
        meta = json.loads((out / "seq" / "meta.json").read_text())
        assert meta["calibration"]["prior"]["kind"] == "fixed"
        assert meta["settings"]["focal_px" if flag == "--focal" else "fov_deg"] == float(value)
    rc = track_main(["--landmarks", str(tmp_path / "seq.npz"), "--no-emoca", "--assets", str(assets_dir),
                     "--out", str(tmp_path / "bad"), "-q", "--fov", "200"])
    assert rc != 0 and not (tmp_path / "bad").exists()


def test_shared_camera_gives_every_video_one_focal(tmp_path, assets_dir):
    import json

    from lightning_ft.cli import track_main
    from lightning_ft.synthetic import clips

    folder = tmp_path / "rig"
    folder.mkdir()
    clips.write_excerpt(clips.carphone_path(), folder / "a.mp4", n_frames=16)
    frames = []
    import av

    with av.open(str(clips.carphone_path())) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i >= 60:
                frames.append(f.to_ndarray(format="rgb24"))
            if len(frames) == 16:
                break
    clips.write_clip(folder / "b.mp4", frames, fps=25.0, crf=18)
    rc = track_main(["--data", str(folder), "--no-emoca", "--assets", str(assets_dir), "--out", str(tmp_path / "out"),
                     "-q", "--shared-camera"])
    assert rc == 0
    metas = [json.loads((tmp_path / "out" / v / "meta.json").read_text()) for v in ("a", "b")]
    shared = [m["calibration"]["shared_camera"] for m in metas]
    assert shared[0] == shared[1] and len(shared[0]["videos"]) == 2
    from lightning_ft.fitter import combine_focals

    # what meta.json lists per video is what was combined (each video's own
    # estimate and the prior it was fitted under)
    assert shared[0]["focal_source_px"] == pytest.approx(combine_focals(shared[0]["videos"])[0], rel=1e-9)
    for m in metas:
        assert m["settings"]["shared_camera"] is True
        assert m["calibration"]["focal_source_px"] == pytest.approx(shared[0]["focal_source_px"], rel=1e-6)
        assert m["calibration"]["prior"]["kind"] == "fixed"
