"""recalibrate: BN statistics re-estimated on new data, checked against independent computations.

Expected values come from numpy on tensors exposed through a plain onnxruntime session
(every BN input added as a graph output of a copy), or from torch's own
`torch.optim.swa_utils.update_bn` on the original torch module; never from onnxbn.
"""

from __future__ import annotations

import copy
import io
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import oracles
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from oracles import feed_name as feed
from oracles import moments, session
from oracles import rel_error as rel
from torch import nn

import onnxbn
from models import Net, small_cnn
from onnxbn.cli import main
from onnxbn.errors import UserError
from onnxbn.io.save import save_model
from onnxbn.recalibration import recalibrate_with_report

EPS = 1e-5


# ----------------------------------------------------------------------------- models

class Block(nn.Module):
    """A ResNet basic block: BN after every Conv, a Conv+BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layers = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2), Block(16, 16, 1))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class TinyVGG(nn.Module):
    """VGG-BN in miniature: conv-BN-ReLU blocks, max pooling, a dense layer with BatchNorm1d."""

    def __init__(self):
        super().__init__()
        layers, cin = [], 3
        for item in (8, 8, "M", 16, 16, "M"):
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
                cin = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(16 * 4 * 4, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 5))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def predict(model, x) -> np.ndarray:
    """The model's first output on x (plain onnxruntime)."""
    return np.asarray(session(model).run(None, {feed(model): x})[0])


def seeded(build, seed: int = 0) -> nn.Module:
    """`build()` under torch's seed `seed`: its initial weights do not depend on the tests run before."""
    torch.manual_seed(seed)
    return build()


def stale_bn(module: nn.Module, seed: int = 1) -> nn.Module:
    """Seeded weights and BN statistics far from any data's (so recalibration has work to do)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.running_mean is not None and m.running_var is not None
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return module.eval()


def export(module: nn.Module, size: int = 16, opset: int = 17, training: bool = False) -> onnx.ModelProto:
    module.train(training)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, 3, size, size),), f,  # pyright: ignore[reportArgumentType]
                          dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=opset)
    module.eval()
    return onnx.load_from_string(f.getvalue())


@pytest.fixture(scope="module")
def resnet():
    module = stale_bn(seeded(TinyResNet))
    return module, export(module)


@pytest.fixture(scope="module")
def vgg():
    module = stale_bn(seeded(TinyVGG))
    return module, export(module)


def data(n: int = 40, size: int = 16, seed: int = 0, shift: float = 0.5, gain: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, 3, size, size)) * gain + shift).astype(np.float32)


def bn_net(opset: int = 13, dtype: type[np.floating] = np.float32, batch: str | int = "N", ir_version=None,
           inits_as_inputs=False, seed=0, shared=False, constants=False) -> onnx.ModelProto:
    """conv-BN-relu-pool-conv-BN-relu-flatten-gemm-BN(N, C)-relu-gemm, built with onnx.helper."""
    n = Net(seed, dtype)
    y = n.bn(n.conv("input", 3, 6, "conv1"), 6, "bn1")
    y = n.node("MaxPool", [n.node("Relu", [y], "relu1")], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    y = n.conv(y, 6, 6, "conv2")
    if shared:  # bn2 reads bn1's mean and var
        y = n.node("BatchNormalization", [y, n.weight("bn2.scale", (6,), 0.1), n.weight("bn2.B", (6,), 0.1),
                                          "bn1.mean", "bn1.var"], "bn2.out", name="bn2")
    elif constants:  # mean and var from Constant nodes
        r = n.rng
        y = n.node("BatchNormalization", [y, n.weight("bn2.scale", (6,), 0.1), n.weight("bn2.B", (6,), 0.1),
                                          n.const("bn2.mean", r.normal(0, 1, 6)), n.const("bn2.var", r.uniform(1, 2, 6))],
                   "bn2.out", name="bn2")
    else:
        y = n.bn(y, 6, "bn2")
    y = n.node("Flatten", [n.node("Relu", [y], "relu2")], "flat")
    y = n.node("Relu", [n.bn(n.gemm(y, 6 * 16, 12, "fc1"), 12, "bn3")], "relu3")
    n.gemm(y, 12, 4, "fc2", out="logits")
    return n.model({"input": [batch, 3, 8, 8]}, {"logits": [batch, 4]}, opset, ir_version=ir_version,
                   inits_as_inputs=inits_as_inputs)


# ----------------------------------------------------------------------------- independent checks

def bn_nodes(model):
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def stored(model, name) -> np.ndarray:
    """The value of a constant tensor: an initializer, a Constant, or an Identity of either."""
    for n in model.graph.node:
        if n.op_type == "Identity" and n.output[0] == name:
            return stored(model, n.input[0])
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t).astype(np.float64)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t).astype(np.float64)
    raise KeyError(name)


def exposed(model, x, names, level=None) -> list[np.ndarray]:
    """oracles.exposed with this file's argument order."""
    return oracles.exposed(model, names, x, level=level)


def fixed_point_errors(model, x, level=None, reference=None) -> dict[str, float]:
    """Per BN: max relative difference between its stored mean/var and numpy's statistics of its input
    (with `reference`: between the statistics of its input under the optimisation `level` and under
    onnxruntime's default, i.e. the noise floor of float32 execution)."""
    bns = bn_nodes(model)
    names = [n.input[0] for n in bns]
    other = exposed(reference, x, names) if reference is not None else None
    errors = {}
    for i, (node, value) in enumerate(zip(bns, exposed(model, x, names, level), strict=True)):
        mean, var = moments(value)
        ref_mean, ref_var = moments(other[i]) if other is not None else (stored(model, node.input[3]),
                                                                          stored(model, node.input[4]))
        errors[node.name] = max(rel(mean, ref_mean), rel(var, ref_var))
    return errors


# ----------------------------------------------------------------------------- exact: the fixed point

