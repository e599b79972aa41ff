"""The LMDB frame cache: `FaceVideo` (a video's face-centred crops and the
boxes they were cut with), filling the cache beside the first read of the
crops, reading it back, and cleaning up what killed writers left.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import queue
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import cv2
import lmdb
import numpy as np

from ..errors import VideoError
from ..progress import progress as progress_bar
from .crop import crop_video_frame
from .decode import decoded_frames, in_background

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_META_KEY = b"__meta__"


def _array_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def source_identity(path: Path) -> dict:
    """What a cache is checked against to be the same video: resolved path,
    size (bytes) and modification time (ns)."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class FaceVideo:
    """Face-centred crops of one video, stored in an LMDB cache.

    frame_ids: [T] int64 source frame index of each output frame.
    timestamps: [T] float64 seconds (presentation time from the first frame).
    fps: output frame rate (frames/s).
    crop_boxes: [T,4] float64 (x0, y0, x1, y1) in upright source pixels
        (pixel edges), square, may extend outside the frame.
    face_boxes: [T,4] float64 detector face boxes (source pixels), NaN where
        none was found; crop boxes of such frames are interpolated.
    face_found: [T] bool, whether the box detector saw a face in that frame.
    face_examined: [T] bool, whether the box detector ran on that frame.
    image_size: (H, W) of the crops. cache_path: the LMDB file.
    cache_fill: what writing the cache still needs, None once it is written
        (or when it was loaded from the cache).
    """

    source: Path
    frame_ids: np.ndarray
    timestamps: np.ndarray
    fps: float
    crop_boxes: np.ndarray
    image_size: tuple
    cache_path: Path
    face_boxes: np.ndarray = None
    face_found: np.ndarray = None
    face_examined: np.ndarray = None
    source_size: tuple = None  # (H, W) of the upright source frames
    _env: object = field(default=None, repr=False, compare=False)
    cache_fill: Optional["CacheFill"] = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.frame_ids)

    def _open(self):
        if self._env is None:
            try:
                self._env = lmdb.open(str(self.cache_path), readonly=True, lock=False,
                                      subdir=False, readahead=False)
            except lmdb.Error as exc:
                raise VideoError(f"{self.cache_path}: frame cache unreadable ({exc}); "
                                 "delete it to rebuild.") from None
        return self._env

    def frames(self, indices: Optional[Iterable[int]] = None) -> Iterator[np.ndarray]:
        """RGB uint8 [H,W,3] crops, in the order asked.

        While the cache is not written yet, all frames in order (no `indices`)
        come straight from the decoder as the cache is filled; asking for
        `indices` first fills the cache.
        """
        if self.cache_fill is not None and indices is None:
            return self._crops_while_caching()
        self.write_cache()
        return self._cached_frames(indices)

    def write_cache(self) -> None:
        """Decode, crop and store every frame in the cache, unless already done."""
        if self.cache_fill is not None:
            for _ in progress_bar(self._crops_while_caching(), total=len(self),
                                  desc=f"{self.source.name}: crop", enabled=self.cache_fill.progress):
                pass

    def _crops_while_caching(self) -> Iterator[np.ndarray]:
        yield from _crops_into_cache(self, self.cache_fill)
        self.cache_fill = None

    def _cached_frames(self, indices: Optional[Iterable[int]]) -> Iterator[np.ndarray]:
        env = self._open()
        if indices is None:
            indices = range(len(self))
        with env.begin(buffers=True) as txn:
            for i in indices:
                if not 0 <= i < len(self):
                    raise IndexError(f"frame {i} out of range 0..{len(self) - 1}")
                data = txn.get(f"{i:08d}".encode())
                if data is None:
                    raise VideoError(f"{self.cache_path}: frame {i} missing; delete the cache to rebuild.")
                yield _decode_image(bytes(data), self.image_size)

    def frame(self, i: int) -> np.ndarray:
        return next(self.frames([i]))

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


@dataclass
class CacheFill:
    """What pass 2 needs besides the FaceVideo: the decoding rate and the cache's contents."""

    fps: Optional[float]
    cache_format: str
    meta: bytes  # JSON, stored under _META_KEY
    arrays: bytes  # npz of the FaceVideo arrays
    progress: Optional[bool]

    @classmethod
    def encode(cls, *, fps: Optional[float], cache_format: str, meta: dict, arrays: dict,
               progress: Optional[bool]) -> "CacheFill":
        """The fill of a cache whose metadata is `meta` (JSON-able; its "key"
        is what `load_cache` checks) and whose FaceVideo arrays are `arrays`
        (name -> array), encoded now: a later change to the arrays does not
        reach the cache."""
        return cls(fps=fps, cache_format=cache_format, meta=json.dumps(meta).encode(),
                   arrays=_array_bytes(**arrays), progress=progress)


