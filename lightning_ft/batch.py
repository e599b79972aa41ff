"""A run over a folder of videos (or one video, or one --landmarks file):
which videos, named how, in which shard, with which head model; each one
tracked by `pipeline.track_one` unless a finished result of it is there or
another process holds its claim; one outcome per video, a failing video
reported and the run going on (a full disk ends it).

    settings checked -> videos and result names -> shard -> model (and EMOCA)
    -> [shared camera] -> per video: resume check, claim, track_one
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import List, Optional, Tuple

import lmdb
import torch

from .assets import flame_files, require, texture_space_files, tiers_for
from .claims import claim, clear_stale
from .emoca import EmocaEncoder
from .errors import (DiskFullError, LightningFTError, NoFaceError, OutputError, UsageError, disk_full_reason)
from .export import FORMATS as EXPORT_FORMATS
from .fitter import combine_focals
from .flame import FLAME
from .head_model import MODEL_NAMES, HeadModel, load_ict
from .landmarks import load_landmarks_file
from .pipeline import TrackConfig, result_settings, run_sources, track_one
from .results import (check_writable, clear_failure, is_finished, result_differences, result_dir, write_failure)
from .video import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, count_frames, remove_stale_cache_temporaries

log = logging.getLogger("lightning_ft")


# The one list of video suffixes, for a single file and for folders alike
# (all decoded by PyAV's ffmpeg).
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".y4m", ".gif",
                  ".ts", ".mts", ".m2ts", ".3gp", ".ogv"}


# ----------------------------------------------------------------------------
# The videos of a run: files, shards, result names


def find_videos(path: Path) -> List[Path]:
    """A video file, or every video below a folder (recursive, sorted)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            raise UsageError(f"{path}: not a video file suffix; expected one of {', '.join(sorted(VIDEO_SUFFIXES))}")
        return [path]
    videos = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise UsageError(f"{path}: no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) in this folder")
    return videos


def parse_shard(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """'K/N' -> (K, N), 0 <= K < N: every N-th video starting at K.
    'auto': the shard of this Slurm job-array task (docs/cluster.md)."""
    if text is None:
        return None
    if text.strip().lower() == "auto":
        k, n = slurm_array_shard(os.environ)
        log.info("shard %d/%d (Slurm array task %s)", k, n, os.environ.get("SLURM_ARRAY_TASK_ID"))
        return k, n
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text}: expected K/N, e.g. 0/4") from None
    if n < 1 or not 0 <= k < n:
        raise UsageError(f"--shard {text}: need 0 <= K < N")
    return k, n


def slurm_array_shard(env) -> Tuple[int, int]:
    """(K, N) of a Slurm job-array task from its environment: N tasks
    (SLURM_ARRAY_TASK_COUNT), K = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)
    / SLURM_ARRAY_TASK_STEP (step 1 when unset), checked against
    SLURM_ARRAY_TASK_MAX where it is set. Needs an evenly spaced array
    (--array=0-99, 1-100, 0-198:2, a %limit is fine): a list such as
    --array=1,5,7 would leave shards without a task."""
    names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN")
    missing = [n for n in names if not env.get(n)]
    if missing:
        raise UsageError(f"--shard auto: {', '.join(missing)} not set; run it as a Slurm job-array task "
                         f"(sbatch --array=0-N, docs/cluster.md) or give --shard K/N")
    try:
        task, count, first = (int(env[n]) for n in names)
        step = int(env.get("SLURM_ARRAY_TASK_STEP") or 1)
    except ValueError:
        raise UsageError("--shard auto: SLURM_ARRAY_TASK_ID/COUNT/MIN/STEP are not integers: "
                         + ", ".join(f"{n}={env.get(n)!r}" for n in (*names, "SLURM_ARRAY_TASK_STEP"))) from None
    k, off = divmod(task - first, step) if step > 0 else (-1, 0)
    last = env.get("SLURM_ARRAY_TASK_MAX")
    # A list such as --array=3,17 gives task 3 the shard 0/2 without MAX.
    uneven = last is not None and last.strip().lstrip("-").isdigit() and int(last) != first + (count - 1) * step
    if count < 1 or off or uneven or not 0 <= k < count:
        raise UsageError(f"--shard auto: task {task} of an array of {count} starting at {first} with step {step} "
                         f"is not evenly spaced; submit a range such as --array=0-{max(count, 1) - 1}")
    return k, count


