"""GraphIndex edits keep the index exact: after any sequence of them its lookups equal those of a fresh
index of the graph as it then is, so no transform rebuilds it (`refresh`).

The reference is always `GraphIndex(model)` built anew from the edited proto; transforms are checked
after every single edit they make, byte for byte against the old snapshot behaviour (a refresh after
each edit), and by onnxruntime outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracles import ort_outputs, rel_error

import onnxbn
from models import dynamo_bias_model, small_cnn
from onnxbn.export import _materialize_shared_initializers
from onnxbn.graph import GraphIndex

EDITS = ("add_node", "remove_node", "set_input", "set_output", "replace_uses", "add_initializer", "set_initializer",
         "remove_initializer", "prune", "reorder", "keep_outputs")


def lookups(index: GraphIndex) -> dict:
    """The index's maps, with nodes and initializers as their positions in the graph (found by identity,
    so the index must hold the graph's own objects); consumers as sets (an edited node moves to the end)."""
    node_at = {id(n): i for i, n in enumerate(index.graph.node)}
    init_at = {id(t): i for i, t in enumerate(index.graph.initializer)}
    return {"producers": {name: node_at[id(n)] for name, n in index.producers.items()},
            "consumers": {name: sorted(node_at[id(n)] for n in users) for name, users in index.consumers.items()},
            "read_count": dict(index.read_count),
            "initializers": {name: init_at[id(t)] for name, t in index.initializers.items()},
            "inputs": set(index.inputs), "outputs": set(index.outputs), "overridable": set(index.overridable)}


def assert_exact(index: GraphIndex) -> None:
    fresh = GraphIndex(index.model)
    assert lookups(index) == lookups(fresh)
    assert fresh.taken <= index.taken  # taken only grows: a name once used is never handed out again


def edit_model(ir_version: int) -> onnx.ModelProto:
    """Relu, a Constant -> ConstantOfShape chain, an If whose branches read `w` (an initializer read only
    inside subgraphs), an initializer `d` that is also a graph input, a Split writing two tensors, two outputs."""
    then = helper.make_graph([helper.make_node("Add", ["r", "w"], ["t"], name="then_add")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Mul", ["r", "w"], ["e"], name="else_mul")], "else", [],
                              [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Constant", [], ["shape"], name="shape", value=numpy_helper.from_array(np.array([2, 3]))),
             helper.make_node("ConstantOfShape", ["shape"], ["fill"], name="fill"),
             helper.make_node("Constant", [], ["cond"], name="cond", value=numpy_helper.from_array(np.array(True))),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other),
             helper.make_node("Add", ["y", "fill"], ["z"], name="add"),
             helper.make_node("Mul", ["z", "d"], ["out"], name="mul"),
             helper.make_node("Split", ["fill"], ["half0", "half1"], name="split", axis=0)]
    inits = [numpy_helper.from_array(np.full((2, 3), 2.0, np.float32), "w"),
             numpy_helper.from_array(np.ones(3, np.float32), "d"),
             numpy_helper.from_array(np.zeros(3, np.float32), "unused")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
              helper.make_tensor_value_info("d", TensorProto.FLOAT, [3])]
    if ir_version < 4:
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("w", "unused")]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3]),
                                                   helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=ir_version)


def random_edit(index: GraphIndex, rng: np.random.Generator) -> None:
    """One edit picked at random; names written are always fresh, so every name keeps one writer."""
    graph, edit = index.graph, EDITS[rng.integers(len(EDITS))]
    nodes = list(graph.node)
    names = sorted(set(index.read_count) | set(index.producers) | set(index.initializers) | {"x"})
    pick = lambda seq: seq[rng.integers(len(seq))]  # noqa: E731
    if edit == "add_node" or not nodes:
        op = pick(["Relu", "Identity", "Add"])
        index.add_node(helper.make_node(op, [pick(names)] * (2 if op == "Add" else 1), [index.unique_name("n")],
                                        name=index.unique_name("node")))
    elif edit == "remove_node":
        index.remove_node(pick(nodes))
    elif edit == "set_input":
        node = pick(nodes)
        index.set_input(node, int(rng.integers(len(node.input) + 2)), pick(names + [""]))
    elif edit == "set_output":
        node = pick([n for n in nodes if n.output] or nodes)
        if node.output:
            index.set_output(node, int(rng.integers(len(node.output))), index.unique_name("o"))
    elif edit == "keep_outputs":
        node = pick([n for n in nodes if len(n.output) > 1] or nodes)
        if node.output:
            index.keep_outputs(node, int(rng.integers(1, len(node.output) + 1)))
    elif edit == "replace_uses":
        index.replace_uses(pick(sorted(index.read_count)), pick(names + [index.unique_name("fresh")]))
    elif edit == "add_initializer":
        index.add_initializer(rng.standard_normal(3).astype(np.float32), pick(["p", "w", "d"]))
    elif edit == "set_initializer":
        index.set_initializer(pick(names), numpy_helper.from_array(np.arange(3, dtype=np.float32)))
    elif edit == "remove_initializer" and index.initializers:
        index.remove_initializer(pick(sorted(index.initializers)))
    elif edit == "prune":
        index.prune([pick(names) for _ in range(3)])
    elif edit == "reorder":
        index.reorder([nodes[i] for i in rng.permutation(len(nodes))])