def decode_crops(face_video: FaceVideo, fps: Optional[float]) -> Iterator[np.ndarray]:
    """Decode the source again and crop the frames of `face_video` with its
    crop boxes: RGB uint8 [H,W,3] crops, in order, as they go into the cache
    (before its JPEG coding). fps: the rate `prepare` was given."""
    size = face_video.image_size[0]
    wanted = iter(zip(face_video.frame_ids, face_video.crop_boxes))
    want_id, want_box = next(wanted)
    n_out = 0
    for index, _, frame in decoded_frames(face_video.source, fps):
        if index != want_id:
            continue
        yield crop_video_frame(frame, want_box, size)
        n_out += 1
        nxt = next(wanted, None)
        if nxt is None:
            break
        want_id, want_box = nxt
    if n_out != len(face_video):
        raise VideoError(f"{face_video.source}: second decoding pass gave {n_out} of {len(face_video)} "
                         "frames; the file changed while reading; retry.")


def _write_cache(tmp_path: Path, crops: Iterable[np.ndarray], fill: CacheFill) -> int:
    """Encode `crops` into a new LMDB at `tmp_path` with the FaceVideo arrays; returns the count."""
    env = lmdb.open(str(tmp_path), subdir=False, lock=False, map_size=1 << 40,
                    writemap=False, meminit=False)
    try:
        n_out = 0
        txn = env.begin(write=True)
        for crop in crops:
            txn.put(f"{n_out:08d}".encode(), encode_crop(crop, fill.cache_format))
            n_out += 1
            if n_out % 256 == 0:
                txn.commit()
                txn = env.begin(write=True)
        txn.put(b"__arrays__", fill.arrays)
        txn.put(_META_KEY, fill.meta)
        txn.commit()
        env.sync(True)
    finally:
        env.close()
    return n_out


def _crops_into_cache(face_video: FaceVideo, fill: CacheFill) -> Iterator[np.ndarray]:
    """Yield the crops of `face_video` in order from a decoding thread while a
    writer thread JPEG-encodes them into a temporary LMDB, renamed into place
    once all frames are in (so an interrupted run leaves no partial cache)."""
    cache_path = face_video.cache_path
    # The host in the name lets a rerun on this host remove a killed writer's
    # file at once, while a cache folder shared by hosts keeps others' files.
    tmp_path = cache_path.with_name(cache_path.name + f".tmp-{os.getpid()}-{threading.get_ident()}@{socket.gethostname()}")
    to_write: queue.Queue = queue.Queue(maxsize=16)
    stored: list = []  # the writer's frame count, or its exception

    def crops_to_write():
        while (crop := to_write.get()) is not None:
            yield crop

    def write():
        try:
            stored.append(_write_cache(tmp_path, crops_to_write(), fill))
        except BaseException as exc:  # raised by the consumer below
            stored.append(exc)

    writer = threading.Thread(target=write, name="lightning_ft-cache-writer", daemon=True)

    def hand_over(item) -> None:
        # A writer that failed takes nothing more (it may have failed after
        # taking the end marker, at its last commit): never wait on it.
        while writer.is_alive():
            try:
                to_write.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    writer.start()
    complete = False
    try:
        for crop in in_background(decode_crops(face_video, fill.fps), maxsize=8,
                                   name="lightning_ft-crop"):
            if stored:
                break  # the writer failed; its error is raised below
            hand_over(crop)
            yield crop
        hand_over(None)
        writer.join()
        if isinstance(stored[0], BaseException):
            raise cache_write_error(stored[0], face_video.source, cache_path, tmp_path)
        os.replace(tmp_path, cache_path)
        complete = True
    finally:
        if not complete:
            # an error, or the consumer stopped early: no partial cache stays
            hand_over(None)
            writer.join()
            try:
                tmp_path.unlink(missing_ok=True)
            except OSError:  # its folder is gone or unusable: nothing was left there
                pass


