"""ONNX backend node test cases through onnxbn's torch importer (and onnx2torch, side by side).

Usage: python tools/conformance.py [--no-onnx2torch] [--failures] [-o CONFORMANCE.md]

For the onnx2torch column, install it apart from the project (it is no dependency of onnxbn),
e.g. `pip install --no-deps --target /tmp/o2t onnx2torch` and run with PYTHONPATH=/tmp/o2t.

The cases are onnx's own backend node tests (`onnx.backend.test.case.node.collect_testcases`,
the generator of onnx/backend/test/data/node: each a model plus input and expected output
arrays). A case counts for onnxbn when every op of its graph is in `SUPPORTED_OPS`; it is
attributed to the op its test exercises (an `_expanded` case to its unexpanded twin's op).
Cases below opset 9 (onnxbn's oldest) run after onnx.version_converter brings them to
opset 9, the step onnxbn's refusal of such a model asks for. Each case ends as:
  pass     to_torch(model).eval()(*inputs) equals every expected output: same dtype and shape,
           values within the case's rtol/atol (onnx's runner: 1e-3 / 1e-7);
  refused  to_torch raised onnxbn's UserError (an op, attribute value or type it declines);
  fail     anything else (a wrong value, or an exception that is not a clean refusal);
  random   not comparable: the expected output is a draw from numpy's RNG (RANDOM).
onnx2torch, when importable, runs the same cases through `onnx2torch.convert` and is
judged the same way (any exception while converting counts as refused). It needs
torchvision only for its NonMaxSuppression/RoiAlign converters, so where torchvision is
missing the tool stands in an empty `torchvision` module (none of these cases use them).
Prints a markdown table per op and the totals.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import types
import warnings
from collections import defaultdict
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxbn.errors import UserError  # noqa: E402
from onnxbn.graph import MIN_OPSET, opset_version  # noqa: E402
from onnxbn.torch_import import SUPPORTED_OPS, to_torch  # noqa: E402

OLD_OPSET = 16  # onnx2torch's converters are registered for opsets up to about here

# cases whose expected outputs come from numpy's random generator: no importer can reproduce them
RANDOM = {name: "Dropout with training_mode=True and ratio > 0 draws its mask from numpy's RNG"
          for name in ("test_training_dropout", "test_training_dropout_default",
                       "test_training_dropout_default_mask", "test_training_dropout_mask")}


def all_cases():
    """Every node test case that has a model, sorted by name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from onnx.backend.test.case.node import collect_testcases
        cases = collect_testcases(None)
    return sorted((c for c in cases if c.model is not None), key=lambda c: c.name)


def case_op(case, by_name: dict) -> str:
    """The op a case tests: its single node's, or (expanded / multi-node) its unexpanded twin's."""
    name = re.sub(r"_expanded(_ver\d+)?$", "", case.name)
    twin = by_name.get(name, case)
    ops = [n.op_type for n in twin.model.graph.node]
    return ops[0] if len(set(ops)) == 1 else ops[-1]


def applicable(cases, supported=SUPPORTED_OPS) -> list:
    return [c for c in cases
            if all(n.op_type in supported and n.domain in ("", "ai.onnx") for n in c.model.graph.node)
            and c.model.graph.node]


def _array(v) -> np.ndarray:
    """A case's input or expected output (an array, or a TensorProto for types numpy lacks)."""
    return numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else np.asarray(v)


_FLOAT8 = {np.dtype(ml_dtypes.float8_e4m3fn): torch.float8_e4m3fn, np.dtype(ml_dtypes.float8_e5m2): torch.float8_e5m2,
           np.dtype(ml_dtypes.float8_e4m3fnuz): torch.float8_e4m3fnuz,
           np.dtype(ml_dtypes.float8_e5m2fnuz): torch.float8_e5m2fnuz}


# types narrower than torch's: carried in a wider dtype holding their values (onnxbn/torch_import/narrow.py)
_NARROW = {np.dtype(ml_dtypes.int4): np.int8, np.dtype(ml_dtypes.int2): np.int8,
           np.dtype(ml_dtypes.uint4): np.uint8, np.dtype(ml_dtypes.uint2): np.uint8,
           np.dtype(ml_dtypes.float4_e2m1fn): np.float32, np.dtype(ml_dtypes.float8_e8m0fnu): np.float32}


# ONNX Cast leaves a float outside an integer type's range undefined. onnx's cases compute their expected outputs
# with the installed ml_dtypes, which writes 0 there for INT4/UINT4/INT2/UINT2 from 0.7 on (as onnxbn does:
# onnxbn/torch_import/narrow.py) and wrapped the truncated value before: with an older ml_dtypes those elements
# of these cases are not compared (the spec decides no value to compare with).
_CAST_TO_SUB_BYTE_INT = re.compile(r"test_cast(like)?_FLOAT(16)?_to_U?INT[24](_expanded)?")
_ML_DTYPES_WRAPS = tuple(int(p) for p in ml_dtypes.__version__.split(".")[:2]) < (0, 7)


