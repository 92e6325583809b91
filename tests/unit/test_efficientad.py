"""EfficientAD: network shapes (paper Tables 1-3), hard loss, map normalisation, training, export."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from contracts.artifact import sha256_file
from models.efficientad import networks as nets
from models.efficientad.export import export_triton
from models.efficientad.model import EfficientAD, load_checkpoint, load_teacher_weights, save_checkpoint
from models.efficientad.serving import MODEL_PY, EfficientADServing
from models.efficientad.train import (
    TrainConfig,
    ae_augment,
    calibrate_and_predict,
    compute_map_quantiles,
    hard_feature_loss,
    predict,
    student_window,
    synthetic_auroc,
    train_efficientad,
)

REPO = Path(__file__).resolve().parents[2]
X256 = torch.zeros(1, 3, 256, 256)


@pytest.mark.parametrize("size", ["small", "medium"])
def test_pdn_shapes(size):
    with torch.no_grad():
        assert nets.pdn(size)(X256).shape == (1, 384, 56, 56)  # teacher, padding off
        assert nets.pdn(size, 768)(X256).shape == (1, 768, 56, 56)  # student: 384 (T) + 384 (AE)
        assert nets.pdn(size, padding=True)(X256).shape == (1, 384, 64, 64)  # table paddings


def test_pdn_layer_layout_matches_tables():
    s = nets.pdn_small()
    convs = [m for m in s if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0]) for c in convs] == [(128, 4), (256, 4), (256, 3), (384, 4)]
    m = nets.pdn_medium()
    convs = [c for c in m if isinstance(c, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0]) for c in convs] == [(256, 4), (512, 4), (512, 1), (512, 3), (384, 4), (384, 1)]
    # official nelson1425 teacher_small.pth keys
    assert sorted(nets.expected_teacher_keys("small")) == sorted(
        f"{i}.{p}" for i in (0, 3, 6, 8) for p in ("weight", "bias"))


def test_autoencoder_shapes():
    ae = nets.autoencoder().eval()
    with torch.no_grad():
        assert ae(X256).shape == (1, 384, 56, 56)
        assert ae[:11](X256).shape == (1, 64, 1, 1)  # encoder bottleneck (EncConv-6)
        assert nets.autoencoder(out_size=64).eval()(X256).shape == (1, 384, 64, 64)


def test_efficientad_forward_shapes():
    m = EfficientAD().eval()
    with torch.no_grad():
        st, ae = m.raw_maps(torch.zeros(2, 3, 256, 256))
        amap, score = m(torch.zeros(2, 3, 256, 256))
    assert st.shape == ae.shape == (2, 1, 56, 56)
    assert amap.shape == (2, 1, 256, 256) and score.shape == (2,)
    assert torch.allclose(score, amap.amax(dim=(1, 2, 3)))


def test_hard_loss_selects_top_fraction():
    torch.manual_seed(0)
    t = torch.randn(1, 10, 10, 10)
    s = torch.randn(1, 10, 10, 10, requires_grad=True)
    loss = hard_feature_loss(t, s, q=0.99)
    d = (t - s.detach()) ** 2
    top = d.flatten().sort().values[-10:]  # 1% of 1000 entries
    assert loss.item() == pytest.approx(top.mean().item(), rel=1e-6)
    loss.backward()
    assert int((s.grad != 0).sum()) == 10  # only the hard entries get gradient
    # q=0 selects everything -> plain MSE
    assert hard_feature_loss(t, s.detach(), q=0.0).item() == pytest.approx(d.mean().item(), rel=1e-6)


def test_quantile_normalisation_maths():
    m = EfficientAD().eval()
    m.q_st_a.fill_(1.0), m.q_st_b.fill_(3.0), m.q_ae_a.fill_(0.5), m.q_ae_b.fill_(1.5)
    st = torch.tensor([1.0, 3.0, 5.0]).reshape(1, 1, 1, 3).expand(1, 1, 3, 3).contiguous()
    ae = torch.tensor([0.5, 1.5, 2.5]).reshape(1, 1, 1, 3).expand(1, 1, 3, 3).contiguous()
    m.padding = True  # no border padding: check the formula itself at map resolution
    out = m.combine(st, ae, (3, 3))
    # 0.5 * 0.1 (st - qa)/(qb - qa) + 0.5 * 0.1 (ae - qa)/(qb - qa): q_a -> 0, q_b -> 0.1, 2q_b - q_a -> 0.2
    np.testing.assert_allclose(out[0, 0, 0].numpy(), [0.0, 0.1, 0.2], atol=1e-6)


def test_compute_map_quantiles_matches_torch_quantile():
    m = EfficientAD().eval()
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    q = compute_map_quantiles(m, x, 0.9, 0.995)
    with torch.no_grad():
        st, ae = m.raw_maps(x)
    assert q["q_st_a"] == pytest.approx(torch.quantile(st.flatten(), 0.9).item(), rel=1e-5)
    assert q["q_ae_b"] == pytest.approx(torch.quantile(ae.flatten(), 0.995).item(), rel=1e-5)
    assert m.q_st_b.item() == pytest.approx(q["q_st_b"], rel=1e-6)


def test_calibrate_and_predict_is_quantiles_then_predict_in_one_pass():
    """Training's final calibration runs the networks once: the same quantiles, maps and scores as
    compute_map_quantiles followed by predict (two passes)."""
    x = torch.randn(5, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    a, b = EfficientAD().eval(), EfficientAD().eval()
    b.load_state_dict(a.state_dict())
    q1 = compute_map_quantiles(a, x, 0.9, 0.995)
    maps1, scores1 = predict(a, x)
    q2, maps2, scores2 = calibrate_and_predict(b, x, 0.9, 0.995)
    assert q2 == q1
    assert torch.allclose(maps2, maps1, atol=1e-6) and torch.allclose(scores2, scores1, atol=1e-6)
    assert maps2.shape == (5, 1, 256, 256) and b.q_ae_b.item() == a.q_ae_b.item()


def test_student_on_a_stride_aligned_crop_is_the_full_maps_cells():
    """student_crop: the padding-free PDN on a 96 px window at a stride-4 offset gives exactly the cells of the
    full 256 px map under it, so the crop's loss is the full loss restricted to those cells."""
    import random

    pdn = nets.pdn_small(16).eval()
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = pdn(x)
        for seed in range(3):
            px, cell = student_window(96, full.shape[-1], random.Random(seed))
            crop = pdn(x[px])
            assert crop.shape[-2:] == (16, 16)
            assert torch.allclose(crop, full[cell], atol=1e-5)
    assert student_window(0, 56, random.Random(0))[1] == (slice(None),) * 4
    with pytest.raises(ValueError, match="multiple of 4"):
        student_window(98, 56, random.Random(0))


