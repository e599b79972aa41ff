"""The tracker: calls the stages in order, per video, with resume and timing.

    video -> landmarks -> (EMOCA) -> calibration -> fitting -> smoothing -> output

Each stage is a function over data; this module passes results along and
records what happened (settings, versions, seconds per stage, quality) in
meta.json.
"""

from __future__ import annotations

import logging
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from . import __version__
from .calibration import CalibrationConfig, calibrate
from .errors import AssetError, LightningFTError, UsageError
from .flame import FLAME
from .head_model import MODEL_NAMES, HeadModel
from .optimize import FitConfig, FrameParams, Targets, build_basis, fit_config_for, fit_sequence, predict_landmarks
from .output import is_finished, result_dir, write_result
from .smoothing import SmoothingConfig, second_difference_jitter, smooth_tracking
from .synthesis import SynthesisConfig

log = logging.getLogger("lightning_ft")
# Predicted relative std of the calibrated focal above which a run warns:
# synthetic heads turning +-25 deg give 2-8 % at 800-2000 px with 1 px noise
# (benchmarks/bench_calibration.py).
WEAK_FOCAL_REL_STD = 0.15

VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".y4m"}


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
    synthesis_config: SynthesisConfig = field(default_factory=SynthesisConfig)
    # Head model: "flame", "ict", or None: FLAME where its files are under
    # assets_dir, else ICT (built in). assets_named: the user chose assets_dir
    # (--assets or $LIGHTNING_FT_ASSETS); then missing FLAME files are an
    # error, not a reason to switch models.
    model: Optional[str] = None
    assets_named: bool = True


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
# Inputs


