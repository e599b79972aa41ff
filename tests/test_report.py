"""The dataset report (`lightning-ft report`) and Slurm job arrays (`--shard auto`).

The report folder holds six results written with the project's own writer
(synthetic tracks with known head angles and planted outliers), one result of
a real tracker run on a --landmarks file, two videos the real tracker failed
on, a result a killed run left incomplete and a killed run's hidden partial
folder. The page is loaded in headless Chromium (Debian's `chromium`; CI
installs it) and the table is read from the DOM after its script ran.
A screenshot for a person goes to test-artifacts/report/ (git-ignored).
"""

from __future__ import annotations

import base64
import html.parser
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from lightning_ft.cli import main
from lightning_ft.errors import UsageError
from lightning_ft.results import failure_path, track_from_arrays, write_result
from lightning_ft.batch import run
from lightning_ft.pipeline import TrackConfig
from lightning_ft.report import OUTLIER_Z, collect, flag_outliers, head_angles_deg, robust_z, write_report
from lightning_ft.synthetic import clips

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "report"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLIP = np.diag([1.0, -1.0, -1.0])

# name -> (68-pt error, dense error, jitter fitted, jitter detected, focal px, focal_rel_std, seconds, valid share)
SYNTHETIC = {
    "clip_a": (2.1, 1.5, 0.30, 1.20, 900.0, 0.030, 4.0, 1.0),
    "clip_b": (2.3, 1.6, 0.28, 1.10, 950.0, 0.035, 4.2, 1.0),
    "clip_c": (2.0, 1.4, 0.33, 1.30, 880.0, 0.028, 3.9, 1.0),
    "batch2/clip_d": (2.2, 1.5, 0.31, 1.25, 920.0, 0.040, 4.1, 1.0),
    "batch2/clip_e": (9.5, 6.0, 0.35, 1.20, 910.0, 0.033, 4.0, 1.0),  # fits badly
    "clip_f": (2.4, 1.7, 0.29, 1.15, 940.0, 0.031, 4.3, 0.6),  # face lost 40 % of the time
}
T_SYN, FPS_SYN = 50, 25.0


def _angles(T: int, phase: float) -> np.ndarray:
    """[T,3] yaw, pitch, roll (degrees) of a synthetic head."""
    t = np.arange(T) / FPS_SYN
    return np.stack([25 * np.sin(2 * np.pi * 0.4 * t + phase), 10 * np.sin(2 * np.pi * 0.3 * t + phase),
                     5 * np.sin(2 * np.pi * 0.2 * t)], 1)


def _rotation_from_angles(angles_deg: np.ndarray) -> np.ndarray:
    """FLAME -> OpenCV camera rotations of a head turned by yaw, pitch, roll."""
    return FLIP @ Rotation.from_euler("YXZ", angles_deg, degrees=True).as_matrix()


def _write_synthetic(out: Path, name: str, figures, seed: int, visualization: bool = False) -> Path:
    err68, errd, jf, jd, focal, rel_std, seconds, valid_share = figures
    rng = np.random.default_rng(seed)
    T = T_SYN
    valid = np.ones(T, bool)
    valid[int(round(T * valid_share)):] = False
    per68 = np.where(valid, err68 + 0.2 * rng.standard_normal(T), np.nan).astype(np.float32)
    tracking = {
        "frame_ids": np.arange(T), "valid": valid, "shape": np.zeros(100, np.float32),
        "expression": (0.5 * rng.standard_normal((T, 50))).astype(np.float32),
        "jaw_pose": np.zeros((T, 3), np.float32), "neck_pose": np.zeros((T, 3), np.float32),
        "eye_pose": np.zeros((T, 6), np.float32),
        "rotation": _rotation_from_angles(_angles(T, seed)).astype(np.float32),
        "translation": np.tile([0.0, 0.01, 0.6], (T, 1)).astype(np.float32),
        "focal_length": np.array([focal, focal], np.float32), "principal_point": np.array([255.5, 255.5], np.float32),
        "image_size": np.array([512, 512]), "crop_boxes": np.zeros((T, 4), np.float32),
        "lmk68": np.zeros((T, 68, 2), np.float32), "lmk_dense": np.zeros((T, 478, 2), np.float32),
        "fps": np.float32(FPS_SYN), "reprojection_error_68_px": per68,
        "reprojection_error_dense_px": (per68 * errd / err68).astype(np.float32),
    }
    n_valid = int(valid.sum())
    meta = {"video": {"path": f"/data/{name}.mp4", "fps": FPS_SYN, "frames": T},
            "frames": {"total": T, "valid": n_valid, "invalid": T - n_valid},
            "landmarks": {"source68": "mediapipe", "image_size": [512, 512]}, "emoca": {"used": False},
            "calibration": {"focal_px": focal, "focal_rel_std": rel_std},
            "quality": {"mean_error_68_px": err68, "mean_error_dense_px": errd, "jitter_68_fitted_px": jf,
                        "jitter_68_detected_px": jd, "invalid_frames": T - n_valid},
            "settings": {"device": "cpu"}, "stage_seconds": {"landmarks": seconds / 2, "total": seconds}}

    def write_video(tmp: Path):
        frames = [np.full((64, 192, 3), (40 * k) % 255, np.uint8) for k in range(T)]
        for k, f in enumerate(frames):
            f[:, 64:128] = (0, 200, 0)  # the middle panel is green: the thumbnail's colour is checked
        clips.write_clip(tmp / "visualization.mp4", frames, fps=FPS_SYN)

    return write_result(out / name, *track_from_arrays(tracking, out / name), meta,
                        extra=write_video if visualization else None)


