"""MoLE-Flow invariants: invertibility, exact log-det, parameter isolation (bit-identical earlier tasks),
artifact integrity, real-image routing (bottle vs ELPV), serving batch semantics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.moleflow.model import MoLEFlow, MoLEFlowConfig
from models.moleflow.store import ArtifactError, list_adapters, load_model, save_model
from models.moleflow.train import TrainConfig, train_task
from tests.harness.requires import require_module

TINY = dict(grid=14, dim=16, subnet_hidden=16, lora_rank=4, lora_alpha=4.0, coupling_layers=2, dia_blocks=2, image_size=64)


def _perturb(model: MoLEFlow, task: str, scale: float = 0.3) -> None:
    """Give every float parameter non-trivial values (zero-init output layers make the flow ~identity)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.base_parameters() + model.task_parameters(task):
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    model = MoLEFlow(MoLEFlowConfig(**TINY))
    xa = torch.randn(6, 3, 64, 64)
    xb = torch.randn(6, 3, 64, 64) * 0.5 + 1.5
    cfg = TrainConfig(epochs=2, batch_size=3, progress=False)
    train_task(model, "a", xa, cfg)
    return model, xa, xb, cfg


def test_flow_is_invertible():
    torch.manual_seed(0)
    m = MoLEFlow(MoLEFlowConfig(**TINY))
    m.add_task("a")
    _perturb(m, "a")
    patch, _ = m.extract(torch.randn(2, 3, 64, 64))
    m.double()
    with torch.no_grad():
        x, z, ld = m.flow_forward(patch.double(), "a")
        x_back, ld_rev = m.transform(z, "a", rev=True)
    assert not torch.allclose(z, x, atol=1e-2)  # non-trivial transform
    torch.testing.assert_close(x_back, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ld_rev, -ld, rtol=1e-9, atol=1e-9)


def test_logdet_equals_autograd_jacobian():
    torch.manual_seed(0)
    cfg = MoLEFlowConfig(**{**TINY, "dim": 8, "subnet_hidden": 8, "grid": 3})
    m = MoLEFlow(cfg).double()
    m.add_task("a")
    m.double()
    _perturb(m, "a", 0.5)
    x = torch.randn(cfg.grid * cfg.grid, cfg.dim, dtype=torch.float64)  # one image: 9 patches x D=8

    def f(v):
        return m.transform(v.reshape(-1, cfg.dim), "a")[0].reshape(-1)

    J = torch.autograd.functional.jacobian(f, x.reshape(-1))  # [72, 72], includes cross-patch context terms
    sign, logabs = torch.linalg.slogdet(J)
    _, ld = m.transform(x, "a")
    assert sign != 0
    torch.testing.assert_close(ld.sum(), logabs, rtol=1e-8, atol=1e-8)


def test_later_task_leaves_earlier_outputs_bit_identical(tiny_pair):
    m, xa, xb, cfg = tiny_pair
    before_state = {k: v.clone() for k, v in m.state_dict().items()}
    before = m.predict(xa, ["a"] * len(xa))
    before_routed = m.predict(xa)
    train_task(m, "b", xb, cfg)
    after = m.predict(xa, ["a"] * len(xa))
    for k in ("anomaly_map", "score", "route_distance", "patch_nll"):
        assert torch.equal(before[k], after[k]), k
    after_routed = m.predict(xa)
    assert after_routed["task"] == ["a"] * len(xa)
    assert torch.equal(after_routed["score"], before_routed["score"])
    for k, v in before_state.items():  # base and task a tensors untouched
        assert torch.equal(v, m.state_dict()[k]), k
    # only b's own parameters were created for b
    assert all(p.requires_grad is False for p in m.parameters())
    assert m.predict(xb)["task"] == ["b"] * len(xb)


