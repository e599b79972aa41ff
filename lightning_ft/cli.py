"""Command line: `lightning-ft` (track, assets check|fetch, export) and
`track_lightning.py`, the original tool's command.

Expected failures (LightningFTError) are printed as one line and mapped to an
exit code; nothing else is caught here, so real bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from .errors import LightningFTError, UsageError
from .runtime import configure_threads

log = logging.getLogger("lightning_ft")
# Largest --image-size: a crop of 4096x4096 RGB is 48 MB per frame already.


def resolve_device(spec: Optional[str]) -> str:
    """'-d 7' -> 'cuda:7' (as the original tool), 'cpu', 'cuda', 'cuda:N';
    default: the first GPU if there is one, else the CPU."""
    import torch

    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec is None or spec == "":
        return "cuda:0" if n_gpu else "cpu"
    s = str(spec).strip().lower()
    if s == "cpu":
        return "cpu"
    if s.isdigit():
        index = int(s)
    elif s == "cuda":
        index = 0
    elif s.startswith("cuda:") and s[5:].isdigit():
        index = int(s[5:])
    else:
        raise UsageError(f"-d {spec}: expected a GPU index (e.g. 0), cuda:N or cpu")
    if index >= n_gpu:
        have = f"{n_gpu} GPU(s) visible" if n_gpu else "no GPU visible (CUDA unavailable)"
        raise UsageError(f"-d {spec}: GPU {index} is not available, {have}; use -d cpu")
    return f"cuda:{index}"


def _track_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Track FLAME parameters and a calibrated camera in "
                                "talking-head videos.")
    p.add_argument("--data", type=Path, help="a video file or a folder searched recursively for videos")
    p.add_argument("-d", "--device", default=None, help="GPU index (as in the original tool), cuda:N or cpu "
                   "(default: first GPU, else CPU); a list 0,1,2,3 or 'all' runs one worker process per GPU")
    p.add_argument("--workers", type=int, default=None, help="N worker processes on the device (e.g. -d cpu "
                   "--workers 4), each taking the next unclaimed video; default 1")
    p.add_argument("-v", "--visualize", action="store_true", help="write visualization.mp4 beside the results")
    p.add_argument("--synthesis", action="store_true", help="photometric refinement (needs the texture space)")
    p.add_argument("--out", type=Path, default=Path("output"), help="output folder (default: ./output)")
    p.add_argument("--assets", default=None, help="assets folder (default: $LIGHTNING_FT_ASSETS, else ./assets)")
    p.add_argument("--landmarks", type=Path, help="npz with lmk68 [T,68,2], lmk_dense [T,478,2], image_size [2] "
                   "and optional valid [T]: replaces detection; --data becomes optional")
    p.add_argument("--no-emoca", action="store_true", help="neutral initialisation instead of EMOCA v2")
    p.add_argument("--shard", help="K/N: process every N-th video starting at K (cluster job arrays); auto: "
                   "K and N from Slurm's SLURM_ARRAY_TASK_* variables (docs/cluster.md)")
    p.add_argument("--overwrite", action="store_true", help="redo videos that already have a finished result")
    p.add_argument("--image-size", type=int, default=512, help="crop size in pixels (default 512)")
    p.add_argument("--fps", type=float, default=None, help="resample to this frame rate")
    p.add_argument("--lmk68", choices=("auto", "fan", "dlib", "mediapipe"), default="auto",
                   help="source of the 68 landmarks (default: FAN if its weights are local, else dlib, else "
                   "mediapipe)")
    p.add_argument("--model", choices=("flame", "ict"), default=None,
                   help="head model: FLAME (needs its files under the assets folder) or the built-in ICT-FaceKit "
                   "model (MIT licence, no files needed); default: FLAME where its files are there, else ICT")
    p.add_argument("--export", default="", help="also export: comma-separated "
                   "vhap,metrical,lightning,nerface,mesh,arkit")
    p.add_argument("--cache", type=Path, default=None, help="frame cache folder (default: OUT/.cache)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info messages")
    camera = p.add_mutually_exclusive_group()
    camera.add_argument("--focal", type=float, default=None, metavar="PX",
                        help="known focal length in source-video pixels (calibration then fits the identity only)")
    camera.add_argument("--fov", type=float, default=None, metavar="DEG",
                        help="known horizontal field of view of the source video, degrees")
    camera.add_argument("--shared-camera", action="store_true",
                        help="one focal for all videos of --data (one camera rig), calibrated over all of them")
    return p


def _track(args: argparse.Namespace) -> int:
    import os

    from .assets import ENV_ASSETS, resolve_assets_dir
    from .batch import parse_shard, run
    from .pipeline import TrackConfig
    from .workers import resolve_devices, run_workers

    exports = [x.strip() for x in args.export.split(",") if x.strip()]

    devices = resolve_devices(args.device, args.workers)
    cfg = TrackConfig(
        data=args.data, out_dir=args.out, assets_dir=resolve_assets_dir(args.assets),
        device=devices[0], visualize=args.visualize, synthesis=args.synthesis,
        landmarks_file=args.landmarks, no_emoca=args.no_emoca, shard=parse_shard(args.shard),
        overwrite=args.overwrite, image_size=args.image_size, fps=args.fps, lmk68=args.lmk68, export=exports,
        cache_dir=args.cache, progress=False if args.quiet else None, model=args.model,
        assets_named=bool(args.assets or os.environ.get(ENV_ASSETS)),
        focal_px=args.focal, fov_deg=args.fov, shared_camera=args.shared_camera)
    if args.shared_camera and len(devices) > 1:
        raise UsageError("--shared-camera calibrates over all videos in one process: use one device, no --workers")
    outcomes = run(cfg) if len(devices) == 1 else run_workers(cfg, devices, quiet=args.quiet)
    return _summary(outcomes)


def _summary(outcomes) -> int:
    failed = [o for o in outcomes if o.status == "failed"]
    if len(outcomes) > 1 or failed:
        width = max(len(o.name) for o in outcomes)
        print(f"{'video':<{width}}  status   seconds  detail")
        for o in outcomes:
            print(f"{o.name:<{width}}  {o.status:<7}  {o.seconds:7.1f}  {o.detail}")
        done = sum(o.status == "done" for o in outcomes)
        skipped = sum(o.status == "skipped" for o in outcomes)
        print(f"{done} done, {skipped} skipped, {len(failed)} failed")
    else:
        for o in outcomes:
            print(f"{o.name}: {o.status} -> {o.detail}")
            if o.status == "done":
                folder = Path(o.detail)
                print(f"results: {folder / 'tracking.npz'} and {folder / 'meta.json'}")
                if (folder / "visualization.mp4").exists():
                    print(f"video: {folder / 'visualization.mp4'}")
    not_run = [o for o in outcomes if o.status == "not-run"]
    if not_run:
        from .errors import DiskFullError

        print(f"stopped: {failed[-1].detail}; {len(not_run)} video(s) not run; free space and rerun (finished "
              f"results are kept)", file=sys.stderr)
        return DiskFullError.exit_code
    return 1 if failed else 0


def _assets(args: argparse.Namespace) -> int:
    from .assets import main_check, main_fetch

    if args.assets_command == "check":
        return main_check(args.assets)
    items = args.item or None
    return main_fetch(args.assets, items=items, force=args.force)


def _export(args: argparse.Namespace) -> int:
    from .export import export
    from .results import check_writable

    formats = [x.strip() for x in args.format.split(",") if x.strip()]
    check_writable(args.out if args.out is not None else args.result_dir / "export", "--out", keep=False)
    paths = export(args.result_dir, formats, out_dir=args.out, allow_version_mismatch=args.allow_version_mismatch,
                   video=args.video, require_images=True)
    print(f"wrote {len(paths)} files for {', '.join(formats)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import summary_line, write_report

    path, entries = write_report(args.out_dir, args.out, data=args.data, plots=args.plots)
    print(f"{summary_line(entries)} -> {path}")
    return 1 if any(e.status != "done" for e in entries) else 0


def _main_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-ft", description="LightningFT: fast monocular FLAME face tracker")
    sub = p.add_subparsers(dest="command", required=True)
    track = sub.add_parser("track", help="track videos (same options as track_lightning.py)",
                           parents=[_track_parser("lightning-ft track")], add_help=False)
    track.set_defaults(func=_track)
    assets = sub.add_parser("assets", help="check or download model files")
    assets_sub = assets.add_subparsers(dest="assets_command", required=True)
    chk = assets_sub.add_parser("check", help="what is present, missing or corrupt, and which stage needs it")
    chk.add_argument("--assets", default=None)
    fetch = assets_sub.add_parser("fetch", help="download what can be downloaded (FLAME needs your account)")
    fetch.add_argument("--assets", default=None)
    fetch.add_argument("--item", action="append", choices=("emoca", "flame", "texture", "embedding"))
    fetch.add_argument("--force", action="store_true")
    assets.set_defaults(func=_assets)
    exp = sub.add_parser("export", help="convert a result folder for another tool")
    exp.add_argument("result_dir", type=Path)
    exp.add_argument("--format", required=True, help="vhap, metrical, lightning, nerface, mesh, arkit "
                     "(comma-separated)")
    exp.add_argument("--out", type=Path, default=None)
    exp.add_argument("--allow-version-mismatch", action="store_true")
    exp.add_argument("--video", type=Path, default=None, help="the source video, where it is not at the path "
                     "meta.json records (frame images of vhap, metrical, lightning, nerface are cut from it)")
    exp.set_defaults(func=_export)
    rep = sub.add_parser("report", help="one self-contained HTML page over an output folder: a table of every "
                         "video, outliers, plots; exit code 1 if a video failed, is incomplete or missing")
    rep.add_argument("out_dir", type=Path, help="the --out folder of tracking runs")
    rep.add_argument("--out", type=Path, default=None, help="HTML file to write (default: OUT_DIR/report.html)")
    rep.add_argument("--data", type=Path, default=None, help="the run's input video or folder: list videos that "
                     "have neither a result nor a failure record as missing (completeness check)")
    rep.add_argument("--plots", choices=("all", "flagged", "none"), default="all",
                     help="per-video plots for every finished video, only those with an outlier, or none")
    rep.set_defaults(func=_report)
    return p


def _run(func, args) -> int:
    from .progress import filtered_native_stderr

    with filtered_native_stderr():  # mediapipe's W0000/I0000 lines on every run
        logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                            format="%(message)s", stream=sys.stderr)
        try:
            return func(args)
        except LightningFTError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


def main(argv: Optional[List[str]] = None) -> int:
    """`lightning-ft ...`"""
    configure_threads()
    args = _main_parser().parse_args(argv)
    return _run(args.func, args)


def track_main(argv: Optional[List[str]] = None) -> int:
    """`python track_lightning.py ...` (the original tool's command)."""
    configure_threads()
    args = _track_parser("track_lightning.py").parse_args(argv)
    return _run(_track, args)
