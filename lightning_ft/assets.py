"""Model files: what the tracker needs, whether it is there, and fetching it.

Layout (the original tool's README; see docs/assets.md for sources):

    assets/
      FLAME/generic_model.pkl                  flame tier      FLAME2020.zip (FLAME account)
      FLAME/landmark_embedding.npy             flame tier      FLAME_embedding.zip
      FLAME/mediapipe_landmark_embedding.npz   flame tier      FLAME_embedding.zip
      EMOCA/EMOCA_v2_lr_mse_20/                emoca tier      EMOCA_v2_lr_mse_20.zip (no login)
      FLAME/FLAME_texture.npz                  synthesis tier  TextureSpace.zip (FLAME account)
        (or DECA's FLAME_albedo_from_BFM.npz)

Tiers are cumulative: every run needs `flame`; runs without `--no-emoca` also
need `emoca`; `--synthesis` also needs `synthesis`.

`check` validates structure with the real loaders (`deep=True`) or with cheap
header reads (`deep=False`); it never loads the 400 MB EMOCA checkpoint nor
the 600 MB texture space. `fetch` downloads into a hidden temporary file in
the assets folder, verifies it, unpacks into a hidden temporary folder,
validates the unpacked files and only then moves them into place with
`os.replace`, so an interrupted fetch leaves nothing that looks finished.
"""

from __future__ import annotations

import getpass
import hashlib
import io
import logging
import os
import pickletools
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np

from .errors import AssetError, LightningFTError, UsageError
from .progress import progress as progress_bar

log = logging.getLogger(__name__)

ENV_ASSETS = "LIGHTNING_FT_ASSETS"
ENV_DOWNLOAD_BASE = "LIGHTNING_FT_DOWNLOAD_BASE"  # replaces scheme://host of every URL
ENV_URL_PREFIX = "LIGHTNING_FT_URL_"  # + item name in capitals: the full URL of one item
ENV_FLAME_USERNAME = "FLAME_USERNAME"
ENV_FLAME_PASSWORD = "FLAME_PASSWORD"

TIERS = ("flame", "emoca", "synthesis")
TIER_LABELS = {"flame": "FLAME", "emoca": "EMOCA", "synthesis": "synthesis"}
TIER_NEEDED_BY = {
    "flame": "every run",
    "emoca": "EMOCA initialisation; skip with --no-emoca",
    "synthesis": "--synthesis only",
}
EMOCA_RELEASE = "EMOCA_v2_lr_mse_20"

# Every file name the tracker reads from an assets folder (relative to it),
# or from another library's model folder: the one place they are spelled.
FLAME_MODEL = "FLAME/generic_model.pkl"
FLAME_LANDMARK_EMBEDDING = "FLAME/landmark_embedding.npy"
FLAME_MEDIAPIPE_EMBEDDING = "FLAME/mediapipe_landmark_embedding.npz"
FLAME_TEXTURE = "FLAME/FLAME_texture.npz"
BFM_ALBEDO = "FLAME/FLAME_albedo_from_BFM.npz"
FLAME_TEMPLATE_OBJ = "FLAME/head_template_mesh.obj"
FAN_WEIGHTS_FILE = "2DFAN4-11f355bf06.pth.tar"  # in torch.hub's checkpoints folder
DLIB_PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"  # in the face_recognition_models package

# Pickled header of a legacy (pre-zip) torch checkpoint: protocol 2, LONG1 of
# torch's serialization magic number 0x1950a86a20f9469cfc6c.
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_CHUNK = 1 << 20
LICENCE_NOTICE = ("These files are licensed by their authors: by fetching them you accept the FLAME licence "
                  "(https://flame.is.tue.mpg.de) and, for EMOCA, the EMOCA licence (https://emoca.is.tue.mpg.de).")


# ----------------------------------------------------------------------------
# Download sources: the single table to edit when a host moves.


@dataclass(frozen=True)
class Download:
    """One downloadable archive and the files it provides.

    installs: (member, destination) pairs; `member` is a file or folder name
    looked up anywhere inside the archive, `destination` is relative to the
    assets folder. `optional` members are installed when the archive has them.
    needs_account: POST `username`/`password` form fields (the FLAME site).
    size/sha256: of the archive, where known (None: not pinned).
    """

    item: str
    url: str
    archive: str
    installs: Tuple[Tuple[str, str], ...]
    needs_account: bool = False
    optional: Tuple[Tuple[str, str], ...] = ()
    size: Optional[int] = None
    sha256: Optional[str] = None
    source: str = ""


