"""Property tests (hypothesis, derandomized): statistics merging, the identity splice, exact folding.

Relative error is max|a - b| / max|a| over the whole output, as in onnxbn.check.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from oracles import moment_sums

from models import BN_WIDE, Net, small_cnn
from onnxbn import UserError, collect_stats, compare, explain_fold, fold_bn, insert_bn, select_points
from onnxbn.runtimes.ort_backend import make_session
from onnxbn.stats import FORMAT, ChannelMoments, Stats, load_stats, merge_stats

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- statistics merging

def random_data(seed: int, n: int, channels: int, log_offset: float, log_scale: float) -> np.ndarray:
    """(n, channels) values whose channels have their own offset (up to 10**log_offset) and
    spread (down to 10**log_scale): badly conditioned for a naive sum of squares."""
    rng = np.random.default_rng(seed)
    offset = rng.uniform(-1, 1, channels) * 10.0**log_offset
    scale = 10.0 ** rng.uniform(log_scale, 1, channels)
    return offset + scale * rng.standard_normal((n, channels))


def partition(n: int, cuts: list[int]) -> list[slice]:
    bounds = [0, *sorted({c for c in cuts if 0 < c < n}), n]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def assert_moments(m: ChannelMoments, x: np.ndarray) -> None:
    """m equals numpy's single-pass float64 mean and population variance of x."""
    assert m.count == len(x)
    mean, var = x.mean(axis=0), x.var(axis=0)
    spread = np.abs(x - mean).max(axis=0)
    np.testing.assert_allclose(m.mean, mean, rtol=0, atol=1e-12 * (np.abs(mean) + spread).max() + 1e-300)
    np.testing.assert_allclose(m.var, var, rtol=1e-9, atol=1e-12 * spread.max() ** 2)


@settings(max_examples=120, **SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 80), channels=st.integers(1, 6),
       log_offset=st.floats(-3, 5), log_scale=st.floats(-4, 0),
       cuts=st.lists(st.integers(1, 79), max_size=8), order=st.randoms(use_true_random=False))
def test_merging_in_any_order_and_partition_equals_one_pass(seed, n, channels, log_offset, log_scale, cuts, order):
    x = random_data(seed, n, channels, log_offset, log_scale)
    parts = partition(n, cuts)
    order.shuffle(parts)
    acc = ChannelMoments()
    for part in parts:
        acc.merge(*moment_sums(x[part]))
    assert_moments(acc, x)


@settings(max_examples=60, **SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 60), log_offset=st.floats(-3, 5),
       channels=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       shard_cuts=st.lists(st.integers(1, 59), max_size=5), batch_cuts=st.lists(st.integers(1, 59), max_size=8),
       order=st.randoms(use_true_random=False), as_files=st.booleans())
def test_merging_saved_shard_files_equals_one_pass(seed, n, log_offset, channels, shard_cuts, batch_cuts, order,
                                                   as_files):
    """Shards (each merged from its own batches) saved as stats files, merged in any order."""
    data = {f"t{i}": random_data(seed + i, n, c, log_offset, -3) for i, c in enumerate(channels)}
    shards = partition(n, shard_cuts)
    with tempfile.TemporaryDirectory() as tmp:
        parts = []
        for k, shard in enumerate(shards):
            moments = {name: ChannelMoments() for name in data}
            for batch in partition(n, batch_cuts):
                rows = np.arange(n)[shard][np.isin(np.arange(n)[shard], np.arange(n)[batch])]
                for name, x in data.items():
                    if len(rows):
                        moments[name].merge(*moment_sums(x[rows]))
            meta = {"format": FORMAT, "model_sha256": "same", "selector": "relu", "preset": "array",
                    "samples": shard.stop - shard.start, "shard": f"{k}/{len(shards)}"}
            stats = Stats(moments, meta)
            parts.append(stats.save(Path(tmp) / f"shard{k}.npz") if as_files else stats)
        order.shuffle(parts)
        merged = merge_stats(parts)
        assert merged.tensors == list(data)
        assert merged.meta["samples"] == n
        for name, x in data.items():
            assert_moments(merged.moments[name], x)
        if as_files:  # a merged file reads back bit for bit
            again = load_stats(merged.save(Path(tmp) / "merged.npz"))
            for name in data:
                assert np.array_equal(again.moments[name].mean, merged.moments[name].mean)
                assert np.array_equal(again.moments[name].m2, merged.moments[name].m2)


