"""Tracking with ICT-FaceKit's model: the fitter with bounded expression
weights, model selection,
the result contract, the arkit export and the FLAME-only exports' refusal."""

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_ft.cli import track_main
from lightning_ft.errors import UsageError
from lightning_ft.export import ARKIT_NAMES, LIVE_LINK_FACE_COLUMNS, arkit_weight_map, export
from lightning_ft.fitter import (CalibrationConfig, FitConfig, FrameParams, Targets, apply_step, build_basis, calibrate,
                                 fit_config_for, fit_sequence, predict_landmarks)
from lightning_ft.results import TRACKING_KEYS, track_from_arrays, write_result
from lightning_ft.batch import select_model
from lightning_ft.pipeline import TrackConfig, calibration_config_for, calibration_fit_config
from lightning_ft.synthetic.ict_sequences import make_ict_sequence

torch.set_num_threads(1)


def _t(a):
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


def test_lm_step_is_projected_onto_the_bounds():
    p = FrameParams(torch.eye(3)[None], torch.zeros(1, 3), torch.tensor([[0.2, 0.9, 0.5]]), torch.zeros(1, 3),
                    torch.zeros(1, 6), torch.zeros(2))
    step = torch.zeros(1, 18)
    step[0, 6:9] = torch.tensor([-0.5, 0.5, 0.1])
    moved = apply_step(p, step, 3, bounds=(0.0, 1.0))
    assert torch.allclose(moved.expression, torch.tensor([[0.0, 1.0, 0.6]]))
    assert torch.allclose(apply_step(p, step, 3).expression, torch.tensor([[-0.3, 1.4, 0.6]]))


