"""The fitter: landmark-level head models, Levenberg-Marquardt per-frame
fitting and the camera calibration."""

from .calibration import (Calibration, CalibrationConfig, SourceView, calibrate, combine_focals, focal_to_fov_deg,
                          fov_deg_to_focal, pose_features, select_frames, yaw_proxy)
from .frames import (ALL_BLOCKS, IRIS_CENTRES, FitConfig, FitResult, FrameParams, LandmarkBasis, Targets, build_basis,
                     fit_config_for, fit_frames, fit_sequence, head_rotation_flame, initial_params, point_residuals,
                     predict_landmarks)