def find_videos(path: Path) -> List[Path]:
    """A video file, or every video below a folder (recursive, sorted)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    videos = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise UsageError(f"{path}: no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) in this folder")
    return videos


def parse_shard(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """'K/N' -> (K, N), 0 <= K < N: every N-th video starting at K."""
    if text is None:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text}: expected K/N, e.g. 0/4") from None
    if n < 1 or not 0 <= k < n:
        raise UsageError(f"--shard {text}: need 0 <= K < N")
    return k, n


def select_shard(videos: List[Path], shard: Optional[Tuple[int, int]]) -> List[Path]:
    if shard is None:
        return videos
    k, n = shard
    return videos[k::n]


def output_stem(video: Path, root: Optional[Path]) -> str:
    """Result folder name: the video's path below the input folder, so two
    clips called 0001.mp4 in different folders do not collide."""
    if root is not None and root.is_dir():
        rel = video.relative_to(root).with_suffix("")
        return "__".join(rel.parts)
    return video.stem


# ----------------------------------------------------------------------------
# Fitting


@dataclass
class FitOutput:
    """Per-frame results for all T frames (invalid ones interpolated).

    rotation [T,3,3], translation [T,3] (FLAME -> OpenCV camera, meters),
    expression [T,E], jaw_pose [T,3], neck_pose [T,3], eye_pose [T,6],
    shape [S], focal_length [2], principal_point [2] (crop pixels),
    quality: figures for meta.json; calibration: what calibration did."""

    rotation: np.ndarray
    translation: np.ndarray
    expression: np.ndarray
    jaw_pose: np.ndarray
    neck_pose: np.ndarray
    eye_pose: np.ndarray
    shape: np.ndarray
    focal_length: np.ndarray
    principal_point: np.ndarray
    quality: dict
    calibration: dict


def fit_landmarks(model: HeadModel, lmk68: np.ndarray, lmk_dense: np.ndarray, valid: np.ndarray, image_size,
                  fps: float, cfg: TrackConfig, timer: StageTimer, emoca=None,
                  timestamps: Optional[np.ndarray] = None) -> FitOutput:
    """Calibrate, fit every valid frame, interpolate invalid ones, smooth."""
    H, W = image_size
    fit_cfg = fit_config_for(model, replace(cfg.fit, image_size=max(H, W)))
    cal_cfg = calibration_config_for(model, cfg.calibration)
    with timer("calibration"):
        basis = build_basis(model)
        targets = Targets.from_landmarks(lmk68, lmk_dense, basis)
        init_shape = None if emoca is None else emoca.identity
        cal = calibrate(basis, targets, valid, (H, W), calibration_fit_config(fit_cfg), cal_cfg,
                        init_shape=init_shape)
    if not cal.focal_rel_std <= WEAK_FOCAL_REL_STD:  # NaN too: no curvature along the focal at all
        log.warning("focal length %.0f px is weakly determined (predicted std %.0f %%): little perspective in "
                    "the landmarks (a distant face, a long lens or noisy landmarks); depth and head size share "
                    "that uncertainty", cal.focal_px[0], 100 * cal.focal_rel_std)
    focal = torch.tensor(cal.focal_px, dtype=torch.float32)
    pp = torch.tensor(cal.principal_point, dtype=torch.float32)
    shape = torch.tensor(cal.shape, dtype=torch.float32)
    idx = np.flatnonzero(valid)
    T = len(valid)
    with timer("fitting"):
        sub = targets.select(torch.as_tensor(idx))
        rot0 = exp0 = jaw0 = None
        if emoca is not None:
            from .emoca import emoca_pose_to_opencv

            ok = emoca.valid[idx]
            if ok.all():
                rot0 = torch.as_tensor(emoca_pose_to_opencv(emoca.global_pose[idx]), dtype=torch.float32)
                exp0 = torch.as_tensor(emoca.expression[idx][:, :model.n_exp], dtype=torch.float32)
                jaw0 = torch.as_tensor(emoca.jaw_pose[idx], dtype=torch.float32)
        contiguous = torch.as_tensor(np.concatenate([[False], np.diff(idx) == 1]))
        res = fit_sequence(basis, sub, focal, pp, shape, fit_cfg, contiguous=contiguous, rotation=rot0,
                           expression=exp0, jaw=jaw0)
    p = res.params

    def full(a, fill_shape):
        out = np.full((T,) + fill_shape, np.nan, np.float64)
        out[idx] = a.detach().numpy()
        return out

    raw = {"rotation": full(p.rotation, (3, 3)), "translation": full(p.translation, (3,)),
           "expression": full(p.expression, (model.n_exp,)), "jaw_pose": full(p.jaw, (3,)),
           "eye_pose": full(p.eyes, (6,))}
    with timer("smoothing"):
        smoothed = smooth_tracking(raw, valid, fps, cfg.smoothing, timestamps=timestamps)
        if fit_cfg.expression_bounds is not None:  # the smoother may overshoot a bound
            smoothed["expression"] = np.clip(smoothed["expression"], *fit_cfg.expression_bounds)
    with timer("quality"):
        quality = _quality(basis, smoothed, raw, shape, focal, pp, lmk68, lmk_dense, valid, idx, res)
    return FitOutput(
        rotation=smoothed["rotation"], translation=smoothed["translation"], expression=smoothed["expression"],
        jaw_pose=smoothed["jaw_pose"], neck_pose=np.zeros((T, 3)), eye_pose=smoothed["eye_pose"],
        shape=cal.shape, focal_length=cal.focal_px, principal_point=cal.principal_point, quality=quality,
        calibration={"frames": cal.frames.tolist(), "focal_costs": cal.focal_costs, "focal_px": float(cal.focal_px[0]),
                     "focal_rel_std": float(cal.focal_rel_std) if np.isfinite(cal.focal_rel_std) else None})


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
    calibration's own N(0, sigma_shape^2))."""
    return replace(ccfg, sigma_shape=ccfg.sigma_shape * model.parameter_blocks()["shape"].sigma)


def _params_from(d: Dict[str, np.ndarray], shape: torch.Tensor) -> FrameParams:
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    return FrameParams(t(d["rotation"]), t(d["translation"]), t(d["expression"]), t(d["jaw_pose"]),
                       t(d["eye_pose"]), shape)


