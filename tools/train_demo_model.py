"""Train the bundled demo network (a small VGG without batch norm) and export it to ONNX.

    .venv/bin/python tools/train_demo_model.py                 # writes models/demo_vgg.onnx
    .venv/bin/python tools/train_demo_model.py --target-check  # also: frozen-features head on the target task

The network stands in for the 2017 notebook's ImageNet VGG16: three VGG blocks
(two 3x3 conv + ReLU each, then 2x2 max pool; 32-64-128 channels), flatten, two
hidden dense layers (256-256, ReLU + Dropout 0.5) and a 10-way classifier, all
without batch norm. It is trained on the procedural ``source`` task of
``onnxbn.demo.data`` (no downloads), seeded and single-process on 2 CPU threads,
so a rerun on the same machine reproduces the file.

After export the script checks onnxruntime against torch (<= 1e-5 relative) and
fails otherwise, then writes the model atomically and prints the numbers for the
model card (models/README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxbn.demo import data as demo_data  # noqa: E402

# Seeds of the splits. The demo and the tests use other seeds for their own data.
TRAIN_SEED, VAL_SEED = 1000, 1001
TARGET_TRAIN_SEED, TARGET_VAL_SEED = 2000, 2001


class DemoVGG(nn.Module):
    """torchvision-like layout: ``features`` (convs) and ``classifier`` (dense)."""

    def __init__(self, num_classes: int = 10, widths=(32, 64, 128), hidden: int = 256, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.ReLU(inplace=True),
                       nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2, 2)]
            c_in = w
        self.features = nn.Sequential(*layers)
        side = demo_data.IMAGE_SIZE // 2 ** len(widths)
        self.classifier = nn.Sequential(
            nn.Linear(c_in * side * side, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        # torchvision's VGG initialisation: trains a no-BN VGG from scratch reliably
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:  # as torchvision's init: a Conv2d built with bias=False has none
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def set_determinism(seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(x)


def augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip (the shapes are mirror-symmetric as classes)."""
    flip = torch.rand(xb.shape[0], generator=gen) < 0.5
    xb = xb.clone()
    xb[flip] = xb[flip].flip(-1)
    return xb


