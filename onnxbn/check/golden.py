"""Golden outputs: a reference model's outputs stored once, to check candidates against without the model.

Two layouts, chosen by the path: a file ending in `.npz` (onnxbn's), anything else a folder in
ONNX's test-data layout.

`.npz`: `output_<k>` (N, ...) the k-th output of every sample, in the reference's output order;
`input_sha256` (N, 32) uint8, each sample's digest (below); `meta`, JSON: format
`onnxbn-golden/1`, `outputs` (names), `input` (name, dtype, shape past the first axis),
`samples`, `inputs_sha256` (sha256 of the per-sample digests in order), `data` (where the
inputs came from), `model` and `model_sha256` (io.copies.model_sha256: graph and weights,
metadata excluded), `runtime` (the reference side's runtime, version, device and precision).
It is written uncompressed and streamed: each batch's outputs are appended to a temporary
file per output (and one for the digests) next to the target, and the archive is assembled
from those files 64 KiB at a time, so memory holds one batch whatever the data size. It is
read memory-mapped, a batch's rows (and their digests) at a time.

Folder: `test_data_set_<i>/input_0.pb` and `output_<k>.pb` (TensorProto files, one set per
batch when onnxbn writes them), the layout of the ONNX model zoo and of onnx's backend test
data, plus `onnxbn.json` holding the meta above when onnxbn wrote it. Such a folder is read
whole (they hold a few samples): the sets are joined along the first axis (data.sources.concat_sets),
output_<k> is the model's k-th output, and its inputs are the data to compare on.

A sample's digest is sha256(dtype + shape past the first axis + its bytes in C order), so the
data's digest does not depend on how it was batched; a candidate is compared only on inputs
whose digests equal the stored ones (`checked_batches`); `recorded_runtime` reads back the
runtime and precision that made the outputs, which set the tolerance defaults.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxbn.data.sources import _mmap_npz, concat_sets, read_tensors, read_test_inputs, test_data_sets
from onnxbn.errors import UserError
from onnxbn.feeding import run_batches
from onnxbn.io.model import Model
from onnxbn.io.save import atomic_path, refuse_overwrite
from onnxbn.io.tensors import FileRange, file_chunks
from onnxbn.runtimes.precision import RuntimeInfo, model_precision

FORMAT = "onnxbn-golden/1"
META_FILE = "onnxbn.json"  # the meta beside the sets of a test-data folder onnxbn wrote


def sample_digests(x: np.ndarray) -> np.ndarray:
    """(len(x), 32) uint8: sha256 of each sample's dtype, shape past the first axis and bytes."""
    header = f"{x.dtype.str}{tuple(x.shape[1:])}".encode()
    x = np.ascontiguousarray(x)
    return np.array([np.frombuffer(hashlib.sha256(header + row.tobytes()).digest(), np.uint8) for row in x],
                    dtype=np.uint8).reshape(len(x), 32)


def digest_of(digests: np.ndarray) -> str:
    """The data's digest: sha256 of its samples' digests in order."""
    return hashlib.sha256(np.ascontiguousarray(digests, dtype=np.uint8).tobytes()).hexdigest()


def is_npz(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".npz")