def _quality(basis, smoothed, raw, shape, focal, pp, lmk68, lmk_dense, valid, idx, res) -> dict:
    """Reprojection errors (px) and jitter of the smoothed track on valid frames."""
    pred68, pred_dense = predict_landmarks(basis, _params_from({k: v[idx] for k, v in smoothed.items()}, shape),
                                           focal, pp)
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
    out["jitter_68_fitted_px"] = float(second_difference_jitter(_break_runs(pred68, cont), None))
    out["jitter_68_detected_px"] = float(second_difference_jitter(_break_runs(det68, cont), None))
    out["invalid_frames"] = int((~valid).sum())
    out["invalid_frame_ids"] = np.flatnonzero(~valid).tolist()[:1000]
    return out


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


def _flame_paths(assets_dir: Path) -> Dict[str, Path]:
    d = Path(assets_dir) / "FLAME"
    return {"model": d / "generic_model.pkl", "landmark_embedding": d / "landmark_embedding.npy",
            "mediapipe_embedding": d / "mediapipe_landmark_embedding.npz"}


def load_flame(assets_dir: Path) -> FLAME:
    p = _flame_paths(assets_dir)
    return FLAME(p["model"], p["landmark_embedding"], p["mediapipe_embedding"])


# Exports that evaluate FLAME in the consumer's code; mesh, nerface and arkit
# take any model's result.
FLAME_ONLY_EXPORTS = ("vhap", "metrical", "lightning")


def select_model(cfg: TrackConfig) -> str:
    """The head model of a run: cfg.model if given; else FLAME where its
    files are under the assets folder, or where the user named that folder
    (missing files then stay the error they are); else the built-in ICT."""
    if cfg.model is not None:
        if cfg.model not in MODEL_NAMES:
            raise UsageError(f"--model {cfg.model}: choose from {', '.join(MODEL_NAMES)}")
        return cfg.model
    if all(p.exists() for p in _flame_paths(cfg.assets_dir).values()) or cfg.assets_named:
        return "flame"
    log.info("no FLAME model under %s: tracking with the built-in ICT-FaceKit head model (MIT licence; "
             "--model flame with FLAME's files to use FLAME)", cfg.assets_dir)
    return "ict"


def load_model(name: str, assets_dir: Path) -> HeadModel:
    if name == "flame":
        return load_flame(assets_dir)
    from .head_model import load_ict

    return load_ict()


def _check_model_options(name: str, cfg: TrackConfig) -> None:
    """Refuse, before any work, what the chosen model cannot do."""
    if name != "ict":
        return
    if cfg.synthesis:
        raise UsageError("--synthesis fits FLAME's texture space, which ICT-FaceKit's model has no counterpart "
                         "for: use --model flame (with FLAME's files) or run without --synthesis")
    flame_only = [f for f in cfg.export if f in FLAME_ONLY_EXPORTS]
    if flame_only:
        raise UsageError(f"--export {','.join(flame_only)}: writes FLAME parameters and this run tracks with ICT; "
                         f"use mesh, nerface or arkit, or --model flame")


