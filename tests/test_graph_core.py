"""The one graph core (onnxbn.graph.GraphIndex) and the correctness gaps it closed.

Expected values are read off the hand-built graphs or computed with numpy/onnxruntime,
never with the code under test."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxbn
from onnxbn.errors import UserError
from onnxbn.graph import GraphIndex, unique_name

ROOT = Path(__file__).resolve().parents[1]


def if_model(ir_version: int = 8) -> onnx.ModelProto:
    """x -> Relu -> r; If(cond) { then: Add(r, w) ; else: Mul(r, w) } -> y; w is read only inside the branches."""
    then = helper.make_graph([helper.make_node("Add", ["r", "w"], ["t"], name="then_add")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Mul", ["r", "w"], ["e"], name="else_mul")], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Constant", [], ["cond"], name="cond", value=numpy_helper.from_array(np.array(True))),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(np.full((2, 3), 2.0, np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=ir_version)


def test_index_counts_reads_inside_subgraphs():
    index = GraphIndex(if_model())
    assert index.producers["r"].name == "relu" and index.producers["y"].name == "branch"
    assert [n.name for n in index.consumers["w"]] == ["branch"]  # read in both branches, one consumer
    assert index.read_count["w"] == 2 and index.read_count["r"] == 2 and index.read_count["y"] == 1  # output
    assert {"then_add", "else_mul", "t", "e", "then", "else"} <= index.taken
    assert index.unique_name("t") == "t_1" and index.unique_name("then_add") == "then_add_1"


def test_replace_uses_reaches_subgraphs_and_prune_keeps_what_they_read():
    model = if_model()
    index = GraphIndex(model)
    index.add_initializer(np.full((2, 3), 3.0, np.float32), "w")  # named w_1
    index.replace_uses("w", "w_1")
    index.prune(["w", "w_1"])
    assert [t.name for t in model.graph.initializer] == ["w_1"]
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.array([[-1, 0, 2], [3, -4, 5]], np.float32)})[0]
    np.testing.assert_array_equal(out, np.maximum([[-1, 0, 2], [3, -4, 5]], 0) + 3.0)


def test_add_initializer_lists_ir3_initializers_as_inputs():
    for ir, listed in ((3, True), (8, False)):
        model = if_model(ir)
        name = GraphIndex(model).add_initializer(np.zeros(3, np.float32), "extra")
        assert (name in {i.name for i in model.graph.input}) is listed


def test_constants_from_constant_and_constant_of_shape_nodes():
    nodes = [helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([2, 2], np.int64))),
             helper.make_node("ConstantOfShape", ["shape"], ["fill"], value=numpy_helper.from_array(np.array([1.5], np.float32))),
             helper.make_node("Constant", [], ["f"], value_floats=[1.0, 2.0]),
             helper.make_node("Add", ["x", "fill"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2]),
                                           helper.make_tensor_value_info("d", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
                              [numpy_helper.from_array(np.ones(2, np.float32), "d")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    index = GraphIndex(model)
    np.testing.assert_array_equal(index.constant_array("fill"), np.full((2, 2), 1.5, np.float32))
    np.testing.assert_array_equal(index.constant_array("f"), [1.0, 2.0])
    assert index.constant("d") is None  # an initializer that is also an input (IR >= 4) can be overridden
    assert index.constant("x") is None
    index.prune(["fill"])  # still read by Add: stays
    assert len(model.graph.node) == 4
    index.set_input(model.graph.node[3], 1, "x")  # edits go through the index, which stays exact
    index.prune(["fill"])  # ConstantOfShape and the Constant feeding it go, transitively
    assert [n.output[0] for n in model.graph.node] == ["f", "y"]


def test_sort_and_ancestors():
    model = onnxbn_small()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    index = GraphIndex(model)
    index.sort()
    assert [n.name for n in model.graph.node] == [n.name for n in nodes]
    assert [n.name for n in GraphIndex(model).ancestors(["r2"])] == ["conv1", "relu1", "pool1", "conv2", "relu2"]


def onnxbn_small():
    from conftest import small_cnn

    return small_cnn()


def test_unique_name():
    taken = {"a", "a_1"}
    assert unique_name("a", taken) == "a_2" and "a_2" in taken
    assert unique_name("b", taken) == "b"


def test_only_graph_py_builds_producer_maps_or_unique_names():
    """One graph core: no other module builds a tensor-name -> node map or invents unique names."""
    patterns = [re.compile(p) for p in (
        r"for \w+ in (\w+\.)*(graph\.)?node for \w+ in \w+\.output",   # {out: node for node in ... for out in node.output}
        r"for \w+ in \w+\.output if \w+\}",
        r"def \w*unique\w*\(",
        r"while \w+ in taken",
        r"def (producers|consumers)\(",
    )]
    offenders = []
    for path in sorted((ROOT / "onnxbn").rglob("*.py")):
        if path.name == "graph.py" and path.parent.name == "onnxbn":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(p.search(line) for p in patterns):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


# ----------------------------------------------------------------------------- correctness gaps

def conv_model(dtype=np.float32, scale=1.0, ir_version=8, opset=13) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w = (rng.standard_normal((4, 3, 3, 3)) * scale).astype(dtype)
    b = (rng.standard_normal(4) * scale).astype(dtype)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["y"], name="gap")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", elem, ["N", 4, 1, 1])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def test_float16_insert_with_sigma_over_256_stays_finite_and_exact():
    """var = sigma^2 > 65504 does not fit float16: the BN runs in float32 between Casts."""
    model = conv_model(np.float16, scale=60.0)
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float16)
    stats = onnxbn.collect_stats(model, x, after=["c", "r"], device="cpu", workers=0)
    assert np.sqrt(stats.var("c")).max() > 256  # the case the fix is for
    with_bn = onnxbn.insert_bn(model, stats)
    params = [numpy_helper.to_array(t) for t in with_bn.graph.initializer if "/onnxbn_bn." in t.name]
    assert all(np.isfinite(p).all() for p in params)
    casts = [n for n in with_bn.graph.node if n.op_type == "Cast"]
    assert len(casts) >= 2
    sess = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])  # noqa: E731
    a = sess(model).run(None, {"x": x})[0].astype(np.float64)
    b = sess(with_bn).run(None, {"x": x})[0].astype(np.float64)
    assert np.abs(a - b).max() <= 2.0**-10 * np.abs(a).max()  # float16 rounding of the output


def test_float64_model_gets_float64_statistics():
    """Large values with a small spread: float32 row sums would be off by ~1e-7 relative; float64 is ~1e-16."""
    w = numpy_helper.from_array(np.random.default_rng(4).uniform(0.5, 2, (1, 4, 1, 1)), "w")
    nodes = [helper.make_node("Mul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "w"], ["c"]),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", 4, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    x = np.random.default_rng(1).standard_normal((6, 4, 8, 8)) + 1e4
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("c", TensorProto.DOUBLE, None))
    c = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(["c"], {"x": x})[0]
    stats = onnxbn.collect_stats(model, x, after=["c"], device="cpu", workers=0)
    np.testing.assert_allclose(stats.mean("c"), c.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(stats.var("c"), c.var(axis=(0, 2, 3)), rtol=1e-11)


def test_rank3_matmul_output_is_not_a_bn_point():
    w = numpy_helper.from_array(np.ones((4, 5), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["t"], name="proj"), helper.make_node("Relu", ["t"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 7, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7, 3])],
                              [w, numpy_helper.from_array(np.ones((5, 3), np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    with pytest.raises(UserError, match=r"rank-3 MatMul output: its features are on the last axis"):
        onnxbn.select_points(model, ["t"])
    with pytest.raises(UserError, match="matches no tensor"):
        onnxbn.select_points(model, "linear")
    assert [p.tensor for p in onnxbn.select_points(model, "relu")] == ["r"]  # a Relu output: the user's choice


def test_bfloat16_bn_folds_like_float32():
    """bfloat16 is a float type everywhere: fold merges a bf16 BN into its Conv, exactly as numpy computes it."""
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(2)
    w, b = rng.standard_normal((4, 3, 1, 1)).astype(bf16), rng.standard_normal(4).astype(bf16)
    scale, shift, mean = (rng.standard_normal(4).astype(bf16) for _ in range(3))
    var = rng.uniform(0.5, 2, 4).astype(bf16)
    inits = {"w": w, "b": b, "s": scale, "t": shift, "m": mean, "v": var}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "t", "m", "v"], ["y"], name="bn", epsilon=1e-5)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["N", 4, 4, 4])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    assert [p.dtype for p in onnxbn.select_points(model, ["c"])] == ["bfloat16"]
    decisions = onnxbn.explain_fold(model)
    assert decisions[0]["action"] == "folded" and decisions[0]["into"] == "conv"
    folded = onnxbn.fold_bn(model)
    got = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in folded.graph.initializer}
    f = {k: v.astype(np.float64) for k, v in inits.items()}
    s = f["s"] / np.sqrt(f["v"] + 1e-5)
    np.testing.assert_array_equal(got["w"], (f["w"] * s[:, None, None, None]).astype(bf16).astype(np.float64))
    np.testing.assert_array_equal(got["b"], ((f["b"] - f["m"]) * s + f["t"]).astype(bf16).astype(np.float64))


def test_make_session_leaves_onnxruntimes_logger_alone(capfd):
    """make_session sets only its own session's log level, not onnxruntime's process-wide one."""
    from onnxbn.runtimes.ort_backend import make_session

    model = conv_model()
    ir3 = conv_model(ir_version=3, opset=9)
    ir3.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in ir3.graph.initializer)
    ort.set_default_logger_severity(0)  # the caller wants verbose logs
    try:
        make_session(ir3, "cpu")
        capfd.readouterr()
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        verbose = capfd.readouterr().err
    finally:
        ort.set_default_logger_severity(2)
    assert verbose.strip() != ""  # still verbose after onnxbn made its session


def test_finetune_merges_a_last_batch_of_one():
    from onnxbn.training.loop import batch_bounds as _batch_bounds

    assert _batch_bounds(17, 16) == [0, 17]
    assert _batch_bounds(24, 16) == [0, 16, 24]
    assert _batch_bounds(39, 16) == [0, 16, 39]
    assert _batch_bounds(40, 16) == [0, 16, 32, 40]
    assert _batch_bounds(32, 16) == [0, 16, 32]
    with pytest.raises(UserError, match="at least 2 training samples"):
        _batch_bounds(1, 16)
    from conftest import small_cnn

    model = small_cnn()
    x = np.random.default_rng(0).standard_normal((17, 3, 8, 8)).astype(np.float32)
    stats = onnxbn.collect_stats(model, x, after="dense", device="cpu", workers=0)
    result = onnxbn.finetune(onnxbn.insert_bn(model, stats), (x, np.arange(17) % 10), epochs=1, batch_size=16,
                             device="cpu", lr=1e-3)  # a batch of 1 would raise in BatchNorm1d
    assert len(result.log["history"]) == 1


# ----------------------------------------------------------------------------- weights stay in the file

def big_gemm_model(path):
    """A model whose one big weight (32 MiB) dominates: Python holding it would show in tracemalloc."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4096, 2048)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w", "b"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 16, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(4096, np.float32), "b"),
                               numpy_helper.from_array(rng.standard_normal((10, 4096)).astype(np.float32), "w2"),
                               numpy_helper.from_array(np.zeros(10, np.float32), "b2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.save(model, str(path))
    return model


def test_structure_points_into_the_file_and_hashes_the_same(tmp_path):
    from onnxbn.io.copies import model_sha256
    from onnxbn.io.load import load_model, load_structure

    model = big_gemm_model(tmp_path / "m.onnx")
    structure, _ = load_structure(tmp_path / "m.onnx")
    raw = (tmp_path / "m.onnx").read_bytes()
    w = next(t for t in structure.graph.initializer if t.name == "w")
    entries = {e.key: e.value for e in w.external_data}
    assert w.data_location == TensorProto.EXTERNAL and entries["location"] == "m.onnx"
    offset, length = int(entries["offset"]), int(entries["length"])
    np.testing.assert_array_equal(np.frombuffer(raw[offset:offset + length], np.float32).reshape(4096, 2048),
                                  numpy_helper.to_array(model.graph.initializer[0]))
    assert next(t for t in structure.graph.initializer if t.name == "b2").raw_data  # small ones stay inline
    assert model_sha256(structure, folder=tmp_path) == model_sha256(load_model(tmp_path / "m.onnx"))


@pytest.mark.parametrize("step", ["stats", "check", "eval"])
def test_stats_check_and_eval_never_hold_a_model_files_weights_in_python(tmp_path, step):
    """onnxruntime reads the weights from the file; Python's own allocations stay far below their 32 MiB."""
    import tracemalloc

    big_gemm_model(tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((8, 4, 16, 32)).astype(np.float32)
    path = str(tmp_path / "m.onnx")
    tracemalloc.start()
    if step == "stats":
        stats = onnxbn.collect_stats(path, x, after="dense", device="cpu", workers=0)
    elif step == "check":
        assert onnxbn.compare(path, path, data=x).passed
    else:
        onnxbn.evaluate(path, (x, np.arange(8) % 10))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * 2**20, peak
    if step == "stats":  # and the statistics are right: numpy on the exposed tensor
        m = onnx.load(path)
        m.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
        r = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["r"], {"x": x})[0]
        np.testing.assert_allclose(stats.var("r"), r.astype(np.float64).var(axis=0), rtol=1e-6, atol=1e-9)


def gemm_bn_model(path):
    """big_gemm_model with a BN (10 channels) on its output: folding and recalibrating it change only small
    tensors, so the 32 MiB weight can go from the input file to the output file without Python holding it."""
    model = big_gemm_model(path)
    rng = np.random.default_rng(2)
    for t in model.graph.initializer:  # unit-scale activations: float32 error stays near 1e-7
        if t.name in ("w", "w2"):
            t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) / np.sqrt(t.dims[1])).astype(np.float32), t.name))
    model.graph.node[-1].output[0] = "z"
    model.graph.node.append(helper.make_node("BatchNormalization", ["z", "s", "B", "m", "v"], ["y"], epsilon=1e-5))
    for name, value in (("s", rng.uniform(0.5, 2, 10)), ("B", rng.standard_normal(10)),
                        ("m", rng.standard_normal(10)), ("v", rng.uniform(0.5, 2, 10))):
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    onnx.save(model, str(path))
    return model


