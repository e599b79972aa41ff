"""Tracking one video: calls its stages in order, with timing.

    video -> landmarks -> (EMOCA) -> calibration -> fitting -> smoothing -> (synthesis) -> results
    -> (visualisation, export)

Each stage is a function over data; this module passes results along and
records what happened (settings, versions, seconds per stage, quality) in
meta.json. A run over a folder of videos (shards, resume, claims) is
`batch.run`, which calls `track_one` for each video.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata as md
import json
import logging
import os
import platform
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from . import __version__
from . import landmarks as landmarks_stage
from . import video as video_stage
from .assets import flame_files, texture_space_files
from .emoca import emoca_pose_to_opencv, regress
from .errors import NoFaceError, UsageError, VideoError
from .export import export
from .fitter import (CalibrationConfig, FitConfig, FrameParams, SourceView, Targets, build_basis, calibrate,
                     fit_config_for, fit_sequence, fov_deg_to_focal, predict_landmarks)
from .flame import FLAME
from .head_model import HeadModel
from .landmarks import load_landmarks_file
from .progress import elapsed_bar
from .results import result_dir, source_identity, write_result
from .smoothing import SmoothingConfig, second_difference_jitter, smooth_track
from .synthesis import AlbedoTexture, SynthesisConfig, load_texture_space, refine
from .track import Camera, Track
from .video import FALLBACK_FPS
from .visualize import write_track_visualization

log = logging.getLogger("lightning_ft")
# Predicted relative std of the calibrated focal above which a run warns:
# synthetic heads turning +-25 deg give 2-8 % at 800-2000 px with 1 px noise
# (benchmarks/bench_calibration.py).
WEAK_FOCAL_REL_STD = 0.15
# Mean 68-point reprojection error, as a fraction of the crop side, above
# which a fit is reported as poor (log and meta.json). Synthetic heads fit
# to ~1 px at 512 px with 1 px landmark noise (tests/test_pipeline.py); the
# issue's misread rotation tag gave 29 px. Not calibrated on real FLAME
# fits, which this project has no access to.
POOR_FIT_ERROR_FRACTION = 0.03

@dataclass
class TrackConfig:
    """Everything a run needs, built once by the CLI.

    synthesis_config: settings of --synthesis; its smoothing is replaced by
    `smoothing`, so the landmark and photometric tracks are smoothed alike.
    """

    data: Optional[Path]
    out_dir: Path
    assets_dir: Path
    device: str = "cpu"
    visualize: bool = False
    synthesis: bool = False
    landmarks_file: Optional[Path] = None
    no_emoca: bool = False
    shard: Optional[Tuple[int, int]] = None
    overwrite: bool = False
    image_size: int = 512
    fps: Optional[float] = None
    lmk68: str = "auto"
    export: List[str] = field(default_factory=list)
    cache_dir: Optional[Path] = None
    progress: Optional[bool] = None
    fit: FitConfig = field(default_factory=FitConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    # A known camera (source-video pixels / horizontal degrees) or one focal
    # calibrated over all videos of the run (docs/camera.md).
    focal_px: Optional[float] = None
    fov_deg: Optional[float] = None
    shared_camera: bool = False
    synthesis_config: SynthesisConfig = field(default_factory=SynthesisConfig)
    # Head model: "flame", "ict", or None: FLAME where its files are under
    # assets_dir, else ICT (built in). assets_named: the user chose assets_dir
    # (--assets or $LIGHTNING_FT_ASSETS); then missing FLAME files are an
    # error, not a reason to switch models.
    model: Optional[str] = None
    assets_named: bool = True


# The TrackConfig fields that shape a result: a finished result is reused
# only when all of them are as they were (recorded in meta.json's
# "result_settings"); add a field here when it changes what is written.
RESULT_SETTINGS = ("image_size", "fps", "lmk68", "no_emoca", "synthesis", "visualize", "fit", "calibration",
                   "smoothing", "synthesis_config", "focal_px", "fov_deg", "shared_camera", "model")


def result_settings(cfg: TrackConfig) -> dict:
    """The RESULT_SETTINGS of `cfg` as plain JSON values."""

    out = {}
    for name in RESULT_SETTINGS:
        value = getattr(cfg, name)
        out[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return json.loads(json.dumps(out, default=str))


def settings_fingerprint(settings: dict) -> str:
    """SHA-256 (hex, 16 digits) of `result_settings`, order-independent."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def run_sources(video: Optional[Path], cfg: TrackConfig) -> dict:
    """The files a result of `video` is made from (`results.source_identity`);
    VideoError naming the file when one cannot be read."""
    def identity(path):
        if path is None:
            return None
        try:
            return source_identity(path)
        except OSError as exc:
            raise VideoError(f"{path}: cannot read it ({exc.strerror or exc})") from None

    return {"video": identity(video), "landmarks": identity(cfg.landmarks_file)}


