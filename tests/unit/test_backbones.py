"""models.backbones: lukemelas -> timm EfficientNet-Lite0 key map, local weights, no downloads."""

from __future__ import annotations

import pytest
import torch

from contracts.config import Settings
from models.backbones import BackboneError, create_backbone, lukemelas_efficientnet_lite0_to_timm
from models.data import data_root
from tests.harness.requires import requires

WEIGHTS = data_root(Settings()) / "weights" / "efficientnet-lite0-57934424.pth"


def _timm_lite0_state():
    import timm

    return timm.create_model("efficientnet_lite0", pretrained=False).state_dict()


@requires(WEIGHTS.is_file(), f"shared EfficientNet-Lite0 weights not found at {WEIGHTS} (set LINEWATCH_DATA_DIR)")
def test_lukemelas_keys_all_map_with_matching_shapes():
    sd = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    mapped = lukemelas_efficientnet_lite0_to_timm(sd)
    own = _timm_lite0_state()
    assert len(mapped) == len(sd) == len(own)
    assert set(mapped) == set(own)
    for k, v in own.items():
        assert tuple(mapped[k].shape) == tuple(v.shape), k


def test_key_map_on_synthetic_layout():
    # build a lukemelas-named state dict from the timm model (inverse direction) and map it back
    own = _timm_lite0_state()
    fake = {"_conv_stem.weight": own["conv_stem.weight"], "_blocks.0._depthwise_conv.weight": own["blocks.0.0.conv_dw.weight"],
            "_blocks.1._expand_conv.weight": own["blocks.1.0.conv_pw.weight"],
            "_blocks.15._project_conv.weight": own["blocks.6.0.conv_pwl.weight"], "_fc.bias": own["classifier.bias"]}
    mapped = lukemelas_efficientnet_lite0_to_timm(fake)
    assert set(mapped) == {"conv_stem.weight", "blocks.0.0.conv_dw.weight", "blocks.1.0.conv_pw.weight",
                           "blocks.6.0.conv_pwl.weight", "classifier.bias"}
    with pytest.raises(KeyError):
        lukemelas_efficientnet_lite0_to_timm({"_blocks.1._se_reduce.weight": torch.zeros(1)})


@requires(WEIGHTS.is_file(), f"shared EfficientNet-Lite0 weights not found at {WEIGHTS} (set LINEWATCH_DATA_DIR)")
def test_create_backbone_loads_local_file_features_only():
    m = create_backbone("efficientnet_lite0", WEIGHTS, features_only=True, out_indices=(2, 3, 4)).eval()
    sd = lukemelas_efficientnet_lite0_to_timm(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    assert torch.equal(m.state_dict()["conv_stem.weight"], sd["conv_stem.weight"])
    with torch.no_grad():
        feats = m(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [40, 112, 320]


def test_create_backbone_random_and_errors(tmp_path):
    m = create_backbone("efficientnet_lite0")  # random weights, pretrained=False
    assert sum(p.numel() for p in m.parameters()) > 1e6
    with pytest.raises(BackboneError):
        create_backbone("no_such_model_xyz")
    with pytest.raises(BackboneError):
        create_backbone("efficientnet_lite0", tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"conv_stem.weight": torch.zeros(1)}, bad)
    with pytest.raises(BackboneError):
        create_backbone("efficientnet_lite0", bad)


SAMPLE = data_root(Settings()) / "imagenet-sample"


@requires(WEIGHTS.is_file() and SAMPLE.is_dir(), f"shared Lite0 weights / ImageNet sample missing ({WEIGHTS}, {SAMPLE})")
def test_tf_lite0_with_its_normalisation_classifies_the_imagenet_sample():
    """The shared Lite0 file is a TensorFlow port: tf_efficientnet_lite0 ("same" padding, BN eps 1e-3) with
    inputs at mean = std = 0.5 classifies it; the PyTorch-native build with ImageNet mean/std does not as
    well. 100 images (every 10th); label = index in sorted WordNet-id order."""
    import numpy as np

    from models.backbones import backbone_normalization
    from models.data import IMAGENET_MEAN, IMAGENET_STD, list_images, load_image, normalize

    paths = list_images(SAMPLE)
    assert len(paths) == 1000
    wnids = sorted(p.name.split("_")[0] for p in paths)
    picked = paths[::10]
    labels = torch.tensor([wnids.index(p.name.split("_")[0]) for p in picked])
    imgs = [load_image(p, 224) for p in picked]

    def top1(name, mean, std):
        m = create_backbone(name, WEIGHTS).eval()
        with torch.no_grad():
            x = torch.stack([normalize(im, mean, std) for im in imgs])
            pred = torch.cat([m(x[i:i + 25]).argmax(1) for i in range(0, len(x), 25)])
        return float((pred == labels).float().mean())

    mean, std = backbone_normalization("tf_efficientnet_lite0")
    assert mean == std == (0.5, 0.5, 0.5)
    acc_tf = top1("tf_efficientnet_lite0", mean, std)
    acc_pt = top1("efficientnet_lite0", IMAGENET_MEAN, IMAGENET_STD)
    assert acc_tf >= 0.80 and acc_tf > acc_pt + 0.1, (acc_tf, acc_pt)
    assert np.isfinite(acc_pt)
