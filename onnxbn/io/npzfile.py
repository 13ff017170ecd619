"""The per-tensor `.npz` files onnxbn writes (stats, ranges): one layout, atomic writes, one-line errors.

Layout: `tensors` (the names), `meta` (JSON, with a `format` string that names the kind of file),
and per tensor i the arrays `{key}_{i}` of its row.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
from numpy.lib.npyio import NpzFile

from onnxbn.errors import UserError
from onnxbn.io.save import atomic_path, refuse_overwrite

Row = TypeVar("Row")


def write_rows(path: str | os.PathLike, meta: dict, rows: dict[str, dict[str, np.ndarray]], inputs=(),
               force: bool = False) -> Path:
    """Write `rows` ({tensor: {key: array}}) and `meta` to `path` atomically; an input is never overwritten."""
    path = Path(path)
    refuse_overwrite(path, inputs, force)
    arrays = {"tensors": np.array(list(rows), dtype=str), "meta": np.array(json.dumps(meta, sort_keys=True))}
    for i, row in enumerate(rows.values()):
        arrays.update({f"{key}_{i}": value for key, value in row.items()})
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, allow_pickle=True, **arrays)  # numpy's default, named so **arrays cannot fill it
    return path


def format_of(path: str | os.PathLike) -> str | None:
    """The `format` a file's meta names, or None for a file that is not one of these."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return json.loads(str(npz["meta"])).get("format")
    except Exception:
        return None


def read_rows(path: str | os.PathLike, file_format: str, kind: str, row: Callable[[NpzFile, int], Row], *,
              format_hint: str = "", readable_hint: str = "") -> tuple[dict[str, Row], dict]:
    """({tensor: row(npz, i)}, meta) of a file of `file_format`; a UserError naming `kind` ("stats file")
    for a missing, foreign or unreadable file, the hints appended to those messages."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such {kind}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            if meta.get("format") != file_format:
                raise UserError(f"{path}: not an onnxbn {kind} (format {meta.get('format')!r}){format_hint}")
            rows = {name: row(npz, i) for i, name in enumerate(npz["tensors"].tolist())}
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{path}: not a readable onnxbn {kind} ({type(exc).__name__}){readable_hint}") from exc
    return rows, meta