@pytest.mark.parametrize("cache_mb", [1024.0, 0.0])
@pytest.mark.parametrize("which", ["resnet", "vgg", "vgg_default_affine"])
def test_exact_is_a_fixed_point_at_every_depth(request, which, cache_mb):
    _, model = request.getfixturevalue(which)
    x = data()
    before = fixed_point_errors(model, x)
    assert max(before.values()) > 0.1  # stale statistics to begin with
    out, report = recalibrate_with_report(model, x, batch_size=8, cache_mb=cache_mb, prior=0, var_floor=0)
    errors = fixed_point_errors(out, x)
    assert len(errors) == len(bn_nodes(model)) and max(errors.values()) <= 1e-6, errors
    # one pass per level: the longest chain of BNs (ResNet: stem + 2 per block; VGG: 5 in a row)
    assert len(report.passes) == {"resnet": 7, "vgg": 5, "vgg_default_affine": 5}[which]
    assert {b.node: b.level for b in report.bns} == {n.name: i for n, i in zip(bn_nodes(model), levels(which), strict=True)}
    sources = {p["source"] for p in report.passes[1:]}
    assert sources == ({"kept activations"} if cache_mb else {"data"})


def levels(which):
    # ResNet: stem, b1, b2 per block, the downsample BN of block 2 at its block's first level
    return {"resnet": [0, 1, 2, 3, 4, 3, 5, 6], "vgg": [0, 1, 2, 3, 4], "vgg_default_affine": [0, 1, 2, 3, 4]}[which]


def test_cache_runs_each_node_once_and_gives_the_same_statistics(resnet):
    _, model = resnet
    x = data(n=24)
    _, r1 = recalibrate_with_report(model, x, batch_size=8, prior=0)
    _, r0 = recalibrate_with_report(model, x, batch_size=8, cache_mb=0, prior=0)
    for a, b in zip(r1.bns, r0.bns, strict=True):
        assert rel(b.new_mean, a.new_mean) < 1e-6 and rel(b.new_var, a.new_var) < 1e-6
    total = sum(p["nodes"] for p in r1.passes)
    assert total <= len(model.graph.node) < sum(p["nodes"] for p in r0.passes)
    # a budget too small for any cut: every pass reads the data again, same statistics
    _, small = recalibrate_with_report(model, x, batch_size=8, cache_mb=1e-3, prior=0)
    assert {p["source"] for p in small.passes} == {"data"}
    assert all(rel(b.new_var, a.new_var) < 1e-6 for a, b in zip(r1.bns, small.bns, strict=True))


class ShapeFromInput(nn.Module):
    """The dense part reshapes with a shape computed from the model's input (Shape-Gather-Concat-Reshape):
    the kept activations then hold a small int64 tensor without a batch axis."""

    def __init__(self):
        super().__init__()
        self.features = TinyVGG().features
        self.fc = nn.Linear(16 * 4 * 4, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.fc(self.features(x).reshape(x.shape[0], -1)))


def test_kept_activations_without_a_batch_axis():
    model = export(stale_bn(ShapeFromInput()))
    assert any(n.op_type == "Shape" for n in model.graph.node)
    x = data(n=20)
    out, report = recalibrate_with_report(model, x, batch_size=8, prior=0)
    assert report.samples == 20 and report.passes[-1]["source"] == "kept activations"
    assert any(t for p in report.passes for t in p["kept"] if "Concat" in t)
    assert max(fixed_point_errors(out, x).values()) <= 1e-6


def test_already_exact_statistics_are_unchanged(vgg):
    _, model = vgg
    x = data(seed=3)
    once = onnxbn.recalibrate(model, x, batch_size=8, prior=0)
    twice, report = recalibrate_with_report(once, x, batch_size=8, prior=0)
    for node in bn_nodes(once):
        for slot in (3, 4):
            a, b = stored(once, node.input[slot]), stored(twice, node.input[slot])
            assert np.abs(a - b).max() <= 1e-7 * np.abs(a).max(), (node.name, slot)
    assert max(max(b.to_dict()["mean_change"], b.to_dict()["var_change"]) for b in report.bns) <= 1e-7
    assert [(n.name, n.op_type, list(n.input), list(n.output)) for n in once.graph.node] == \
        [(n.name, n.op_type, list(n.input), list(n.output)) for n in twice.graph.node]


def test_nothing_else_changes_and_metadata_records_the_run(vgg):
    _, model = vgg
    model = copy.deepcopy(model)
    model.metadata_props.add(key="owner", value="test")
    x = data()
    out = onnxbn.recalibrate(model, x, batch_size=8, prior=0)
    assert [(n.name, n.op_type, list(n.input), list(n.output), n.attribute) for n in out.graph.node] == \
        [(n.name, n.op_type, list(n.input), list(n.output), n.attribute) for n in model.graph.node]
    assert out.opset_import == model.opset_import and out.ir_version == model.ir_version
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    stats = {n.input[s] for n in bn_nodes(model) for s in (3, 4)}
    for t in model.graph.initializer:
        new = stored(out, t.name)
        if t.name in stats:
            assert not np.array_equal(new, numpy_helper.to_array(t))
            assert next(u for u in out.graph.initializer if u.name == t.name).data_type == t.data_type
        else:
            np.testing.assert_array_equal(new, numpy_helper.to_array(t))
    meta = {p.key: p.value for p in out.metadata_props}
    assert meta["owner"] == "test"
    record = json.loads(meta["onnxbn.recalibrate"])
    assert record["mode"] == "exact" and record["nodes"] == [n.name for n in bn_nodes(model)]
    assert record["samples"] == 40 and record["data"] == "array" and record["passes"] == 5 and record["data_source"]


def test_selected_nodes_only(resnet):
    _, model = resnet
    x = data(n=16)
    names = [n.name for n in bn_nodes(model)]
    picked = [names[1], names[4]]
    out = onnxbn.recalibrate(model, x, nodes=",".join(picked), batch_size=8, prior=0, var_floor=0)
    errors = fixed_point_errors(out, x)
    for node in bn_nodes(model):
        if node.name in picked:
            assert errors[node.name] <= 1e-6
        else:
            for slot in (3, 4):
                np.testing.assert_array_equal(stored(out, node.input[slot]), stored(model, node.input[slot]))


# ----------------------------------------------------------------------------- batch: update_bn's convention

def batches_of(x, size):
    return [torch.from_numpy(x[i:i + size]) for i in range(0, len(x), size)]


@pytest.fixture(scope="module")
def vgg_default_affine():
    """BN scale 1 and B 0 everywhere: torch's exporter writes the repeated ones through Identity nodes."""
    module = seeded(TinyVGG).eval()
    model = export(module)
    assert any(n.op_type == "Identity" for n in model.graph.node)
    return module, model


