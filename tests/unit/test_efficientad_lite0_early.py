"""The lite0-early teacher (EfficientNet-Lite0 stage 1 + the first block of stage 2 at 256 px, reflect
padding, fixed orthogonal projection to 384 channels) and the training's teacher-output cache."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from models.efficientad import networks as nets
from models.efficientad.feature_teacher import LITE0_EARLY_CHANNELS, Lite0EarlyTeacher, lite0_early_teacher
from models.efficientad.model import (
    EfficientAD,
    load_checkpoint,
    load_feature_teacher_weights,
    save_checkpoint,
)
from models.efficientad.teacher_cache import TeacherCache, ae_augment


@pytest.fixture(scope="module")
def lite0(shared_data):
    from models.backbones import LITE0_WEIGHTS

    return shared_data / LITE0_WEIGHTS


@pytest.fixture(scope="module")
def bottle_raw(shared_data):
    from models.data import list_images, load_image

    return [load_image(p, 256) for p in list_images(shared_data / "mvtec" / "bottle" / "train" / "good")[:3]]


def test_shape_grid_and_receptive_field():
    """(B, 384, 56, 56) at 256 px, the PDN's unpadded grid; output cell i depends only on input pixels
    near the PDN-S cell's window 4i..4i+32 (theoretical receptive field 59 px, centred on 4i+16)."""
    t = lite0_early_teacher()  # random backbone weights: geometry only
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert t(x).shape == (2, nets.TEACHER_CHANNELS, nets.OUT_SIZE_NOPAD, nets.OUT_SIZE_NOPAD) == (2, 384, 56, 56)
        assert t.features(x).shape == (2, LITE0_EARLY_CHANNELS, 56, 56)
    xg = x[:1].clone().requires_grad_(True)
    t.features(xg)[0, :, 28, 28].sum().backward()
    rows = torch.nonzero(xg.grad[0].abs().sum(dim=(0, 2))).flatten()
    lo, hi = int(rows.min()), int(rows.max())
    assert hi - lo + 1 <= 59 and (lo + hi) / 2 == 4 * 28 + 16, (lo, hi)


def test_reflect_padding_leaves_no_border_ring():
    """A constant image gives a spatially constant feature map, border cells included: no convolution
    sees a zero pad past the image edge (timm's TF-"same" zero padding would darken the border)."""
    t = lite0_early_teacher()
    assert not any(isinstance(m, torch.nn.Conv2d) and m.padding_mode != "reflect" and max(m.kernel_size) > 1
                   for m in t.modules())
    with torch.no_grad():
        f = t.features(torch.full((1, 3, 256, 256), 0.3))
    assert torch.allclose(f, f[:, :, 28:29, 28:29].expand_as(f), atol=1e-4)


def test_projection_is_fixed_orthogonal_and_checkpointed(tmp_path):
    a, b = lite0_early_teacher(), lite0_early_teacher()
    assert torch.equal(a.projection, b.projection)  # seeded: the same matrix every construction
    q = a.projection[:, :, 0, 0]
    assert q.shape == (384, LITE0_EARLY_CHANNELS)
    torch.testing.assert_close(q.T @ q, torch.eye(LITE0_EARLY_CHANNELS), atol=1e-5, rtol=0)
    m = EfficientAD(teacher_kind="lite0-early").eval()
    assert "teacher.projection" in m.state_dict()
    with torch.no_grad():
        m.teacher.projection.mul_(-1.0)  # a checkpoint carries its own projection, not a re-seeded one
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y1, y2 = m.teacher(x), m.teacher(x)
    assert torch.equal(y1, y2)
    m2, _ = load_checkpoint(save_checkpoint(m, tmp_path / "m.pt", {"threshold": 0.0}))
    assert m2.teacher_kind == "lite0-early" and isinstance(m2.teacher, Lite0EarlyTeacher)
    assert torch.equal(m2.teacher.projection, m.teacher.projection)
    with torch.no_grad():
        assert torch.equal(m2.teacher(x), y1)


