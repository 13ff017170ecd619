#!/usr/bin/env python
"""Should onnxbn's graph plumbing use onnx-ir or onnx-graphsurgeon? Numbers from one run.

    python tools/bench_deps.py [--json OUT] [--workdir DIR] [--reps R] [--no-demo] [--no-vgg16]

Needs `pip install onnx-ir onnx-graphsurgeon` in the environment (neither is an onnxbn
dependency; a missing one is reported and its contenders are skipped).

Every section alternates its contenders in one process (order A B C, then C B A, ...),
repeats, and reports the median, with the ratio to a reference contender:

  a. insert    load + identity-BN splice + save. onnxbn's own path (`insert_bn(path)` +
               `save_model`, the CLI's route; "as shipped" also hashes the weights to check
               the stats' provenance, "no hash" gets stats without `model_sha256` so it does
               exactly the work of the onnx-ir contender; "proto API" is `load_model` +
               `insert_bn(proto)`, which copies the caller's proto first) against the same
               splice written with onnx-ir (`ir.load`, onnx-ir's shape inference pass for
               dtypes and channel checks, BN nodes and initializers from the same Stats,
               uses rewired, `ir.save`, atomic rename). Afterwards the outputs are compared:
               onnxruntime on a seeded random input (max |a - b| / max |a|), node lists,
               initializer values and metadata_props.
  b. session   onnxruntime session creation for the BN model: from the file path, from an
               in-memory ModelProto through `onnxbn.runtimes.ort_backend.make_session` (weights as
               in-memory external initializers), from serialised bytes, and from an onnx-ir
               model (`ir.to_proto(...).SerializeToString()`, and `ir.to_proto` handed to
               make_session).
  c. memory    peak RSS (VmHWM from /proc/self/status) of a fresh child process per run for
               load + insert + save (own, onnx-ir), the gs round trip (onnx.load,
               import_onnx, export_onnx, onnx.save) and a floor (onnx.load + onnx.save),
               with VmRSS after each stage. VGG16 only. For information, onnx-ir also saving
               with external data (`<out>.data` next to the model: not onnxbn's single-file
               layout below 2 GB, so not a like-for-like contender).
  d. gs        `gs.export_onnx(gs.import_onnx(proto))` against `ir.to_proto(ir.from_proto(proto))`
               and one `ModelProto.CopyFrom` (what a full copy costs), in memory; whether
               metadata_props, ir_version, opsets and producer survive; whether export copies
               every initializer (child's RSS growth during export / weight bytes).

Models: VGG16 with random weights (`onnxbn.export_vgg("vgg16")`, 528 MB, exported once into
the work folder, reused when --workdir already holds it) and the small `models/demo_vgg.onnx`.
Stats: `onnxbn.collect_stats` on two seeded random images, `after="dense"` (and "linear",
16 points instead of 2, for the insert section). All sessions: CPU provider, default threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from benchmarks.harness import ROOT, alternate, machine_info, median, now, proc_status

if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

# ----------------------------------------------------------------------------- helpers

def available(module: str) -> str | None:
    """The installed version of `module`, or None."""
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - a broken install counts as missing
        return None
    return getattr(mod, "__version__", "?")


def ort_options():
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return options


def ort_session(source):
    import onnxruntime as ort

    return ort.InferenceSession(source, ort_options(), providers=["CPUExecutionProvider"])


def no_hash(stats):
    """The same Stats without `model_sha256`: insert_bn then skips the provenance hash."""
    from onnxbn.stats import Stats

    return Stats(stats.moments, {k: v for k, v in stats.meta.items() if k != "model_sha256"})


# ----------------------------------------------------------------------------- the onnx-ir splice

def ir_insert_bn(path, stats, out_path, eps: float = 1e-5, stage=lambda name: None, external: bool = False) -> None:
    """onnxbn's identity-BN splice (see onnxbn/insert.py) written with onnx-ir.

    Same names as insert_bn: the producer writes `<t>/pre_bn`, BN (named
    `<producer>/onnxbn_bn`) writes `<t>`; a graph input keeps its name and its
    readers read `<t>/bn`. Same parameters (insert.identity_bn_params), same
    metadata entry. The float16 widening (Cast-BN-Cast) is not reproduced: raises.
    `external`: weights go to `<out>.data` (onnx-ir streams them; a different file layout).
    """
    import onnx_ir as ir
    from onnx_ir.passes.common import ShapeInferencePass

    from onnxbn.errors import UserError
    from onnxbn.insert import BN_SUFFIX, dead_channels, identity_bn_params

    model = ir.load(str(path))
    stage("load")
    ShapeInferencePass(strict_mode=False, data_prop=True)(model)  # dtypes + channel counts
    graph = model.graph
    values = ir.convenience.create_value_mapping(graph)
    taken = set(values) | {n.name for n in ir.traversal.RecursiveGraphIterator(graph) if n.name}
    taken |= {graph.name} if graph.name else set()

    def unique(base: str) -> str:
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    leading: list = []
    for tensor, m in stats.moments.items():
        v = values.get(tensor)
        if v is None or v.is_initializer():
            raise UserError(f"the stats name tensor {tensor!r}, which is not in this model")
        if v.shape is not None and len(v.shape) > 1 and isinstance(v.shape[1], int) and v.shape[1] != m.mean.size:
            raise UserError(f"tensor {tensor!r} has {v.shape[1]} channels but the stats have {m.mean.size}")
        dtype = v.dtype or ir.DataType.FLOAT
        params = identity_bn_params(m.mean, m.var, eps, dtype.numpy())
        if not all(np.isfinite(p.astype(np.float64)).all() for p in params.values()):
            raise NotImplementedError("float32 widening of float16 BN is not part of this benchmark")
        producer = v.producer()
        node_name = unique(((producer.name or tensor) if producer is not None else tensor) + BN_SUFFIX)
        inits = []
        for k in ("scale", "B", "mean", "var"):
            init_name = unique(f"{node_name}.{k}")
            init = ir.val(init_name, const_value=ir.tensor(params[k], name=init_name))
            graph.register_initializer(init)
            inits.append(init)
        uses = list(v.uses())  # taken before the BN node reads v
        bn = ir.node("BatchNormalization", [v, *inits], {"epsilon": float(eps)}, name=node_name)
        out = bn.outputs[0]
        out.type, out.shape = v.type, v.shape
        for use in uses:
            use.node.replace_input_with(use.idx, out)
        if producer is None:
            out.name = unique(f"{tensor}/bn")
            leading.append(bn)
        else:
            for i, o in enumerate(graph.outputs):  # graph outputs keep their names: BN takes it
                if o is v:
                    graph.outputs[i] = out
            v.name = unique(f"{tensor}/pre_bn")
            out.name = tensor
            graph.insert_after(producer, bn)
    if leading:
        graph.insert_before(graph.node(0), leading)
    dead = dead_channels(stats)
    model.metadata_props["onnxbn.insert"] = json.dumps({
        "bn_inserted": len(stats.moments), "eps": eps, "selector": stats.meta.get("selector"),
        "stats_samples": stats.meta.get("samples"), "stats_model_sha256": stats.meta.get("model_sha256"),
        "dead_channels": sum(dead.values()), "float32_bn": 0})
    stage("insert")
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    ir.save(model, str(tmp), external_data=out_path.name + ".data" if external else None)
    os.replace(tmp, out_path)
    stage("save")


def own_insert(path, stats, out_path, stage=lambda name: None) -> None:
    from onnxbn.insert import insert_bn
    from onnxbn.io.save import save_model

    proto = insert_bn(path, stats)  # loads the file itself (the CLI's route): no defensive copy
    stage("load+insert")
    save_model(proto, out_path, force=True)
    stage("save")


def own_insert_proto_api(path, stats, out_path, stage=lambda name: None) -> None:
    from onnxbn.insert import insert_bn
    from onnxbn.io.load import load_model
    from onnxbn.io.save import save_model

    proto = load_model(path)
    stage("load")
    out = insert_bn(proto, stats)  # the caller's proto: insert_bn works on a copy
    stage("insert")
    save_model(out, out_path, force=True)
    stage("save")


# ----------------------------------------------------------------------------- child processes (memory)

def child_main(mode: str, model: str, stats_path: str, out: str) -> None:
    """One contender in a fresh process; prints JSON with stage RSS and the peak (VmHWM)."""
    stages: dict[str, float] = {}
    peaks: dict[str, float] = {}

    def mark(name):
        status = proc_status()
        stages[name], peaks[name] = status["VmRSS"], status["VmHWM"]

    t0 = now()
    if mode in ("own", "own-nohash", "ir", "ir-ext"):
        from onnxbn.stats import load_stats

        stats = load_stats(stats_path)
        stats = no_hash(stats) if mode != "own" else stats
    if mode in ("own", "own-nohash"):

        mark("imports")
        own_insert(model, stats, out, stage=mark)
    elif mode in ("ir", "ir-ext"):
        import onnx_ir as ir  # noqa: F401  (imported before the baseline reading)
        from onnx_ir.passes.common import ShapeInferencePass  # noqa: F401

        import onnxbn.insert  # noqa: F401

        mark("imports")
        ir_insert_bn(model, stats, out, stage=mark, external=mode == "ir-ext")
    elif mode == "gs":
        import onnx
        import onnx_graphsurgeon as gs  # pyright: ignore[reportMissingImports]  # optional, not in the dev venv

        mark("imports")
        proto = onnx.load(model)
        mark("load")
        graph = gs.import_onnx(proto)
        mark("import_onnx")
        exported = gs.export_onnx(graph)
        mark("export_onnx")
        onnx.save(exported, out)
        mark("save")
    elif mode == "floor":
        import onnx

        mark("imports")
        proto = onnx.load(model)
        mark("load")
        onnx.save(proto, out)
        mark("save")
    else:
        raise SystemExit(f"unknown child mode {mode}")
    status = proc_status()
    print(json.dumps({"mode": mode, "seconds": now() - t0, "hwm_mb": status["VmHWM"], "stages_rss_mb": stages,
                      "stages_hwm_mb": peaks}))


def run_child(mode: str, model: Path, stats: Path, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, str(model), str(stats), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- checks

def graph_signature(path: Path):
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    nodes = [(n.op_type, n.name, tuple(n.input), tuple(n.output),
              tuple(sorted(a.SerializeToString(deterministic=True) for a in n.attribute))) for n in m.graph.node]
    return m, nodes


def compare_outputs(original: Path, own: Path, ir_out: Path, x: np.ndarray) -> dict:
    """Same computation (onnxruntime), same nodes, same initializer values, same metadata."""
    import onnx
    from onnx import numpy_helper

    from onnxbn.feeding import rel_error

    ys = {}
    for key, p in (("original", original), ("own", own), ("ir", ir_out)):
        ys[key] = ort_session(str(p)).run(None, {"input": x})[0]
    own_m, own_nodes = graph_signature(own)
    ir_m, ir_nodes = graph_signature(ir_out)
    own_init = {t.name: t for t in own_m.graph.initializer}
    ir_init = {t.name: t for t in ir_m.graph.initializer}
    same_values = set(own_init) == set(ir_init) and all(
        np.array_equal(numpy_helper.to_array(own_init[k]), numpy_helper.to_array(ir_init[k])) for k in own_init)
    own_meta = {p.key: p.value for p in own_m.metadata_props}
    ir_meta = {p.key: p.value for p in ir_m.metadata_props}
    original_m = onnx.load(str(original), load_external_data=False)
    return {
        "rel_err_own_vs_original": rel_error(ys["original"], ys["own"]),
        "rel_err_ir_vs_original": rel_error(ys["original"], ys["ir"]),
        "rel_err_ir_vs_own": rel_error(ys["own"], ys["ir"]),
        "bn_nodes_own": sum(n[0] == "BatchNormalization" for n in own_nodes),
        "bn_nodes_ir": sum(n[0] == "BatchNormalization" for n in ir_nodes),
        "same_node_list_in_order": own_nodes == ir_nodes,
        "same_node_set": sorted(own_nodes) == sorted(ir_nodes),
        "same_initializer_names_and_values": bool(same_values),
        "same_metadata_props": own_meta == ir_meta,
        "ir_keeps_original_metadata": all(ir_meta.get(p.key) == p.value for p in original_m.metadata_props),
        "value_info_own": len(own_m.graph.value_info),
        "value_info_ir": len(ir_m.graph.value_info),
        "file_mb_own": own.stat().st_size / 2**20,
        "file_mb_ir": ir_out.stat().st_size / 2**20,
    }


def header_facts(proto) -> dict:
    return {"ir_version": proto.ir_version, "opsets": sorted((i.domain, i.version) for i in proto.opset_import),
            "producer": (proto.producer_name, proto.producer_version),
            "metadata_props": {p.key: p.value for p in proto.metadata_props},
            "initializers": len(proto.graph.initializer), "nodes": len(proto.graph.node)}


# ----------------------------------------------------------------------------- sections

class Report:
    def __init__(self):
        self.rows: list[dict] = []
        self.checks: dict = {}

    def add(self, section, model, contender, values, unit, reference=None, note=""):
        self.rows.append({"section": section, "model": model, "contender": contender, "unit": unit,
                          "values": values, "median": median(values), "reference": reference, "note": note})

    def finish(self):
        by_key = {(r["section"], r["model"], r["contender"]): r for r in self.rows}
        for r in self.rows:
            ref = by_key.get((r["section"], r["model"], r["reference"])) if r["reference"] else None
            r["ratio"] = r["median"] / ref["median"] if ref and ref["median"] else None


def stage_timed(parts: dict[str, list[float]], fn, *args):
    """A contender: seconds for fn(*args, stage=...), each stage's seconds appended to `parts`."""
    def run():
        t = last = now()

        def stage(step):
            nonlocal last
            parts.setdefault(step, []).append(now() - last)
            last = now()
        fn(*args, stage=stage)
        return now() - t
    return run


