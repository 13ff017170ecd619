"""The converter contract: what a converter may ask of the importer, and the registry of converters.

A converter is `fn(ctx: ConvertContext, attrs: dict) -> value | list[value]`, registered for one or more
ONNX op types with `@converter("Conv", ...)`. It reads the current node's inputs (`ctx.inp(i)`: a Python
value when it is known at import, else an fx node), emits graph nodes with `ctx.call` (a function) or
`ctx.module` (an nn.Module, trainable where its weights are), and refuses with `ctx.fail(why)`, which
becomes a one-line UserError naming the node, op, opset and the attribute value. Converters use only
what `ConvertContext` lists (the importer implements it); nothing else of the importer is theirs.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import onnx
import torch
import torch.fx as fx
from torch import nn


class ConvertContext(Protocol):
    """The importer as converters see it (see the module docstring)."""

    node: onnx.NodeProto               # the node being converted
    opset: int                         # the model's default-domain opset
    inits: dict[str, onnx.TensorProto]  # initializers by name (read-only: dims and types of weights)
    producers: dict[str, onnx.NodeProto]  # tensor name -> the node that writes it (read-only)
    graph: fx.Graph                    # the fx graph being built (read-only but for call_function)

    def inp(self, i: int) -> Any: ...
    def value(self, name: str) -> Any: ...
    def call(self, fn: Callable, *args, **kwargs) -> Any: ...
    def module(self, mod: nn.Module, *args, params: dict[str, str] | None = None, **kwargs) -> Any: ...
    def param(self, init: str) -> nn.Parameter: ...
    def is_weight(self, name: str) -> bool: ...
    def init_tensor(self, name: str) -> torch.Tensor: ...
    def shape(self, name: str) -> list | None: ...
    def rank(self, name: str) -> int | None: ...
    def elem_type(self, name: str) -> int | None: ...
    def fail(self, why: str) -> Any: ...


Converter = Callable[[ConvertContext, dict], Any]
CONVERTERS: dict[str, Converter] = {}


def converter(*names: str) -> Callable[[Converter], Converter]:
    """Register the decorated function as the converter of the ONNX ops `names`."""
    def register(fn: Converter) -> Converter:
        for name in names:
            CONVERTERS[name] = fn
        return fn
    return register
