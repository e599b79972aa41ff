"""Session-scoped synthetic assets shared by the test modules."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from lightning_ft.runtime import configure_threads

# Two cores: keep torch from oversubscribing when several tests run torch ops.
os.environ.setdefault("OMP_NUM_THREADS", "2")
configure_threads()  # as the CLI does, before any test imports torch

REPO = Path(__file__).resolve().parents[1]
REAL_EMBEDDING_ZIP = REPO.parent / "shared" / "real-assets" / "FLAME_embedding.zip"


@pytest.fixture(scope="session")
def flame_files(tmp_path_factory):
    """A small procedural FLAME-format model (chumpy pickle, DECA and
    mediapipe embeddings) plus a plain-numpy copy that smplx reads."""
    from lightning_ft.synthetic.flame_files import write_synthetic_flame

    return write_synthetic_flame(tmp_path_factory.mktemp("flame"), n_vertices=1200, seed=0, smplx_copy=True)


@pytest.fixture(scope="session")
def flame_model(flame_files):
    from lightning_ft.flame import FLAME

    return FLAME(flame_files.model, flame_files.landmark_embedding, flame_files.mediapipe_embedding)


@pytest.fixture(scope="session")
def real_embedding_dir(tmp_path_factory):
    """The real FLAME embedding files (third-party, from ../shared), unpacked;
    None when this checkout has no shared/ beside it."""
    if not REAL_EMBEDDING_ZIP.exists():
        return None
    out = tmp_path_factory.mktemp("real_embedding")
    with zipfile.ZipFile(REAL_EMBEDDING_ZIP) as z:
        z.extractall(out)
    return next(p.parent for p in out.rglob("landmark_embedding.npy"))


@pytest.fixture(scope="session")
def assets_dir(tmp_path_factory, flame_files):
    """A complete assets/ folder (FLAME tier) with the procedural model."""
    import shutil

    root = tmp_path_factory.mktemp("assets")
    (root / "FLAME").mkdir()
    for p in (flame_files.model, flame_files.landmark_embedding, flame_files.mediapipe_embedding):
        shutil.copy(p, root / "FLAME" / p.name)
    return root


def _shipped_ict():
    from lightning_ft.head_model import load_ict

    return load_ict()


@pytest.fixture(scope="module")
def ict(flame_model):
    """The shipped ICT model (lightning_ft/data/ict)."""
    return _shipped_ict()


@pytest.fixture(scope="module")
def standin(flame_model):
    """An ICT-like model on the procedural FLAME head (tests/ict_standin.py)."""
    from ict_standin import StandInICT
    from lightning_ft.head_model import ICTHeadModel

    return ICTHeadModel(StandInICT(flame_model))