def _spec_defined(case, inputs, expected) -> np.ndarray | None:
    """The elements of the outputs the ONNX spec defines, or None for all (see _CAST_TO_SUB_BYTE_INT)."""
    if not (_ML_DTYPES_WRAPS and _CAST_TO_SUB_BYTE_INT.fullmatch(case.name)):
        return None
    info = ml_dtypes.iinfo(_array(expected[0]).dtype)
    t = np.trunc(_array(inputs[0]).astype(np.float64))
    return (t >= info.min) & (t <= info.max)  # False for NaN


def _tensor(v) -> torch.Tensor:
    a = _array(v)
    if a.dtype in _NARROW:
        a = a.astype(_NARROW[a.dtype])
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    if a.dtype in _FLOAT8:
        return torch.from_numpy(np.array(a.view(np.uint8), copy=True)).view(_FLOAT8[a.dtype])
    return torch.from_numpy(np.array(a, copy=True))


def _compare(got, expected, case, defined: np.ndarray | None = None) -> str | None:
    """Why `got` is not the case's `expected` outputs (None when it is), on the elements `defined` (all by default)."""
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    if len(got) != len(expected):
        return f"{len(got)} outputs, expected {len(expected)}"
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        e = _array(e)
        if not isinstance(g, torch.Tensor):
            return f"output {i} is a {type(g).__name__}"
        if g.dtype == torch.bfloat16 and e.dtype == ml_dtypes.bfloat16:
            g, e = g.float(), e.astype(np.float32)
        elif e.dtype in _FLOAT8 and g.dtype == _FLOAT8[e.dtype]:  # compare the 8-bit patterns' values
            g, e = g.float(), e.astype(np.float32)
        elif e.dtype in _NARROW:  # the values, in their carrier
            e = e.astype(_NARROW[e.dtype])
        g = g.detach().cpu().numpy()
        if g.dtype != e.dtype:
            return f"output {i} dtype {g.dtype} != {e.dtype}"
        if g.shape != e.shape:
            return f"output {i} shape {g.shape} != {e.shape}"
        if defined is not None:
            g, e = g[defined], e[defined]
        if e.dtype.kind in "fc":
            if not np.allclose(g, e, rtol=case.rtol, atol=case.atol, equal_nan=True):
                return f"output {i} values differ (max abs {np.nanmax(np.abs(g.astype(np.float64) - e)):.3g})"
        elif not np.array_equal(g, e):
            return f"output {i} values differ"
    return None


def model_of(case) -> onnx.ModelProto:
    """The case's model; one below opset 9 (onnxbn's oldest) first converted to opset 9 with onnx's
    version converter, as onnxbn's refusal of such a model asks (it stays as it is if that fails)."""
    if opset_version(case.model) >= MIN_OPSET:
        return case.model
    try:
        return onnx.version_converter.convert_version(case.model, MIN_OPSET)
    except Exception:  # noqa: BLE001 - then the importer refuses the original
        return case.model


def run_case(case, convert=to_torch, refusal: type[Exception] = UserError) -> str:
    """'pass', 'refused: why', 'fail: why' or 'random: why' (see RANDOM) for one case."""
    if case.name in RANDOM:
        return "random: " + RANDOM[case.name]
    try:
        module = convert(model_of(case))
    except refusal as exc:
        return f"refused: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    except Exception as exc:  # noqa: BLE001 - a crash is a failure, reported
        return f"fail: import raised {type(exc).__name__}: {str(exc)[:150]}"
    module.eval()
    for inputs, expected in case.data_sets:
        try:
            args = [_tensor(a) for a in inputs]
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # fx prints its own traceback
                got = module(*args)
        except Exception as exc:  # noqa: BLE001
            return f"fail: run raised {type(exc).__name__}: {str(exc)[:150]}"
        why = _compare(got, expected, case, _spec_defined(case, inputs, expected))
        if why:
            return f"fail: {why}"
    return "pass"


