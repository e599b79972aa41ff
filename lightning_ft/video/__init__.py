"""The input stage: decoding (`decode`), face boxes (`faceboxes`), the
face-centred crop (`crop`), the LMDB frame cache (`cache`), and `prepare`,
which runs them over a video.

Pixel convention used throughout: pixel centres at integer coordinates
(OpenCV), x right, y down. A crop box ``(x0, y0, x1, y1)`` spans source
pixel *edges*, so crop pixel ``(u, v)`` of an ``S x S`` crop has its centre
at source ``x = x0 + (u + 0.5) * (x1 - x0) / S - 0.5`` (see `crop_to_source`).
"""

from .cache import (CACHE_VERSION, STALE_TMP_ANY_SECONDS, STALE_TMP_SECONDS, CacheFill, FaceVideo,
                    cache_file, cache_write_error, decode_crops, encode_crop, load_cache,
                    remove_stale_cache_temporaries, source_identity)
from .crop import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, crop_frame, crop_to_source, crop_video_frame, smooth_crop_boxes
from .decode import (FALLBACK_FPS, VideoInfo, count_frames, decoded_frames, frame_rotation, frame_to_rgb,
                     in_background, is_even_yuv420, iter_frames, probe, upright_size, yuv420_to_rgb)
from .faceboxes import (DETECT_MAX_SIDE, NEAR_GROW, NEAR_SIDE, BlazeFace, FaceBoxDetector,
                        detect_face_box, detect_face_box_near, detect_face_boxes, find_face_box)
from .prepare import BOX_MOVED, prepare

__all__ = [
    "BOX_MOVED", "CACHE_VERSION", "DETECT_MAX_SIDE", "MAX_IMAGE_SIZE", "MIN_IMAGE_SIZE", "NEAR_GROW", "NEAR_SIDE",
    "STALE_TMP_ANY_SECONDS", "STALE_TMP_SECONDS", "BlazeFace", "CacheFill", "FaceBoxDetector",
    "FaceVideo", "VideoInfo", "cache_file", "cache_write_error", "count_frames", "crop_frame",
    "crop_to_source", "crop_video_frame", "decode_crops", "decoded_frames", "detect_face_box",
    "detect_face_box_near", "detect_face_boxes", "encode_crop", "find_face_box", "frame_rotation",
    "frame_to_rgb", "in_background", "is_even_yuv420", "iter_frames", "load_cache", "prepare",
    "probe", "remove_stale_cache_temporaries", "smooth_crop_boxes", "source_identity",
    "upright_size", "yuv420_to_rgb",
]
