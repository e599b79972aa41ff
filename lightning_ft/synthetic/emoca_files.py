"""A synthetic `EMOCA_v2_lr_mse_20` release with the real file structure.

Layout (as unzipped from EMOCA_v2_lr_mse_20.zip):

    <root>/EMOCA_v2_lr_mse_20/
        cfg.yaml                      OmegaConf dump, `coarse:` and `detail:` stages
        detail/checkpoints/deca-epoch=10-val_loss/dataloader_idx_0=3.25521111.ckpt

The checkpoint is a PyTorch zip with a PyTorch Lightning 1.4 dictionary:
`epoch`, `global_step`, `pytorch-lightning_version`, `state_dict`,
`callbacks` keyed by a class object, `optimizer_states`, `lr_schedulers`,
`hyper_parameters`. The pickle references `pytorch_lightning` and `omegaconf`
classes, as the real one does: stand-in classes are registered under those
module names only while writing, so neither package is needed and a plain
`torch.load` of the result fails like it does on the real file.

`state_dict` has every tensor of `deca.E_flame` and `deca.E_expression` (two
ResNet-50 trunks + MLP heads, 644 tensors, random weights scaled so that
activations stay of order one) and a sample of the parts the tracker must
ignore (`deca.E_detail.*`, `deca.D_detail.*`, FLAME buffers, UV masks) with
their real shapes. Random weights: outputs are not face parameters.
"""

from __future__ import annotations

import os
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterator

import torch

from ..assets import EMOCA_RELEASE
from ..emoca import N_EXPRESSION, N_FLAME_CODE, ResnetRegressor

CHECKPOINT_RELATIVE = Path("detail/checkpoints/deca-epoch=10-val_loss/dataloader_idx_0=3.25521111.ckpt")

_CFG_TEMPLATE = """\
{stage}:
  model:
    deca_class: ExpDECA
    expression_backbone: deca_clone
    exp_deca_global_pose: false
    exp_deca_jaw_pose: false
    e_flame_type: ResnetEncoder
    e_detail_type: ResnetEncoder
    mode: {stage}
    n_shape: 100
    n_tex: 50
    n_exp: 50
    n_pose: 6
    n_cam: 3
    n_light: 27
    n_detail: 128
    image_size: 224
    uv_size: 256
    use_tex: true
    jaw_type: aa
    train_coarse: false
    resume_training: false
    flame_model_path: /is/cluster/work/rdanecek/emoca/assets/FLAME/geometry/generic_model.pkl
    flame_lmk_embedding_path: /is/cluster/work/rdanecek/emoca/assets/FLAME/geometry/landmark_embedding.npy
    tex_type: BFM
    tex_path: /is/cluster/work/rdanecek/emoca/assets/FLAME/texture/FLAME_albedo_from_BFM.npz
    topology_path: /is/cluster/work/rdanecek/emoca/assets/FLAME/geometry/head_template.obj
  learning:
    optimizer: Adam
    learning_rate: 5.0e-05
    batch_size_train: 4
    val_K: 1
  inout:
    name: {stage}
    checkpoint_dir: /is/cluster/work/rdanecek/emoca/finetune_deca/{release}/{stage}/checkpoints
    full_run_dir: /is/cluster/work/rdanecek/emoca/finetune_deca/{release}/{stage}
  data:
    data_class: DecaDataModule
    image_size: 224
    scale_min: 1.4
    scale_max: 1.8
    trans_scale: 0.1
    landmark_types:
    - fan
    - mediapipe
"""