def test_ae_augment_range_and_determinism():
    import random

    img = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    a, b = ae_augment(img, random.Random(3)), ae_augment(img, random.Random(3))
    assert np.array_equal(a, b) and a.min() >= 0 and a.max() <= 1 and a.dtype == np.float32


def _write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img = (rng.random((32, 32, 3)) * 60 + 100).astype(np.uint8)
        p = folder / f"{i:03d}.png"
        cv2.imwrite(str(p), img)
        paths.append(p)
    return paths


def test_tiny_training_is_deterministic_and_stores_threshold(tmp_path):
    paths = _write_images(tmp_path / "good", 2)
    teacher = tmp_path / "teacher.pth"
    torch.manual_seed(5)
    torch.save(nets.pdn_small().state_dict(), teacher)  # official layout: plain state_dict
    cfg = TrainConfig(steps=1, val_fraction=0.5, seed=7)
    m1, meta1 = train_efficientad(paths, cfg, teacher_weights=teacher)
    m2, _ = train_efficientad(paths, cfg, teacher_weights=teacher)
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(v1, v2), k
    assert meta1["n_fit_images"] == 1 and meta1["n_val_images"] == 1
    assert set(meta1["quantiles"]) == {"q_st_a", "q_st_b", "q_ae_a", "q_ae_b"}
    assert np.isfinite(meta1["threshold"]) and np.isfinite(meta1["map_threshold"])
    assert not m1.teacher_std.eq(1).all()  # teacher normalisation computed
    ck = save_checkpoint(m1, tmp_path / "m.pt", meta1)
    m3, meta3 = load_checkpoint(ck)
    assert meta3["threshold"] == meta1["threshold"]
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(m1(x)[1], m3(x)[1])


def test_load_teacher_weights_validates(tmp_path):
    m = EfficientAD()
    good = tmp_path / "teacher_small.pth"
    sd = nets.pdn_small().state_dict()
    torch.save(sd, good)
    load_teacher_weights(m, good)
    assert torch.equal(m.teacher.state_dict()["8.weight"], sd["8.weight"])
    bad = tmp_path / "medium.pth"
    torch.save(nets.pdn_medium().state_dict(), bad)
    with pytest.raises(ValueError):
        load_teacher_weights(m, bad)


