"""Quantization: onnxbn's calibration vs onnxruntime's calibrators, and accuracy recovery."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .context import Context, Profile, export_small, quiet_session
from .harness import ROOT, Result, alternate, median, row, run_child

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
if contender == "plain inference":  # the yardstick: one float inference of the same data in the same batches
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for i in range(0, len(x), batch):
        session.run(None, {{name: x[i:i + batch]}})
    seconds = time.perf_counter() - t
elif contender.startswith("onnxbn"):
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
PLAIN = "plain inference"  # timed beside them: the yardstick (calibration <= 1.1x plain inference)


def _quant_child(contender: str, model: Path, data: Path, out: Path, batch: int) -> dict:
    code = QUANT_CHILD.format(root=str(ROOT), args=(contender, str(model), str(data), str(out), batch))
    return run_child(code, f"quantize child ({contender})")[0]


def _agreement(reference: Path, candidate: Path, x: np.ndarray, batch: int) -> tuple[float, float]:
    """(top-1 agreement, cosine similarity) of the candidate's outputs with the reference's on `x`."""
    import onnx

    a_s, b_s = quiet_session(onnx.load(str(reference))), quiet_session(onnx.load(str(candidate)))
    name = a_s.get_inputs()[0].name
    a = np.concatenate([np.asarray(a_s.run(None, {name: x[i:i + batch]})[0])
                        for i in range(0, len(x), batch)]).astype(np.float64)
    b = np.concatenate([np.asarray(b_s.run(None, {name: x[i:i + batch]})[0])
                        for i in range(0, len(x), batch)]).astype(np.float64)
    return float(np.mean(a.argmax(1) == b.argmax(1))), float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


# the larger model: a VGG11 shape at half the channels (4x the quick model's convolution work), random weights
LARGER = Profile("larger", "VGG11-shaped, channels/2, 64x64, 512-unit dense layers, random weights", "vgg11", 64,
                 width_div=2, hidden=512, classes=100, batch=4)
SIZES = {"tiny": 8, "quick": 32, "full": 128}  # N of the calibration sets (and 4N)
HELD_OUT = {"tiny": 16, "quick": 256, "full": 512}


def _larger_model(ctx: Context) -> Path:
    """LARGER exported once into the work folder."""
    from onnxbn.io.save import save_model

    path = ctx.workdir / f"{LARGER.name}-{LARGER.arch}-{LARGER.image_size}-w{LARGER.width_div}.onnx"
    if not path.is_file():
        print(f"building {LARGER.description} -> {path}", file=sys.stderr, flush=True)
        save_model(export_small(LARGER), path, force=True)
    return path


def _calibration_cost(ctx: Context, tag: str, model: Path, image_size: int, batch: int) -> dict:
    """Every contender on `model` at N and 4N seeded N(0,1) inputs, alternated, each run in a fresh child: time,
    peak RssAnon growth, and top-1 agreement / cosine of its INT8 model with the float one on held-out inputs."""
    p = ctx.profile
    n = SIZES[p.name]
    rng = np.random.default_rng(99)
    held_out = rng.standard_normal((HELD_OUT[p.name], 3, image_size, image_size)).astype(np.float32)
    sizes = {"N": n, "4N": 4 * n}
    data = {}
    for label, count in sizes.items():
        data[label] = ctx.workdir / f"quant-{tag or p.name}-{image_size}-{count}.npz"
        x = np.random.default_rng(7).standard_normal((count, 3, image_size, image_size)).astype(np.float32)
        np.savez(data[label], x=x)
    details: dict[str, dict] = {}

    def measure(contender, label):
        def fn():
            out = ctx.workdir / f"quant-{tag or p.name}-{label}-{contender.replace(' ', '_')}.onnx"
            info = _quant_child(contender, model, data[label], out, batch)
            if contender != PLAIN:
                info["top1_agreement"], info["cosine"] = _agreement(model, out, held_out, batch)
            details.setdefault(f"{contender} {label}", {"runs": []})["runs"].append(info)
            return info["seconds"]
        return fn

    contenders = {f"{c} [{label}]": measure(c, label) for label in sizes for c in (PLAIN, *QUANT_CONTENDERS)}
    raw = alternate(contenders, max(3, ctx.reps - 1), warmup=False)  # 3 runs at least: memory is the lowest of 3
    rows = []
    prefix = f"{tag} " if tag else ""
    for label in sizes:
        base, plain = median(raw[f"ort-minmax [{label}]"]), median(raw[f"{PLAIN} [{label}]"])
        rows.append(row(f"[{prefix}{label}={sizes[label]}] {PLAIN}: time", raw[f"{PLAIN} [{label}]"], "s",
                        plain / base))
        for c in QUANT_CONTENDERS:
            key, name = f"{c} [{label}]", f"[{prefix}{label}={sizes[label]}] {c}"
            runs = details[f"{c} {label}"]["runs"]
            mem = [(r["peak_anon_kb"] - r["base_anon_kb"]) / 1024 for r in runs]
            rows.append(row(f"{name}: time", raw[key], "s", median(raw[key]) / base,
                            role="reference" if c == "ort-minmax" else "subject" if c == "onnxbn minmax" else ""))
            rows.append(row(f"{name}: peak RssAnon growth", mem, "MiB", None))
            rows.append(row(f"{name}: top-1 agreement", [r["top1_agreement"] * 100 for r in runs], "%", None))
            rows.append(row(f"{name}: cosine", [r["cosine"] for r in runs], "cos", None))
            rows.append(row(f"{name}: time / plain inference", [median(raw[key]) / plain], "x", None))
    def lowest(c: str, label: str) -> float:  # the measure: anonymous memory, lowest of the runs
        return min(r["peak_anon_kb"] - r["base_anon_kb"] for r in details[f"{c} {label}"]["runs"])

    grow = {c: lowest(c, "4N") / max(1.0, lowest(c, "N")) for c in QUANT_CONTENDERS}
    added = {c: (lowest(c, "4N") - lowest(c, "N")) / 1024 for c in QUANT_CONTENDERS}
    times = {label: {c: median(raw[f"{c} [{label}]"]) / median(raw[f"{PLAIN} [{label}]"]) for c in QUANT_CONTENDERS}
             for label in sizes}
    note = (f"{prefix or 'model: '}calibration N={n} and 4N={4 * n} seeded N(0,1) inputs, batch {batch}; accuracy vs "
            f"the float model on {len(held_out)} other seeded inputs; memory growth N -> 4N: "
            + ", ".join(f"{c} {g:.2f}x ({added[c]:+.1f} MiB)" for c, g in grow.items())
            + "; time / plain inference at N, 4N: "
            + ", ".join(f"{c} {times['N'][c]:.2f}x, {times['4N'][c]:.2f}x" for c in QUANT_CONTENDERS))
    return {"rows": rows, "details": details, "growth": grow, "added_mib": added, "times": times, "note": note}


def bench_quantize(ctx: Context) -> Result:
    """onnxbn's calibration (in-graph ranges + histograms) vs onnxruntime's calibrators, at N and 4N samples, on the
    profile's model and (not in the tiny profile) a larger one; top-1 under a domain shift; recovery per mode."""
    p = ctx.profile
    costs = {"": _calibration_cost(ctx, "", ctx.model_path, p.image_size, p.batch)}
    if p.name != "tiny":
        costs["larger"] = _calibration_cost(ctx, "larger", _larger_model(ctx), LARGER.image_size, LARGER.batch)
    shift = shift_accuracy(ctx)
    recovery = _recovery_rows(p)
    rows = [r for cost in costs.values() for r in cost["rows"]] + shift["rows"] + recovery["rows"]
    onnxbn = [c for c in QUANT_CONTENDERS if c.startswith("onnxbn")]
    worst = max(cost["growth"][c] for cost in costs.values() for c in onnxbn)
    worst_added = max(cost["added_mib"][c] for cost in costs.values() for c in onnxbn)
    return Result("quantize", "onnxbn's calibration peak RssAnon N -> 4N: at most 16 MiB more (ratio: growth)", rows,
                  worst, worst_added <= 16.0,
                  [f"{p.description}" + (f"; larger: {LARGER.description}" if "larger" in costs else ""),
                   *[cost["note"] for cost in costs.values()],
                   "time: calibration + Q/DQ placement in a fresh child (imports excluded); onnxbn minmax+cle,bias (the "
                   "default) adds cross-layer equalization and bias correction (one pass per layer level); ratio = "
                   "time / ort-minmax at the same N; plain inference: a float session created and run over the same "
                   "inputs in the same batches, also in a fresh child",
                   "peak RssAnon growth: the child's anonymous memory above its level after imports and data load, "
                   "sampled every 5 ms; N -> 4N growth compares the lowest of the runs (the issue's measure)",
                   "all: QDQ, per-channel int8 weights, uint8 per-tensor activations; percentile 99.99 on both sides",
                   shift["note"], recovery["note"]],
                  {"details": {tag or "model": cost["details"] for tag, cost in costs.items()},
                   "growth": {tag or "model": cost["growth"] for tag, cost in costs.items()},
                   "added_mib": {tag or "model": cost["added_mib"] for tag, cost in costs.items()},
                   "time_vs_plain_inference": {tag or "model": cost["times"] for tag, cost in costs.items()},
                   "shift": shift["raw"], "recovery": recovery["raw"]})