@settings(max_examples=15, **SETTINGS)
@given(shards=st.integers(1, 4), batch_size=st.integers(1, 7), batch_size_full=st.integers(1, 16),
       selector=st.sampled_from(["relu", "linear"]))
def test_collect_stats_shards_merge_to_one_run(shards, batch_size, batch_size_full, selector):
    """`stats --shard i/N` for every i, merged, equals one run over all the data (any batch sizes)."""
    model, x = small_cnn(13), inputs([3, 8, 8], 13, 4)
    parts = [collect_stats(model, x, after=selector, batch_size=batch_size, shard=f"{i}/{shards}", device="cpu",
                           workers=0) for i in range(shards)]
    merged = merge_stats(parts)
    full = collect_stats(model, x, after=selector, batch_size=batch_size_full, device="cpu", workers=0)
    assert merged.tensors == full.tensors and merged.meta["samples"] == 13
    for name in full.tensors:
        a, b = merged.moments[name], full.moments[name]
        assert a.count == b.count
        np.testing.assert_allclose(a.mean, b.mean, rtol=0, atol=1e-12 * (np.abs(b.mean) + np.sqrt(b.var)).max())
        np.testing.assert_allclose(a.var, b.var, rtol=1e-9, atol=1e-15)


# ----------------------------------------------------------------------------- random graphs

class Graph(Net):
    """A random Conv/Gemm/Relu net (models.Net, widely spread BN parameters) that also counts
    the BN nodes fold_bn must fold; random_net decides that as it builds."""

    def __init__(self, seed: int):
        super().__init__(seed, bn=BN_WIDE)
        self.folds = 0   # BN nodes that fold_bn must fold

    @property
    def bns(self) -> int:
        return sum(n.op_type == "BatchNormalization" for n in self.nodes)

    def random_bn(self, x: str, channels: int, name: str, tiny_var: float, eps: float) -> str:
        """A BN node named `name` (its output too) whose variances are, with probability
        `tiny_var` each, tiny (1e-9..1e-3)."""
        r = self.rng
        var = np.where(r.random(channels) < tiny_var, 10.0 ** r.uniform(-9, -3, channels), r.uniform(0.2, 3.0, channels))
        return self.bn(x, channels, name, out=name, eps=eps, var=var)

    def finish(self, input_shape, output: str, output_shape) -> onnx.ModelProto:
        return self.model({"input": input_shape}, {output: output_shape}, 13, ir_version=8, check="full",
                          producer=None, graph_name="random")


@st.composite
def random_net(draw, with_bn: bool = False):
    """A random net: 0-3 Conv layers (channels, kernel, pads, strides), Flatten, 0-2 hidden Gemm
    layers and a Gemm classifier; Relu after a layer or not. With `with_bn`, BN nodes go after
    layers and after Relus, with random parameters (some near-zero variances) and epsilon.
    Returns (model, input shape past the batch axis, graph)."""
    g = Graph(draw(st.integers(0, 2**32 - 1)))
    tiny_var = draw(st.sampled_from([0.0, 0.3, 1.0]))
    eps = draw(st.sampled_from([1e-5, 1e-3]))
    convs = draw(st.integers(1 if with_bn else 0, 3))
    if convs:
        channels, size = draw(st.integers(1, 4)), draw(st.integers(3, 9))
        shape, x = [channels, size, size], "input"
    else:
        channels = draw(st.integers(1, 8))
        shape, x = [channels], "input"
    pending_bn = None  # a post-Relu BN waiting to learn whether the next layer can absorb it

    def settle(foldable: bool) -> None:
        nonlocal pending_bn
        if pending_bn is not None:
            g.folds += foldable
            pending_bn = None

    for i in range(convs):
        k = draw(st.integers(1, 3))
        pad = draw(st.integers(0, k - 1))
        stride = draw(st.integers(1, 2))
        if (size + 2 * pad - k) // stride + 1 < 1:
            break
        cout = draw(st.integers(1, 6))
        settle(pad == 0)  # forward into a Conv only without padding
        w = g.init(f"conv{i}.W", g.rng.normal(0, 1 / np.sqrt(channels * k * k), (cout, channels, k, k)))
        inputs = [x, w] + ([g.init(f"conv{i}.b", g.rng.normal(0, 0.3, cout))] if draw(st.booleans()) else [])
        x = g.node("Conv", inputs, f"conv{i}", kernel_shape=[k, k], pads=[pad] * 4, strides=[stride] * 2)
        size, channels = (size + 2 * pad - k) // stride + 1, cout
        x = add_activation(draw, g, x, channels, with_bn, tiny_var, eps)
        pending_bn = x if x.endswith("/bn_post") else None
    if convs:
        x = g.node("Flatten", [x], "flatten")
        features = channels * size * size
    else:
        features = channels
    hidden = draw(st.integers(0 if convs else 1, 2))
    for i in range(hidden + 1):
        last = i == hidden
        fout = draw(st.integers(1, 5)) if last else draw(st.integers(1, 8))
        settle(True)  # forward into a Gemm, through Flatten
        trans_b = draw(st.integers(0, 1))
        w = g.rng.normal(0, 1 / np.sqrt(features), (fout, features))
        inputs = [x, g.init(f"fc{i}.W", w if trans_b else w.T), g.init(f"fc{i}.b", g.rng.normal(0, 0.3, fout))]
        x = g.node("Gemm", inputs, "output" if last else f"fc{i}", transB=trans_b)
        features = fout
        if not last:
            x = add_activation(draw, g, x, features, with_bn, tiny_var, eps)
            pending_bn = x if x.endswith("/bn_post") else None
    model = g.finish(["N", *shape], "output", ["N", features])
    return model, shape, g


