"""Video decoding, face boxes, face-centred crop and the LMDB frame cache."""

from .decode import *  # noqa: F401,F403  (split by concern in the next commit)