def test_cache_targets_equal_live_teacher(lite0, bottle_raw):
    """The cached (fp16, pre-projection) targets are the live teacher's normalised features of the same
    clean / augmented image; the augmentations are the AE's (ae_augment, same draws); Alg. 1 stats equal
    the ones from the live outputs."""
    m = EfficientAD(teacher_kind="lite0-early")
    load_feature_teacher_weights(m, lite0)
    cache = TeacherCache(m, bottle_raw, random.Random(3), k=2)
    cache.set_normalization()
    assert cache.k == 2 and cache.codes.dtype == torch.float16
    assert cache.codes.shape == (3, 3, LITE0_EARLY_CHANNELS, 56, 56)
    assert cache.nbytes == 3 * 3 * LITE0_EARLY_CHANNELS * 56 * 56 * 2  # N (K+1) C h w x 2 bytes
    rng = random.Random(3)
    assert np.array_equal(cache.image(0, 0), ae_augment(bottle_raw[0], rng))  # draw order: image-major
    assert np.array_equal(cache.image(0, 1), ae_augment(bottle_raw[0], rng))
    with torch.no_grad():
        raw = torch.cat([m.teacher(cache.augmented_input(i, -1)) for i in range(3)])
        mean = raw.mean(dim=(0, 2, 3), keepdim=True)
        std = ((raw - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True).sqrt()
        torch.testing.assert_close(m.teacher_mean, mean, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(m.teacher_std, std, atol=2e-3, rtol=1e-3)
        for i, k in ((0, 0), (2, 1)):
            t_clean, t_aug = cache.targets(i, k)
            live_aug = m.teacher_features(cache.augmented_input(i, k))
            live_clean = m.teacher_features(cache.augmented_input(i, -1))
            assert not torch.allclose(live_aug, live_clean, atol=1e-2)  # the augmentation changed the target
            torch.testing.assert_close(t_aug, live_aug, atol=1e-2, rtol=1e-2)  # fp16 storage
            torch.testing.assert_close(t_clean, live_clean, atol=1e-2, rtol=1e-2)
            torch.testing.assert_close(cache.clean_target(i), t_clean)


def test_cache_k_is_cut_by_steps_and_memory():
    """A 384-channel teacher (PDN, lite0-features) stores its output; K is cut to ceil(steps / N) and to the byte cap; K = 0
    keeps the clean outputs only (the live-teacher loop)."""
    torch.manual_seed(0)
    m = EfficientAD()
    m.teacher = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Conv2d(3, 384, 9))  # a cheap 384-channel teacher
    imgs = [np.random.default_rng(i).random((256, 256, 3)).astype(np.float32) for i in range(2)]
    per_copy = 2 * 384 * 56 * 56 * 2
    c = TeacherCache(m, imgs, random.Random(0), k=4, steps=3, max_bytes=10 * per_copy)
    assert c.k == 2 and c.codes.shape == (2, 3, 384, 56, 56)  # ceil(3 / 2)
    c = TeacherCache(m, imgs, random.Random(0), k=4, max_bytes=per_copy - 1)
    assert c.k == 0 and c.codes.shape[1] == 1
    c.set_normalization()
    with torch.no_grad():
        torch.testing.assert_close(c.clean_target(1), m.teacher_features(c.augmented_input(1, -1)), atol=1e-2, rtol=1e-2)


def test_tiny_training_with_the_cli_default(shared_data, tmp_path):
    """``efficientad train`` with no teacher option: lite0-early, the teacher cache and the pretraining
    penalty on <data>/imagenet-sample; the checkpoint reloads to the same scores."""
    from models.cli import main
    from models.efficientad.cli import DEFAULT_TEACHER_KIND

    assert DEFAULT_TEACHER_KIND == "lite0-early"
    good = tmp_path / "good"
    good.mkdir()
    for p in sorted((shared_data / "mvtec" / "bottle" / "train" / "good").glob("*.png"))[:3]:
        (good / p.name).symlink_to(p)
    ckpt = tmp_path / "m.pt"
    assert main(["efficientad", "train", "--train-dir", str(good), "--out", str(ckpt), "--steps", "1"]) == 0
    model, meta = load_checkpoint(ckpt)
    assert model.teacher_kind == "lite0-early" and meta["teacher_provenance"]["padding"] == "reflect"
    assert meta["teacher_cache"]["k"] == 1  # ceil(1 step / 2 fit images)
    assert meta["config"]["penalty_dir"] == str(shared_data / "imagenet-sample")
    h = meta["history"][-1]
    assert h["penalty"] > 0 and all(np.isfinite(v) for v in h.values())
    assert np.isfinite(meta["threshold"]) and not model.teacher_std.eq(1).all()


def test_missing_penalty_folder_is_logged_not_fatal(tmp_path):
    from contracts.config import Settings
    from models.efficientad.cli import _penalty_dir

    class Args:
        no_penalty = False
        penalty_dir = None
        settings = Settings(data_dir=tmp_path)

    assert _penalty_dir(Args) is None  # <tmp>/imagenet-sample does not exist: no penalty, no error
    (tmp_path / "imagenet-sample").mkdir()
    (tmp_path / "imagenet-sample" / "a.png").write_bytes(b"")
    assert _penalty_dir(Args) == str(tmp_path / "imagenet-sample")
    Args.no_penalty = True
    assert _penalty_dir(Args) is None


def test_onnx_serving_graph_equals_eager(tmp_path):
    """The uint8 serving graph of a lite0-early model (reflect pads, the projection buffer) exports to
    ONNX and onnxruntime gives the eager map and score."""
    from models.efficientad.onnx_graph import ServingGraph, example_input, export_onnx, onnx_session, run_onnx

    torch.manual_seed(0)
    m = EfficientAD(teacher_kind="lite0-early").eval()
    m.q_st_a.fill_(0.5), m.q_st_b.fill_(3.0), m.q_ae_a.fill_(0.5), m.q_ae_b.fill_(2.0)
    graph = ServingGraph(m, map_dtype=torch.float32)
    px = example_input(3, seed=5)
    with torch.no_grad():
        amap, score = graph(px)
    onnx_map, onnx_score = run_onnx(onnx_session(export_onnx(graph, tmp_path / "m.onnx")), px.numpy())
    assert onnx_map.shape == (3, 1, 64, 64) and onnx_score.shape == (3, 1)
    np.testing.assert_allclose(onnx_map, amap.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(onnx_score, score.numpy(), atol=1e-4, rtol=0)