def _versions() -> dict:
    import importlib.metadata as md

    out = {"lightning_ft": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__}
    for pkg in ("mediapipe", "av", "face-alignment"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def track_one(video: Optional[Path], stem: str, cfg: TrackConfig, flame: HeadModel, emoca_model=None) -> Path:
    """Track one video (or one --landmarks file); returns the result folder."""
    timer = StageTimer()
    t_start = time.perf_counter()
    frames_source = None
    if cfg.landmarks_file is not None:
        from .landmarks import load_landmarks_file

        with timer("landmarks"):
            lm = load_landmarks_file(cfg.landmarks_file)
        T = lm.lmk68.shape[0]
        frame_ids = np.arange(T)
        fps = float(cfg.fps or 25.0)
        timestamps = None
        H, W = lm.image_size
        crop_boxes = np.tile(np.array([0.0, 0.0, W, H]), (T, 1))
        video_meta = {"path": str(video) if video else None, "landmarks_file": str(cfg.landmarks_file)}
    else:
        from . import landmarks as landmarks_stage
        from . import video as video_stage

        cache_dir = cfg.cache_dir or (Path(cfg.out_dir) / ".cache")
        # without a frame cache, "decode_crop" times the face-box pass and the
        # crops are made during "landmarks", which reads them as they are cropped
        with timer("decode_crop"):
            face_video = video_stage.prepare(video, cache_dir=cache_dir, image_size=cfg.image_size, fps=cfg.fps,
                                             progress=cfg.progress)
        with timer("landmarks"):
            lm = landmarks_stage.detect(face_video, lmk68=cfg.lmk68, device=cfg.device, progress=cfg.progress)
        T = len(face_video)
        frame_ids = face_video.frame_ids
        fps = float(face_video.fps)
        timestamps = face_video.timestamps
        crop_boxes = face_video.crop_boxes
        H, W = face_video.image_size
        frames_source = face_video
        video_meta = {"path": str(video), "fps": fps, "frames": int(T), "cache": str(face_video.cache_path)}
    valid = np.asarray(lm.valid, bool)
    if not valid.any():
        from .errors import NoFaceError

        raise NoFaceError(f"{video or cfg.landmarks_file}: no valid landmarks in any frame")
    emoca_result = None
    if emoca_model is not None:
        if frames_source is None:
            raise UsageError("EMOCA needs the video frames: pass --data with --landmarks, or --no-emoca")
        from .emoca import regress

        with timer("emoca"):
            emoca_result = regress(frames_source.frames(), lm.lmk_dense if np.isfinite(lm.lmk_dense).any() else lm.lmk68,
                                   valid, emoca_model, progress=cfg.progress)
    fit = fit_landmarks(flame, lm.lmk68, lm.lmk_dense, valid, (H, W), fps, cfg, timer, emoca=emoca_result,
                        timestamps=timestamps)
    tracking = {
        "frame_ids": np.asarray(frame_ids, np.int64), "valid": valid, "shape": fit.shape.astype(np.float32),
        "expression": fit.expression.astype(np.float32), "jaw_pose": fit.jaw_pose.astype(np.float32),
        "neck_pose": fit.neck_pose.astype(np.float32), "eye_pose": fit.eye_pose.astype(np.float32),
        "rotation": fit.rotation.astype(np.float32), "translation": fit.translation.astype(np.float32),
        "focal_length": fit.focal_length.astype(np.float32), "principal_point": fit.principal_point.astype(np.float32),
        "image_size": np.array([H, W], np.int64), "crop_boxes": np.asarray(crop_boxes, np.float32),
        "lmk68": np.asarray(lm.lmk68, np.float32), "lmk_dense": np.asarray(lm.lmk_dense, np.float32),
        "fps": np.float32(fps),
    }
    if getattr(flame, "expression_names", None) is not None:
        tracking["expression_names"] = np.asarray(flame.expression_names)
    synthesis_meta = albedo = None
    if cfg.synthesis:
        synthesis_meta, albedo = _run_synthesis(flame, frames_source, tracking, valid, fps, timestamps, cfg, timer)
    folder = result_dir(cfg.out_dir, stem)
    extra = None
    if cfg.visualize:
        if frames_source is None:
            log.warning("-v needs video frames; with --landmarks alone no visualization is written")
        else:
            extra = _visualization_writer(frames_source, tracking, flame, cfg, timer, albedo)
    meta = {
        "video": video_meta, "frames": {"total": int(T), "valid": int(valid.sum()), "invalid": int((~valid).sum())},
        "landmarks": {"source68": lm.source68, "image_size": [H, W]},
        "emoca": {"used": emoca_result is not None},
        "model": flame.model_meta(),
        **({"flame": {"version": flame.version, "sha256": flame.sha256, "n_shape": flame.n_shape,
                      "n_exp": flame.n_exp, "n_vertices": flame.n_vertices,
                      **{f"{k}_path" if k != "model" else "model_path": str(v)
                         for k, v in _flame_paths(cfg.assets_dir).items()}}} if flame.name == "flame" else {}),
        "camera": {"convention": "OpenCV: x right, y down, z forward; p = R X + t; u = fx x/z + cx; "
                                 "pixel centres at integer coordinates (OpenCV; the crop spans [-0.5, W-0.5])",
                   "focal_length": fit.focal_length, "principal_point": fit.principal_point},
        "calibration": fit.calibration,
        "quality": fit.quality,
        "synthesis": synthesis_meta,
        "settings": {"device": cfg.device, "image_size": cfg.image_size, "fps": cfg.fps, "lmk68": cfg.lmk68,
                     "no_emoca": cfg.no_emoca, "synthesis": cfg.synthesis, "visualize": cfg.visualize,
                     "fit": asdict(cfg.fit), "calibration": asdict(cfg.calibration)},
        "versions": _versions(),
        "stage_seconds": timer.seconds,
    }
    meta["stage_seconds"]["total"] = time.perf_counter() - t_start
    write_result(folder, tracking, meta, extra=extra)
    if cfg.export:
        from .export import export

        export(folder, cfg.export, frames=(frames_source.frame if frames_source is not None else None), model=flame)
    return folder


@dataclass
class AlbedoTexture:
    """Synthesis's fitted albedo, for the -v video.

    image: [Ht,Wt,3] float32 RGB in 0..1 in FLAME's UV layout (row 0 at v = 1),
    at the texture space's own resolution; face_uvs: [F,3,2] UVs of every
    face corner, FLAME's face order."""

    image: np.ndarray
    face_uvs: np.ndarray


def _texture_space_files(assets_dir: Path) -> Tuple[Path, Optional[Path]]:
    """The texture space --synthesis reads and, for one without UVs, the OBJ
    they come from. FLAME_texture.npz carries its UVs; DECA's
    FLAME_albedo_from_BFM.npz, which `assets check` accepts as well, is laid
    out in FLAME's UV map and takes the UVs from head_template_mesh.obj (as
    DECA does). Called before any work, so a missing piece costs no fitting."""
    d = Path(assets_dir) / "FLAME"
    flame_texture, bfm, obj = d / "FLAME_texture.npz", d / "FLAME_albedo_from_BFM.npz", d / "head_template_mesh.obj"
    if flame_texture.exists():
        return flame_texture, None
    if bfm.exists():
        if obj.exists():
            return bfm, obj
        raise AssetError(f"{bfm}: has no UVs of its own and {obj} is not there to give them (it comes with "
                         f"FLAME_embedding.zip); add it, or FLAME_texture.npz, or run without --synthesis")
    raise AssetError(f"{flame_texture}: not found; --synthesis reads FLAME's texture space (unzip TextureSpace.zip "
                     f"into assets/FLAME or run 'lightning-ft assets fetch --item texture'), or run without "
                     f"--synthesis")


def _run_synthesis(flame: FLAME, frames_source, tracking: dict, valid, fps, timestamps, cfg: TrackConfig,
                   timer: StageTimer) -> Tuple[dict, AlbedoTexture]:
    """Photometric refinement of the smoothed landmark track, in place in
    `tracking` (adds `texture` and `lighting`); returns the meta.json entry
    and the fitted albedo (computed here, so the texture space, ~600 MB for
    FLAME's, is not kept for the -v video)."""
    from .synthesis import load_texture_space, refine

    if frames_source is None:
        raise UsageError("--synthesis needs the video frames (--data)")
    with timer("synthesis"):
        scfg = replace(cfg.synthesis_config, smoothing=cfg.smoothing)
        texture_path, uv_obj = _texture_space_files(cfg.assets_dir)
        space = load_texture_space(texture_path, n_components=scfg.n_texture, uv_obj=uv_obj)
        params = _params_from(tracking, torch.as_tensor(tracking["shape"], dtype=torch.float32))
        res = refine(flame, space, frames_source.frame, params, tracking["focal_length"],
                     tracking["principal_point"], tracking["lmk68"], valid, scfg, device=cfg.device,
                     progress=cfg.progress, fps=fps, timestamps=timestamps)
    p = res.params
    tracking.update(rotation=p.rotation.numpy().astype(np.float32),
                    translation=p.translation.numpy().astype(np.float32),
                    expression=p.expression.numpy().astype(np.float32), jaw_pose=p.jaw.numpy().astype(np.float32),
                    eye_pose=p.eyes.numpy().astype(np.float32),
                    texture=np.asarray(res.texture, np.float32), lighting=np.asarray(res.lighting, np.float32))
    with torch.no_grad():
        image = space.albedo(torch.as_tensor(tracking["texture"])).clamp(0.0, 1.0)[0].permute(1, 2, 0)
    albedo = AlbedoTexture(image=image.numpy(), face_uvs=space.face_uvs().numpy())
    meta = {"photometric_error_before": res.photometric_error_before,
            "photometric_error_after": res.photometric_error_after, "lighting_mode": res.lighting_mode,
            "image_size": res.image_size, "seconds": res.seconds, "texture_space": space.source,
            "settings": asdict(scfg)}
    return meta, albedo


def _visualization_writer(face_video, tracking, flame, cfg, timer, albedo: Optional[AlbedoTexture]):
    def write(tmp_folder: Path):
        with timer("visualization"):
            write_visualization_from_tracking(tmp_folder / "visualization.mp4", face_video, tracking, flame,
                                              cfg.progress, albedo=albedo)
    return write


class _ChunkedMesh:
    """Camera-space vertices of frame t, evaluated 64 frames at a time so a
    long video never holds [T,V,3] in memory."""

    def __init__(self, tracking, flame: FLAME, chunk: int = 64):
        self.tr, self.flame, self.chunk = tracking, flame, chunk
        self.start, self.verts, self.lmk = -1, None, None

    def _load(self, t: int):
        from .optimize import head_rotation_flame

        s = (t // self.chunk) * self.chunk
        sl = slice(s, min(len(self.tr["frame_ids"]), s + self.chunk))
        B = sl.stop - sl.start
        f = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        with torch.no_grad():
            vertices = self.flame.posed_vertices(f(self.tr["shape"])[None].expand(B, -1),
                                                 f(self.tr["expression"][sl]), jaw_pose=f(self.tr["jaw_pose"][sl]),
                                                 eye_pose=f(self.tr["eye_pose"][sl]))
            R, tr = f(self.tr["rotation"][sl]), f(self.tr["translation"][sl])
            lmk = self.flame.landmarks68(vertices, head_rotation_flame(R))
            self.verts = (torch.einsum("tij,tvj->tvi", R, vertices) + tr[:, None]).numpy()
            pc = torch.einsum("tij,tvj->tvi", R, lmk) + tr[:, None]
            self.lmk = (pc[..., :2] / pc[..., 2:3] * f(self.tr["focal_length"]) + f(self.tr["principal_point"])).numpy()
        self.start = s

    def __call__(self, t: int) -> np.ndarray:
        if not (self.start <= t < self.start + self.chunk) or self.verts is None:
            self._load(t)
        return self.verts[t - self.start]

    def landmarks(self) -> np.ndarray:
        out = []
        for s in range(0, len(self.tr["frame_ids"]), self.chunk):
            self._load(s)
            out.append(self.lmk)
        return np.concatenate(out)


def write_visualization_from_tracking(out_path: Path, face_video, tracking, flame: FLAME, progress=None,
                                      albedo: Optional[AlbedoTexture] = None) -> Path:
    """The -v video: crop | mesh overlay with detected and fitted landmarks | shaded mesh.

    albedo: synthesis's fitted texture; the mesh is then rendered with it
    under the track's SH `lighting` ([9,3] or [T,9,3]), as synthesis saw it.
    """
    from .visualize import write_visualization

    mesh = _ChunkedMesh(tracking, flame)
    lmk_fitted = mesh.landmarks()
    fx, fy = (float(v) for v in tracking["focal_length"])
    cx, cy = (float(v) for v in tracking["principal_point"])
    K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
    appearance = {}
    if albedo is not None:
        appearance = {"textures": albedo.image, "face_uvs": albedo.face_uvs, "lighting": tracking["lighting"]}
    return write_visualization(out_path, face_video.frames(), mesh, flame.faces.numpy(), K,
                               lmk_detected=tracking["lmk68"], lmk_fitted=lmk_fitted, fps=float(tracking["fps"]),
                               valid=tracking["valid"], progress=progress, **appearance)


# ----------------------------------------------------------------------------
# A whole run


def _remove_stale_partials(folder: Path) -> None:
    """Temporary folders a killed run left for this video (they never look
    finished, but they take disk space)."""
    import shutil

    for stale in Path(folder).parent.glob(f".{Path(folder).name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)


@dataclass
class VideoOutcome:
    name: str
    status: str  # 'done' | 'skipped' | 'failed'
    detail: str
    seconds: float


def run(cfg: TrackConfig) -> List[VideoOutcome]:
    """Track every video of the run (or the one --landmarks file).

    Required assets are checked before any work; a failing video is
    reported and the run goes on with the next one.
    """
    from .assets import require, tiers_for

    model_name = select_model(cfg)
    _check_model_options(model_name, cfg)
    if model_name == "flame":
        require(cfg.assets_dir, tiers_for(emoca=not cfg.no_emoca, synthesis=cfg.synthesis))
    elif not cfg.no_emoca:
        log.info("EMOCA regresses FLAME codes: not used with ICT (each frame starts from a neutral face)")
    if cfg.synthesis:
        _texture_space_files(cfg.assets_dir)
    if cfg.synthesis and cfg.landmarks_file is not None and cfg.data is None:
        raise UsageError("--synthesis fits the video frames: pass --data with --landmarks")
    if cfg.landmarks_file is not None:
        if cfg.data is not None and Path(cfg.data).is_dir():
            raise UsageError("--landmarks goes with a single video (or none), not a folder")
        video = Path(cfg.data) if cfg.data is not None else None
        if video is not None and not video.exists():
            raise UsageError(f"{video}: no such file")
        videos, root = [video], None
        stems = [Path(cfg.landmarks_file).stem if video is None else video.stem]
    else:
        if cfg.data is None:
            raise UsageError("--data is required (a video or a folder of videos), unless --landmarks is given")
        videos = select_shard(find_videos(cfg.data), cfg.shard)
        root = Path(cfg.data) if Path(cfg.data).is_dir() else None
        stems = [output_stem(v, root) for v in videos]
    flame = load_model(model_name, cfg.assets_dir)
    emoca_model = None
    if not cfg.no_emoca and model_name == "flame":
        from .emoca import EmocaEncoder

        # Inference only: BatchNorm folded into the convolutions, channels_last
        # (faster on CPU, benchmarks/bench_emoca.py).
        emoca_model = EmocaEncoder.from_release(Path(cfg.assets_dir) / "EMOCA", device=cfg.device,
                                                fold_batchnorm=True).to(memory_format=torch.channels_last)
    outcomes = []
    for video, stem in zip(videos, stems):
        t0 = time.perf_counter()
        folder = result_dir(cfg.out_dir, stem)
        name = str(video or cfg.landmarks_file)
        if is_finished(folder) and not cfg.overwrite:
            outcomes.append(VideoOutcome(name, "skipped", f"finished result in {folder} (--overwrite to redo)", 0.0))
            continue
        _remove_stale_partials(folder)
        try:
            folder = track_one(video, stem, cfg, flame, emoca_model)
            outcomes.append(VideoOutcome(name, "done", str(folder), time.perf_counter() - t0))
        except LightningFTError as exc:
            if len(videos) == 1:
                raise
            log.error("%s", exc)
            outcomes.append(VideoOutcome(name, "failed", str(exc), time.perf_counter() - t0))
    return outcomes
