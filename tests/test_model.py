"""onnxbn.io.model.Model: where each initializer's bytes live, read and written without changing the input.

Judged against onnx.load of the file and numpy: the arrays a Model gives equal the file's,
a saved Model loads back to the same values, its hash equals the hash of the whole proto,
and the transforms built on it leave their input (file or proto) as it was.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from oracles import ort_outputs, rel_error

from models import inputs_for, small_cnn
from onnxbn.io.copies import model_sha256
from onnxbn.io.model import Model
from onnxbn.io.tensors import FileRange


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_cnn(size=16), str(path))
    return path


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_a_model_opened_from_a_file_reads_its_large_weights_from_the_file(model_file):
    expected = _weights(onnx.load(str(model_file)))
    model = Model.open(model_file)
    large = [t.name for t in model.proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert large, "the test model should have weights over load_structure's 4 KiB"
    for name in large:
        where = model.source(name)
        assert isinstance(where, FileRange) and where.path.name == "m.onnx"
        raw = model_file.read_bytes()[where.offset:where.offset + where.length]
        np.testing.assert_array_equal(np.frombuffer(raw, np.float32).reshape(expected[name].shape), expected[name])
    for name, value in expected.items():
        np.testing.assert_array_equal(model.array(name), value)


def test_set_array_keeps_the_type_and_never_writes_the_file(model_file):
    before = hashlib.sha256(model_file.read_bytes()).hexdigest()
    model = Model.open(model_file)
    name = next(t.name for t in model.proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    new = np.arange(model.array(name).size, dtype=np.float64).reshape(model.array(name).shape)
    model.set_array(name, new)
    assert model.array(name).dtype == np.float32 and isinstance(model.source(name), np.ndarray)
    np.testing.assert_array_equal(model.array(name), new.astype(np.float32))
    model.set_array("added", np.ones(3, np.int64))
    assert model.initializer("added").data_type == onnx.TensorProto.INT64
    assert hashlib.sha256(model_file.read_bytes()).hexdigest() == before


def test_save_and_to_proto_hold_every_value(model_file, tmp_path):
    expected = _weights(onnx.load(str(model_file)))
    model = Model.open(model_file)
    name = next(iter(expected))
    changed = expected[name] * 2
    model.set_array(name, changed)
    model.save(tmp_path / "out.onnx")
    saved = _weights(onnx.load(str(tmp_path / "out.onnx")))
    assert saved.keys() == expected.keys()
    for key, value in saved.items():
        np.testing.assert_array_equal(value, changed if key == name else expected[key])
    proto = model.to_proto()
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    for key, value in _weights(proto).items():
        np.testing.assert_array_equal(value, changed if key == name else expected[key])


def test_save_refuses_to_overwrite_its_input(model_file):
    from onnxbn.errors import UserError

    with pytest.raises(UserError, match="also an input"):
        Model.open(model_file).save(model_file, inputs=[model_file])


def test_sha256_is_the_hash_of_the_whole_model_wherever_the_weights_live(model_file):
    whole = onnx.load(str(model_file))
    assert Model.open(model_file).sha256() == Model.open(whole).sha256() == model_sha256(whole)
    moved = Model.open(model_file)
    name = moved.proto.graph.initializer[0].name
    moved.set_array(name, moved.array(name))  # same values, now an array: same hash
    assert moved.sha256() == model_sha256(whole)
    moved.set_array(name, moved.array(name) + 1)
    assert moved.sha256() != model_sha256(whole)


def test_copy_is_independent(model_file):
    model = Model.open(model_file)
    copy = model.copy()
    name = model.proto.graph.initializer[0].name
    copy.set_array(name, copy.array(name) * 0)
    copy.proto.graph.node[0].name = "renamed"
    assert model.proto.graph.node[0].name != "renamed"
    assert np.abs(model.array(name)).sum() > 0


def test_transforms_leave_their_input_as_it_was(model_file, tmp_path):
    """insert, fold and write_into on a Model: the input Model and its file are unchanged, and the
    result computes what the input does (onnxruntime, 1e-5)."""
    from onnxbn.fold import fold
    from onnxbn.insert import insert
    from onnxbn.stats import collect_stats
    from onnxbn.torch_import import to_torch
    from onnxbn.torch_import.writeback import write_into

    file_digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    source = Model.open(model_file)
    proto_before = source.proto.SerializeToString()
    x = inputs_for((3, 16, 16), count=8)
    stats = collect_stats(str(model_file), x, after="dense", batch_size=4)
    with_bn = insert(source, stats)
    folded, report = fold(with_bn)
    written = write_into(folded, to_torch(folded))
    assert report.folded == len(report.decisions) > 0
    assert source.proto.SerializeToString() == proto_before
    assert hashlib.sha256(model_file.read_bytes()).hexdigest() == file_digest
    expected = ort_outputs(onnx.load(str(model_file)), x)[0]
    for result in (with_bn, folded, written):
        got = ort_outputs(result.copy().to_proto(), x)[0]
        assert rel_error(expected, got) <= 1e-5


def test_sessions_read_a_models_weights_wherever_they_live(model_file):
    """make_session and open_session (onnxruntime and the reference runtime) of a Model with weights in
    its file, in an array and inline, and of its detached copy, compute what numpy-set weights in
    onnx.load's proto compute (onnxruntime, 1e-6); the Model is left as it was."""
    from onnxbn.runtimes.ort_backend import make_session
    from onnxbn.runtimes.sessions import open_session

    full = onnx.load(str(model_file))
    model = Model.open(model_file)
    name = next(t.name for t in model.proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    changed = numpy_helper.to_array(next(t for t in full.graph.initializer if t.name == name)) * 0.5
    model.set_array(name, changed)
    next(t for t in full.graph.initializer if t.name == name).CopyFrom(numpy_helper.from_array(changed, name))
    x = inputs_for((3, 16, 16), count=4)
    expected = ort_outputs(full, x)[0]
    proto_before, arrays_before = model.proto.SerializeToString(), dict(model.arrays)
    detached = model.detached()
    assert set(detached.arrays) >= set(model.arrays) and detached.folder == model.folder
    runs = [make_session(model, "cpu").run(None, {"input": x})[0],
            make_session(detached, "cpu").run(None, {"input": x})[0],
            open_session(model).run(None, {"input": x})[0],
            open_session(model, "reference").run(None, {"input": x})[0]]
    for got in runs:
        assert rel_error(expected, got) <= 1e-6
    assert model.proto.SerializeToString() == proto_before
    assert model.arrays.keys() == arrays_before.keys() and all(model.arrays[k] is v for k, v in arrays_before.items())
    assert model.folder is not None
