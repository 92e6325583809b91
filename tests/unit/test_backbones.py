"""models.backbones: lukemelas -> timm EfficientNet-Lite0 key map, local weights, no downloads."""

from __future__ import annotations

import pytest
import torch

from models.backbones import BackboneError, create_backbone, lukemelas_efficientnet_lite0_to_timm
from models.data import data_root

WEIGHTS = data_root() / "weights" / "efficientnet-lite0-57934424.pth"


def _timm_lite0_state():
    import timm

    return timm.create_model("efficientnet_lite0", pretrained=False).state_dict()


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="shared EfficientNet-Lite0 weights not available")
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


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="shared EfficientNet-Lite0 weights not available")
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