def test_distill_teacher_tiny_resumes_and_loads(tmp_path):
    from models.backbones import create_backbone
    from models.efficientad.distill import DistillConfig, FeatureTarget, distill_teacher

    _write_images(tmp_path / "imgs", 6)
    ft = FeatureTarget(create_backbone("tf_efficientnet_lite0", features_only=True, out_indices=(2, 3)))
    assert ft(torch.zeros(1, 3, 512, 512)).shape == (1, 384, 56, 56)  # PDN grid, 384 channels
    out = tmp_path / "t.safetensors"
    cfg = DistillConfig(steps=2, batch_size=2, held_out=1, stats_images=4, max_seconds=0.0, amp_bf16=False)
    meta = distill_teacher(tmp_path / "imgs", out, cfg)  # budget 0: stops before the first step
    assert meta["steps_done"] == 0 and not meta["complete"]
    assert out.with_name(out.name + ".ckpt").is_file()
    cfg.max_seconds = None
    meta = distill_teacher(tmp_path / "imgs", out, cfg)  # resumes from the checkpoint and finishes
    assert meta["steps_done"] == 2 and meta["complete"] and np.isfinite(meta["held_out_loss"])
    assert meta["input_mean"] == [0.5, 0.5, 0.5]
    prov = json.loads(out.with_suffix(".json").read_text())
    assert prov["sha256"] == sha256_file(out) and prov["steps_done"] == 2
    m = EfficientAD()
    tmeta = load_teacher_weights(m, out)
    assert tmeta["steps_done"] == 2 and m.input_mean == (0.5, 0.5, 0.5)


def test_default_teacher_is_generic_and_pinned():
    """The shipped teacher: distilled over the ImageNet sample (not a product), sha256-pinned, < 12 MB."""
    from models.efficientad.model import DEFAULT_TEACHER

    assert DEFAULT_TEACHER.is_file() and DEFAULT_TEACHER.stat().st_size < 8_000_000
    m = EfficientAD()
    meta = load_teacher_weights(m, DEFAULT_TEACHER)  # verifies the .sha256 sidecar first
    assert "imagenet-sample" in meta["image_folder"] and meta["complete"] and meta["steps_done"] >= 500
    assert meta["config"]["backbone"] == "tf_efficientnet_lite0" and meta["config"]["out_indices"] == [2, 3]
    assert m.input_mean == (0.5, 0.5, 0.5) and m.input_std == (0.5, 0.5, 0.5)


def test_export_equals_eager_and_layout(tmp_path):
    torch.manual_seed(0)
    m = EfficientAD().eval()
    m.q_st_a.fill_(0.1), m.q_st_b.fill_(0.3)
    (tmp_path / "efficientad_bottle" / "4").mkdir(parents=True)  # existing version -> export picks 5
    vdir = export_triton(m, tmp_path, "bottle", threshold=0.25, map_threshold=0.5)
    assert vdir == tmp_path / "efficientad_bottle" / "5"
    traced = torch.jit.load(str(vdir / "model.pt"))
    for b in (1, 3):  # traced with batch 2: the batch dimension stays dynamic
        x = torch.randint(0, 256, (b, 3, 256, 256), dtype=torch.uint8)  # UINT8 pixels, normalised in-graph
        with torch.no_grad():
            _, s1 = m((x.float() / 255 - 0.5) / 0.5)
            a2, s2 = traced(x)
        assert a2.shape == (b, 1, 64, 64) and a2.dtype == torch.float16 and s2.shape == (b, 1)
        torch.testing.assert_close(s2[:, 0], s1, atol=1e-5, rtol=1e-5)
    meta = json.loads((vdir / "metadata.json").read_text())
    assert meta["artifacts"]["model.pt"] == sha256_file(vdir / "model.pt")
    assert meta["artifacts"]["model.onnx"] == sha256_file(vdir / "model.onnx")
    assert meta["model"] == "efficientad_bottle" and meta["threshold"] == 0.25 and meta["input"]["height"] == 256
    assert meta["version"] == 5 and meta["input"]["dtype"] == "UINT8"
    cfg = (tmp_path / "efficientad_bottle" / "config.pbtxt").read_text()
    from contracts.pbtxt import parse_config

    parsed = parse_config(cfg)
    spec = json.loads(parsed.parameters["linewatch_spec"].string_value)
    assert spec == meta
    assert parsed.backend == "python" and "KIND_CPU" in cfg and parsed.HasField("dynamic_batching")
    from contracts.spec import parse_spec

    assert parse_spec(spec).input.width == 256
    assert (vdir / "model.py").read_text() == MODEL_PY
    # serving: sha verified, batched execute over two requests (DLPack in and out)
    srv = EfficientADServing()
    srv.pb_utils = _FakePb
    srv.initialize({"model_repository": str(vdir.parent), "model_version": "5"})
    assert srv.device == torch.device("cpu")
    reqs = [_FakeReq(np.random.default_rng(i).integers(0, 256, (n, 3, 256, 256), dtype=np.uint8)) for i, n in ((0, 1), (1, 2))]
    resps = srv.execute(reqs)
    with torch.no_grad():
        a, s = traced(torch.from_numpy(reqs[1].x))
    assert resps[1].out["anomaly_map"].shape == (2, 1, 64, 64) and resps[1].out["score"].shape == (2, 1)
    assert resps[1].out["anomaly_map"].dtype == np.float16
    np.testing.assert_allclose(resps[1].out["score"], s.numpy(), atol=1e-6)
    with pytest.raises(RuntimeError, match="no CUDA|GPU"):  # a GPU instance where torch sees no CUDA: one line
        EfficientADServing().initialize({"model_repository": str(vdir.parent), "model_version": "5",
                                         "model_instance_kind": "GPU", "model_instance_device_id": "0"})
    (vdir / "model.pt").write_bytes(b"tampered")
    with pytest.raises(RuntimeError, match="sha256"):
        EfficientADServing().initialize({"model_repository": str(vdir.parent), "model_version": "5"})


