"""Calibration tables exported from onnxbn's ranges (onnxbn.calibration_tables), read back and judged by numpy
on the activations of a plain onnxruntime session (never by the code under test)."""

from __future__ import annotations

import json
import struct

import numpy as np
import onnx
import pytest
from test_quantize import exposed, float_tensors

from models import inputs_for, small_cnn
from onnxbn.cli import main


@pytest.fixture
def files(tmp_path):
    onnx.save(small_cnn(), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "cal.npz", x=inputs_for([3, 8, 8], 40, seed=21))
    return tmp_path


def numpy_ranges(files) -> dict[str, tuple[np.float32, np.float32]]:
    model = onnx.load(str(files / "m.onnx"))
    names = float_tensors(model)
    values = exposed(model, names, np.load(files / "cal.npz")["x"])
    return {n: (np.float32(min(v.min(), 0)), np.float32(max(v.max(), 0))) for n, v in values.items()}


def stats(files, capsys, *extra) -> tuple[int, str]:
    code = main([str(a) for a in ("stats", files / "m.onnx", "--data", files / "cal.npz", "--ranges", *extra)])
    return code, capsys.readouterr().err


def read_tensorrt(path) -> tuple[str, dict[str, np.float32]]:
    header, *lines = path.read_text().splitlines()
    scales = {}
    for line in lines:
        name, _, digits = line.rpartition(": ")
        assert len(digits) == 8
        scales[name] = np.float32(struct.unpack(">f", bytes.fromhex(digits))[0])
    return header, scales


def test_tensorrt_cache_holds_amax_over_127_big_endian(files, capsys):
    assert stats(files, capsys, "--export-table", "tensorrt", "-o", files / "calib.cache")[0] == 0
    header, scales = read_tensorrt(files / "calib.cache")
    assert header.startswith("TRT-") and header.endswith("-EntropyCalibration2")
    expected = numpy_ranges(files)
    assert list(scales) == list(expected)
    for name, (lo, hi) in expected.items():
        assert scales[name] == np.float32(max(-float(lo), float(hi)) / 127.0), name
    assert not (files / "calib.cache.checkpoint.npz").exists()


def test_ort_table_equals_what_onnxruntime_writes_for_these_ranges(files, capsys):
    from onnxruntime.quantization.CalTableFlatBuffers.TrtTable import TrtTable

    out = files / "table"
    assert stats(files, capsys, "--export-table", "ort", "-o", out)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["calibration.cache", "calibration.flatbuffers", "calibration.json"]
    expected = numpy_ranges(files)
    table = json.loads((out / "calibration.json").read_text())
    assert set(table) == set(expected)
    for name, (lo, hi) in expected.items():
        assert table[name]["lowest"]["data"] == float(lo) and table[name]["highest"]["data"] == float(hi), name
        assert table[name]["lowest"]["dtype"] == "float32"
    # the text and flatbuffers tables: str(max(highest, lowest)) per tensor, keys sorted
    text = dict(line.rsplit(" ", 1) for line in (out / "calibration.cache").read_text().splitlines())
    flat = TrtTable.GetRootAsTrtTable((out / "calibration.flatbuffers").read_bytes(), 0)
    entries = {flat.Dict(i).Key().decode(): flat.Dict(i).Value().decode() for i in range(flat.DictLength())}
    for name, (lo, hi) in expected.items():
        assert text[name] == entries[name] == str(max(float(hi), float(lo))), name


def test_percentile_table_clips_inner_tensors_and_keeps_the_outputs_min_max(files, capsys):
    assert stats(files, capsys, "--export-table", "tensorrt", "--method", "percentile", "--percentile", "99",
                 "-o", files / "p.cache")[0] == 0
    _, scales = read_tensorrt(files / "p.cache")
    expected = numpy_ranges(files)
    model = onnx.load(str(files / "m.onnx"))
    values = exposed(model, ["c1", "logits"], np.load(files / "cal.npz")["x"])
    lo, hi = expected["logits"]
    assert scales["logits"] == np.float32(max(-float(lo), float(hi)) / 127.0)  # an output: min/max kept
    # c1 at the 99th percentile: within one histogram bin (max|c1| / 1024 at most) of numpy's quantile of c1
    c1 = values["c1"].astype(np.float64)
    amax = max(np.quantile(c1, 0.99), -np.quantile(c1, 0.01))
    assert abs(float(scales["c1"]) * 127 - amax) <= np.abs(c1).max() / 1024 + 1e-6
    assert float(scales["c1"]) * 127 < np.abs(c1).max()


@pytest.mark.parametrize("case", ["no-ranges", "ort-onto-a-file", "method-without-table"])
def test_export_refusals_exit_2_one_line_nothing_written(files, capsys, case):
    target = files / "t"
    if case == "no-ranges":
        code = main([str(a) for a in ("stats", files / "m.onnx", "--data", files / "cal.npz", "--export-table",
                                      "tensorrt", "-o", target)])
        err = capsys.readouterr().err
    elif case == "ort-onto-a-file":
        target.write_text("keep")
        code, err = stats(files, capsys, "--export-table", "ort", "-o", target)
    else:
        code, err = stats(files, capsys, "--method", "entropy", "-o", target)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("onnxbn: error: ")
    assert (target.read_text() == "keep") if case == "ort-onto-a-file" else not target.exists()
    assert [p.name for p in files.iterdir() if p.name not in ("m.onnx", "cal.npz", "t")] == []