class StageTimer:
    """Wall-clock seconds per stage, in call order."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


# ----------------------------------------------------------------------------
# Inputs of one video


@dataclass
class VideoInputs:
    """What one video (or one --landmarks file) gives the fit.

    landmarks: `landmarks.Landmarks` (lmk68 [T,68,2], lmk_dense [T,478,2]
    crop pixels, valid [T]); frame_ids [T] source frame index; fps;
    timestamps [T] seconds, or None (--landmarks alone); crop_boxes [T,4]
    xyxy source pixels; image_size (H, W) of the crops; source_width:
    the source video's width (pixels); frames: the face video (the crops),
    None with --landmarks alone; video_meta: meta.json's "video" entry."""

    landmarks: object
    frame_ids: np.ndarray
    fps: float
    timestamps: Optional[np.ndarray]
    crop_boxes: np.ndarray
    image_size: Tuple[int, int]
    source_width: int
    frames: object
    video_meta: dict

    @property
    def valid(self) -> np.ndarray:
        return np.asarray(self.landmarks.valid, bool)


def read_inputs(video: Optional[Path], cfg: TrackConfig, sources: dict, timer: StageTimer) -> VideoInputs:
    """The landmarks of `video` (decoded, cropped around the face and
    detected, or read from --landmarks) and the crops' geometry."""
    if cfg.landmarks_file is not None:

        with timer("landmarks"):
            lm = load_landmarks_file(cfg.landmarks_file)
        T = lm.lmk68.shape[0]
        H, W = lm.image_size
        return VideoInputs(landmarks=lm, frame_ids=np.arange(T), fps=float(cfg.fps or FALLBACK_FPS), timestamps=None,
                           crop_boxes=np.tile(np.array([0.0, 0.0, W, H]), (T, 1)), image_size=(H, W),
                           source_width=W, frames=None,
                           video_meta={"path": str(video) if video else None,
                                       "landmarks_file": str(cfg.landmarks_file)})

    cache_dir = cfg.cache_dir or (Path(cfg.out_dir) / ".cache")
    # without a frame cache, "decode_crop" times the face-box pass and the
    # crops are made during "landmarks", which reads them as they are cropped
    with timer("decode_crop"):
        face_video = video_stage.prepare(video, cache_dir=cache_dir, image_size=cfg.image_size, fps=cfg.fps,
                                         progress=cfg.progress)
    with timer("landmarks"):
        lm = cached_landmarks(face_video, cfg, sources)
    fps = float(face_video.fps)
    video_meta = {"path": str(video), "fps": fps, "frames": int(len(face_video)),
                  "cache": str(face_video.cache_path)}
    if cfg.fps is not None and cfg.fps > fps * 1.001:
        # frames are never duplicated: the source rate is the most there is
        log.warning("%s: --fps %g is above the video's %.3f fps; every frame is tracked, at %.3f fps", video,
                    cfg.fps, fps, fps)
        video_meta["fps_requested"] = float(cfg.fps)
    return VideoInputs(landmarks=lm, frame_ids=face_video.frame_ids, fps=fps, timestamps=face_video.timestamps,
                       crop_boxes=face_video.crop_boxes, image_size=tuple(face_video.image_size),
                       source_width=face_video.source_size[1], frames=face_video, video_meta=video_meta)


# ----------------------------------------------------------------------------
# Fitting


@dataclass
class LandmarkFit:
    """The landmark fit of one video.

    track: all T frames (invalid ones interpolated), smoothed, in
    tracking.npz's dtypes, with the per-frame reprojection errors; camera:
    the calibrated camera as calibration returns it (float64; `stored()`
    for tracking.npz); quality: figures for meta.json; calibration: what
    calibration did."""

    track: Track
    camera: Camera
    quality: dict
    calibration: dict


