#!/usr/bin/env python
"""Benchmarks: onnxbn side by side with the alternatives, as same-run ratios.

    python tools/bench.py [NAMES...] [--quick] [--json OUT] [--workdir DIR] [--reps R]

NAMES (default: all): stats-cost stats-memory insert-time train-step feature-cache
data-pipeline deploy-latency; by name only: deploy-runtimes (latency and error of the original
vs folded model on onnxruntime, openvino and tract), fixed-cost (each command as a whole
process vs plain onnxruntime doing the same inference: wall time and peak RSS) and quantize
(onnxbn's calibration vs onnxruntime's MinMax/Percentile/Entropy calibrators at N and 4N samples:
time, peak RssAnon, top-1 agreement and cosine of each INT8 model with the float one). Every benchmark alternates its contenders
(A B A B ...) in one process and run, and reports the median of each and the ratio to the
reference contender, so the numbers stay comparable on a busy machine. A table goes
to stdout; `--json OUT` writes every raw timing plus the machine (CPU model, cores,
load, onnxruntime/torch versions, execution provider).

Models: the default run uses VGG16 at 224x224 with random weights (`onnxbn.export_vgg`,
written once to the work folder and reused). `--quick` uses a VGG11-shaped network
with a quarter of the channels at 64x64 (built here in torch and exported with the
same TorchScript exporter), small N and few repetitions: a smoke run of all seven in a
few minutes on two cores. `--tiny` (hidden; what tests/test_bench.py runs) uses a
two-conv miniature at 16x16. The table header names the model that ran.

All onnxruntime sessions run on the CPU provider with onnxruntime's default thread
count (the same for `collect_stats`, which picks no thread count either).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

BENCHMARKS = ("stats-cost", "stats-memory", "insert-time", "train-step", "feature-cache", "data-pipeline",
              "deploy-latency")


# ----------------------------------------------------------------------------- profiles

@dataclass(frozen=True)
class Profile:
    """Model and sizes of one run (full, quick or tiny)."""

    name: str
    description: str
    arch: str                  # "vgg16" through export_vgg, else a config in CONFIGS below
    image_size: int
    width_div: int = 1
    hidden: int = 4096
    classes: int = 1000
    batch: int = 8             # stats / inference batch
    stats_batches: int = 4     # batches per stats-cost run
    mem_images: int = 8        # N of stats-memory (and 4N)
    mem_selector: str = "relu"
    train_batch: int = 4
    train_steps: int = 2       # steps per contender per repetition
    cache_samples: int = 64
    cache_batch: int = 16
    pipeline_images: int = 64
    jpeg_size: tuple[int, int] = (500, 375)
    latency_runs: dict = field(default_factory=lambda: {1: 8, 8: 3})
    reps: int = 3


CONFIGS: dict[str, list] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "tiny": [8, "M", 16, "M"],
}

PROFILES = {
    "full": Profile("full", "VGG16 (onnxbn.export_vgg, random weights), 224x224", "vgg16", 224, stats_batches=4,
                    mem_images=16, cache_samples=64, cache_batch=64, pipeline_images=64,
                    latency_runs={1: 5, 8: 2}, reps=2),
    "quick": Profile("quick", "VGG11-shaped, channels/4, 64x64, 256-unit dense layers (quick)", "vgg11", 64,
                     width_div=4, hidden=256, classes=100, batch=4, stats_batches=3, mem_images=8,
                     train_batch=4, train_steps=2, cache_samples=32, cache_batch=8, pipeline_images=32, jpeg_size=(160, 120),
                     latency_runs={1: 10, 8: 5}, reps=3),
    "tiny": Profile("tiny", "2-conv miniature, 16x16 (smoke test)", "tiny", 16, hidden=32, classes=10, batch=4,
                    stats_batches=2, mem_images=4, train_batch=4, train_steps=1, cache_samples=8, cache_batch=4,
                    pipeline_images=8, jpeg_size=(40, 30), latency_runs={1: 3, 8: 2}, reps=1),
}


# ----------------------------------------------------------------------------- torch VGG (hand-written)

def torch_vgg(profile: Profile, bn: bool = False, dropout: float = 0.0, seed: int = 0):
    """A plain torch VGG for `profile`: nn.Sequential features and classifier.

    With `bn`, BatchNorm2d follows every conv and BatchNorm1d every hidden Linear (BN after
    every linear layer, what the `linear` selector gives). VGG16 at 224 keeps torchvision's
    7x7 adaptive average pool; smaller inputs flatten the last feature map directly.
    """
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    layers, channels, size = [], 3, profile.image_size
    for item in CONFIGS[profile.arch]:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
            size //= 2
            continue
        out = int(item) // profile.width_div
        layers.append(nn.Conv2d(channels, out, 3, padding=1))
        if bn:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU(inplace=True))
        channels = out
    head = []
    if profile.image_size % 224 == 0:
        head.append(nn.AdaptiveAvgPool2d((7, 7)))
        size = 7
    head.append(nn.Flatten(1))
    dense = []
    features = channels * size * size
    for _ in range(2):
        dense.append(nn.Linear(features, profile.hidden))
        if bn:
            dense.append(nn.BatchNorm1d(profile.hidden))
        dense.append(nn.ReLU(inplace=True))
        if dropout:
            dense.append(nn.Dropout(dropout))
        features = profile.hidden
    dense.append(nn.Linear(features, profile.classes))
    model = nn.Sequential(nn.Sequential(*layers), nn.Sequential(*head), nn.Sequential(*dense))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_out) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.01)  # distinct: no shared initializers
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.in_features) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.01)
    return model


def export_small(profile: Profile):
    """ONNX of `torch_vgg(profile)` (no BN, eval mode) through torch's TorchScript exporter."""
    import io
    import warnings

    import onnx
    import torch

    model = torch_vgg(profile).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, profile.image_size, profile.image_size),), buffer,
                          dynamo=False, opset_version=17, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


# ----------------------------------------------------------------------------- helpers

def now() -> float:
    return time.perf_counter()


def alternate(contenders: dict, reps: int, warmup: bool = True) -> dict[str, list[float]]:
    """Run the contenders A B C, B C A, C A B, ... `reps` rounds; each call returns its own measurement.

    The order rotates every round so that no contender always follows the same one (a
    busy machine, or the previous run's threads still spinning, would otherwise bias
    one of them). One untimed warm-up round first (first-touch page faults, lazy
    imports, allocator growth) unless `warmup` is False.
    """
    names = list(contenders)
    if warmup:
        for fn in contenders.values():
            fn()
    raw: dict[str, list[float]] = {name: [] for name in contenders}
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            raw[name].append(float(contenders[name]()))
    return raw


def median(values) -> float:
    return float(statistics.median(values))


def machine_info() -> dict:
    import onnx
    import onnxruntime
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "cpu_model": cpu, "cores": os.cpu_count(), "cores_usable": affinity,
        "loadavg_start": list(os.getloadavg()), "platform": platform.platform(),
        "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "ort_intra_op_threads": "onnxruntime default (0)", "ort_available_providers": onnxruntime.get_available_providers(),
    }


