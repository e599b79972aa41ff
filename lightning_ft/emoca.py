"""EMOCA v2 regressor: checkpoint loading, face crop and batched inference.

The `EMOCA_v2_lr_mse_20` release (an `ExpDECA` model with
`expression_backbone: deca_clone`) holds two encoders that LightningFT uses to
initialise every frame:

- `deca.E_flame`: a ResNet-50 trunk (`encoder.*`, no `fc`) and an MLP
  `layers.0` (Linear 2048->1024), ReLU, `layers.2` (Linear 1024->236). Its
  236 outputs split, in order, into shape 100, texture 50, expression 50,
  pose 6 (global 3 + jaw 3, axis-angle, radians), camera 3 (weak perspective
  scale, tx, ty) and light 27 (9 SH coefficients x RGB).
- `deca.E_expression`: the same architecture with 50 outputs; EMOCA v2 uses
  them in place of E_flame's expression.

Only these 644 tensors are read from the checkpoint; the detail encoder and
decoder, FLAME buffers, losses and optimizer states are skipped explicitly.
The checkpoint is a PyTorch Lightning 1.4 zip whose pickle references
pytorch_lightning/omegaconf classes: it is read with a restricted unpickler
that rebuilds only tensors, containers and numpy basics and maps every other
class to an inert stub, so no code from the file runs. docs/emoca.md lists
the sources of every fact used here.

Input: RGB crops [B,3,224,224] in 0..1, no mean/std normalisation.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .assets import EMOCA_RELEASE
from .cameras import FRONTAL_ROTATION, frontal_rotation
from .errors import AssetError, UsageError
from .lbs import batch_rodrigues
from .progress import progress as progress_bar

log = logging.getLogger(__name__)

CROP_SIZE = 224
# (name, size) in the order of E_flame's output vector (DECA.decompose_code).
FLAME_CODE_SPLIT: Tuple[Tuple[str, int], ...] = (
    ("shape", 100), ("texture", 50), ("expression", 50), ("pose", 6), ("cam", 3), ("light", 27),
)
N_FLAME_CODE = sum(n for _, n in FLAME_CODE_SPLIT)  # 236
N_EXPRESSION = 50
KEPT_PREFIXES = ("deca.E_flame.", "deca.E_expression.")
NO_EMOCA_HINT = (f"download {EMOCA_RELEASE}.zip from the EMOCA project site and unzip it "
                 "into assets/EMOCA/ (see README), or pass --no-emoca to start every frame "
                 "from a neutral face and let the fitting stage do the rest")


# ----------------------------------------------------------------------------
# The network, with the parameter names of the release (gdl/models/ResNet.py,
# gdl/models/DecaEncoder.py in radekd91/emoca).


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck block (stride on the 3x3 conv, as torchvision v1.5)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity, inplace=True)


class ResNet50Trunk(nn.Module):
    """ResNet-50 without `fc`: images [B,3,224,224] -> pooled features [B,2048]."""

    feature_size = 2048

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        channels = 64
        for index, (width, blocks, stride) in enumerate(
                [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1):
            layer = []
            for block in range(blocks):
                layer.append(Bottleneck(channels, width, stride if block == 0 else 1))
                channels = width * Bottleneck.expansion
            setattr(self, f"layer{index}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        # EMOCA uses AvgPool2d(7) on the 7x7 map of a 224 input: the same as a mean.
        return x.mean(dim=(2, 3))


class ResnetRegressor(nn.Module):
    """EMOCA's `ResnetEncoder`: trunk `encoder` + MLP `layers` (2048->1024->out)."""

    def __init__(self, out_size: int):
        super().__init__()
        self.encoder = ResNet50Trunk()
        self.layers = nn.Sequential(nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, out_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(self.encoder(images))


def _fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv with bias equal to conv followed by bn in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, bias=True).to(conv.weight.device)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_(bn.bias + (bias - bn.running_mean) * scale)
    return fused


def _fold_trunk(trunk: ResNet50Trunk) -> None:
    trunk.conv1 = _fold_batchnorm(trunk.conv1, trunk.bn1)
    trunk.bn1 = nn.Identity()
    for layer in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4):
        for block in layer:
            for i in (1, 2, 3):
                setattr(block, f"conv{i}", _fold_batchnorm(getattr(block, f"conv{i}"), getattr(block, f"bn{i}")))
                setattr(block, f"bn{i}", nn.Identity())
            if block.downsample is not None:
                block.downsample = nn.Sequential(_fold_batchnorm(block.downsample[0], block.downsample[1]))