def fit_landmarks(model: HeadModel, inputs: VideoInputs, cfg: TrackConfig, timer: StageTimer, emoca=None,
                  label: str = "", calibrate_only: bool = False) -> LandmarkFit:
    """Calibrate, fit every valid frame, interpolate invalid ones, smooth.
    label: the video's name, for messages; calibrate_only: return the
    calibration's `describe` dict after calibrating."""

    H, W = inputs.image_size
    lm, valid = inputs.landmarks, inputs.valid
    fit_cfg = fit_config_for(model, replace(cfg.fit, image_size=max(H, W)))
    source = SourceView.from_crop_boxes(inputs.crop_boxes, (H, W), inputs.source_width, valid)
    with timer("calibration"), elapsed_bar(f"{Path(label).name}: calibration", cfg.progress):
        basis = build_basis(model)
        targets = Targets.from_landmarks(lm.lmk68, lm.lmk_dense, basis)
        init_shape = None if emoca is None else emoca.identity
        cal = calibrate(basis, targets, valid, (H, W), calibration_fit_config(fit_cfg),
                        calibration_config_for(model, cfg.calibration), init_shape=init_shape, source=source,
                        fixed_focal_px=_fixed_focal(cfg, source))
    if calibrate_only:
        return cal.describe(source)
    if not cal.focal_rel_std <= WEAK_FOCAL_REL_STD:  # NaN too: no curvature along the focal at all
        # advice, not a failure (meta.json has the figure): -q hides it
        log.info("%s: focal length %.0f px is weakly determined (predicted std %.0f %%): little perspective in "
                 "the landmarks (a distant face, a long lens or noisy landmarks); depth and head size share "
                 "that uncertainty", label, cal.focal_px[0], 100 * cal.focal_rel_std)
    focal = torch.tensor(cal.focal_px, dtype=torch.float32)
    pp = torch.tensor(cal.principal_point, dtype=torch.float32)
    shape = torch.tensor(cal.shape, dtype=torch.float32)
    idx = np.flatnonzero(valid)
    with timer("fitting"), elapsed_bar(f"{Path(label).name}: fitting", cfg.progress):
        res = _fit_valid_frames(model, basis, targets, idx, focal, pp, shape, fit_cfg, emoca)
    raw = _raw_track(model, inputs, res.params, idx, cal.shape)
    with timer("smoothing"):
        # translation smoothed at the face (the mean of the inner 68 points), not the model's origin
        face_centre = basis.M0[:basis.n_static].double().mean(0).numpy()
        smoothed = smooth_track(raw, inputs.fps, cfg.smoothing, timestamps=inputs.timestamps, pivot=face_centre)
        if fit_cfg.expression_bounds is not None:  # the smoother may overshoot a bound
            smoothed.expression = np.clip(smoothed.expression, *fit_cfg.expression_bounds)
    with timer("quality"):
        quality, frame_errors = _quality(basis, smoothed, focal, pp, lm.lmk68, lm.lmk_dense, valid, idx, res)
    return LandmarkFit(track=replace(smoothed, **frame_errors).stored(),
                       camera=Camera(focal_length=cal.focal_px, principal_point=cal.principal_point,
                                     image_size=np.array([H, W], np.int64)),
                       quality=quality, calibration=cal.describe(source))


def _fixed_focal(cfg: TrackConfig, source: SourceView) -> Optional[float]:
    """The crops' focal (pixels) from --focal or --fov, None to calibrate it."""
    if cfg.focal_px is not None:
        return source.crop_focal(cfg.focal_px)
    if cfg.fov_deg is not None:
        return source.crop_focal(fov_deg_to_focal(cfg.fov_deg, source.width_px))
    return None


def _fit_valid_frames(model: HeadModel, basis, targets, idx: np.ndarray, focal, pp, shape, fit_cfg: FitConfig,
                      emoca=None):
    """`fit_sequence` over the valid frames `idx`, started from EMOCA's
    pose, expression and jaw where it has them for every one."""
    sub = targets.select(torch.as_tensor(idx))
    rot0 = exp0 = jaw0 = None
    if emoca is not None:

        ok = emoca.valid[idx]
        if ok.all():
            rot0 = torch.as_tensor(emoca_pose_to_opencv(emoca.global_pose[idx]), dtype=torch.float32)
            exp0 = torch.as_tensor(emoca.expression[idx][:, :model.n_exp], dtype=torch.float32)
            jaw0 = torch.as_tensor(emoca.jaw_pose[idx], dtype=torch.float32)
    contiguous = torch.as_tensor(np.concatenate([[False], np.diff(idx) == 1]))
    return fit_sequence(basis, sub, focal, pp, shape, fit_cfg, contiguous=contiguous, rotation=rot0,
                        expression=exp0, jaw=jaw0)