def test_fit_recovers_bounded_weights_head_motion_and_focal(ict):
    # 1 px noise on the 68 and 478 points, identity within 2 sd, focal 1400 px.
    T = 60
    seq = make_ict_sequence(ict, T=T, focal=1400.0, seed=11)
    basis = build_basis(ict)
    cfg = fit_config_for(ict, FitConfig())
    tg = Targets.from_landmarks(seq.lmk68, seq.lmk_dense, basis)
    cal = calibrate(basis, tg, np.ones(T, bool), (512, 512), calibration_fit_config(cfg),
                    calibration_config_for(ict, CalibrationConfig()))
    focal, pp = _t(cal.focal_px), _t(cal.principal_point)
    res = fit_sequence(basis, tg, focal, pp, _t(cal.shape), cfg)
    e = res.params.expression.numpy()
    assert e.min() >= 0.0 and e.max() <= 1.0
    lmk68, _ = predict_landmarks(basis, res.params, focal, pp)
    err68 = np.linalg.norm(lmk68.numpy() - seq.clean_lmk68, axis=-1).mean()
    assert err68 < 0.8, err68  # below the 1 px noise: the fit does not follow it
    assert abs(cal.focal_px[0] / seq.focal - 1) < 0.15
    # weights that move the landmarks are recovered (jawOpen where named)
    names = list(ict.expression_names)
    j = names.index("jawOpen")
    assert np.abs(e[:, j] - seq.expression[:, j]).mean() < 0.08
    assert np.abs(e - seq.expression).mean() < 0.15
    # head rotation within a few degrees
    R_err = res.params.rotation.numpy() @ np.transpose(seq.rotation, (0, 2, 1))
    angle = np.degrees(np.arccos(np.clip((np.trace(R_err, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert np.median(angle) < 5.0


def test_smoothing_at_the_face_keeps_a_compensated_rotation_error_off_the_face():
    # A still face 9 cm in front of the model's origin (ICT's lever arm),
    # fitted with rotation noise that the translation compensated: the face
    # point itself never moved. Smoothed at the model's origin, the rotation
    # is smoothed but the translation's compensation stays, so the face moves
    # (0.24 mm rms with 2 deg noise); smoothed at the face (`pivot`) it stays put.
    from scipy.spatial.transform import Rotation

    from lightning_ft.smoothing import smooth_tracking

    rng = np.random.default_rng(0)
    T, face = 100, np.array([0.0, -0.003, 0.094])
    R = Rotation.from_rotvec(rng.normal(scale=np.radians(2.0), size=(T, 3))).as_matrix() @ np.diag([1.0, -1, -1])
    t = np.array([0.0, 0.0, 0.6]) - R @ face  # the face at (0, 0, 0.6) m in every frame
    raw = {"rotation": R, "translation": t}

    def face_motion_mm(smoothed):
        cam = smoothed["rotation"] @ face + smoothed["translation"]
        return 1000 * np.sqrt(((cam - [0.0, 0.0, 0.6]) ** 2).sum(1).mean())

    at_origin = face_motion_mm(smooth_tracking(raw, np.ones(T, bool), 25.0))
    at_face = face_motion_mm(smooth_tracking(raw, np.ones(T, bool), 25.0, pivot=face))
    assert at_face < 1e-6 < 0.05 < at_origin, (at_face, at_origin)


# ----------------------------------------------------------------------------
# Model selection


def test_default_model_is_flame_where_its_files_are(assets_dir, tmp_path):
    cfg = TrackConfig(data=None, out_dir=tmp_path, assets_dir=assets_dir, assets_named=False)
    assert select_model(cfg) == "flame"


def test_default_model_is_ict_without_flame_files_said_in_one_line(tmp_path, caplog):
    cfg = TrackConfig(data=None, out_dir=tmp_path, assets_dir=tmp_path / "assets", assets_named=False)
    with caplog.at_level("INFO", logger="lightning_ft"):
        assert select_model(cfg) == "ict"
    lines = [r.getMessage() for r in caplog.records if "ICT" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]


def test_named_assets_folder_without_flame_stays_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LIGHTNING_FT_ASSETS", raising=False)
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"x")
    rc = track_main(["--data", str(video), "--assets", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert rc == 3 and "generic_model.pkl" in capsys.readouterr().err
    cfg = TrackConfig(data=None, out_dir=tmp_path, assets_dir=tmp_path / "empty", assets_named=True)
    assert select_model(cfg) == "flame"
    assert select_model(replace(cfg, model="ict")) == "ict"


@pytest.mark.parametrize("extra, needle", [(["--synthesis"], "--synthesis"), (["--export", "mesh,vhap"], "vhap")])
def test_ict_refuses_flame_only_options_before_work(tmp_path, capsys, extra, needle):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"never decoded")
    rc = track_main(["--data", str(video), "--model", "ict", "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.strip().count("\n") == 0 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------
# Results and exports


@pytest.fixture(scope="module")
def ict_result(tmp_path_factory, standin):
    """A result folder as the pipeline writes it for ICT (stand-in model)."""
    T = 6
    seq = make_ict_sequence(standin, T=T, seed=2)
    tracking = {
        "frame_ids": np.arange(T), "valid": np.array([True] * 5 + [False]), "shape": seq.shape.astype(np.float32),
        "expression": seq.expression.astype(np.float32), "jaw_pose": np.zeros((T, 3), np.float32),
        "neck_pose": np.zeros((T, 3), np.float32), "eye_pose": seq.eyes.astype(np.float32),
        "rotation": seq.rotation.astype(np.float32), "translation": seq.translation.astype(np.float32),
        "focal_length": np.array([seq.focal] * 2, np.float32), "principal_point": np.array([255.5] * 2, np.float32),
        "image_size": np.array([512, 512]), "crop_boxes": np.zeros((T, 4), np.float32),
        "lmk68": seq.lmk68, "lmk_dense": seq.lmk_dense, "fps": np.float32(25.0),
        "expression_names": np.asarray(standin.expression_names)}
    meta = {"model": standin.model_meta(), "video": {"path": "clip.mp4"}}
    folder = tmp_path_factory.mktemp("res") / "clip"
    write_result(folder, *track_from_arrays(tracking, folder), meta)
    return folder, seq


def test_arkit_csv_has_live_link_face_columns(ict_result):
    folder, seq = ict_result
    export(folder, ["arkit"], out_dir=folder / "x")
    with open(folder / "x" / "arkit" / "arkit.csv") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == LIVE_LINK_FACE_COLUMNS and len(rows[0]) == 2 + 52 + 9
    assert len(rows) == 1 + 5  # valid frames only
    values = np.array([[float(v) for v in r[2:]] for r in rows[1:]])
    assert all(r[1] == "61" for r in rows[1:])
    assert values[:, :52].min() >= 0 and values[:, :52].max() <= 1
    names = _expression_names(folder)
    col = {n: i for i, n in enumerate(ARKIT_NAMES)}
    e = seq.expression
    assert np.allclose(values[:, col["JawOpen"]], e[:5, names.index("jawOpen")], atol=1e-5)
    assert np.allclose(values[:, col["EyeBlinkLeft"]], e[:5, names.index("eyeBlink_L")], atol=1e-5)
    assert np.allclose(values[:, col["BrowInnerUp"]],
                       (e[:5, names.index("browInnerUp_L")] + e[:5, names.index("browInnerUp_R")]) / 2, atol=1e-5)
    assert np.all(values[:, col["TongueOut"]] == 0)
    # head yaw/pitch/roll: yaw and pitch follow the synthetic head's motion
    assert np.abs(values[:, 52:55]).max() < np.radians(30) and np.abs(values[:, 52]).max() > 1e-3


def _expression_names(folder):
    with np.load(Path(folder) / "tracking.npz") as d:
        return [str(n) for n in d["expression_names"]]


def test_arkit_map_of_ict_extras():
    M, unused = arkit_weight_map(["cheekPuff_L", "cheekPuff_R", "cheekRaiser_L", "PupilDilate_R", "mouthLeft"])
    assert unused == ["cheekRaiser_L", "PupilDilate_R"]
    assert M[ARKIT_NAMES.index("CheekPuff")].tolist()[:2] == [0.5, 0.5]
    assert M[ARKIT_NAMES.index("MouthLeft"), 4] == 1


@pytest.mark.parametrize("fmt", ["vhap", "metrical", "lightning"])
def test_flame_only_exports_refuse_an_ict_result(ict_result, fmt):
    folder, _ = ict_result
    with pytest.raises(UsageError, match="tracked with ICT") as exc:
        export(folder, [fmt], out_dir=folder / "refused")
    assert "\n" not in str(exc.value)
    assert not (folder / "refused").exists()


def test_mesh_and_nerface_export_an_ict_result(ict_result, standin):
    folder, seq = ict_result
    export(folder, ["mesh", "nerface"], out_dir=folder / "ok", model=standin)
    obj = (folder / "ok" / "mesh" / "meshes" / "00000.obj").read_text().splitlines()
    verts = np.array([[float(x) for x in ln.split()[1:]] for ln in obj if ln.startswith("v ")])
    assert np.abs(verts - seq.vertices_cam[0]).max() < 1e-5  # R X + t of the posed ICT mesh
    tr = json.loads((folder / "ok" / "nerface" / "transforms_train.json").read_text())
    assert len(tr["frames"][0]["expression"]) == 53  # ICT weights, no FLAME jaw appended


def test_flame_result_refuses_arkit(tmp_path):
    T = 2
    tracking = {k: np.zeros((T, 3)) for k in TRACKING_KEYS}
    tracking.update(frame_ids=np.arange(T), valid=np.ones(T, bool), shape=np.zeros(100),
                    expression=np.zeros((T, 50)), eye_pose=np.zeros((T, 6)), rotation=np.tile(np.eye(3), (T, 1, 1)),
                    focal_length=np.ones(2), principal_point=np.ones(2), image_size=np.array([8, 8]),
                    crop_boxes=np.zeros((T, 4)), lmk68=np.zeros((T, 68, 2)), lmk_dense=np.zeros((T, 478, 2)),
                    fps=np.float32(25))
    write_result(tmp_path / "r", *track_from_arrays(tracking, tmp_path / "r"), {"flame": {"version": "2020"}})
    with pytest.raises(UsageError, match="--model ict"):
        export(tmp_path / "r", ["arkit"])


# ----------------------------------------------------------------------------
# Real video through the command line


@pytest.fixture(scope="module")
def carphone_ict(tmp_path_factory):
    from lightning_ft.synthetic import clips

    d = tmp_path_factory.mktemp("carphone_ict")
    video = clips.write_excerpt(clips.carphone_path(), d / "carphone40.mp4", n_frames=40)
    rc = track_main(["--data", str(video), "--model", "ict", "-v", "-q", "-d", "cpu", "--image-size", "256",
                     "--out", str(d / "out"), "--export", "arkit,mesh"])
    return rc, d / "out" / "carphone40"


def test_carphone_tracks_with_ict(carphone_ict, ict):
    rc, folder = carphone_ict
    assert rc == 0
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["model"]["name"] == "ict" and meta["model"]["sha256"] == ict.sha256 and "flame" not in meta
    assert meta["model"]["licence"].startswith("MIT")
    with np.load(folder / "tracking.npz") as d:
        r = {k: d[k] for k in d.files}
    T = len(r["frame_ids"])
    assert r["shape"].shape == (100,) and r["expression"].shape == (T, 53)
    assert list(r["expression_names"]) == list(ict.expression_names)
    assert r["expression"].min() >= 0 and r["expression"].max() <= 1
    assert np.all(r["jaw_pose"] == 0)
    q = meta["quality"]
    assert r["valid"].mean() >= 0.95
    assert q["jitter_68_fitted_px"] < q["jitter_68_detected_px"]
    assert q["mean_error_68_px"] < 6.0  # 256 px crops of a ~80 px face
    assert (folder / "visualization.mp4").stat().st_size > 10_000
    assert (folder / "export" / "arkit" / "arkit.csv").exists()
    assert len(list((folder / "export" / "mesh" / "meshes").glob("*.obj"))) == int(r["valid"].sum())


def test_frontal_photograph_with_ict(tmp_path):
    """The astronaut looks into the camera: with ICT the head's pitch stays
    within 10 degrees of frontal and the identity within 3 sd (the strict
    xfail of the FLAME stand-in in test_e2e)."""
    from lightning_ft.synthetic import clips

    video = clips.write_still_clip(tmp_path / "astronaut_still.mp4", n_frames=40, fps=25, noise_std=2.0, crf=23)
    rc = track_main(["--data", str(video), "--model", "ict", "-q", "-d", "cpu", "--image-size", "256",
                     "--out", str(tmp_path / "out")])
    assert rc == 0
    with np.load(tmp_path / "out" / "astronaut_still" / "tracking.npz") as d:
        R, shape = d["rotation"].astype(np.float64), d["shape"].astype(np.float64)
    forward = R @ np.array([0.0, 0.0, 1.0])  # ICT +z: out of the face
    pitch = np.degrees(np.arctan2(forward[:, 1], -forward[:, 2])).mean()
    yaw = np.degrees(np.arctan2(forward[:, 0], -forward[:, 2])).mean()
    shape_rms = float(np.sqrt(np.mean(shape ** 2)))
    print({"pitch_deg": pitch, "yaw_deg": yaw, "shape_rms_sd": shape_rms, "shape_max_sd": np.abs(shape).max()})
    assert abs(pitch) < 10 and abs(yaw) < 10
    # 3 sd RMS over the 100 coefficients, as test_e2e asks of FLAME (single
    # coefficients reach 5-6 sd: the photograph's detector points and ICT's
    # landmark placement disagree on a few features)
    assert shape_rms < 3.0