SHIFT_SIZES = {"tiny": (16, 32), "quick": (256, 2000), "full": (512, 4000)}  # calibration, held-out images
SHIFT_BATCH = 16  # divides every calibration size: onnxruntime's Percentile/Entropy fail on a short last batch


def _top1(model: Path, x: np.ndarray, y: np.ndarray, batch: int) -> float:
    import onnx

    session = quiet_session(onnx.load(str(model)))
    name = session.get_inputs()[0].name
    logits = np.concatenate([np.asarray(session.run(None, {name: x[i:i + batch]})[0])
                             for i in range(0, len(x), batch)])
    return float(np.mean(logits.argmax(1) == y))


def shift_accuracy(ctx: Context, contenders=QUANT_CONTENDERS) -> dict:
    """Top-1 under a domain shift: the bundled demo model (trained on the demo's "source" task) quantized by each
    contender from clean source-task images, then evaluated with labels on held-out clean images and on the same
    images through the demo's domain shift (onnxbn.demo.shift: lower contrast, colour cast, brighter, blurred);
    the float model's top-1 beside them. Target: onnxbn's default at least onnxruntime's default (MinMax)."""
    from onnxbn.demo.data import make_task, to_model_input
    from onnxbn.demo.run import BUNDLED
    from onnxbn.demo.shift import shift_images

    n_cal, n_held = SHIFT_SIZES[ctx.profile.name]
    cal_images, _ = make_task("source", n_cal, 11)
    cal = ctx.workdir / f"shift-calibration-{n_cal}.npz"
    np.savez(cal, x=to_model_input(cal_images))
    images, y = make_task("source", n_held, 12)
    sets = {"clean": to_model_input(images), "shifted": to_model_input(shift_images(images))}
    raw = {"float": {d: _top1(BUNDLED, x, y, SHIFT_BATCH) for d, x in sets.items()}}
    for c in contenders:
        out = ctx.workdir / f"shift-{n_cal}-{c.replace(' ', '_')}.onnx"
        info = _quant_child(c, BUNDLED, cal, out, SHIFT_BATCH)
        raw[c] = {**{d: _top1(out, x, y, SHIFT_BATCH) for d, x in sets.items()}, "seconds": info["seconds"]}
    rows = [row(f"[shift] {c}: top-1 {d}", [100 * raw[c][d]], "%", None) for c in raw for d in sets]
    default, ort = raw.get("onnxbn minmax+cle,bias"), raw.get("ort-minmax")
    verdict = ("" if default is None or ort is None else
               f"; under the shift onnxbn's default {100 * default['shifted']:.2f}% vs onnxruntime's MinMax "
               f"{100 * ort['shifted']:.2f}%: target {'met' if default['shifted'] >= ort['shifted'] else 'MISSED'}")
    note = (f"shift: the bundled demo model (10 source classes, 32x32), calibrated on {n_cal} clean source images "
            f"(batch {SHIFT_BATCH}), top-1 on {n_held} held-out images clean / shifted: "
            + "; ".join(f"{c} {100 * v['clean']:.2f}% / {100 * v['shifted']:.2f}%" for c, v in raw.items()) + verdict)
    return {"rows": rows, "raw": raw, "note": note}


RECOVERIES = ("none", "bias", "bn", "bn,bias", "cle", "cle,bias", "per-tensor none", "per-tensor bias",
              "per-tensor cle", "per-tensor cle,bias")


def _recovery_rows(p: Profile) -> dict:
    """Accuracy recovery measured on seeded Conv-BN-ReLU CNNs (depthwise in the middle) whose BN statistics are
    those of the calibration data (onnxbn.recalibrate first, as in a trained model): per recovery, the mean over
    seeds of top-1 agreement and cosine with the float model on held-out inputs."""
    from models import Net  # tests/models.py, on the path through harness
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
        model = recalibrate(model, x, device="cpu", prior=0)  # the BN statistics become those of x alone
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
