#!/usr/bin/env python
"""Benchmarks of `onnxbn recalibrate`: cost, memory, and what it does after a domain shift.

    python tools/bench_recalibrate.py [cost] [memory] [domain-shift] [prior] [--quick] [--json OUT]

cost          passes and wall time of exact (with the activation cache, and without it), batch, and
              a plain forward pass over the same images (onnxruntime, and torch eval for batch mode),
              side by side, on VGG16-BN (torchvision's vgg16_bn layout, random weights, 224x224,
              a few images) and on a ResNet-18-style model (BN after every Conv, 224x224).
              Every time includes loading and session/import set-up, as a user would see it.
memory        peak RSS (a fresh process per run) of exact (cache off, default cache) and batch on
              N and 4N images: streaming means the peak does not grow with N (the default cache
              grows until its budget, --cache-mb, and no further).
domain-shift  a small BN CNN trained in torch on onnxbn.demo.data's "source" task, exported, and
              evaluated on shifted images (contrast, colour, blur, all three) before and after
              recalibrate (exact and batch; prior 0, no floor) on other, unlabelled, shifted images:
              accuracy and loss.
prior         the same BN CNN (3 seeds, kept in --workdir) recalibrated with prior N (multiples of n
              and fixed N) and variance floor 0 / 0.01 on n = 32, 128, 500 images of the source domain
              (a random sample, or 2 of the 10 classes) or of the shifted domain: top-1 on the
              matching domain, mean and std over seeds (how the defaults were chosen).

No timing is asserted anywhere; numbers go to stdout (and --json). `--quick` shrinks every
size for a smoke run (tests/test_recalibrate.py runs it with --tiny).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from benchmarks.harness import ROOT, machine_info

if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

BENCHMARKS = ("cost", "memory", "domain-shift", "prior")
SHIFTS = ("none", "contrast", "colour", "blur", "all")


# ----------------------------------------------------------------------------- models (torch, exported here)

def _torch():
    import torch
    from torch import nn

    return torch, nn


def vgg_bn(width_div: int = 1, hidden: int = 4096, classes: int = 1000, size: int = 224):
    """torchvision's vgg16_bn layout (features.{i}, BN after every Conv, classifier 25088-4096-4096-1000);
    below 224x224 the adaptive pooling goes (the exporter cannot upsample) and the classifier shrinks."""
    torch, nn = _torch()
    from onnxbn.models.vgg import CONFIGS

    layers, cin = [], 3
    for item in CONFIGS["vgg16"]:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            c = int(item) // width_div
            layers += [nn.Conv2d(cin, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            cin = c

    class VGG16BN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*layers)
            side = size // 32
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7)) if size >= 224 else nn.Identity()
            self.classifier = nn.Sequential(nn.Linear(cin * (49 if size >= 224 else side * side), hidden), nn.ReLU(True),
                                            nn.Dropout(),
                                            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
                                            nn.Linear(hidden, classes))

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    return VGG16BN()


def resnet18_style(width_div: int = 1, classes: int = 1000):
    """torchvision's resnet18 layout: 7x7 stem, 4 stages of 2 basic blocks, BN after every Conv."""
    torch, nn = _torch()

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            w = [64 // width_div, 128 // width_div, 256 // width_div, 512 // width_div]
            self.conv1, self.bn1 = nn.Conv2d(3, w[0], 7, 2, 3, bias=False), nn.BatchNorm2d(w[0])
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            stages, cin = [], w[0]
            for i, c in enumerate(w):
                stages.append(nn.Sequential(Block(cin, c, 1 if i == 0 else 2), Block(c, c, 1)))
                cin = c
            self.layer1, self.layer2, self.layer3, self.layer4 = stages
            self.fc = nn.Linear(cin, classes)

        def forward(self, x):
            x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return ResNet()


def randomize(module, seed: int = 0):
    """Kaiming-normal convolutions, small dense layers, and stale BN statistics (seeded)."""
    torch, nn = _torch()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_out) ** 0.5)
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.01)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return module.eval()


def export(module, size: int, path: Path | None = None, opset: int = 17):
    """The module exported in eval mode with BN kept (TorchScript exporter, dynamic batch)."""
    import onnx
    torch, _ = _torch()

    module.eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, torch.zeros(1, 3, size, size), f, dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.EVAL, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=opset)
    model = onnx.load_from_string(f.getvalue())
    if path is not None:
        from onnxbn.io.save import save_model

        save_model(model, path)
    return model


# ----------------------------------------------------------------------------- cost

