"""The dataset report: one self-contained HTML file over an output folder.

    lightning-ft report OUT_DIR [--out FILE] [--data DATA] [--plots all|flagged|none]

It reads what the tracker leaves: `<name>/meta.json` + `tracking.npz` per
finished video (at any depth below OUT_DIR), `<name>.failed.json` per failed
one, and with `--data` the input videos, so a video with neither (never run,
or its job was killed) is listed as missing. The page has a sortable table of
every video, outliers flagged against the folder's own distribution, and per
video plots over time (matplotlib, embedded as PNG) with a thumbnail of the
-v video. Nothing is fetched when it is opened: CSS, JS and images are inline.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .cameras import FRONTAL_ROTATION
from .errors import LightningFTError, UsageError
from .results import ResultFileError, is_finished, load_tracking
from .track import Track

log = logging.getLogger("lightning_ft")

FAILED_SUFFIX = ".failed.json"
# |robust z| above this flags a value (Iglewicz and Hoaglin's cut-off for the
# modified z-score); fewer finite values than MIN_FOR_OUTLIERS flag nothing.
OUTLIER_Z = 3.5
MIN_FOR_OUTLIERS = 5


@dataclass(frozen=True)
class Metric:
    """A table column. `bad`: which side of the folder's median is flagged
    ('high', 'low', 'both', None: never flagged). `floor`: the least spread
    assumed, so a folder of nearly equal values does not flag a difference
    nobody would care about (same unit as the value it is computed on)."""

    key: str
    header: str
    unit: str
    bad: Optional[str] = None
    floor: float = 0.0
    digits: int = 2


METRICS = (
    Metric("frames", "frames", "", None, digits=0),
    Metric("valid_share", "valid", "%", "low", floor=0.01, digits=1),
    Metric("error_68_px", "68-pt error", "px", "high", floor=0.1),
    Metric("error_dense_px", "dense error", "px", "high", floor=0.1),
    Metric("jitter_ratio", "jitter fitted / detected", "", "high", floor=0.02),
    Metric("focal_px", "focal", "px", "both", floor=0.02, digits=0),  # z on log(focal)
    Metric("focal_rel_std", "focal spread", "%", "high", floor=0.005, digits=1),
    Metric("seconds", "seconds", "s", "high", floor=0.05, digits=1),  # z on log(seconds per frame)
)


@dataclass
class VideoEntry:
    """One row of the report.

    name: the result's path below OUT_DIR (`a__clip`, `batch1/a__clip`);
    status: 'done' | 'failed' | 'incomplete' | 'missing'; reason: why it is
    not done; values: METRICS key -> number or None; outliers: key -> robust z
    of the flagged ones."""

    name: str
    status: str
    folder: Optional[Path] = None
    reason: str = ""
    meta: dict = field(default_factory=dict)
    values: Dict[str, Optional[float]] = field(default_factory=dict)
    outliers: Dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------
# Reading the folder


def _number(x) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def metrics_from_meta(meta: dict) -> Dict[str, Optional[float]]:
    """The table's figures from one meta.json (None where it lacks them)."""
    frames = meta.get("frames") or {}
    quality = meta.get("quality") or {}
    calibration = meta.get("calibration") or {}
    total, valid = _number(frames.get("total")), _number(frames.get("valid"))
    fitted, detected = _number(quality.get("jitter_68_fitted_px")), _number(quality.get("jitter_68_detected_px"))
    focal = _number(calibration.get("focal_px"))
    if focal is None:
        focal = _number(((meta.get("camera") or {}).get("focal_length") or [None])[0])
    return {
        "frames": total,
        "valid_share": valid / total if total and valid is not None else None,
        "error_68_px": _number(quality.get("mean_error_68_px")),
        "error_dense_px": _number(quality.get("mean_error_dense_px")),
        "jitter_fitted_px": fitted, "jitter_detected_px": detected,
        "jitter_ratio": fitted / detected if fitted is not None and detected else None,
        "focal_px": focal,
        "focal_rel_std": _number(calibration.get("focal_rel_std")),
        "seconds": _number((meta.get("stage_seconds") or {}).get("total")),
    }