def write_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """`n` seeded smooth-noise JPEGs in two class sub-folders (ImageNet layout)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    done = folder / ".done"
    if done.is_file() and done.read_text() == f"{n} {size}":
        return folder
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        img.save(sub / f"img{i:05d}.jpg", quality=90)
    done.write_text(f"{n} {size}")
    return folder


def expose(model, names: list[str]):
    """A copy of `model` with `names` added as graph outputs (what calibrators do)."""
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    out.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names if n not in have)
    return out


def numpy_moments(t: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(count per channel, mean, M2) of an (N, C, ...) array, reduced in numpy (float64)."""
    axes = tuple(i for i in range(t.ndim) if i != 1)
    count = t.size // t.shape[1]
    mean = t.mean(axis=axes, dtype=np.float64)
    var = t.var(axis=axes, dtype=np.float64)
    return count, mean, var * count


def quiet_session(model):
    """A CPU session whose intra-op threads block instead of spinning when idle.

    Used where several sessions alternate run by run: a spinning thread pool of the
    previous session would otherwise steal the cores of the next one. Same options for
    every contender.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- context

class Context:
    """Models, stats and data shared by the benchmarks, built once per run (and cached on disk)."""

    def __init__(self, profile: Profile, workdir: Path, reps: int):
        self.profile = profile
        self.workdir = workdir
        self.reps = reps
        workdir.mkdir(parents=True, exist_ok=True)
        self._cache: dict = {}

    @property
    def model_path(self) -> Path:
        p = self.profile
        path = self.workdir / f"{p.name}-{p.arch}-{p.image_size}.onnx"
        if not path.is_file():
            from onnxbn.io.save import save_model

            print(f"building {p.description} -> {path}", file=sys.stderr, flush=True)
            if p.name == "full":
                import onnxbn

                model = onnxbn.export_vgg(p.arch, image_size=p.image_size)
            else:
                model = export_small(p)
            save_model(model, path, force=True)
        return path

    @property
    def model(self):
        if "model" not in self._cache:
            from onnxbn.io.load import load_model

            self._cache["model"] = load_model(self.model_path)
        return self._cache["model"]

    def arrays(self, n: int, seed: int = 0) -> np.ndarray:
        s = self.profile.image_size
        return np.random.default_rng(seed).standard_normal((n, 3, s, s)).astype(np.float32)

    def stats_path(self, selector: str) -> Path:
        path = self.workdir / f"{self.model_path.stem}.{selector}.stats.npz"
        if not path.is_file():
            import onnxbn

            x = self.arrays(2 * self.profile.batch, seed=1)
            onnxbn.collect_stats(self.model, x, after=selector, batch_size=self.profile.batch,
                                 device="cpu").save(path, force=True)
        return path

    def bn_model(self, selector: str):
        key = f"bn-{selector}"
        if key not in self._cache:
            import onnxbn

            self._cache[key] = onnxbn.insert_bn(self.model, self.stats_path(selector))
        return self._cache[key]

    def session(self, model):
        from onnxbn.runtimes.ort_backend import make_session

        return make_session(model, "cpu")

    def input_name(self) -> str:
        from onnxbn.feeding import model_input

        return model_input(self.model)[0]


@dataclass
class Result:
    """One benchmark's rows (contender, median, unit, ratio to the reference) and verdict."""

    name: str
    target: str
    rows: list[dict]
    ratio: float
    met: bool
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"target": self.target, "ratio": self.ratio, "met": self.met, "rows": self.rows,
                "notes": self.notes, **self.extra}


def row(contender: str, raw: list[float], unit: str, ratio: float | None, per: float = 1.0, role: str = "") -> dict:
    """A table row; `per` turns a time into a rate (items / seconds) when unit ends in '/s'."""
    values = [per / v for v in raw] if unit.endswith("/s") else list(raw)
    return {"contender": contender, "median": median(values), "unit": unit, "ratio": ratio, "raw": raw,
            "raw_unit": "s" if unit.endswith("/s") else unit, "role": role}


# ----------------------------------------------------------------------------- 1. stats-cost

def bench_stats_cost(ctx: Context) -> Result:
    import onnxbn
    from onnxbn.points import select_points
    from onnxbn.stats import ChannelMoments

    p = ctx.profile
    model, name = ctx.model, ctx.input_name()
    x = ctx.arrays(p.batch * p.stats_batches)
    batches = [x[i:i + p.batch] for i in range(0, len(x), p.batch)]
    rows, verdicts, extra = [], [], {}
    for selector in ("dense", "relu"):
        names = [pt.tensor for pt in select_points(model, selector)]
        exposed = expose(model, names)

        def run_onnxbn():
            t = now()
            onnxbn.collect_stats(model, x, after=selector, batch_size=p.batch, device="cpu")
            return now() - t

        def run_plain():
            t = now()
            session = ctx.session(model)
            for b in batches:
                session.run(None, {name: b})
            return now() - t

        def run_expose():
            t = now()
            session = ctx.session(exposed)
            moments = {n: ChannelMoments() for n in names}
            for b in batches:
                for n, value in zip(names, session.run(names, {name: b})):
                    moments[n].merge(*numpy_moments(value))
            return now() - t

        raw = alternate({"onnxbn": run_onnxbn, "plain": run_plain, "expose": run_expose}, ctx.reps)
        base = median(raw["plain"])
        r = median(raw["onnxbn"]) / base
        rows += [row(f"[{selector}] onnxbn.collect_stats", raw["onnxbn"], "s", r, role="subject"),
                 row(f"[{selector}] plain ORT inference", raw["plain"], "s", 1.0, role="reference"),
                 row(f"[{selector}] expose outputs + numpy", raw["expose"], "s", median(raw["expose"]) / base)]
        verdicts.append(r)
        extra[f"ratio_{selector}"] = r
        extra[f"points_{selector}"] = len(names)
    worst = max(verdicts)
    return Result("stats-cost", "onnxbn <= 1.10x plain inference", rows, worst, worst <= 1.10,
                  [f"{len(x)} in-memory inputs, batch {p.batch}, session creation included for all three; "
                   "ratio = worst selector"], extra)


# ----------------------------------------------------------------------------- 2. stats-memory

MEM_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import numpy as np
mode, model, folder, batch, selector, workers = {args!r}
t = time.perf_counter()
if mode == "onnxbn":
    import onnxbn
    onnxbn.collect_stats(model, folder, after=selector, batch_size=batch, workers=workers, device="cpu")