@pytest.mark.parametrize("which", ["resnet", "vgg", "vgg_default_affine"])
def test_batch_equals_torch_update_bn(request, which):
    module, model = request.getfixturevalue(which)
    x = data(n=36)  # 4 batches of 8 and a last one of 4
    out, report = recalibrate_with_report(model, x, mode="batch", batch_size=8, prior=0)
    assert len(report.passes) == 1
    # on the original torch module
    reference = copy.deepcopy(module)
    torch.optim.swa_utils.update_bn(batches_of(x, 8), reference)
    torch_bns = [m for m in reference.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(torch_bns) == len(bn_nodes(out))  # in the same order: the modules run in definition order
    for m, node in zip(torch_bns, bn_nodes(out), strict=True):
        assert rel(m.running_mean, stored(out, node.input[3])) <= 1e-5, node.name
        assert rel(m.running_var, stored(out, node.input[4])) <= 1e-5, node.name
    # on the to_torch import of the same model
    imported = onnxbn.to_torch(model)
    torch.optim.swa_utils.update_bn(batches_of(x, 8), imported)
    for key, init in imported.onnx_tensors.items():
        if key.endswith(("running_mean", "running_var")):
            value = imported.get_buffer(key).double().numpy()
            assert rel(value, stored(out, init)) <= 1e-5, key


def test_batch_differs_from_exact_as_the_math_says(vgg):
    """batch averages per-batch (unbiased) variances: for the first BN (nothing upstream) its variance
    misses the spread of the batch means, and its mean is the mean of the batch means."""
    _, model = vgg
    x = data(n=32)
    x[16:] += 1.0  # two batches with different means
    out = onnxbn.recalibrate(model, x, mode="batch", batch_size=16, prior=0)
    first = bn_nodes(model)[0]
    (t,) = exposed(model, x, [first.input[0]])
    parts = [moments(t[:16]), moments(t[16:])]
    n = 16 * t.shape[2] * t.shape[3]
    np.testing.assert_allclose(stored(out, first.input[3]), (parts[0][0] + parts[1][0]) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stored(out, first.input[4]), (parts[0][1] + parts[1][1]) / 2 * n / (n - 1),
                               rtol=1e-5)


# ----------------------------------------------------------------------------- graph forms

@pytest.mark.parametrize("opset", [12, 15])
def test_training_mode_bn_becomes_inference_mode(opset):
    module = stale_bn(seeded(TinyResNet))
    model = export(module, opset=opset, training=True)
    bns = bn_nodes(model)
    assert all(len(n.output) > 1 for n in bns)
    x = data(n=16)
    out, report = recalibrate_with_report(model, x, batch_size=8, prior=0)
    for before, after in zip(bns, bn_nodes(out), strict=True):
        assert list(after.output) == [before.output[0]]
        assert all(a.name != "training_mode" for a in after.attribute)
    assert all(b.training_mode for b in report.bns)
    assert max(fixed_point_errors(out, x).values()) <= 1e-6
    # training-mode BNs are always recalibrated, even when not named
    picked = onnxbn.recalibrate(model, x, nodes=bns[0].name, batch_size=8, prior=0)
    assert all(len(n.output) == 1 for n in bn_nodes(picked))


def test_training_outputs_in_use_are_refused():
    model = export(stale_bn(seeded(TinyResNet)), opset=15, training=True)
    node = bn_nodes(model)[0]
    model.graph.output.append(helper.make_tensor_value_info(node.output[1], TensorProto.FLOAT, None))
    with pytest.raises(UserError, match="training mode.*remove that use"):
        onnxbn.recalibrate(model, data(n=8), prior=0)


def test_shared_statistics_get_fresh_initializers():
    model = bn_net(shared=True)
    x = data(n=16, size=8)
    out, report = recalibrate_with_report(model, x, batch_size=8, prior=0, var_floor=0)
    for name in ("bn1.mean", "bn1.var"):  # the shared tensors are left alone
        np.testing.assert_array_equal(stored(out, name), stored(model, name))
    bn1, bn2 = bn_nodes(out)[:2]
    assert bn1.input[3] != bn2.input[3] and "bn1.mean" not in (bn1.input[3], bn2.input[3])
    assert {b.node: b.fresh for b in report.bns}["bn1"] == ["mean", "var"]
    assert max(fixed_point_errors(out, x).values()) <= 1e-6


def test_statistics_from_constant_nodes_are_rewritten_in_place():
    model = bn_net(constants=True)
    x = data(n=16, size=8)
    out = onnxbn.recalibrate(model, x, batch_size=8, prior=0, var_floor=0)
    assert [n.name for n in out.graph.node] == [n.name for n in model.graph.node]
    assert max(fixed_point_errors(out, x).values()) <= 1e-6
    batch = onnxbn.recalibrate(model, x, mode="batch", batch_size=8, prior=0, var_floor=0)
    assert [n.name for n in batch.graph.node] == [n.name for n in model.graph.node]
    assert not np.array_equal(stored(batch, "bn2.var"), stored(model, "bn2.var"))


@pytest.mark.parametrize("opset", [9, 11, 13, 14, 15, 18, 21, 22])
def test_opsets(opset):
    model = bn_net(opset)
    x = data(n=16, size=8)
    out = onnxbn.recalibrate(model, x, batch_size=8, prior=0)
    assert out.opset_import == model.opset_import
    assert max(fixed_point_errors(out, x).values()) <= 1e-6


def test_ir3_initializers_as_inputs():
    model = bn_net(9, ir_version=3, inits_as_inputs=True)
    x = data(n=16, size=8)
    out = onnxbn.recalibrate(model, x, batch_size=8, prior=0)
    assert out.ir_version == 3
    assert max(fixed_point_errors(out, x).values()) <= 1e-6
    batch = onnxbn.recalibrate(model, x, mode="batch", batch_size=8, prior=0)
    assert batch.ir_version == 3


def test_fixed_batch():
    model = bn_net(batch=8)
    x = data(n=24, size=8)
    out = onnxbn.recalibrate(model, x, batch_size=5, prior=0)  # the model's own batch size wins
    errors = {}
    for node in bn_nodes(out):
        values = np.concatenate([exposed(out, x[i:i + 8], [node.input[0]])[0] for i in range(0, 24, 8)])
        mean, var = moments(values)
        errors[node.name] = max(rel(mean, stored(out, node.input[3])), rel(var, stored(out, node.input[4])))
    assert max(errors.values()) <= 1e-6
    with pytest.raises(UserError, match="fixed at 8"):
        onnxbn.recalibrate(model, x[:20], prior=0)


def test_float16():
    model = bn_net(dtype=np.float16)
    x = data(n=16, size=8).astype(np.float16)
    out = onnxbn.recalibrate(model, x, batch_size=8, prior=0)
    for t in out.graph.initializer:
        assert t.data_type == TensorProto.FLOAT16
    assert max(fixed_point_errors(out, x).values()) <= 2e-3  # float16 storage


def test_external_data(tmp_path, monkeypatch, cli):
    monkeypatch.setattr(onnxbn.io.save, "PROTOBUF_LIMIT", 1000)
    path = save_model(bn_net(), tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx.data").is_file()
    x = data(n=16, size=8)
    np.savez(tmp_path / "x.npz", x=x)
    code, _, err = cli("recalibrate", "--prior", "0", path, "--data", tmp_path / "x.npz", "-o", tmp_path / "out.onnx")
    assert code == 0, err
    assert (tmp_path / "out.onnx.data").is_file()
    out = onnxbn.io.load.load_model(tmp_path / "out.onnx")
    assert max(fixed_point_errors(out, x).values()) <= 1e-6


# ----------------------------------------------------------------------------- a model without BN: the recipe

def test_insert_then_recalibrate_aligns_target_features_to_the_source():
    model = small_cnn(size=8)
    rng = np.random.default_rng(0)
    source = rng.standard_normal((48, 3, 8, 8)).astype(np.float32)
    target = (0.4 * rng.standard_normal((48, 3, 8, 8)) + 1.5).astype(np.float32)  # contrast and brightness shift
    stats = onnxbn.collect_stats(model, source, after="conv", batch_size=16)
    adapted = onnxbn.recalibrate(onnxbn.insert_bn(model, stats), target, batch_size=16, prior=0, var_floor=0)
    bns = bn_nodes(adapted)
    assert [n.input[0] for n in bns] == ["r1/pre_bn", "r2/pre_bn"]
    source_t = exposed(model, source, ["r1", "r2"])          # the original model on source data
    target_t = exposed(model, target, ["r1", "r2"])
    adapted_t = exposed(adapted, target, ["r1", "r2"])       # BN outputs of the adapted model on target data
    for i, node in enumerate(bns):
        mean_s, var_s = moments(source_t[i])
        mean_a, var_a = moments(adapted_t[i])
        _, var_in = moments(exposed(adapted, target, [node.input[0]])[0])
        assert rel(mean_s, mean_a) <= 1e-5  # aligned means: exactly B = the source mean
        np.testing.assert_allclose(var_a, (var_s + EPS) * var_in / (var_in + EPS), rtol=1e-4, atol=1e-7)
        if i == 0:  # the first layer sees the raw shift; without recalibration it stays misaligned
            mean_t, _ = moments(target_t[0])
            assert rel(mean_s, mean_t) > 0.1


# ----------------------------------------------------------------------------- the command line and bad input

@pytest.fixture
def files(tmp_path, vgg):
    onnx.save(vgg[1], str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "x.npz", x=data(n=16))
    return tmp_path


def test_cli_writes_the_model_and_reports(files, cli):
    out = files / "out.onnx"
    code, stdout, err = cli("recalibrate", "--prior", "0", files / "model.onnx", "--data", files / "x.npz", "-o", out,
                            "--batch-size", "8")
    assert code == 0, err
    assert "mean change" in stdout and "pass 5:" in stdout and "exact: 5 BN nodes" in stdout
    assert max(fixed_point_errors(onnx.load(str(out)), data(n=16)).values()) <= 1e-6
    code, stdout, err = cli("recalibrate", "--prior", "0", files / "model.onnx", "--data", files / "x.npz", "-o", out,
                            "--mode", "batch", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["mode"] == "batch" and len(report["nodes"]) == 5 and len(report["passes"]) == 1
    assert set(report["nodes"][0]) >= {"node", "mean_change", "var_change", "dead_channels", "pass"}


def bad_inputs(root):
    model = root / "model.onnx"
    onnx.save(small_cnn(size=16), str(root / "no_bn.onnx"))
    nan = data(n=8)
    nan[3, 1, 2, 2] = np.nan
    np.savez(root / "nan.npz", x=nan)
    np.savez(root / "shape.npz", x=data(n=8, size=12))
    first_conv = next(n.name for n in onnx.load(str(model)).graph.node if n.op_type == "Conv")
    return {
        "no BN": (["recalibrate", root / "no_bn.onnx", "--data", root / "x.npz"], "no BatchNormalization node"),
        "not a BN": (["recalibrate", model, "--data", root / "x.npz", "--nodes", first_conv],
                     "is a Conv, not a BatchNormalization"),
        "unknown node": (["recalibrate", model, "--data", root / "x.npz", "--nodes", "nope"], "no node named 'nope'"),
        "NaN": (["recalibrate", model, "--data", root / "nan.npz"], "NaN or Inf"),
        "NaN batch": (["recalibrate", model, "--data", root / "nan.npz", "--mode", "batch"], "NaN or Inf"),
        "shape": (["recalibrate", model, "--data", root / "shape.npz"], "the model expects"),
        "output is input": (["recalibrate", model, "--data", root / "x.npz", "-o", model], "also an input"),
        "cache": (["recalibrate", model, "--data", root / "x.npz", "--cache-mb", "-1"], "--cache-mb"),
    }


def test_bad_input_is_exit_2_one_line_nothing_written(files, cli):
    for label, (argv, message) in bad_inputs(files).items():
        before = sorted(p.name for p in files.iterdir())
        if "-o" not in argv:
            argv = [*argv, "-o", files / "out.onnx"]
        code, _, err = cli(*argv)
        assert code == 2, (label, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and message in err, (label, err)
        assert sorted(p.name for p in files.iterdir()) == before, label


def test_any_data_source_collect_stats_takes(vgg):
    _, model = vgg
    x = data(n=20)
    expected = onnxbn.recalibrate(model, x, batch_size=8, prior=0)
    names = [n.input[s] for n in bn_nodes(model) for s in (3, 4)]
    sources = {"list of batches": [x[i:i + 8] for i in range(0, 20, 8)],
               "torch Dataset": torch.utils.data.TensorDataset(torch.from_numpy(x)),
               "DataLoader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(x)),
                                                         batch_size=8)}
    for label, source in sources.items():
        out = onnxbn.recalibrate(model, source, batch_size=8, prior=0)
        for name in names:
            np.testing.assert_array_equal(stored(out, name), stored(expected, name), err_msg=label)
    with pytest.raises(UserError, match="read only once"):  # exact mode reads the data once per level
        onnxbn.recalibrate(model, (x[i:i + 8] for i in range(0, 20, 8)), batch_size=8, prior=0)
    once = onnxbn.recalibrate(model, (x[i:i + 8] for i in range(0, 20, 8)), mode="batch", batch_size=8, prior=0)
    batch = onnxbn.recalibrate(model, x, mode="batch", batch_size=8, prior=0)
    for name in names:
        np.testing.assert_array_equal(stored(once, name), stored(batch, name))


def test_api_is_callable_twice():
    model = bn_net()
    x = data(n=8, size=8)
    a = onnxbn.recalibrate(model, x, prior=0)
    b = onnxbn.recalibrate(model, x, mode="batch", prior=0)
    assert bn_nodes(a) and bn_nodes(b)
    with pytest.raises(UserError, match="unknown mode"):
        onnxbn.recalibrate(model, x, mode="train")


# ----------------------------------------------------------------------------- full-size VGG16-BN

@pytest.mark.slow
def test_vgg16_bn_fixed_point_and_update_bn():
    """torchvision's vgg16_bn layout (built here, random weights), 4 images at 224."""
    from onnxbn.models.vgg import CONFIGS

    layers, cin = [], 3
    for item in CONFIGS["vgg16"]:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, int(item), 3, padding=1), nn.BatchNorm2d(int(item)), nn.ReLU(inplace=True)]
            cin = int(item)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(7), nn.Flatten(),
                           nn.Linear(512 * 7 * 7, 256), nn.ReLU(), nn.Linear(256, 10))
    stale_bn(module)
    model = export(module, size=224)
    x = data(n=4, size=224, gain=1.0, shift=0.0)
    out, report = recalibrate_with_report(model, x, batch_size=2, prior=0)
    assert len(report.passes) == 13
    # 13 conv layers deep, two valid float32 executions of the same model (onnxruntime with and without
    # its graph optimisations) already differ by ~1e-6 in these statistics: that is the floor
    errors = fixed_point_errors(out, x)
    floor = fixed_point_errors(out, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, reference=out)
    for name, error in errors.items():
        assert error <= max(1e-6, 2 * floor[name]), (name, error, floor[name])
    assert max(list(errors.values())[:8]) <= 1e-6
    batch = onnxbn.recalibrate(model, x, mode="batch", batch_size=2, prior=0)
    reference = copy.deepcopy(module)
    torch.optim.swa_utils.update_bn(batches_of(x, 2), reference)
    for path, m in reference.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert rel(m.running_var, stored(batch, f"{path}.running_var")) <= 1e-5, path