# ----------------------------------------------------------------------------
# Fixtures: one folder, built once


@pytest.fixture(scope="module")
def report_folder(tmp_path_factory, assets_dir, flame_model):
    root = tmp_path_factory.mktemp("report")
    out, data = root / "out", root / "videos"
    for seed, (name, figures) in enumerate(SYNTHETIC.items()):
        _write_synthetic(out, name, figures, seed, visualization=(name == "clip_a"))
    # The real tracker fails on a truncated and an empty file: it records why.
    excerpt = clips.write_excerpt(clips.carphone_path(), root / "excerpt.mp4", n_frames=8)
    clips.write_truncated(excerpt, data / "broken.mp4", keep_fraction=0.3)
    clips.write_empty(data / "empty.mp4")
    failed = run(TrackConfig(data=data, out_dir=out, assets_dir=assets_dir, no_emoca=True, progress=False))
    # ... and tracks a --landmarks file, with a stale failure record to clear.
    from lightning_ft.synthetic.sequences import make_sequence

    seq = make_sequence(flame_model, T=40, focal=700.0, image_size=256, seed=3)
    valid = np.ones(40, bool)
    valid[[5, 6, 30]] = False
    np.savez(root / "talking_head.npz", lmk68=seq.lmk68, lmk_dense=seq.lmk_dense, image_size=np.array([256, 256]),
             valid=valid)
    failure_path(out, "talking_head").write_text('{"error": "an earlier failure"}')
    tracked = run(TrackConfig(data=None, landmarks_file=root / "talking_head.npz", out_dir=out,
                              assets_dir=assets_dir, no_emoca=True, progress=False))
    # A killed run: a result folder without meta.json, and a hidden partial one.
    (out / "clip_killed").mkdir()
    shutil.copy(out / "clip_b" / "tracking.npz", out / "clip_killed" / "tracking.npz")
    shutil.copytree(out / "clip_c", out / ".clip_c.partial-0123abcd")
    return {"out": out, "data": data, "failed": failed, "tracked": tracked, "valid": valid}


@pytest.fixture(scope="module")
def report_html(report_folder):
    path, entries = write_report(report_folder["out"])
    return path, entries


class _TableReader(html.parser.HTMLParser):
    """Rows of table#videos: per row the <tr> attributes and per cell its
    text and attributes; the header cells likewise."""

    def __init__(self):
        super().__init__()
        self.in_table = False
        self.section = None
        self.rows, self.head = [], []
        self.cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "videos":
            self.in_table = True
        elif self.in_table and tag in ("thead", "tbody"):
            self.section = tag
        elif self.in_table and tag == "tr" and self.section == "tbody":
            self.rows.append({"attrs": a, "cells": []})
        elif self.in_table and tag in ("td", "th"):
            self.cell = {"attrs": a, "text": ""}
            (self.head if self.section == "thead" else self.rows[-1]["cells"]).append(self.cell)

    def handle_endtag(self, tag):
        if tag == "table":
            self.in_table = False
        elif tag in ("td", "th"):
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell["text"] += data