def _raw_track(model: HeadModel, inputs: VideoInputs, params: FrameParams, idx: np.ndarray,
               shape: np.ndarray) -> Track:
    """The fitted frames `idx` as a Track of all T frames (float64, NaN on
    the others, neck at rest), before smoothing."""
    T = len(inputs.frame_ids)

    def full(a, fill_shape):
        out = np.full((T,) + fill_shape, np.nan, np.float64)
        out[idx] = a.detach().numpy()
        return out

    names = getattr(model, "expression_names", None)
    lm = inputs.landmarks
    return Track(frame_ids=inputs.frame_ids, valid=inputs.valid, shape=shape,
                 expression=full(params.expression, (model.n_exp,)), jaw_pose=full(params.jaw, (3,)),
                 neck_pose=np.zeros((T, 3)), eye_pose=full(params.eyes, (6,)),
                 rotation=full(params.rotation, (3, 3)), translation=full(params.translation, (3,)),
                 crop_boxes=inputs.crop_boxes, lmk68=lm.lmk68, lmk_dense=lm.lmk_dense, fps=inputs.fps,
                 expression_names=None if names is None else np.asarray(names))


def calibration_fit_config(fit_cfg: FitConfig) -> FitConfig:
    """The per-frame settings calibration runs with: those of fitting, but
    expression weights unbounded. Held at a bound, a weight cannot follow
    landmark noise downwards, so the noise is rectified into the shared
    shape and focal: on synthetic ICT heads with 1 px noise the bounded
    calibration's focal came out 12-20 % long (2 % and 0 % unbounded, same
    seeds; benchmarks/RESULTS.md, "ICT tracking"). Fitting keeps the bounds."""
    return replace(fit_cfg, expression_bounds=None)


def calibration_config_for(model: HeadModel, ccfg: CalibrationConfig) -> CalibrationConfig:
    """`ccfg` with the model's identity prior (its sd relative to the
    calibration's own N(0, sigma_shape^2)) and at least the number of
    frames the model asks to estimate it from."""
    block = model.parameter_blocks()["shape"]
    return replace(ccfg, sigma_shape=ccfg.sigma_shape * block.sigma,
                   n_frames=max(ccfg.n_frames, block.calibration_frames or 0))


def _quality(basis, smoothed: Track, focal, pp, lmk68, lmk_dense, valid, idx, res) -> Tuple[dict, dict]:
    """Reprojection errors (px) and jitter of the smoothed track on valid
    frames; also the per-frame mean errors, tracking.npz's optional
    `reprojection_error_68_px` / `reprojection_error_dense_px` [T] (crop px,
    NaN on invalid frames), which the dataset report plots over time."""
    pred68, pred_dense = predict_landmarks(basis, smoothed.to_torch().select(idx), focal, pp)
    pred68, pred_dense = pred68.numpy(), pred_dense.numpy()
    det68 = lmk68[idx]
    err68 = np.linalg.norm(pred68 - det68, axis=-1)
    out = {"fit_iterations": res.iterations,
           "mean_error_68_px": float(np.nanmean(err68)),
           "mean_error_68_px_before_smoothing": float(res.rmse68_px)}
    if lmk_dense is not None and np.isfinite(lmk_dense[idx][:, basis.mediapipe_indices]).any():
        det_d = lmk_dense[idx][:, basis.mediapipe_indices]
        out["mean_error_dense_px"] = float(np.nanmean(np.linalg.norm(pred_dense - det_d, axis=-1)))
    else:
        out["mean_error_dense_px"] = None
    cont = np.concatenate([[True], np.diff(idx) == 1])
    # Jitter over runs of consecutive valid frames only.
    out["jitter_68_fitted_px"] = _jitter_over_runs(pred68, cont)
    out["jitter_68_detected_px"] = _jitter_over_runs(det68, cont)
    out["invalid_frames"] = int((~valid).sum())
    out["invalid_frame_ids"] = np.flatnonzero(~valid).tolist()[:1000]
    per_frame = {"reprojection_error_68_px": _per_frame_mean(err68, idx, len(valid))}
    if out["mean_error_dense_px"] is not None:
        per_frame["reprojection_error_dense_px"] = _per_frame_mean(
            np.linalg.norm(pred_dense - det_d, axis=-1), idx, len(valid))
    return out, per_frame