def _regressor_state(outsize: int, generator: torch.Generator) -> "OrderedDict[str, torch.Tensor]":
    """Random weights for a `ResnetRegressor(outsize)`, with BatchNorm statistics
    that keep activations of order one."""
    with torch.device("meta"):
        shapes = [(name, tuple(t.shape), t.dtype) for name, t in ResnetRegressor(outsize).state_dict().items()]
    state: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for name, shape, dtype in shapes:
        if name.endswith("num_batches_tracked"):
            tensor = torch.randint(1000, 100000, shape, generator=generator, dtype=dtype)
        elif name.endswith("running_mean"):
            tensor = torch.randn(shape, generator=generator) * 0.1
        elif name.endswith("running_var"):
            tensor = torch.rand(shape, generator=generator) + 0.5
        elif len(shape) == 1 and (".bn" in name or "downsample.1" in name):
            if name.endswith("weight"):
                # Small gains on the last BN of each branch keep the residual sum bounded.
                gain = 0.2 if name.split(".")[-2] in ("bn3", "1") else 1.0
                tensor = gain * (0.5 + torch.rand(shape, generator=generator))
            else:
                tensor = torch.randn(shape, generator=generator) * 0.05
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            tensor = torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5
        elif len(shape) == 2:
            tensor = torch.randn(shape, generator=generator) * (1.0 / shape[1]) ** 0.5
        else:
            tensor = torch.randn(shape, generator=generator) * 0.01
        state[name] = tensor
    return state