def _dump_dom(path: Path, tmp_path: Path, query: str = "") -> _TableReader:
    proc = subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path}",
                           "--dump-dom", path.resolve().as_uri() + query],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reader = _TableReader()
    reader.feed(proc.stdout)
    assert reader.rows, "no table rows in the DOM Chromium rendered"
    return reader


def _column(reader: _TableReader, key: str) -> int:
    return [h["attrs"].get("data-key") for h in reader.head].index(key)


needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                                    "(apt-get install chromium; .ci/run installs it)")


# ----------------------------------------------------------------------------
# What the tracker leaves for the report


def test_tracker_records_failures_and_clears_them_on_success(report_folder):
    out = report_folder["out"]
    assert [o.status for o in report_folder["failed"]] == ["failed", "failed"]
    for stem in ("broken", "empty"):
        record = json.loads(failure_path(out, stem).read_text())
        assert record["video"].endswith(f"{stem}.mp4")
        assert str(report_folder["data"] / f"{stem}.mp4") in record["error"]
        assert record["error_type"] == "VideoError"
        assert not (out / stem).exists()
    assert [o.status for o in report_folder["tracked"]] == ["done"]
    assert not failure_path(out, "talking_head").exists(), "a success must remove the earlier failure record"


def test_tracker_stores_per_frame_reprojection_errors(report_folder):
    folder = report_folder["out"] / "talking_head"
    meta = json.loads((folder / "meta.json").read_text())
    with np.load(folder / "tracking.npz") as d:
        e68, edense = d["reprojection_error_68_px"], d["reprojection_error_dense_px"]
    valid = report_folder["valid"]
    assert e68.shape == edense.shape == (40,)
    assert np.isnan(e68[~valid]).all() and np.isfinite(e68[valid]).all()
    # Every valid frame has all 68 points, so the mean of the per-frame means
    # is meta.json's mean over all points.
    np.testing.assert_allclose(e68[valid].mean(), meta["quality"]["mean_error_68_px"], rtol=1e-4)
    assert abs(np.nanmean(edense) - meta["quality"]["mean_error_dense_px"]) < 0.1 * meta["quality"][
        "mean_error_dense_px"]
    # Jitter over the runs between invalid frames (it was NaN with any gap).
    q = meta["quality"]
    assert np.isfinite(q["jitter_68_fitted_px"]) and np.isfinite(q["jitter_68_detected_px"])
    assert q["jitter_68_fitted_px"] < q["jitter_68_detected_px"], "the smoother takes out detector noise"


# ----------------------------------------------------------------------------
# Reading and judging the folder


def test_collect_finds_every_video_once(report_folder):
    entries = {e.name: e for e in collect(report_folder["out"])}
    expected = {**{n: "done" for n in SYNTHETIC}, "talking_head": "done", "broken": "failed", "empty": "failed",
                "clip_killed": "incomplete"}
    assert {n: e.status for n, e in entries.items()} == expected
    assert "not a readable video" in entries["broken"].reason or "truncated" in entries["broken"].reason
    assert entries["clip_killed"].reason == "meta.json missing"
    assert entries["clip_f"].values["valid_share"] == pytest.approx(0.6)
    # One result folder on its own is a folder of one.
    assert [(e.name, e.status) for e in collect(report_folder["out"] / "clip_a")] == [("clip_a", "done")]


def test_completeness_against_the_input_lists_missing_videos(report_folder, tmp_path):
    data = tmp_path / "videos"
    shutil.copytree(report_folder["data"], data)
    clips.write_empty(data / "later" / "never_run.mp4")
    entries = {e.name: e for e in collect(report_folder["out"], data=data)}
    assert entries["later/never_run"].status == "missing"
    assert entries["broken"].status == "failed"


def test_robust_z_and_outlier_flags(report_folder):
    z = robust_z([2.0, 2.1, 2.2, 2.3, 2.4, 9.0])
    assert z[-1] > OUTLIER_Z and (np.abs(z[:-1]) < 2).all()
    # More than half equal: the mean absolute deviation stands in for the MAD.
    z = robust_z([1.0, 1.0, 1.0, 1.0, 1.0, 0.6])
    assert z[-1] < -OUTLIER_Z and (z[:-1] == 0).all()
    assert np.isnan(robust_z([1.0, 2.0, 50.0])).all(), "three values are no distribution"
    assert (np.abs(robust_z([2.00, 2.01, 2.00, 2.01, 2.05], floor=0.1)) < 1).all(), "the floor ignores trifles"
    entries = {e.name: e for e in collect(report_folder["out"])}
    flag_outliers(list(entries.values()))
    assert set(entries["batch2/clip_e"].outliers) == {"error_68_px", "error_dense_px"}
    assert set(entries["clip_f"].outliers) == {"valid_share"}
    for name in ("clip_a", "clip_b", "clip_c", "batch2/clip_d"):
        assert entries[name].outliers == {}, name


