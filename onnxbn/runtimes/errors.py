"""A runtime's failure as one line: the operator and node it could not load, else its first telling line.
"""

from __future__ import annotations

import re

import onnx

from onnxbn.errors import UserError


def first_line(exc: BaseException) -> str:
    """The first line of an error that says something (runtimes lead with file:line banners), with
    the first cause when the runtime gives one (tract: 'Caused by:'); never a stack trace."""
    lines = [line.strip() for line in str(exc).split("Stack backtrace:")[0].splitlines()]
    lines = [line for line in lines if line and not line.startswith(("Exception from src/", "Check '"))]
    if not lines:
        return type(exc).__name__
    first = lines[0]
    if "Caused by:" in lines[1:]:
        cause = lines[lines.index("Caused by:", 1) + 1:]
        if cause:
            first = f"{first}: {cause[0]}"
    return first[:300]


_OP_PATTERNS = {
    # onnxruntime: Could not find an implementation for Det(22) node with name 'det'
    "onnxruntime": re.compile(r"implementation for (?P<op>[\w.]+)\((?P<opset>\d+)\) node with name '(?P<node>[^']*)'"),
    # OpenVINO: No conversion rule found for operations: Det-18, com.example.MyOp
    "openvino": re.compile(r"No conversion rule found for operations: (?P<ops>[^\n]+)"),
    # tract: Translating node #2 "bad_node" Unimplemented(LpPool) ToTypedTranslator
    "tract": re.compile(r"node #\d+ \"(?P<node>[^\"]*)\" Unimplemented\((?P<op>[\w.]+)\)"),
    # onnx.reference: No registered schema for operator 'MyOp' and domain ''; Node type 'MyOp' from domain ...
    "reference": re.compile(r"(?:operator|Node type) '(?P<op>[\w.]+)'"),
}


def load_error(runtime: str, exc: BaseException, model: onnx.ModelProto) -> UserError:
    """One line: which runtime cannot load the model, and the operator (and node) it lacks when it says so."""
    text = str(exc)
    match = _OP_PATTERNS.get(runtime) and _OP_PATTERNS[runtime].search(text)
    if match:
        if runtime == "openvino":
            ops = [o.strip() for o in match["ops"].split(",") if o.strip()]
            op = re.sub(r"-\d+$", "", ops[0]).split(".")[-1]
            more = f" (and {', '.join(ops[1:])})" if len(ops) > 1 else ""
        else:
            op, more = match["op"], ""
        node = match.groupdict().get("node") or next(
            (n.name or n.output[0] for n in model.graph.node if n.op_type == op), "")
        where = f" (node {node!r})" if node else ""
        return UserError(f"{runtime} cannot load the model: it has no implementation of operator {op}{where}{more}; "
                         f"run it on another runtime, or replace that operator")
    tract_node = re.search(r"Building node (?P<node>\S+) \((?P<op>[\w.]+)\)", text)
    if runtime == "tract" and tract_node:
        return UserError(f"tract cannot load the model: it cannot build operator {tract_node['op']} "
                         f"(node {tract_node['node']!r}); run it on another runtime, or replace that operator")
    return UserError(f"{runtime} cannot load the model: {first_line(exc)}")