def section_insert(rep: Report, label: str, src: Path, stats_by_sel: dict, work: Path, reps: int, x, have_ir: bool):
    outs = {}
    for sel, stats in stats_by_sel.items():
        plain = no_hash(stats)
        o = {k: work / f"{label}-{sel}-{k}.onnx" for k in ("own", "own-hash", "own-proto", "ir")}
        outs[sel] = o

        splits: dict[str, dict[str, list[float]]] = {}

        def timed(name, fn, *args, splits=splits):
            return stage_timed(splits.setdefault(name, {}), fn, *args)

        names = {"own": "own (no hash): insert_bn(path) + save_model",
                 "hash": "own as shipped (+ provenance sha256 check)",
                 "proto": "own proto API: load_model + insert_bn(proto) + save",
                 "ir": "onnx-ir: ir.load + shape inference + splice + ir.save"}
        contenders = {names["own"]: timed(names["own"], own_insert, src, plain, o["own"])}
        if sel == "dense":
            contenders[names["hash"]] = timed(names["hash"], own_insert, src, stats, o["own-hash"])
            contenders[names["proto"]] = timed(names["proto"], own_insert_proto_api, src, plain, o["own-proto"])
        if have_ir:
            contenders[names["ir"]] = timed(names["ir"], ir_insert_bn, src, plain, o["ir"])
        raw = alternate(contenders, reps, warmup=False, collect=True)
        section = f"a. load+insert+save [{sel}, {len(stats.moments)} BN]"
        for name, values in raw.items():
            rep.add(section, label, name, values, "s", reference=names["own"])
        for name, parts in splits.items():
            for step, values in parts.items():
                rep.add(section, label, f"  - {name.split(':')[0]}: {step}", values, "s")
        if have_ir:
            check = compare_outputs(src, o["own"], o["ir"], x)
            rep.checks[f"{label}/{sel}"] = check
            print(f"  check {label}/{sel}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in check.items()), flush=True)
    return outs


def section_session(rep: Report, label: str, bn_path: Path, reps: int, have_ir: bool):
    from onnxbn.io.load import load_model
    from onnxbn.runtimes.ort_backend import make_session

    proto = load_model(bn_path)
    contenders = {
        "ort InferenceSession(path)": lambda: ort_session(str(bn_path)),
        "onnxbn make_session(proto)": lambda: make_session(proto, "cpu"),
        "ort InferenceSession(proto.SerializeToString())": lambda: ort_session(proto.SerializeToString()),
    }
    if have_ir:
        import onnx_ir as ir

        ir_model = ir.load(str(bn_path))
        contenders["onnx-ir: InferenceSession(ir.to_proto(m).SerializeToString())"] = \
            lambda: ort_session(ir.to_proto(ir_model).SerializeToString())
        contenders["onnx-ir: make_session(ir.to_proto(m))"] = lambda: make_session(ir.to_proto(ir_model), "cpu")

    def timed(fn):
        def run():
            t = now()
            session = fn()
            elapsed = now() - t
            del session
            return elapsed
        return run

    raw = alternate({k: timed(v) for k, v in contenders.items()}, reps, warmup=False, collect=True)
    for name, values in raw.items():
        rep.add("b. session creation (BN model)", label, name, values, "s", reference="onnxbn make_session(proto)")


def section_memory(rep: Report, label: str, src: Path, stats_path: Path, work: Path, reps: int, have_ir, have_gs):
    modes = ["floor", "own-nohash"] + (["ir", "ir-ext"] if have_ir else []) + (["gs"] if have_gs else [])
    names = {"floor": "floor: onnx.load + onnx.save", "own-nohash": "own: insert_bn(path) + save_model",
             "ir": "onnx-ir: ir.load + splice + ir.save",
             "ir-ext": "onnx-ir: same, ir.save(external_data=) [other layout]",
             "gs": "gs: onnx.load + import/export_onnx + onnx.save"}
    details: dict[str, list] = {m: [] for m in modes}

    def measure(mode):
        def run():
            info = run_child(mode, src, stats_path, work / f"{label}-child-{mode}.onnx")
            details[mode].append(info)
            return info["hwm_mb"]
        return run

    raw = alternate({m: measure(m) for m in modes}, reps, warmup=False, collect=True)
    for m in modes:
        rep.add("c. peak RSS (VmHWM), fresh process", label, names[m], raw[m], "MiB", reference=names["own-nohash"])
    for m in modes:
        rep.add("c. child wall time (incl. imports)", label, names[m], [d["seconds"] for d in details[m]], "s",
                reference=names["own-nohash"])
    rep.checks[f"{label}/memory_stages"] = details
    return details


def section_gs(rep: Report, label: str, src: Path, reps: int, have_ir: bool, have_gs: bool, x, work: Path):
    import onnx

    proto = onnx.load(str(src))
    contenders = {}
    if have_gs:
        import onnx_graphsurgeon as gs  # pyright: ignore[reportMissingImports]  # optional, not in the dev venv

        contenders["gs: export_onnx(import_onnx(proto))"] = lambda: gs.export_onnx(gs.import_onnx(proto))
    if have_ir:
        import onnx_ir as ir

        contenders["onnx-ir: to_proto(from_proto(proto))"] = lambda: ir.to_proto(ir.from_proto(proto))

    def copy():
        out = onnx.ModelProto()
        out.CopyFrom(proto)
        return out
    contenders["ModelProto.CopyFrom (one full copy)"] = copy

    def timed(fn):
        def run():
            t = now()
            result = fn()
            elapsed = now() - t
            del result
            return elapsed
        return run

    raw = alternate({k: timed(v) for k, v in contenders.items()}, reps, warmup=False, collect=True)
    for name, values in raw.items():
        rep.add("d. in-memory round trip", label, name, values, "s", reference="ModelProto.CopyFrom (one full copy)")
    facts = {"original": header_facts(proto)}
    from onnxbn.feeding import rel_error

    y0 = np.asarray(ort_session(str(src)).run(None, {"input": x})[0])  # dense outputs
    if have_gs:
        exported = gs.export_onnx(gs.import_onnx(proto))
        facts["gs"] = header_facts(exported)
        p = work / f"{label}-gs-roundtrip.onnx"
        onnx.save(exported, str(p))
        facts["gs"]["rel_err_vs_original"] = rel_error(y0, np.asarray(ort_session(str(p)).run(None, {"input": x})[0]))
        del exported
    if have_ir:
        back = ir.to_proto(ir.from_proto(proto))
        facts["ir"] = header_facts(back)
        del back
    orig = facts["original"]
    for key in ("gs", "ir"):
        if key in facts:
            f = facts[key]
            f["keeps_metadata_props"] = f["metadata_props"] == orig["metadata_props"]
            f["keeps_ir_version"] = f["ir_version"] == orig["ir_version"]
            f["keeps_opsets"] = f["opsets"] == orig["opsets"]
            f["keeps_producer"] = f["producer"] == orig["producer"]
    rep.checks[f"{label}/roundtrip_facts"] = facts
    return facts


# ----------------------------------------------------------------------------- main

def versions() -> dict:
    out = {}
    for mod in ("onnx", "onnxruntime", "onnx_ir", "onnx_graphsurgeon", "numpy", "google.protobuf", "torch", "onnxbn"):
        try:
            m = __import__(mod, fromlist=["_"])
            out[mod] = getattr(m, "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            out[mod] = f"missing ({type(exc).__name__}: {exc})"
    return out


def prepare_vgg16(work: Path) -> tuple[Path, bool]:
    path = work / "vgg16.onnx"
    if path.is_file():
        return path, True
    import onnxbn
    from onnxbn.io.save import save_model

    save_model(onnxbn.export_vgg("vgg16"), path, force=True)
    return path, False


def print_table(rep: Report) -> None:
    print()
    section = None
    for r in rep.rows:
        if (r["section"], r["model"]) != section:
            section = (r["section"], r["model"])
            print(f"\n== {r['section']} -- {r['model']}")
            print(f"   {'contender':<62} {'median':>9} {'min':>9} {'max':>9} {'n':>2}  ratio")
        vals = r["values"]
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else ""
        mark = "  (ref)" if r["contender"] == r["reference"] else ""
        print(f"   {r['contender'][:62]:<62} {r['median']:>9.3f} {min(vals):>9.3f} {max(vals):>9.3f} {len(vals):>2}"
              f"  {ratio}{mark}  [{r['unit']}]")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    ap.add_argument("--json", type=Path, help="write every raw number here")
    ap.add_argument("--workdir", type=Path, help="keep models here (VGG16 is reused when present)")
    ap.add_argument("--reps", type=int, default=3, help="alternations for VGG16 (demo: 2x + 1)")
    ap.add_argument("--no-demo", action="store_true")
    ap.add_argument("--no-vgg16", action="store_true")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "MODEL", "STATS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(*args.child)
        return 0

    import onnxbn
    from onnxbn.feeding import image_size_for
    from onnxbn.io.load import load_model

    t_start = now()
    have_ir, have_gs = available("onnx_ir") is not None, available("onnx_graphsurgeon") is not None
    info = {"machine": machine_info(), "versions": versions(), "have_onnx_ir": have_ir, "have_gs": have_gs}
    print("versions:", json.dumps(info["versions"]), flush=True)
    cleanup = None
    if args.workdir:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="bench_deps.")
        work = Path(cleanup.name)
    rep = Report()
    models = []
    if not args.no_vgg16:
        t = now()
        path, reused = prepare_vgg16(work)
        info["vgg16_export_s"] = None if reused else now() - t
        info["vgg16_reused"] = reused
        models.append(("vgg16", path, args.reps, True))
    if not args.no_demo:
        models.append(("demo_vgg", ROOT / "models" / "demo_vgg.onnx", 2 * args.reps + 1, False))
    try:
        for label, src, reps, big in models:
            print(f"[{now() - t_start:6.1f}s] {label}: {src} ({src.stat().st_size / 2**20:.1f} MiB), stats ...",
                  flush=True)
            size = image_size_for(load_model(src))
            rng = np.random.default_rng(0)
            calib = rng.standard_normal((2, 3, size, size)).astype(np.float32)
            x = rng.standard_normal((1, 3, size, size)).astype(np.float32)
            stats_by_sel, stats_paths = {}, {}
            for sel in ("dense", "linear"):
                stats_by_sel[sel] = onnxbn.collect_stats(str(src), calib, after=sel, batch_size=2, device="cpu")
                stats_paths[sel] = stats_by_sel[sel].save(work / f"{label}-{sel}.stats.npz", force=True)
            print(f"[{now() - t_start:6.1f}s] {label}: a. insert", flush=True)
            outs = section_insert(rep, label, src, stats_by_sel, work, reps, x, have_ir)
            print(f"[{now() - t_start:6.1f}s] {label}: b. session", flush=True)
            section_session(rep, label, outs["dense"]["own"], reps, have_ir)
            if big:
                print(f"[{now() - t_start:6.1f}s] {label}: c. memory", flush=True)
                section_memory(rep, label, src, stats_paths["dense"], work, max(2, reps - 1), have_ir, have_gs)
            print(f"[{now() - t_start:6.1f}s] {label}: d. round trips", flush=True)
            section_gs(rep, label, src, reps, have_ir, have_gs, x, work)
            for f in work.glob(f"{label}-*.onnx*"):  # 528 MB each: keep only the source model
                f.unlink()
        rep.finish()
        print_table(rep)
        # gs export: does it copy every initializer? RSS growth during export vs the weight bytes.
        stages = rep.checks.get("vgg16/memory_stages", {}).get("gs", [])
        if stages:
            weight_mb = src_weight_mb(work / "vgg16.onnx")
            growth = [s["stages_rss_mb"]["export_onnx"] - s["stages_rss_mb"]["import_onnx"] for s in stages]
            rep.checks["vgg16/gs_export_copy"] = {
                "weight_mb": weight_mb, "rss_growth_during_export_mb": growth,
                "growth_over_weights": median(growth) / weight_mb,
                "copies_every_initializer": median(growth) > 0.9 * weight_mb}
        summary = decision_numbers(rep)
        print("\ndeciding numbers:")
        for key, value in summary.items():
            print(f"  {key}: {value:.3g}" if isinstance(value, float) else f"  {key}: {value}")
        print("\nchecks:")
        for key, value in rep.checks.items():
            if key.endswith("memory_stages"):
                for mode, runs in value.items():
                    r = runs[-1]
                    print(f"  {key} {mode} (MiB after each stage, RSS/peak so far): " + ", ".join(
                        f"{k} {v:.0f}/{r['stages_hwm_mb'].get(k, float('nan')):.0f}"
                        for k, v in r["stages_rss_mb"].items()) + f"; final peak {r['hwm_mb']:.0f}")
            elif key.endswith("roundtrip_facts"):
                for who, f in value.items():
                    keep = {k: v for k, v in f.items() if k.startswith("keeps_") or k == "rel_err_vs_original"}
                    print(f"  {key} {who}: metadata keys {sorted(f['metadata_props'])}, ir_version {f['ir_version']}, "
                          f"opsets {f['opsets']}, producer {f['producer']}, {keep}")
            else:
                print(f"  {key}: {value}")
        info["loadavg_end"] = os.getloadavg()
        info["total_s"] = now() - t_start
        print(f"\ntotal {info['total_s']:.0f}s; load average {info['machine']['loadavg_start']} -> {info['loadavg_end']}")
        if args.json:
            args.json.write_text(json.dumps({"info": info, "summary": summary, "rows": rep.rows, "checks": rep.checks},
                                            indent=1, default=str))
            print(f"wrote {args.json}")
    finally:
        if cleanup is not None:
            cleanup.cleanup()
    return 0


def decision_numbers(rep: Report) -> dict:
    """The few ratios the recommendation rests on (VGG16 when it ran, else the demo model)."""
    out: dict = {}
    for r in rep.rows:
        model, c, sec = r["model"], r["contender"], r["section"]
        if r["ratio"] is None or r["contender"] == r["reference"]:
            continue
        if c.startswith("onnx-ir") and sec.startswith("a."):
            out[f"{model} insert {sec[sec.index('['):]}: onnx-ir / own (no hash) time"] = r["ratio"]
        elif c.startswith("onnx-ir: InferenceSession"):
            out[f"{model} session: onnx-ir serialised / make_session time"] = r["ratio"]
        elif c.startswith("onnx-ir: make_session"):
            out[f"{model} session: onnx-ir to_proto + make_session / make_session time"] = r["ratio"]
        elif c.startswith(("onnx-ir", "gs")) and sec.startswith("c. peak"):
            out[f"{model} peak RSS / own: {c}"] = r["ratio"]
        elif c.startswith(("onnx-ir", "gs")) and sec.startswith("d."):
            out[f"{model} in-memory round trip {c.split(':')[0]} / one CopyFrom"] = r["ratio"]
    for key, value in rep.checks.items():
        if key.endswith("roundtrip_facts"):
            for who in ("gs", "ir"):
                if who in value:
                    out[f"{key.split('/')[0]} {who} round trip keeps metadata_props"] = value[who]["keeps_metadata_props"]
        elif key.endswith("gs_export_copy"):
            out["vgg16 gs export: RSS growth / weight bytes"] = value["growth_over_weights"]
            out["vgg16 gs export copies every initializer"] = value["copies_every_initializer"]
        elif "rel_err_ir_vs_own" in value:
            out[f"{key} max rel diff onnx-ir vs own output"] = value["rel_err_ir_vs_own"]
            out[f"{key} identical graphs (nodes, initializers, metadata)"] = bool(
                value["same_node_list_in_order"] and value["same_initializer_names_and_values"]
                and value["same_metadata_props"])
    return out


def src_weight_mb(path: Path) -> float:
    import onnx

    from onnxbn.io.tensors import weight_bytes

    return weight_bytes(onnx.load(str(path), load_external_data=False)) / 2**20


if __name__ == "__main__":
    sys.exit(main())