class EmocaEncoder(nn.Module):
    """EMOCA v2's coarse FLAME encoder and expression encoder.

    `forward(images [B,3,224,224] float RGB 0..1)` returns a dict of tensors:
    shape [B,100], texture [B,50], expression [B,50] (E_expression),
    expression_coarse [B,50] (E_flame's own, unused by EMOCA v2),
    global_pose [B,3] and jaw_pose [B,3] (axis-angle, radians, FLAME model axes),
    cam [B,3] (weak perspective: scale, tx, ty) and light [B,9,3].
    """

    def __init__(self) -> None:
        super().__init__()
        self.E_flame = ResnetRegressor(N_FLAME_CODE)
        self.E_expression = ResnetRegressor(N_EXPRESSION)
        self.batchnorm_folded = False

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, CROP_SIZE, CROP_SIZE):
            raise UsageError(f"EMOCA expects images [B,3,{CROP_SIZE},{CROP_SIZE}], got {tuple(images.shape)}")
        code = self.E_flame(images)
        out: Dict[str, torch.Tensor] = {}
        start = 0
        for name, size in FLAME_CODE_SPLIT:
            out[name] = code[:, start:start + size]
            start += size
        out["expression_coarse"] = out.pop("expression")
        out["expression"] = self.E_expression(images)
        pose = out.pop("pose")
        out["global_pose"], out["jaw_pose"] = pose[:, :3], pose[:, 3:]
        out["light"] = out["light"].reshape(-1, 9, 3)
        return out

    def fold_batchnorm(self) -> "EmocaEncoder":
        """Fold every BatchNorm into its conv (inference only; ~1e-6 relative change).

        Afterwards `state_dict()` no longer has the release's names.
        """
        if not self.batchnorm_folded:
            self.eval()
            _fold_trunk(self.E_flame.encoder)
            _fold_trunk(self.E_expression.encoder)
            self.batchnorm_folded = True
        return self

    @classmethod
    def from_release(cls, folder: Union[str, Path], device: Union[str, torch.device] = "cpu",
                     fold_batchnorm: bool = False) -> "EmocaEncoder":
        """Load the encoders from `folder` (assets/EMOCA, or the release folder itself).

        Raises AssetError when the checkpoint is missing, unreadable or not the
        EMOCA v2 architecture.
        """
        checkpoint = find_checkpoint(folder)
        config_path = find_release(folder) / "cfg.yaml"
        if config_path.is_file():
            check_release_config(read_simple_yaml(config_path), config_path)
        else:
            log.warning("%s: missing; the checkpoint's architecture is still checked tensor by tensor",
                        config_path)
        state = load_checkpoint_tensors(checkpoint, lambda key: key.startswith(KEPT_PREFIXES))
        with torch.device("meta"):  # no random init: every tensor comes from the file
            model = cls()
        state = {key[len("deca."):]: value for key, value in state.items()}
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if missing or unexpected or wrong_shape:
            details = []
            if missing:
                details.append(f"{len(missing)} missing (e.g. deca.{missing[0]})")
            if unexpected:
                details.append(f"{len(unexpected)} unexpected (e.g. deca.{unexpected[0]})")
            if wrong_shape:
                k = wrong_shape[0]
                details.append(f"{len(wrong_shape)} of another shape (e.g. deca.{k}: "
                               f"{tuple(state[k].shape)} instead of {tuple(expected[k].shape)})")
            raise AssetError(f"{checkpoint}: not the EMOCA v2 encoder architecture ("
                             + "; ".join(details) + f"); use the {EMOCA_RELEASE} release as unzipped")
        model.load_state_dict(state, strict=True, assign=True)
        model.eval().to(device)
        if fold_batchnorm:
            model.fold_batchnorm()
        return model


# ----------------------------------------------------------------------------
# Finding and reading the release