def plain_forward(model, x: np.ndarray, batch_size: int) -> float:
    """Seconds for session set-up plus one onnxruntime forward pass over x (outputs fetched)."""
    from onnxbn.runtimes.ort_backend import make_session

    started = time.perf_counter()
    session = make_session(model, "cpu")
    name = session.get_inputs()[0].name
    for i in range(0, len(x), batch_size):
        session.run(None, {name: x[i:i + batch_size]})
    return time.perf_counter() - started


def torch_forward(module, x: np.ndarray, batch_size: int) -> float:
    """Seconds for one torch eval-mode forward pass over x (after a one-sample warm-up)."""
    torch, _ = _torch()
    with torch.no_grad():
        module(torch.from_numpy(x[:1]))
    started = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            module(torch.from_numpy(x[i:i + batch_size]))
    return time.perf_counter() - started


def bench_cost(sizes: dict) -> dict:
    """Passes and seconds of every contender on each model of the profile (see the module docstring)."""
    from onnxbn.recalibration import recalibrate_with_report

    results = {}
    for label, build, n, size, batch in sizes["cost"]:
        module = randomize(build())
        model = export(module, size)
        x = np.random.default_rng(0).standard_normal((n, 3, size, size)).astype(np.float32)
        rows = {}
        rows["onnxruntime forward"] = {"seconds": plain_forward(model, x, batch), "passes": 1}
        rows["torch eval forward"] = {"seconds": torch_forward(module, x, batch), "passes": 1}
        cases: tuple[tuple[str, dict], ...] = (("exact (cache)", {}), ("exact (no cache)", {"cache_mb": 0}),
                                               ("batch", {"mode": "batch"}))
        for name, options in cases:
            started = time.perf_counter()
            _, report = recalibrate_with_report(model, x, batch_size=batch, device="cpu", **options)
            rows[name] = {"seconds": time.perf_counter() - started, "passes": len(report.passes),
                          "pass_seconds": round(sum(p["seconds"] for p in report.passes), 3),
                          "nodes_run": sum(p["nodes"] for p in report.passes),
                          "kept_mib_max": max((p["cached_mib"] for p in report.passes), default=0.0)}
        forward = rows["onnxruntime forward"]["seconds"]
        for row in rows.values():
            row["vs_forward"] = row["seconds"] / forward
        results[label] = {"images": n, "size": size, "batch": batch, "bn_nodes": len(report.bns),
                          "graph_nodes": len(model.graph.node), "rows": rows}
    return {"models": results}


def print_cost(results: dict) -> None:
    for label, r in results["models"].items():
        print(f"\n[cost] {label}: {r['images']} images {r['size']}x{r['size']}, batch {r['batch']}, "
              f"{r['bn_nodes']} BN, {r['graph_nodes']} nodes")
        print(f"  {'contender':<22}{'passes':>7}{'seconds':>10}{'x forward':>11}{'nodes run':>11}{'kept MiB':>10}")
        for name, row in r["rows"].items():
            print(f"  {name:<22}{row['passes']:>7}{row['seconds']:>10.2f}{row['vs_forward']:>11.2f}"
                  f"{row.get('nodes_run', '-'):>11}{row.get('kept_mib_max', '-'):>10}")


# ----------------------------------------------------------------------------- memory

MEMORY_CHILD = """
import json, sys
import numpy as np
from onnxbn.recalibration import recalibrate_with_report
model, data, mode, cache = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
if mode == "load":
    from onnxbn.io.load import load_model
    load_model(model); np.load(data)["x"].shape
else:
    recalibrate_with_report(model, data, mode=mode, batch_size=8, device="cpu", cache_mb=cache)
# VmHWM: this process's own peak (ru_maxrss would carry the forking parent's peak over exec)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_mib": int(hwm.split()[1]) / 1024}))
"""


def bench_memory(sizes: dict, workdir: Path) -> dict:
    n, size, width_div = sizes["memory"]
    model_path = workdir / "resnet_memory.onnx"
    export(randomize(resnet18_style(width_div=width_div)), size, model_path)
    rng = np.random.default_rng(0)
    data = {}
    for count in (n, 4 * n):
        path = workdir / f"x{count}.npz"
        np.savez(path, x=rng.standard_normal((count, 3, size, size)).astype(np.float32))
        data[count] = path
    runs = [("load only", "load", 0), ("exact, no cache", "exact", 0), ("exact, cache 64 MiB", "exact", 64),
            ("exact, cache 1024 MiB (default)", "exact", 1024), ("batch", "batch", 0)]
    if sizes.get("profile") == "tiny":  # a smoke run: one contender
        runs = runs[1:2]
    results = {}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for label, mode, cache in runs:
        row = {}
        for count, path in data.items():
            proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(model_path), str(path), mode, str(cache)],
                                  capture_output=True, text=True, env=env, check=True)
            row[count] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
        results[label] = {"peak_mib": row, "growth": row[4 * n] / row[n]}
    return {"images": [n, 4 * n], "size": size, "width_div": width_div, "rows": results}