def test_triton_template_matches_generated_model_py():
    assert (REPO / "triton_repo" / "efficientad" / "model.py").read_text() == MODEL_PY


class _FakeReq:
    def __init__(self, x):
        self.x = x


class _FakeTensor:
    def __init__(self, name, arr):
        self.name, self.arr = name, arr

    def as_numpy(self):
        return self.arr

    def to_dlpack(self):
        return torch.utils.dlpack.to_dlpack(torch.from_numpy(self.arr))

    @classmethod
    def from_dlpack(cls, name, capsule):
        return cls(name, torch.utils.dlpack.from_dlpack(capsule).numpy())


class _FakeResp:
    def __init__(self, output_tensors=None, error=None):
        self.out = {t.name: t.arr for t in (output_tensors or [])}
        self.error = error


class _FakePb:
    Tensor = _FakeTensor
    InferenceResponse = _FakeResp
    TritonError = RuntimeError

    @staticmethod
    def get_input_tensor_by_name(req, name):
        return _FakeTensor(name, req.x)


def _localising_model() -> EfficientAD:
    """Teacher and student[:384] are different random PDNs without biases, so their outputs are 0
    wherever the receptive field sees only a 0 input and differ where it sees the patch; AE and
    student[384:] output 0, so M_AE = 0 everywhere."""
    torch.manual_seed(0)
    m = EfficientAD().eval()
    with torch.no_grad():
        for net in (m.teacher, m.student):
            for mod in net:
                if isinstance(mod, torch.nn.Conv2d):
                    mod.bias.zero_()
        last = m.student[-1]
        last.weight[384:].zero_()
        ae_last = m.autoencoder[-1]
        ae_last.weight.zero_(), ae_last.bias.zero_()
    return m