def test_store_roundtrip_subset_and_integrity(tiny_pair, tmp_path):
    m, xa, xb, cfg = tiny_pair
    if "b" not in m.tasks:
        train_task(m, "b", xb, cfg)
    save_model(m, tmp_path / "store")
    assert list_adapters(tmp_path / "store") == ["a", "b"]
    only_a = load_model(tmp_path / "store", ["a"])
    assert only_a.tasks == ["a"]
    assert torch.equal(only_a.predict(xa, ["a"] * 6)["score"], m.predict(xa, ["a"] * 6)["score"])
    both = load_model(tmp_path / "store")
    assert torch.equal(both.predict(xb)["anomaly_map"], m.predict(xb)["anomaly_map"])
    meta = json.loads((tmp_path / "store/adapters/b/adapter.json").read_text())
    assert len(meta["sha256"]) == 64 and meta["threshold"] == pytest.approx(m.thresholds["b"]["threshold"])
    # tampering is detected before anything is loaded
    p = tmp_path / "store/adapters/b/adapter.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_model(tmp_path / "store", ["a", "b"])
    assert load_model(tmp_path / "store", ["a"]).tasks == ["a"]


def test_lora_init_and_whitening_bounds():
    m = MoLEFlow(MoLEFlowConfig(**TINY))
    m.add_task("a")
    sn = m.subnets[0]
    assert torch.count_nonzero(sn.s1.lora_B["a"]) == 0 and torch.count_nonzero(sn.s1.lora_A["a"]) > 0
    gamma = 0.5 + 1.5 * torch.sigmoid(m.wa_gamma["a"])
    assert torch.allclose(gamma, torch.ones_like(gamma), atol=5e-3)  # gamma_raw = -0.7 -> ~1.0
    with torch.no_grad():
        m.wa_gamma["a"].fill_(50.0)
        m.wa_beta["a"].fill_(-50.0)
    f1 = torch.randn(1, m.cfg.grid, m.cfg.grid, m.cfg.dim)
    with torch.no_grad():
        m.scm_gate["a"].fill_(-50.0)  # alpha -> 0: output = WA output
        out = m.adapt(f1, "a")
    white = torch.nn.functional.layer_norm(f1, (m.cfg.dim,))
    torch.testing.assert_close(out, 2.0 * white - 2.0, rtol=1e-4, atol=1e-4)  # gamma <= 2, beta >= -2
    with pytest.raises(ValueError):
        m.add_task("bad name!")


def test_router_real_images_bottle_vs_elpv(shared_data):
    require_module("elpv_dataset", "elpv-dataset is not installed (the [dev] extra: make venv)")
    from models.data import list_images
    from models.moleflow.datasets import elpv_split
    from models.moleflow.train import extract_features

    weights = shared_data / "weights" / "efficientnet-lite0-57934424.pth"
    torch.set_num_threads(1)
    m = MoLEFlow(MoLEFlowConfig(**{**TINY, "image_size": 224}), backbone_weights=weights)
    bottle = shared_data / "mvtec" / "bottle"
    b_train = list_images(bottle / "train" / "good")[:16]
    b_test = list_images(bottle / "test" / "good")[:4] + list_images(bottle / "test" / "broken_large")[:3] \
        + list_images(bottle / "test" / "contamination")[:3]
    e_train, e_test = elpv_split(n_train=16, n_test_good=5, n_test_bad=5, seed=3)
    for name, paths in (("bottle", b_train), ("elpv", e_train)):
        m.add_task(name)
        m.set_prototype(name, extract_features(m, paths, progress=False)[1])
    _, gb = extract_features(m, b_test, progress=False)
    _, ge = extract_features(m, [p for p, _ in e_test], progress=False)
    routed_b, db = m.route(gb)
    routed_e, de = m.route(ge)
    assert routed_b == ["bottle"] * len(b_test)
    assert routed_e == ["elpv"] * len(e_test)
    assert torch.all(db > 0) and torch.all(de > 0)


class _FakeTensor:  # the slice of triton_python_backend_utils.Tensor the serving code uses
    def __init__(self, name, arr):
        self.name, self.arr = name, arr

    def as_numpy(self):
        return self.arr

    def to_dlpack(self):
        return torch.utils.dlpack.to_dlpack(torch.from_numpy(self.arr))

    @classmethod
    def from_dlpack(cls, name, capsule):
        return cls(name, torch.utils.dlpack.from_dlpack(capsule).numpy())


class _FakePB:
    class TritonError:
        def __init__(self, msg):
            self.msg = msg

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.outputs = {t.name: t.arr for t in (output_tensors or [])}
            self.error = error

    Tensor = _FakeTensor

    @staticmethod
    def get_input_tensor_by_name(req, name):
        return req.get(name)


