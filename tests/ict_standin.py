"""A small model with `lightning_ft.ict.ICT`'s attributes (h_ictmodel
contract), built from the procedural FLAME: its template, 100 shape modes,
and 53 blendshapes (FLAME's 50 expression modes scaled to [0, 1] weights
plus jawOpen/jawLeft/jawRight from FLAME's jaw rotation), no skinning.
Tests use it where the shipped ICT file is not in the checkout."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

ARKIT_SPLIT_53 = (
    "browDown_L browDown_R browInnerUp_L browInnerUp_R browOuterUp_L browOuterUp_R cheekPuff_L cheekPuff_R "
    "cheekSquint_L cheekSquint_R eyeBlink_L eyeBlink_R eyeLookDown_L eyeLookDown_R eyeLookIn_L eyeLookIn_R "
    "eyeLookOut_L eyeLookOut_R eyeLookUp_L eyeLookUp_R eyeSquint_L eyeSquint_R eyeWide_L eyeWide_R jawForward "
    "jawLeft jawOpen jawRight mouthClose mouthDimple_L mouthDimple_R mouthFrown_L mouthFrown_R mouthFunnel "
    "mouthLeft mouthLowerDown_L mouthLowerDown_R mouthPress_L mouthPress_R mouthPucker mouthRight mouthRollLower "
    "mouthRollUpper mouthShrugLower mouthShrugUpper mouthSmile_L mouthSmile_R mouthStretch_L mouthStretch_R "
    "mouthUpperUp_L mouthUpperUp_R noseSneer_L noseSneer_R").split()


class StandInICT(nn.Module):
    def __init__(self, flame):
        super().__init__()
        assert len(ARKIT_SPLIT_53) == 53
        self.n_shape, self.n_exp = 100, 53
        self.expression_names = list(ARKIT_SPLIT_53)
        S = flame.n_shape
        self.register_buffer("v_template", flame.v_template.clone())
        self.register_buffer("faces", flame.faces.clone())
        jaw_names = {"jawOpen": (0.35, 0, 0), "jawLeft": (0, 0.08, 0), "jawRight": (0, -0.08, 0)}
        exp = flame.dirs[:, :, S:].clone() * 2.0  # a weight of 1 = FLAME's 2 sd
        dirs = []
        k = 0
        with torch.no_grad():
            for name in self.expression_names:
                if name in jaw_names:
                    jaw = torch.tensor([jaw_names[name]], dtype=torch.float32)
                    dirs.append(flame(jaw_pose=jaw).vertices[0] - flame().vertices[0])
                else:
                    dirs.append(exp[:, :, k % exp.shape[2]])
                    k += 1
        self.register_buffer("shapedirs", flame.dirs[:, :, :100].clone())
        self.register_buffer("expdirs", torch.stack(dirs, 2))
        for name in ("static_faces", "static_bary", "dynamic_faces", "dynamic_bary", "dense_faces", "dense_bary",
                     "mediapipe_indices"):
            self.register_buffer(name, getattr(flame, name).clone())
        self.eyeball_vertex_ids = tuple(torch.nonzero(flame.weights[:, k] > 0.5).flatten().numpy() for k in (3, 4))
        self.kept_vertex_ids = np.arange(self.v_template.shape[0])
        self.sha256 = "stand-in"