def find_release(folder: Union[str, Path]) -> Path:
    """The release folder: `folder/EMOCA_v2_lr_mse_20` or `folder` itself."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AssetError(f"{folder}: EMOCA folder not found; {NO_EMOCA_HINT}")
    for candidate in (folder / EMOCA_RELEASE, folder):
        if (candidate / "detail").is_dir() or (candidate / "cfg.yaml").is_file():
            return candidate
    raise AssetError(f"{folder}: no {EMOCA_RELEASE}/ release in it; {NO_EMOCA_HINT}")


def find_checkpoint(folder: Union[str, Path]) -> Path:
    """The release's `.ckpt` under `folder` (assets/EMOCA or the release folder).

    The file is found by recursive glob under `detail/checkpoints` (a `/` in
    the metric name made a sub-folder); with several candidates, EMOCA's own
    rule picks the one with the lowest number after the last `=` ('last.ckpt'
    is skipped).
    """
    release = find_release(folder)
    search_root = release / "detail" / "checkpoints"
    if not search_root.is_dir():
        search_root = release
    candidates = sorted(p for p in search_root.rglob("*.ckpt") if p.is_file())
    if not candidates:
        raise AssetError(f"{search_root}: no .ckpt file (incomplete unzip?); {NO_EMOCA_HINT}")
    scored: List[Tuple[float, Path]] = []
    for path in candidates:
        if path.stem == "last":
            continue
        try:
            scored.append((float(path.stem[path.stem.rfind("=") + 1:]), path))
        except ValueError:
            continue
    if scored:
        return min(scored, key=lambda item: item[0])[1]
    return candidates[-1]


def read_simple_yaml(path: Path) -> Dict[str, Any]:
    """Nested `key: scalar` mappings of a block-style YAML file (OmegaConf's dump).

    Enough for the few cfg.yaml fields checked here; list items and
    multi-line values are skipped. Scalars are parsed as bool/int/float/null
    where they look like one, else kept as strings (quotes stripped).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AssetError(f"{path}: cannot read ({exc})") from None
    root: Dict[str, Any] = {}
    stack: List[Tuple[int, Dict[str, Any]]] = [(-1, root)]
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip()
        stripped = line.lstrip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = len(line) - len(stripped)
        key, _, value = stripped.partition(":")
        key, value = key.strip().strip("'\""), value.strip()
        while stack and indent <= stack[-1][0]:
            stack.pop()
        parent = stack[-1][1] if stack else root
        if value == "":
            child: Dict[str, Any] = {}
            parent[key] = child
            stack.append((indent, child))
        else:
            parent[key] = _yaml_scalar(value)
    return root


def _yaml_scalar(value: str) -> Any:
    if value in ("true", "True"):
        return True
    if value in ("false", "False"):
        return False
    if value in ("null", "~"):
        return None
    if re.fullmatch(r"[-+]?\d+", value):
        return int(value)
    try:
        return float(value)
    except ValueError:
        return value.strip("'\"")


def check_release_config(cfg: Dict[str, Any], path: Path) -> None:
    """Raise AssetError if cfg.yaml describes a model this loader cannot run."""
    model = cfg.get("detail", cfg.get("coarse", {})).get("model", {})
    if not model:
        raise AssetError(f"{path}: no 'detail.model' section; not an EMOCA release cfg.yaml")
    wanted = dict(FLAME_CODE_SPLIT)
    names = {"shape": "n_shape", "texture": "n_tex", "expression": "n_exp", "pose": "n_pose",
             "cam": "n_cam", "light": "n_light"}
    for part, key in names.items():
        if key in model and model[key] != wanted[part]:
            raise AssetError(f"{path}: {key} = {model[key]}, this loader needs {wanted[part]} "
                             f"(the {EMOCA_RELEASE} release)")
    backbone = model.get("expression_backbone", "deca_clone")
    if backbone != "deca_clone":
        raise AssetError(f"{path}: expression_backbone '{backbone}' is not supported "
                         f"(needs 'deca_clone', as in {EMOCA_RELEASE})")
    if model.get("exp_deca_global_pose") or model.get("exp_deca_jaw_pose"):
        raise AssetError(f"{path}: expression encoder also regresses pose "
                         f"(exp_deca_*_pose true); not the {EMOCA_RELEASE} release")
    e_flame = model.get("e_flame_type", "ResnetEncoder")
    if e_flame != "ResnetEncoder":
        raise AssetError(f"{path}: e_flame_type '{e_flame}' is not supported (needs ResnetEncoder)")


# ----------------------------------------------------------------------------
# Restricted reading of a PyTorch zip checkpoint

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _LazyStorage:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class _LazyTensor:
    storage: _LazyStorage
    offset: int
    size: Tuple[int, ...]
    stride: Tuple[int, ...]


def _rebuild_lazy_tensor(storage: Any, offset: int, size: Any, stride: Any, *unused: Any) -> _LazyTensor:
    if not isinstance(storage, _LazyStorage):
        raise pickle.UnpicklingError("tensor without a storage record")
    return _LazyTensor(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None, *unused: Any) -> Any:
    return data


class InertStub(dict):
    """Stands in for any class the checkpoint references that is not data.

    It accepts any construction arguments and pickled state and does nothing:
    pytorch_lightning callbacks, omegaconf configs, enums and the like.
    """

    stub_of = "?"
    __hash__ = object.__hash__  # usable as a dict key, like the objects it replaces

    def __new__(cls, *args: Any, **kwargs: Any) -> "InertStub":
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.stub_args = args

    def __setstate__(self, state: Any) -> None:
        self.stub_state = state

    def append(self, item: Any) -> None:
        self.setdefault("__items__", []).append(item)

    def extend(self, items: Iterable[Any]) -> None:
        for item in items:
            self.append(item)


_STUBS: Dict[Tuple[str, str], type] = {}


def _stub_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STUBS:
        _STUBS[key] = type(name, (InertStub,), {"stub_of": f"{module}.{name}"})
    return _STUBS[key]


_SAFE_GLOBALS: Dict[Tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_lazy_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_lazy_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("builtins", "complex"): complex, ("builtins", "object"): object,
}


def _numpy_global(module: str, name: str) -> Any:
    import numpy.core.multiarray as multiarray

    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
               ("numpy.core.multiarray", "scalar"): multiarray.scalar,
               ("numpy._core.multiarray", "scalar"): multiarray.scalar}
    return allowed.get((module, name))