def _read_result(folder: Path, name: str) -> VideoEntry:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        return VideoEntry(name, "incomplete", folder, "meta.json missing")
    except (OSError, ValueError) as exc:
        return VideoEntry(name, "incomplete", folder, f"meta.json unreadable ({exc})")
    if not isinstance(meta, dict):
        return VideoEntry(name, "incomplete", folder, "meta.json is not a JSON object")
    if not is_finished(folder):
        why = "tracking.npz missing" if not (folder / "tracking.npz").exists() else "meta.json not marked complete"
        return VideoEntry(name, "incomplete", folder, why, meta, metrics_from_meta(meta))
    return VideoEntry(name, "done", folder, "", meta, metrics_from_meta(meta))


def _read_failure(path: Path, name: str) -> VideoEntry:
    try:
        record = json.loads(path.read_text())
        reason = str(record.get("error") or "failed (no reason recorded)")
    except (OSError, ValueError, AttributeError) as exc:
        record, reason = {}, f"failed ({path.name} unreadable: {exc})"
    return VideoEntry(name, "failed", None, reason, meta={"failure": record},
                      values={"seconds": _number(record.get("seconds"))})


def collect(out_dir: Path, data: Optional[Path] = None) -> List[VideoEntry]:
    """Every result, failure record and (with `data`) missing video below
    `out_dir`, problems first, then by name. Hidden folders (the frame cache,
    a killed run's `.partial-*` folders) are not results."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UsageError(f"{out_dir}: no such folder (the --out folder of a tracking run)")
    entries: Dict[str, VideoEntry] = {}
    failures: Dict[str, Path] = {}
    for root, dirs, files in os.walk(out_dir):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "meta.json" in files or "tracking.npz" in files:
            name = here.relative_to(out_dir).as_posix() if here != out_dir else here.name  # one result folder
            entries[name] = _read_result(here, name)
            dirs[:] = []  # a result folder holds no further results
            continue
        for f in files:
            if f.endswith(FAILED_SUFFIX) and not f.startswith("."):
                failures[(here / f[:-len(FAILED_SUFFIX)]).relative_to(out_dir).as_posix()] = here / f
    for name, path in failures.items():
        # A finished result wins over a stale record (the tracker removes the
        # record when a rerun succeeds; a copied folder may still hold one).
        if name not in entries or entries[name].status != "done":
            failure = _read_failure(path, name)
            if name in entries:
                failure.folder, failure.meta = entries[name].folder, {**entries[name].meta, **failure.meta}
            entries[name] = failure
    if data is not None:
        for name, video in expected_results(data).items():
            if name not in entries:
                entries[name] = VideoEntry(name, "missing", reason=f"{video}: no result and no failure record "
                                           "(not run yet, or its job was killed)")
    if not entries:
        raise UsageError(f"{out_dir}: no results (<name>/meta.json) or failure records (<name>{FAILED_SUFFIX}) "
                         f"below this folder; give the --out folder of a tracking run")
    rank = {"failed": 0, "missing": 1, "incomplete": 2, "done": 3}
    return sorted(entries.values(), key=lambda e: (rank.get(e.status, 0), e.name))


def expected_results(data: Path) -> Dict[str, Path]:
    """Result name -> input video for a tracking run over `data` (the names
    the tracker gives, so a folder's clips map onto their results)."""
    from .batch import find_videos, result_names

    data = Path(data)
    videos = find_videos(data)
    return dict(zip(result_names(videos, data if data.is_dir() else None), videos))


# ----------------------------------------------------------------------------
# Outliers


def robust_z(values: Sequence[Optional[float]], floor: float = 0.0) -> np.ndarray:
    """(x - median) / (1.4826 MAD) per value, NaN for missing ones; with a
    zero MAD (more than half the values equal) the mean absolute deviation
    times 1.2533 stands in, both scaled to a normal's standard deviation.
    The spread is at least `floor`. All NaN with fewer than MIN_FOR_OUTLIERS
    finite values: a handful of videos has no distribution to speak of."""
    x = np.array([np.nan if v is None else v for v in values], np.float64)
    ok = np.isfinite(x)
    z = np.full(x.shape, np.nan)
    if ok.sum() < MIN_FOR_OUTLIERS:
        return z
    med = np.median(x[ok])
    dev = np.abs(x[ok] - med)
    scale = 1.4826 * np.median(dev)
    if scale == 0:
        scale = 1.2533 * dev.mean()
    scale = max(scale, floor)
    if scale == 0:
        z[ok] = 0.0
        return z
    z[ok] = (x[ok] - med) / scale
    return z


def _outlier_basis(e: VideoEntry, key: str) -> Optional[float]:
    """The number a metric is judged on: focal on a log scale (it is a
    scale), seconds per frame on a log scale (clips differ in length)."""
    v = e.values.get(key)
    if v is None:
        return None
    if key == "focal_px":
        return float(np.log(v)) if v > 0 else None
    if key == "seconds":
        n = e.values.get("frames")
        return float(np.log(v / n)) if n and v > 0 else None
    return v


def flag_outliers(entries: List[VideoEntry]) -> None:
    """Set `outliers` of every finished video: metrics whose robust z
    against the finished videos of the folder passes OUTLIER_Z on the bad side."""
    done = [e for e in entries if e.status == "done"]
    for m in METRICS:
        if m.bad is None:
            continue
        z = robust_z([_outlier_basis(e, m.key) for e in done], m.floor)
        for e, zi in zip(done, z):
            if not np.isfinite(zi):
                continue
            if (m.bad == "high" and zi > OUTLIER_Z) or (m.bad == "low" and zi < -OUTLIER_Z) or \
                    (m.bad == "both" and abs(zi) > OUTLIER_Z):
                e.outliers[m.key] = float(zi)


# ----------------------------------------------------------------------------
# Per-video figures


def head_angles_deg(rotation: np.ndarray) -> np.ndarray:
    """[T,3,3] rotations (FLAME model -> OpenCV camera) -> [T,3] yaw, pitch,
    roll in degrees of the head relative to facing the camera, as
    R_head = Ry(yaw) Rx(pitch) Rz(roll) in FLAME's axes (x: the subject's
    left, y up, z out of the face): yaw > 0 turns the face toward the image's
    right, pitch > 0 tilts it down, roll > 0 tips the top of the head toward
    the image's left."""
    from scipy.spatial.transform import Rotation

    R = np.asarray(rotation, np.float64)
    ok = np.isfinite(R).all(axis=(1, 2))
    out = np.full((len(R), 3), np.nan)
    if ok.any():
        # Project onto SO(3) first: float32 storage leaves ~1e-7 of drift.
        u, _, vt = np.linalg.svd(FRONTAL_ROTATION @ R[ok])
        det = np.sign(np.linalg.det(u @ vt))
        u[:, :, -1] *= det[:, None]
        out[ok] = Rotation.from_matrix(u @ vt).as_euler("YXZ", degrees=True)
    return out


def _png_data_uri(fig) -> str:
    buf = io.BytesIO()
    # No Software/URL text chunk: the page should name no external address.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _runs(mask: np.ndarray) -> List[Tuple[int, int]]:
    """[start, stop) of every run of True in a 1-D mask."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def plot_tracks(track: Track) -> Tuple[str, List[str]]:
    """PNG data URI of head rotation, translation, expression energy and
    per-frame reprojection error over time; and notes on what was not
    plotted (older results have no per-frame error arrays)."""
    from matplotlib.figure import Figure

    T = len(track.rotation)
    fps = float(track.fps or 0)
    t = np.arange(T) / fps if fps > 0 else np.arange(T, dtype=np.float64)
    valid = np.asarray(track.valid, bool)
    notes = []
    fig = Figure(figsize=(7.2, 5.8), dpi=80)
    # Fixed margins: matplotlib's constrained layout doubled the cost of a plot.
    fig.subplots_adjust(left=0.09, right=0.91, top=0.96, bottom=0.08, hspace=0.12)
    axes = fig.subplots(4, 1, sharex=True)
    ang = head_angles_deg(track.rotation)
    for i, (label, colour) in enumerate((("yaw", "C0"), ("pitch", "C1"), ("roll", "C2"))):
        axes[0].plot(t, ang[:, i], colour, lw=1, label=label)
    axes[0].set_ylabel("rotation (deg)")
    tr = np.asarray(track.translation, np.float64)
    axes[1].plot(t, tr[:, 0] * 100, "C0", lw=1, label="x")
    axes[1].plot(t, tr[:, 1] * 100, "C1", lw=1, label="y")
    axes[1].set_ylabel("x, y (cm)")
    depth = axes[1].twinx()
    depth.plot(t, tr[:, 2] * 100, "C3", lw=1, label="z (right axis)")
    depth.set_ylabel("z (cm)", color="C3")
    expr = np.asarray(track.expression, np.float64)
    axes[2].plot(t, np.linalg.norm(expr, axis=1), "C4", lw=1, label="|expression|")
    axes[2].plot(t, np.linalg.norm(np.asarray(track.jaw_pose, np.float64), axis=1) * 10, "C5", lw=1,
                 label="jaw (0.1 rad)")
    axes[2].set_ylabel("energy")
    have_error = False
    for key, label, colour in (("reprojection_error_68_px", "68-point", "C0"),
                               ("reprojection_error_dense_px", "dense", "C1")):
        if getattr(track, key) is not None:
            axes[3].plot(t, getattr(track, key), colour, lw=1, label=label)
            have_error = True
    if not have_error:
        notes.append("per-frame reprojection error not stored in this tracking.npz (a result written before "
                     "tracking.npz carried reprojection_error_68_px); rerun with --overwrite to get it")
        axes[3].text(0.5, 0.5, "per-frame error not stored in this result", ha="center", va="center",
                     transform=axes[3].transAxes, color="0.4")
    axes[3].set_ylabel("error (px)")
    axes[3].set_xlabel("time (s)" if fps > 0 else "frame")
    for ax in axes:
        for a, b in _runs(~valid):
            ax.axvspan(t[a] - 0.5 / max(fps, 1), t[b - 1] + 0.5 / max(fps, 1), color="0.85", lw=0)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.yaxis.label.set_size(8)
        if ax.get_legend_handles_labels()[0]:
            handles, labels = ax.get_legend_handles_labels()
            if ax is axes[1]:
                h2, l2 = depth.get_legend_handles_labels()
                handles, labels = handles + h2, labels + l2
            ax.legend(handles, labels, fontsize=7, loc="upper right", ncol=3, framealpha=0.6)
    depth.tick_params(labelsize=8, colors="C3")
    if (~valid).any():
        axes[0].set_title("grey: frames without a detected face (interpolated)", fontsize=8, loc="left")
    return _png_data_uri(fig), notes


def thumbnail(video_path: Path, height: int = 170) -> Optional[Tuple[str, int]]:
    """JPEG data URI of the frame near the middle of a -v video, scaled to
    `height` px, and that frame's index; None when there is no such video or
    it cannot be decoded."""
    import av
    from PIL import Image

    if not Path(video_path).exists():
        return None
    try:
        with av.open(str(video_path)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or 0) or 25.0
            duration = (float(stream.duration * stream.time_base) if stream.duration
                        else (container.duration or 0) / 1e6)
            target = duration / 2
            if target > 0 and stream.time_base:
                container.seek(int(target / stream.time_base), stream=stream)
            # The seek lands on the keyframe before the middle (for a short
            # clip, frame 0); decode on to the middle.
            frame = None
            for frame in container.decode(stream):
                if (frame.time or 0.0) >= target - 0.5 / rate:
                    break
            if frame is None:
                return None
            index = int(round((frame.time or 0.0) * rate))
            image = frame.to_image()
    except (av.error.FFmpegError, OSError, StopIteration, IndexError) as exc:
        log.warning("%s: no thumbnail (%s)", video_path, exc)
        return None
    image = image.resize((max(1, round(image.width * height / image.height)), height), Image.BILINEAR)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), index


# ----------------------------------------------------------------------------
# HTML

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d1d1f;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px} h3{font-size:15px;margin:0 0 6px}
.sub{color:#555;margin:0 0 14px} .counts span{display:inline-block;margin-right:14px}
.note{color:#555;font-size:13px;max-width:70em}
table{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #e3e3e3;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#f4f5f7;position:sticky;top:0;cursor:pointer;user-select:none;vertical-align:bottom}
th:hover{background:#e8eaee} th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}
td.name,th.name,td.text,th.text{text-align:left} td.reason{white-space:normal;max-width:38em;text-align:left}
tr:hover td{background:#fafbfc}
td.outlier{background:#ffe1d6;color:#9a2500;font-weight:600}
.st{border-radius:3px;padding:1px 6px;font-size:12px}
.st-done{background:#e3f4e6;color:#1c6b2c} .st-failed{background:#fde2e1;color:#a11}
.st-missing{background:#fff0c7;color:#7a5a00} .st-incomplete{background:#efe6fb;color:#5a2d91}
.flag{color:#9a2500;font-size:12px}
section.video{border-top:1px solid #ddd;padding:14px 0;display:flex;gap:18px;flex-wrap:wrap}
section.video .info{flex:0 0 520px} section.video img{display:block;max-width:100%}
.thumb{margin:8px 0 0} .thumb figcaption{color:#555;font-size:12px}
dl{display:grid;grid-template-columns:max-content auto;gap:1px 10px;margin:6px 0;font-size:13px}
dt{color:#555} dd{margin:0}
a{color:#0b57a4;text-decoration:none} a:hover{text-decoration:underline}
"""

# Sorting: a click on a header sorts by that column (again: reversed); empty
# cells stay last either way. `?sort=KEY&order=desc` in the page's address
# clicks the header on load, so a sorted view can be bookmarked (and tested).
_JS = """
function sortTable(th){
  var table=th.closest('table'), body=table.tBodies[0];
  var col=Array.prototype.indexOf.call(th.parentNode.children, th);
  var asc=th.getAttribute('aria-sort')!=='ascending', num=th.dataset.type==='num';
  var rows=Array.prototype.slice.call(body.rows);
  rows.sort(function(a,b){
    var x=a.cells[col].dataset.v, y=b.cells[col].dataset.v;
    if(x===''||x===undefined){return (y===''||y===undefined)?0:1;}
    if(y===''||y===undefined){return -1;}
    var c=num?(parseFloat(x)-parseFloat(y)):x.localeCompare(y,undefined,{numeric:true});
    return asc?c:-c;
  });
  rows.forEach(function(r){body.appendChild(r);});
  Array.prototype.forEach.call(th.parentNode.children,function(h){h.removeAttribute('aria-sort');});
  th.setAttribute('aria-sort',asc?'ascending':'descending');
}
document.addEventListener('DOMContentLoaded',function(){
  var heads=document.querySelectorAll('#videos thead th');
  Array.prototype.forEach.call(heads,function(th){th.addEventListener('click',function(){sortTable(th);});});
  var q=new URLSearchParams(location.search), key=q.get('sort');
  if(key){
    var th=document.querySelector('#videos thead th[data-key="'+key+'"]');
    if(th){th.click(); if(q.get('order')==='desc'){th.click();}}
  }
});
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(m: Metric, v: Optional[float]) -> str:
    if v is None:
        return "&ndash;"
    if m.unit == "%":
        return f"{100 * v:.{m.digits}f}&nbsp;%"
    return f"{v:,.{m.digits}f}".replace(",", "&#8239;")


def _cell(e: VideoEntry, m: Metric) -> str:
    v = e.values.get(m.key)
    sort_value = "" if v is None else repr(float(v))
    text = _fmt(m, v)
    title = ""
    if m.key == "jitter_ratio" and v is not None:
        text = (f"{e.values['jitter_fitted_px']:.2f} / {e.values['jitter_detected_px']:.2f} "
                f"<small>({v:.2f})</small>")
        title = "second-difference jitter of the fitted / detected 68 points, px per frame^2 (ratio)"
    elif m.key == "seconds" and e.meta.get("stage_seconds"):
        title = ", ".join(f"{k} {float(s):.1f}" for k, s in e.meta["stage_seconds"].items() if k != "total")
    cls = ""
    if m.key in e.outliers:
        cls = ' class="outlier"'
        title = (title + "; " if title else "") + f"outlier: robust z = {e.outliers[m.key]:+.1f}"
    title_attr = f' title="{_e(title)}"' if title else ""
    return f'<td{cls} data-v="{sort_value}"{title_attr}>{text}</td>'


def _row(i: int, e: VideoEntry, linked: bool) -> str:
    name = f'<a href="#v{i}">{_e(e.name)}</a>' if linked else _e(e.name)
    flags = ", ".join(next(m.header for m in METRICS if m.key == k) for k in e.outliers)
    note = e.reason or (f'<span class="flag">outlier: {_e(flags)}</span>' if flags else "")
    cells = [f'<td class="name" data-v="{_e(e.name)}">{name}</td>',
             f'<td class="text" data-v="{_e(e.status)}"><span class="st st-{_e(e.status)}">{_e(e.status)}</span></td>']
    cells += [_cell(e, m) for m in METRICS]
    cells.append(f'<td class="reason" data-v="{len(e.outliers) if not e.reason else 100}">{note}</td>')
    return f'<tr data-status="{_e(e.status)}" data-outliers="{_e(",".join(e.outliers))}">{"".join(cells)}</tr>'


def _details(e: VideoEntry) -> str:
    meta = e.meta
    video = (meta.get("video") or {}).get("path") or (meta.get("failure") or {}).get("video")
    items = [("video", video), ("status", e.status + (f": {e.reason}" if e.reason else ""))]
    if e.status in ("done", "incomplete") and meta:
        lm = meta.get("landmarks") or {}
        model = meta.get("model") or {}
        items += [("model", model.get("version") or model.get("name") or "FLAME"),
                  ("landmarks", lm.get("source68")), ("crop", "x".join(map(str, lm.get("image_size") or [])) or None),
                  ("fps", f"{float((meta.get('video') or {}).get('fps') or 0):.2f}" if meta.get("video") else None),
                  ("EMOCA", "used" if (meta.get("emoca") or {}).get("used") else "not used"),
                  ("device", (meta.get("settings") or {}).get("device"))]
        fitted = e.values.get("jitter_fitted_px")
        if fitted is not None:
            items.append(("jitter", f"{fitted:.2f} fitted / {e.values['jitter_detected_px']:.2f} detected px"))
        if e.outliers:
            headers = {m.key: m.header for m in METRICS}
            items.append(("outliers", ", ".join(f"{headers[k]} (robust z {z:+.1f})" for k, z in e.outliers.items())))
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items if v not in (None, ""))
    return f"<dl>{rows}</dl>"


def _video_section(i: int, e: VideoEntry) -> str:
    parts = [f'<section class="video" id="v{i}"><div class="info"><h3>{_e(e.name)}</h3>{_details(e)}']
    figure = ""
    if e.status == "done" and e.folder is not None:
        thumb = thumbnail(e.folder / "visualization.mp4")
        if thumb is not None:
            parts.append(f'<figure class="thumb"><img alt="fitted frame" src="{thumb[0]}">'
                         f'<figcaption>visualization.mp4, frame {thumb[1]}: crop | fit | mesh</figcaption></figure>')
        elif (e.folder / "visualization.mp4").exists():
            parts.append('<p class="note">visualization.mp4 could not be decoded: no thumbnail</p>')
        else:
            parts.append('<p class="note">no visualization.mp4 (run with -v for a thumbnail)</p>')
        try:
            uri, notes = plot_tracks(load_tracking(e.folder).track)
            figure = f'<img alt="tracks over time of {_e(e.name)}" src="{uri}">'
            parts += [f'<p class="note">{_e(n)}</p>' for n in notes]
        except ResultFileError as exc:
            parts.append(f'<p class="note">tracking.npz unreadable: {_e(exc)}</p>')
    parts.append(f"</div>{figure}</section>")
    return "".join(parts)


def render_html(entries: List[VideoEntry], out_dir: Path, plots: str = "all") -> str:
    """The whole page. plots: 'all' | 'flagged' (videos with an outlier) |
    'none': per-video sections (plots and thumbnail) to include."""
    counts = {s: sum(e.status == s for e in entries) for s in ("done", "failed", "incomplete", "missing")}
    n_flagged = sum(bool(e.outliers) for e in entries)
    done = [e for e in entries if e.status == "done"]
    frames = sum(int(e.values.get("frames") or 0) for e in done)

    def median(key):
        v = [e.values[key] for e in done if e.values.get(key) is not None]
        return float(np.median(v)) if v else None

    show = [e.status == "done" and (plots == "all" or (plots == "flagged" and bool(e.outliers))) for e in entries]
    heads = ['<th class="name" data-key="name" data-type="text">video</th>',
             '<th class="text" data-key="status" data-type="text">status</th>']
    heads += [f'<th data-key="{m.key}" data-type="num">{_e(m.header)}'
              f'{"<br><small>" + _e(m.unit) + "</small>" if m.unit and m.unit != "%" else ""}</th>' for m in METRICS]
    heads.append('<th class="text" data-key="note" data-type="num">failure reason / outliers</th>')
    medians = ", ".join(f"{m.header} {_fmt(m, median(m.key))}" for m in METRICS[1:] if median(m.key) is not None)
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        f"<h1>LightningFT dataset report</h1><p class=\"sub\">{_e(out_dir)} &middot; {generated}</p>",
        '<p class="counts">'
        + "".join(f'<span><span class="st st-{s}">{s}</span> {n}</span>' for s, n in counts.items())
        + f"<span>{n_flagged} with outliers</span><span>{frames:,} frames tracked</span></p>",
        f'<p class="note">Medians over finished videos: {medians}.</p>' if medians else "",
        f'<p class="note">Outliers (orange): a value more than {OUTLIER_Z} robust standard deviations '
        "(1.4826 &times; the median absolute deviation) from this folder's median, on the bad side: high "
        "errors, jitter ratio, focal spread and seconds per frame, a low valid share, an unusual focal either "
        f"way (on a log scale); only with {MIN_FOR_OUTLIERS} or more finished videos. Click a column header "
        "to sort. Focal in pixels of the crop; its spread is the predicted relative standard deviation.</p>",
        '<table id="videos"><thead><tr>' + "".join(heads) + "</tr></thead><tbody>",
        *(_row(i, e, show[i] or e.status != "done") for i, e in enumerate(entries)),
        "</tbody></table>",
    ]
    sections = [_video_section(i, e) for i, e in enumerate(entries) if show[i] or e.status != "done"]
    if sections:
        body.append("<h2>Per video</h2><p class=\"note\">Plots over time: head rotation relative to facing "
                    "the camera (yaw + toward the image's right, pitch + down, roll + top of the head toward the "
                    "image's left), translation of the head in the camera (cm), expression energy (norm of the "
                    "model's expression coefficients: FLAME's, or ICT's ARKit-style weights; FLAME's jaw angle), "
                    "per-frame mean reprojection error of the fit "
                    "(crop px).</p>")
        body += sections
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>LightningFT report: {_e(Path(out_dir).name)}</title>"
            f"<style>{_CSS}</style><script>{_JS}</script></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(out_dir: Path, out_file: Optional[Path] = None, data: Optional[Path] = None,
                 plots: str = "all") -> Tuple[Path, List[VideoEntry]]:
    """Collect, flag and render; the HTML is written atomically to
    `out_file` (default OUT_DIR/report.html). Returns it and the entries."""
    if plots not in ("all", "flagged", "none"):
        raise UsageError(f"--plots {plots}: choose all, flagged or none")
    entries = collect(out_dir, data)
    flag_outliers(entries)
    page = render_html(entries, Path(out_dir), plots)
    out_file = Path(out_file) if out_file is not None else Path(out_dir) / "report.html"
    if out_file.parent and not out_file.parent.is_dir():
        raise UsageError(f"{out_file}: its folder does not exist")
    tmp = out_file.parent / f".{out_file.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out_file)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LightningFTError(f"{out_file}: could not write the report ({exc.strerror or exc})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_file, entries


def summary_line(entries: List[VideoEntry]) -> str:
    counts = {s: sum(e.status == s for e in entries) for s in ("done", "failed", "incomplete", "missing")}
    flagged = sum(bool(e.outliers) for e in entries)
    return (f"{len(entries)} videos: " + ", ".join(f"{n} {s}" for s, n in counts.items())
            + f"; {flagged} with outliers")