@pytest.mark.parametrize("ir_version", [3, 8])
@pytest.mark.parametrize("seed", range(6))
def test_random_edit_sequences_keep_the_index_exact(seed, ir_version):
    rng = np.random.default_rng(seed)
    index = GraphIndex(edit_model(ir_version))
    assert_exact(index)
    for _ in range(80):
        random_edit(index, rng)
        assert_exact(index)


def test_edits_reach_into_subgraphs_and_sort_keeps_the_index():
    model = edit_model(8)
    index = GraphIndex(model)
    index.replace_uses("w", "d")  # read only inside the If branches
    then, other = (a.g for a in model.graph.node[4].attribute)
    assert list(then.node[0].input) == ["r", "d"] and list(other.node[0].input) == ["r", "d"]
    assert "w" not in index.read_count and index.read_count["d"] == 3
    assert {n.name for n in index.consumers["d"]} == {"branch", "mul"}
    index.prune(["w"])
    assert "w" not in {t.name for t in model.graph.initializer}
    nodes = list(model.graph.node)
    index.reorder(nodes[::-1])
    index.sort()
    at = {n.name: i for i, n in enumerate(model.graph.node)}
    assert at["relu"] < at["branch"] < at["add"] < at["mul"] and at["cond"] < at["branch"]  # r is read in a branch
    assert at["shape"] < at["fill"] < at["add"]
    assert_exact(index)


# ----------------------------------------------------------------------------- transforms, edit by edit

def checked(monkeypatch, refresh: bool) -> None:
    """Every GraphIndex edit is followed by `assert_exact`, then (`refresh`) by the old snapshot rebuild."""
    for name in EDITS + ("sort",):
        original = getattr(GraphIndex, name)

        def edit(self, *args, _original=original, **kwargs):
            result = _original(self, *args, **kwargs)
            assert_exact(self)
            if refresh:
                self.refresh()
            return result

        monkeypatch.setattr(GraphIndex, name, edit)


X = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("after", ["linear", "relu"])
def test_insert_and_fold_are_exact_edit_by_edit_and_unchanged(monkeypatch, after):
    """BNs after every linear layer fold backward; BNs after every Relu fold forward (into the Gemm after
    Flatten) or stay (before a padded Conv). Each edit leaves the index exact, the outputs are byte-identical
    to those made with a refresh after every edit, and onnxruntime gives the original model's outputs."""
    model = small_cnn()
    stats = onnxbn.collect_stats(model, X, after=after, device="cpu", workers=0)
    with_bn = onnxbn.insert_bn(model, stats)
    folded = onnxbn.fold_bn(with_bn)
    with monkeypatch.context() as patch:
        checked(patch, refresh=False)
        assert onnxbn.insert_bn(model, stats).SerializeToString() == with_bn.SerializeToString()
        assert onnxbn.fold_bn(with_bn).SerializeToString() == folded.SerializeToString()
    with monkeypatch.context() as patch:
        checked(patch, refresh=True)
        assert onnxbn.insert_bn(model, stats).SerializeToString() == with_bn.SerializeToString()
        assert onnxbn.fold_bn(with_bn).SerializeToString() == folded.SerializeToString()
    expected = ort_outputs(model, X)[0]
    assert sum(n.op_type == "BatchNormalization" for n in with_bn.graph.node) == len(stats.tensors)
    assert rel_error(expected, ort_outputs(with_bn, X)[0]) <= 1e-5
    assert rel_error(expected, ort_outputs(folded, X)[0]) <= 1e-5


def test_fold_of_a_computed_bias_and_shared_initializers_are_exact_edit_by_edit(monkeypatch):
    model = dynamo_bias_model()
    folded = onnxbn.fold_bn(model)
    shared = onnx.ModelProto()
    shared.CopyFrom(small_cnn())
    shared.graph.node.insert(0, helper.make_node("Identity", ["c1.b"], ["c1.b2"]))
    shared.graph.node[1].input[2] = "c1.b2"  # conv1 reads its bias through an Identity, as TorchScript writes it
    materialized = _materialize_shared_initializers(shared)
    with monkeypatch.context() as patch:
        checked(patch, refresh=True)
        assert onnxbn.fold_bn(model).SerializeToString() == folded.SerializeToString()
        assert _materialize_shared_initializers(shared).SerializeToString() == materialized.SerializeToString()
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]
    assert rel_error(ort_outputs(model, X)[0], ort_outputs(folded, X)[0]) <= 1e-6
    assert "c1.b2" in {t.name for t in materialized.graph.initializer} and "c1.b" not in \
        {t.name for t in materialized.graph.initializer}
    assert rel_error(ort_outputs(shared, X)[0], ort_outputs(materialized, X)[0]) == 0
    assert not any(n.op_type == "Identity" for n in materialized.graph.node)
