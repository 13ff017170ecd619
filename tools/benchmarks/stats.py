"""Collecting statistics and inserting BN: stats-cost, stats-memory, insert-time."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .context import Context, expose, numpy_moments, write_jpegs
from .harness import ROOT, Result, alternate, median, now, row, run_child

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

        def run_onnxbn(selector=selector):
            t = now()
            onnxbn.collect_stats(model, x, after=selector, batch_size=p.batch, device="cpu")
            return now() - t

        def run_plain():
            t = now()
            session = ctx.session(model)
            for b in batches:
                session.run(None, {name: b})
            return now() - t

        def run_expose(exposed=exposed, names=names):
            t = now()
            session = ctx.session(exposed)
            moments = {n: ChannelMoments() for n in names}
            for b in batches:
                for n, value in zip(names, session.run(names, {name: b}), strict=True):
                    moments[n].merge(*numpy_moments(np.asarray(value)))
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
    return run_child(code, f"stats-memory child ({mode})")[0]


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