def test_serving_execute_mixed_batch(tiny_pair, tmp_path):
    from contracts.spec import normalise, parse_spec
    from models.moleflow.export import export_triton
    from models.moleflow.serving import MoLEFlowServing

    m, xa, xb, cfg = tiny_pair
    if "b" not in m.tasks:
        train_task(m, "b", xb, cfg)
    save_model(m, tmp_path / "store")
    vdir = export_triton(tmp_path / "store", tmp_path / "repo", "moleflow")
    cfg_txt = (vdir.parent / "config.pbtxt").read_text()
    assert "dynamic_batching" in cfg_txt and 'name: "task"' in cfg_txt and "optional: true" in cfg_txt
    spec = parse_spec(json.loads((vdir / "metadata.json").read_text()))
    assert spec.tasks == ("a", "b") and spec.detector == "moleflow" and spec.input.height == 64
    assert set(spec.raw["artifacts"]) >= {"base.safetensors", "adapters/b/adapter.safetensors"}

    assert spec.input.dtype == "UINT8"
    srv = MoLEFlowServing()
    srv.pb_utils = _FakePB
    srv.initialize({"model_repository": str(vdir.parent), "model_version": vdir.name})
    rng = np.random.default_rng(0)
    pa = rng.integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)  # uint8 pixels in, normalised in-graph
    pb = rng.integers(200, 240, (1, 3, 64, 64), dtype=np.uint8)
    reqs = [
        {"image": _FakeTensor("image", pa)},  # no task -> routed
        {"image": _FakeTensor("image", pb), "task": _FakeTensor("task", np.array([[b"b"]], dtype=object))},
        {"image": _FakeTensor("image", pa[:1]), "task": _FakeTensor("task", np.array([[b"zzz"]], dtype=object))},
    ]
    r = srv.execute(reqs)
    assert r[2].error is not None and "unknown task" in r[2].error.msg
    assert r[1].outputs["task"][0, 0] == b"b"
    eager = m.predict(torch.from_numpy(normalise(pa, spec)), calibrated=True)
    assert [t[0].decode() for t in r[0].outputs["task"]] == eager["task"]
    np.testing.assert_allclose(r[0].outputs["score"][:, 0], eager["score"].numpy(), rtol=1e-5, atol=1e-5)
    amap = r[0].outputs["anomaly_map"]  # FP16 at the flow grid (native resolution)
    assert amap.shape == (2, 1, m.cfg.grid, m.cfg.grid) and amap.dtype == np.float16
    mthr = np.array([m.thresholds[t]["map_threshold"] for t in eager["task"]])[:, None, None]
    np.testing.assert_allclose(amap[:, 0].astype(np.float32), eager["patch_nll"].numpy() - mthr, rtol=2e-3, atol=2e-3)
    assert r[1].outputs["route_distance"].shape == (1, 1)
    # a second export is a new version carrying the same adapters
    v2 = export_triton(tmp_path / "store", tmp_path / "repo", "moleflow")
    assert v2.name == "2" and (v2 / "adapters/a/adapter.safetensors").is_file()


def test_main_input_path_has_no_learned_parameters():
    """MoLE-Flow paper, Patch Maker + eq. 2: F' = pooled backbone patches + P; the learned projection
    only feeds the additive scale context. With that context zeroed, embed() is exactly F + P."""
    torch.manual_seed(0)
    m = MoLEFlow(MoLEFlowConfig(**{**TINY, "dim": None}))
    assert m.cfg.dim == m.feat_channels == 176  # tf_efficientnet_lite0 stages 1+2+3: 24 + 40 + 112 channels
    patch, _ = m.extract(torch.randn(2, 3, 64, 64))
    with torch.no_grad():
        for p in list(m.proj.parameters()) + list(m.scale_ctx.parameters()):
            p.zero_()
        f = m.embed(patch)
    torch.testing.assert_close(f, patch.permute(0, 2, 3, 1) + m.pos)
    small = MoLEFlow(MoLEFlowConfig(**TINY))  # D=16 < 176: parameter-free channel average pooling
    with torch.no_grad():
        for p in list(small.proj.parameters()) + list(small.scale_ctx.parameters()):
            p.zero_()
        pooled = torch.nn.functional.adaptive_avg_pool1d(patch.permute(0, 2, 3, 1).reshape(-1, 1, 176), 16)
        torch.testing.assert_close(small.embed(patch), pooled.reshape(2, *patch.shape[-2:], 16) + small.pos)