def _per_frame_mean(err: np.ndarray, idx: np.ndarray, T: int) -> np.ndarray:
    """[N,P] point errors of frames `idx` -> [T] float32 mean over the finite
    points, NaN where a frame has none (invalid frames, missing points)."""
    ok = np.isfinite(err)
    n = ok.sum(1)
    out = np.full(T, np.nan, np.float32)
    out[idx] = np.where(n > 0, np.where(ok, err, 0.0).sum(1) / np.maximum(n, 1), np.nan)
    return out


def _jitter_over_runs(x: np.ndarray, cont: np.ndarray) -> float:
    """second_difference_jitter over the runs of consecutive frames. The NaN
    rows between runs are passed as invalid: counted as valid, one gap made
    the whole figure NaN (meta.json had NaN jitter for any clip that lost the
    face for a frame)."""
    runs = _break_runs(x, cont)
    return float(second_difference_jitter(runs, np.isfinite(runs).reshape(len(runs), -1).all(1)))


def _break_runs(x: np.ndarray, cont: np.ndarray) -> np.ndarray:
    """NaN rows inserted where frames are not consecutive, so differences
    never span a gap."""
    rows = []
    for i in range(len(x)):
        if i > 0 and not cont[i]:
            rows.append(np.full_like(x[i], np.nan))
        rows.append(x[i])
    return np.stack(rows)


# ----------------------------------------------------------------------------
# One video