def print_memory(results: dict) -> None:
    a, b = results["images"]
    print(f"\n[memory] ResNet-18-style (channels /{results['width_div']}), {results['size']}x{results['size']}, "
          f"batch 8, peak RSS of a fresh process")
    print(f"  {'run':<34}{f'{a} images':>12}{f'{b} images':>12}{'growth':>9}")
    for label, row in results["rows"].items():
        print(f"  {label:<34}{row['peak_mib'][a]:>10.0f}Mi{row['peak_mib'][b]:>10.0f}Mi{row['growth']:>9.3f}")


# ----------------------------------------------------------------------------- domain shift

def small_bn_cnn(classes: int = 10):
    """Three conv-BN-ReLU-pool blocks (8, 16, 32 channels) and a dense layer with BatchNorm1d, for 32x32."""
    _, nn = _torch()

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(3, 8), *block(8, 16), *block(16, 32), nn.Flatten(), nn.Linear(32 * 16, 64),
                         nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, classes))


def shift(images: np.ndarray, kind: str) -> np.ndarray:
    """uint8 (N, H, W, 3) images under a domain shift: low contrast, a colour cast, a blur, or all three."""
    x = images.astype(np.float32)
    if kind in ("contrast", "all"):
        x = 128 + 0.45 * (x - 128)
    if kind in ("colour", "all"):
        x = x * np.array([1.25, 0.95, 0.6], np.float32) + np.array([20, 5, -10], np.float32)
    if kind in ("blur", "all"):
        k = np.array([1, 4, 6, 4, 1], np.float32) / 16  # separable 5x5 binomial blur
        for axis in (1, 2):
            padded = np.pad(x, [(0, 0)] + [(2, 2) if a == axis else (0, 0) for a in (1, 2)] + [(0, 0)], mode="edge")
            blurred = np.zeros_like(x)
            for i in range(5):
                blurred += k[i] * np.take(padded, range(i, i + x.shape[axis]), axis=axis)
            x = blurred
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def train(module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0) -> float:
    torch, nn = _torch()
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    started = time.perf_counter()
    module.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(xt[idx]), yt[idx]).backward()
            optimizer.step()
    module.eval()
    return time.perf_counter() - started


def bench_domain_shift(sizes: dict) -> dict:
    import onnxbn
    from onnxbn.demo.data import make_task, to_model_input

    n_train, n_cal, n_val, epochs = sizes["domain-shift"]
    torch, _ = _torch()
    torch.set_num_threads(1)  # a tiny net: one thread is as fast, and immune to a busy machine's oversubscription
    images, labels = make_task("source", n_train, seed=0)
    torch.manual_seed(0)
    module = small_bn_cnn()
    seconds = train(module, to_model_input(images), labels, epochs)
    model = export(module, 32)
    val_images, val_labels = make_task("source", n_val, seed=1)
    cal_images, _ = make_task("source", n_cal, seed=2)  # unlabelled images of the shifted domain
    # the same model with exact statistics of the source domain: separates adapting to the shift from
    # merely replacing the running averages that training left behind
    full = {"prior": 0, "var_floor": 0}  # full recalibration (AdaBN), not the protective default
    source_exact = onnxbn.recalibrate(model, to_model_input(cal_images), batch_size=64, device="cpu", **full)
    results = {"train_seconds": round(seconds, 1), "train_images": n_train, "calibration_images": n_cal,
               "val_images": n_val, "epochs": epochs, "rows": {}}
    for kind in SHIFTS if sizes.get("profile") != "tiny" else ("all",):
        val = to_model_input(val_images if kind == "none" else shift(val_images, kind))
        cal = to_model_input(cal_images if kind == "none" else shift(cal_images, kind))
        row = {"as trained": onnxbn.evaluate(model, (val, val_labels), batch_size=256, device="cpu"),
               "exact on source": onnxbn.evaluate(source_exact, (val, val_labels), batch_size=256, device="cpu")}
        for label, mode, batch in (("exact", "exact", 64), ("batch 64", "batch", 64), ("batch 8", "batch", 8)):
            adapted = onnxbn.recalibrate(model, cal, mode=mode, batch_size=batch, device="cpu", **full)
            row[label] = onnxbn.evaluate(adapted, (val, val_labels), batch_size=256, device="cpu")
        results["rows"][kind] = {k: {"accuracy": v["top1"], "loss": v["loss"]} for k, v in row.items()}
    return results


