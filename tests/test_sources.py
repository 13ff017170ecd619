"""Any data source: torch Dataset, DataLoader, generators and iterables of batches give the same
statistics, checks and evaluations as the same images in an .npz, streamed in flat memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import torch.utils.data as tud

import onnxbn
from models import small_cnn
from onnxbn.errors import UserError

X = np.random.default_rng(3).standard_normal((37, 3, 8, 8)).astype(np.float32)
Y = np.arange(37) % 10


class Items(tud.Dataset):
    """A map-style torch Dataset of (tensor, int) items."""

    def __len__(self):
        return len(X)

    def __getitem__(self, i):
        return torch.from_numpy(X[i]), int(Y[i])


def batches_of(size):
    for i in range(0, len(X), size):
        yield X[i:i + size], Y[i:i + size]


SOURCES = {
    "dataset": lambda: Items(),
    "tensor_dataset": lambda: tud.TensorDataset(torch.from_numpy(X), torch.from_numpy(Y)),
    "dataloader": lambda: tud.DataLoader(Items(), batch_size=5),
    "generator": lambda: batches_of(7),
    "list_of_arrays": lambda: [X[i:i + 11] for i in range(0, len(X), 11)],
}


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "data.npz"
    np.savez(path, x=X, y=Y)
    return path


@pytest.mark.parametrize("source", SOURCES)
def test_stats_from_any_source_equal_the_npz(source, npz):
    model = small_cnn()
    expected = onnxbn.collect_stats(model, npz, after="relu", batch_size=8, device="cpu", workers=0)
    got = onnxbn.collect_stats(model, SOURCES[source](), after="relu", batch_size=8, device="cpu", workers=0)
    assert got.meta["samples"] == 37
    for name in expected.tensors:
        np.testing.assert_allclose(got.mean(name), expected.mean(name), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(got.var(name), expected.var(name), rtol=1e-12, atol=1e-15)


def test_dataset_with_workers_limit_and_shards_equals_the_npz(npz):
    """A torch Dataset's --limit is a seeded uniform sample (its labels are unknown until read), then
    every N-th item for shard I/N: the same rows of the array give the same statistics."""
    model = small_cnn()
    sample = np.sort(np.random.default_rng(4).permutation(len(X))[:20])
    for i, shard in enumerate(("0/2", "1/2")):
        expected = onnxbn.collect_stats(model, X[sample[i::2]], after="dense", device="cpu", workers=0)
        got = onnxbn.collect_stats(model, Items(), after="dense", limit=20, seed=4, shard=shard, device="cpu",
                                   workers=2)
        assert got.meta["samples"] == expected.meta["samples"] == 10
        for name in expected.tensors:
            np.testing.assert_allclose(got.var(name), expected.var(name), rtol=1e-12)


@pytest.mark.parametrize("source", ["dataloader", "generator"])
def test_limit_and_shard_need_an_indexable_source(source):
    with pytest.raises(UserError, match="need an indexable source"):
        onnxbn.collect_stats(small_cnn(), SOURCES[source](), after="relu", limit=5, device="cpu", workers=0)


@pytest.mark.parametrize("source", SOURCES)
def test_compare_and_evaluate_take_any_source(source, npz):
    a, b = small_cnn(), small_cnn(seed=2)
    expected = onnxbn.compare(a, b, data=npz).outputs["logits"]
    got = onnxbn.compare(a, b, data=SOURCES[source]()).outputs["logits"]
    assert got.elements == expected.elements and got.max_abs_error == expected.max_abs_error
    if source != "list_of_arrays":  # no labels there
        assert onnxbn.evaluate(a, SOURCES[source]())["loss"] == pytest.approx(onnxbn.evaluate(a, npz)["loss"], rel=1e-12)


def test_finetune_takes_a_torch_dataset():
    model = small_cnn()
    bn = onnxbn.insert_bn(model, onnxbn.collect_stats(model, X, after="dense", device="cpu", workers=0))
    a = onnxbn.finetune(bn, (X, Y), epochs=1, lr=1e-3, batch_size=16, device="cpu", dropout=0.0).model
    b = onnxbn.finetune(bn, Items(), epochs=1, lr=1e-3, batch_size=16, device="cpu", dropout=0.0).model
    assert onnxbn.compare(a, b, random=4, atol=0, rtol=0).passed  # the same samples, the same steps: bit-equal


def test_a_stream_of_unknown_length_is_refused_where_a_length_is_needed():
    model = small_cnn()
    with pytest.raises(UserError, match="number of samples is unknown"):
        onnxbn.finetune(model, batches_of(8), epochs=1, device="cpu")


def test_streaming_memory_does_not_grow_with_the_number_of_batches():
    model = small_cnn()

    def peak(batches):
        rng = np.random.default_rng(0)
        stream = (rng.standard_normal((16, 3, 8, 8)).astype(np.float32) for _ in range(batches))
        tracemalloc.start()
        onnxbn.collect_stats(model, stream, after="relu", batch_size=16, device="cpu", workers=0)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(10), peak(200)
    assert large < 1.5 * small, (small, large)


def test_an_x_y_pair_of_torch_tensors_is_an_array_pair():
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    model = small_cnn()
    got = onnxbn.collect_stats(model, (x, y), after="relu", device="cpu", workers=0)
    expected = onnxbn.collect_stats(model, (X, Y), after="relu", device="cpu", workers=0)
    for name in expected.tensors:
        np.testing.assert_array_equal(got.var(name), expected.var(name))
    assert onnxbn.evaluate(model, (x, y))["loss"] == onnxbn.evaluate(model, (X, Y))["loss"]
    with pytest.raises(UserError, match="must be \\(x, y\\)"):
        onnxbn.collect_stats(model, (X, Y, Y), after="relu", device="cpu", workers=0)
