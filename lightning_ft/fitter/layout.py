"""The parameter vectors the fitter steps in, named once.

A frame's vector holds, in `ALL_BLOCKS` order: rot [3] (a left increment of
the head rotation, axis-angle radians), trans [3] (meters), exp [E]
(expression coefficients), jaw [3] and eyes [6] (left, right; left increments
of the joint rotations, axis-angle radians). Calibration's joint fit adds the
shared shape coefficients and the log focal (`CalibrationLayout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..lbs import batch_rodrigues, rotation_matrix_to_axis_angle
from .params import FrameParams

ALL_BLOCKS = ("rot", "trans", "exp", "jaw", "eyes")


@dataclass(frozen=True)
class FrameLayout:
    """One frame's parameter vector for `n_exp` expression coefficients:
    `layout[block]` is the block's slice, `width` the vector's length."""

    n_exp: int

    @cached_property
    def slices(self) -> Dict[str, slice]:
        widths = {"rot": 3, "trans": 3, "exp": self.n_exp, "jaw": 3, "eyes": 6}
        out, start = {}, 0
        for block in ALL_BLOCKS:
            out[block] = slice(start, start + widths[block])
            start += widths[block]
        return out

    @property
    def width(self) -> int:
        return self.slices["eyes"].stop

    def __getitem__(self, block: str) -> slice:
        return self.slices[block]

    def columns(self, blocks: Sequence[str]) -> torch.Tensor:
        """Indices [D] of the entries of `blocks` (in the order given)."""
        return torch.cat([torch.arange(self[b].start, self[b].stop) for b in blocks])


@dataclass(frozen=True)
class CalibrationLayout:
    """Columns of calibration's joint Jacobian [..., joint.width (+ 1)]: the
    frame layout of a basis that takes the shape coefficients as its first
    `n_shape` expression coefficients (`joint`), then, when the focal is
    free, one column for the log focal. Each frame's own unknowns are the
    frame layout of `n_exp` (`frame_columns`), the shared ones the shape and
    the log focal (`shared_columns`)."""

    n_shape: int
    n_exp: int

    @property
    def joint(self) -> FrameLayout:
        return FrameLayout(self.n_shape + self.n_exp)

    @property
    def frame_columns(self) -> Tuple[slice, slice]:
        """rot, trans | exp, jaw, eyes: FrameLayout(n_exp) order."""
        shape_start = self.joint["exp"].start
        return slice(0, shape_start), slice(shape_start + self.n_shape, self.joint.width)

    @property
    def shared_columns(self) -> Tuple[slice, slice]:
        """shape [n_shape] | log focal (empty when the focal is fixed)."""
        shape_start = self.joint["exp"].start
        return slice(shape_start, shape_start + self.n_shape), slice(self.joint.width, None)


def apply_step(params: FrameParams, step: torch.Tensor, E: int, free=ALL_BLOCKS,
               bounds: Optional[Tuple[float, float]] = None) -> FrameParams:
    """params moved by step [T, FrameLayout(E).width]; blocks not in `free` are
    copied unchanged (their rotation updates are most of a rigid fit's step).
    bounds: the expression is projected onto [lo, hi] (a projected LM step;
    the trial's cost is that of the projected point)."""
    L = FrameLayout(E)
    T = step.shape[0]
    rotation = (batch_rodrigues(step[:, L["rot"]]) @ params.rotation if "rot" in free
                else params.rotation.clone())
    translation = params.translation + step[:, L["trans"]] if "trans" in free else params.translation.clone()
    expression = params.expression + step[:, L["exp"]] if "exp" in free else params.expression.clone()
    if bounds is not None and "exp" in free:
        expression = expression.clamp(bounds[0], bounds[1])
    jaw, eyes = params.jaw.clone(), params.eyes.clone()
    joints = [k for k in ("jaw", "eyes") if k in free]
    if joints:
        # jaw and eye rotations composed as one batch of [T*n,3] vectors: for
        # calibration's 32 frames each tiny op costs more in dispatch than in work
        current = torch.cat([getattr(params, k) for k in joints], 1).reshape(-1, 3)
        delta = torch.cat([step[:, L[k]] for k in joints], 1).reshape(-1, 3)
        moved = rotation_matrix_to_axis_angle(batch_rodrigues(delta) @ batch_rodrigues(current)).reshape(T, -1)
        if "jaw" in free:
            jaw, moved = moved[:, :3], moved[:, 3:]
        if "eyes" in free:
            eyes = moved
    return FrameParams(rotation, translation, expression, jaw, eyes, params.shape.clone())