def run_all(cases, convert=to_torch, refusal: type[Exception] = UserError) -> dict[str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {c.name: run_case(c, convert, refusal) for c in cases}


def _onnx2torch():
    """onnx2torch's convert, or None (with the reason) when it cannot be imported here."""
    try:
        import torchvision  # noqa: F401  # pyright: ignore[reportMissingImports]  # optional, often absent
    except Exception:  # noqa: BLE001 - missing or broken beside this torch
        stub, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
        vars(ops).update(roi_align=None, nms=None)  # the names onnx2torch imports; ModuleType declares none
        vars(stub).update(ops=ops)
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = stub, ops
    try:
        from onnx2torch import convert  # pyright: ignore[reportMissingImports]  # optional, not in the dev venv
    except Exception as exc:  # noqa: BLE001
        return None, f"onnx2torch cannot be imported here ({type(exc).__name__}: {exc})"
    from importlib.metadata import version
    return convert, f"onnx2torch {version('onnx2torch')}"


def table(cases, ours: dict, theirs: dict | None, ops_of: dict) -> str:
    rows: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for c in cases:
        op = ops_of[c.name]
        rows[op]["cases"] += 1
        rows[op][ours[c.name].split(":")[0]] += 1
        if theirs is not None:
            rows[op]["o2t_" + theirs[c.name].split(":")[0]] += 1
    head = "| op | cases | pass | refused | fail | random |" + (" onnx2torch pass | refused | fail |" if theirs else "")
    sep = "|---|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if theirs else "")
    lines = [head, sep]
    total: dict[str, int] = defaultdict(int)
    for op in sorted(rows):
        r = rows[op]
        for k, v in r.items():
            total[k] += v
        cols = [r["cases"], r["pass"], r["refused"], r["fail"], r["random"]]
        if theirs is not None:
            cols += [r["o2t_pass"], r["o2t_refused"], r["o2t_fail"]]
        lines.append(f"| {op} | " + " | ".join(str(v) for v in cols) + " |")
    cols = [total["cases"], total["pass"], total["refused"], total["fail"], total["random"]]
    if theirs is not None:
        cols += [total["o2t_pass"], total["o2t_refused"], total["o2t_fail"]]
    lines.append("| **total** | " + " | ".join(f"**{v}**" for v in cols) + " |")
    return "\n".join(lines)


def _reasons(results: dict[str, str]) -> list[str]:
    """Markdown lines: each distinct reason (node names and numbers blanked) with its count."""
    counts: dict[str, int] = defaultdict(int)
    for v in results.values():
        if v != "pass":
            v = re.sub(r"(node|input) '[^']*'", r"\1 …", v)
            counts[re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", "N", v)] += 1
    return [f"- {n} x {why}" for why, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--no-onnx2torch", action="store_true", help="skip the onnx2torch column")
    p.add_argument("--failures", action="store_true", help="list every failed and refused case with its reason")
    p.add_argument("-o", "--output", help="also write the report to this markdown file")
    args = p.parse_args(argv)
    everything = all_cases()
    by_name = {c.name: c for c in everything}
    cases = applicable(everything)
    ops_of = {c.name: case_op(c, by_name) for c in cases}
    ours = run_all(cases)
    theirs, note = None, "onnx2torch: not run (--no-onnx2torch)"
    if not args.no_onnx2torch:
        convert, note = _onnx2torch()
        if convert is not None:
            theirs = run_all(cases, convert, Exception)
    n = len(cases)
    passed = sum(v == "pass" for v in ours.values())
    refused = sum(v.startswith("refused") for v in ours.values())
    random = sum(v.startswith("random") for v in ours.values())
    failed = n - passed - refused - random
    out = [f"# ONNX backend node tests through onnxbn.to_torch (onnx {__import__('onnx').__version__}, "
           f"torch {torch.__version__})", "",
           f"{len(everything)} node test cases; {n} use only ops onnxbn imports ({len(SUPPORTED_OPS)} ops).",
           f"onnxbn: {passed} pass ({100 * passed / n:.1f}%), {refused} refused, {failed} fail, {random} random; "
           f"of the {n - refused - random} cases it imports and that can be compared, {passed} pass "
           f"({100 * passed / max(n - refused - random, 1):.1f}%).",
           ]
    if theirs is not None:
        tp = sum(v == "pass" for v in theirs.values())
        tr = sum(v.startswith("refused") for v in theirs.values())
        out.append(f"{note} on the same {n} cases: {tp} pass ({100 * tp / n:.1f}%), {tr} refused "
                   f"(raised while converting), {n - tp - tr - random} fail, {random} random.")
        old = [c.name for c in cases if opset_version(c.model) <= OLD_OPSET]
        out.append(f"On the {len(old)} cases at opset <= {OLD_OPSET} (most cases use the opset current when "
                   f"onnx generated them, newer than onnx2torch registers converters for): onnxbn "
                   f"{sum(ours[k] == 'pass' for k in old)} pass, onnx2torch {sum(theirs[k] == 'pass' for k in old)}.")
    else:
        out.append(note + ".")
    out += ["", "Cases: `onnx.backend.test.case.node.collect_testcases` (what generates onnx/backend/test/data/node), "
            "each model with its inputs and expected outputs; judged at the case's rtol/atol (onnx's runner: 1e-3 / "
            "1e-7). A case is attributed to the op it tests (an `_expanded` one to its unexpanded twin's op), so "
            "function-expanded cases of ops onnxbn has no converter for (RMSNormalization, CenterCropPad, ...) "
            "count under those ops. Cases below opset 9 run after onnx.version_converter brings them to opset 9. "
            "refused: a one-line UserError at import; random: the expected output is a draw from numpy's RNG.",
            "", table(cases, ours, theirs, ops_of)]
    out += ["", "## Why cases did not pass (onnxbn)", "", *_reasons(ours)]
    if theirs is not None:
        out += ["", "## Why cases did not pass (onnx2torch)", "", *_reasons(theirs)]
    if args.failures:
        out += ["", "## onnxbn: each case that did not pass", ""]
        out += [f"- `{k}`: {v}" for k, v in sorted(ours.items()) if v != "pass"]
    text = "\n".join(out) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
