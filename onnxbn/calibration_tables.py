"""Calibration tables for other toolchains, written from onnxbn's ranges (`onnxbn stats --ranges --export-table`).

Each tensor's (lo, hi) is `onnxbn.ranges.choose_ranges` of the ranges (the method's threshold; the
model's outputs keep min/max). Two formats:

ort       a folder holding what onnxruntime.quantization.quant_utils.write_calibration_table writes
          (it is called to write them): calibration.json ({tensor: TensorData with lowest, highest}),
          calibration.flatbuffers (TrtTable: key tensor, value str(max(hi, lo))) and calibration.cache
          (lines "tensor max(hi, lo)"); onnxruntime's TensorRT provider reads the flatbuffers table
          (trt_int8_calibration_table_name).
tensorrt  TensorRT's INT8 calibration cache (IInt8EntropyCalibrator2's readCalibrationCache text):
          the header line "TRT-<TRT_VERSION>-EntropyCalibration2", then one line per tensor
          "name: <hex>", hex the 8 digits of the big-endian float32 scale = amax / 127,
          amax = max(|lo|, |hi|) (symmetric int8, the only kind TensorRT uses for activations).

Both are staged next to the destination and renamed into place only when complete.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from onnxbn.errors import UserError
from onnxbn.io.save import atomic_path, refuse_overwrite
from onnxbn.ranges import Ranges, choose_ranges, load_ranges

TABLE_FORMATS = ("ort", "tensorrt")
ORT_FILES = ("calibration.json", "calibration.flatbuffers", "calibration.cache")
TRT_VERSION = 8601  # TensorRT 8.6.1's header; TensorRT reads the scales of a cache from another version too


def tensorrt_scale_hex(lo: float, hi: float) -> str:
    """The 8 hex digits of float32(max(|lo|, |hi|) / 127), big-endian, as TensorRT's cache writes them."""
    return struct.pack(">f", np.float32(max(abs(lo), abs(hi)) / 127.0)).hex()


def write_tensorrt_cache(ranges: dict[str, tuple[float, float]], path: str | os.PathLike) -> Path:
    lines = [f"TRT-{TRT_VERSION}-EntropyCalibration2"] + [f"{name}: {tensorrt_scale_hex(lo, hi)}"
                                                          for name, (lo, hi) in ranges.items()]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return Path(path)


def write_ort_table(ranges: dict[str, tuple[float, float]], folder: str | os.PathLike) -> Path:
    """onnxruntime's three calibration files in `folder` (created; existing files of those names replaced)."""
    from onnxruntime.quantization.calibrate import TensorData
    from onnxruntime.quantization.quant_utils import write_calibration_table

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: --export-table ort writes a folder of {len(ORT_FILES)} files and this is a file; "
                        "give a folder path with -o")
    if not folder.parent.exists():
        raise UserError(f"{folder.parent}: output folder does not exist; create it first")
    table = {name: TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
             for name, (lo, hi) in ranges.items()}
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.", dir=folder.parent) as tmp:
        write_calibration_table(table, dir=tmp)
        folder.mkdir(exist_ok=True)
        for name in ORT_FILES:
            os.replace(Path(tmp) / name, folder / name)
    return folder


def export_table(ranges: Ranges | str | os.PathLike, table_format: str, path: str | os.PathLike, *,
                 method: str = "minmax", percentile: float = 99.99, inputs=(), force: bool = False) -> Path:
    """Write the calibration table of `ranges` (a Ranges or a ranges file) in `table_format` ("ort": a folder,
    "tensorrt": a file) at `path`; see the module docstring. An input is never overwritten."""
    if table_format not in TABLE_FORMATS:
        raise UserError(f"--export-table: unknown format {table_format!r}: use {' or '.join(TABLE_FORMATS)}")
    refuse_overwrite(path, inputs, force)
    found = load_ranges(ranges)
    chosen = choose_ranges(found, list(found.tensors), method, percentile)
    return (write_ort_table if table_format == "ort" else write_tensorrt_cache)(chosen, path)