class GoldenWriter:
    """Streams a reference's outputs, batch by batch, into golden outputs at `path` (a context manager).

    `add(x, outputs)` takes one batch's inputs and outputs (in `names` order); `commit(meta)`
    writes the file or folder (meta gets `format`, `outputs`, `input`, `samples` and
    `inputs_sha256` added). Leaving the block without a commit removes every temporary file, so
    nothing is half-written; an existing `path` is refused (an input, or a folder, always)."""

    def __init__(self, path: str | os.PathLike, names: list[str], input_name: str, inputs=(), force: bool = False):
        self.path, self.names, self.input_name = Path(path), list(names), input_name
        self.npz = is_npz(path)
        if not self.path.parent.exists():
            raise UserError(f"{self.path.parent}: output folder does not exist; create it first")
        if self.npz:
            refuse_overwrite(self.path, inputs, force)
            if self.path.is_dir():
                raise UserError(f"{self.path} is a folder; give a file path ending in .npz")
        elif self.path.exists():
            raise UserError(f"{self.path} exists; golden outputs in ONNX's test-data layout go to a new folder "
                            "(remove it, or name another)")
        self.stage = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent))
        self.samples, self.sets = 0, 0
        self.inputs_hash = hashlib.sha256()  # digest_of, fed a batch at a time
        self.layout: dict[str, tuple[np.dtype, tuple]] = {}  # name -> (dtype, shape past the first axis)

    def add(self, x: np.ndarray, outputs: list[np.ndarray]) -> None:
        for key, value in zip(["input", *self.names], [x, *outputs], strict=True):
            value = np.asarray(value)
            if value.dtype.kind in "OSUV" or value.ndim == 0:
                raise UserError(f"golden outputs hold numeric tensors with a batch axis; {key!r} is "
                                f"{value.dtype} {value.shape}")
            want = self.layout.setdefault(key, (value.dtype, value.shape[1:]))
            if want != (value.dtype, value.shape[1:]) and self.npz:
                raise UserError(f"{key!r} is {value.dtype} {value.shape[1:]} per sample in one batch and {want[0]} "
                                f"{want[1]} in another; the .npz layout keeps one shape per output: save to a "
                                "folder (ONNX test-data layout, one set per batch) instead")
        digests = sample_digests(x)
        self.inputs_hash.update(digests.tobytes())
        if self.npz:
            for k, value in enumerate([digests, *outputs]):
                with open(self.stage / f"{k}.raw", "ab") as fh:
                    fh.write(np.ascontiguousarray(value).reshape(-1).view(np.uint8).data)
        else:
            folder = self.stage / f"test_data_set_{self.sets}"
            folder.mkdir()
            (folder / "input_0.pb").write_bytes(numpy_helper.from_array(np.asarray(x), self.input_name)
                                                .SerializeToString())
            for k, (name, out) in enumerate(zip(self.names, outputs, strict=True)):
                (folder / f"output_{k}.pb").write_bytes(numpy_helper.from_array(np.asarray(out), name)
                                                        .SerializeToString())
        self.samples += len(x)
        self.sets += 1

    def commit(self, meta: dict) -> dict:
        if not self.samples:
            raise UserError("no sample was run: no golden outputs to write")
        dtype, shape = self.layout["input"]
        meta = {**meta, "format": FORMAT, "outputs": self.names, "samples": self.samples,
                "inputs_sha256": self.inputs_hash.hexdigest(),
                "input": {"name": self.input_name, "dtype": dtype.str, "shape": list(shape)}}
        if not self.npz:
            (self.stage / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
            os.rename(self.stage, self.path)  # fails rather than replace a folder made meanwhile
            return meta
        with atomic_path(self.path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            members = [("input_sha256", (np.dtype(np.uint8), (32,)))]
            members += [(f"output_{k}", self.layout[name]) for k, name in enumerate(self.names)]
            for k, (member, (dtype, shape)) in enumerate(members):
                raw = self.stage / f"{k}.raw"
                with zf.open(f"{member}.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array_header_2_0(fh, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                              "fortran_order": False, "shape": (self.samples, *shape)})
                    for chunk in file_chunks(FileRange(raw, 0, raw.stat().st_size), size=1 << 16):
                        fh.write(chunk)
            with zf.open("meta.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.array(json.dumps(meta, sort_keys=True)), allow_pickle=False)
        return meta

    def __enter__(self) -> "GoldenWriter":
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)


class GoldenOutputs:
    """Golden outputs read from `path` (see `load_outputs`): `meta`, `names`, `samples`,
    `digests` (N, 32), `input_dtype`, `rows(begin, end)` (the outputs of those samples, in `names`
    order), `inputs` (a test-data folder's inputs, else None)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.inputs: np.ndarray | None = None
        if not self.path.exists():
            raise UserError(f"{self.path}: no such golden outputs file or folder")
        if self.path.is_dir():
            self._read_folder()
        else:
            self._read_npz()
        self.samples = len(self.digests)
        self.input_dtype = np.dtype(self.meta["input"]["dtype"]) if self.meta or self.inputs is None \
            else self.inputs.dtype

    def _read_npz(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                self.meta = json.loads(str(npz["meta"])) if "meta" in npz.files else {}
                if self.meta.get("format") != FORMAT:
                    raise UserError(f"{self.path}: not onnxbn golden outputs (format {self.meta.get('format')!r}); "
                                    "write them with `onnxbn check REF --data X --save-outputs FILE.npz`")
                digests = _mmap_npz(self.path, "input_sha256")
                self.digests = npz["input_sha256"] if digests is None else digests
                self.names = list(self.meta["outputs"])
                arrays = [_mmap_npz(self.path, f"output_{k}") for k in range(len(self.names))]
                self._arrays = [npz[f"output_{k}"] if a is None else a for k, a in enumerate(arrays)]
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"{self.path}: not readable golden outputs ({type(exc).__name__}: {exc})") from exc

    def _read_folder(self) -> None:
        sets = test_data_sets(self.path)
        if not sets:
            raise UserError(f"{self.path}: no test_data_set_<i> folders in it (ONNX's test-data layout), and golden "
                            "outputs in a file end in .npz")
        self.inputs = read_test_inputs(self.path)
        outputs = [read_tensors(s, "output") for s in sets]
        counts = {len(o) for o in outputs}
        if len(counts) != 1 or not outputs[0]:
            raise UserError(f"{self.path}: the sets hold {sorted(counts)} outputs each; every set needs the same "
                            "output_<k>.pb files")
        self._arrays = [concat_sets([o[k] for o in outputs], f"{self.path} output_{k}") for k in range(counts.pop())]
        meta_file = self.path / META_FILE
        self.meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        self.names = self.meta.get("outputs") or [None] * len(self._arrays)  # None: the model's k-th output
        self.digests = sample_digests(self.inputs)
        if self.meta and self.meta.get("inputs_sha256") != digest_of(self.digests):
            raise UserError(f"{self.path}: its inputs no longer match the digest {META_FILE} holds; the folder "
                            "was changed after it was written")

    def summary(self) -> dict:
        """Where these outputs came from, for a report: path, origin (one line) and the stored provenance."""
        keys = ("model", "model_sha256", "inputs_sha256", "samples", "data", "runtime")
        if not self.meta:
            return {"path": str(self.path), "origin": "ONNX test data; the model and runtime that made it are not "
                    "recorded", "samples": self.samples, "inputs_sha256": digest_of(self.digests)}
        rt = self.meta["runtime"]
        origin = (f"{self.meta['model']} sha256 {self.meta['model_sha256'][:16]} on {rt['runtime']} {rt['version']}, "
                  f"{rt['device']}, {rt['precision']}")
        return {"path": str(self.path), "origin": origin, **{k: self.meta[k] for k in keys if k in self.meta}}

    def rows(self, begin: int, end: int) -> list[np.ndarray]:
        return [np.asarray(a[begin:end]) for a in self._arrays]

    def output_names(self, model: onnx.ModelProto) -> list[str]:
        """The golden outputs' names: stored ones, or the model's first outputs by position (a folder without
        onnxbn's meta); a UserError when the model lacks one or the counts differ."""
        model_names = [o.name for o in model.graph.output]
        stored = [n for n in self.names if n is not None]
        if len(stored) != len(self.names):
            if len(model_names) != len(self.names):
                raise UserError(f"{self.path}: holds {len(self.names)} outputs per set, the candidate has "
                                f"{len(model_names)}; output_<k>.pb is compared with the model's k-th output")
            return model_names
        missing = [n for n in stored if n not in model_names]
        if missing:
            raise UserError(f"the candidate has no output {missing[0]!r}; the golden outputs hold "
                            f"{', '.join(stored)}")
        return stored


def load_outputs(path: str | os.PathLike) -> GoldenOutputs:
    """Golden outputs from a `.npz` written by `save_outputs` (or `onnxbn check --save-outputs`), or from a
    folder in ONNX's test-data layout; pass the result to `onnxbn.compare` as the reference."""
    return GoldenOutputs(path)


def golden_meta(reference, model: Model, info: RuntimeInfo, description: str, dataset) -> dict:
    """What golden outputs record about where they came from (onnxbn.check.golden)."""
    return {"model": str(reference) if isinstance(reference, (str, os.PathLike)) else "<model>",
            "model_sha256": model.sha256(), "runtime": info.to_dict(), "data": description,
            "skipped": len(dataset.skipped)}


def recorded_runtime(golden: GoldenOutputs, candidate: onnx.ModelProto) -> RuntimeInfo:
    """The runtime that made golden outputs, from their meta; for ONNX test data, which does not record
    it, an f32 reference of unknown runtime."""
    stored = golden.meta.get("runtime")
    if stored:
        return RuntimeInfo(**{k: stored[k] for k in RuntimeInfo.__dataclass_fields__ if k in stored})
    return RuntimeInfo("unrecorded", "", "unrecorded", "f32", "default", model_precision(candidate),
                       note=f"{golden.path} does not record the runtime that made its outputs")


def checked_batches(golden: GoldenOutputs, session, dataset, names: list[str], model: onnx.ModelProto,
                    batch_size: int, workers: int, strict: bool):
    """(x, golden outputs, candidate outputs) batch by batch; a UserError as soon as a sample's digest
    differs from the stored one or the data runs past the stored samples."""
    seen = 0
    made_from = f"{golden.meta.get('data') or golden.path}, {golden.samples} samples"
    for x, _, outputs in run_batches(session, dataset, names, model, batch_size, workers=workers, strict=strict,
                                     desc="check"):
        end = seen + len(x)
        if end > golden.samples:
            raise UserError(f"{dataset.description}: holds more samples than the {golden.samples} the golden outputs "
                            f"{golden.path} were made from ({made_from}); give the same data")
        differ = np.flatnonzero((sample_digests(x) != golden.digests[seen:end]).any(axis=1))
        if len(differ):
            raise UserError(f"{dataset.description}: sample {seen + int(differ[0])} differs from the input the golden "
                            f"outputs {golden.path} were made from ({made_from}; inputs sha256 "
                            f"{golden.meta.get('inputs_sha256', 'of its inputs')[:16]}); give the same data "
                            "(and --limit, --seed, --preset)")
        yield x, golden.rows(seen, end), outputs
        seen = end