def test_head_angles_recover_known_rotations():
    angles = _angles(60, 0.7)
    np.testing.assert_allclose(head_angles_deg(_rotation_from_angles(angles)), angles, atol=1e-6)
    # Meaning of the signs in the camera: +20 deg yaw turns the face (FLAME
    # +z) toward the image's right (+x), +20 deg pitch down (+y in OpenCV).
    R = _rotation_from_angles(np.array([[20.0, 0, 0], [0, 20.0, 0]]))
    face = R @ np.array([0.0, 0.0, 1.0])
    assert face[0, 0] > 0.3 and face[1, 1] > 0.3
    assert np.isnan(head_angles_deg(np.full((1, 3, 3), np.nan))).all()


# ----------------------------------------------------------------------------
# The page


def test_report_is_self_contained(report_html):
    path, _ = report_html
    text = path.read_text()
    assert not re.search(r"(?i)\b(?:https?|ftp|wss?):|//[a-z0-9.-]+\.[a-z]{2,}/", text), "an external URL"
    assert not re.search(r"(?i)<link\b|<script[^>]+\bsrc\s*=|@import|url\(", text)
    sources = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', text)
    assert sources and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,", "#v"))
                           for s in sources), {s[:40] for s in sources}


def test_thumbnail_of_the_visualization(report_html):
    from PIL import Image

    path, _ = report_html
    text = path.read_text()
    section = text[text.index('<h3>clip_a</h3>'):]
    section = section[:section.index("</section>")]
    jpeg = re.search(r'src="data:image/jpeg;base64,([^"]+)"', section)
    assert jpeg, "clip_a has a visualization.mp4 but no thumbnail"
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(jpeg.group(1)))).convert("RGB"), np.float64)
    assert image.shape[0] == 170 and abs(image.shape[1] - 3 * 170) <= 1
    middle = image[:, image.shape[1] // 3 + 5: 2 * image.shape[1] // 3 - 5].mean((0, 1))
    assert middle[1] > 150 and middle[0] < 60 and middle[2] < 60, middle
    # The frame from the middle of the clip, not its first keyframe: frame k's
    # side panels are grey level 40 k.
    k = int(re.search(r"frame (\d+)", section).group(1))
    assert abs(k - T_SYN // 2) <= 1
    side = image[:, 5: image.shape[1] // 3 - 5].mean()
    assert abs(side - (40 * k) % 255) < 12, (k, side)
    other = text[text.index('<h3>clip_b</h3>'):]
    assert "data:image/jpeg" not in other[:other.index("</section>")]
    assert "no visualization.mp4" in other[:other.index("</section>")]


@needs_chromium
def test_rendered_table_in_chromium(report_html, report_folder, tmp_path):
    path, entries = report_html
    dom = _dump_dom(path, tmp_path)
    rows = {r["cells"][0]["text"].strip(): r for r in dom.rows}
    assert set(rows) == {e.name for e in entries}
    assert len(rows) == 10
    status = {n: r["cells"][_column(dom, "status")]["text"].strip() for n, r in rows.items()}
    assert status["broken"] == status["empty"] == "failed" and status["clip_killed"] == "incomplete"
    assert sum(s == "done" for s in status.values()) == 7
    note = _column(dom, "note")
    assert "broken.mp4" in rows["broken"]["cells"][note]["text"]
    # Figures as meta.json has them.
    for name, figures in SYNTHETIC.items():
        cells = rows[name]["cells"]
        assert cells[_column(dom, "error_68_px")]["text"] == f"{figures[0]:.2f}"
        assert cells[_column(dom, "frames")]["text"] == str(T_SYN)
        assert cells[_column(dom, "valid_share")]["text"].replace("\xa0", " ") == f"{100 * figures[7]:.1f} %"
        assert cells[_column(dom, "jitter_ratio")]["text"].startswith(f"{figures[2]:.2f} / {figures[3]:.2f}")
    real = json.loads((report_folder["out"] / "talking_head" / "meta.json").read_text())
    assert rows["talking_head"]["cells"][_column(dom, "error_68_px")]["text"] == \
        f"{real['quality']['mean_error_68_px']:.2f}"
    # Outliers are marked in the cells and named in the row.
    outlier_cols = lambda n: {dom.head[i]["attrs"]["data-key"] for i, c in enumerate(rows[n]["cells"])  # noqa: E731
                              if "outlier" in c["attrs"].get("class", "")}
    assert outlier_cols("batch2/clip_e") == {"error_68_px", "error_dense_px"}
    assert outlier_cols("clip_f") == {"valid_share"}
    assert outlier_cols("clip_a") == set()
    assert "68-pt error" in rows["batch2/clip_e"]["cells"][note]["text"]


@needs_chromium
def test_sorting_by_clicking_headers_in_chromium(report_html, tmp_path):
    path, _ = report_html
    dom = _dump_dom(path, tmp_path, "?sort=error_68_px&order=desc")
    col = _column(dom, "error_68_px")
    assert dom.head[col]["attrs"].get("aria-sort") == "descending"
    values = [r["cells"][col]["attrs"]["data-v"] for r in dom.rows]
    numbers = [float(v) for v in values if v]
    assert numbers == sorted(numbers, reverse=True) and numbers[0] == 9.5
    assert all(v == "" for v in values[len(numbers):]), "rows without a figure go last"
    dom = _dump_dom(path, tmp_path, "?sort=name")
    names = [r["cells"][0]["text"].strip() for r in dom.rows]
    assert names == sorted(names) and names != [r["cells"][0]["text"].strip() for r in _dump_dom(path, tmp_path).rows]


@needs_chromium
def test_screenshot_for_a_person(report_html, tmp_path):
    path, _ = report_html
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    proc = subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path}",
                           "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1400,1000",
                           path.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.stat().st_size > 10_000, proc.stderr[-2000:]
    shutil.copy(path, ARTIFACTS / "report.html")


def test_damaged_files_are_rows_not_crashes(report_folder, tmp_path):
    """A truncated tracking.npz or -v video and a broken meta.json (a disk
    that filled up, a copy cut short) cost their plots, not the report."""
    out = tmp_path / "out"
    for name in ("clip_a", "clip_b", "clip_c"):
        shutil.copytree(report_folder["out"] / name, out / name)
    for path in (out / "clip_a" / "tracking.npz", out / "clip_a" / "visualization.mp4"):
        path.write_bytes(path.read_bytes()[:300])
    (out / "clip_b" / "meta.json").write_text('{"frames": ')
    path, entries = write_report(out)
    status = {e.name: (e.status, e.reason) for e in entries}
    assert status["clip_b"][0] == "incomplete" and "meta.json unreadable" in status["clip_b"][1]
    assert status["clip_a"][0] == status["clip_c"][0] == "done"
    text = path.read_text()
    section = text[text.index("<h3>clip_a</h3>"):]
    section = section[:section.index("</section>")]
    assert "tracking.npz unreadable" in section and "data:image" not in section
    assert "visualization.mp4 could not be decoded" in section
    assert "data:image/png" in text[text.index("<h3>clip_c</h3>"):]


# ----------------------------------------------------------------------------
# Command line


def test_report_command_and_its_exit_code(report_folder, tmp_path, capsys):
    out_file = tmp_path / "r.html"
    rc = main(["report", str(report_folder["out"]), "--out", str(out_file), "--plots", "none"])
    printed = capsys.readouterr().out
    assert rc == 1, "failed and incomplete videos make the check fail"
    assert "7 done, 2 failed, 1 incomplete, 0 missing" in printed and str(out_file) in printed
    assert out_file.exists() and "data:image/png" not in out_file.read_text()
    # A folder whose videos all finished passes.
    good = tmp_path / "good"
    for name in ("clip_a", "clip_b"):
        shutil.copytree(report_folder["out"] / name, good / name)
    assert main(["report", str(good), "--plots", "flagged"]) == 0
    assert (good / "report.html").exists()


def test_report_bad_folder_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == UsageError.exit_code
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere" in err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == UsageError.exit_code
    assert "no results" in capsys.readouterr().err