def add_activation(draw, g: Graph, x: str, channels: int, with_bn: bool, tiny_var: float, eps: float) -> str:
    """Optional BN on the layer output (always folds backward), Relu, optional BN after the Relu."""
    often = st.integers(0, 3).map(bool)  # three times in four
    if with_bn and draw(st.booleans()):
        x = g.random_bn(x, channels, f"{x}/bn_pre", tiny_var, eps)
        g.folds += 1
    if draw(often):
        x = g.node("Relu", [x], f"{x}/relu")
        if with_bn and draw(often):
            x = g.random_bn(x, channels, f"{x}/bn_post", tiny_var, eps)
    return x


def inputs(shape, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(0.5, 1.0, (count, *shape))).astype(np.float32)


@settings(max_examples=50, **SETTINGS)
@given(net=random_net(), selector=st.sampled_from(["relu", "linear", "dense", "conv", "names"]), data=st.data())
def test_insert_then_check_is_an_identity(net, selector, data):
    model, shape, _ = net
    candidates = ["input"] + [n.output[0] for n in model.graph.node]
    names = st.lists(st.sampled_from(candidates), min_size=1, max_size=4, unique=True)
    if selector == "names":  # any non-empty set of float tensors, the graph input included
        selector = data.draw(names)
    try:
        points = select_points(model, selector)
    except UserError as exc:  # e.g. 'conv' on a net without Conv: then pick tensors by name
        assert f"selector {selector!r} matches no tensor" in str(exc)
        event("selector matches nothing: names instead")
        selector = data.draw(names)
        points = select_points(model, selector)
    event(f"{len(points)} BN inserted")
    stats = collect_stats(model, inputs(shape, 12, 1), after=selector, batch_size=5, device="cpu", workers=0)
    with_bn = insert_bn(model, stats)
    onnx.checker.check_model(with_bn, full_check=True)
    assert sum(n.op_type == "BatchNormalization" for n in with_bn.graph.node) == len(points)
    # any input, not just the calibration data
    report = compare(model, with_bn, data=inputs(shape, 16, 2), device="cpu")
    assert report.passed and report.outputs["output"].max_rel_error <= 1e-6, report.table()


@settings(max_examples=80, **SETTINGS)
@given(net=random_net(with_bn=True))
def test_fold_is_exact_on_random_bn_graphs(net):
    model, shape, g = net
    assume(g.bns > 0)
    x = inputs(shape, 8, 3)
    folded = fold_bn(model)
    onnx.checker.check_model(folded, full_check=True)
    left = sum(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert left == g.bns - g.folds, explain_fold(model)
    event(f"{g.folds} of {g.bns} BN fold")
    scale = float(np.abs(make_session(model, "cpu").run(None, {"input": x})[0]).max())
    report = compare(model, folded, data=x, atol=1e-5 * scale, rtol=1e-5, device="cpu")
    assert report.passed and report.outputs["output"].max_rel_error <= 1e-5, report.table()