def test_local_difference_lands_at_its_image_position():
    """A defect patch at rows 40-55, cols 170-185 (not on the diagonal: catches a transposition) must
    peak there in the final 256x256 map (catches wrong padding/cropping/upsampling), and the uncovered
    16-px border must not be more anomalous than the normal interior (catches padding the map with 0
    after the quantile normalisation, where normal pixels are negative: the bottle pixel-AUROC bug)."""
    m = _localising_model()
    x = torch.zeros(1, 3, 256, 256)
    x[:, :, 40:56, 170:186] = 3.0
    with torch.no_grad():
        st, ae = m.raw_maps(x)
        assert float(ae.abs().max()) == 0.0 and float(st.max()) > 0
        # normal level: q_a > 0 puts every defect-free pixel (raw distance 0) below 0 after normalisation
        q = float(st.max())
        m.q_st_a.fill_(0.1 * q), m.q_st_b.fill_(0.5 * q), m.q_ae_a.fill_(0.5), m.q_ae_b.fill_(1.0)
        amap, score = m(x)
    a = amap[0, 0].numpy()
    normal = a[200:, :100]  # far from the patch, inside the region covered by the PDN
    assert np.allclose(normal, normal.flat[0]) and normal.flat[0] < 0
    border = np.concatenate([a[:16].ravel(), a[-16:].ravel(), a[:, :16].ravel(), a[:, -16:].ravel()])
    assert border.max() <= normal.flat[0] + 1e-6  # the uncovered border is "normal", not more anomalous
    r, c = np.unravel_index(np.argmax(a), a.shape)
    assert 40 - 4 <= r <= 55 + 4 and 170 - 4 <= c <= 185 + 4, (r, c)
    w = np.clip(a - normal.flat[0], 0, None)
    rows, cols = np.mgrid[0:256, 0:256]
    cy, cx = (w * rows).sum() / w.sum(), (w * cols).sum() / w.sum()
    assert abs(cy - 47.5) < 3 and abs(cx - 177.5) < 3, (cy, cx)
    assert float(score[0]) == pytest.approx(float(a.max()))
    # the anomalous support stays within the receptive field (33 px) of the patch
    assert np.all(w[rows > 55 + 40] == 0) and np.all(w[cols < 170 - 40] == 0)


def test_cpu_schedule_callback_budget_and_selection(tmp_path, monkeypatch):
    """Training knobs: the callback sees the step count, held-out CutPaste selection runs and records
    its AUROC, the best state is the one returned (restored over the last step's), the wall budget stops the
    loop before ``steps``; bf16 is off unless asked for."""
    import importlib

    from models.data import load_image

    train_mod = importlib.import_module("models.efficientad.train")  # the module (the package exports a train())

    paths = _write_images(tmp_path / "good", 3)
    teacher = tmp_path / "teacher.pth"
    torch.manual_seed(5)
    torch.save(nets.pdn_small().state_dict(), teacher)
    seen, states, real = [], {}, []

    def callback(step, model):  # runs before that step's selection; the selection does not change the weights
        seen.append((step, model.training))
        states[step] = {k: v.detach().clone() for k, v in model.named_parameters()}

    def scored(model, *args):  # the real selection score; step 1's lifted above any AUROC: its state must win
        real.append(synthetic_auroc(model, *args))
        return real[-1] + (2.0 if len(real) == 1 else 0.0)

    monkeypatch.setattr(train_mod, "synthetic_auroc", scored)
    cfg = TrainConfig(steps=2, val_fraction=0.34, seed=1, select_every=1)
    assert cfg.amp_bf16 is False
    m, meta = train_efficientad(paths, cfg, teacher_weights=teacher, callback=callback, callback_every=1)
    assert seen == [(1, True), (2, True)] and meta["steps_done"] == 2
    sel = meta["selection"]
    assert [r["step"] for r in sel] == [1, 2, 2] and len(real) == 3
    assert [r["synthetic_auroc"] for r in sel] == [real[0] + 2.0, real[1], real[2]]
    assert real[2] == pytest.approx(real[1], abs=1e-12)  # the last row re-scores step 2's weights
    assert meta["selected_step"] == 1, sel
    # the returned model IS step 1's state, not the last step's, and scores step 1's AUROC
    assert any(not torch.equal(states[1][k], states[2][k]) for k in states[1]), "the two steps' weights are equal"
    for k, v in m.named_parameters():
        assert torch.equal(v, states[1][k]), f"{k}: not the selected step's weights"
    val = [load_image(p, cfg.image_size) for p in meta["val_paths"]]
    assert synthetic_auroc(m, val, cfg.synthetic_seed, cfg.q_a, cfg.q_b) == pytest.approx(real[0], abs=1e-12)
    assert np.isfinite(meta["history"][-1]["loss"]) and np.isfinite(meta["threshold"])
    assert meta["loop_seconds"] > 0 and not m.training
    cfg = TrainConfig(steps=1000, val_fraction=0.34, seed=1, max_train_seconds=0.0)
    _, meta = train_efficientad(paths, cfg, teacher_weights=teacher)
    assert meta["steps_done"] < 1000


def test_autoencoder_input_is_augmented_afresh_every_step():
    import random

    img = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32) * 0.8
    rng = random.Random(0)
    outs = {round(float(np.abs(ae_augment(img, rng) - img).sum()), 6) for _ in range(20)}
    assert len(outs) > 10  # a new jitter each call, not one cached variant