class _CheckpointUnpickler(pickle.Unpickler):
    """Rebuilds containers, numbers, strings and lazy tensor records; nothing else runs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module.startswith("numpy"):
            found = _numpy_global(module, name)
            if found is not None:
                return found
        if (module, name) in (("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor")):
            return _reconstructor
        return _stub_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.60}")
        storage_type, key, numel = pid[1], pid[2], pid[4]  # pid[3] is the location
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r:.60}")
        return _LazyStorage(str(key), storage_type.dtype, int(numel))


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    # copyreg's helper would call base.__new__/__init__ of arbitrary classes: only stubs here.
    if isinstance(cls, type) and issubclass(cls, InertStub):
        return cls()
    return _stub_class("copyreg", "_reconstructor")()


def load_checkpoint_tensors(path: Union[str, Path], keep: Callable[[str], bool]) -> Dict[str, torch.Tensor]:
    """Tensors of `checkpoint['state_dict']` whose key satisfies `keep`, on CPU.

    Reads the PyTorch zip format with a restricted unpickler (see module doc);
    only the storages of kept tensors are read from the archive.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise AssetError(f"{path}: file not found; {NO_EMOCA_HINT}") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise AssetError(f"{path}: not a PyTorch zip checkpoint ({exc}); the file is corrupt or "
                         f"truncated, unzip {EMOCA_RELEASE}.zip again") from None
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise AssetError(f"{path}: no single data.pkl in the archive; not a PyTorch checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder_name = prefix + "byteorder"
        if byteorder_name in names and archive.read(byteorder_name).strip() not in (b"little", b""):
            raise AssetError(f"{path}: big-endian checkpoint; not supported")
        try:
            payload = _CheckpointUnpickler(io.BytesIO(archive.read(pickles[0]))).load()
        except AssetError:
            raise
        except Exception as exc:  # a damaged pickle raises many exception types
            raise AssetError(f"{path}: unreadable checkpoint pickle ({type(exc).__name__}: {exc}); "
                             f"unzip {EMOCA_RELEASE}.zip again") from None
        state = payload.get("state_dict") if isinstance(payload, dict) else None
        if not isinstance(state, dict):
            raise AssetError(f"{path}: no 'state_dict' in the checkpoint; not a Lightning checkpoint of EMOCA")
        tensors: Dict[str, torch.Tensor] = {}
        skipped = 0
        for key, value in state.items():
            if not isinstance(key, str) or not keep(key):
                skipped += 1
                continue
            if not isinstance(value, _LazyTensor):
                raise AssetError(f"{path}: state_dict entry '{key}' is not a tensor")
            tensors[key] = _materialize(archive, prefix, value, path, key)
        log.debug("%s: read %d tensors, skipped %d", path, len(tensors), skipped)
        return tensors


def _materialize(archive: zipfile.ZipFile, prefix: str, record: _LazyTensor, path: Path,
                 key: str) -> torch.Tensor:
    storage = record.storage
    try:
        raw = archive.read(f"{prefix}data/{storage.key}")
    except (KeyError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise AssetError(f"{path}: storage of '{key}' missing or damaged ({exc}); "
                         f"unzip {EMOCA_RELEASE}.zip again") from None
    itemsize = torch.empty((), dtype=storage.dtype).element_size()
    if len(raw) < storage.numel * itemsize:
        raise AssetError(f"{path}: storage of '{key}' is truncated; unzip {EMOCA_RELEASE}.zip again")
    flat = torch.frombuffer(bytearray(raw[: storage.numel * itemsize]), dtype=storage.dtype)
    needed = record.offset + sum((s - 1) * st for s, st in zip(record.size, record.stride)) + 1
    if record.size and min(record.size) > 0 and needed > storage.numel:
        raise AssetError(f"{path}: tensor '{key}' reaches past its storage; the file is damaged")
    return torch.as_strided(flat, record.size, record.stride, record.offset).clone()


# ----------------------------------------------------------------------------
# Preprocessing


def crop_box_from_landmarks(landmarks: np.ndarray, scale: float = 1.25) -> Tuple[int, int, int]:
    """Square crop (left, top, side) in integer pixels around 2-D landmarks [N,2].

    side = int(scale x mean of the landmark box's width and height), centred
    on the box centre (the original tracker's rule on mediapipe's 478 points
    with scale 1.25; EMOCA's own demo enlarges a 68-point box by 1.1 x 1.25 =
    1.375). left/top are floored, so the box may extend past the image.
    """
    points = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    points = points[np.isfinite(points).all(axis=1)]
    if len(points) < 2:
        raise UsageError("crop_for_emoca needs at least two finite landmarks")
    (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
    side = int(((x1 - x0) + (y1 - y0)) / 2 * scale)
    if side < 2:
        raise UsageError(f"landmark box too small for a crop ({side} px)")
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return int(math.floor(cx - side / 2)), int(math.floor(cy - side / 2)), side


def crop_for_emoca(image: np.ndarray, landmarks: np.ndarray, scale: float = 1.25,
                   size: int = CROP_SIZE) -> Tuple[np.ndarray, np.ndarray]:
    """EMOCA input crop of one frame.

    image: [H,W,3] uint8 RGB; landmarks: [N,2] pixels (x right, y down).
    Returns (crop [size,size,3] float32 RGB in 0..1, crop_to_image [2,3]
    float64), where crop_to_image maps crop pixel coordinates (u, v, 1) to
    image pixel coordinates (pixel centres at integers in both). Pixels
    outside the image are black; the square is resized with antialiased
    bilinear filtering (torchvision's `resize(antialias=True)`).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise UsageError(f"crop_for_emoca expects an [H,W,3] RGB image, got {image.shape}")
    left, top, side = crop_box_from_landmarks(landmarks, scale)
    h, w = image.shape[:2]
    region = np.zeros((side, side, 3), dtype=np.float32)
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + side, w), min(top + side, h)
    if x1 > x0 and y1 > y0:
        region[y0 - top:y1 - top, x0 - left:x1 - left] = image[y0:y1, x0:x1]
    tensor = torch.from_numpy(region).permute(2, 0, 1)[None]
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False,
                            antialias=side > size)
    crop = (resized[0].permute(1, 2, 0).clamp_(0, 255) / 255.0).numpy().astype(np.float32)
    k = side / size
    crop_to_image = np.array([[k, 0.0, left + 0.5 * k - 0.5], [0.0, k, top + 0.5 * k - 0.5]])
    return crop, crop_to_image


# ----------------------------------------------------------------------------
# Batched inference


@dataclass
class EmocaResult:
    """Per-frame EMOCA v2 codes; all float32 numpy, NaN rows where `valid` is False.

    shape [T,100], expression [T,50] (E_expression), texture [T,50],
    global_pose [T,3] and jaw_pose [T,3] (axis-angle, radians, FLAME model
    axes; see `emoca_pose_to_opencv`), cam [T,3] (weak perspective scale, tx,
    ty in EMOCA's crop NDC), light [T,9,3] (SH x RGB), crop_to_image [T,2,3]
    (crop pixel -> image pixel affine of each frame's crop), identity [100]
    (robust mean of the valid frames' shape codes), valid [T] bool.
    `source` is 'emoca' or 'neutral' (the --no-emoca initialisation).
    """

    shape: np.ndarray
    expression: np.ndarray
    global_pose: np.ndarray
    jaw_pose: np.ndarray
    cam: np.ndarray
    texture: np.ndarray
    light: np.ndarray
    crop_to_image: np.ndarray
    identity: np.ndarray
    valid: np.ndarray
    source: str = "emoca"

    @classmethod
    def neutral(cls, n_frames: int) -> "EmocaResult":
        """The --no-emoca initialisation: zero codes (mean shape, neutral face,
        frontal pose); cam and crop_to_image are NaN (unknown)."""
        def zeros(*shape: int) -> np.ndarray:
            return np.zeros((n_frames, *shape), dtype=np.float32)

        return cls(shape=zeros(100), expression=zeros(N_EXPRESSION), global_pose=zeros(3),
                   jaw_pose=zeros(3), cam=np.full((n_frames, 3), np.nan, np.float32),
                   texture=zeros(50), light=zeros(9, 3),
                   crop_to_image=np.full((n_frames, 2, 3), np.nan, np.float32),
                   identity=np.zeros(100, np.float32), valid=np.ones(n_frames, bool),
                   source="neutral")


def robust_mean(codes: np.ndarray, threshold: float = 3.0) -> np.ndarray:
    """Mean of the rows of `codes` [T,D] that lie near the coordinate-wise median.

    A row is an outlier when its distance to the median exceeds
    median(dist) + threshold x 1.4826 x MAD(dist); outliers are dropped and
    the rest averaged. NaN rows are ignored. Returns [D] float32.
    """
    codes = np.asarray(codes, dtype=np.float64)
    codes = codes[np.isfinite(codes).all(axis=1)]
    if len(codes) == 0:
        raise UsageError("robust_mean: no finite rows")
    median = np.median(codes, axis=0)
    dist = np.linalg.norm(codes - median, axis=1)
    center = np.median(dist)
    mad = 1.4826 * np.median(np.abs(dist - center))
    inliers = dist <= center + threshold * max(mad, 1e-12)
    return codes[inliers].mean(axis=0).astype(np.float32)


def regress(frames: Iterable[np.ndarray], landmarks: np.ndarray, valid: np.ndarray,
            model: EmocaEncoder, batch_size: int = 32, progress: Optional[bool] = None,
            scale: float = 1.25) -> EmocaResult:
    """Run EMOCA v2 on every valid frame.

    frames: iterable of [H,W,3] uint8 RGB images (T of them, in order);
    landmarks: [T,N,2] pixels; valid: [T] bool (frames with landmarks).
    Crops are batched by `batch_size` on the model's device. `progress`:
    None = a bar when stderr is a terminal, False/True = off/on.
    """
    landmarks = np.asarray(landmarks)
    valid = np.asarray(valid, dtype=bool)
    n_frames = len(landmarks)
    if valid.shape != (n_frames,):
        raise UsageError(f"valid has shape {valid.shape}, expected ({n_frames},)")
    if not valid.any():
        raise UsageError("regress: no frame has landmarks")
    device = next(model.parameters()).device
    outputs: Dict[str, np.ndarray] = {
        "shape": np.full((n_frames, 100), np.nan, np.float32),
        "expression": np.full((n_frames, N_EXPRESSION), np.nan, np.float32),
        "texture": np.full((n_frames, 50), np.nan, np.float32),
        "global_pose": np.full((n_frames, 3), np.nan, np.float32),
        "jaw_pose": np.full((n_frames, 3), np.nan, np.float32),
        "cam": np.full((n_frames, 3), np.nan, np.float32),
        "light": np.full((n_frames, 9, 3), np.nan, np.float32),
    }
    crop_to_image = np.full((n_frames, 2, 3), np.nan, np.float32)
    seen = 0

    def batches() -> Iterable[Tuple[List[int], np.ndarray]]:
        nonlocal seen
        indices: List[int] = []
        crops: List[np.ndarray] = []
        for index, frame in enumerate(frames):
            if index >= n_frames:
                raise UsageError(f"regress: more frames than landmark rows ({n_frames})")
            seen += 1
            if not valid[index]:
                continue
            crop, crop_to_image[index] = crop_for_emoca(frame, landmarks[index], scale=scale)
            crops.append(crop)
            indices.append(index)
            if len(crops) == batch_size:
                yield indices, np.stack(crops)
                indices, crops = [], []
        if crops:
            yield indices, np.stack(crops)

    n_batches = math.ceil(int(valid.sum()) / batch_size)
    for indices, crops in progress_bar(batches(), total=n_batches, desc="EMOCA", enabled=progress,
                                       unit="batch"):
        # channels_last (with folded BatchNorm) measured 1.2-1.8x faster on an idle
        # 2-core CPU (benchmarks/bench_emoca.py); a model in NCHW converts it back.
        images = torch.from_numpy(crops).permute(0, 3, 1, 2).to(device).contiguous(
            memory_format=torch.channels_last)
        with torch.inference_mode():
            result = model(images)
        for name, array in outputs.items():
            array[indices] = result[name].float().cpu().numpy()
    if seen != n_frames:
        raise UsageError(f"regress: got {seen} frames for {n_frames} landmark rows")
    return EmocaResult(crop_to_image=crop_to_image, identity=robust_mean(outputs["shape"][valid]),
                       valid=valid.copy(), **outputs)


def load_emoca_or_none(folder: Union[str, Path], no_emoca: bool,
                       device: Union[str, torch.device] = "cpu") -> Optional[EmocaEncoder]:
    """The encoder, or None with --no-emoca; missing files stop with both options named."""
    if no_emoca:
        return None
    return EmocaEncoder.from_release(folder, device=device)


# ----------------------------------------------------------------------------
# Conventions

def emoca_pose_to_opencv(global_pose: Union[np.ndarray, torch.Tensor]) -> Union[np.ndarray, torch.Tensor]:
    """EMOCA's global head rotation [T,3] (axis-angle) -> R [T,3,3], FLAME model -> OpenCV camera.

    DECA/EMOCA project FLAME's output vertices orthographically, then negate y
    and z for image space (x right, y down): their camera looks down the
    model's -z axis with y up. The OpenCV camera (x right, y down, z forward)
    is that frame turned 180 degrees about x, so exactly
        R = diag(1, -1, -1) @ rodrigues(global_pose).
    A frontal head gives diag(1,-1,-1); a turn to the subject's left (+x in
    FLAME) moves the nose to image x > cx. Input numpy -> numpy float64,
    torch -> torch (same dtype/device).
    """
    if isinstance(global_pose, torch.Tensor):
        return frontal_rotation(global_pose) @ batch_rodrigues(global_pose.reshape(-1, 3))
    pose = torch.from_numpy(np.asarray(global_pose, dtype=np.float64).reshape(-1, 3))
    return FRONTAL_ROTATION @ batch_rodrigues(pose).numpy()


def emoca_camera_to_translation(cam: np.ndarray, crop_to_image: np.ndarray, focal_px: float,
                                principal_point: Sequence[float], crop_size: int = CROP_SIZE) -> np.ndarray:
    """Weak-perspective camera [T,3] -> OpenCV translation t [T,3] (meters).

    With R from `emoca_pose_to_opencv`, x_cam = R_flip @ v + t, where v are
    FLAME's output vertices (global pose applied inside FLAME, as EMOCA does)
    and R_flip = diag(1,-1,-1), reproduces EMOCA's projection of the model
    origin exactly and its scale at the origin's depth: t_z = f / (s * S/2 * k)
    with S the crop size and k the crop's image pixels per crop pixel.
    Crop NDC (-1..1) maps to crop pixels as (ndc + 1) * S/2 - 0.5 (assumed:
    pixel centres at integers).
    """
    cam = np.asarray(cam, dtype=np.float64).reshape(-1, 3)
    affine = np.asarray(crop_to_image, dtype=np.float64).reshape(-1, 2, 3)
    s, tx, ty = cam[:, 0], cam[:, 1], cam[:, 2]
    k = np.sqrt(np.abs(np.linalg.det(affine[:, :, :2])))
    half = crop_size / 2
    crop_px = np.stack([(s * tx + 1) * half - 0.5, (-s * ty + 1) * half - 0.5, np.ones_like(s)], axis=1)
    image_px = np.einsum("tij,tj->ti", affine, crop_px)
    tz = focal_px / (s * half * k)
    pp = np.asarray(principal_point, dtype=np.float64)
    txy = (image_px - pp) * tz[:, None] / focal_px
    return np.concatenate([txy, tz[:, None]], axis=1)
