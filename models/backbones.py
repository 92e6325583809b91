"""timm backbones by name, with optional local weights. Nothing here ever downloads weights.

* :func:`create_backbone` (name, weights=None, features_only=False, out_indices=None, **kw) -> nn.Module
  ``timm.create_model(name, pretrained=False, ...)`` then, when ``weights`` is a file, loads it
  (a state_dict, or a dict holding one under ``state_dict``/``model``); known foreign key layouts
  are converted first (see :data:`KEY_MAPS`). Strict: every backbone key must be present.
* :func:`backbone_normalization` (name) -> (mean, std) of the backbone's training inputs (timm cfg)
* :func:`lukemelas_efficientnet_lite0_to_timm` (state_dict) -> state_dict with timm
  ``tf_efficientnet_lite0`` keys (lukemelas/EfficientNet-PyTorch naming, as in
  shared/data/weights/efficientnet-lite0-57934424.pth).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from contracts.logs import get_logger

# the shared EfficientNet-Lite0 file, relative to the data root (models.data.data_root)
LITE0_WEIGHTS = "weights/efficientnet-lite0-57934424.pth"

log = get_logger(__name__)


class BackboneError(Exception):
    """Bad backbone name or weights file (CLI turns it into a one-line error)."""


# EfficientNet-Lite0 stage lengths (blocks per stage); timm names blocks.<stage>.<i>, lukemelas
# numbers them flat as _blocks.<n>.
_LITE0_STAGES = (1, 2, 2, 3, 3, 4, 1)
# block 0 has no expansion conv (depthwise-separable block in timm: conv_dw/bn1/conv_pw/bn2)
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# inverted-residual blocks: expand (conv_pw/bn1) -> depthwise (conv_dw/bn2) -> project (conv_pwl/bn3)
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def _flat_to_stage(n: int, stages: Sequence[int]) -> tuple[int, int]:
    for s, length in enumerate(stages):
        if n < length:
            return s, n
        n -= length
    raise KeyError(f"block index out of range: {n}")


def lukemelas_efficientnet_lite0_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = re.match(r"^_blocks\.(\d+)\.(_\w+?)\.(.+)$", key)
        if m:
            n, mod, rest = int(m.group(1)), m.group(2), m.group(3)
            stage, idx = _flat_to_stage(n, _LITE0_STAGES)
            table = _DS_BLOCK if n == 0 else _IR_BLOCK
            if mod not in table:
                raise KeyError(f"unmapped lukemelas key: {key}")
            out[f"blocks.{stage}.{idx}.{table[mod]}.{rest}"] = value
            continue
        mod, _, rest = key.partition(".")
        if mod not in _TOP:
            raise KeyError(f"unmapped lukemelas key: {key}")
        out[f"{_TOP[mod]}.{rest}"] = value
    return out


# timm model name -> (detector of the foreign layout, converter)
def _is_lukemelas(sd: dict) -> bool:
    return any(k.startswith("_blocks.") for k in sd)


KEY_MAPS: dict[str, tuple[Callable[[dict], bool], Callable[[dict], dict]]] = {
    # the shared Lite0 file is a port of Google's TensorFlow weights: build tf_efficientnet_lite0
    # ("same" padding, BN eps 1e-3); the PyTorch-native efficientnet_lite0 shares the key layout.
    "tf_efficientnet_lite0": (_is_lukemelas, lukemelas_efficientnet_lite0_to_timm),
    "efficientnet_lite0": (_is_lukemelas, lukemelas_efficientnet_lite0_to_timm),
}


def backbone_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input (mean, std) the backbone's weights were trained with, from timm's pretrained config
    (``tf_efficientnet_lite0``: 0.5 / 0.5; torchvision-style models: ImageNet mean/std)."""
    import timm

    if not timm.is_model(name):
        raise BackboneError(f"unknown timm model: {name}")
    cfg = timm.get_pretrained_cfg(name.split(".")[0]) or timm.get_pretrained_cfg(name)
    if cfg is None:
        from models.data import IMAGENET_MEAN, IMAGENET_STD

        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)


def load_state_dict_file(path: str | Path, sha256: str | None = None, *,
                         require_sha256: bool = False) -> dict[str, torch.Tensor]:
    """safetensors, or ``torch.load(weights_only=True)``; the sha256 is verified before reading when
    known (``sha256``, a ``.sha256`` sidecar, or the torch-hub name ``<name>-<hash prefix>.pth``);
    ``require_sha256`` (Settings.require_sha256) refuses a file whose digest is not known."""
    from models.artifacts import safe_load_safetensors, safe_torch_load

    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return safe_load_safetensors(path, sha256=sha256, require_sha256=require_sha256)
    obj = safe_torch_load(path, sha256=sha256, require_sha256=require_sha256)
    for k in ("state_dict", "model"):
        if isinstance(obj, dict) and k in obj and isinstance(obj[k], dict):
            obj = obj[k]
    if not isinstance(obj, dict):
        raise BackboneError(f"{path} does not hold a state_dict")
    return obj


def create_backbone(
    name: str,
    weights: str | Path | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    require_sha256: bool = False,
    **kwargs,
) -> nn.Module:
    """Create a timm model with ``pretrained=False`` and optionally load a local weights file
    (``require_sha256``: refuse weights whose digest is not known, see load_state_dict_file)."""
    import timm

    if not timm.is_model(name):
        raise BackboneError(f"unknown timm model: {name}")
    kw = dict(kwargs)
    if features_only:
        kw["features_only"] = True
        if out_indices is not None:
            kw["out_indices"] = tuple(out_indices)
    model = timm.create_model(name, pretrained=False, **kw)
    if weights is not None:
        sd = load_state_dict_file(weights, require_sha256=require_sha256)
        base = name.split(".")[0]
        if base in KEY_MAPS and KEY_MAPS[base][0](sd):
            sd = KEY_MAPS[base][1](sd)
        own = model.state_dict()
        if features_only:  # features_only models drop the head: ignore head keys
            sd = {k: v for k, v in sd.items() if k in own}
        missing = [k for k in own if k not in sd]
        if missing:
            raise BackboneError(f"weights {weights} lack {len(missing)} keys of {name}, e.g. {missing[:3]}")
        bad = [k for k in own if tuple(sd[k].shape) != tuple(own[k].shape)]
        if bad:
            raise BackboneError(f"weights {weights} shape mismatch for {name}: {bad[:3]}")
        unexpected = [k for k in sd if k not in own]
        model.load_state_dict({k: sd[k] for k in own}, strict=True)
        log.info("backbone_weights_loaded", model=name, weights=str(weights), unexpected=len(unexpected))
    return model