DOWNLOADS: Dict[str, Download] = {
    "emoca": Download(
        item="emoca",
        url="https://download.is.tue.mpg.de/emoca/assets/EMOCA/models/EMOCA_v2_lr_mse_20.zip",
        archive="EMOCA_v2_lr_mse_20.zip",
        installs=((EMOCA_RELEASE, f"EMOCA/{EMOCA_RELEASE}"),),
        source="xg-chu/LightningFT README.md; radekd91/emoca gdl_apps/EMOCA/demos/download_assets.sh",
    ),
    "flame": Download(
        item="flame",
        url="https://download.is.tue.mpg.de/download.php?domain=flame&sfile=FLAME2020.zip&resume=1",
        archive="FLAME2020.zip",
        installs=(("generic_model.pkl", FLAME_MODEL),),
        optional=(("Readme.pdf", "FLAME/Readme_FLAME.pdf"),),
        needs_account=True,
        source="xg-chu/LightningFT README.md; yfeng95/DECA fetch_data.sh",
    ),
    "texture": Download(
        item="texture",
        url="https://download.is.tue.mpg.de/download.php?domain=flame&resume=1&sfile=TextureSpace.zip",
        archive="TextureSpace.zip",
        installs=(("FLAME_texture.npz", FLAME_TEXTURE),),
        optional=(("Readme.pdf", "FLAME/Readme_Texture.pdf"),),
        needs_account=True,
        source="xg-chu/LightningFT README.md",
    ),
    "embedding": Download(
        item="embedding",
        # The archive the original tool's README unzips into assets/FLAME,
        # committed in its repository at this revision.
        url=("https://github.com/xg-chu/LightningFT/raw/197189367a5e6db8777982adeeab5ff1e320f249/"
             "assets/FLAME_embedding.zip"),
        archive="FLAME_embedding.zip",
        installs=(("landmark_embedding.npy", FLAME_LANDMARK_EMBEDDING),
                  ("mediapipe_landmark_embedding.npz", FLAME_MEDIAPIPE_EMBEDDING)),
        optional=(("FLAME_masks.pkl", "FLAME/FLAME_masks.pkl"),
                  ("head_template_mesh.obj", FLAME_TEMPLATE_OBJ),
                  ("embedding_readme.txt", "FLAME/embedding_readme.txt")),
        size=219459,
        sha256="916d9b9bf53f52ee191e0610d250a7eea970517195975eb25d8d6e0c2803d605",
        source="xg-chu/LightningFT assets/FLAME_embedding.zip (README: unzip into assets/FLAME)",
    ),
}
FETCH_ITEMS = tuple(DOWNLOADS)


def download_url(download: Download) -> str:
    """The URL to use for `download`: `$LIGHTNING_FT_URL_<ITEM>` if set, else the
    table's URL with its scheme and host replaced by `$LIGHTNING_FT_DOWNLOAD_BASE`."""
    full = os.environ.get(ENV_URL_PREFIX + download.item.upper())
    if full:
        return full
    base = os.environ.get(ENV_DOWNLOAD_BASE)
    if not base:
        return download.url
    parsed, new = urllib.parse.urlsplit(download.url), urllib.parse.urlsplit(base.rstrip("/"))
    if not new.scheme or not new.netloc:
        raise UsageError(f"${ENV_DOWNLOAD_BASE}={base!r} is not a URL like http://host:port; fix or unset it")
    return urllib.parse.urlunsplit((new.scheme, new.netloc, new.path + parsed.path, parsed.query, ""))


# ----------------------------------------------------------------------------
# What the tracker needs


@dataclass
class AssetStatus:
    """The state of one required file or folder.

    name: path relative to the assets folder ('FLAME/generic_model.pkl').
    kind: what it is, in words. tier: 'flame' | 'emoca' | 'synthesis'.
    state: 'present' | 'missing' | 'corrupt'. detail: what was found (sizes,
    or why it is corrupt). how_to_get: one sentence for the user.
    """

    name: str
    kind: str
    tier: str
    state: str
    detail: str
    how_to_get: str


Validator = Callable[[Path, bool], str]


@dataclass(frozen=True)
class AssetSpec:
    name: str
    kind: str
    tier: str
    item: str
    how_to_get: str
    validate: Validator  # (path, deep) -> detail; raises AssetError when malformed
    alternatives: Tuple[Tuple[str, str], ...] = ()  # (name, kind) accepted instead
    misplaced: Tuple[str, ...] = ()  # where users put it by following other READMEs


def _fetch_hint(archive: str, into: str) -> str:
    return f"run 'lightning-ft assets fetch' (or unzip {archive} into assets/{into})"