def synthetic_state_dict(seed: int = 0, flame_outsize: int = N_FLAME_CODE,
                         expression_outsize: int = N_EXPRESSION,
                         include_ignored: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """The checkpoint's `state_dict` (keys `deca.E_flame.*`, `deca.E_expression.*`, ...)."""
    generator = torch.Generator().manual_seed(seed)
    state: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for prefix, outsize in (("deca.E_flame.", flame_outsize), ("deca.E_expression.", expression_outsize)):
        for key, value in _regressor_state(outsize, generator).items():
            state[prefix + key] = value
    if include_ignored:
        # A sample of the parts the tracker skips, with their real shapes.
        state["deca.uv_face_eye_mask"] = torch.rand(1, 1, 256, 256, generator=generator)
        state["deca.fixed_uv_dis"] = torch.zeros(512, 512)
        state["deca.E_detail.encoder.conv1.weight"] = torch.randn(64, 3, 7, 7, generator=generator) * 0.1
        for stat in ("weight", "bias", "running_mean", "running_var"):
            state[f"deca.E_detail.encoder.bn1.{stat}"] = torch.rand(64, generator=generator)
        state["deca.E_detail.encoder.bn1.num_batches_tracked"] = torch.tensor(1234)
        state["deca.E_detail.layers.0.weight"] = torch.randn(1024, 2048, generator=generator) * 0.02
        state["deca.E_detail.layers.0.bias"] = torch.zeros(1024)
        state["deca.E_detail.layers.2.weight"] = torch.randn(128, 1024, generator=generator) * 0.03
        state["deca.E_detail.layers.2.bias"] = torch.zeros(128)
        state["deca.D_detail.l1.0.weight"] = torch.randn(128 * 8 * 8, 128 + 3 + 50, generator=generator) * 0.05
        state["deca.D_detail.l1.0.bias"] = torch.zeros(128 * 8 * 8)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            state[f"deca.D_detail.conv_blocks.0.{stat}"] = torch.rand(128, generator=generator)
        state["deca.D_detail.conv_blocks.0.num_batches_tracked"] = torch.tensor(1234)
        state["deca.D_detail.conv_blocks.2.weight"] = torch.randn(128, 128, 3, 3, generator=generator) * 0.03
        state["deca.D_detail.conv_blocks.2.bias"] = torch.zeros(128)
        state["deca.flametex.texture_mean"] = torch.rand(1, 1, 512 * 512 * 3 // 1024, generator=generator)
    return state


# ----------------------------------------------------------------------------
# Stand-ins for the classes the real pickle references

_STAND_IN_MODULES = {
    "pytorch_lightning.callbacks.model_checkpoint": ("ModelCheckpoint",),
    "pytorch_lightning.utilities.parsing": ("AttributeDict",),
    "omegaconf.dictconfig": ("DictConfig",),
}


class _StandInModules:
    """Registers stand-in classes under the real module names while pickling."""

    def __enter__(self) -> Dict[str, type]:
        self.added = []
        classes: Dict[str, type] = {}
        for module_name, class_names in _STAND_IN_MODULES.items():
            parts = module_name.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name not in sys.modules:
                    sys.modules[name] = types.ModuleType(name)
                    self.added.append(name)
            module = sys.modules[module_name]
            for class_name in class_names:
                base = dict if class_name == "AttributeDict" else object
                cls = type(class_name, (base,), {"__module__": module_name})
                setattr(module, class_name, cls)
                classes[class_name] = cls
        return classes

    def __exit__(self, *exc: object) -> None:
        for name in reversed(self.added):
            sys.modules.pop(name, None)


def write_checkpoint(path: Path, state_dict: "OrderedDict[str, torch.Tensor]") -> Path:
    """Write a Lightning-1.4-style checkpoint dict around `state_dict` (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _StandInModules() as classes:
        checkpoint_callback = classes["ModelCheckpoint"]()
        checkpoint_callback.__dict__.update(monitor="deca_validation_loss/dataloader_idx_0",
                                            best_model_score=torch.tensor(3.25521111),
                                            save_top_k=3, mode="min")
        hyper_parameters = classes["AttributeDict"]()
        model_params = classes["DictConfig"]()
        model_params.__dict__.update(_content={"n_shape": 100, "n_exp": 50}, _metadata=None)
        hyper_parameters.update(model_params=model_params, stage_name="detail")
        first = next(iter(state_dict.values()))
        checkpoint = {
            "epoch": 10,
            "global_step": 123456,
            "pytorch-lightning_version": "1.4.9",
            "state_dict": state_dict,
            "callbacks": {classes["ModelCheckpoint"]: {"best_model_score": torch.tensor(3.25521111),
                                                       "monitor": "deca_validation_loss/dataloader_idx_0",
                                                       "dirpath": str(path.parent)}},
            "checkpoint_callback_object": checkpoint_callback,
            "optimizer_states": [{"state": {0: {"step": 10, "exp_avg": torch.zeros_like(first)}},
                                  "param_groups": [{"lr": 5e-5, "params": [0]}]}],
            "lr_schedulers": [],
            "hparams_name": "kwargs",
            "hyper_parameters": hyper_parameters,
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(checkpoint, tmp)
    os.replace(tmp, path)
    return path


def write_synthetic_release(root: Path, seed: int = 0, flame_outsize: int = N_FLAME_CODE,
                            expression_outsize: int = N_EXPRESSION, include_ignored: bool = True,
                            as_zip: bool = False) -> Path:
    """Write `<root>/EMOCA_v2_lr_mse_20/` (cfg.yaml + checkpoint); return that folder.

    `flame_outsize`/`expression_outsize` other than 236/50 make a
    wrong-architecture release for error tests. With `as_zip`, also write
    `<root>/EMOCA_v2_lr_mse_20.zip` holding the folder, as downloaded.
    """
    root = Path(root)
    release = root / EMOCA_RELEASE
    release.mkdir(parents=True, exist_ok=True)
    cfg = "".join(_CFG_TEMPLATE.format(stage=stage, release=EMOCA_RELEASE) for stage in ("coarse", "detail"))
    tmp = release / "cfg.yaml.tmp"
    tmp.write_text(cfg, encoding="utf-8")
    os.replace(tmp, release / "cfg.yaml")
    write_checkpoint(release / CHECKPOINT_RELATIVE,
                     synthetic_state_dict(seed, flame_outsize, expression_outsize, include_ignored))
    if as_zip:
        target = root / f"{EMOCA_RELEASE}.zip"
        tmp_zip = target.with_name(target.name + ".tmp")
        with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_STORED) as archive:
            for file in _walk(release):
                archive.write(file, file.relative_to(root).as_posix())
        os.replace(tmp_zip, target)
    return release


def _walk(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            yield path
