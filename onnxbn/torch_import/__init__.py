"""ONNX -> torch.fx GraphModule, and trained weights back into the ONNX graph.

`to_torch(model)` builds a `torch.fx.Graph` node by node from the ONNX graph (no
tracing) and returns a `GraphModule` whose forward takes the graph's run-time
inputs in graph-input order and returns one tensor (one graph output) or a tuple
in graph-output order. Layers become ordinary torch modules named after their
ONNX nodes (sanitised to attribute names, unique, deterministic):
Conv -> nn.Conv{1,2,3}d, Gemm -> nn.Linear (transA=0, transB=1, alpha=beta=1,
1-D or no bias) or `OnnxGemm`, MatMul with a 2-D float initializer -> `OnnxMatMul`,
BatchNormalization -> nn.BatchNorm{1,2,3}d with `momentum_torch = 1 - momentum_onnx`,
Dropout -> `OnnxDropout` (an nn.Dropout: live in train mode, identity in eval),
ConvTranspose -> `OnnxConvTranspose`, Layer/Instance/GroupNormalization -> `OnnxNorm`,
PRelu with an initializer slope -> `OnnxPRelu`.
Every weight is an nn.Parameter holding exactly the initializer's shape and layout;
BN mean/var are the BN modules' running-stat buffers. A float initializer added to
(or multiplied with) the output of Conv/ConvTranspose/Gemm/MatMul, of a normalization
(also through reshapes: GroupNorm as exporters write it) or of such a bias/scale op is
a bias or scale and trainable too (`OnnxElementwise`). Every other initializer (Reshape shapes, constants) is a
constant: folded at import where all of an op's inputs are constant, otherwise a
non-trainable buffer. Shapes are computed at run time: Shape gives an int64 tensor of
the input's dims, so Shape -> Gather/Slice -> Concat -> Reshape/Expand/Resize chains
(dynamic axes, `x.view(x.size(0), -1)`, torch's dynamo exporter) run at any input size
the model accepts. An op, attribute value or element type outside the supported set
fails at import with a one-line UserError naming the node, the op, the opset and the
value. Element types: float16/32/64, bfloat16, the four 8-bit floats (e4m3fn, e4m3fnuz,
e5m2, e5m2fnuz: torch's dtypes), int8/16/32/64, uint8, bool; uint16/32/64 are held as
int64 inside the module and cast back at the graph outputs; e8m0, 4-bit floats, 4/2-bit
integers, strings, sequences and optionals are refused.

The module carries the maps that make write-back exact:
`onnx_names` (module path -> ONNX node name) and `onnx_tensors` (state_dict key ->
initializer name). `write_back(module, model)` returns a copy of the model with
exactly those initializers replaced (cast to their original dtype, shapes checked)
and a `onnxbn.write_back` metadata entry; nodes, names, opset and other metadata are
untouched. `split_at(module, node)` cuts the module after an ONNX node into a
prefix and a suffix that share the original's parameters:
`suffix(*as_tuple(prefix(*inputs))) == module(*inputs)`.

The package's modules: `ops` (the nn.Module classes and tensor helpers the generated
forward calls) and `functional` (the run-time helpers of the shape, indexing, reduction
and elementwise ops); `registry` (the converter contract and `CONVERTERS`), `converters` (the
layer converters: Conv, pooling, Gemm, MatMul, BN, ...), `converters_elementwise`,
`converters_shape`, `converters_nn` (ConvTranspose, normalizations, reductions) and
`resize` (Resize, Upsample), one converter per supported ONNX op; `importer` (`to_torch`
and the `_Importer` that walks the graph) and `writeback` (`write_back` and `split_at`).
tools/conformance.py runs onnx's backend node tests through the importer.
"""

from onnxbn.torch_import.importer import SUPPORTED_OPS, to_torch
from onnxbn.torch_import.ops import OnnxDropout, OnnxElementwise, OnnxGemm, OnnxMatMul
from onnxbn.torch_import.writeback import split_at, write_back

__all__ = ["to_torch", "write_back", "split_at", "SUPPORTED_OPS", "OnnxGemm", "OnnxMatMul",
           "OnnxElementwise", "OnnxDropout"]