def _human_size(n_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def _ckpt_candidates(folder: Path) -> List[Path]:
    return sorted(folder.rglob("*.ckpt"))


# --- validators: each returns a short description of what it found ----------


def _npy_header(fp) -> Tuple[Tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        shape, _, dtype = np.lib.format._read_array_header(fp, version)  # 3.0: utf8 header
    return tuple(shape), dtype


def npz_headers(path: Path) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an .npz, read from the member headers
    only (an .npz cannot be memory-mapped; the texture space is ~600 MB)."""
    try:
        with zipfile.ZipFile(path) as archive:
            headers = {}
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    headers[info.filename[:-4]] = _npy_header(member)
            return headers
    except FileNotFoundError:
        raise AssetError(f"{path}: file not found")
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise AssetError(f"{path}: not a readable .npz ({type(exc).__name__}: {exc})") from None


def _check_pickle_ends(path: Path) -> None:
    """Cheap structure test: a pickle opens with PROTO (protocol >= 2) or a
    protocol-0 opcode and ends with STOP; truncation removes the STOP."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(max(size - 1, 0))
        tail = f.read(1)
    opens = len(head) == 2 and ((head[0] == 0x80 and 2 <= head[1] <= 5) or head[:1] in (b"(", b"}", b"]", b"c"))
    if not opens or tail != b".":
        raise AssetError(f"{path}: not a complete pickle (truncated or not a pickle); download it again")


def _validate_flame_model(path: Path, deep: bool) -> str:
    if not deep:
        _check_pickle_ends(path)
        return f"pickle, {_human_size(path.stat().st_size)} (structure not loaded)"
    from .flame import load_flame_model

    model = load_flame_model(path)
    return (f"{model.v_template.shape[0]} vertices, {model.faces.shape[0]} faces, "
            f"{model.shapedirs.shape[2]} blendshapes")


def _validate_landmark_embedding(path: Path, deep: bool) -> str:
    if not deep:
        with open(path, "rb") as f:
            try:
                shape, dtype = _npy_header(f)
            except ValueError as exc:
                raise AssetError(f"{path}: not a .npy file ({exc}); download it again") from None
        if dtype != np.dtype(object) or shape != ():
            raise AssetError(f"{path}: expected a pickled dict in a 0-d object array, found {dtype} {shape}")
        return ".npy object array (structure not loaded)"
    from .flame import load_landmark_embedding

    emb = load_landmark_embedding(path)
    return f"51 static + 17 contour points, {emb.dynamic_faces.shape[0]} yaw rows"


def _validate_mediapipe_embedding(path: Path, deep: bool) -> str:
    if not deep:
        headers = npz_headers(path)
        missing = [k for k in ("lmk_face_idx", "lmk_b_coords", "landmark_indices") if k not in headers]
        if missing:
            raise AssetError(f"{path}: not a mediapipe embedding, missing keys {', '.join(missing)}")
        shape = headers["lmk_face_idx"][0]
        return f"{shape[0] if shape else 0} points (arrays not loaded)"
    from .flame import load_mediapipe_embedding

    emb = load_mediapipe_embedding(path)
    return f"{emb.faces.shape[0]} points"


def _validate_texture(path: Path, deep: bool) -> str:
    """FLAME_texture.npz: mean [H,W,3], tex_dir [H,W,3,K], vt [N,2], ft [F,3];
    or DECA's FLAME_albedo_from_BFM.npz: MU (H*W*3 values), PC (H*W*3 x K)."""
    headers = npz_headers(path)
    shape = {k: v[0] for k, v in headers.items()}
    if "tex_dir" in shape or "mean" in shape:
        missing = [k for k in ("mean", "tex_dir", "vt", "ft") if k not in shape]
        if missing:
            raise AssetError(f"{path}: not a FLAME texture space, missing keys {', '.join(missing)}")
        mean, tex_dir, vt, ft = shape["mean"], shape["tex_dir"], shape["vt"], shape["ft"]
        if len(mean) != 3 or mean[2] != 3 or len(tex_dir) != 4 or tex_dir[:3] != mean:
            raise AssetError(f"{path}: texture space has mean {list(mean)} and tex_dir {list(tex_dir)}, "
                             "expected [H,W,3] and [H,W,3,K]")
        if len(vt) != 2 or vt[1] != 2 or len(ft) != 2 or ft[1] != 3:
            raise AssetError(f"{path}: texture UVs have vt {list(vt)} and ft {list(ft)}, expected [N,2] and [F,3]")
        return f"{mean[0]}x{mean[1]} texture, {tex_dir[3]} components, {vt[0]} UVs"
    if "MU" in shape and "PC" in shape:
        n_mean = int(np.prod(shape["MU"]))
        n_basis = int(np.prod(shape["PC"]))
        side = int(round((n_mean / 3) ** 0.5))
        if n_mean == 0 or n_mean % 3 or side * side * 3 != n_mean or n_basis % n_mean:
            raise AssetError(f"{path}: BFM albedo has MU {list(shape['MU'])} and PC {list(shape['PC'])}, "
                             "expected H*W*3 values and H*W*3 x K")
        return f"BFM albedo, {side}x{side} texture, {n_basis // n_mean} components"
    raise AssetError(f"{path}: not a texture space (needs keys mean/tex_dir/vt/ft, or MU/PC)")


def _checkpoint_structure(path: Path, deep: bool) -> str:
    """A torch checkpoint, recognised without unpickling it: the zip format
    (`<name>/data.pkl` + tensor records) or the legacy pickled format."""
    with open(path, "rb") as f:
        head = f.read(len(_TORCH_LEGACY_MAGIC))
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                data_pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                if not data_pkl:
                    raise AssetError(f"{path}: a zip without data.pkl, not a torch checkpoint; download it again")
                if not deep:
                    return "torch zip checkpoint"
                pickled = archive.read(data_pkl[0])
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise AssetError(f"{path}: damaged torch checkpoint ({exc}); download it again") from None
        streams = [io.BytesIO(pickled)]
        fmt = "torch zip checkpoint"
    elif head == _TORCH_LEGACY_MAGIC:
        if not deep:
            return "legacy torch checkpoint"
        # legacy layout: magic number, protocol version, sys info, then the object
        stream = open(path, "rb")
        streams = [stream] * 4
        fmt = "legacy torch checkpoint"
    else:
        raise AssetError(f"{path}: not a torch checkpoint (neither zip nor legacy format); download it again")
    # Walk the opcodes without executing them: no class is imported.
    try:
        for stream in streams:
            for opcode, arg, _ in pickletools.genops(stream):
                if isinstance(arg, str) and arg == "state_dict":
                    return f"{fmt} with a state_dict"
    except (ValueError, EOFError) as exc:  # pickletools reports short or unknown opcodes as ValueError
        raise AssetError(f"{path}: damaged checkpoint pickle ({exc}); download it again") from None
    finally:
        for stream in streams:
            stream.close()
    raise AssetError(f"{path}: checkpoint has no state_dict; expected a PyTorch Lightning checkpoint")


def _validate_emoca_release(folder: Path, deep: bool) -> str:
    if not folder.is_dir():
        raise AssetError(f"{folder}: expected the unzipped {EMOCA_RELEASE} folder, found a file")
    if not (folder / "cfg.yaml").is_file():
        raise AssetError(f"{folder}: no cfg.yaml; not a complete {EMOCA_RELEASE} release, unzip it again")
    ckpts = _ckpt_candidates(folder)
    if len(ckpts) != 1:
        found = ", ".join(str(p.relative_to(folder)) for p in ckpts) or "none"
        raise AssetError(f"{folder}: expected exactly one .ckpt below it, found {found}")
    fmt = _checkpoint_structure(ckpts[0], deep)
    return f"{ckpts[0].relative_to(folder).as_posix()} ({_human_size(ckpts[0].stat().st_size)}, {fmt})"


ASSET_SPECS: Tuple[AssetSpec, ...] = (
    AssetSpec(
        name=FLAME_MODEL, kind="FLAME 2020 model", tier="flame", item="flame",
        how_to_get=("register at flame.is.tue.mpg.de and run 'lightning-ft assets fetch' "
                    "(or unzip FLAME2020.zip into assets/FLAME)"),
        validate=_validate_flame_model,
    ),
    AssetSpec(
        name=FLAME_LANDMARK_EMBEDDING, kind="68-point landmark embedding (DECA format)",
        tier="flame", item="embedding",
        how_to_get=_fetch_hint("the original tool's FLAME_embedding.zip", "FLAME"),
        validate=_validate_landmark_embedding,
        misplaced=("FLAME/FLAME_embedding/landmark_embedding.npy",),
    ),
    AssetSpec(
        name=FLAME_MEDIAPIPE_EMBEDDING, kind="MediaPipe landmark embedding",
        tier="flame", item="embedding",
        how_to_get=_fetch_hint("the original tool's FLAME_embedding.zip", "FLAME"),
        validate=_validate_mediapipe_embedding,
        misplaced=("FLAME/FLAME_embedding/mediapipe_landmark_embedding.npz",),
    ),
    AssetSpec(
        name=f"EMOCA/{EMOCA_RELEASE}", kind="EMOCA v2 encoder release", tier="emoca", item="emoca",
        how_to_get=("run 'lightning-ft assets fetch' (no login; licence at emoca.is.tue.mpg.de; or unzip "
                    "EMOCA_v2_lr_mse_20.zip into assets/EMOCA), or track with --no-emoca"),
        validate=_validate_emoca_release,
        misplaced=(f"EMOCA/models/{EMOCA_RELEASE}",),
    ),
    AssetSpec(
        name=FLAME_TEXTURE, kind="FLAME texture space", tier="synthesis", item="texture",
        how_to_get=("register at flame.is.tue.mpg.de and run 'lightning-ft assets fetch' "
                    "(or unzip TextureSpace.zip into assets/FLAME); only --synthesis needs it"),
        validate=_validate_texture,
        alternatives=((BFM_ALBEDO, "BFM albedo in FLAME's UV space (DECA)"),),
    ),
)


def flame_files(assets_dir: Path) -> Dict[str, Path]:
    """The FLAME model's three files under an assets folder, as `flame.FLAME` takes them."""
    d = Path(assets_dir)
    return {"model": d / FLAME_MODEL, "landmark_embedding": d / FLAME_LANDMARK_EMBEDDING,
            "mediapipe_embedding": d / FLAME_MEDIAPIPE_EMBEDDING}


def texture_space_files(assets_dir: Path) -> Tuple[Path, Optional[Path]]:
    """The texture space --synthesis reads and, for one without UVs, the OBJ
    they come from. FLAME_texture.npz carries its UVs; DECA's
    FLAME_albedo_from_BFM.npz, which `check` accepts as well, is laid out in
    FLAME's UV map and takes the UVs from head_template_mesh.obj (as DECA
    does). Called before any work, so a missing piece costs no fitting."""
    d = Path(assets_dir)
    flame_texture, bfm, obj = d / FLAME_TEXTURE, d / BFM_ALBEDO, d / FLAME_TEMPLATE_OBJ
    if flame_texture.exists():
        return flame_texture, None
    if bfm.exists():
        if obj.exists():
            return bfm, obj
        raise AssetError(f"{bfm}: has no UVs of its own and {obj} is not there to give them (it comes with "
                         f"FLAME_embedding.zip); add it, or FLAME_texture.npz, or run without --synthesis")
    raise AssetError(f"{flame_texture}: not found; --synthesis reads FLAME's texture space (unzip TextureSpace.zip "
                     f"into assets/FLAME or run 'lightning-ft assets fetch --item texture'), or run without "
                     f"--synthesis")


def resolve_assets_dir(cli_value: Optional[Union[str, os.PathLike]]) -> Path:
    """The assets folder: the --assets value, else $LIGHTNING_FT_ASSETS, else ./assets."""
    if cli_value:
        return Path(cli_value).expanduser()
    env = os.environ.get(ENV_ASSETS)
    if env:
        return Path(env).expanduser()
    return Path("assets")


def _check_spec(assets_dir: Path, spec: AssetSpec, deep: bool) -> AssetStatus:
    candidates = ((spec.name, spec.kind),) + spec.alternatives
    for name, kind in candidates:
        path = assets_dir / name
        if not path.exists():
            continue
        try:
            detail = spec.validate(path, deep)
        except AssetError as exc:
            return AssetStatus(name, kind, spec.tier, "corrupt", str(exc), spec.how_to_get)
        except OSError as exc:
            return AssetStatus(name, kind, spec.tier, "corrupt", f"{path}: unreadable ({exc})", spec.how_to_get)
        return AssetStatus(name, kind, spec.tier, "present", detail, spec.how_to_get)
    detail = "not found"
    for wrong in spec.misplaced:
        if (assets_dir / wrong).exists():
            detail = f"not found, but {wrong} exists: move it to {spec.name}"
            break
    return AssetStatus(spec.name, spec.kind, spec.tier, "missing", detail, spec.how_to_get)


def check(assets_dir: Path, deep: bool = True) -> List[AssetStatus]:
    """The state of every file of every tier, in tier order.

    deep=True loads FLAME files with the real loaders and walks the EMOCA
    checkpoint's pickle opcodes; deep=False reads headers only.
    """
    assets_dir = Path(assets_dir)
    return [_check_spec(assets_dir, spec, deep) for spec in ASSET_SPECS]


def tiers_for(emoca: bool = True, synthesis: bool = False) -> Set[str]:
    """The tiers a run needs: FLAME always, EMOCA unless --no-emoca, texture for --synthesis."""
    return {"flame"} | ({"emoca"} if emoca else set()) | ({"synthesis"} if synthesis else set())


def _problem_lines(statuses: Iterable[AssetStatus]) -> List[str]:
    lines = []
    for s in statuses:
        if s.state == "missing":
            hint = "" if s.detail == "not found" else f" ({s.detail})"
            lines.append(f"  {s.name} — {s.kind}{hint}; {s.how_to_get}")
        elif s.state == "corrupt":
            lines.append(f"  {s.name} — {s.kind}, corrupt: {s.detail}; {s.how_to_get}")
    return lines


def require(assets_dir: Path, tiers: Set[str], deep: bool = False) -> None:
    """Stop before any work when a file of the needed `tiers` is missing or corrupt.

    Raises AssetError whose message is a header line, then one line per
    problem: what the file is and how to get it. deep=False (default) reads
    headers only, since the stages load the files right after.
    """
    unknown = set(tiers) - set(TIERS)
    if unknown:
        raise UsageError(f"unknown asset tier(s) {', '.join(sorted(unknown))}; expected some of {', '.join(TIERS)}")
    assets_dir = Path(assets_dir)
    specs = [s for s in ASSET_SPECS if s.tier in tiers]
    bad = [st for st in (_check_spec(assets_dir, s, deep) for s in specs) if st.state != "present"]
    if not bad:
        return
    bad_tiers = [t for t in TIERS if any(s.tier == t for s in bad)]
    label = " + ".join(TIER_LABELS[t] for t in bad_tiers) + (" tier" if len(bad_tiers) == 1 else " tiers")
    what = "missing assets" if all(s.state == "missing" for s in bad) else "missing or corrupt assets"
    raise AssetError("\n".join([f"{what} in {assets_dir} ({label}):"] + _problem_lines(bad)))


def format_report(statuses: Sequence[AssetStatus], assets_dir: Optional[Path] = None) -> str:
    """A plain-text table for `lightning-ft assets check`, then one verdict per tier."""
    lines = [f"assets in {Path(assets_dir).resolve()}" if assets_dir is not None else "assets", ""]
    name_w = max([len(s.name) for s in statuses] + [4])
    kind_w = max([len(s.kind) for s in statuses] + [4])
    lines.append(f"  {'state':<8} {'tier':<10} {'file':<{name_w}}  {'what':<{kind_w}}  detail")
    for s in statuses:
        lines.append(f"  {s.state:<8} {s.tier:<10} {s.name:<{name_w}}  {s.kind:<{kind_w}}  {s.detail}")
        if s.state != "present":
            lines.append(f"  {'':<8} {'':<10} {'':<{name_w}}  get it: {s.how_to_get}")
    lines.append("")
    for tier in TIERS:
        of_tier = [s for s in statuses if s.tier == tier]
        if not of_tier:
            continue
        n_missing = sum(s.state == "missing" for s in of_tier)
        n_corrupt = sum(s.state == "corrupt" for s in of_tier)
        verdict = "ready" if not (n_missing or n_corrupt) else ", ".join(
            part for part in (f"{n_missing} missing" if n_missing else "",
                              f"{n_corrupt} corrupt" if n_corrupt else "") if part)
        lines.append(f"{TIER_LABELS[tier]} tier ({TIER_NEEDED_BY[tier]}): {verdict}")
    return "\n".join(lines)


def main_check(assets_dir: Optional[Union[str, os.PathLike]] = None, deep: bool = True) -> int:
    """`lightning-ft assets check`: print the report; 0 when every tier is
    complete, AssetError.exit_code otherwise."""
    folder = resolve_assets_dir(assets_dir)
    statuses = check(folder, deep=deep)
    print(format_report(statuses, folder))
    return 0 if all(s.state == "present" for s in statuses) else AssetError.exit_code


# ----------------------------------------------------------------------------
# Fetching


@dataclass
class _Credentials:
    username: str
    password: str


def flame_credentials(username: Optional[str] = None, password: Optional[str] = None) -> _Credentials:
    """FLAME account: arguments, else $FLAME_USERNAME/$FLAME_PASSWORD, else an
    interactive prompt when stdin is a terminal; otherwise AssetError."""
    username = username or os.environ.get(ENV_FLAME_USERNAME)
    password = password or os.environ.get(ENV_FLAME_PASSWORD)
    if username and password:
        return _Credentials(username, password)
    if not sys.stdin.isatty():
        raise AssetError(
            f"the FLAME files need a FLAME account: set {ENV_FLAME_USERNAME} and {ENV_FLAME_PASSWORD} "
            "(register for free at https://flame.is.tue.mpg.de) or run 'lightning-ft assets fetch' in a terminal"
        )
    print("FLAME files need a (free) account from https://flame.is.tue.mpg.de", file=sys.stderr)
    username = username or input("FLAME username (e-mail): ").strip()
    password = password or getpass.getpass("FLAME password: ")
    if not username or not password:
        raise AssetError("no FLAME username/password given; the FLAME files were not downloaded")
    return _Credentials(username, password)


def _download(download: Download, url: str, dest_dir: Path, credentials: Optional[_Credentials],
              timeout: float, show_progress: Optional[bool]) -> Path:
    """Stream `url` into a hidden temporary file in `dest_dir` and verify its
    length, checksum and zip magic. Returns the temporary file; removes it on
    any failure (including KeyboardInterrupt)."""
    data = None
    if download.needs_account:
        assert credentials is not None
        data = urllib.parse.urlencode({"username": credentials.username,
                                       "password": credentials.password}).encode()
    request = urllib.request.Request(url, data=data, headers={"User-Agent": "lightning-ft"})
    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{download.archive}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if download.needs_account and exc.code in (401, 403):
                raise AssetError(
                    f"{url}: the FLAME site refused the account (HTTP {exc.code}) for {download.archive}; "
                    f"check {ENV_FLAME_USERNAME}/{ENV_FLAME_PASSWORD} and that you accepted the license "
                    "at flame.is.tue.mpg.de") from None
            raise AssetError(f"{url}: HTTP {exc.code} {exc.reason}; {download.archive} not downloaded") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AssetError(f"{url}: cannot download {download.archive} ({reason}); "
                             "check the network or the URL override") from None
        with response, os.fdopen(fd, "wb") as out:
            fd = -1
            expected = response.headers.get("Content-Length")
            expected = int(expected) if expected and expected.isdigit() else None
            content_type = response.headers.get("Content-Type", "")
            digest = hashlib.sha256()
            received = 0

            def chunks():
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except (OSError, ValueError) as exc:  # reset, timeout, IncompleteRead
                        raise AssetError(f"{url}: download of {download.archive} interrupted after "
                                         f"{received} bytes ({type(exc).__name__}); run the fetch again") from None
                    if not chunk:
                        return
                    yield chunk

            total = -(-expected // _CHUNK) if expected else None
            for chunk in progress_bar(chunks(), total=total, desc=download.archive, enabled=show_progress, unit="MB"):
                if received == 0 and not chunk.startswith(_ZIP_MAGIC):
                    page = "a web page" if "html" in content_type or chunk.lstrip()[:1] == b"<" else "data"
                    refused = (" (the FLAME account was probably refused, or its license not accepted)"
                               if download.needs_account else "")
                    raise AssetError(f"{url}: got {page} instead of the zip {download.archive}{refused}; "
                                     "nothing installed")
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
        if expected is not None and received != expected:
            raise AssetError(f"{url}: download of {download.archive} stopped after {received} of {expected} "
                             "bytes; run the fetch again")
        if download.size is not None and received != download.size:
            raise AssetError(f"{url}: {download.archive} has {received} bytes, expected {download.size}; "
                             "the file on the server changed or is damaged (update the table in assets.py)")
        if download.sha256 is not None and digest.hexdigest() != download.sha256:
            raise AssetError(f"{url}: {download.archive} has sha256 {digest.hexdigest()}, expected "
                             f"{download.sha256}; nothing installed")
        return tmp
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def _safe_extract(archive_path: Path, archive_name: str, into: Path) -> None:
    """Extract every member after checking CRCs and that no member escapes `into`."""
    try:
        with zipfile.ZipFile(archive_path) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise AssetError(f"{archive_name}: damaged member {bad} (CRC mismatch); nothing installed")
            root = into.resolve()
            for info in archive.infolist():
                target = (into / info.filename).resolve()
                if target != root and root not in target.parents:
                    raise AssetError(f"{archive_name}: member {info.filename} points outside the archive folder; "
                                     "refusing to unpack it")
            archive.extractall(into)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise AssetError(f"{archive_name}: not a valid zip ({type(exc).__name__}: {exc}); nothing installed") from None


def _find_member(unpacked: Path, member: str) -> Optional[Path]:
    """`member` at the top of the unpacked archive or in a folder below (archives
    differ in whether they wrap their files in a folder); shallowest wins."""
    matches = sorted((p for p in unpacked.rglob(member) if p.name == member),
                     key=lambda p: (len(p.relative_to(unpacked).parts), str(p)))
    return matches[0] if matches else None


def _move_into_place(src: Path, dest: Path) -> None:
    """os.replace `src` onto `dest`; an existing folder is renamed away first
    (os.replace cannot replace a non-empty folder) and removed afterwards."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_dir():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old."))
        os.replace(dest, old / dest.name)
        try:
            os.replace(src, dest)
        except BaseException:
            os.replace(old / dest.name, dest)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dest)


def _install(download: Download, archive_path: Path, assets_dir: Path) -> List[str]:
    """Unpack into a hidden folder, validate the files there with the same
    checks as `check`, then move them into place. Returns installed names."""
    specs = {s.name: s for s in ASSET_SPECS}
    unpacked = Path(tempfile.mkdtemp(dir=assets_dir, prefix=f".{download.archive}.", suffix=".unpack"))
    try:
        _safe_extract(archive_path, download.archive, unpacked)
        moves = []
        for member, dest in download.installs:
            found = _find_member(unpacked, member)
            if found is None:
                raise AssetError(f"{download.archive}: has no {member}; not the expected archive, nothing installed")
            spec = specs.get(dest)
            if spec is not None:
                try:
                    spec.validate(found, True)
                except AssetError as exc:
                    raise AssetError(f"{download.archive}: {member} is malformed ({exc}); nothing installed") from None
            moves.append((found, assets_dir / dest))
        for member, dest in download.optional:
            found = _find_member(unpacked, member)
            if found is not None:
                moves.append((found, assets_dir / dest))
        for src, dest in moves:
            _move_into_place(src, dest)
        return [str(dest.relative_to(assets_dir).as_posix()) for _, dest in moves]
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)


def fetch(
    assets_dir: Path,
    items: Sequence[str] = ("emoca", "flame", "embedding"),
    username: Optional[str] = None,
    password: Optional[str] = None,
    progress: Optional[bool] = None,
    force: bool = False,
    timeout: float = 60.0,
    sources: Optional[Mapping[str, Download]] = None,
) -> List[AssetStatus]:
    """Download, verify and install `items` (names from FETCH_ITEMS: 'emoca',
    'flame', 'texture', 'embedding') into `assets_dir`.

    Items whose files are already present (deep check) are skipped unless
    `force`. A failed item does not stop the others: its files come back as
    'missing' (or 'corrupt', when a broken copy was there before) with the
    failure in `detail`. `progress`: show download bars (None: when stderr is
    a terminal). `sources`: replaces the DOWNLOADS table (tests, mirrors).
    Returns the statuses of the requested items' files after fetching.
    """
    assets_dir = Path(assets_dir)
    table = dict(DOWNLOADS if sources is None else sources)
    unknown = [i for i in items if i not in table]
    if unknown:
        raise UsageError(f"unknown asset item(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    assets_dir.mkdir(parents=True, exist_ok=True)
    credentials: Optional[_Credentials] = None
    failures: Dict[str, str] = {}
    for item in items:
        download = table[item]
        names = {dest for _, dest in download.installs}
        specs = [s for s in ASSET_SPECS if s.name in names]
        if not force and specs and all(_check_spec(assets_dir, s, True).state == "present" for s in specs):
            log.info("%s: already present, not downloaded", download.archive)
            continue
        try:
            if download.needs_account and credentials is None:
                credentials = flame_credentials(username, password)
            url = download_url(download)
            archive_path = _download(download, url, assets_dir, credentials, timeout, progress)
            try:
                installed = _install(download, archive_path, assets_dir)
            finally:
                archive_path.unlink(missing_ok=True)
            log.info("%s: installed %s", download.archive, ", ".join(installed))
        except LightningFTError as exc:
            log.warning("%s", exc)
            failures[item] = str(exc)
    statuses = []
    for item in items:
        names = {dest for _, dest in table[item].installs}
        for spec in ASSET_SPECS:
            if spec.name not in names:
                continue
            status = _check_spec(assets_dir, spec, True)
            if item in failures and status.state != "present":
                status = replace(status, detail=f"fetch failed: {failures[item]}")
            statuses.append(status)
    return statuses


def main_fetch(
    assets_dir: Optional[Union[str, os.PathLike]] = None,
    items: Optional[Sequence[str]] = None,
    username: Optional[str] = None,
    password: Optional[str] = None,
    force: bool = False,
    progress: Optional[bool] = None,
) -> int:
    """`lightning-ft assets fetch`: fetch `items` (default: every item with a
    missing or corrupt file), then print the full report. 0 when every
    requested item is present afterwards, AssetError.exit_code otherwise."""
    folder = resolve_assets_dir(assets_dir)
    if items is None:
        before = check(folder, deep=True)
        needed = {s.name for s in before if s.state != "present"}
        spec_item = {s.name: s.item for s in ASSET_SPECS}
        items = [i for i in FETCH_ITEMS if any(spec_item.get(n) == i for n in needed)]
        if not items:
            print(format_report(before, folder))
            print("\nnothing to fetch: every file is present")
            return 0
    print(LICENCE_NOTICE, file=sys.stderr)
    fetched = fetch(folder, items, username=username, password=password, progress=progress, force=force)
    print(format_report(check(folder, deep=True), folder))
    failed = [s for s in fetched if s.state != "present"]
    for s in failed:
        print(f"\n{s.name}: {s.detail}", file=sys.stderr)
    return AssetError.exit_code if failed else 0