def train(args) -> tuple[DemoVGG, dict]:
    t0 = time.perf_counter()
    xtr_u8, ytr = demo_data.make_task("source", args.n_train, TRAIN_SEED)
    xva_u8, yva = demo_data.make_task("source", args.n_val, VAL_SEED)
    xtr = torch.from_numpy(demo_data.to_model_input(xtr_u8))
    xva = torch.from_numpy(demo_data.to_model_input(xva_u8))
    ytr, yva = torch.from_numpy(ytr), torch.from_numpy(yva)
    t_data = time.perf_counter() - t0
    print(f"data: {len(xtr)} train / {len(xva)} val source images in {t_data:.1f}s", flush=True)

    model = DemoVGG(num_classes=len(demo_data.CLASSES["source"]))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.epochs * ((len(xtr) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(args.seed)
    t1 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        total, seen = 0.0, 0
        for i in range(0, len(xtr), args.batch_size):
            idx = perm[i:i + args.batch_size]
            xb, yb = augment(xtr[idx], gen), ytr[idx]
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        va = accuracy(model, xva, yva)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {total / seen:.4f}  val top-1 {va:.4f}  "
              f"({time.perf_counter() - t1:.0f}s)", flush=True)
    t_train = time.perf_counter() - t1
    info = {
        "train_top1": accuracy(model, xtr, ytr),
        "val_top1": accuracy(model, xva, yva),
        "train_seconds": t_train,
        "data_seconds": t_data,
    }
    model.eval()
    return model, info


def export(model: DemoVGG, path: Path, val_top1: float) -> dict:
    """Export with onnxbn's own exporter (Dropout kept, checked against torch), write atomically."""
    from onnxbn.export import export_module
    from onnxbn.io.save import save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    m = export_module(model, (3, demo_data.IMAGE_SIZE, demo_data.IMAGE_SIZE), opset=17, metadata={
        "onnxbn.preset": "imagenet-squash",
        "onnxbn.weights": "demo",
        # the bundled model's value, kept so a retrain gives its bytes; onnxbn/demo_data.py resolves it
        "onnxbn.source_task": "onnxbn.demo_data:source",
        "onnxbn.classes": json.dumps(demo_data.CLASSES["source"]),
        "onnxbn.input_size": str(demo_data.IMAGE_SIZE),
        "onnxbn.source_val_top1": f"{val_top1:.4f}",
    })
    m.producer_name = "onnxbn tools/train_demo_model.py"
    save_model(m, path)
    data = path.read_bytes()
    return {"export": dict(p for p in ((e.key, e.value) for e in m.metadata_props) if p[0] == "onnxbn.export"),
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "nodes": [n.name for n in m.graph.node]}


def target_check(model: DemoVGG, args) -> dict:
    """The demo's situation without BN: freeze the conv blocks, cache their
    features, train a fresh dense head on the target task, report val top-1."""
    torch.manual_seed(args.seed)
    xtr_u8, ytr = demo_data.make_task("target", args.target_train, TARGET_TRAIN_SEED)
    xva_u8, yva = demo_data.make_task("target", args.target_val, TARGET_VAL_SEED)
    with torch.no_grad():
        model.eval()
        ftr = torch.flatten(model.features(torch.from_numpy(demo_data.to_model_input(xtr_u8))), 1)
        fva = torch.flatten(model.features(torch.from_numpy(demo_data.to_model_input(xva_u8))), 1)
    ytr, yva = torch.from_numpy(ytr), torch.from_numpy(yva)
    res = {}
    for mode in ("fresh", "pretrained"):
        torch.manual_seed(args.seed)
        head = DemoVGG(num_classes=len(demo_data.CLASSES["target"])).classifier
        if mode == "pretrained":  # keep the source dense layers, replace only the last Linear
            src = model.classifier
            for i in (0, 3):
                head[i].load_state_dict(src[i].state_dict())
        opt = torch.optim.Adam(head.parameters(), lr=1e-3)
        loss_fn = nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(args.seed)
        hist = []
        for _ in range(args.target_epochs):
            head.train()
            perm = torch.randperm(len(ftr), generator=gen)
            for i in range(0, len(ftr), 64):
                idx = perm[i:i + 64]
                loss = loss_fn(head(ftr[idx]), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            head.eval()
            with torch.no_grad():
                tr = (head(ftr).argmax(1) == ytr).float().mean().item()
                va = (head(fva).argmax(1) == yva).float().mean().item()
            hist.append((round(tr, 4), round(va, 4)))
        res[mode] = hist
        print(f"target, frozen conv features, {mode} dense head, {args.target_epochs} epochs Adam 1e-3 "
              f"batch 64, {len(ftr)} train / {len(fva)} val: (train, val) top-1 per epoch {hist}", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "models" / "demo_vgg.onnx")
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--n-val", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target-check", action="store_true",
                    help="also train a dense head on frozen conv features for the target task")
    ap.add_argument("--target-only", type=Path, default=None, metavar="ONNX",
                    help="skip training; run the target check on the weights of an exported model")
    ap.add_argument("--reexport", type=Path, default=None, metavar="ONNX",
                    help="skip training; export the weights of an exported model again (after exporter changes)")
    ap.add_argument("--target-train", type=int, default=2000)
    ap.add_argument("--target-val", type=int, default=1000)
    ap.add_argument("--target-epochs", type=int, default=3)
    args = ap.parse_args(argv)
    set_determinism(args.seed, args.threads)

    if args.reexport:
        model = load_from_onnx(args.reexport)
        meta = {p.key: p.value for p in __import__("onnx").load(str(args.reexport)).metadata_props}
        print(json.dumps(export(model, args.output, float(meta["onnxbn.source_val_top1"])), indent=1))
        return 0

    if args.target_only:
        model = load_from_onnx(args.target_only)
        target_check(model, args)
        return 0

    model, info = train(args)
    n_params = sum(p.numel() for p in model.parameters())
    ex = export(model, args.output, info["val_top1"])
    print(json.dumps({
        "output": str(args.output),
        "params": n_params,
        "file_bytes": ex["bytes"],
        "sha256": ex["sha256"],
        "source_train_top1": round(info["train_top1"], 4),
        "source_val_top1": round(info["val_top1"], 4),
        "train_seconds": round(info["train_seconds"], 1),
        "data_seconds": round(info["data_seconds"], 1),
        "export": ex["export"],
        "recipe": {k: getattr(args, k) for k in ("n_train", "n_val", "epochs", "batch_size", "lr", "seed", "threads")},
        "onnx_nodes": ex["nodes"],
    }, indent=1))
    if args.target_check:
        target_check(model, args)
    return 0


def load_from_onnx(path: Path) -> DemoVGG:
    """Rebuild DemoVGG from an exported file (initializer names are the state_dict keys)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    model = DemoVGG(num_classes=len(demo_data.CLASSES["source"]))
    sd = {k: torch.from_numpy(inits[k].copy()) for k in model.state_dict()}
    model.load_state_dict(sd)
    return model.eval()


if __name__ == "__main__":
    raise SystemExit(main())
