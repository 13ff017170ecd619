"""Model files from anywhere: the wire scanner against protobuf, external data, symlinks, what a
load keeps and refuses, and each command's loading path on hostile and unusual files.

The judges are independent: protobuf's own parser (onnx.load_from_string), onnx.load with its
external data, onnxruntime runs of the original model, and a Python audit hook that records
every file Python opens.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxbn
from onnxbn import cli
from onnxbn.errors import UserError
from onnxbn.io import wire
from onnxbn.io.load import _scan, load_model, load_structure
from tests.models import Net
from tests.oracles import exposed, ort_outputs, rel_error

_OPENED: list[str] | None = None


def _audit(event: str, args) -> None:
    if _OPENED is not None and event in ("open", "os.open") and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # inert unless a test sets _OPENED


def bn_gemm_model(opset: int = 13) -> onnx.ModelProto:
    """Conv-BN-Relu-Flatten-Gemm on 3x8x8 inputs; the Gemm weight (512 x 10 floats, 20 KB) is read by
    `load_structure` as a range of the file, the rest stays inline."""
    n = Net(seed=3)
    y = n.node("Relu", [n.bn(n.conv("input", 3, 8, "conv"), 8, "bn")], "relu")
    y = n.node("Flatten", [y], "flat")
    n.gemm(y, 8 * 8 * 8, 10, "fc", out="logits")
    return n.model({"input": ["N", 3, 8, 8]}, {"logits": ["N", 10]}, opset)


def labelled_npz(path: Path, count: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.standard_normal((count, 3, 8, 8)).astype(np.float32), y=rng.integers(0, 10, count))
    return path


def save_external(model: onnx.ModelProto, path: Path, **options) -> None:
    """Save a copy of `model` with its tensors of 1 KB or more in `m.data` beside `path`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=1024, **options)


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of `onnxbn ARGV` run in this process."""
    capsys.readouterr()
    code = cli.main(["-q", *argv])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


COMMANDS = {  # each command's loading path: argv for a model, the data, and an output path
    "stats": lambda m, d, o: ["stats", m, "--data", d, "--after", "relu", "-o", o + ".npz"],
    "insert": lambda m, d, o: ["insert", m, "--stats", d.replace("data.npz", "stats.npz"), "-o", o],
    "check": lambda m, d, o: ["check", m, m, "--data", d],
    "eval": lambda m, d, o: ["eval", m, "--data", d],
    "fold": lambda m, d, o: ["fold", m, "--random", "4", "-o", o],
    "recalibrate": lambda m, d, o: ["recalibrate", m, "--data", d, "-o", o],
    "finetune": lambda m, d, o: ["finetune", m, "--train", d, "--epochs", "1", "--batch-size", "4", "-o", o],
    "points": lambda m, d, o: ["points", m, "--after", "relu"],
}


@pytest.fixture
def workspace(tmp_path):
    """tmp/model/ (the model's folder), tmp/data/ (inputs and stats), tmp/out/ (outputs), and
    tmp/secret.bin beside them, which no command may open."""
    for name in ("model", "data", "out"):
        (tmp_path / name).mkdir()
    (tmp_path / "secret.bin").write_bytes(np.arange(4096, dtype=np.float32).tobytes())
    labelled_npz(tmp_path / "data" / "data.npz")
    onnx.save(bn_gemm_model(), tmp_path / "data" / "clean.onnx")
    stats_for(tmp_path / "data" / "clean.onnx", tmp_path)
    return tmp_path


def stats_for(model: Path, workspace: Path) -> None:
    """data/stats.npz gathered on `model` (what COMMANDS' insert reads)."""
    assert cli.main(["-q", "stats", str(model), "--data", str(workspace / "data" / "data.npz"), "--after", "relu",
                     "-o", str(workspace / "data" / "stats.npz")]) == 0


# ----------------------------------------------------------------------------- the scanner

def _mutants(data: bytes, count: int, seed: int):
    """`count` seeded damaged copies of `data`: truncated, a bit flipped, a byte inserted or deleted,
    or four bytes overwritten; nine in ten at a byte outside the large weights' data."""
    rng = np.random.default_rng(seed)
    model = onnx.load_from_string(data)
    spans = [(data.index(t.raw_data), len(t.raw_data)) for t in model.graph.initializer
             if t.HasField("raw_data") and len(t.raw_data) > 4096]
    inside = np.zeros(len(data), bool)
    for start, length in spans:
        inside[start:start + length] = True
    framing = np.flatnonzero(~inside)
    for _ in range(count):
        buf = bytearray(data)
        at = int(rng.choice(framing)) if rng.random() < 0.9 else int(rng.integers(len(buf)))
        kind = int(rng.integers(5))
        if kind == 0:
            buf = buf[:at]
        elif kind == 1:
            buf[at] ^= 1 << int(rng.integers(8))
        elif kind == 2:
            buf[at:at] = bytes([int(rng.integers(256))])
        elif kind == 3:
            del buf[at]
        else:
            buf[at:at + 4] = rng.integers(256, size=4, dtype=np.uint8).tobytes()
        yield bytes(buf)


def _scan_bytes(data: bytes) -> onnx.ModelProto:
    """What load_structure's scan makes of `data`: the light model with each left-out raw_data put back."""
    light, offsets = _scan(wire.Source(data), 4096)
    proto = onnx.load_from_string(light)
    for index, (offset, length) in offsets.items():
        proto.graph.initializer[index].raw_data = data[offset:offset + length]
    return proto


def _protobuf(data: bytes) -> onnx.ModelProto | None:
    try:
        return onnx.load_from_string(data)
    except Exception:
        return None


def _scanned(data: bytes) -> onnx.ModelProto | None:
    try:
        return _scan_bytes(data)
    except Exception:
        return None


def _same(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def test_scanner_accepts_and_refuses_what_protobuf_does_on_seeded_mutations():
    """Truncations, flipped, inserted, deleted and overwritten bytes, mostly in the model's framing (the
    20 KB weight is one field; `_mutants`): the scan + the left-out bytes equal protobuf's parse, or both refuse."""
    data = bn_gemm_model().SerializeToString()
    outcomes = {"both accept": 0, "both refuse": 0}
    for i, mutant in enumerate(_mutants(data, 600, seed=21)):
        expected, got = _protobuf(mutant), _scanned(mutant)
        assert (expected is None) == (got is None), f"mutant {i}"
        if expected is not None:
            assert _same(expected, got)
        outcomes["both refuse" if expected is None else "both accept"] += 1
    assert min(outcomes.values()) > 50, outcomes  # both sides of the rule were exercised


def _tag(number: int, wire_type: int) -> bytes:
    return wire.encode_varint(number << 3 | wire_type)


@pytest.mark.parametrize("extra, accepted", [
    (b"\x00\x07", False),  # field number 0
    (bytes([0x88, 0x80, 0x80, 0x80, 0x00, 0x07]), True),  # ir_version's tag in 5 bytes (overlong)
    (bytes([0x88, 0x80, 0x80, 0x80, 0x80, 0x00, 0x07]), False),  # ... in 6
    (bytes([0x08] + [0x80] * 9 + [0x00]), True),  # a 10-byte varint
    (bytes([0x08] + [0x80] * 10 + [0x00]), False),  # an 11-byte one
    (_tag(100, 3) + _tag(1, 0) + b"\x01" + _tag(100, 4), True),  # an unknown group
    (_tag(100, 3) + _tag(101, 4), False),  # a group closed by another number's end
    (_tag(100, 4), False),  # an end without a group
    (_tag(100, 6), False),
    (_tag(100, 3) * 120 + _tag(100, 4) * 120, False),  # groups nested past protobuf's limit
    (_tag(7, 0) + b"\x05", True),  # the graph's number with another wire type: an unknown field
])
def test_scanner_framing_rules_match_protobuf(extra, accepted):
    data = bn_gemm_model().SerializeToString() + extra
    assert (_protobuf(data) is not None) == accepted
    got = _scanned(data)
    assert (got is not None) == accepted
    if accepted:
        assert _same(_protobuf(data), got)


def test_repeated_raw_data_last_one_wins_as_in_protobuf():
    model = bn_gemm_model()
    data = bytearray(model.SerializeToString())
    w = next(t for t in model.graph.initializer if t.name == "fc.W")
    small = numpy_helper.from_array(np.zeros(3, np.float32), "fc.W").raw_data
    # the Gemm weight written again after a big raw_data, with a small raw_data last: protobuf keeps the small one
    tensor = w.SerializeToString() + _tag(9, 2) + wire.encode_varint(len(small)) + small
    graph = model.graph.SerializeToString() + wire.submessage(5, tensor)
    data = model.SerializeToString() + wire.submessage(7, graph)
    assert _same(_protobuf(data), _scan_bytes(data))


# ----------------------------------------------------------------------------- external data

def _with_hostile_entry(model: onnx.ModelProto, location: str) -> onnx.ModelProto:
    """The Gemm weight keeps its inline raw_data (data_location DEFAULT) and gains an external_data
    entry pointing elsewhere, which onnx.load ignores."""
    w = next(t for t in model.graph.initializer if t.name == "fc.W")
    w.external_data.add(key="location", value=location)
    w.external_data.add(key="offset", value="0")
    w.external_data.add(key="length", value=str(len(w.raw_data)))
    return model


@pytest.mark.parametrize("command", ["stats", "insert", "check", "eval", "fold", "recalibrate", "finetune", "points"])
@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_an_external_entry_outside_the_folder_is_refused_and_never_opened(workspace, capsys, command, where):
    global _OPENED
    secret = workspace / "secret.bin"
    location = "../secret.bin" if where == "relative" else str(secret)
    model = workspace / "model" / "m.onnx"
    onnx.save(_with_hostile_entry(bn_gemm_model(), location), model)
    out = workspace / "out" / "result.onnx"
    _OPENED = []
    try:
        code, err = run_cli(COMMANDS[command](str(model), str(workspace / "data" / "data.npz"), str(out)), capsys)
    finally:
        opened, _OPENED = _OPENED, None
    assert code == 2
    assert len(err) == 1 and err[0].startswith("onnxbn: error: ")
    assert ("not a relative path" if where == "absolute" else "outside the model's folder") in err[0]
    assert sorted(os.listdir(workspace / "out")) == []
    assert not [p for p in opened if Path(p).name == "secret.bin"]


def test_symlinked_model_file_in_a_hub_cache_layout(workspace, capsys):
    """snapshots/rev/model.onnx -> ../../blobs/abc: the weights are read from the link's target."""
    (workspace / "model" / "blobs").mkdir()
    (workspace / "model" / "snapshots" / "rev").mkdir(parents=True)
    model = bn_gemm_model()
    onnx.save(model, workspace / "model" / "blobs" / "abc")
    link = workspace / "model" / "snapshots" / "rev" / "model.onnx"
    link.symlink_to(Path("..", "..", "blobs", "abc"))
    data = str(workspace / "data" / "data.npz")
    out = workspace / "out" / "m.onnx"
    for command in ("stats", "check", "eval", "fold", "recalibrate", "insert"):
        code, err = run_cli(COMMANDS[command](str(link), data, str(out)), capsys)
        assert (code, err) == (0, []), command
    x = np.load(data)["x"]
    assert rel_error(ort_outputs(model, x)[0], ort_outputs(onnx.load(out), x)[0]) < 1e-5  # insert's output


def test_the_repositorys_own_symlinked_demo_model(tmp_path, capsys):
    root = Path(__file__).resolve().parents[1]
    link = root / "models" / "demo_vgg.onnx"
    assert link.is_symlink()
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    code, err = run_cli(["stats", str(link), "--data", str(tmp_path / "x.npz"), "-o", str(tmp_path / "s.npz")], capsys)
    assert (code, err) == (0, [])
    code, err = run_cli(["recalibrate", str(link), "--data", str(tmp_path / "x.npz"), "-o", str(tmp_path / "r.onnx")],
                        capsys)
    real = onnx.load(link.resolve())
    assert not any(n.op_type == "BatchNormalization" for n in real.graph.node)
    code_real, err_real = run_cli(["recalibrate", str(link.resolve()), "--data", str(tmp_path / "x.npz"),
                                   "-o", str(tmp_path / "r.onnx")], capsys)
    assert (code, err) == (code_real, err_real) and code == 2  # answered as for the real file: no BN to recalibrate


def test_external_data_without_the_optional_length_key(workspace, capsys):
    model = bn_gemm_model()
    path = workspace / "model" / "m.onnx"
    save_external(model, path)
    stored = onnx.load(path, load_external_data=False)
    for t in stored.graph.initializer:
        kept = [(e.key, e.value) for e in t.external_data if e.key != "length"]
        del t.external_data[:]
        for key, value in kept:
            t.external_data.add(key=key, value=value)
    assert any(t.data_location == TensorProto.EXTERNAL for t in stored.graph.initializer)
    onnx.save(stored, path)
    x = np.load(workspace / "data" / "data.npz")["x"]
    loaded = load_model(path)
    np.testing.assert_array_equal(ort_outputs(loaded, x)[0], ort_outputs(model, x)[0])
    out = workspace / "out" / "f.onnx"
    code, err = run_cli(COMMANDS["fold"](str(path), "", str(out)), capsys)
    assert (code, err) == (0, [])
    assert rel_error(ort_outputs(model, x)[0], ort_outputs(onnx.load(out), x)[0]) < 1e-5


def test_duplicate_keys_and_nul_in_a_location_are_refused(workspace, capsys):
    model = bn_gemm_model()
    path = workspace / "model" / "m.onnx"
    save_external(model, path)
    stored = onnx.load(path, load_external_data=False)
    w = next(t for t in stored.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    w.external_data.add(key="location", value="../secret.bin")
    onnx.save(stored, path)
    with pytest.raises(UserError, match="key 'location' is given twice"):
        load_structure(path)
    del w.external_data[:]
    w.external_data.add(key="location", value="m.data\0x")
    onnx.save(stored, path)
    with pytest.raises(UserError, match="not a relative path"):
        load_structure(path)


# ----------------------------------------------------------------------------- what a load keeps

def _append_unknown(model: onnx.ModelProto) -> bytes:
    """`model`'s bytes with unknown fields 100 (model level) and 200 (graph level)."""
    graph = model.graph.SerializeToString() + _tag(200, 2) + b"\x03abc"
    shell = onnx.ModelProto()
    shell.CopyFrom(model)
    shell.ClearField("graph")
    return shell.SerializeToString() + wire.submessage(7, graph) + _tag(100, 0) + b"\x2a"


@pytest.mark.parametrize("command", ["insert", "fold", "recalibrate"])
def test_unknown_fields_survive_the_commands_that_stream_weights(workspace, capsys, command):
    path = workspace / "model" / "m.onnx"
    path.write_bytes(_append_unknown(bn_gemm_model()))
    original = onnx.load(path)
    assert wire.unknown_fields(original) and wire.unknown_fields(original.graph)
    out = workspace / "out" / "m.onnx"
    stats_for(path, workspace)
    code, err = run_cli(COMMANDS[command](str(path), str(workspace / "data" / "data.npz"), str(out)), capsys)
    assert (code, err) == (0, [])
    written = onnx.load(out)
    assert wire.unknown_fields(written) == wire.unknown_fields(original) == _tag(100, 0) + b"\x2a"
    assert wire.unknown_fields(written.graph) == wire.unknown_fields(original.graph) == _tag(200, 2) + b"\x03abc"


def test_duplicate_initializer_names_are_refused(workspace, capsys):
    model = bn_gemm_model()
    model.graph.initializer.append(numpy_helper.from_array(np.ones((10, 512), np.float32), "fc.W"))
    path = workspace / "model" / "m.onnx"
    onnx.save(model, path)
    for command in ("insert", "stats", "fold"):
        code, err = run_cli(COMMANDS[command](str(path), str(workspace / "data" / "data.npz"),
                                              str(workspace / "out" / "m.onnx")), capsys)
        assert code == 2 and len(err) == 1 and "initializer 'fc.W' is given twice" in err[0]
    assert os.listdir(workspace / "out") == []


def test_an_unnamed_large_initializer_keeps_its_data(workspace, capsys):
    model = bn_gemm_model()
    unnamed = np.random.default_rng(5).standard_normal(2048).astype(np.float32)  # 8 KB, read by no node
    model.graph.initializer.append(numpy_helper.from_array(unnamed, ""))
    path = workspace / "model" / "m.onnx"
    onnx.save(model, path)
    out = workspace / "out" / "m.onnx"
    stats_for(path, workspace)
    code, err = run_cli(COMMANDS["insert"](str(path), str(workspace / "data" / "data.npz"), str(out)), capsys)
    assert (code, err) == (0, [])
    kept = [numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer if t.name == ""]
    assert len(kept) == 1
    np.testing.assert_array_equal(kept[0], unnamed)


def _model_with_constant_and_subgraph() -> onnx.ModelProto:
    """logits = If(cond, then: Add(gemm, c_then), else: Add(gemm, c_else)) + Constant k, the
    constants 4 KB each, so they go to external data."""
    rng = np.random.default_rng(9)
    n = Net(seed=4)
    y = n.gemm(n.node("Flatten", ["input"], "flat"), 192, 1024, "fc")
    k = numpy_helper.from_array(rng.standard_normal(1024).astype(np.float32), "k")
    n.nodes.append(helper.make_node("Constant", [], ["k"], value=k))
    branches = {}
    for name in ("then", "else"):
        c = numpy_helper.from_array(rng.standard_normal(1024).astype(np.float32), f"c_{name}")
        branches[name] = helper.make_graph([helper.make_node("Add", [y, f"c_{name}"], [f"o_{name}"])], name, [],
                                           [helper.make_tensor_value_info(f"o_{name}", TensorProto.FLOAT, None)],
                                           initializer=[c])
    n.init("cond", np.array(True), dtype=np.bool_)
    n.nodes.append(helper.make_node("If", ["cond"], ["branch"], then_branch=branches["then"],
                                    else_branch=branches["else"]))
    n.node("Add", ["branch", "k"], "logits")
    return n.model({"input": ["N", 3, 8, 8]}, {"logits": ["N", 1024]}, 13)


def test_constant_and_subgraph_tensors_stored_externally_move_with_the_output(workspace, capsys):
    model = _model_with_constant_and_subgraph()
    path = workspace / "model" / "m.onnx"
    save_external(model, path, convert_attribute=True)
    stored = onnx.load(path, load_external_data=False)
    assert stored.graph.node[2].attribute[0].t.data_location == TensorProto.EXTERNAL  # the Constant's tensor
    out = workspace / "out" / "f.onnx"
    code, err = run_cli(COMMANDS["fold"](str(path), "", str(out)), capsys)
    assert (code, err) == (0, [])
    (workspace / "model" / "m.data").rename(workspace / "model" / "gone.data")  # the output must not need it
    x = np.load(workspace / "data" / "data.npz")["x"]
    np.testing.assert_array_equal(ort_outputs(onnx.load(out), x)[0], ort_outputs(model, x)[0])


def test_sparse_initializer_models_run_through_check_fold_and_eval(workspace, capsys):
    model = bn_gemm_model()
    bias = next(t for t in model.graph.initializer if t.name == "fc.b")
    values = numpy_helper.to_array(bias)
    model.graph.initializer.remove(bias)
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(
        numpy_helper.from_array(values, "fc.b"), numpy_helper.from_array(np.arange(10, dtype=np.int64), ""), [10]))
    path = workspace / "model" / "m.onnx"
    onnx.save(model, path)
    data = str(workspace / "data" / "data.npz")
    for command in ("check", "eval", "fold"):
        code, err = run_cli(COMMANDS[command](str(path), data, str(workspace / "out" / "f.onnx")), capsys)
        assert (code, err) == (0, []), command
    x = np.load(data)["x"]
    assert rel_error(ort_outputs(model, x)[0], ort_outputs(onnx.load(workspace / "out" / "f.onnx"), x)[0]) < 1e-5


# ----------------------------------------------------------------------------- damaged files

def test_a_zero_filled_file_is_refused_after_reading_its_first_bytes(tmp_path, monkeypatch):
    path = tmp_path / "download.onnx"
    with open(path, "wb") as fh:
        fh.truncate(256 << 20)  # a sparse file of zeros: what a download that never arrived leaves
    reads = []
    real_read = wire.Source.read
    monkeypatch.setattr(wire.Source, "read", lambda self, pos, n: reads.append(n) or real_read(self, pos, n))
    with pytest.raises(UserError, match="not a readable ONNX model"):
        load_structure(path)
    assert sum(reads) <= 16


def test_a_file_truncated_while_it_is_scanned_is_an_error_not_a_signal(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    onnx.save(bn_gemm_model(), path)
    real_read = wire.Source.read
    monkeypatch.setattr(wire, "_WINDOW", 16)  # many reads, so the file shrinks in the middle of the scan

    def read_then_truncate(self, pos, n):
        chunk = real_read(self, pos, n)
        os.truncate(path, 100)
        return chunk
    monkeypatch.setattr(wire.Source, "read", read_then_truncate)
    with pytest.raises(UserError, match="not a readable ONNX model"):
        load_structure(path)


@pytest.mark.parametrize("damage, message", [
    (lambda m: setattr(m.graph.initializer[0], "data_type", 99), "unknown data type 99"),
    (lambda m: m.graph.initializer[0].dims.append(2), "holds 864 bytes where its dims [8, 3, 3, 3, 2] need 1728"),
    (lambda m: setattr(m.graph.output[0].type.tensor_type, "elem_type", 77), "unknown element type 77"),
])
def test_damaged_tensors_are_one_line_errors(workspace, capsys, damage, message):
    model = bn_gemm_model()
    damage(model)
    path = workspace / "model" / "m.onnx"
    path.write_bytes(model.SerializeToString())
    code, err = run_cli(COMMANDS["check"](str(path), str(workspace / "data" / "data.npz"), ""), capsys)
    assert code == 2 and len(err) == 1 and message in err[0] and "unexpectedly" not in err[0]


def test_a_name_that_is_not_utf8_is_a_one_line_error(workspace, capsys):
    data = bn_gemm_model().SerializeToString().replace(b"relu", b"r\xffl\xfe")
    path = workspace / "model" / "m.onnx"
    path.write_bytes(data)
    code, err = run_cli(COMMANDS["stats"](str(path), str(workspace / "data" / "data.npz"), ""), capsys)
    assert code == 2 and len(err) == 1 and "not valid UTF-8" in err[0]


# ----------------------------------------------------------------------------- fuzzing every command

def test_fuzzed_model_files_through_every_commands_loading_path(workspace, capsys):
    """Every outcome is exit 0, exit 1 (check: a real difference), or exit 2 with one onnxbn line that
    is not the crash-report line; a failed command leaves nothing in the output folder; no command
    opens a file outside the model's, the data's and the output's folders."""
    global _OPENED
    model, out_dir = workspace / "model" / "m.onnx", workspace / "out"
    save_external(bn_gemm_model(), model)  # leaves m.data in the model's folder for the third base
    bases = [bn_gemm_model().SerializeToString(),
             _with_hostile_entry(bn_gemm_model(), "../secret.bin").SerializeToString(), model.read_bytes()]
    data = str(workspace / "data" / "data.npz")
    allowed = [(workspace / name).resolve() for name in ("model", "data", "out")]
    codes: dict[int, int] = {}
    commands = list(COMMANDS)
    for i, mutant in enumerate(m for seed, base in enumerate(bases) for m in _mutants(base, 500, seed)):
        command = commands[i % len(commands)]
        model.write_bytes(mutant)
        for leftover in out_dir.iterdir():
            leftover.unlink()
        _OPENED = []
        try:
            code, err = run_cli(COMMANDS[command](str(model), data, str(out_dir / "result.onnx")), capsys)
        finally:
            opened, _OPENED = _OPENED, None
        codes[code] = codes.get(code, 0) + 1
        where = f"mutant {i} through {command}: exit {code}, {err}"
        assert code in (0, 2) or (code == 1 and command == "check"), where
        if code == 2:
            assert len(err) == 1 and err[0].startswith("onnxbn: error: ") and "unexpectedly" not in err[0], where
            assert list(out_dir.iterdir()) == [], where
        under_tmp = [Path(p).resolve() for p in opened if Path(p).resolve().is_relative_to(workspace)]
        assert all(any(p.is_relative_to(a) for a in allowed) for p in under_tmp), where
    assert codes.get(0, 0) > 20 and codes.get(2, 0) > 20, codes  # both kinds of outcome were exercised


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
        (r,) = exposed(onnx.load(path), ["r"], x)
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