@pytest.mark.parametrize("step", ["fold", "recalibrate", "insert"])
def test_fold_recalibrate_and_insert_copy_unchanged_weights_file_to_file(tmp_path, step, capsys):
    """The CLI writes the result while Python never holds the unchanged 32 MiB weight, and the result is
    right: the big weight byte for byte, the changed or new tensors against numpy."""
    import tracemalloc

    from onnxbn.cli import main

    model = gemm_bn_model(tmp_path / "m.onnx")
    x = np.random.default_rng(3).standard_normal((8, 4, 16, 32)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    argv = {"fold": ["fold", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "x.npz")],
            "recalibrate": ["recalibrate", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "x.npz"), "--workers", "0",
                            "--prior", "0"],
            "insert": ["insert", str(tmp_path / "m.onnx"), "--stats", str(tmp_path / "s.npz")]}[step]
    if step == "insert":
        assert main(["stats", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "x.npz"), "--after", "relu",
                     "--workers", "0", "-o", str(tmp_path / "s.npz")]) == 0
    tracemalloc.start()
    code = main(argv + ["-o", str(tmp_path / "out.onnx")])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    capsys.readouterr()
    assert code == 0 and peak < 8 * 2**20, peak
    out = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "out.onnx")).graph.initializer}
    given = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(out["w"], given["w"])
    s, B, m, v = (given[k].astype(np.float64) for k in "sBmv")
    if step == "insert":  # an identity BN after r = relu(w x + b): scale = sqrt(var + eps), B = mean = mean of r
        with np.load(tmp_path / "s.npz") as saved:
            assert list(saved["tensors"]) == ["r"]
            mean, var = saved["mean_0"], saved["var_0"]
        bn = {t.name[len("r/onnxbn_bn."):]: numpy_helper.to_array(t)
              for t in onnx.load(str(tmp_path / "out.onnx")).graph.initializer if t.name.startswith("r/onnxbn_bn.")}
        r = np.maximum(x.reshape(8, -1).astype(np.float64) @ given["w"].T.astype(np.float64) + given["b"], 0)
        np.testing.assert_allclose(mean, r.mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, r.var(axis=0), rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(bn["scale"], np.sqrt(var + 1e-5), rtol=1e-6)
        np.testing.assert_array_equal(bn["B"], mean.astype(np.float32))
        np.testing.assert_array_equal(bn["mean"], mean.astype(np.float32))
    elif step == "fold":  # y = s * (w2 r + b2 - m) / sqrt(v + eps) + B
        scale = s / np.sqrt(v + 1e-5)
        np.testing.assert_allclose(out["w2"], given["w2"] * scale[:, None], rtol=1e-6)
        np.testing.assert_allclose(out["b2"], (given["b2"] - m) * scale + B, rtol=1e-6, atol=1e-6)
    else:  # mean/var of z = w2 relu(w x + b) + b2 over the 8 samples
        z = np.maximum(x.reshape(8, -1).astype(np.float64) @ given["w"].T.astype(np.float64) + given["b"], 0) \
            @ given["w2"].T.astype(np.float64) + given["b2"]
        np.testing.assert_allclose(out["m"], z.mean(axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["v"], z.var(axis=0), rtol=1e-4)


@pytest.mark.parametrize("external", [False, True])
def test_save_model_streams_a_structure_model_into_an_equal_file(tmp_path, monkeypatch, external):
    """save_model(load_structure(path), folder=...) writes the same model as onnx.load + onnx.save would,
    inline or (past the protobuf limit, here made tiny) with a data file, new IN_MEMORY values included."""
    import onnxbn.io.save
    from onnxbn.io.load import load_structure
    from onnxbn.io.save import save_model
    from onnxbn.io.tensors import memory_stub

    model = gemm_bn_model(tmp_path / "m.onnx")
    if external:
        monkeypatch.setattr(onnxbn.io.save, "PROTOBUF_LIMIT", 1000)
    structure, _ = load_structure(tmp_path / "m.onnx")
    new_w2 = np.arange(10 * 4096, dtype=np.float32).reshape(10, 4096)
    w2 = next(t for t in structure.graph.initializer if t.name == "w2")
    w2.CopyFrom(memory_stub("w2", TensorProto.FLOAT, new_w2.shape))
    save_model(structure, tmp_path / "out.onnx", weights={"w2": new_w2}, folder=tmp_path)
    assert (tmp_path / "out.onnx.data").is_file() == external
    written = onnx.load(str(tmp_path / "out.onnx"))
    expected = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer} | {"w2": new_w2}
    got = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert list(got) == [t.name for t in model.graph.initializer]
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    del written.graph.initializer[:], model.graph.initializer[:]
    assert written == model