def print_domain_shift(results: dict) -> None:
    print(f"\n[domain-shift] BN CNN trained {results['epochs']} epochs on {results['train_images']} source images "
          f"({results['train_seconds']} s); recalibrated on {results['calibration_images']} unlabelled images of "
          f"the shifted domain, evaluated on {results['val_images']} others")
    columns = ("as trained", "exact on source", "exact", "batch 64", "batch 8")
    print("  accuracy / loss on the shifted images; 'as trained': the exported running averages; 'exact on "
          "source': recalibrated on unshifted images; the last three: recalibrated on shifted images")
    print(f"  {'shift':<10}" + "".join(f"{c:>18}" for c in columns))
    for kind, row in results["rows"].items():
        print(f"  {kind:<10}" + "".join(f"{row[k]['accuracy']:>9.1%} / {row[k]['loss']:.3f}" for k in columns))


PRIORS = (("0", 0, 0), ("n/4", 0.25, 0), ("n", 1, 0), ("2n", 2, 0), ("3n", 3, 0), ("4n", 4, 0), ("16n", 16, 0),
          ("16", 0, 16), ("32", 0, 32), ("64", 0, 64), ("128", 0, 128), ("256", 0, 256))  # (label, x n, + fixed)
FLOORS = (0.0, 0.01)
CALIBRATIONS = ("in-domain, random", "in-domain, 2 classes", "shifted")


def calibration_set(kind: str, pool: np.ndarray, pool_labels: np.ndarray, n: int, rng) -> np.ndarray:
    """n unlabelled images: a random sample of the source domain, source images of classes 0 and 1 only
    (a narrow slice of the model's own domain), or a random sample under the "all" shift."""
    if kind == "in-domain, 2 classes":
        return pool[rng.permutation(np.flatnonzero(pool_labels < 2))[:n]]
    picked = pool[rng.permutation(len(pool))[:n]]
    return shift(picked, "all") if kind == "shifted" else picked


def bench_prior(sizes: dict, workdir: Path) -> dict:
    """Top-1 after recalibrating with prior N (relative to n, or fixed) and variance floor F, for calibration
    sets of n images (`calibration_set`), evaluated on the matching domain (all classes); one model per seed
    (training seed, calibration draw), mean and std over seeds. Trained models are kept in `workdir`."""
    import onnx

    import onnxbn
    from onnxbn.demo.data import make_task, to_model_input

    n_train, cal_sizes, n_val, epochs, seeds = sizes["prior"]
    priors, floors = (PRIORS[:4], FLOORS) if sizes.get("profile") == "tiny" else (PRIORS, FLOORS)
    torch, _ = _torch()
    torch.set_num_threads(1)
    images, labels = make_task("source", n_train, seed=0)
    val_images, val_labels = make_task("source", n_val, seed=1)
    pool, pool_labels = make_task("source", 10 * max(cal_sizes), seed=2)
    vals = {"source": to_model_input(val_images), "shifted": to_model_input(shift(val_images, "all"))}
    acc = {}
    for seed in range(seeds):
        path = workdir / f"prior_model_{n_train}_{epochs}_{seed}.onnx"
        if path.exists():
            model = onnx.load(path)
        else:
            torch.manual_seed(seed)
            module = small_bn_cnn()
            train(module, to_model_input(images), labels, epochs, seed=seed)
            model = export(module, 32, path)
        rng = np.random.default_rng(seed)
        for kind in CALIBRATIONS:
            val = (vals["shifted" if kind == "shifted" else "source"], val_labels)
            acc.setdefault((kind, "as trained", 0.0, 0), []).append(
                onnxbn.evaluate(model, val, batch_size=256, device="cpu")["top1"])
            for n in cal_sizes:
                cal = to_model_input(calibration_set(kind, pool, pool_labels, n, rng))
                for label, times, fixed in priors:
                    for floor in floors:
                        adapted = onnxbn.recalibrate(model, cal, batch_size=64, device="cpu",
                                                     prior=times * n + fixed, var_floor=floor)
                        acc.setdefault((kind, label, floor, n), []).append(
                            onnxbn.evaluate(adapted, val, batch_size=256, device="cpu")["top1"])
    rows = [{"calibration": k, "prior": p, "var_floor": f, "n": n, "mean": float(np.mean(v)),
             "std": float(np.std(v)), "runs": len(v)} for (k, p, f, n), v in acc.items()]
    return {"train_images": n_train, "val_images": n_val, "epochs": epochs, "seeds": seeds, "rows": rows}


