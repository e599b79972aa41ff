"""Exports of a tracking result for avatar pipelines (see docs/formats.md).

Every exporter reads the same `tracking.npz` + `meta.json` (OpenCV cameras,
FLAME model space in meters, OpenCV pixels: pixel centres on integers) and
converts cameras through `lightning_ft.cameras` into each consumer's own
pixel convention (several consumers measure pixels from the image corner;
see docs/formats.md). Formats:

- ``vhap``: VHAP's `tracked_flame_params.npz` plus the NeRF-style dataset that
  VHAP's `export_as_nerf_dataset.py` writes and GaussianAvatars trains on.
- ``metrical``: metrical-tracker's `checkpoint/<00000>.frame` files (INSTA,
  FlashAvatar).
- ``lightning``: the original LightningTrack's per-frame pickle (GPAvatar,
  GAGAvatar), PyTorch3D camera, vertices scaled by 5.
- ``nerface``: `transforms_{train,val,test}.json` with expressions.
- ``mesh``: per-frame OBJ in OpenCV camera space and the neutral identity mesh.
- ``arkit``: per-frame ARKit blendshape weights and head/eye angles as CSV in
  Live Link Face's column layout (a result tracked with ICT only).

vhap, metrical and lightning write FLAME parameters that the consumer
evaluates with its own FLAME: they refuse a result tracked with ICT.

Each output folder gets `export_info.json` with the FLAME version and model
hash, the pixel convention of the source and of the written intrinsics, and
the list of approximations made (e.g. a neck rotation folded into
the camera for a format without a neck joint).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import cameras as cam
from .assets import FLAME_LANDMARK_EMBEDDING, FLAME_MEDIAPIPE_EMBEDDING
from .errors import UsageError, VideoError
from .flame import FLAME
from .head_model import load_ict
from .posing import posed_frames
from .progress import progress
from .results import LoadedResult, ResultFileError, load_tracking, same_source, source_identity
from .video import crop_frame, iter_frames

log = logging.getLogger(__name__)

FrameSource = Union[Callable[[int], np.ndarray], Sequence[np.ndarray], Iterable[np.ndarray]]


# ----------------------------------------------------------------------------
# FLAME versions


# Released files whose hash is known here; none can be downloaded on these
# machines, so entries are added when someone checks a real file.
KNOWN_FLAME_SHA256: Dict[str, str] = {}

FLAME_VERSIONS = ("2020", "2023", "2023-open", "unknown")


def normalize_flame_version(label: Optional[str]) -> str:
    """One of FLAME_VERSIONS from a free-form label ('FLAME 2020', 'flame2023_open', ...)."""
    if not label:
        return "unknown"
    s = str(label).lower().replace(" ", "").replace("_", "").replace("-", "")
    if "2023" in s and "open" in s:
        return "2023-open"
    if "2023" in s:
        return "2023"
    if "2020" in s:
        return "2020"
    return "unknown"


def detect_flame_version(model_data: Any, path: Optional[Path] = None) -> str:
    """FLAME release ('2020', '2023', '2023-open' or 'unknown') of a model file.

    model_data: the raw dict unpickled from the model file, or a
    `flame.FlameModelData`. Signals, strongest first: an explicit version
    entry in the file; the file's sha256 among KNOWN_FLAME_SHA256; the file
    name as released ('flame2023.pkl', 'flame2023_no_jaw.pkl', 'FLAME2023 Open'
    names, 'generic_model.pkl' for 2020). The arrays alone do not tell 2020
    and 2023 apart: both have 5023 vertices, 300 shape + 100 expression
    components, 5 joints and 36 pose correctives.
    """
    raw = model_data if isinstance(model_data, dict) else {}
    for key in ("flame_version", "version"):
        label = raw.get(key)
        if isinstance(label, bytes):
            label = label.decode("latin1")
        if isinstance(label, str) and normalize_flame_version(label) != "unknown":
            return normalize_flame_version(label)
    sha = getattr(model_data, "sha256", None)
    if sha and sha in KNOWN_FLAME_SHA256:
        return KNOWN_FLAME_SHA256[sha]
    path = Path(path) if path is not None else getattr(model_data, "path", None)
    if path is not None:
        name = Path(path).name.lower()
        from_name = normalize_flame_version(name + " " + Path(path).parent.name.lower())
        if from_name != "unknown":
            return from_name
        if name == "generic_model.pkl":
            return "2020"
    return "unknown"


# ----------------------------------------------------------------------------
# The head model a result needs


def flame_version_of(result: LoadedResult) -> str:
    """The FLAME release a result was tracked with, one of FLAME_VERSIONS."""
    return normalize_flame_version(result.flame_info.get("version"))


@dataclass
class ModelEvaluation:
    """What the exporters take from the head model, per tracking frame.

    model: the head model (posing through `posing.posed_frames`); root
    [T,3] and neck [T,3] joint positions at rest, model space (meters; they
    depend on shape and expression; zero for a model without joints, ICT);
    faces [F,3]; neutral_vertices [V,3]: the identity with zero expression
    and pose."""

    model: Any
    root: np.ndarray
    neck: np.ndarray
    faces: np.ndarray
    neutral_vertices: np.ndarray


def load_flame_for(result: LoadedResult):
    """Build `flame.FLAME` from the paths recorded in meta.json ('flame' entry)."""
    info = result.flame_info
    model_path = info.get("model_path")
    if not model_path:
        raise ResultFileError(f"{result.path / 'meta.json'}: no flame.model_path; pass the FLAME model explicitly")
    folder = Path(model_path).parent
    lmk = Path(info.get("landmark_embedding_path", folder / Path(FLAME_LANDMARK_EMBEDDING).name))
    mp = Path(info.get("mediapipe_embedding_path", folder / Path(FLAME_MEDIAPIPE_EMBEDDING).name))
    return FLAME(Path(model_path), lmk, mp, n_shape=int(info.get("n_shape", result.track.shape.shape[0])),
                 n_exp=int(info.get("n_exp", result.track.expression.shape[1])), dtype=torch.float64)


def load_model_for(result: LoadedResult):
    """The head model a result was tracked with (FLAME from the paths in
    meta.json; ICT, built in, checked against the recorded sha256)."""
    if result.model_name == "flame":
        return load_flame_for(result)
    model = load_ict()
    recorded = result.meta.get("model", {}).get("sha256")
    if recorded and model.sha256 and recorded != model.sha256:
        raise UsageError(f"{result.path / 'meta.json'}: tracked with an ICT model of sha256 {recorded[:12]}..., "
                         f"this installation ships {model.sha256[:12]}...; export with the same version")
    return model


def evaluate_model(result: LoadedResult, model, chunk: int = 128) -> ModelEvaluation:
    """The joints (FLAME's root and neck, in chunks of frames; zero for a
    model without joints) and the neutral identity of `result` under
    `model`, refusing a FLAME file other than the one tracked with."""
    track = result.track
    dtype = model.v_template.dtype
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype)  # noqa: E731
    root = neck = np.zeros((track.n_frames, 3))
    if getattr(model, "name", "flame") == "flame":
        _check_flame_file(result, model)
        root, neck = [], []
        with torch.no_grad():
            for s in range(0, track.n_frames, chunk):
                e = min(s + chunk, track.n_frames)
                out = model(shape=t(track.shape)[None].expand(e - s, -1), expression=t(track.expression[s:e]),
                            jaw_pose=t(track.jaw_pose[s:e]), neck_pose=t(track.neck_pose[s:e]),
                            eye_pose=t(track.eye_pose[s:e]))
                root.append(out.joints[:, 0].double().numpy())
                neck.append(out.joints[:, 1].double().numpy())
        root, neck = np.concatenate(root), np.concatenate(neck)
    with torch.no_grad():
        neutral = model.posed_vertices(t(track.shape)[None], torch.zeros(1, model.n_exp, dtype=dtype))
    return ModelEvaluation(model=model, root=root, neck=neck, faces=model.faces.numpy().astype(np.int64),
                           neutral_vertices=neutral[0].double().numpy())


def _check_flame_file(result: LoadedResult, flame) -> None:
    info = result.flame_info
    if info.get("sha256") and getattr(flame, "sha256", None) and flame.sha256 != info["sha256"]:
        raise UsageError(
            f"{result.path / 'meta.json'}: tracked with FLAME sha256 {info['sha256'][:12]}..., but the model "
            f"given for export ({getattr(flame.data, 'path', '?')}) has {flame.sha256[:12]}...; use the same file"
        )


# ----------------------------------------------------------------------------
# Atomic file writing


def _atomic_write(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _write_json(path: Path, obj: Any) -> Path:
    return _atomic_write(path, json.dumps(obj, indent=2).encode())


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return _atomic_write(path, buf.getvalue())


def _write_image(path: Path, rgb: np.ndarray, size_wh: Optional[tuple] = None) -> Path:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    if size_wh is not None and img.size != tuple(size_wh):
        img = img.resize(tuple(size_wh), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG" if path.suffix.lower() == ".png" else "JPEG", quality=95)
    return _atomic_write(path, buf.getvalue())


def _obj_text(vertices: np.ndarray, faces: np.ndarray) -> str:
    lines = [f"v {x:.8f} {y:.8f} {z:.8f}" for x, y, z in vertices]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    return "\n".join(lines) + "\n"


class _Frames:
    """Random access to the crop images [H,W,3] uint8 RGB, or none at all."""

    def __init__(self, source: Optional[FrameSource], n_frames: int):
        self.n = n_frames
        if source is None or callable(source):
            self.get = source
        else:
            frames = list(source)
            if len(frames) != n_frames:
                raise UsageError(f"export: got {len(frames)} frame images for {n_frames} tracked frames")
            self.get = frames.__getitem__

    @property
    def available(self) -> bool:
        return self.get is not None

    def __call__(self, i: int) -> np.ndarray:
        img = np.asarray(self.get(i))
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise UsageError(f"export: frame {i} is {img.shape} {img.dtype}, expected [H,W,3] uint8 RGB")
        return img


class SourceFrames:
    """The crops of a result's frames decoded again from its source video:
    callable(i) -> RGB uint8 [H,W,3], crop i (source frame frame_ids[i],
    crop box crop_boxes[i], resized to the result's image size). Decodes
    forward; asking for an earlier frame starts the decoder again."""

    def __init__(self, video: Path, frame_ids: np.ndarray, crop_boxes: np.ndarray, size: int):
        self.video, self.frame_ids, self.crop_boxes, self.size = Path(video), frame_ids, crop_boxes, int(size)
        self._decoded = None
        self._last = None  # (source index, RGB frame)

    def __call__(self, i: int) -> np.ndarray:
        want = int(self.frame_ids[i])
        if self._last is None or self._last[0] != want:
            if self._decoded is None or self._last is None or want < self._last[0]:
                self._decoded = iter_frames(self.video)
            for index, _, image in self._decoded:
                if index == want:
                    self._last = (index, image)
                    break
            else:
                raise VideoError(f"{self.video}: has no frame {want}; it is not the video this result was tracked "
                                 f"from (pass that one with --video)")
        return crop_frame(self._last[1], self.crop_boxes[i], self.size)


# Formats whose files name frame images.
IMAGE_FORMATS = ("vhap", "metrical", "lightning", "nerface")


def source_frames(result: LoadedResult, video: Optional[Path] = None, required: bool = True
                  ) -> Optional[SourceFrames]:
    """The crops of `result` from `video`, else from the source recorded in
    meta.json. A recorded source that is gone or changed (size and content
    hash) is refused: ResultFileError naming it when `required`, else a
    warning and None. An explicit `video` whose content differs from the
    recorded one is used with a warning."""
    recorded = (result.meta.get("sources") or {}).get("video")
    path = Path(video) if video is not None else Path(
        (recorded or {}).get("path") or (result.meta.get("video") or {}).get("path") or "")
    problem = None
    if not str(path) or str(path) == ".":
        problem = "it records no source video (tracked from --landmarks alone); pass the video with --video"
    elif not path.is_file():
        problem = f"its source video {path} is not there; pass where it is now with --video PATH"
    elif recorded is not None and not same_source(recorded, source_identity(path)):
        if video is None:
            problem = (f"its source video {path} changed since tracking (size or content); pass the original "
                       f"with --video PATH")
        else:
            log.warning("%s: not the file this result was tracked from (size or content differ); its frames are "
                        "used as they are", path)
    if problem is not None:
        if required:
            raise ResultFileError(f"{result.path}: {problem}")
        log.warning("%s: %s; image files are not written", result.path, problem)
        return None
    return SourceFrames(path, result.track.frame_ids, result.track.crop_boxes, result.camera.height)


# ----------------------------------------------------------------------------
# Shared conversions


def _pad(a: np.ndarray, n: int, what: str, fmt: str) -> np.ndarray:
    """Zero-pad the last axis to n components (exact: extra components are 0)."""
    if a.shape[-1] > n:
        raise UsageError(f"export {fmt}: tracking has {a.shape[-1]} {what} components, the format holds {n}; "
                         f"track with at most {n}")
    return np.concatenate([a, np.zeros(a.shape[:-1] + (n - a.shape[-1],), a.dtype)], axis=-1)


def _fold_neck(result: LoadedResult, evaluation: ModelEvaluation, notes: List[str], fmt: str):
    """Extrinsics (R [T,3,3], t [T,3]) with the neck rotation folded in, for formats without a neck.

    The head turns about the neck joint: x = R (R_n (X - J_n) + J_n) + t.
    Exact for vertices skinned only to the neck's subtree; the neck's
    pose-corrective offsets are lost, so a non-zero neck is recorded.
    """
    R, t = result.track.rotation.astype(np.float64), result.track.translation.astype(np.float64)
    neck_angle = np.linalg.norm(result.track.neck_pose, axis=-1)
    if not np.any(neck_angle > 1e-8):
        return R, t
    Rn = cam.axis_angle_to_matrix(result.track.neck_pose)
    J = evaluation.neck
    R_new = R @ Rn
    t_new = t + np.einsum("tij,tj->ti", R, J - np.einsum("tij,tj->ti", Rn, J))
    msg = (f"{fmt}: the format has no neck joint; neck rotation (up to {np.degrees(neck_angle.max()):.2f} deg) "
           "was folded into the camera about the neck joint (neck pose correctives dropped)")
    log.warning(msg)
    notes.append(msg)
    return R_new, t_new


def _record_dropped(values: np.ndarray, what: str, fmt: str, notes: List[str]) -> None:
    mag = float(np.abs(values).max()) if values.size else 0.0
    if mag > 1e-8:
        msg = f"{fmt}: the format has no {what}; dropped (max |value| {mag:.4f})"
        log.warning(msg)
        notes.append(msg)


def _require_images_note(frames: _Frames, fmt: str, notes: List[str]) -> None:
    if not frames.available:
        msg = f"{fmt}: no frame images were given; image files were not written"
        log.warning(msg)
        notes.append(msg)


def _valid_indices(result: LoadedResult, notes: List[str], fmt: str) -> np.ndarray:
    idx = np.flatnonzero(result.track.valid)
    if len(idx) < result.track.n_frames:
        notes.append(f"{fmt}: {result.track.n_frames - len(idx)} frames without a valid fit were left out")
    if len(idx) == 0:
        raise UsageError(f"{result.path / 'tracking.npz'}: no valid frames to export")
    return idx


# ----------------------------------------------------------------------------
# vhap (VHAP -> GaussianAvatars)


VHAP_N_SHAPE, VHAP_N_EXPR = 300, 100


def _vhap_crop(result: LoadedResult):
    """((x0, W'), (y0, H')): the image crop that centres the principal point; refuses
    cameras a field-of-view camera cannot hold."""
    fx, fy = (float(v) for v in result.camera.focal_length)
    if abs(fx - fy) > 1e-3:
        raise UsageError(f"export vhap: GaussianAvatars derives fy from fx (one field of view); the tracking has "
                         f"fx={fx:.3f}, fy={fy:.3f}; track with a single focal length")
    return (_centred_span(float(result.camera.principal_point[0]), result.camera.width, "x"),
            _centred_span(float(result.camera.principal_point[1]), result.camera.height, "y"))


def _lightning_precheck(result: LoadedResult) -> None:
    if result.camera.height != result.camera.width:
        raise UsageError(f"export lightning: LightningTrack uses square 512x512 frames; the crop is "
                         f"{result.camera.width}x{result.camera.height}")


def _centred_span(c: float, size: int, axis: str):
    """(start, length) of the largest pixel span [start, start+length) of an image side
    whose centre, start + (length-1)/2 in OpenCV pixels, is the principal point c;
    exact (no resampling) when 2c is an integer."""
    if abs(2 * c - round(2 * c)) > 1e-6:
        raise UsageError(f"export vhap: principal point {axis}={c} is not on a pixel or half-pixel, so the image "
                         "cannot be cropped to centre it without resampling; track with a centred principal point")
    edge = float(cam.opencv_to_corner_pixels(c))  # distance from the image's first edge
    half = min(edge, size - edge)
    if half <= 0:
        raise UsageError(f"export vhap: principal point {axis}={c} lies outside the {size}-pixel image")
    start = int(round(edge - half))
    return start, int(round(2 * half))


def export_vhap(result: LoadedResult, out_dir: Path, evaluation: ModelEvaluation, frames: _Frames,
                notes: List[str]) -> List[Path]:
    """VHAP's tracked_flame_params.npz and the NeRF dataset of export_as_nerf_dataset.py.

    World frame: the OpenGL camera frame shifted so the mean head translation
    is at the origin (as VHAP relocates FLAME); the camera is static with
    transform_matrix = [[I, -mean], [0, 1]]. FLAME rotation is applied by LBS
    about the root joint J0, so translation = t_gl + R_gl J0 - J0 - mean.
    """
    out_dir = Path(out_dir)
    idx = _valid_indices(result, notes, "vhap")
    fx, fy = (float(v) for v in result.camera.focal_length)
    (x0, W), (y0, H) = _vhap_crop(result)
    if (x0, y0, W, H) != (0, 0, result.camera.width, result.camera.height):
        notes.append(f"vhap: images cropped to [{x0}:{x0 + W}, {y0}:{y0 + H}] of the {result.camera.width}x{result.camera.height} "
                     "crop so the principal point is centred, as GaussianAvatars' field-of-view camera assumes")
    # VHAP's own cx, cy feed nvdiffrast, whose pixel centres sit at +0.5 from the
    # corner (vhap/util/render_nvdiffrast.py projection_from_intrinsics): the
    # centred principal point ((W-1)/2, (H-1)/2) of the crop is (W/2, H/2) there.
    # GaussianAvatars ignores cx, cy and centres its field of view itself.
    cx, cy = (float(v) for v in cam.opencv_to_corner_pixels(cam.centred_principal_point([H, W])))
    R_gl = cam.OPENCV_TO_OPENGL @ result.track.rotation[idx].astype(np.float64)
    t_gl = result.track.translation[idx].astype(np.float64) @ cam.OPENCV_TO_OPENGL
    J0 = evaluation.root[idx]
    trans = t_gl + np.einsum("tij,tj->ti", R_gl, J0) - J0
    mean = trans.mean(axis=0)
    trans = trans - mean
    rotation = cam.matrix_to_axis_angle(R_gl)
    shape = _pad(result.track.shape.astype(np.float32), VHAP_N_SHAPE, "shape", "vhap")
    expr = _pad(result.track.expression[idx].astype(np.float32), VHAP_N_EXPR, "expression", "vhap")
    params = {
        "rotation": rotation.astype(np.float32), "translation": trans.astype(np.float32),
        "neck_pose": result.track.neck_pose[idx].astype(np.float32), "jaw_pose": result.track.jaw_pose[idx].astype(np.float32),
        "eyes_pose": result.track.eye_pose[idx].astype(np.float32), "shape": shape, "expr": expr,
        # GaussianAvatars reads static_offset [1,V,3] (it pads the teeth vertices itself).
        "static_offset": np.zeros((1, evaluation.neutral_vertices.shape[0], 3), np.float32),
    }
    written = [_write_npz(out_dir / "tracked_flame_params_30.npz", **params,
                          timestep_id=np.array([f"{int(f):05d}" for f in result.track.frame_ids[idx]]),
                          n_processed_frames=np.array(len(idx)),
                          # VHAP stores focal length divided by max(H, W).
                          focal_length=np.array([fx / max(H, W)], dtype=np.float32))]
    c2w = np.eye(4)
    c2w[:3, 3] = -mean
    intr = {"cx": cx, "cy": cy, "fl_x": fx, "fl_y": fy, "h": H, "w": W,
            "camera_angle_x": float(cam.focal_to_fov(fx, W)), "camera_angle_y": float(cam.focal_to_fov(fy, H))}
    _require_images_note(frames, "vhap", notes)
    frame_items = []
    for ti, i in progress(enumerate(idx), total=len(idx), desc="export vhap"):
        item = {"timestep_index": ti, "timestep_index_original": int(i),
                "timestep_id": f"{int(result.track.frame_ids[i]):05d}", "camera_index": 0, "camera_id": "0",
                **intr, "transform_matrix": c2w.tolist(),
                "file_path": f"images/{ti:05d}_00.png", "flame_param_path": f"flame_param/{ti:05d}.npz"}
        frame_items.append(item)
        written.append(_write_npz(out_dir / item["flame_param_path"],
                                  **{k: (v if k in ("shape", "static_offset") else v[[ti]])
                                     for k, v in params.items()}))
        if frames.available:
            written.append(_write_image(out_dir / item["file_path"], frames(int(i))[y0:y0 + H, x0:x0 + W]))
    canonical = {"translation": np.zeros((1, 3), np.float32), "rotation": np.zeros((1, 3), np.float32),
                 "neck_pose": np.zeros((1, 3), np.float32), "jaw_pose": np.array([[0.3, 0, 0]], np.float32),
                 "eyes_pose": np.zeros((1, 6), np.float32), "shape": shape,
                 "expr": np.zeros((1, VHAP_N_EXPR), np.float32), "static_offset": params["static_offset"]}
    written.append(_write_npz(out_dir / "canonical_flame_param.npz", **canonical))
    db = {"frames": frame_items, **intr, "timestep_indices": list(range(len(idx))), "camera_indices": [0]}
    written.append(_write_json(out_dir / "transforms.json", db))
    # VHAP's split: the first 70% of timesteps train, the rest test; one
    # camera, so an empty validation set.
    n_train = int(np.ceil(len(idx) * 0.7))
    base = {k: v for k, v in db.items() if k not in ("frames", "timestep_indices", "camera_indices")}
    splits = {"train": (frame_items[:n_train], list(range(n_train)), [0]),
              "val": ([], list(range(n_train)), []),
              "test": (frame_items[n_train:], list(range(n_train, len(idx))), [0])}
    for name, (items, ts, cams) in splits.items():
        written.append(_write_json(out_dir / f"transforms_{name}.json",
                                   {**base, "frames": items, "timestep_indices": ts, "camera_indices": cams}))
    return written


# ----------------------------------------------------------------------------
# metrical (metrical-tracker -> INSTA, FlashAvatar)


METRICAL_N_SHAPE, METRICAL_N_EXP, METRICAL_N_TEX = 300, 100, 140


def export_metrical(result: LoadedResult, out_dir: Path, evaluation: ModelEvaluation, frames: _Frames,
                    notes: List[str]) -> List[Path]:
    """checkpoint/<00000>.frame files (torch.save of a dict of numpy arrays) and input/<00000>.png.

    World = FLAME model space with identity global and neck rotation; the
    camera carries the head pose: PyTorch3D R (6D), T and NDC focal /
    principal point, plus the same camera in OpenCV form (R, t, K) with K's
    principal point in corner-origin pixels, as metrical-tracker writes it.
    """
    out_dir = Path(out_dir)
    idx = _valid_indices(result, notes, "metrical")
    R, t = _fold_neck(result, evaluation, notes, "metrical")
    H, W = result.camera.height, result.camera.width
    focal_ndc, pp_ndc = cam.pixel_to_ndc_intrinsics(result.camera.focal_length, result.camera.principal_point, [H, W])
    fl = focal_ndc[:1] if np.isclose(focal_ndc[0], focal_ndc[1], rtol=0, atol=1e-12) else focal_ndc
    # metrical-tracker writes 'opencv' with PyTorch3D's opencv_from_cameras_projection,
    # which puts K's principal point in PyTorch3D screen (corner-origin) pixels; INSTA
    # hands that cx, cy to instant-ngp, which also measures from the corner.
    K = cam.intrinsic_matrix(result.camera.focal_length, cam.opencv_to_corner_pixels(result.camera.principal_point))
    shape = _pad(result.track.shape.astype(np.float32)[None], METRICAL_N_SHAPE, "shape", "metrical")
    exp = _pad(result.track.expression.astype(np.float32), METRICAL_N_EXP, "expression", "metrical")
    tex_src = result.track.texture
    tex = np.zeros((1, METRICAL_N_TEX), np.float32)
    if tex_src is not None:
        notes.append("metrical: texture coefficients are LightningFT's texture space, not metrical-tracker's BFM albedo")
        tex[0, :min(METRICAL_N_TEX, tex_src.shape[-1])] = tex_src[:METRICAL_N_TEX]
    light = result.track.lighting
    eye6 = cam.matrix_to_rotation_6d(cam.axis_angle_to_matrix(result.track.eye_pose.reshape(-1, 2, 3))).reshape(-1, 12)
    jaw6 = cam.matrix_to_rotation_6d(cam.axis_angle_to_matrix(result.track.jaw_pose))
    R_p3d, T_p3d = cam.opencv_to_pytorch3d(R, t)
    offset = np.asarray(result.camera.principal_point, np.float64) - cam.centred_principal_point([H, W])
    if np.abs(offset).max() > 1e-3:
        notes.append(f"metrical: principal point is ({offset[0]:+.2f}, {offset[1]:+.2f}) px from the image centre; "
                     "metrical-tracker and INSTA use it, FlashAvatar's field-of-view camera ignores it")
    _require_images_note(frames, "metrical", notes)
    written = []
    for n, i in progress(enumerate(idx), total=len(idx), desc="export metrical"):
        frame_id = f"{n:05d}"
        sh = np.zeros((1, 9, 3), np.float32)
        if light is not None:
            sh[0] = light[i] if light.ndim == 3 else light
        payload = {
            "flame": {"exp": exp[[i]], "shape": shape, "tex": tex, "sh": sh,
                      "eyes": eye6[[i]].astype(np.float32), "eyelids": np.zeros((1, 2), np.float32),
                      "jaw": jaw6[[i]].astype(np.float32)},
            "camera": {"R": cam.matrix_to_rotation_6d(R_p3d[[i]]).astype(np.float32),
                       "t": T_p3d[[i]].astype(np.float32), "fl": fl[None].astype(np.float32),
                       "pp": pp_ndc[None].astype(np.float32)},
            "opencv": {"R": R[[i]].astype(np.float32), "t": t[[i]].astype(np.float32),
                       "K": K[None].astype(np.float32)},
            "img_size": np.array([H, W], dtype=np.int64),
            "frame_id": frame_id,
            "global_step": 0,
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        written.append(_atomic_write(out_dir / "checkpoint" / f"{frame_id}.frame", buf.getvalue()))
        if frames.available:
            written.append(_write_image(out_dir / "input" / f"{frame_id}.png", frames(int(i))))
    return written


# ----------------------------------------------------------------------------
# lightning (original LightningTrack -> GPAvatar, GAGAvatar)


LIGHTNING_IMAGE_SIZE = 512
LIGHTNING_VERTS_SCALE = 5.0
LIGHTNING_N_SHAPE, LIGHTNING_N_EXP = 100, 50


def export_lightning(result: LoadedResult, out_dir: Path, evaluation: ModelEvaluation, frames: _Frames,
                     notes: List[str]) -> List[Path]:
    """lightning.pkl: {'<video>_<index>': {...}} as LightningTrack writes, plus calibration.json.

    Per frame: bbox [4] float32 (x0, y0, x1, y1) as fractions of the image,
    mica_shape / emoca_shape [100], emoca_expression [50], emoca_pose [6]
    (global 0, jaw), transform_matrix [3,4] = [R | T] of PyTorch3D for
    vertices scaled by 5. Images: images/<name>.png at 512x512.
    """
    _lightning_precheck(result)
    H, W = result.camera.height, result.camera.width
    out_dir = Path(out_dir)
    idx = _valid_indices(result, notes, "lightning")
    R, t = _fold_neck(result, evaluation, notes, "lightning")
    _record_dropped(result.track.eye_pose[idx], "eye rotation", "lightning", notes)
    R_p3d, T_p3d = cam.opencv_to_pytorch3d(R, t * LIGHTNING_VERTS_SCALE)
    transform = np.concatenate([R_p3d, T_p3d[..., None]], axis=-1).astype(np.float32)
    # NDC intrinsics are unchanged by resizing the square crop to 512.
    focal_ndc, pp_ndc = cam.pixel_to_ndc_intrinsics(result.camera.focal_length, result.camera.principal_point, [H, W])
    shape = _pad(result.track.shape.astype(np.float32), LIGHTNING_N_SHAPE, "shape", "lightning")
    expr = _pad(result.track.expression.astype(np.float32), LIGHTNING_N_EXP, "expression", "lightning")
    _require_images_note(frames, "lightning", notes)
    lmk = result.track.lmk68.astype(np.float64)
    records, written = {}, []
    for i in progress(idx, total=len(idx), desc="export lightning"):
        name = f"{result.video_name}_{int(result.track.frame_ids[i])}"
        # Fractions of the image measured from its corner, as LightningTrack divides
        # mediapipe's corner-origin pixels by the image size.
        lo, hi = cam.opencv_to_corner_pixels(lmk[i].min(axis=0)), cam.opencv_to_corner_pixels(lmk[i].max(axis=0))
        bbox = np.array([lo[0] / W, lo[1] / H, hi[0] / W, hi[1] / H], np.float32)
        records[name] = {
            "bbox": bbox, "mica_shape": shape.copy(), "emoca_shape": shape.copy(),
            "emoca_expression": expr[i], "emoca_pose": np.concatenate([np.zeros(3, np.float32),
                                                                       result.track.jaw_pose[i].astype(np.float32)]),
            "transform_matrix": transform[i],
        }
        if frames.available:
            written.append(_write_image(out_dir / "images" / f"{name}.png", frames(int(i)),
                                        (LIGHTNING_IMAGE_SIZE, LIGHTNING_IMAGE_SIZE)))
    written.insert(0, _atomic_write(out_dir / "lightning.pkl", pickle.dumps(records, protocol=4)))
    calibration = {"focal_length": [float(v) for v in focal_ndc], "principal_point": [float(v) for v in pp_ndc],
                   "verts_scale": LIGHTNING_VERTS_SCALE, "image_size": LIGHTNING_IMAGE_SIZE,
                   "note": "PyTorch3D PerspectiveCameras, NDC units, image_size 512x512"}
    written.insert(1, _write_json(out_dir / "calibration.json", calibration))
    return written


# ----------------------------------------------------------------------------
# nerface


def _nerface_splits(n: int) -> Dict[str, np.ndarray]:
    """Train on the first ~90% of frames, test on the rest; val repeats the test
    frames (nerface's loader cannot read an empty split)."""
    n_test = max(1, int(round(0.1 * n))) if n >= 2 else 0
    order = np.arange(n)
    test = order[n - n_test:] if n_test else order[-1:]
    return {"train": order[: n - n_test] if n_test else order, "val": test, "test": test}


def export_nerface(result: LoadedResult, out_dir: Path, evaluation: ModelEvaluation, frames: _Frames,
                   notes: List[str]) -> List[Path]:
    """transforms_{train,val,test}.json: OpenGL camera-to-world per frame (head fixed at the
    FLAME origin), expression = FLAME expression followed by jaw pose, global
    intrinsics [fx, fy, cx/W, cy/H] (focal lengths in pixels, principal point as a fraction
    of the image size, as nerface's loader reads it); images <split>/f_<0000>.png."""
    out_dir = Path(out_dir)
    idx = _valid_indices(result, notes, "nerface")
    R, t = _fold_neck(result, evaluation, notes, "nerface")
    _record_dropped(result.track.eye_pose[idx], "eye rotation", "nerface", notes)
    c2w = cam.opencv_to_opengl_c2w(R, t)
    fx, fy = (float(v) for v in result.camera.focal_length)
    # nerface's get_ray_bundle casts the ray of pixel (i, j) through
    # ((i - W*cx_frac)/fx, -(j - H*cy_frac)/fy, -1): pixel centres on integers, as
    # ours, and the principal point stored as a fraction of the image size.
    cx_frac = float(result.camera.principal_point[0]) / result.camera.width
    cy_frac = float(result.camera.principal_point[1]) / result.camera.height
    # ICT's jaw is among its expression weights; FLAME's jaw pose is appended
    with_jaw = result.model_name == "flame"
    expression = np.concatenate([result.track.expression] + ([result.track.jaw_pose] if with_jaw else []),
                                axis=1).astype(np.float64)
    _require_images_note(frames, "nerface", notes)
    written = []
    for split, members in _nerface_splits(len(idx)).items():
        items = []
        for k in members:
            i = int(idx[k])
            file_path = f"./{split}/f_{int(result.track.frame_ids[i]):04d}"
            items.append({"file_path": file_path, "transform_matrix": c2w[i].tolist(),
                          "expression": expression[i].tolist()})
            if frames.available:
                written.append(_write_image(out_dir / f"{file_path}.png", frames(i)))
        meta = {"camera_angle_x": float(cam.focal_to_fov(fx, result.camera.width)),
                "intrinsics": [fx, fy, cx_frac, cy_frac], "frames": items}
        written.append(_write_json(out_dir / f"transforms_{split}.json", meta))
    what = (f"{result.track.expression.shape[1]} FLAME expression + 3 jaw" if with_jaw
            else f"{result.track.expression.shape[1]} {result.model_name.upper()} expression weights")
    notes.append(f"nerface: expression vectors have {expression.shape[1]} values ({what}); "
                 f"set the network's expression size")
    return written


# ----------------------------------------------------------------------------
# mesh


def export_mesh(result: LoadedResult, out_dir: Path, evaluation: ModelEvaluation, frames: _Frames,
                notes: List[str]) -> List[Path]:
    """meshes/<00000>.obj per frame in OpenCV camera space (meters) and identity.obj,
    the neutral identity mesh (shape only, zero expression and pose) in model space."""
    out_dir = Path(out_dir)
    idx = _valid_indices(result, notes, "mesh")
    faces = evaluation.faces
    written = [_atomic_write(out_dir / "identity.obj", _obj_text(evaluation.neutral_vertices, faces).encode())]
    # posed 128 frames at a time: [T,V,3] of a long video would take gigabytes
    posed = ((i, verts) for chunk in posed_frames(evaluation.model, result.track, frames=idx, chunk=128,
                                                  dtype=torch.float64)
             for i, verts in zip(chunk.frames, chunk.vertices))
    for i, verts in progress(posed, total=len(idx), desc="export mesh"):
        written.append(_atomic_write(out_dir / "meshes" / f"{int(result.track.frame_ids[i]):05d}.obj",
                                     _obj_text(verts, faces).encode()))
    return written


# ----------------------------------------------------------------------------
# arkit (Live Link Face CSV)


# The 52 ARKit blendshapes in Live Link Face's CSV column order.
ARKIT_NAMES = (
    "EyeBlinkLeft EyeLookDownLeft EyeLookInLeft EyeLookOutLeft EyeLookUpLeft EyeSquintLeft EyeWideLeft "
    "EyeBlinkRight EyeLookDownRight EyeLookInRight EyeLookOutRight EyeLookUpRight EyeSquintRight EyeWideRight "
    "JawForward JawRight JawLeft JawOpen MouthClose MouthFunnel MouthPucker MouthRight MouthLeft "
    "MouthSmileLeft MouthSmileRight MouthFrownLeft MouthFrownRight MouthDimpleLeft MouthDimpleRight "
    "MouthStretchLeft MouthStretchRight MouthRollLower MouthRollUpper MouthShrugLower MouthShrugUpper "
    "MouthPressLeft MouthPressRight MouthLowerDownLeft MouthLowerDownRight MouthUpperUpLeft MouthUpperUpRight "
    "BrowDownLeft BrowDownRight BrowInnerUp BrowOuterUpLeft BrowOuterUpRight CheekPuff CheekSquintLeft "
    "CheekSquintRight NoseSneerLeft NoseSneerRight TongueOut").split()
ARKIT_ANGLES = ("HeadYaw", "HeadPitch", "HeadRoll", "LeftEyeYaw", "LeftEyePitch", "LeftEyeRoll",
                "RightEyeYaw", "RightEyePitch", "RightEyeRoll")
LIVE_LINK_FACE_COLUMNS = ("Timecode", "BlendShapeCount") + tuple(ARKIT_NAMES) + ARKIT_ANGLES


def arkit_weight_map(model_names: Sequence[str]) -> Tuple[np.ndarray, List[str]]:
    """(M [52, E], unused model names): ARKit weights = expression @ M.T.

    A model shape `fooBar_L` / `fooBar_R` feeds `FooBarLeft` / `FooBarRight`
    (the subject's left and right, in both naming schemes); an unsplit ARKit
    shape the model splits (browInnerUp, cheekPuff) is the mean of its two
    halves; a shape ARKit lacks (ICT's cheekRaiser_*, PupilDilate_*) is
    left out and listed; an ARKit shape the model lacks (tongueOut) is 0.
    """
    def arkit_key(name: str) -> str:
        base, side = (name[:-2], "Left") if name.endswith("_L") else (name[:-2], "Right") if name.endswith("_R") \
            else (name, "")
        return (base[:1].upper() + base[1:] + side).lower()

    column = {n.lower(): i for i, n in enumerate(ARKIT_NAMES)}
    M = np.zeros((len(ARKIT_NAMES), len(model_names)))
    unused = []
    for j, name in enumerate(model_names):
        key = arkit_key(name)
        if key in column:
            M[column[key], j] = 1.0
        elif key.endswith(("left", "right")) and key[:-4 if key.endswith("left") else -5] in column:
            M[column[key[:-4 if key.endswith("left") else -5]], j] = 0.5
        else:
            unused.append(name)
    return M, unused


def _euler_yaw_pitch_roll(R: np.ndarray) -> np.ndarray:
    """(yaw, pitch, roll) [T,3] radians of rotations R = Ry(yaw) Rx(pitch)
    Rz(roll) [T,3,3] in model axes (x to the subject's left, y up, z
    forward out of the face)."""
    yaw = np.arctan2(R[:, 0, 2], R[:, 2, 2])
    pitch = np.arcsin(np.clip(-R[:, 1, 2], -1.0, 1.0))
    roll = np.arctan2(R[:, 1, 0], R[:, 1, 1])
    return np.stack([yaw, pitch, roll], 1)


def _timecode(seconds: float, fps: float) -> str:
    """HH:MM:SS:FF.mmm as Live Link Face writes it (FF: frame within the second)."""
    whole = int(np.floor(seconds))
    frame = (seconds - whole) * fps
    h, m, s = whole // 3600, (whole // 60) % 60, whole % 60
    return f"{h:02d}:{m:02d}:{s:02d}:{int(frame):02d}.{int(round((frame - int(frame)) * 1000)) % 1000:03d}"


def _arkit_precheck(result: LoadedResult) -> None:
    if result.track.expression_names is None:
        raise UsageError(f"{result.path / 'tracking.npz'}: arkit writes ARKit blendshape weights, and this result "
                         f"was tracked with {result.model_name.upper()}, which has none; track with --model ict")


def export_arkit(result: LoadedResult, out_dir: Path, evaluation: Optional[ModelEvaluation], frames: _Frames,
                 notes: List[str]) -> List[Path]:
    """arkit.csv: one row per valid frame in Live Link Face's layout:
    Timecode, BlendShapeCount (61), the 52 ARKit weights in [0, 1], then
    head yaw, pitch, roll and each eye's yaw, pitch, roll in radians."""
    _arkit_precheck(result)
    idx = _valid_indices(result, notes, "arkit")
    names = [str(n) for n in result.track.expression_names]
    M, unused = arkit_weight_map(names)
    weights = np.clip(result.track.expression.astype(np.float64) @ M.T, 0.0, 1.0)
    if unused:
        notes.append(f"arkit: {', '.join(unused)} have no ARKit counterpart and are not written")
    missing = [ARKIT_NAMES[i] for i in np.flatnonzero(M.sum(1) == 0)]
    if missing:
        notes.append(f"arkit: {', '.join(missing)} not in the model; written as 0")
    # the head's rotation relative to a frontal face (the camera's y and z flipped)
    head = _euler_yaw_pitch_roll(cam.FRONTAL_ROTATION @ result.track.rotation.astype(np.float64))
    eyes = [_euler_yaw_pitch_roll(cam.axis_angle_to_matrix(result.track.eye_pose[:, 3 * k:3 * k + 3])) for k in (0, 1)]
    angles = np.concatenate([head] + eyes, 1)
    fps = float(result.track.fps)
    rows = [",".join(LIVE_LINK_FACE_COLUMNS)]
    for i in idx:
        values = np.concatenate([weights[i], angles[i]])
        rows.append(",".join([_timecode(float(result.track.frame_ids[i]) / fps, fps), str(len(values))]
                             + [f"{v:.6f}" for v in values]))
    return [_atomic_write(Path(out_dir) / "arkit.csv", ("\n".join(rows) + "\n").encode())]


# ----------------------------------------------------------------------------
# Registry and entry point


@dataclass(frozen=True)
class ExportFormat:
    """An export target: `writer(result, out_dir, evaluation, frames, notes) -> files`.

    expected_flame: the FLAME release the consumer's own FLAME code loads by
    default, or None when the consumer never evaluates FLAME itself.
    pixel_convention: what the written intrinsics mean (recorded in export_info.json).
    """

    name: str
    writer: Callable[..., List[Path]]
    consumers: str
    expected_flame: Optional[str]
    pixel_convention: str
    precheck: Optional[Callable[[LoadedResult], Any]] = None


SOURCE_PIXEL_CONVENTION = ("OpenCV: pixel (i, j) has its centre at (i, j); the image spans "
                           "[-0.5, W-0.5] x [-0.5, H-0.5]; a centred principal point is ((W-1)/2, (H-1)/2)")

FORMATS: Dict[str, ExportFormat] = {
    "vhap": ExportFormat(
        "vhap", export_vhap, "GaussianAvatars (VHAP's NeRF dataset export)", "2023",
        "cx, cy in corner-origin pixels (VHAP/nvdiffrast: pixel centres at i + 0.5), the centre of the "
        "cropped images, (w/2, h/2); GaussianAvatars reads only the field of view", _vhap_crop),
    "metrical": ExportFormat(
        "metrical", export_metrical, "INSTA, FlashAvatar (metrical-tracker)", "2020",
        "camera.pp in PyTorch3D NDC (image edges at the NDC bounds); opencv.K in corner-origin pixels "
        "(= ours + 0.5), as PyTorch3D's opencv_from_cameras_projection writes it and instant-ngp reads it"),
    "lightning": ExportFormat(
        "lightning", export_lightning, "GPAvatar, GAGAvatar (LightningTrack)", "2020",
        "PyTorch3D NDC (image edges at the NDC bounds); bbox as fractions of the image from its corner",
        _lightning_precheck),
    "nerface": ExportFormat(
        "nerface", export_nerface, "NeRFace", None,
        "intrinsics [fx, fy, cx/W, cy/H] with cx, cy in OpenCV pixels (nerface casts rays through integer "
        "pixel indices)"),
    "mesh": ExportFormat("mesh", export_mesh, "any mesh tool (OBJ)", None, "none (camera-space meshes)"),
    "arkit": ExportFormat("arkit", export_arkit, "ARKit rigs via Live Link Face CSV importers (Unreal, Blender)",
                          None, "none (no camera)", _arkit_precheck),
}


def check_flame_version(result: LoadedResult, fmt: ExportFormat, allow_mismatch: bool,
                        notes: List[str]) -> None:
    """Refuse (UsageError) when the consumer evaluates a different FLAME release than the tracking used."""
    if fmt.expected_flame is None:
        return
    have = flame_version_of(result)
    if have == "unknown":
        msg = (f"{fmt.name}: the FLAME version of the tracking is not recorded; {fmt.consumers} expects "
               f"FLAME {fmt.expected_flame}; check that you train with the same model file")
        log.warning(msg)
        notes.append(msg)
        return
    if have != fmt.expected_flame:
        if not allow_mismatch:
            raise UsageError(
                f"{result.path / 'meta.json'}: tracked with FLAME {have}, but {fmt.consumers} evaluates FLAME "
                f"{fmt.expected_flame}; the same parameters give a different mesh there. Track with FLAME "
                f"{fmt.expected_flame}, or point the consumer at your model and pass allow_version_mismatch"
            )
        notes.append(f"{fmt.name}: FLAME {have} exported for a consumer that defaults to {fmt.expected_flame} "
                     "(allowed by the user)")


def export(result_dir: Path, formats: List[str], out_dir: Optional[Path] = None, frames: Optional[FrameSource] = None,
           flame=None, allow_version_mismatch: bool = False, video: Optional[Path] = None,
           require_images: bool = False, model=None) -> List[Path]:
    """Export RESULT_DIR's tracking into each format; returns the files written.

    out_dir defaults to RESULT_DIR/export; each format goes to out_dir/<format>.
    frames: the crop images (RGB uint8 [H,W,3], one per tracked frame) as a
    sequence, iterable or callable(i); when None, formats with images
    decode them from `video`, else from the source recorded in meta.json
    (`source_frames`; with `require_images` a missing or changed source is
    an error, else a warning). flame: a `flame.FLAME`; when None it is built
    from the paths in meta.json. model: any `head_model.HeadModel` (the one
    the result was tracked with); `flame` is its older name.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UsageError(f"export: unknown format {', '.join(unknown) or '(none)'}; choose from {', '.join(FORMATS)}")
    result = load_tracking(Path(result_dir))
    out_dir = Path(out_dir) if out_dir is not None else result.path / "export"
    version_notes: Dict[str, List[str]] = {}
    for name in formats:  # refuse before writing anything
        if result.model_name != "flame" and FORMATS[name].expected_flame is not None:
            raise UsageError(f"{result.path / 'meta.json'}: tracked with {result.model_name.upper()}; {name} writes "
                             f"FLAME parameters for {FORMATS[name].consumers}; export mesh, nerface or arkit instead")
        version_notes[name] = []
        check_flame_version(result, FORMATS[name], allow_version_mismatch, version_notes[name])
        if FORMATS[name].precheck is not None:
            FORMATS[name].precheck(result)
    if frames is None and any(name in IMAGE_FORMATS for name in formats):
        frames = source_frames(result, video, required=require_images)
    frame_source = _Frames(frames, result.track.n_frames)
    model = model if model is not None else flame
    evaluation = None
    if set(formats) - {"arkit"}:  # arkit needs no mesh
        if model is None:
            model = load_model_for(result)
        evaluation = evaluate_model(result, model)
    written: List[Path] = []
    for name in formats:
        fmt = FORMATS[name]
        notes: List[str] = list(version_notes[name])  # checked (and said) once, above
        target = out_dir / name
        files = fmt.writer(result, target, evaluation, frame_source, notes)
        info = {"format": name, "consumers": fmt.consumers, "source": str(result.path),
                "pixel_convention": {"source": SOURCE_PIXEL_CONVENTION, "written": fmt.pixel_convention},
                "model": result.meta.get("model", {"name": "flame"}),
                "flame": {"version": result.flame_info.get("version"), "sha256": result.flame_info.get("sha256"),
                          "consumer_expects": fmt.expected_flame},
                "n_frames": int(result.track.valid.sum()), "notes": notes}
        files.append(_write_json(target / "export_info.json", info))
        written.extend(files)
    return written