# ----------------------------------------------------------------------------- the benchmark runs

def test_bench_tiny_reports_every_benchmark(tmp_path):
    """tools/bench_recalibrate.py end to end on tiny sizes: structure and counts, no timing asserted."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "tools" / "bench_recalibrate.py"
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(bench), "--tiny", "--json", str(out), "--workdir", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())["benchmarks"]
    vgg16, resnet = report["cost"]["models"].values()
    for result, passes in ((vgg16, 13), (resnet, 17)):
        rows = result["rows"]
        assert rows["exact (cache)"]["passes"] == rows["exact (no cache)"]["passes"] == passes
        assert rows["batch"]["passes"] == 1
        assert rows["exact (cache)"]["nodes_run"] <= result["graph_nodes"] < rows["exact (no cache)"]["nodes_run"]
        assert all(r["seconds"] > 0 for r in rows.values())
    for row in report["memory"]["rows"].values():
        assert all(v > 0 for v in row["peak_mib"].values())
    shifts = report["domain-shift"]["rows"]
    assert set(shifts) == {"all"}
    for row in shifts.values():
        assert set(row) == {"as trained", "exact on source", "exact", "batch 64", "batch 8"}
        assert all(0 <= v["accuracy"] <= 1 and v["loss"] > 0 for v in row.values())


def test_cli_warns_when_recalibration_makes_channels_constant(tmp_path, capsys):
    """Channel 0 is never positive on the new data: after Relu it is constant, its variance becomes 0."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxbn.cli import main

    inits = [numpy_helper.from_array(np.eye(2, dtype=np.float32).reshape(2, 2, 1, 1), "w"),
             *(numpy_helper.from_array(np.full(2, v, np.float32), n) for n, v in
               (("s", 1.0), ("b", 0.0), ("m", 0.5), ("v", 1.0)))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("BatchNormalization", ["r", "s", "b", "m", "v"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(tmp_path / "m.onnx"))
    x = np.random.default_rng(0).standard_normal((8, 2, 4, 4)).astype(np.float32)
    x[:, 0] = -np.abs(x[:, 0])
    np.savez(tmp_path / "new.npz", x=x)
    code = main([str(a) for a in ("recalibrate", "--prior", "0", "--var-floor", "0", tmp_path / "m.onnx", "--data",
                                  tmp_path / "new.npz", "-o", tmp_path / "out.onnx")])
    err = capsys.readouterr().err
    assert code == 0 and "1 channel(s) are constant on this data but were not before" in err
    var = next(numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "out.onnx")).graph.initializer if t.name == "v")
    assert var[0] == 0 and var[1] == pytest.approx(np.maximum(x[:, 1], 0).astype(np.float64).var(), rel=1e-6)