def cache_write_error(exc: BaseException, source: Path, cache_path: Path, tmp_path: Path) -> BaseException:
    """The frame cache writer's failure as the error to raise: DiskFullError
    for a full disk or file-size limit, OutputError naming the cache for
    other LMDB or OS errors; anything else unchanged. tmp_path: the file
    being written (still there)."""
    from ..errors import DiskFullError, OutputError, disk_full_reason

    reason = disk_full_reason(exc, tmp_path)
    if reason is not None:
        return DiskFullError(f"{source}: {reason} in {cache_path.parent} while writing its frame cache")
    if isinstance(exc, (lmdb.Error, OSError)):
        return OutputError(f"{cache_path}: cannot write the frame cache ({exc}); check the --cache folder")
    return exc


def encode_crop(image: np.ndarray, cache_format: str) -> bytes:
    """A crop (RGB uint8 [H,W,3]) as the cache stores it: "raw" bytes or
    JPEG quality 95, behind a one-byte tag."""
    if cache_format == "raw":
        return b"R" + image.tobytes()
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise VideoError("JPEG encoding of a crop failed")
    return b"J" + data.tobytes()


def _decode_image(data: bytes, image_size) -> np.ndarray:
    if data[:1] == b"R":
        return np.frombuffer(data, dtype=np.uint8, offset=1).reshape(*image_size, 3).copy()
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8, offset=1), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# A cache temporary whose writer is not a live process here is removed once
# it is this old (another host sharing the cache folder writes it at every
# 256th frame at least); any is removed after STALE_TMP_ANY_SECONDS.
STALE_TMP_SECONDS = 600.0
STALE_TMP_ANY_SECONDS = 6 * 3600.0


def remove_stale_cache_temporaries(cache_dir: Path) -> int:
    """Delete `*.lmdb.tmp-<pid>-<thread>@<host>` files killed runs left in
    `cache_dir`: at once where the writer ran on this host and is gone; a
    file of another host (or of an older version, without a host) when its
    pid is not running here and it is STALE_TMP_SECONDS old, or when it is
    STALE_TMP_ANY_SECONDS old. Returns the bytes freed."""
    import time

    freed = 0
    now = time.time()
    here = socket.gethostname()
    for tmp in Path(cache_dir).glob("*.lmdb.tmp-*"):
        try:
            st = tmp.stat()
            owner, _, host = tmp.name.rsplit(".tmp-", 1)[1].partition("@")
            pid = int(owner.split("-")[0])
        except (OSError, ValueError, IndexError):
            continue
        age = now - st.st_mtime
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if host == here:
            stale = not alive
        else:
            stale = (age > STALE_TMP_SECONDS and not alive and not host) or age > STALE_TMP_ANY_SECONDS
        if stale:
            try:
                tmp.unlink()
                freed += st.st_size
            except OSError:
                pass
    return freed


def cache_file(path: Path, cache_dir: Path) -> Path:
    """The LMDB file that caches `path`'s crops: one per source path."""
    digest = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{Path(path).stem}-{digest}.lmdb"


def load_cache(cache_path: Path, expected: dict) -> Optional[FaceVideo]:
    """The FaceVideo stored at `cache_path`, or None when there is none, it is
    unreadable or incomplete, or its key differs from `expected`."""
    if not cache_path.exists():
        return None
    try:
        env = lmdb.open(str(cache_path), readonly=True, lock=False, subdir=False)
    except lmdb.Error as exc:
        log.warning("%s: unreadable frame cache (%s); rebuilding", cache_path, exc)
        return None
    with env.begin() as txn:
        meta_raw = txn.get(_META_KEY)
        arrays_raw = txn.get(b"__arrays__")
    env.close()
    if meta_raw is None or arrays_raw is None:
        return None
    meta = json.loads(meta_raw)
    if meta.get("key") != expected:
        log.info("%s: cache is for another video version or settings; rebuilding", cache_path)
        return None
    arrays = np.load(io.BytesIO(arrays_raw))
    return FaceVideo(source=Path(expected["source"]["path"]), frame_ids=arrays["frame_ids"],
                     timestamps=arrays["timestamps"], fps=meta["fps"],
                     crop_boxes=arrays["crop_boxes"], image_size=tuple(meta["image_size"]),
                     cache_path=cache_path, face_boxes=arrays["face_boxes"],
                     face_found=arrays["face_found"], face_examined=arrays["face_examined"],
                     source_size=tuple(meta["source_size"]))