def _versions() -> dict:

    out = {"lightning_ft": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__}
    for pkg in ("mediapipe", "av", "face-alignment"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def cached_landmarks(face_video, cfg: TrackConfig, sources: Optional[dict]):
    """The crops' landmarks, kept beside the frame cache so that a rerun
    fits the points the first run found. The first run detects on the crops
    as they are cut, a rerun would detect on the cache's JPEG copies: points
    a few tenths of a pixel apart, which a flat focal profile turned into a
    focal 47-80 % apart (benchmarks/RESULTS.md, issue 20). Keyed by the
    source file, the crops' boxes and the 68-point source asked for."""

    key = hashlib.sha256(json.dumps({
        "version": __version__, "lmk68": cfg.lmk68, "image_size": list(face_video.image_size),
        "source": (sources or {}).get("video"), "frame_ids": np.asarray(face_video.frame_ids).tolist(),
        "crop_boxes": np.round(np.asarray(face_video.crop_boxes, np.float64), 6).tolist(),
    }, sort_keys=True, default=str).encode()).hexdigest()
    path = face_video.cache_path.with_name(face_video.cache_path.name + ".landmarks.npz")
    try:
        with np.load(path, allow_pickle=False) as d:
            if str(d["key"]) == key:
                return landmarks_stage.Landmarks(d["lmk68"], d["lmk_dense"], d["valid"], str(d["source68"]),
                                                 tuple(int(x) for x in d["image_size"]))
    except (OSError, KeyError, ValueError):
        pass  # none yet, or another video's or version's: detect
    lm = landmarks_stage.detect(face_video, lmk68=cfg.lmk68, device=cfg.device, progress=cfg.progress)
    # named like the frame cache's temporaries, so a killed run's is cleared alike
    tmp = path.with_name(f"{face_video.cache_path.name}.tmp-{os.getpid()}-landmarks@{socket.gethostname()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, key=key, lmk68=lm.lmk68, lmk_dense=lm.lmk_dense, valid=lm.valid, source68=lm.source68,
                     image_size=np.asarray(lm.image_size, np.int64))
        os.replace(tmp, path)
    except OSError as exc:  # a courtesy for reruns: the result does not need it
        tmp.unlink(missing_ok=True)
        log.warning("%s: landmarks not kept for reruns (%s)", path, exc)
    return lm


def track_one(video: Optional[Path], stem: str, cfg: TrackConfig, flame: HeadModel, emoca_model=None,
              sources: Optional[dict] = None, calibrate_only: bool = False,
              shared: Optional[dict] = None) -> Path:
    """Track one video (or one --landmarks file) with the head model `flame`
    (FLAME or ICT); returns the result folder (with calibrate_only, what
    calibration found, without EMOCA).

    inputs -> landmarks -> calibration and fit -> smoothing -> [synthesis]
    -> write -> [visualisation, export].

    sources: `run_sources(video, cfg)` when the caller has it already;
    shared: the --shared-camera focal and how it was combined."""
    timer = StageTimer()
    if sources is None:
        sources = run_sources(video, cfg)
    t_start = time.perf_counter()
    inputs = read_inputs(video, cfg, sources, timer)
    label = str(video or cfg.landmarks_file)
    if not inputs.valid.any():

        raise NoFaceError(f"{label}: no valid landmarks in any frame")
    if calibrate_only:
        return fit_landmarks(flame, inputs, cfg, timer, calibrate_only=True)
    if shared is not None:
        cfg = replace(cfg, focal_px=shared["focal_source_px"], fov_deg=None)
    emoca_result = _regress_emoca(emoca_model, inputs, cfg, timer)
    fit = fit_landmarks(flame, inputs, cfg, timer, emoca=emoca_result, label=label)
    if shared is not None:
        fit.calibration["shared_camera"] = shared
    _check_fit_quality(fit.quality, inputs.image_size, label)
    track, camera = fit.track, fit.camera.stored()
    synthesis_meta = albedo = None
    if cfg.synthesis:
        track, synthesis_meta, albedo = _run_synthesis(flame, inputs, track, camera, cfg, timer)
    extra = _visualization_writer(inputs.frames, track, camera, flame, cfg, timer, albedo)
    meta = {**_inputs_meta(inputs, emoca_result is not None), **_model_meta(flame, cfg),
            **_fit_meta(fit, synthesis_meta), **_run_meta(cfg, sources, timer)}
    meta["stage_seconds"]["total"] = time.perf_counter() - t_start
    folder = write_result(result_dir(cfg.out_dir, stem), track, camera, meta, extra=extra)
    if extra is not None:
        log.info("%s: wrote %s", label, folder / "visualization.mp4")
    if cfg.export:

        export(folder, cfg.export, frames=(inputs.frames.frame if inputs.frames is not None else None), model=flame)
    return folder


def _regress_emoca(emoca_model, inputs: VideoInputs, cfg: TrackConfig, timer: StageTimer):
    """EMOCA's per-frame codes (the fit's start), or None without EMOCA."""
    if emoca_model is None:
        return None
    if inputs.frames is None:
        raise UsageError("EMOCA needs the video frames: pass --data with --landmarks, or --no-emoca")

    lm = inputs.landmarks
    with timer("emoca"):
        return regress(inputs.frames.frames(), lm.lmk_dense if np.isfinite(lm.lmk_dense).any() else lm.lmk68,
                       inputs.valid, emoca_model, progress=cfg.progress)


# meta.json's "camera.convention": what tracking.npz's camera means.
CAMERA_CONVENTION = ("OpenCV: x right, y down, z forward; p = R X + t; u = fx x/z + cx; "
                     "pixel centres at integer coordinates (OpenCV; the crop spans [-0.5, W-0.5])")


def _inputs_meta(inputs: VideoInputs, emoca_used: bool) -> dict:
    """meta.json's "video", "frames", "landmarks" and "emoca" entries."""
    valid = inputs.valid
    H, W = inputs.image_size
    return {"video": inputs.video_meta,
            "frames": {"total": int(len(valid)), "valid": int(valid.sum()), "invalid": int((~valid).sum())},
            "landmarks": {"source68": inputs.landmarks.source68, "image_size": [H, W]},
            "emoca": {"used": emoca_used}}


def _model_meta(model: HeadModel, cfg: TrackConfig) -> dict:
    """meta.json's "model" entry and, for FLAME, "flame" with its files
    (the exports load the model from them)."""
    out = {"model": model.model_meta()}
    if model.name == "flame":
        out["flame"] = {"version": model.version, "sha256": model.sha256, "n_shape": model.n_shape,
                        "n_exp": model.n_exp, "n_vertices": model.n_vertices,
                        **{f"{k}_path" if k != "model" else "model_path": str(v)
                           for k, v in flame_files(cfg.assets_dir).items()}}
    return out


def _fit_meta(fit: LandmarkFit, synthesis_meta: Optional[dict]) -> dict:
    """meta.json's "camera", "calibration", "quality" and "synthesis" entries."""
    return {"camera": {"convention": CAMERA_CONVENTION, "focal_length": fit.camera.focal_length,
                       "principal_point": fit.camera.principal_point},
            "calibration": fit.calibration, "quality": fit.quality, "synthesis": synthesis_meta}


def _run_meta(cfg: TrackConfig, sources: dict, timer: StageTimer) -> dict:
    """meta.json's settings, sources, versions and seconds per stage (the
    timer's own dict: stages timed while writing, the -v video, still land
    in it)."""
    return {"settings": {"device": cfg.device, "image_size": cfg.image_size, "fps": cfg.fps, "lmk68": cfg.lmk68,
                         "no_emoca": cfg.no_emoca, "synthesis": cfg.synthesis, "visualize": cfg.visualize,
                         "fit": asdict(cfg.fit), "calibration": asdict(cfg.calibration),
                         "focal_px": cfg.focal_px, "fov_deg": cfg.fov_deg, "shared_camera": cfg.shared_camera},
            "sources": sources,
            "result_settings": result_settings(cfg),
            "settings_fingerprint": settings_fingerprint(result_settings(cfg)),
            "versions": _versions(),
            "stage_seconds": timer.seconds}


def _check_fit_quality(quality: dict, image_size, label: str) -> None:
    """Warn (and record in `quality`) when the mean 68-point error is far
    above a good fit's, POOR_FIT_ERROR_FRACTION of the crop side."""
    limit = POOR_FIT_ERROR_FRACTION * max(image_size)
    error = quality.get("mean_error_68_px")
    quality["poor_fit_limit_px"] = float(limit)
    quality["poor_fit"] = bool(error is not None and error > limit)
    if quality["poor_fit"]:
        log.warning("%s: poor fit, mean landmark error %.1f px (a good fit stays under %.1f px at this crop "
                    "size): check that the video shows one upright face (a wrong rotation tag turns it) and that "
                    "--landmarks belong to it", label, error, limit)


def _run_synthesis(flame: FLAME, inputs: VideoInputs, track: Track, camera: Camera, cfg: TrackConfig,
                   timer: StageTimer) -> Tuple[Track, dict, AlbedoTexture]:
    """Photometric refinement of the smoothed landmark track: the refined
    track (with `texture` and `lighting`), the meta.json entry and the
    fitted albedo (computed here, so the texture space, ~600 MB for FLAME's,
    is not kept for the -v video)."""

    if inputs.frames is None:
        raise UsageError("--synthesis needs the video frames (--data)")
    with timer("synthesis"):
        scfg = replace(cfg.synthesis_config, smoothing=cfg.smoothing)
        texture_path, uv_obj = texture_space_files(cfg.assets_dir)
        space = load_texture_space(texture_path, n_components=scfg.n_texture, uv_obj=uv_obj)
        res = refine(flame, space, inputs.frames.frame, track, camera, scfg, device=cfg.device,
                     progress=cfg.progress, fps=inputs.fps, timestamps=inputs.timestamps)
    track = replace(res.track, texture=np.asarray(res.texture, np.float32),
                    lighting=np.asarray(res.lighting, np.float32))
    with torch.no_grad():
        image = space.albedo(torch.as_tensor(track.texture)).clamp(0.0, 1.0)[0].permute(1, 2, 0)
    albedo = AlbedoTexture(image=image.numpy(), face_uvs=space.face_uvs().numpy())
    meta = {"photometric_error_before": res.photometric_error_before,
            "photometric_error_after": res.photometric_error_after, "lighting_mode": res.lighting_mode,
            "image_size": res.image_size, "seconds": res.seconds, "texture_space": space.source,
            "settings": asdict(scfg)}
    return track, meta, albedo


def _visualization_writer(face_video, track: Track, camera: Camera, model: HeadModel, cfg: TrackConfig,
                          timer: StageTimer, albedo: Optional[AlbedoTexture]):
    """With -v, a function that writes the -v video into the result's
    temporary folder; else None."""
    if not cfg.visualize:
        return None
    if face_video is None:
        log.warning("-v needs video frames; with --landmarks alone no visualization is written")
        return None

    def write(tmp_folder: Path):
        with timer("visualization"):
            write_track_visualization(tmp_folder / "visualization.mp4", face_video.frames(), model, track, camera,
                                      cfg.progress, albedo=albedo)
    return write
