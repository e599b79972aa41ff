"""The fitter: landmark-level head models, Levenberg-Marquardt fitting of
every frame, and the camera calibration.

    layout.py     the parameter vectors (blocks, slices, widths) and steps in them
    params.py     FrameParams, Targets, FitConfig
    basis.py      LandmarkBasis and the landmark-point model with its Jacobians
    residuals.py  point residuals, priors, per-frame normal equations
    solver.py     the LM core both fits share: damping rules, gain ratio,
                  stopping rule, bounds
    frames.py     fit_frames, fit_sequence, initial_params, predict_landmarks
    calibration.py  one focal length and identity from sampled frames
"""

from .basis import LandmarkBasis, build_basis, head_rotation_flame
from .calibration import (Calibration, CalibrationConfig, SourceView, calibrate, combine_focals, focal_to_fov_deg,
                          fov_deg_to_focal, pose_features, select_frames, yaw_proxy)
from .frames import FitResult, fit_frames, fit_sequence, initial_params, predict_landmarks
from .layout import ALL_BLOCKS, CalibrationLayout, FrameLayout, apply_step
from .params import IRIS_CENTRES, FitConfig, FrameParams, Targets, fit_config_for
from .residuals import point_residuals
from .solver import DAMPING_RULES, Damping

__all__ = ["ALL_BLOCKS", "DAMPING_RULES", "IRIS_CENTRES", "Calibration", "CalibrationConfig", "CalibrationLayout",
           "Damping", "FitConfig", "FitResult", "FrameLayout", "FrameParams", "LandmarkBasis", "SourceView", "Targets",
           "apply_step", "build_basis", "calibrate", "combine_focals", "fit_config_for", "fit_frames", "fit_sequence",
           "focal_to_fov_deg", "fov_deg_to_focal", "head_rotation_flame", "initial_params", "point_residuals",
           "pose_features", "predict_landmarks", "select_frames", "yaw_proxy"]