def print_prior(results: dict) -> None:
    print(f"\n[prior] BN CNN, {results['epochs']} epochs on {results['train_images']} source images, "
          f"{results['seeds']} seeds; top-1 on {results['val_images']} images (mean +- std), per var floor")
    trained = {r["calibration"]: r for r in results["rows"] if r["prior"] == "as trained"}
    table = {}
    for r in results["rows"]:
        if r["prior"] != "as trained":
            table.setdefault((r["calibration"], r["var_floor"], r["n"]), {})[r["prior"]] = r
    labels = list(dict.fromkeys(r["prior"] for r in results["rows"] if r["prior"] != "as trained"))
    print(f"  {'calibration':<22}{'floor':>6}{'n':>5}{'as trained':>13}" + "".join(f"{p:>13}" for p in labels))
    for (kind, floor, n), row in table.items():
        t = trained[kind]
        print(f"  {kind:<22}{floor:>6g}{n:>5}{100 * t['mean']:>7.1f}+-{100 * t['std']:<4.1f}" + "".join(
            f"{100 * row[p]['mean']:>7.1f}+-{100 * row[p]['std']:<4.1f}" for p in labels))


# ----------------------------------------------------------------------------- main

def sizes_for(profile: str) -> dict:
    if profile == "tiny":
        return {"cost": [("VGG16-BN layout, channels /16", lambda: vgg_bn(16, 64, 10, 32), 4, 32, 2),
                         ("ResNet-18 layout, channels /16", lambda: resnet18_style(16, 10), 4, 32, 2)],
                "memory": (8, 32, 16), "domain-shift": (200, 64, 100, 1),
                "prior": (200, (8, 32), 100, 1, 2)}
    if profile == "quick":
        return {"cost": [("VGG16-BN layout, channels /4", lambda: vgg_bn(4, 512, 100, 128), 8, 128, 4),
                         ("ResNet-18 layout, channels /2", lambda: resnet18_style(2, 100), 16, 128, 8)],
                "memory": (16, 64, 4), "domain-shift": (1000, 256, 500, 2),
                "prior": (1000, (32, 128), 500, 2, 3)}
    return {"cost": [("VGG16-BN (torchvision vgg16_bn layout)", vgg_bn, 4, 224, 2),
                     ("ResNet-18 layout", resnet18_style, 16, 224, 8)],
            "memory": (32, 112, 1), "domain-shift": (5000, 500, 1000, 8),
            "prior": (5000, (32, 128, 500), 1000, 8, 3)}


RUNNERS = {"cost": (bench_cost, print_cost), "memory": (bench_memory, print_memory),
           "domain-shift": (bench_domain_shift, print_domain_shift), "prior": (bench_prior, print_prior)}


def run_one(name: str, profile: str, workdir: Path, out: Path) -> None:
    """One benchmark in this process; its result goes to `out` as JSON."""
    sizes = dict(sizes_for(profile), profile=profile)
    bench, show = RUNNERS[name]
    started = time.perf_counter()
    result = bench(sizes, workdir) if name in ("memory", "prior") else bench(sizes)
    result["seconds"] = round(time.perf_counter() - started, 1)
    show(result)
    out.write_text(json.dumps(result, default=str))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("names", nargs="*", choices=[[], *BENCHMARKS], help="benchmarks (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--workdir", help="folder for models and data (default: a temporary one)")
    parser.add_argument("--one", nargs=2, metavar=("PROFILE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # a child process: one benchmark
        run_one(args.names[0], args.one[0], Path(args.workdir), Path(args.one[1]))
        return 0
    names = args.names or list(BENCHMARKS)
    profile = "tiny" if args.tiny else "quick" if args.quick else "full"
    report = {"profile": profile, "machine": machine_info(), "benchmarks": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in names:
            # each benchmark in a fresh process, so that none inherits another's memory or threads
            out = workdir / f"{name}.json"
            subprocess.run([sys.executable, __file__, name, "--one", profile, str(out), "--workdir", str(workdir)],
                           check=True)
            report["benchmarks"][name] = json.loads(out.read_text())
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(f"\n{profile} run: {report['seconds']} s on {report['machine']['cores']} cores")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
