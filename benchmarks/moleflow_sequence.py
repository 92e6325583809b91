"""MoLE-Flow continual sequence benchmark: task 0 = MVTec AD bottle, task 1 = ELPV solar cells.

EfficientNet-Lite0 ImageNet backbone (shared/data/weights, lukemelas keys mapped to timm). Reports the
image-AUROC accuracy matrix, forgetting / BWT (target 0.000), routing accuracy (target >= 99%),
bottle image/pixel AUROC, pixel AP, AUPRO, oracle-vs-routed gap, bit-identity of task-0 outputs after
task 1, and CPU ms/image (1 torch thread). Writes benchmarks/results/moleflow_sequence.{json,png}.

    .venv/bin/python benchmarks/moleflow_sequence.py --epochs 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.data import MVTecDataset, data_root, list_images, mvtec_category_dir  # noqa: E402
from models.evaluation import write_results_json  # noqa: E402
from models.moleflow.datasets import elpv_split  # noqa: E402
from models.moleflow.evaluate import (  # noqa: E402
    TaskTestSet,
    evaluate_task,
    forgetting_bwt,
    save_matrix_png,
    strip_private,
)
from models.moleflow.model import MoLEFlow, MoLEFlowConfig  # noqa: E402
from models.moleflow.store import save_model  # noqa: E402
from models.moleflow.train import TrainConfig, extract_features, load_images, train_task  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--coupling", type=int, default=8)
    ap.add_argument("--dia", type=int, default=6)
    ap.add_argument("--elpv-train", type=int, default=150)
    ap.add_argument("--elpv-test", type=int, default=60, help="good and defective cells each")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 threads on shared cores stall badly)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="training wall-clock budget per task (s)")
    ap.add_argument("--bottle-train", type=int, default=None, help="limit bottle training images (smoke runs)")
    ap.add_argument("--bottle-test-stride", type=int, default=1, help="use every n-th bottle test image (smoke)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "moleflow_sequence.json"))
    ap.add_argument("--store", default=str(ROOT / "benchmarks" / "results" / "moleflow_store"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    weights = data_root() / "weights" / "efficientnet-lite0-57934424.pth"
    cfg = MoLEFlowConfig(dim=args.dim, subnet_hidden=args.hidden, lora_rank=args.rank, lora_alpha=float(args.rank),
                         coupling_layers=args.coupling, dia_blocks=args.dia)
    model = MoLEFlow(cfg, backbone_weights=weights)
    S = cfg.image_size

    # ---- data: features once per image
    bottle = mvtec_category_dir("bottle")
    b_train = list_images(bottle / "train" / "good")[: args.bottle_train]
    ds = MVTecDataset(bottle, "test", S)
    items = [ds[i] for i in range(0, len(ds), args.bottle_test_stride)]
    b_x = torch.stack([it["image"] for it in items])
    e_train, e_test = elpv_split(args.elpv_train, args.elpv_test, args.elpv_test)
    e_x = load_images([p for p, _ in e_test], S)
    t0 = time.perf_counter()
    f_btr = extract_features(model, b_train, desc="bottle train features")
    f_etr = extract_features(model, e_train, desc="elpv train features")
    pb, ib = extract_features(model, b_x, desc="bottle test features")
    pe, ie = extract_features(model, e_x, desc="elpv test features")
    feat_s = time.perf_counter() - t0
    sets = [
        TaskTestSet("bottle", pb, ib, [it["label"] for it in items], [it["defect_type"] for it in items],
                    masks=np.stack([it["mask"].numpy() for it in items])),
        TaskTestSet("elpv", pe, ie, [lab for _, lab in e_test], ["good" if lab == 0 else "defective" for _, lab in e_test]),
    ]
    tcfg = TrainConfig(epochs=args.epochs, time_budget_s=args.budget_s)
    metas, results, matrix = [], [], []
    order = [("bottle", b_train, f_btr), ("elpv", e_train, f_etr)]
    bottle_before = None
    for i, (task, paths, feats) in enumerate(order):
        metas.append(train_task(model, task, paths, tcfg, features=feats))
        res = {ts.task: evaluate_task(model, ts) for ts in sets[: i + 1]}
        results.append(res)
        matrix.append([res[ts.task]["routed"]["overall"]["image_auroc"] if j <= i else float("nan")
                       for j, ts in enumerate(sets)])
        with torch.no_grad():
            o = model.predict_features(pb, ib, ["bottle"] * len(pb))
        if bottle_before is None:
            bottle_before = o
        else:
            bit_identical = bool(torch.equal(o["anomaly_map"], bottle_before["anomaly_map"])
                                 and torch.equal(o["score"], bottle_before["score"]))
    fb = forgetting_bwt(matrix)
    save_model(model, args.store)

    # ---- CPU latency (1 thread, end-to-end predict incl. backbone + routing)
    torch.set_num_threads(1)
    x = torch.cat([b_x[:8], e_x[:8]])
    model.predict(x[:1])
    lat = {}
    for bs in (1, 8):
        t = time.perf_counter()
        n = 0
        for s in range(0, len(x), bs):
            model.predict(x[s:s + bs])
            n += len(x[s:s + bs])
        lat[f"batch{bs}_ms_per_image"] = (time.perf_counter() - t) * 1000 / n
    final = results[-1]
    routing = float(np.mean([final[t]["routing_accuracy"] for t in final]))
    bo = final["bottle"]["routed"]["overall"]
    summary = {
        "accuracy_matrix_image_auroc": matrix, "tasks": [t for t, _, _ in order],
        "forgetting": fb["forgetting"], "bwt": fb["bwt"], "task0_outputs_bit_identical_after_task1": bit_identical,
        "routing_accuracy": routing, "bottle_image_auroc": bo["image_auroc"], "bottle_pixel_auroc": bo.get("pixel_auroc"),
        "bottle_pixel_ap": bo.get("pixel_ap"), "bottle_aupro_30": bo.get("aupro_30"),
        "elpv_image_auroc": final["elpv"]["routed"]["overall"]["image_auroc"],
        "oracle_minus_routed": {t: final[t]["oracle_minus_routed_image_auroc"] for t in final},
        "cpu_latency_1thread": lat, "train_seconds": {m["task"]: m["train_seconds"] for m in metas},
        "feature_seconds_all_sets": round(feat_s, 1), "total_seconds": round(time.perf_counter() - t_all, 1),
    }
    out = {"summary": summary, "config": cfg.to_dict(), "train_config": metas[0]["train_config"],
           "backbone_weights": str(weights), "data": {
               "bottle": {"train": len(b_train), "test": len(items)},
               "elpv": {"train_good": len(e_train), "test": len(e_test),
                        "labels": "good = probability 0, defective = probability >= 0.5 (0.33 excluded)"}},
           "train_meta": [{k: v for k, v in m.items() if k != "losses"} | {"losses": m["losses"]} for m in metas],
           "after_each_task": strip_private(results), "forgetting_detail": fb,
           "machine": "2 shared CPU cores, no GPU; other jobs running concurrently (timings are upper bounds)"}
    write_results_json(out, args.out)
    save_matrix_png(matrix, summary["tasks"], Path(args.out).with_suffix(".png"),
                    title=f"MoLE-Flow image AUROC (routed), forgetting {fb['forgetting']:.3f}")
    print(f"matrix={np.round(np.asarray(matrix, dtype=float), 4).tolist()} forgetting={fb['forgetting']:.3f} "
          f"bwt={fb['bwt']:.3f} routing={routing:.3f} bottle_auroc={bo['image_auroc']:.4f} "
          f"bit_identical={bit_identical} lat={lat} total={summary['total_seconds']}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
