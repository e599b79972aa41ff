"""The head-model interface (lightning_ft.head_model): FLAME and ICT both
implement it, and the fitter's landmark model built from it reproduces the
posed mesh."""

import numpy as np
import torch

from lightning_ft.fitter import CalibrationConfig, FrameParams, Targets, build_basis, predict_landmarks
from lightning_ft.head_model import HeadModel
from lightning_ft.pipeline import calibration_config_for
from lightning_ft.synthetic.ict_sequences import make_ict_sequence


def _t(a):
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


def test_both_models_implement_the_interface(flame_model, ict):
    assert isinstance(flame_model, HeadModel) and isinstance(ict, HeadModel)
    assert ict.parameter_blocks()["expression"].bounds == (0.0, 1.0)
    assert flame_model.parameter_blocks()["expression"].bounds is None
    assert build_basis(flame_model).has_jaw and not build_basis(ict).has_jaw
    # ICT's identity is calibrated from more frames than the default; FLAME's from the default
    default = CalibrationConfig()
    assert calibration_config_for(ict, default).n_frames == 48 > default.n_frames
    assert calibration_config_for(flame_model, default).n_frames == default.n_frames


def test_landmark_basis_reproduces_the_model_with_gaze(ict):
    # The fitter's landmark-level model at the true parameters equals the
    # posed mesh's projected landmarks, eyeballs rotated included (pupils).
    seq = make_ict_sequence(ict, T=8, seed=3, noise_px=0.0, eye_rad=0.3)
    basis = build_basis(ict)
    p = FrameParams(_t(seq.rotation), _t(seq.translation), _t(seq.expression), torch.zeros(8, 3), _t(seq.eyes),
                    _t(seq.shape))
    focal, pp = torch.tensor([seq.focal] * 2), torch.tensor([255.5, 255.5])
    lmk68, dense = predict_landmarks(basis, p, focal, pp)
    assert np.abs(lmk68.numpy() - seq.clean_lmk68).max() < 2e-2
    if basis.n_dense:
        assert np.abs(dense.numpy() - seq.clean_dense[:, basis.mediapipe_indices]).max() < 2e-2
    tg = Targets.from_landmarks(seq.lmk68, seq.lmk_dense, basis)
    assert torch.isfinite(tg.iris).all()  # the pupils are fitted to mediapipe's iris centres
