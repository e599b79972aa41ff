"""Synthetic texture spaces with the key names and layout of the real files.

`FLAME_texture.npz` (TextureSpace.zip): `mean [H,W,3]` and `tex_dir [H,W,3,K]`
with values in 0..255 (BGR, as released), UVs `vt [N,2]` in 0..1 and
`ft [F,3]` indices into `vt`. The real file has H = W = 512 and K = 200.
`FLAME_albedo_from_BFM.npz` (DECA): `MU [1, H*W*3]`, `PC [H*W*3, K]` in 0..1.
Random values: enough for loaders and shape checks, not a face.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez would append '.npz' to a name
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def write_synthetic_texture(path: Path, size: int = 64, n_comp: int = 8, n_uv: int = 300,
                            n_faces: int = 500, seed: int = 0) -> Path:
    """Write a FLAME_texture.npz stand-in (keys mean, tex_dir, vt, ft) to `path`."""
    rng = np.random.default_rng(seed)
    mean = rng.uniform(60.0, 200.0, size=(size, size, 3)).astype(np.float32)
    tex_dir = rng.normal(0.0, 10.0, size=(size, size, 3, n_comp)).astype(np.float32)
    vt = rng.uniform(0.0, 1.0, size=(n_uv, 2))
    ft = rng.integers(0, n_uv, size=(n_faces, 3), dtype=np.int64)
    return _save_npz_atomic(path, mean=mean, tex_dir=tex_dir, vt=vt, ft=ft)


def write_synthetic_bfm_albedo(path: Path, size: int = 64, n_comp: int = 8, seed: int = 0) -> Path:
    """Write a FLAME_albedo_from_BFM.npz stand-in (keys MU, PC) to `path`."""
    rng = np.random.default_rng(seed)
    n = size * size * 3
    mu = rng.uniform(0.2, 0.8, size=(1, n)).astype(np.float32)
    pc = rng.normal(0.0, 0.05, size=(n, n_comp)).astype(np.float32)
    return _save_npz_atomic(path, MU=mu, PC=pc)