def select_shard(videos: List[Path], shard: Optional[Tuple[int, int]]) -> List[Path]:
    if shard is None:
        return videos
    k, n = shard
    return videos[k::n]


def result_names(videos: List[Path], root: Optional[Path]) -> List[str]:
    """Result folder of each video, relative to the output folder: the
    video's path below the input folder without its suffix (`a/clip.mp4` ->
    `a/clip`, a single file -> its stem), with the suffix kept where that
    would be one folder for two videos (`car.mp4` and `car.avi`, compared
    case-insensitively) or a result inside another one (`a.mp4` beside
    `a/clip.mp4`). Computed over the whole folder, before sharding, so
    every shard names a video alike."""

    if root is None:  # a single file
        return [Path(v).stem for v in videos]
    rels = [PurePosixPath(Path(v).relative_to(root).as_posix()) for v in videos]
    stems = [r.with_suffix("").as_posix() for r in rels]
    count = Counter(s.casefold() for s in stems)
    folders = {p.as_posix().casefold() for s in stems for p in PurePosixPath(s).parents if p.as_posix() != "."}
    return [r.as_posix() if count[s.casefold()] > 1 or s.casefold() in folders else s for r, s in zip(rels, stems)]


def legacy_result_name(name: str) -> str:
    """The folder name earlier versions gave a nested video (`a__clip`)."""
    return "__".join(Path(name).parts)


# ----------------------------------------------------------------------------
# The head model


def load_flame(assets_dir: Path) -> FLAME:
    p = flame_files(assets_dir)
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
    if all(p.exists() for p in flame_files(cfg.assets_dir).values()) or cfg.assets_named:
        return "flame"
    log.info("no FLAME model under %s: tracking with the built-in ICT-FaceKit head model (MIT licence; "
             "--model flame with FLAME's files to use FLAME)", cfg.assets_dir)
    return "ict"


def load_model(name: str, assets_dir: Path) -> HeadModel:
    if name == "flame":
        return load_flame(assets_dir)

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


# ----------------------------------------------------------------------------
# A whole run


