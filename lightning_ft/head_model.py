"""What the tracker needs from a head model, and ICT-FaceKit behind it.

Calibration and fitting see a model only through `linear_parts` (vertex-level
linear pieces from which `fitter.build_basis` takes the landmark rows),
the landmark embeddings (same names, shapes and meaning as FLAME's) and
`parameter_blocks` (priors and bounds). Rendering, output and export see
`posed_vertices`, `landmarks68`, `faces` and `model_meta`.

Two implementations: `lightning_ft.flame.FLAME` (its own call signature is a
user contract and stays as it is) and `ICTHeadModel`, an adapter around
`lightning_ft.ict.ICT` (ICT-FaceKit's "Face Model Light", MIT licence).

Model space is the model's own, meters; a model point X maps to the OpenCV
camera as R X + t (tracking.npz's `rotation`, `translation`). Both models
look along +z with y up, so a frontal face has R = diag(1, -1, -1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Tuple, runtime_checkable

import numpy as np
import torch
from torch import nn

from .lbs import barycentric_points, batch_rodrigues

MODEL_NAMES = ("flame", "ict")
# mediapipe's refined iris points (468-477): on ICT they lie on the eyeballs,
# which the fitter moves only through the pupils (fitter.IRIS_CENTRES).
MEDIAPIPE_IRIS = range(468, 478)


@dataclass(frozen=True)
class ParameterBlock:
    """A coefficient block: `size` values with a Gaussian prior N(0, sigma^2)
    and, where given, hard bounds (lo, hi) the solver projects onto, the
    frame-to-frame standard deviation of the temporal prior and, for a
    block shared by all frames, how many frames calibration estimates it
    from (None: the fitter's and calibration's defaults)."""

    name: str
    size: int
    sigma: float
    bounds: Optional[Tuple[float, float]] = None
    names: Optional[Tuple[str, ...]] = None
    temporal_sigma: Optional[float] = None
    calibration_frames: Optional[int] = None


@dataclass
class LinearParts:
    """Vertex-level pieces of a model, model space, meters, float64.

    v_template [V,3]; dirs [V,3,S+E] (shape columns, then expression);
    posedirs [V,3,36] pose correctives (FLAME's, over the rotation features
    of neck, jaw and eyes) or None where the model has none; weights [V,3]
    skinning weights of the jaw, left eye and right eye joints; joints [3,3]
    their rest positions and joint_dirs [3,3,S+E] how those move with the
    coefficients (linear).
    """

    v_template: torch.Tensor
    dirs: torch.Tensor
    posedirs: Optional[torch.Tensor]
    weights: torch.Tensor
    joints: torch.Tensor
    joint_dirs: torch.Tensor


@runtime_checkable
class HeadModel(Protocol):
    """The interface; see the module docstring. Tensors are batched first.

    Landmark embeddings (buffers): static_faces [51] / static_bary [51,3]
    (iBUG 17..67), dynamic_faces [R,17] / dynamic_bary [R,17,3] (the jaw
    contour by yaw row, `flame.contour_rows`), dense_faces [M] / dense_bary
    [M,3] with mediapipe_indices [M] (which of mediapipe's 478 points).
    rotation_parameters: the per-frame blocks that are axis-angle rotations.
    """

    name: str
    n_shape: int
    n_exp: int
    faces: torch.Tensor
    static_faces: torch.Tensor
    static_bary: torch.Tensor
    dynamic_faces: torch.Tensor
    dynamic_bary: torch.Tensor
    dense_faces: torch.Tensor
    dense_bary: torch.Tensor
    mediapipe_indices: torch.Tensor
    rotation_parameters: Tuple[str, ...]

    @property
    def n_vertices(self) -> int: ...

    @property
    def n_dense(self) -> int: ...

    def parameter_blocks(self) -> Dict[str, ParameterBlock]: ...

    def linear_parts(self) -> LinearParts: ...

    def posed_vertices(self, shape: torch.Tensor, expression: torch.Tensor, jaw_pose: Optional[torch.Tensor] = None,
                       eye_pose: Optional[torch.Tensor] = None,
                       neck_pose: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    def landmarks68(self, vertices: torch.Tensor, head_rotation: torch.Tensor) -> torch.Tensor: ...

    def model_meta(self) -> dict: ...


# ----------------------------------------------------------------------------
# ICT-FaceKit


ICT_LICENCE = "MIT (ICT-FaceKit, USC Institute for Creative Technologies, 2020)"


def sphere_centre(points: torch.Tensor) -> torch.Tensor:
    """Centre [3] of the least-squares sphere through points [N,3]
    (algebraic fit: |p|^2 = 2 p.c + k, linear in c and k)."""
    A = torch.cat([2 * points, torch.ones_like(points[:, :1])], 1)
    b = (points ** 2).sum(1, keepdim=True)
    return torch.linalg.lstsq(A, b).solution[:3, 0]


class ICTHeadModel(nn.Module):
    """ICT-FaceKit's Face Model Light as a `HeadModel`.

    shape [B,100] weights `identityNNN.obj - neutral` (sd-scaled PCA modes:
    the ICT scripts sample identities as N(0, 1)); expression [B,53] weights
    `<name>.obj - neutral`, ARKit-style, in [0, 1]. Jaw: through ICT's own
    jaw* shapes (the OBJ shapes move the teeth and gums with the mouth), so
    `jaw_pose` is always zero. Gaze: the eyeballs rotate rigidly about
    their sphere centres by `eye_pose` (axis-angle, left then right): ICT's
    eyeLook* shapes move only the lids, never the eyeballs (measured: 0 mm on
    every eyeball vertex), so a rotation is the only way the irises follow
    mediapipe's iris points. No pose correctives.
    """

    name = "ict"
    rotation_parameters = ("eye_pose",)

    def __init__(self, ict: nn.Module):
        super().__init__()
        self.ict = ict
        self.n_shape, self.n_exp = int(ict.n_shape), int(ict.n_exp)
        self.expression_names = list(ict.expression_names)
        self.register_buffer("faces", torch.as_tensor(ict.faces, dtype=torch.long))
        for k in ("static_faces", "dynamic_faces"):
            self.register_buffer(k, torch.as_tensor(getattr(ict, k), dtype=torch.long))
        for k in ("static_bary", "dynamic_bary"):
            self.register_buffer(k, torch.as_tensor(getattr(ict, k), dtype=torch.float32))
        # The iris points sit on the eyeballs, which the fitter moves only
        # through the pupils; as surface points they would ignore the gaze.
        mp_idx = torch.as_tensor(ict.mediapipe_indices, dtype=torch.long)
        keep = ~torch.isin(mp_idx, torch.tensor(list(MEDIAPIPE_IRIS)))
        self.register_buffer("dense_faces", torch.as_tensor(ict.dense_faces, dtype=torch.long)[keep])
        self.register_buffer("dense_bary", torch.as_tensor(ict.dense_bary, dtype=torch.float32)[keep])
        self.register_buffer("mediapipe_indices", mp_idx[keep])
        left, right = (torch.as_tensor(np.asarray(ids), dtype=torch.long) for ids in ict.eyeball_vertex_ids)
        self.register_buffer("eye_left_ids", left)
        self.register_buffer("eye_right_ids", right)
        # The centres come from the sclera's back half where the model has it
        # marked (ICT's sclera bulges into a cornea in front), else the whole eyeball.
        for eye, ids in (("left", left), ("right", right)):
            self.register_buffer(f"centre_{eye}_ids", torch.as_tensor(getattr(ict, f"sclera_{eye}_ids", ids),
                                                                      dtype=torch.long))
        self.sha256 = str(getattr(ict, "sha256", getattr(type(ict), "SHA256", "")) or "")

    @property
    def n_vertices(self) -> int:
        return int(self.ict.v_template.shape[0])

    @property
    def n_dense(self) -> int:
        return int(self.dense_faces.shape[0])

    @property
    def v_template(self) -> torch.Tensor:
        return self.ict.v_template

    def parameter_blocks(self) -> Dict[str, ParameterBlock]:
        # 53 weights against 68 + ~100 landmarks: several shapes move the same
        # points (eyeLook* and eyeSquint the lids, cheek* the cheek line), and
        # with FLAME's weak priors the fit followed the 1 px landmark noise
        # (68-point error 1.04 px against the noiseless points, weights 0.11
        # off on synthetic ICT heads; 0.68 px and 0.06 with these).
        # Identity: ICT samples it from N(0, 1), but the fitter weighs
        # landmarks as 1 px noise, and a real detector on a small face is
        # 3-5 px off at the 512 px crop (carphone: 4.1 px mean 68-point
        # error); under N(0, 1) carphone's identity reached 13 sd on mode 77
        # (0.1 mm rms per sd), fitting the detector's own idea of the
        # landmarks. sd 0.3 is N(0, 1) against ~3.3 px noise.
        # 48 calibration frames, not 32: on synthetic heads (bench_ict.py,
        # six seeds) 32 left seed 1 at 5.4 % focal error; 48 gives 1.1 % and
        # 1.2 mm on average (largest 3.1 % and 2.5 mm), 64 1.2 % and 1.2 mm
        # (2.7 % and 2.2 mm) but made a whole ICT run 1.54x a FLAME one
        # against 1.11x with 48 (benchmarks/RESULTS.md, "bench_ict.py").
        return {"shape": ParameterBlock("shape", self.n_shape, 0.3, calibration_frames=48),
                "expression": ParameterBlock("expression", self.n_exp, 0.5, (0.0, 1.0),
                                             tuple(self.expression_names), temporal_sigma=0.1)}

    def linear_parts(self) -> LinearParts:
        d = torch.float64
        v_t = self.ict.v_template.detach().cpu().to(d)
        dirs = torch.cat([self.ict.shapedirs.detach().cpu().to(d), self.ict.expdirs.detach().cpu().to(d)], 2)
        V, C = v_t.shape[0], dirs.shape[2]
        weights = torch.zeros(V, 3, dtype=d)
        joints = torch.zeros(3, 3, dtype=d)
        joint_dirs = torch.zeros(3, 3, C, dtype=d)
        for k, (ids, centre_ids) in enumerate(((self.eye_left_ids, self.centre_left_ids),
                                               (self.eye_right_ids, self.centre_right_ids)), start=1):
            ids, centre_ids = ids.cpu(), centre_ids.cpu()
            weights[ids, k] = 1.0
            joints[k] = sphere_centre(v_t[centre_ids])
            # The fitter needs the centres linear in the coefficients: each
            # column is the centre's change under that mode alone (ICT's
            # identity modes shift and scale an eyeball, under which the
            # sphere fit is linear).
            for c in range(C):
                joint_dirs[k, :, c] = sphere_centre(v_t[centre_ids] + dirs[centre_ids, :, c]) - joints[k]
        return LinearParts(v_template=v_t, dirs=dirs, posedirs=None, weights=weights, joints=joints,
                           joint_dirs=joint_dirs)

    def posed_vertices(self, shape: torch.Tensor, expression: torch.Tensor, jaw_pose: Optional[torch.Tensor] = None,
                       eye_pose: Optional[torch.Tensor] = None,
                       neck_pose: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Vertices [B,V,3], model space (meters): v_template + shapedirs
        shape + expdirs expression, then each eyeball rotated by eye_pose
        about its centre. jaw_pose and neck_pose must be None or zero (ICT's
        jaw is a blendshape; it has no neck joint)."""
        if jaw_pose is not None and bool(jaw_pose.abs().max() > 1e-6):
            raise ValueError("ICT has no jaw joint: open the jaw through the jawOpen expression weight")
        if neck_pose is not None and bool(neck_pose.abs().max() > 1e-6):
            raise ValueError("ICT has no neck joint: a neck rotation cannot be posed")
        verts = self.ict.v_template + torch.einsum("vcs,bs->bvc", self.ict.shapedirs, shape) \
            + torch.einsum("vce,be->bvc", self.ict.expdirs, expression)
        if eye_pose is None:
            return verts
        B = verts.shape[0]
        R = batch_rodrigues(eye_pose.reshape(-1, 3).to(verts.dtype)).reshape(B, 2, 3, 3)
        centres = self._linear_eye_centres(shape, expression).to(verts)
        verts = verts.clone()
        for k, ids in enumerate((self.eye_left_ids, self.eye_right_ids)):
            c = centres[:, k, None]
            verts[:, ids] = torch.einsum("bij,bvj->bvi", R[:, k], verts[:, ids] - c) + c
        return verts

    def _linear_eye_centres(self, shape, expression) -> torch.Tensor:
        """Eyeball centres [B,2,3] as the fitter's landmark basis has them."""
        if not hasattr(self, "_eye_centre_basis"):
            parts = self.linear_parts()
            self._eye_centre_basis = (parts.joints[1:].float(), parts.joint_dirs[1:].float())
        J0, Jd = (x.to(shape.device) for x in self._eye_centre_basis)
        coeffs = torch.cat([shape, expression], 1).to(J0.dtype)
        return J0[None] + torch.einsum("kcs,bs->bkc", Jd, coeffs)

    def landmarks68(self, vertices: torch.Tensor, head_rotation: torch.Tensor) -> torch.Tensor:
        """68 iBUG landmarks [B,68,3] with the jaw contour chosen by yaw."""
        from .flame import contour_rows

        rows = contour_rows(head_rotation, self.dynamic_faces.shape[0])
        contour = barycentric_points(vertices, self.faces, self.dynamic_faces[rows], self.dynamic_bary[rows])
        inner = barycentric_points(vertices, self.faces, self.static_faces, self.static_bary)
        return torch.cat([contour, inner], dim=1)

    def model_meta(self) -> dict:
        return {"name": "ict", "version": "ICT-FaceKit Face Model Light", "licence": ICT_LICENCE,
                "sha256": self.sha256, "n_shape": self.n_shape, "n_exp": self.n_exp,
                "n_vertices": self.n_vertices, "expression_names": list(self.expression_names),
                "model_space": "ICT-FaceKit OBJ coordinates / 100 (meters), not re-centred; "
                               "shape[k] weights identityNNN.obj - neutral, expression[:, j] <name>.obj - neutral",
                "jaw": "through the jaw* expression shapes; jaw_pose is always 0",
                "eyes": "eyeballs rotated rigidly about their sphere centres by eye_pose"}


def load_ict(path=None, device: str = "cpu") -> ICTHeadModel:
    """The shipped ICT model (or the .npz at `path`) as a `HeadModel`."""
    from .ict import ICT

    return ICTHeadModel(ICT.load(path, device="cpu")).to(device)


def expression_block_names(model) -> Optional[List[str]]:
    names = getattr(model, "expression_names", None)
    return list(names) if names is not None else None