def test_grid_28_keeps_stride8_resolution():
    m = MoLEFlow(MoLEFlowConfig(**{**TINY, "grid": 28, "image_size": 224}))
    patch, image = m.extract(torch.randn(1, 3, 224, 224))
    assert patch.shape == (1, 176, 28, 28) and image.shape == (1, 176)
    m.add_task("a")
    nll, ld = m.patch_nll(patch, "a")
    assert nll.shape == ld.shape == (1, 28, 28)


def test_regularisers_at_the_papers_strength():
    """Log-det regulariser lambda * mean(logdet^2) and identity regulariser in nats (the paper's units);
    the training step divides the whole sum by D once."""
    from models.moleflow.train import identity_loss, tail_aware_loss

    cfg = TrainConfig(tail_weight=0.5, tail_top=0.05, logdet_reg=1e-4)
    nll = torch.zeros(2, 4, 4)
    ld = torch.full((2, 4, 4), 30.0)
    assert float(tail_aware_loss(nll, ld, cfg)) == pytest.approx(1e-4 * 900.0)
    nll = torch.arange(32, dtype=torch.float32).reshape(2, 4, 4)
    top = torch.tensor([15.0, 31.0]).mean()  # top 5% of 16 patches = 1 per image
    expect = 0.5 * nll.mean() + 0.5 * top
    assert float(tail_aware_loss(nll, torch.zeros_like(nll), cfg)) == pytest.approx(float(expect))
    m = MoLEFlow(MoLEFlowConfig(**TINY))
    m.add_task("a")
    assert float(identity_loss(m, "a")) == pytest.approx(0.0, abs=1e-3)  # gamma ~ 1, beta = 0 at init
    with torch.no_grad():
        m.wa_beta["a"].fill_(10.0)  # beta -> 2
    assert float(identity_loss(m, "a")) == pytest.approx(4.0, abs=1e-3)


def test_to_meta_leaves_no_tensor_behind(tiny_pair):
    """Everything the model computes with moves with .to(device): the router prototypes are buffers, the
    merged LoRA weights too (a GPU server moves the loaded model once; a tensor left on the CPU would
    make every request fail or copy)."""
    import copy

    m = copy.deepcopy(tiny_pair[0])
    m.set_prototype("a", torch.randn(8, m.feat_channels))
    m.merge_lora()
    m.to("meta")
    left = [k for k, v in [*m.named_parameters(), *m.named_buffers()] if v.device.type != "meta"]
    stray = [f"{name}.{k}" for name, mod in m.named_modules() for k, v in vars(mod).items()
             if k not in ("_parameters", "_buffers", "_modules") and _tensors_in(v)]
    assert not left and not stray, (left, stray)
    assert m.router["a"].prec.device.type == "meta"


def _tensors_in(v) -> bool:
    if isinstance(v, torch.Tensor):
        return v.device.type != "meta"
    if isinstance(v, dict):
        return any(_tensors_in(x) for x in v.values())
    if isinstance(v, list | tuple):
        return any(_tensors_in(x) for x in v)
    return False


def test_merged_lora_is_the_same_function(tiny_pair):
    """Serving folds W_base + (alpha/r) B_t A_t into one weight per task (MoLE-Flow paper, §3.4.1): same
    outputs, routed and forced, within float32 rounding."""
    import copy

    m, xa, xb, _ = tiny_pair
    merged = copy.deepcopy(m)
    _perturb(merged, "a", 0.05)  # non-zero B so the merge is not a no-op
    ref = copy.deepcopy(merged)
    merged.merge_lora()
    for tasks in (None, ["a"] * len(xa)):
        want, got = ref.predict(xa, tasks), merged.predict(xa, tasks)
        assert got["task"] == want["task"]
        torch.testing.assert_close(got["patch_nll"], want["patch_nll"], rtol=1e-4, atol=1e-4)