def _remove_stale_partials(folder: Path) -> None:
    """Temporary folders a killed run left for this video (they never look
    finished, but they take disk space). Called while holding the video's
    claim, so none is another process's work in progress."""

    for stale in Path(folder).parent.glob(f".{Path(folder).name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _finished_detail(folder: Path, sources: dict, settings: dict, stem: str, out_dir: Path) -> Optional[str]:
    """Why a video is not tracked again (a finished result of it is there),
    or None to track it; a result of another source or other settings is
    kept, and the reason says what differs."""
    differences = result_differences(folder, sources, settings)
    if differences is None and legacy_result_name(stem) != stem:
        legacy = result_dir(out_dir, legacy_result_name(stem))
        if is_finished(legacy):
            return f"finished result in {legacy} (named by an earlier version; --overwrite to redo it into {folder})"
    if differences is None:
        return None
    if not differences:
        return f"finished result in {folder} (--overwrite to redo)"
    return f"{folder}: finished result kept: {'; '.join(differences)}; --overwrite to redo it"


def _check_landmarks_match(landmarks_file: Path, video: Path, fps: Optional[float]) -> None:
    """--landmarks and --data must describe the same frames: UsageError
    before any work when their frame counts differ."""

    n_landmarks = load_landmarks_file(landmarks_file).lmk68.shape[0]
    n_video = count_frames(video, fps)
    if n_landmarks != n_video:
        raise UsageError(f"--landmarks {landmarks_file} has {n_landmarks} frames but --data {video} has {n_video}"
                         f"{f' at --fps {fps:g}' if fps else ''}; they must be landmarks of that video")


def _expected_failure(exc: Exception, name: str, folder: Path) -> Optional[LightningFTError]:
    """An OS or LMDB error met while tracking `name` as the one-line error
    to report (a full disk: DiskFullError), or None for anything else."""

    reason = disk_full_reason(exc, getattr(exc, "filename", None))
    if reason is not None:
        return DiskFullError(f"{name}: {reason} while writing {folder}")
    if isinstance(exc, OSError):
        return OutputError(f"{name}: {exc.filename or folder}: {exc.strerror or exc}")
    if isinstance(exc, lmdb.Error):
        return OutputError(f"{name}: frame cache error ({exc})")
    return None


@dataclass
class VideoOutcome:
    name: str
    status: str  # 'done' | 'skipped' | 'failed' | 'not-run' (after a full disk)
    detail: str
    seconds: float


class _ReportedOutcomes(list):
    """A run's outcome list that hands each outcome to `report` as it is added."""

    def __init__(self, report):
        super().__init__()
        self._report = report

    def append(self, outcome):
        super().append(outcome)
        self._report(outcome)

    def extend(self, outcomes):
        for outcome in outcomes:
            self.append(outcome)


def input_videos(cfg: TrackConfig) -> Tuple[List[Optional[Path]], List[str]]:
    """The videos of a run (this shard's) and their result names; with
    --landmarks, the one video (or None) it goes with."""
    if cfg.landmarks_file is not None:
        if cfg.data is not None and Path(cfg.data).is_dir():
            raise UsageError("--landmarks goes with a single video (or none), not a folder")
        video = Path(cfg.data) if cfg.data is not None else None
        if video is not None and not video.exists():
            raise UsageError(f"{video}: no such file")
        return [video], [Path(cfg.landmarks_file).stem if video is None else video.stem]
    if cfg.data is None:
        raise UsageError("--data is required (a video or a folder of videos), unless --landmarks is given")
    all_videos = find_videos(cfg.data)
    # an --out inside --data: its visualization.mp4 files are results, not inputs
    out_resolved = Path(cfg.out_dir).resolve()
    all_videos = [v for v in all_videos if out_resolved not in v.resolve().parents]
    root = Path(cfg.data) if Path(cfg.data).is_dir() else None
    # named over the whole folder, before sharding, so every shard names a video alike
    names = dict(zip(all_videos, result_names(all_videos, root)))
    videos = select_shard(all_videos, cfg.shard)
    return videos, [names[v] for v in videos]


def resolve_model(cfg: TrackConfig) -> TrackConfig:
    """`cfg` with its head model chosen (`select_model`), after the checks
    that model needs before any work: its options, and FLAME's files."""

    model_name = select_model(cfg)
    _check_model_options(model_name, cfg)
    if model_name == "flame":
        require(cfg.assets_dir, tiers_for(emoca=not cfg.no_emoca, synthesis=cfg.synthesis))
    elif not cfg.no_emoca:
        log.info("EMOCA regresses FLAME codes: not used with ICT (each frame starts from a neutral face)")
        cfg = replace(cfg, no_emoca=True)  # said once, also where workers resolve it again
    # the result's settings name the model it was tracked with
    return replace(cfg, model=model_name)


def check_config(cfg: TrackConfig) -> TrackConfig:
    """Every check of a run's settings, made before any work, for the CLI
    and the Python API alike: one line naming the option and the problem
    (UsageError, AssetError). Returns `cfg` with its head model resolved."""
    if cfg.data is None and cfg.landmarks_file is None:
        raise UsageError("--data PATH is required (a video or a folder), or --landmarks FILE")
    if cfg.data is not None and not Path(cfg.data).exists():
        raise UsageError(f"{cfg.data}: no such file or folder")
    if cfg.landmarks_file is not None and not Path(cfg.landmarks_file).exists():
        raise UsageError(f"{cfg.landmarks_file}: no such file")
    if not MIN_IMAGE_SIZE <= cfg.image_size <= MAX_IMAGE_SIZE:
        raise UsageError(f"--image-size {cfg.image_size}: choose {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels")
    if cfg.fps is not None and not (math.isfinite(cfg.fps) and cfg.fps > 0):
        raise UsageError(f"--fps {cfg.fps}: a positive frame rate, e.g. 25")
    if cfg.focal_px is not None and not (math.isfinite(cfg.focal_px) and cfg.focal_px > 0):
        raise UsageError(f"--focal {cfg.focal_px}: must be a positive number of source-video pixels")
    if cfg.fov_deg is not None and not 1.0 <= cfg.fov_deg <= 170.0:
        raise UsageError(f"--fov {cfg.fov_deg}: must be a horizontal field of view between 1 and 170 degrees")
    unknown = [x for x in cfg.export if x not in EXPORT_FORMATS]
    if unknown:
        raise UsageError(f"--export {','.join(unknown)}: unknown format; choose from {', '.join(EXPORT_FORMATS)}")
    if cfg.synthesis and cfg.landmarks_file is not None and cfg.data is None:
        raise UsageError("--synthesis fits the video frames: pass --data with --landmarks")
    cfg = resolve_model(cfg)
    if cfg.synthesis:
        texture_space_files(cfg.assets_dir)
    check_writable(cfg.out_dir, "--out")
    check_writable(cfg.cache_dir or Path(cfg.out_dir) / ".cache", "--cache")
    return cfg


def run(cfg: TrackConfig, events=None) -> List[VideoOutcome]:
    """Track every video of the run (or the one --landmarks file).

    Required assets are checked before any work; a failing video is
    reported and the run goes on with the next one.

    events: a worker's hooks (`workers.WorkerEvents`): `passed_over(name)`
    before a video and again once its claim is held (a reason to leave it,
    or None), `started(name, folder)` once it holds the claim,
    `failing(name)` when tracking it fails, before the claim is released,
    `finished(outcome)` for every outcome.
    """
    cfg = check_config(cfg)
    model_name = cfg.model
    videos, stems = input_videos(cfg)
    if cfg.landmarks_file is not None and videos[0] is not None:
        _check_landmarks_match(cfg.landmarks_file, videos[0], cfg.fps)
    if cfg.landmarks_file is None:

        freed = remove_stale_cache_temporaries(cfg.cache_dir or Path(cfg.out_dir) / ".cache")
        if freed:
            log.info("removed %.1f MB of frame cache temporaries left by killed runs", freed / 1e6)
    flame = load_model(model_name, cfg.assets_dir)
    emoca_model = None
    if not cfg.no_emoca and model_name == "flame":

        # Inference only: BatchNorm folded into the convolutions, channels_last
        # (faster on CPU, benchmarks/bench_emoca.py).
        emoca_model = EmocaEncoder.from_release(Path(cfg.assets_dir) / "EMOCA", device=cfg.device,
                                                fold_batchnorm=True).to(memory_format=torch.channels_last)
    shared = None
    if cfg.shared_camera and cfg.focal_px is None and cfg.fov_deg is None:
        shared = _shared_camera(videos, stems, cfg, flame)
    outcomes = [] if events is None else _ReportedOutcomes(events.finished)
    for video, stem in zip(videos, stems):
        t0 = time.perf_counter()
        folder = result_dir(cfg.out_dir, stem)
        name = str(video or cfg.landmarks_file)
        passed_over = None if events is None else events.passed_over(name)
        if passed_over is not None:
            outcomes.append(VideoOutcome(name, "skipped", passed_over, 0.0))
            continue
        try:
            outcomes.append(_track_unless_done(video, stem, cfg, flame, emoca_model, shared, events, t0))
        except Exception as exc:
            error = exc if isinstance(exc, LightningFTError) else _expected_failure(exc, name, folder)
            if not isinstance(error, DiskFullError):  # a full disk is the batch's failure, said in its summary
                write_failure(cfg.out_dir, stem, name, error if error is not None else exc, time.perf_counter() - t0)
            if len(videos) == 1:
                if error is exc or error is None:
                    raise
                raise error from None
            if error is None:  # a bug met on one video must not end a dataset run
                detail = f"{name}: internal error ({type(exc).__name__}: {exc}); please report it"
                log.debug("traceback of %s", name, exc_info=True)
            else:
                detail = str(error)
            log.error("%s", detail)
            outcomes.append(VideoOutcome(name, "failed", detail, time.perf_counter() - t0))
            if isinstance(error, DiskFullError):
                # nothing after it can be written either
                rest = videos[len(outcomes):]
                outcomes.extend(VideoOutcome(str(v or cfg.landmarks_file), "not-run", "the disk is full", 0.0)
                                for v in rest)
                break
    return outcomes


def _track_unless_done(video: Optional[Path], stem: str, cfg: TrackConfig, flame: HeadModel, emoca_model,
                       shared: Optional[dict], events, t0: float) -> VideoOutcome:
    """One video of `run`: skipped where a finished result of it is there or
    another process holds its claim, else tracked while holding the claim.
    t0: when the run turned to it (perf_counter seconds)."""
    name = str(video or cfg.landmarks_file)
    folder = result_dir(cfg.out_dir, stem)
    sources = run_sources(video, cfg)
    skipped = None if cfg.overwrite else _finished_detail(folder, sources, result_settings(cfg), stem, cfg.out_dir)
    if skipped is not None:
        clear_stale(folder)  # left by a run killed between finishing and releasing it
        return VideoOutcome(name, "skipped", skipped, 0.0)
    # another process on this output folder may be tracking it
    with claim(folder) as held:
        if not held:
            return VideoOutcome(name, "skipped", f"{folder}: being tracked by {held.describe()}", 0.0)
        skipped = None if cfg.overwrite else _finished_detail(folder, sources, result_settings(cfg), stem,
                                                              cfg.out_dir)
        if skipped is not None:  # finished by the process that held it before
            return VideoOutcome(name, "skipped", skipped, 0.0)
        passed_over = None if events is None else events.passed_over(name)
        if passed_over is not None:  # failed by the worker that held it before
            return VideoOutcome(name, "skipped", passed_over, 0.0)
        _remove_stale_partials(folder)
        if events is not None:
            events.started(name, folder)
        try:
            folder = track_one(video, stem, cfg, flame, emoca_model, sources=sources, shared=shared)
        except Exception:
            if events is not None:  # said while the claim is held, so no other worker retries it
                events.failing(name)
            raise
        clear_failure(cfg.out_dir, stem)
    return VideoOutcome(name, "done", str(folder), time.perf_counter() - t0)


def _shared_camera(videos, stems, cfg: TrackConfig, flame: FLAME) -> dict:
    """--shared-camera: calibrate each video (landmarks and calibration only)
    and combine their focals in log source focal, weighted by the precision
    each calibration predicts, with the field-of-view prior counted once.
    A video that fails here is left to fail again in its own run."""
    estimates = []
    for video, stem in zip(videos, stems):
        try:
            cal = track_one(video, stem, cfg, flame, calibrate_only=True)
        except LightningFTError as exc:
            log.error("%s (left out of the shared camera)", exc)
            continue
        estimates.append({"video": str(video or cfg.landmarks_file), "focal_source_px": cal["focal_source_px"],
                          "focal_rel_std": cal["focal_rel_std"],
                          "prior_focal_source_px": cal["prior"]["focal_px"] / cal["crop_scale"],
                          "prior_sigma_log": cal["prior"]["sigma_log"]})
    if not estimates:

        raise NoFaceError(f"{cfg.data}: no video could be calibrated for --shared-camera")
    focal, rel_std = combine_focals(estimates)
    log.info("shared camera: focal %.1f source px (predicted std %.1f %%) from %d videos", focal, 100 * rel_std,
             len(estimates))
    return {"focal_source_px": focal, "focal_rel_std": rel_std, "videos": estimates}
