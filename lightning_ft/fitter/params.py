"""What the fitter works on: per-frame parameters, detected targets and
the fit's weights and priors."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import numpy as np
import torch

from ..head_model import HeadModel
from .basis import LandmarkBasis

# mediapipe's refined-landmark iris centres: subject's right eye, left eye.
IRIS_CENTRES = (468, 473)


@dataclass
class FrameParams:
    """Per-frame parameters. rotation [T,3,3] and translation [T,3] map FLAME
    space to OpenCV camera space (meters); expression [T,E]; jaw [T,3] and
    eyes [T,6] (left, right) axis-angle radians; shape [S] shared."""

    rotation: torch.Tensor
    translation: torch.Tensor
    expression: torch.Tensor
    jaw: torch.Tensor
    eyes: torch.Tensor
    shape: torch.Tensor

    def clone(self) -> "FrameParams":
        return FrameParams(*(getattr(self, f).clone() for f in
                             ("rotation", "translation", "expression", "jaw", "eyes", "shape")))

    def select(self, idx) -> "FrameParams":
        return FrameParams(self.rotation[idx], self.translation[idx], self.expression[idx],
                           self.jaw[idx], self.eyes[idx], self.shape)


@dataclass
class Targets:
    """Detected 2-D points in crop pixels, NaN where missing.
    lmk68 [T,68,2]; dense [T,M,2] (mediapipe points matching the dense
    embedding); iris [T,2,2] (right, left eye centres)."""

    lmk68: torch.Tensor
    dense: torch.Tensor
    iris: torch.Tensor

    @staticmethod
    def from_landmarks(lmk68: np.ndarray, lmk_dense: Optional[np.ndarray], basis: LandmarkBasis) -> "Targets":
        T = lmk68.shape[0]
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        if lmk_dense is None or lmk_dense.shape[1] < 478:
            dense = np.full((T, basis.n_dense, 2), np.nan, np.float32)
            iris = np.full((T, 2, 2), np.nan, np.float32)
        else:
            dense = lmk_dense[:, basis.mediapipe_indices]
            iris = lmk_dense[:, list(IRIS_CENTRES)]
        return Targets(t(lmk68), t(dense), t(iris))

    def select(self, idx) -> "Targets":
        return Targets(self.lmk68[idx], self.dense[idx], self.iris[idx])


@dataclass
class FitConfig:
    """Weights are inverse variances in the units noted (pixels at a 512 px
    crop; they scale with the crop size)."""

    w_lmk68: float = 1.0
    w_contour: float = 0.3          # detectors place the jaw line loosely
    w_dense: float = 1.0
    w_iris: float = 0.5
    w_closure: float = 1.0
    sigma_expression: float = 2.0   # expression coefficients ~ N(0, sigma^2)
    sigma_jaw_open: float = 0.3     # rad, rotation about x
    sigma_jaw_side: float = 0.03    # rad, y/z components
    sigma_eyes: float = 0.3
    sigma_shape: float = 1.0
    # Temporal prior: allowed frame-to-frame change (per frame at 25 fps).
    smooth_rotation: float = 0.02   # rad
    smooth_translation: float = 0.003  # m
    smooth_expression: float = 0.5
    smooth_jaw: float = 0.05
    smooth_eyes: float = 0.1
    robust_scale_px: float = 4.0    # Geman-McClure scale at 512 px
    # The robust weights are re-estimated after each of the first iterations
    # only, then held: re-weighting every iteration kept lowering the weights
    # of points the model cannot reach, and on real video the fit crept on
    # for 15+ iterations at ~1 % per iteration, its 68-point error rising.
    robust_updates: int = 3
    max_iters: int = 20
    tol: float = 1e-3
    image_size: int = 512
    # Hard bounds (lo, hi) of every expression coefficient, or None: each LM
    # step of `fit_frames` is projected onto them (ICT's ARKit-style weights
    # lie in [0, 1]); calibration runs without them
    # (`pipeline.calibration_fit_config` says why).
    expression_bounds: Optional[Tuple[float, float]] = None


def fit_config_for(model: "HeadModel", cfg: FitConfig) -> FitConfig:
    """`cfg` with the model's expression prior and bounds
    (`HeadModel.parameter_blocks`)."""
    block = model.parameter_blocks()["expression"]
    smooth = cfg.smooth_expression if block.temporal_sigma is None else block.temporal_sigma
    return replace(cfg, sigma_expression=block.sigma, expression_bounds=block.bounds, smooth_expression=smooth)

