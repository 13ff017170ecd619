"""Running the result: deploy-latency, deploy-runtimes (onnxruntime, openvino, tract), fixed-cost."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .context import Context, quiet_session
from .harness import ROOT, Result, alternate, median, now, row, run_child

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

        def runner(session, x=x):
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
    out, wall, stderr = run_child(code, f"{kind} {argv[:2]}")
    if out["code"] not in (0, 1):
        raise RuntimeError(f"{kind} {argv[:2]} exited {out['code']}: {stderr[-2000:]}")
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
                                               "--batch-size", str(p.batch), "--workers", "0", "-o", out + ".npz",
                                               "--force"],
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