else:
    import onnx
    from onnxbn.io.load import load_model
    from onnxbn.points import select_points
    from onnxbn.runtimes.ort_backend import make_session
    from onnxbn.feeding import model_input, open_model_data
    proto = load_model(model)
    names = [p.tensor for p in select_points(proto, selector)]
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    session = make_session(proto, "cpu")
    kept = {{n: [] for n in names}}
    for x, _ in open_model_data(proto, folder).batches(batch, workers):
        for n, v in zip(names, session.run(names, {{model_input(proto)[0]: x}})):
            kept[n].append(v)
    for n in names:  # reduce after the pass, as a keep-everything calibrator does
        a = np.concatenate(kept.pop(n))
        axes = tuple(i for i in range(a.ndim) if i != 1)
        a.mean(axis=axes, dtype=np.float64), a.var(axis=axes, dtype=np.float64)
        del a
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print(json.dumps({{"self_kb": hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   "children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                   "seconds": time.perf_counter() - t}}))
"""


def _peak_rss(mode: str, model: Path, folder: Path, batch: int, selector: str, workers: int) -> dict:
    code = MEM_CHILD.format(root=str(ROOT), args=(mode, str(model), str(folder), batch, selector, workers))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"stats-memory child ({mode}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_stats_memory(ctx: Context) -> Result:
    p = ctx.profile
    n = p.mem_images
    small = write_jpegs(ctx.workdir / f"jpeg-{p.name}-{n}", n, p.jpeg_size)
    large = write_jpegs(ctx.workdir / f"jpeg-{p.name}-{4 * n}", 4 * n, p.jpeg_size)
    model = ctx.model_path
    workers = 1
    details: dict[str, list[dict]] = {}

    def measure(mode, folder, key):
        def fn():
            info = _peak_rss(mode, model, folder, p.batch, p.mem_selector, workers)
            details.setdefault(key, []).append(info)
            return info["self_kb"] / 1024.0
        return fn

    raw = alternate({"onnxbn N": measure("onnxbn", small, "onnxbn N"),
                     "onnxbn 4N": measure("onnxbn", large, "onnxbn 4N"),
                     "keep N": measure("keep", small, "keep N"),
                     "keep 4N": measure("keep", large, "keep 4N")}, max(1, ctx.reps - 1), warmup=False)
    growth = median(raw["onnxbn 4N"]) / median(raw["onnxbn N"])
    keep_growth = median(raw["keep 4N"]) / median(raw["keep N"])
    rows = [row(f"onnxbn.collect_stats, N={n}", raw["onnxbn N"], "MiB", 1.0, role="reference"),
            row(f"onnxbn.collect_stats, 4N={4 * n}", raw["onnxbn 4N"], "MiB", growth, role="subject"),
            row(f"expose+keep, N={n}", raw["keep N"], "MiB", 1.0),
            row(f"expose+keep, 4N={4 * n}", raw["keep 4N"], "MiB", keep_growth)]
    return Result("stats-memory", "peak RSS growth N -> 4N <= 1.05x", rows, growth, growth <= 1.05,
                  [f"{p.description}; selector {p.mem_selector}; JPEGs {p.jpeg_size[0]}x{p.jpeg_size[1]}; "
                   f"batch {p.batch}; {workers} decode worker; peak RSS (VmHWM from /proc/self/status) of a fresh "
                   "child process per run; ru_maxrss is not used: Linux carries the forking parent's peak over "
                   "exec; decode workers are separate processes, not counted"],
                  {"details": details, "keep_growth": keep_growth})


# ----------------------------------------------------------------------------- 3. insert-time

def bench_insert_time(ctx: Context) -> Result:
    import onnx

    from onnxbn.insert import insert
    from onnxbn.io.model import Model

    src = ctx.model_path
    out = ctx.workdir / "insert-out"
    out.mkdir(exist_ok=True)
    stats = {sel: ctx.stats_path(sel) for sel in ("dense", "linear")}

    def run_insert(selector):
        def fn():
            t = now()
            model = insert(Model.open(src), stats[selector])  # as `onnxbn insert` does
            model.save(out / f"bn-{selector}.onnx", force=True)
            return now() - t
        return fn

    def run_copy():
        t = now()
        onnx.save(onnx.load(str(src)), str(out / "copy.onnx"))
        return now() - t

    raw = alternate({"dense": run_insert("dense"), "linear": run_insert("linear"), "copy": run_copy}, ctx.reps)
    base = median(raw["copy"])
    ratios = {k: median(raw[k]) / base for k in ("dense", "linear")}
    rows = [row("insert [dense] structure+insert+save", raw["dense"], "s", ratios["dense"], role="subject"),
            row("insert [linear] structure+insert+save", raw["linear"], "s", ratios["linear"], role="subject"),
            row("onnx.load + onnx.save", raw["copy"], "s", 1.0, role="reference")]
    worst = max(ratios.values())
    size = src.stat().st_size / 2**20
    return Result("insert-time", "insert <= 1.3x load+save", rows, worst, worst <= 1.3,
                  [f"model file {size:.0f} MiB; stats loaded from .npz; the model read as its structure and saved with "
                   "onnxbn.io.save.save_model, weights copied file to file (as `onnxbn insert`); ratio = worst "
                   "selector"], {"ratios": ratios})


# ----------------------------------------------------------------------------- 4. train-step

def _copy_weights(imported, hand) -> int:
    """Copy conv/linear/BN parameters and BN buffers from the import to the hand-written net, in order."""
    import torch
    from torch import nn

    kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)
    src = [imported.get_submodule(n.target) for n in imported.graph.nodes if n.op == "call_module"]
    src = [m for m in src if isinstance(m, kinds)]
    dst = [m for m in hand.modules() if isinstance(m, kinds)]
    if [type(m) for m in src] != [type(m) for m in dst]:
        raise RuntimeError(f"layer mismatch: import {[type(m).__name__ for m in src]} vs hand-written "
                           f"{[type(m).__name__ for m in dst]}")
    with torch.no_grad():
        for s, d in zip(src, dst):
            d.load_state_dict(s.state_dict())
    return len(src)


def bench_train_step(ctx: Context) -> Result:
    import torch

    import onnxbn

    p = ctx.profile
    bn_model = ctx.bn_model("linear")
    has_dropout = any(n.op_type == "Dropout" for n in bn_model.graph.node)
    imported = onnxbn.to_torch(bn_model)
    hand = torch_vgg(p, bn=True, dropout=0.5 if has_dropout else 0.0)
    layers = _copy_weights(imported, hand)
    x = torch.from_numpy(ctx.arrays(p.train_batch, seed=3))
    y = torch.randint(0, p.classes, (p.train_batch,), generator=torch.Generator().manual_seed(0))
    imported.eval(), hand.eval()
    with torch.no_grad():
        a, b = imported(x), hand(x)
    agreement = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    if not agreement <= 1e-4:
        raise RuntimeError(f"hand-written VGG-BN differs from the import by {agreement:.3g} relative")

    def stepper(model):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def fn():
            t = now()
            for _ in range(p.train_steps):
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
            return (now() - t) / p.train_steps
        return fn

    raw = alternate({"import": stepper(imported), "hand": stepper(hand)}, ctx.reps)
    ratio = median(raw["hand"]) / median(raw["import"])  # throughput ratio import / hand
    rows = [row("to_torch(VGG+BN linear)", raw["import"], "img/s", ratio, per=p.train_batch, role="subject"),
            row("hand-written torch VGG-BN", raw["hand"], "img/s", 1.0, per=p.train_batch, role="reference")]
    return Result("train-step", "import >= 0.95x hand-written throughput", rows, ratio, ratio >= 0.95,
                  [f"{p.description}; batch {p.train_batch}; forward+backward+SGD(momentum) step; "
                   f"{layers} layers copied; eval outputs agree to {agreement:.1e} relative; "
                   f"dropout {'on' if has_dropout else 'absent'} in both; torch threads {torch.get_num_threads()}"],
                  {"eval_agreement": agreement})


# ----------------------------------------------------------------------------- 5. feature-cache

def bench_feature_cache(ctx: Context) -> Result:
    import shutil

    import torch

    import onnxbn
    from onnxbn.torch_import import split_at
    from onnxbn.training import default_freeze_node

    p = ctx.profile
    bn_model = ctx.bn_model("dense")
    x = ctx.arrays(p.cache_samples, seed=4)
    y = np.random.default_rng(5).integers(0, p.classes, p.cache_samples).astype(np.int64)
    cache = ctx.workdir / "feature-cache"
    shutil.rmtree(cache, ignore_errors=True)
    node = default_freeze_node(bn_model)
    batch = p.cache_batch
    totals: list[float] = []
    first_epochs: list[float] = []

    def run_cached():
        # two epochs per call: the second is the steady state (the first also allocates Adam's
        # state and warms autograd up, which the uncached path, reusing its module, does once)
        t = now()
        result = onnxbn.finetune(bn_model, (x, y), epochs=2, batch_size=batch, cache=cache, device="cpu",
                                 freeze_through=node, seed=0)
        totals.append(now() - t)
        first_epochs.append(result.log["history"][0]["seconds"])
        return result.log["history"][-1]["seconds"]

    module = onnxbn.to_torch(bn_model)
    prefix, suffix = split_at(module, node)
    module.requires_grad_(False)
    trainable = list(suffix.parameters())
    for param in trainable:
        param.requires_grad_(True)
    opt = torch.optim.Adam(trainable, lr=1e-5, fused=True)  # the optimizer finetune uses
    rng = np.random.default_rng(0)

    def run_uncached():
        module.train()
        prefix.eval()
        t = now()
        order = rng.permutation(len(y))
        for start in range(0, len(order), batch):
            rows_ = np.sort(order[start:start + batch])
            out = module(torch.from_numpy(x[rows_]))
            loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(y[rows_]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return now() - t

    # the one-off caching cost, measured on its own: the frozen prefix over the data into a fresh cache
    from onnxbn.feeding import model_input, open_model_data
    from onnxbn.runtimes.ort_backend import make_session
    from onnxbn.training import cached_features, split_model

    prefix_model, _, cut = split_model(bn_model, node)  # finetune's prefix: the ONNX graph in onnxruntime
    ort_prefix = (make_session(prefix_model, "cpu"), model_input(bn_model)[0], cut)
    t = now()
    cached_features(ort_prefix, open_model_data(bn_model, (x, y)), "bench", ctx.workdir / "feature-cache-once",
                    batch, torch.device("cpu"), 0, "features", model_input(bn_model)[2])
    caching = now() - t
    shutil.rmtree(ctx.workdir / "feature-cache-once", ignore_errors=True)
    t = now()
    run_cached()  # fills finetune's cache: later calls hit it
    first_total = now() - t
    totals.clear()
    first_epochs.clear()
    run_uncached()  # warm-up
    raw = alternate({"cached": run_cached, "uncached": run_uncached}, ctx.reps, warmup=False)
    hit_total = median(totals)
    ratio = median(raw["uncached"]) / median(raw["cached"])
    rows = [row("finetune epoch on cached features", raw["cached"], "s", 1.0 / ratio, role="subject"),
            row("epoch through the full network", raw["uncached"], "s", 1.0, role="reference"),
            row("one-off feature caching (cached_features)", [caching], "s", caching / median(raw["uncached"])),
            row("finetune first epoch (cold optimizer)", first_epochs, "s", median(first_epochs) / median(raw["uncached"])),
            row("finetune call total, 2 epochs (cache hit)", totals, "s", hit_total / median(raw["uncached"]))]
    return Result("feature-cache", "cached epoch >= 10x faster", rows, ratio, ratio >= 10,
                  [f"{p.description}; {p.cache_samples} samples, batch {batch}, Adam on the part after "
                   f"{node!r}; cached epoch time from finetune's own log; caching timed on "
                   "onnxbn.training.cached_features into a fresh folder; cached epoch = 2nd epoch of a finetune call"],
                  {"first_call_total_s": first_total, "freeze_through": node})


# ----------------------------------------------------------------------------- 6. data-pipeline

def bench_data_pipeline(ctx: Context) -> Result:
    import onnxbn
    from onnxbn.data.images import default_workers
    from onnxbn.feeding import open_model_data

    p = ctx.profile
    n = p.pipeline_images
    folder = write_jpegs(ctx.workdir / f"jpeg-{p.name}-{n}", n, p.jpeg_size)
    model, name = ctx.model, ctx.input_name()
    workers = default_workers()
    x = ctx.arrays(n)

    def run_stats():
        t = now()
        onnxbn.collect_stats(model, folder, after="dense", batch_size=p.batch, workers=workers, device="cpu")
        return now() - t

    def run_decode():
        t = now()
        for _ in open_model_data(model, folder).batches(p.batch, workers):
            pass
        return now() - t

    def run_infer():
        t = now()
        session = ctx.session(model)
        for i in range(0, n, p.batch):
            session.run(None, {name: x[i:i + p.batch]})
        return now() - t

    raw = alternate({"stats": run_stats, "decode": run_decode, "infer": run_infer}, ctx.reps)
    rate = {k: n / median(v) for k, v in raw.items()}
    slower = min(rate["decode"], rate["infer"])
    serial = 1.0 / (1.0 / rate["decode"] + 1.0 / rate["infer"])
    ratio = rate["stats"] / slower
    ref = "decode" if rate["decode"] <= rate["infer"] else "inference"
    rows = [row("collect_stats on JPEG folder", raw["stats"], "img/s", ratio, per=n, role="subject"),
            row(f"decode only (Dataset.batches, {workers} workers)", raw["decode"], "img/s",
                rate["decode"] / slower, per=n, role="reference" if ref == "decode" else ""),
            row("inference only (plain ORT)", raw["infer"], "img/s", rate["infer"] / slower, per=n,
                role="reference" if ref == "inference" else "")]
    return Result("data-pipeline", "stats >= 0.90x the slower of decode / inference", rows, ratio, ratio >= 0.90,
                  [f"{n} JPEGs {p.jpeg_size[0]}x{p.jpeg_size[1]}, batch {p.batch}, {workers} decode workers; "
                   f"slower stage: {ref}; no-overlap (serial) rate would be {serial:.2f} img/s; "
                   "session / pool start-up included"],
                  {"serial_rate": serial, "rates": rate})


# ----------------------------------------------------------------------------- 7. deploy-latency

def bench_deploy_latency(ctx: Context) -> Result:
    import onnxbn

    p = ctx.profile
    name = ctx.input_name()
    models = {"original": ctx.model}
    kept = {}
    for selector in ("dense", "linear"):
        folded = onnxbn.fold_bn(ctx.bn_model(selector))
        models[f"folded {selector}"] = folded
        kept[selector] = sum(n.op_type == "BatchNormalization" for n in folded.graph.node)
    sessions = {k: quiet_session(m) for k, m in models.items()}
    rows, ratios, extra = [], {}, {"bn_left_after_fold": kept}
    for batch, runs in p.latency_runs.items():
        x = ctx.arrays(batch, seed=6)

        def runner(session):
            def fn():
                t = now()
                session.run(None, {name: x})
                return now() - t
            return fn

        raw = alternate({k: runner(s) for k, s in sessions.items()}, runs * ctx.reps)
        base = median(raw["original"])
        rows.append(row(f"[batch {batch}] original (no BN)", raw["original"], "s", 1.0, role="reference"))
        for k in models:
            if k != "original":
                r = median(raw[k]) / base
                ratios[f"{k} b{batch}"] = r
                rows.append(row(f"[batch {batch}] {k} + fold_bn", raw[k], "s", r, role="subject"))
    worst = max(ratios.values())
    return Result("deploy-latency", "folded <= 1.03x original", rows, worst, worst <= 1.03,
                  [f"{p.description}; one session per model created up front (CPU, default threads, "
                   "spinning off so alternating sessions do not steal each other's cores); ratio = worst case; "
                   f"BN left after fold: {kept}"], {"ratios": ratios, **extra})


# ----------------------------------------------------------------------------- 8. deploy-runtimes (optional)

def bench_deploy_runtimes(ctx: Context) -> Result:
    """Deploy latency and error per runtime: original vs folded, batch 1 and 8, on the profile's
    model (VGG16 in the full run) and the bundled demo model; every runtime side by side in one run.

    Contenders: onnxruntime (CPU, threads blocking when idle, as in deploy-latency), openvino at
    f32 and at its own default precision, tract; a runtime that is not installed is skipped and
    named in the notes. Error: each folded model on each runtime against the original on
    onnxruntime (max abs, max rel, and whether `onnxbn check`'s default tolerance passes).
    """
    import onnx

    import onnxbn
    from onnxbn.check import OutputMetrics
    from onnxbn.demo.data import make_task, to_model_input
    from onnxbn.runtimes.base import available, runtime_version
    from onnxbn.runtimes.ort_backend import OrtSession
    from onnxbn.runtimes.precision import RuntimeInfo, default_tolerance
    from onnxbn.runtimes.sessions import open_session

    p = ctx.profile
    runtimes = [("onnxruntime", None), ("openvino", "f32"), ("openvino", None), ("tract", None)]
    missing = sorted({r for r, _ in runtimes if not available(r)})
    runtimes = [(r, prec) for r, prec in runtimes if r not in missing]
    demo = onnx.load(str(ROOT / "models" / "demo_vgg.onnx"))
    demo_x = to_model_input(make_task("source", 32, 7)[0])
    models = {p.arch: (ctx.model, ctx.bn_model("linear")),
              "demo": (demo, onnxbn.insert_bn(demo, onnxbn.collect_stats(demo, demo_x, after="linear", device="cpu")))}
    rows, ratios, errors, infos = [], {}, {}, {}

    def label(runtime, precision):
        return runtime if runtime != "openvino" else f"openvino {precision or 'default'}"

    for model_name, (original, with_bn) in models.items():
        folded = onnxbn.fold_bn(with_bn)
        sessions = {}
        for runtime, precision in runtimes:
            for variant, model in (("original", original), ("folded", folded)):
                if runtime == "onnxruntime":
                    s = quiet_session(model)
                    info = RuntimeInfo("onnxruntime", runtime_version("onnxruntime"), "cpu", "f32", "default", "f32",
                                       provider="CPUExecutionProvider")
                    sessions[(label(runtime, precision), variant)] = OrtSession(model, info, s)
                else:
                    sessions[(label(runtime, precision), variant)] = open_session(model, runtime, precision=precision)
        name = original.graph.input[0].name
        for batch, runs in p.latency_runs.items():
            x = demo_x[:batch] if model_name == "demo" else ctx.arrays(batch, seed=6)
            truth = sessions[("onnxruntime", "original")].run(None, {name: x})[0] if "onnxruntime" not in missing else None
            for (rt, variant), s in sessions.items():
                infos[rt] = s.info.to_dict()
                if variant == "folded" and truth is not None:
                    got = s.run(None, {name: x})[0].astype(np.float64)
                    diff = np.abs(got - truth)
                    check = OutputMetrics()
                    check.update(truth, got, *default_tolerance(sessions[("onnxruntime", "original")].info, s.info))
                    errors.setdefault(model_name, {}).setdefault(rt, []).append({
                        "batch": batch, "max_abs": float(diff.max()),
                        "max_rel": float(diff.max() / max(np.abs(truth).max(), 1e-30)),
                        "passes_default_tolerance": check.passed,
                        "precision": s.info.precision})

            def runner(session, feeds):
                def fn():
                    t = now()
                    session.run(None, feeds)
                    return now() - t
                return fn

            repeat = runs * ctx.reps * (10 if model_name == "demo" else 1)  # the demo model runs in ms: more runs
            raw = alternate({f"{rt}|{variant}": runner(s, {name: x}) for (rt, variant), s in sessions.items()}, repeat)
            base = median(raw["onnxruntime|original"]) if "onnxruntime" not in missing else None
            for runtime, precision in runtimes:
                rt = label(runtime, precision)
                orig, fold = raw[f"{rt}|original"], raw[f"{rt}|folded"]
                ratios[f"{model_name} b{batch} {rt}"] = median(fold) / median(orig)
                tag = f"[{model_name} b{batch}] {rt} ({infos[rt]['precision']})"
                rows.append(row(f"{tag} original", orig, "s", median(orig) / base if base else 1.0,
                                role="reference" if rt == "onnxruntime" else ""))
                rows.append(row(f"{tag} folded", fold, "s", median(fold) / base if base else 1.0, role="subject"))
    worst = max(ratios.values())
    notes = [(f"{p.description} and models/demo_vgg.onnx (32x32); BN after every Conv/Gemm (`linear`) inserted, "
              "then folded; ratio column = latency / onnxruntime original at the same batch; target ratio = worst "
              "folded/original on one runtime; one session per (runtime, model) created up front; tract runs one "
              "thread"),
             "runtimes: " + "; ".join(f"{k} = {v['runtime']} {v['version']}, ran {v['precision']}"
                                      for k, v in infos.items())]
    if missing:
        notes.append(f"skipped (not installed): {', '.join(missing)}; pip install 'onnxbn[{','.join(missing)}]'")
    for model_name, per_rt in errors.items():
        notes.append(f"max error of the folded {model_name} vs the original on onnxruntime: " + "; ".join(
            f"{rt} {max(e['max_abs'] for e in v):.2g} abs / {max(e['max_rel'] for e in v):.2g} rel"
            f"{'' if all(e['passes_default_tolerance'] for e in v) else ' (FAILS default tolerance)'}"
            for rt, v in per_rt.items()))
    return Result("deploy-runtimes", "folded <= 1.03x original on every runtime", rows, worst, worst <= 1.03, notes,
                  {"ratios": ratios, "errors": errors, "runtimes": infos, "skipped": missing})


# ----------------------------------------------------------------------------- fixed-cost

FIXED_CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
kind, argv = {kind!r}, {argv!r}
inference = None
if kind == "onnxbn":
    from onnxbn.cli import main
    code = main(argv)
else:
    import numpy as np
    import onnx, onnxruntime as ort
    code = 0
    if argv[0] == "load-save":
        onnx.save(onnx.load(argv[1]), argv[2])
    else:  # sessions from the files, the same batches through each
        paths, x, batch = argv[1], np.load(argv[2])["x"], int(argv[3])
        started = time.perf_counter()
        sessions = [ort.InferenceSession(p, providers=["CPUExecutionProvider"]) for p in paths]
        for s in sessions:
            name = s.get_inputs()[0].name
            for i in range(0, len(x), batch):
                s.run(None, {{name: x[i:i + batch]}})
        inference = time.perf_counter() - started
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({{"code": code, "hwm_kb": hwm, "inference_s": inference}}))
"""


def _fixed_child(kind: str, argv: list) -> tuple[float, float, float | None]:
    """(wall seconds, peak RSS MiB, seconds of plain's session creation + batches) of one child process."""
    code = FIXED_CHILD.format(root=str(ROOT), kind=kind, argv=argv)
    t = now()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    wall = now() - t
    if done.returncode != 0:
        raise RuntimeError(f"{kind} {argv[:2]} failed: {done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if out["code"] not in (0, 1):
        raise RuntimeError(f"{kind} {argv[:2]} exited {out['code']}: {done.stderr[-2000:]}")
    return wall, out["hwm_kb"] / 1024, out["inference_s"]


def bench_fixed_cost(ctx: Context) -> Result:
    """Each command, whole process, against plain onnxruntime doing the same inference."""
    p = ctx.profile
    model = str(ctx.model_path)
    work = ctx.workdir / "fixed-cost"
    work.mkdir(exist_ok=True)
    n = 2 * p.batch
    np.savez(work / "x.npz", x=ctx.arrays(n), y=np.arange(n) % p.classes)
    np.savez(work / "x8.npz", x=ctx.arrays(8, seed=9))
    bn = work / "bn.onnx"
    if not bn.is_file():
        from onnxbn.io.save import save_model

        save_model(ctx.bn_model("dense"), bn, force=True)
    stats = str(ctx.stats_path("dense"))
    out = str(work / "out")
    cases = {
        f"stats --after relu, {n} inputs": (["stats", model, "--data", str(work / "x.npz"), "--after", "relu",
                                               "--batch-size", str(p.batch), "--workers", "0", "-o", out + ".npz", "--force"],
                                              ["run", [model], str(work / "x.npz"), p.batch]),
        "check A B --random 8": (["check", model, model, "--random", "8", "--batch-size", str(p.batch)],
                                 ["run", [model, model], str(work / "x8.npz"), p.batch]),
        f"eval, {n} inputs": (["eval", model, "--data", str(work / "x.npz"), "--batch-size", str(p.batch)],
                              ["run", [model], str(work / "x.npz"), p.batch]),
        "fold --random 8 (fold + verify)": (["fold", str(bn), "--random", "8", "--batch-size", str(p.batch),
                                             "-o", out + ".onnx", "--force"],
                                            ["run", [str(bn), str(bn)], str(work / "x8.npz"), p.batch]),
        "insert": (["insert", model, "--stats", stats, "-o", out + "_bn.onnx", "--force"],
                   ["load-save", model, out + "_plain.onnx"]),
        f"recalibrate (exact), {n} inputs": (["recalibrate", str(bn), "--data", str(work / "x.npz"), "--batch-size",
                                                str(p.batch), "--workers", "0", "-o", out + "_recal.onnx", "--force"],
                                               ["run", [str(bn)], str(work / "x.npz"), p.batch]),
        f"finetune --epochs 0 (caching pass), {n} inputs": (
            ["finetune", str(bn), "--train", str(work / "x.npz"), "--epochs", "0", "--batch-size", str(p.batch),
             "--device", "cpu", "-o", out + "_ft.onnx", "--force"],
            ["run", [str(bn)], str(work / "x.npz"), p.batch]),
    }
    rows, worst = [], 0.0
    for label, (command, plain) in cases.items():
        raw = {"onnxbn": [], "plain": []}
        caching = []
        for rep in range(ctx.reps):
            order = (("onnxbn", command), ("plain", plain)) if rep % 2 == 0 else (("plain", plain), ("onnxbn", command))
            for kind, argv in order:
                raw[kind].append(_fixed_child(kind, argv))
                if kind == "onnxbn" and command[0] == "finetune":
                    ft_log = json.loads(Path(out + "_ft.onnx.log.json").read_text())
                    caching.append(ft_log["import_seconds"] + ft_log["cache"]["train"]["seconds"])
        t_ratio = median([r[0] for r in raw["onnxbn"]]) / median([r[0] for r in raw["plain"]])
        m_ratio = median([r[1] for r in raw["onnxbn"]]) / median([r[1] for r in raw["plain"]])
        rows += [row(f"[{label}] onnxbn, wall", [r[0] for r in raw["onnxbn"]], "s", t_ratio, role="subject"),
                 row(f"[{label}] plain, wall", [r[0] for r in raw["plain"]], "s", 1.0, role="reference"),
                 row(f"[{label}] onnxbn, peak RSS", [r[1] for r in raw["onnxbn"]], "MiB", m_ratio),
                 row(f"[{label}] plain, peak RSS", [r[1] for r in raw["plain"]], "MiB", 1.0)]
        if caching:  # weights into torch + the caching pass (finetune's log) vs plain's session creation + batches
            inference = [r[2] for r in raw["plain"]]
            rows += [row(f"[{label}] onnxbn, to_torch + caching pass", caching, "s",
                         median(caching) / median(inference)),
                     row(f"[{label}] plain, session + batches alone", inference, "s", 1.0)]
        worst = max(worst, t_ratio, m_ratio)
    return Result("fixed-cost", "every command <= 1.25x plain onnxruntime in wall time and peak RSS", rows, worst,
                  worst <= 1.25, ["whole processes (interpreter start included on both sides); plain = sessions "
                                  "from the files running the same batches (insert: onnx.load + onnx.save)",
                                  "finetune's to_torch + caching pass: its log's import and cache seconds (weights "
                                  "read into torch, the frozen prefix run over the inputs, features written) vs "
                                  "plain's session creation + batches; not counted in the target"])


# ----------------------------------------------------------------------------- quantize (by name only)

QUANT_CHILD = r"""
import json, logging, sys, threading, time
sys.path.insert(0, {root!r})
import numpy as np
contender, model, data, out, batch = {args!r}
peak = [0]
def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0
def sample():
    while True:
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.005)
x = np.load(data)["x"]
import onnx, onnxruntime
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
import onnxbn.quantization, onnxbn.ranges, onnxbn.fold, onnxbn.stats  # imports outside the timing
base = rss_anon()
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
if contender.startswith("onnxbn"):
    from onnxbn.quantization import quantize_with_report
    from onnxbn.io.save import save_model
    method, _, recover = contender.split()[1].partition("+")
    q, report = quantize_with_report(model, x, method=method, recover=recover or "none", batch_size=batch, device="cpu",
                                     verify=False)
    seconds = time.perf_counter() - t
    onnx.save(q, out)
else:
    name = onnx.load(model, load_external_data=False).graph.input[0].name
    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0
        def get_next(self):
            if self.i >= len(x):
                return None
            self.i += batch
            return {{name: x[self.i - batch:self.i]}}
    method = {{"ort-minmax": CalibrationMethod.MinMax, "ort-percentile": CalibrationMethod.Percentile,
               "ort-entropy": CalibrationMethod.Entropy}}[contender]
    logging.disable(logging.WARNING)
    quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                    extra_options={{"ActivationSymmetric": False, "WeightSymmetric": True, "CalibPercentile": 99.99}})
    seconds = time.perf_counter() - t
time.sleep(0.02)
print(json.dumps({{"seconds": seconds, "peak_anon_kb": peak[0], "base_anon_kb": base}}))
"""

QUANT_CONTENDERS = ("onnxbn minmax", "onnxbn percentile", "onnxbn entropy", "onnxbn mse", "onnxbn minmax+cle,bias",
                    "ort-minmax", "ort-percentile", "ort-entropy")


def _quant_child(contender: str, model: Path, data: Path, out: Path, batch: int) -> dict:
    code = QUANT_CHILD.format(root=str(ROOT), args=(contender, str(model), str(data), str(out), batch))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"quantize child ({contender}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _agreement(reference: Path, candidate: Path, x: np.ndarray, batch: int) -> tuple[float, float]:
    """(top-1 agreement, cosine similarity) of the candidate's outputs with the reference's on `x`."""
    import onnx

    a_s, b_s = quiet_session(onnx.load(str(reference))), quiet_session(onnx.load(str(candidate)))
    name = a_s.get_inputs()[0].name
    a = np.concatenate([a_s.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]).astype(np.float64)
    b = np.concatenate([b_s.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]).astype(np.float64)
    return float(np.mean(a.argmax(1) == b.argmax(1))), float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def bench_quantize(ctx: Context) -> Result:
    """onnxbn's calibration (in-graph ranges + histograms) vs onnxruntime's calibrators, at N and 4N samples."""
    p = ctx.profile
    n = {"tiny": 8, "quick": 32, "full": 128}[p.name]
    model = ctx.model_path
    held_out = ctx.arrays({"tiny": 16, "quick": 256, "full": 512}[p.name], seed=99)
    sizes = {"N": n, "4N": 4 * n}
    data = {}
    for label, count in sizes.items():
        data[label] = ctx.workdir / f"quant-{p.name}-{count}.npz"
        np.savez(data[label], x=ctx.arrays(count, seed=7))
    details: dict[str, dict] = {}

    def measure(contender, label):
        def fn():
            out = ctx.workdir / f"quant-{p.name}-{label}-{contender.replace(' ', '_')}.onnx"
            info = _quant_child(contender, model, data[label], out, p.batch)
            info["top1_agreement"], info["cosine"] = _agreement(model, out, held_out, p.batch)
            details.setdefault(f"{contender} {label}", {"runs": []})["runs"].append(info)
            return info["seconds"]
        return fn

    contenders = {f"{c} [{label}]": measure(c, label) for label in sizes for c in QUANT_CONTENDERS}
    raw = alternate(contenders, max(1, ctx.reps - 1), warmup=False)
    rows = []
    for label in sizes:
        base = median(raw[f"ort-minmax [{label}]"])
        for c in QUANT_CONTENDERS:
            key = f"{c} [{label}]"
            runs = details[f"{c} {label}"]["runs"]
            mem = [(r["peak_anon_kb"] - r["base_anon_kb"]) / 1024 for r in runs]
            rows.append(row(f"[{label}={sizes[label]}] {c}: time", raw[key], "s", median(raw[key]) / base,
                            role="reference" if c == "ort-minmax" else "subject" if c == "onnxbn minmax" else ""))
            rows.append(row(f"[{label}={sizes[label]}] {c}: peak RssAnon growth", mem, "MiB", None))
            rows.append(row(f"[{label}={sizes[label]}] {c}: top-1 agreement", [r["top1_agreement"] * 100 for r in runs],
                            "%", None))
            rows.append(row(f"[{label}={sizes[label]}] {c}: cosine", [r["cosine"] for r in runs], "cos", None))
    recovery = _recovery_rows(p)
    rows += recovery["rows"]
    grow = {c: median([(r["peak_anon_kb"] - r["base_anon_kb"]) for r in details[f"{c} 4N"]["runs"]]) /
            max(1.0, median([(r["peak_anon_kb"] - r["base_anon_kb"]) for r in details[f"{c} N"]["runs"]]))
            for c in QUANT_CONTENDERS}
    added = {c: (median([r["peak_anon_kb"] for r in details[f"{c} 4N"]["runs"]]) -
                 median([r["peak_anon_kb"] for r in details[f"{c} N"]["runs"]])) / 1024 for c in QUANT_CONTENDERS}
    worst = max(grow[c] for c in QUANT_CONTENDERS if c.startswith("onnxbn"))
    worst_added = max(added[c] for c in QUANT_CONTENDERS if c.startswith("onnxbn"))
    return Result("quantize", "onnxbn's calibration peak RssAnon N -> 4N: at most 16 MiB more (ratio: growth)", rows,
                  worst, worst_added <= 16.0,
                  [f"{p.description}; calibration N={n} and 4N={4 * n} seeded N(0,1) inputs, batch {p.batch}; "
                   f"accuracy vs the float model on {len(held_out)} other seeded inputs",
                   "time: calibration + Q/DQ placement in a fresh child (imports excluded); onnxbn minmax+cle,bias (the "
                   "default) adds cross-layer equalization and bias correction (one pass per layer level); ratio = "
                   "time / ort-minmax at the same N",
                   "peak RssAnon growth: the child's anonymous memory above its level after imports and data load, "
                   "sampled every 5 ms",
                   "all: QDQ, per-channel int8 weights, uint8 per-tensor activations; percentile 99.99 on both sides",
                   "memory growth N -> 4N: " + ", ".join(f"{c} {g:.2f}x ({added[c]:+.1f} MiB)"
                                                           for c, g in grow.items()),
                   recovery["note"]],
                  {"details": details, "growth": grow, "added_mib": added, "recovery": recovery["raw"]})


RECOVERIES = ("none", "bias", "bn", "bn,bias", "cle", "cle,bias", "per-tensor none", "per-tensor bias",
              "per-tensor cle", "per-tensor cle,bias")


def _recovery_rows(p: Profile) -> dict:
    """Accuracy recovery measured on seeded Conv-BN-ReLU CNNs (depthwise in the middle) whose BN statistics are
    those of the calibration data (onnxbn.recalibrate first, as in a trained model): per recovery, the mean over
    seeds of top-1 agreement and cosine with the float model on held-out inputs."""
    sys.path.insert(0, str(ROOT / "tests"))
    from models import Net
    from onnxbn.quantization import quantize_with_report
    from onnxbn.recalibration import recalibrate

    seeds = {"tiny": 1, "quick": 3, "full": 5}[p.name]
    calibration, held = {"tiny": (32, 64), "quick": (128, 512), "full": (256, 1024)}[p.name]
    raw: dict[str, dict[str, list[float]]] = {r: {"top1": [], "cosine": []} for r in RECOVERIES}
    for seed in range(seeds):
        n, w = Net(seed, bn={"scale": (1.0, 0.5), "B": (0.0, 0.5), "mean": (0.0, 1.0), "var": (0.2, 3.0)}), 16
        y = n.node("Relu", [n.bn(n.conv("input", 3, w, "conv1", bias=False), w, "bn1")], "r1")
        y = n.node("Relu", [n.bn(n.conv(y, w, w, "conv2", bias=False, group=w), w, "bn2")], "r2")
        y = n.node("Relu", [n.bn(n.conv(y, w, 2 * w, "conv3", bias=False, k=1, pad=0), 2 * w, "bn3")], "r3")
        y = n.node("MaxPool", [y], "p1", kernel_shape=[2, 2], strides=[2, 2])
        y = n.node("Relu", [n.bn(n.conv(y, 2 * w, 2 * w, "conv4", bias=False, group=2 * w), 2 * w, "bn4")], "r4")
        y = n.node("Flatten", [n.node("GlobalAveragePool", [y], "gap")], "flat")
        n.gemm(y, 2 * w, 10, "fc", out="logits")
        model = n.model({"input": ["N", 3, 16, 16]}, {"logits": ["N", 10]}, 13)
        rng = np.random.default_rng(100 + seed)
        x = rng.standard_normal((calibration, 3, 16, 16)).astype(np.float32)
        x_held = rng.standard_normal((held, 3, 16, 16)).astype(np.float32)
        model = recalibrate(model, x, device="cpu")
        for r in RECOVERIES:
            _, report = quantize_with_report(model, x, recover=r.split()[-1], per_channel=not r.startswith("per-tensor"),
                                             verify_data=x_held, device="cpu", min_cosine=0, min_top1=0)
            out = report.check["outputs"]["logits"]
            raw[r]["top1"].append(out["top1_agreement"] * 100)
            raw[r]["cosine"].append(out["cosine_similarity"])
    rows = []
    for r in RECOVERIES:
        rows.append(row(f"[recovery] {r}: top-1 agreement (mean of {seeds})", [float(np.mean(raw[r]["top1"]))], "%",
                        None))
        rows.append(row(f"[recovery] {r}: cosine (mean of {seeds})", [float(np.mean(raw[r]["cosine"]))], "cos", None))
    note = (f"recovery: {seeds} seeded Conv-BN-ReLU CNNs (depthwise layers; BN recalibrated on the {calibration} "
            f"calibration inputs), minmax ranges, per-channel weights unless per-tensor, top-1 agreement and cosine "
            f"vs the float model on {held} held-out "
            "inputs: " + "; ".join(f"{r} {np.mean(raw[r]['top1']):.2f}% / {np.mean(raw[r]['cosine']):.5f}"
                                    for r in RECOVERIES))
    return {"rows": rows, "raw": raw, "note": note}


RUNNERS = {
    "stats-cost": bench_stats_cost,
    "stats-memory": bench_stats_memory,
    "insert-time": bench_insert_time,
    "train-step": bench_train_step,
    "feature-cache": bench_feature_cache,
    "data-pipeline": bench_data_pipeline,
    "deploy-latency": bench_deploy_latency,
    "deploy-runtimes": bench_deploy_runtimes,  # optional: by name only (openvino, tract from onnxbn[dev])
    "fixed-cost": bench_fixed_cost,  # by name only: whole processes, minutes on VGG16
    "quantize": bench_quantize,  # by name only: onnxbn vs onnxruntime calibrators, fresh child per run
}


# ----------------------------------------------------------------------------- output

def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return ""
    if unit == "s":
        if value < 1e-2:
            return f"{value * 1e6:.0f} us"
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    if unit:
        return f"{value:.4g} {unit}"
    return f"{value:.3f}x"


def print_table(results: list[Result], profile: Profile) -> None:
    header = ("benchmark", "contender", "median", "ratio", "target", "met?")
    lines = []
    for res in results:
        for i, r in enumerate(res.rows):
            subject = r["role"] == "subject"
            lines.append((res.name if i == 0 else "", r["contender"], fmt(r["median"], r["unit"]), fmt(r["ratio"]),
                          res.target if i == 0 else "",
                          ("yes" if res.met else "NO") + f" ({res.ratio:.3f}x)" if i == 0 else ("*" if subject else "")))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)] if lines else [len(h) for h in header]
    print(f"model: {profile.description}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)))
    for res in results:
        for note in res.notes:
            print(f"note [{res.name}]: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="small model, few repetitions: all seven in minutes")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="OUT", help="write raw timings and machine info here")
    parser.add_argument("--workdir", metavar="DIR", help="where models, stats and images are cached "
                        "(default: $TMPDIR/onnxbn-bench)")
    parser.add_argument("--reps", type=int, help="alternating repetitions per benchmark (default per profile)")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's own; 1 with --quick, "
                        "where a loaded 2-core machine makes 2 spinning threads 100x slower on small layers)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in RUNNERS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(RUNNERS)}")
    profile = PROFILES["tiny" if args.tiny else "quick" if args.quick else "full"]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / "onnxbn-bench"
    ctx = Context(profile, workdir, args.reps or profile.reps)
    threads = args.torch_threads or (1 if args.tiny or args.quick else None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    info = machine_info()
    info["provider"] = "cpu (CPUExecutionProvider, forced for every session)"
    results, report = [], {"machine": info, "profile": {**profile.__dict__, "reps": ctx.reps},
                           "argv": sys.argv[1:], "benchmarks": {}}
    for name in args.names or BENCHMARKS:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        t = now()
        res = RUNNERS[name](ctx)
        res.extra["wall_s"] = now() - t
        results.append(res)
        report["benchmarks"][name] = res.to_dict()
        print(f"  {name}: {res.ratio:.3f}x ({'met' if res.met else 'MISSED'}: {res.target}) in {now() - t:.1f} s",
              file=sys.stderr, flush=True)
        if args.json:  # after every benchmark, so a long run that is cut short keeps what it measured
            Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    info["loadavg_end"] = list(os.getloadavg())
    info["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print_table(results, profile)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