def test_cli_recalibrates_a_bn_whose_variance_is_computed_at_run_time(tmp_path, cli):
    """The BN's var is Add(v0, zero), not an initializer: there is no old variance to compare with, so no
    newly-constant warning; the BN gets a fresh var initializer holding the data's variance and the file
    is written."""
    inits = [numpy_helper.from_array(np.eye(2, dtype=np.float32).reshape(2, 2, 1, 1), "w"),
             *(numpy_helper.from_array(np.full(2, v, np.float32), n) for n, v in
               (("s", 1.0), ("b", 0.0), ("m", 0.5), ("v0", 1.0), ("zero", 0.0)))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Add", ["v0", "zero"], ["v"], name="var"),
             helper.make_node("BatchNormalization", ["r", "s", "b", "m", "v"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(tmp_path / "m.onnx"))
    x = np.random.default_rng(0).standard_normal((8, 2, 4, 4)).astype(np.float32)
    x[:, 0] = -np.abs(x[:, 0])  # channel 0 is constant (0) after the Relu
    np.savez(tmp_path / "new.npz", x=x)
    out = tmp_path / "out.onnx"
    code, stdout, err = cli("recalibrate", "--prior", "0", tmp_path / "m.onnx", "--data", tmp_path / "new.npz", "-o", out)
    assert code == 0, err
    assert "constant on this data" not in err and err.strip().endswith(f"wrote {out}")
    written = onnx.load(str(out))
    (bn,) = bn_nodes(written)
    var = stored(written, bn.input[4])
    expected = np.maximum(x, 0).astype(np.float64).var(axis=(0, 2, 3))
    assert bn.input[4] != "v" and var[0] == 0 and var[1] == pytest.approx(expected[1], rel=1e-6)


def test_cli_failure_after_recalibrating_writes_nothing_as_it_says(files, cli, monkeypatch):
    """The report is rendered before the model is written: when that fails, "no output was written" holds."""
    from onnxbn.recalibration import RecalibrationReport

    def broken(self):
        raise RuntimeError("simulated report bug")

    monkeypatch.setattr(RecalibrationReport, "table", broken)
    out = files / "out.onnx"
    code, stdout, err = cli("recalibrate", "--prior", "0", files / "model.onnx", "--data", files / "x.npz", "-o", out)
    assert code == 2 and stdout == ""
    assert "failed unexpectedly (RuntimeError: simulated report bug); no output was written" in err
    assert not out.exists() and sorted(p.name for p in files.iterdir()) == ["model.onnx", "x.npz"]


@pytest.mark.parametrize("which", ["resnet", "vgg"])
@pytest.mark.parametrize("cache_mb", [1024, 0])
def test_a_model_file_gives_the_same_model_with_its_weights_read_from_disk(request, which, cache_mb, tmp_path):
    """From a path, the passes' sessions read the weights from the file itself (io.load.load_structure):
    the result equals recalibrating the loaded proto, tensor for tensor."""
    from onnxbn.io.load import load_structure

    _, model = request.getfixturevalue(which)
    path = tmp_path / "m.onnx"
    save_model(model, path)
    assert any(t.data_location == TensorProto.EXTERNAL for t in load_structure(path)[0].graph.initializer)
    x = data(n=24)
    from_file = onnxbn.recalibrate(str(path), x, batch_size=8, cache_mb=cache_mb, prior=0)
    from_proto = onnxbn.recalibrate(onnx.load(str(path)), x, batch_size=8, cache_mb=cache_mb, prior=0)
    a = {t.name: numpy_helper.to_array(t) for t in from_file.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in from_proto.graph.initializer}
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert [n.name for n in from_file.graph.node] == [n.name for n in from_proto.graph.node]


# ----------------------------------------------------------------------------- the prior (issue 25)

def numpy_blend(mo, vo, mn, vn, prior, n):
    """The mixture of N samples with (mo, vo) and n with (mn, vn), from pooled sums (numpy, independent)."""
    s1 = prior * mo + n * mn
    s2 = prior * (vo + mo ** 2) + n * (vn + mn ** 2)
    mean = s1 / (prior + n)
    return mean, s2 / (prior + n) - mean ** 2


@pytest.mark.parametrize("mode", ["exact", "batch"])
def test_prior_blends_old_and_measured_statistics(vgg, mode):
    _, model = vgg
    x = data(n=24, seed=5)
    plain = onnxbn.recalibrate(model, x, mode=mode, batch_size=8, prior=0)
    for prior in (6.0, 24.0, 96.0):
        blended = onnxbn.recalibrate(model, x, mode=mode, batch_size=8, prior=prior)
        for node in bn_nodes(model):
            mo, vo = stored(model, node.input[3]), stored(model, node.input[4])
            mn, vn = stored(plain, node.input[3]), stored(plain, node.input[4])
            mean, var = numpy_blend(mo, vo, mn, vn, prior, 24)
            np.testing.assert_allclose(stored(blended, node.input[3]), mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(stored(blended, node.input[4]), var, rtol=1e-5, atol=1e-6)
    meta = json.loads({p.key: p.value for p in blended.metadata_props}["onnxbn.recalibrate"])
    assert meta["prior"] == 96.0 and meta["prior_not_applied"] == []


@pytest.mark.parametrize("mode", ["exact", "batch"])
def test_prior_zero_is_bit_identical_to_the_measurement(vgg, mode):
    """prior 0 with the default floor (no channel below it here) stores exactly what is measured."""
    _, model = vgg
    x = data(n=16, seed=6)
    a = onnxbn.recalibrate(model, x, mode=mode, batch_size=8, prior=0, var_floor=0)
    b = onnxbn.recalibrate(model, x, mode=mode, batch_size=8, prior=0)
    assert [t.SerializeToString() for t in a.graph.initializer] == [t.SerializeToString() for t in b.graph.initializer]


def test_prior_cli_blends_constant_node_statistics(tmp_path):
    model = bn_net(constants=True)
    path = tmp_path / "m.onnx"
    save_model(model, path)
    x = (np.random.default_rng(7).standard_normal((12, 3, 8, 8)) * 2 + 1).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    for prior, out in ((0, "p0.onnx"), (12, "p12.onnx")):
        assert main(["recalibrate", str(path), "--data", str(tmp_path / "d.npz"), "--prior", str(prior), "--var-floor", "0",
                     "-o", str(tmp_path / out)]) == 0
    p0, p12 = onnx.load(tmp_path / "p0.onnx"), onnx.load(tmp_path / "p12.onnx")
    for node in bn_nodes(model):
        mo, vo = stored(model, node.input[3]), stored(model, node.input[4])
        mean, var = numpy_blend(mo, vo, stored(p0, bn_nodes(p0)[[n.name for n in bn_nodes(p0)].index(node.name)].input[3]),
                                stored(p0, next(n for n in bn_nodes(p0) if n.name == node.name).input[4]), 12, 12)
        got = next(n for n in bn_nodes(p12) if n.name == node.name)
        np.testing.assert_allclose(stored(p12, got.input[3]), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stored(p12, got.input[4]), var, rtol=1e-5, atol=1e-6)


def test_prior_must_be_non_negative(vgg):
    with pytest.raises(UserError, match="--prior"):
        onnxbn.recalibrate(vgg[1], data(n=8), prior=-1)


def test_prior_skips_a_bn_whose_old_variance_is_computed(tmp_path):
    model = bn_net()
    bn2 = next(n for n in model.graph.node if n.name == "bn2")
    at = list(model.graph.node).index(bn2)
    model.graph.node.insert(at, helper.make_node("Abs", [bn2.input[4]], ["bn2.var.abs"], name="abs"))
    bn2.input[4] = "bn2.var.abs"
    x = data(n=10, size=8, seed=8)
    p0 = onnxbn.recalibrate(model, x, batch_size=5, prior=0)
    p10, report = recalibrate_with_report(model, x, batch_size=5, prior=10)
    assert report.prior_not_applied == ["bn2"] and "prior not applied to bn2" in report.table()
    node0, node10 = (next(n for n in bn_nodes(m) if n.name == "bn2") for m in (p0, p10))
    mo = stored(model, "bn1.mean")
    mean, var = numpy_blend(mo, stored(model, "bn1.var"), stored(p0, "bn1.mean"), stored(p0, "bn1.var"), 10, 10)
    np.testing.assert_allclose(stored(p10, "bn1.mean"), mean, rtol=1e-5, atol=1e-6)
    # bn2 keeps what prior 0 measures (the measurement never sees a blend)
    np.testing.assert_array_equal(stored(p10, node10.input[3]), stored(p0, node0.input[3]))
    np.testing.assert_array_equal(stored(p10, node10.input[4]), stored(p0, node0.input[4]))


def test_variance_floor_keeps_a_fraction_of_the_old_variance(tmp_path, capsys):
    model = bn_net()
    w = next(t for t in model.graph.initializer if t.name == "conv1.W")
    weights = numpy_helper.to_array(w).copy()
    weights[0] = 0  # conv1 channel 0 is its bias on any data: bn1 channel 0 has variance 0 there
    w.CopyFrom(numpy_helper.from_array(weights, "conv1.W"))
    x = data(n=12, size=8, seed=9)
    p0 = onnxbn.recalibrate(model, x, batch_size=4, prior=0, var_floor=0)
    assert stored(p0, "bn1.var")[0] == 0
    floored, report = recalibrate_with_report(model, x, batch_size=4, var_floor=0.01, prior=0)
    assert report.floored.get("bn1") == 1
    for node in bn_nodes(model):
        old, new = stored(model, node.input[4]), stored(p0, node.input[4])
        want = np.where(new < 0.01 * old, 0.01 * old, new)
        np.testing.assert_allclose(stored(floored, node.input[4]), want, rtol=1e-6)
        np.testing.assert_array_equal(stored(floored, node.input[3]), stored(p0, node.input[3]))
        assert report.floored.get(node.name, 0) == int(np.count_nonzero(new < 0.01 * old))
    path = tmp_path / "m.onnx"
    save_model(model, path)
    np.savez(tmp_path / "d.npz", x=x)
    assert main(["recalibrate", "--prior", "0", str(path), "--data", str(tmp_path / "d.npz"), "--var-floor", "0.01",
                 "-o", str(tmp_path / "out.onnx")]) == 0
    assert "variance floor 0.01 x old variance applied to: bn1 (1 channel)" in capsys.readouterr().out
    np.testing.assert_allclose(stored(onnx.load(tmp_path / "out.onnx"), "bn1.var")[0],
                               0.01 * stored(model, "bn1.var")[0], rtol=1e-6)


def top1(model, x, y) -> float:
    out = predict(model, x)
    return float((out.argmax(axis=1) == y).mean())


def guard_files(tmp_path, model, x_recal, x_eval, y_eval):
    save_model(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "recal.npz", x=x_recal)
    np.savez(tmp_path / "eval.npz", x=x_eval, y=y_eval.astype(np.int64))
    return [str(tmp_path / "m.onnx"), "--data", str(tmp_path / "recal.npz"), "--eval", str(tmp_path / "eval.npz"),
            "-o", str(tmp_path / "out.onnx")]


def test_guard_refuses_a_harmful_recalibration(tmp_path, capsys):
    model = bn_net(seed=3)
    x_eval = data(n=40, size=8, seed=10, shift=0.0, gain=1.0)
    y = predict(model, x_eval).argmax(axis=1)  # the original is right on every image
    x_recal = data(n=40, size=8, seed=11, shift=3.0, gain=6.0)
    assert top1(onnxbn.recalibrate(model, x_recal, prior=0), x_eval, y) < 0.95  # numpy judge: it does hurt
    argv = guard_files(tmp_path, model, x_recal, x_eval, y)
    assert main(["recalibrate", "--prior", "0", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing written" in err[0] and "--max-drop 0.5" in err[0]
    assert not (tmp_path / "out.onnx").exists()
    assert main(["recalibrate", "--prior", "0", *argv, "--max-drop", "100"]) == 0 and (tmp_path / "out.onnx").exists()


def test_guard_passes_a_helpful_recalibration_and_prior_auto(tmp_path, capsys):
    model = bn_net(seed=4)
    x = data(n=40, size=8, seed=12, shift=2.0, gain=3.0)
    good = onnxbn.recalibrate(model, x, prior=0)
    y = predict(good, x).argmax(axis=1)
    before = top1(model, x, y)
    assert before < 0.9
    argv = guard_files(tmp_path, model, x, x, y)
    assert main(["recalibrate", "--prior", "0", *argv]) == 0
    out = capsys.readouterr().out
    assert f"top-1 {100 * before:.2f}% -> 100.00%" in out
    written = onnx.load(tmp_path / "out.onnx")
    assert top1(written, x, y) == 1.0
    assert main(["recalibrate", *argv, "--prior", "auto", "--force"]) == 0
    out = capsys.readouterr().out
    assert "--prior auto" in out and "chose 0" in out and out.count("  prior ") == 6
    for node in bn_nodes(model):  # prior 0 won: the written statistics are the measured ones
        np.testing.assert_allclose(stored(onnx.load(tmp_path / "out.onnx"), node.input[4]), stored(good, node.input[4]),
                                   rtol=1e-6)


def test_prior_auto_needs_eval(tmp_path, capsys):
    save_model(bn_net(), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=data(n=8, size=8))
    assert main(["recalibrate", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--prior", "auto",
                 "-o", str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--eval" in err[0]
    assert not (tmp_path / "out.onnx").exists()


def test_floored_channels_are_listed_in_the_report_and_the_metadata():
    model = bn_net()
    w = next(t for t in model.graph.initializer if t.name == "conv1.W")
    weights = numpy_helper.to_array(w).copy()
    weights[[0, 4]] = 0  # conv1 channels 0 and 4 are constant on any data
    w.CopyFrom(numpy_helper.from_array(weights, "conv1.W"))
    x = data(n=12, size=8, seed=9)
    p0 = onnxbn.recalibrate(model, x, batch_size=4, prior=0, var_floor=0)
    want = {}
    for node in bn_nodes(model):  # numpy: the channels whose measured variance is below 0.01 x the old one
        low = np.flatnonzero(stored(p0, node.input[4]) < 0.01 * stored(model, node.input[4]))
        if low.size:
            want[node.name] = [int(c) for c in low]
    assert want.get("bn1") == [0, 4]
    out, report = recalibrate_with_report(model, x, batch_size=4, prior=0, var_floor=0.01)
    assert report.floored_channels == want and report.floored == {k: len(v) for k, v in want.items()}
    assert "bn1 (2 channels) [0, 4]" in report.table()
    meta = json.loads({p.key: p.value for p in out.metadata_props}["onnxbn.recalibrate"])
    assert meta["floored_channels"] == want and meta["floored"] == {k: len(v) for k, v in want.items()}


def test_prior_2n_is_twice_the_number_of_images(vgg):
    _, model = vgg
    x = data(n=24, seed=5)
    plain = onnxbn.recalibrate(model, x, batch_size=8, prior=0, var_floor=0)
    blended, report = recalibrate_with_report(model, x, batch_size=8, prior="2n", var_floor=0)
    assert report.prior == 48 and report.prior_requested == "2n"
    for node in bn_nodes(model):
        mean, var = numpy_blend(stored(model, node.input[3]), stored(model, node.input[4]),
                                stored(plain, node.input[3]), stored(plain, node.input[4]), 48, 24)
        np.testing.assert_allclose(stored(blended, node.input[3]), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stored(blended, node.input[4]), var, rtol=1e-5, atol=1e-6)
    meta = json.loads({p.key: p.value for p in blended.metadata_props}["onnxbn.recalibrate"])
    assert meta["prior"] == 48 and meta["prior_requested"] == "2n"


def with_statistics(model, values: dict) -> onnx.ModelProto:
    """A copy of `model` whose initializers `values` names hold those values (numpy, float32)."""
    out = copy.deepcopy(model)
    for t in out.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(np.asarray(values[t.name], np.float32), t.name))
    return out


def top1_and_loss(model, x, y) -> tuple[float, float]:
    """Top-1 and mean cross-entropy of the logits (numpy log-softmax) on onnxruntime's outputs."""
    logits = predict(model, x).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float((logits.argmax(axis=1) == y).mean()), float(-logp[np.arange(len(y)), y].mean())


def test_prior_auto_picks_the_grids_best_as_judged_independently():
    model = bn_net(seed=3)
    x_eval = data(n=40, size=8, seed=10, shift=0.0, gain=1.0)
    y = predict(model, x_eval).argmax(axis=1)
    x_recal = data(n=20, size=8, seed=11, shift=1.5, gain=3.0)
    plain = onnxbn.recalibrate(model, x_recal, prior=0, var_floor=0)
    n, judged = len(x_recal), []
    for k in (0.0, 0.25, 1.0, 2.0, 4.0, 16.0):
        values = {}
        for node in bn_nodes(model):
            values[node.input[3]], values[node.input[4]] = numpy_blend(
                stored(model, node.input[3]), stored(model, node.input[4]), stored(plain, node.input[3]),
                stored(plain, node.input[4]), k * n, n)
        judged.append((k * n, *top1_and_loss(with_statistics(model, values), x_eval, y)))
    best = max(judged, key=lambda j: (j[1], -j[2]))
    chosen, report = recalibrate_with_report(model, x_recal, prior="auto", var_floor=0, eval_data=(x_eval, y),
                                             max_drop=100)
    assert [g["prior"] for g in report.prior_grid] == [j[0] for j in judged]
    assert [g["top1"] for g in report.prior_grid] == pytest.approx([j[1] for j in judged], abs=1e-12)
    assert [g["loss"] for g in report.prior_grid] == pytest.approx([j[2] for j in judged], rel=1e-4)
    assert report.prior == best[0]
    assert top1_and_loss(chosen, x_eval, y)[0] == best[1]


def test_guard_through_the_python_api():
    from onnxbn.recalibration import RecalibrationRefused

    model = bn_net(seed=3)
    x_eval = data(n=40, size=8, seed=10, shift=0.0, gain=1.0)
    y = predict(model, x_eval).argmax(axis=1)  # the original: 100% here
    x_bad = data(n=40, size=8, seed=11, shift=3.0, gain=6.0)
    after = top1(onnxbn.recalibrate(model, x_bad, prior=0), x_eval, y)
    assert after < 0.95  # numpy judge: a harmful recalibration
    untouched = model.SerializeToString()
    with pytest.raises(RecalibrationRefused) as refused:
        onnxbn.recalibrate(model, x_bad, prior=0, eval_data=(x_eval, y))
    e = refused.value.report.eval
    assert e is not None and e["refused"] and e["before"]["top1"] == 1.0 and e["after"]["top1"] == pytest.approx(after)
    assert e["drop"] == pytest.approx(100 * (1 - after)) and model.SerializeToString() == untouched
    helpful = bn_net(seed=4)
    x = data(n=40, size=8, seed=12, shift=2.0, gain=3.0)
    good = onnxbn.recalibrate(helpful, x, prior=0)
    y = predict(good, x).argmax(axis=1)
    out, report = recalibrate_with_report(helpful, x, prior=0, eval_data=(x, y))
    guard = report.eval
    assert guard is not None and not guard["refused"] and guard["after"]["top1"] == top1(out, x, y) == 1.0
    assert guard["before"]["top1"] == pytest.approx(top1(helpful, x, y))
