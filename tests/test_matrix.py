"""The model matrix: real-world architectures x the forms models come in x every onnxbn step.

Architectures (torch nn.Modules, seeded, 3x16x16 input, <= 16 channels, ReLU, a classifier
Gemm at the end; exported by onnxbn.export.export_module, the TorchScript exporter):

    vgg          conv-relu-pool x2, Flatten, Gemm-Relu-Dropout-Gemm
    alexnet      Conv-Relu-LRN-MaxPool, grouped Conv (group 2)-Relu-LRN-MaxPool, Dropout, 2 Gemm
                 (LRN exported as the ONNX LRN op, as the Caffe-era converters wrote it)
    resnet       basic block: 3x3 stride 2 + 3x3, 1x1 stride-2 projection, Add, Relu, GAP, Gemm
    bottleneck   1x1 reduce, 3x3 stride 2, 1x1 expand, 1x1 projection, Add, Relu, GAP, Gemm
    inception    1x1 | 1x1-3x3 | 1x1-5x5 | MaxPool-1x1 branches, Concat, MaxPool, 2 Gemm
    densenet     two Relu-Conv layers whose outputs Concat onto their input (growth 4),
                 1x1 transition + AveragePool, GAP, Gemm
    shufflenet   grouped 1x1, channel shuffle (Reshape-Transpose-Reshape of the traced shape),
                 depthwise 3x3, grouped 1x1, Add skip, GAP, Gemm
    squeezenet   fire module: squeeze 1x1, expand 1x1 and 3x3, Concat, Dropout, GAP, Gemm
    mobilenet    depthwise 3x3 (group = channels) + pointwise 1x1, twice, GAP, Gemm

Forms (each built from the export; N = 16 seeded N(0, 1) inputs, 5 classes):

    ts9 ts13 ts17 ts21  the TorchScript export at that opset
    v8 v7       onnx.version_converter.convert_version(ts9, 8 or 7): older than onnxbn's
                minimum opset 9, so every step that reads the model refuses with a UserError
                naming the opset and the fix (convert_version(model, 13)); `compare` runs
                onnxruntime only and passes, against the BN model of the fixed model.
    ir3         ts9 re-labelled IR 3 with every initializer also listed as a graph input
    const       ts13 with every weight a Constant node, and every bias a ConstantOfShape
                (filled with that bias' mean) instead of an initializer
    batch1      ts17 with the batch dimension fixed at 1 (input and output)
    fp16        ts17 with weights, constants and I/O in float16
    ext         ts17 saved by onnxbn.io.save.save_model with external data (the protobuf
                limit lowered), every step given the path
    overflow    ts17 whose classifier has weights |W| * 1e38 and biases of the largest float32:
                its float32 logits are +inf (test_overflow_form_overflows checks that)

Steps (one test id per architecture x form x step):

    stats-relu, stats-linear, stats-conv
                collect_stats(after=S): picks the tensors this file's own rule names (relu:
                every Relu; linear: every Conv/Gemm but the classifier; conv: the Relu after
                each Conv, else the Conv's output), counts N*H*W per channel, and its mean and
                variance equal numpy's float64 moments of the tensors exposed from a plain
                onnxruntime session of the original model
    insert      insert_bn with stats of relu + linear (BN before and after the activations):
                checker passes, one BN per tensor, the graph outputs keep their names
    compare     onnxbn.compare(original, with_bn) passes, and plain onnxruntime outputs of the
                two agree within BOUND (inf where the original is inf)
    torch       to_torch(with_bn) in eval mode equals onnxruntime on with_bn within BOUND
    fold        fold_bn(with_bn): compare(original, folded) passes and onnxruntime agrees
                within BOUND
    finetune    finetune(with_bn, train=(x, y), epochs=1): the written model keeps the graph
                (nodes, initializer names), changes weights, runs in onnxruntime with outputs
                of the right shape

BOUND (max|a - b| / max|a| over the output): 1e-6 for insert (an identity up to float32
rounding), 1e-5 for torch and fold, 2e-3 in float16 (see the constants below).

Result per cell: pass, or the UserError listed in REFUSED (one line, matching the reason).
Any other exception, or a UserError not listed, fails the cell. The expected results, the
same for every architecture:

    form                     stats-relu/linear/conv  insert   compare  torch    fold     finetune
    ts9 ts13 ts17 ts21       pass                    pass     pass     pass     pass     pass
    v8 v7                    refused                 refused  pass     refused  refused  refused
    ir3 const batch1         pass                    pass     pass     pass     pass     pass
    fp16                     pass                    pass     pass     pass     pass     refused
    ext                      pass                    pass     pass     pass     pass     pass
    overflow                 pass                    pass     pass     pass     pass     refused

    refused, v8/v7:    "opset N ... 9 ... onnx.version_converter" (the opset, the minimum, the fix)
    refused, overflow: the loss is not finite (+inf logits), and the message says so
    refused, fp16:     fine-tuning trains float32 models only

Also: the command line (`python -m onnxbn stats/insert/check`) on the ir3 and const forms.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from oracles import exposed, feed_name, ort_outputs
from torch import nn

import onnxbn
import onnxbn.io.save
from models import changed_weights
from onnxbn import UserError
from onnxbn.export import export_module

SAMPLE = (3, 16, 16)
CLASSES = 5
SAMPLES = 16
IDENTITY_BOUND = 1e-6  # insert_bn: an identity up to float32 rounding (measured <= 3.4e-7 here)
FLOAT32_BOUND = 1e-5   # fold re-associates float32 sums; torch and onnxruntime use other kernels (<= 5.7e-7)
# float16: unit roundoff u = 2**-11 ~ 4.9e-4; the BN splice and every later fp16 layer round
# again. 4u ~ 2e-3 of the output's scale (measured <= 8.8e-4 here); a wrong identity is O(1).
FLOAT16_BOUND = 2e-3


# ----------------------------------------------------------------------------- architectures

class _LRN(torch.autograd.Function):
    """torch's local_response_norm, exported as the one ONNX LRN op (torch itself writes a
    Pad/AveragePool/Pow decomposition); both compute x / (k + alpha/size * sum x^2)^beta."""

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
        return F.local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def symbolic(g, x, size, alpha, beta, k):
        return g.op("LRN", x, size_i=size, alpha_f=alpha, beta_f=beta, bias_f=k)


class LRN(nn.Module):
    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
        super().__init__()
        self.args = (size, alpha, beta, k)

    def forward(self, x):
        return _LRN.apply(x, *self.args)


def head(features: int, hidden: int | None = None) -> nn.Sequential:
    """GAP-free classifier head: Flatten, [Linear-ReLU-Dropout], Linear."""
    layers: list[nn.Module] = [nn.Flatten()]
    if hidden:
        layers += [nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(0.5)]
    layers.append(nn.Linear(hidden or features, CLASSES))
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = head(16 * 4 * 4, 16)

    def forward(self, x):
        return self.classifier(self.features(x))


class AlexNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), LRN(5), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(), LRN(3, 2e-4, 0.75, 2.0),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(16 * 4 * 4, 16), nn.ReLU(),
                                        nn.Linear(16, CLASSES))

    def forward(self, x):
        return self.classifier(self.features(x))


class ResNetBasic(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.proj = nn.Conv2d(8, 16, 1, stride=2)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.conv2(F.relu(self.conv1(x)))
        y = F.relu(y + self.proj(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class ResNetBottleneck(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.reduce = nn.Conv2d(8, 4, 1)
        self.conv = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.expand = nn.Conv2d(4, 16, 1)
        self.proj = nn.Conv2d(8, 16, 1, stride=2)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.expand(F.relu(self.conv(F.relu(self.reduce(x)))))
        y = F.relu(y + self.proj(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b2 = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.b3 = nn.Sequential(nn.Conv2d(8, 2, 1), nn.ReLU(), nn.Conv2d(2, 4, 5, padding=2))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), nn.Conv2d(8, 4, 1))
        self.classifier = head(16 * 4 * 4, 16)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        y = torch.cat([F.relu(b(x)) for b in (self.b1, self.b2, self.b3, self.b4)], 1)
        return self.classifier(F.max_pool2d(y, 2))


class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Conv2d(8, 4, 3, padding=1)
        self.layer2 = nn.Conv2d(12, 4, 3, padding=1)
        self.transition = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.layer1(F.relu(x))], 1)
        x = torch.cat([x, self.layer2(F.relu(x))], 1)
        x = F.avg_pool2d(self.transition(F.relu(x)), 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1))


class ShuffleNet(nn.Module):
    groups = 2

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.gconv1 = nn.Conv2d(8, 8, 1, groups=self.groups)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gconv2 = nn.Conv2d(8, 8, 1, groups=self.groups)
        self.fc = nn.Linear(8, CLASSES)

    def shuffle(self, x):
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.gconv2(self.dw(self.shuffle(F.relu(self.gconv1(x)))))
        y = F.relu(x + y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class SqueezeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.squeeze = nn.Conv2d(8, 4, 1)
        self.expand1 = nn.Conv2d(4, 8, 1)
        self.expand3 = nn.Conv2d(4, 8, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        s = F.relu(self.squeeze(x))
        x = torch.cat([F.relu(self.expand1(s)), F.relu(self.expand3(s))], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.drop(x), 1), 1))


class MobileNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU())
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


ARCHS = {"vgg": VGG, "alexnet": AlexNet, "resnet": ResNetBasic, "bottleneck": ResNetBottleneck,
         "inception": Inception, "densenet": DenseNet, "shufflenet": ShuffleNet, "squeezenet": SqueezeNet,
         "mobilenet": MobileNet}


@functools.cache
def _exported(arch: str, opset: int) -> bytes:
    torch.manual_seed(0)
    return export_module(ARCHS[arch](), SAMPLE, opset).SerializeToString()


def exported(arch: str, opset: int) -> onnx.ModelProto:
    """A fresh copy of the TorchScript export (input `input`, output `logits`, dynamic batch)."""
    return onnx.load_from_string(_exported(arch, opset))


# ----------------------------------------------------------------------------- forms

def _ir3(arch: str) -> onnx.ModelProto:
    model = exported(arch, 9)
    model.ir_version = 3
    listed = {i.name for i in model.graph.input}
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer if t.name not in listed)
    return model


def _constant_weights(arch: str) -> onnx.ModelProto:
    """Every initializer becomes a node: float vectors (biases) a ConstantOfShape filled with their
    mean (so the model computes with that bias), everything else a Constant."""
    model = exported(arch, 13)
    nodes = []
    for t in model.graph.initializer:
        value = numpy_helper.to_array(t)
        if value.ndim == 1 and value.dtype == np.float32:
            shape = numpy_helper.from_array(np.array(value.shape, np.int64), f"{t.name}/shape")
            nodes.append(helper.make_node("Constant", [], [shape.name], name=f"{t.name}/shape", value=shape))
            nodes.append(helper.make_node("ConstantOfShape", [shape.name], [t.name], name=f"{t.name}/fill",
                                          value=numpy_helper.from_array(np.array([value.mean()], np.float32))))
        else:
            nodes.append(helper.make_node("Constant", [], [t.name], name=f"{t.name}/const", value=t))
    nodes += model.graph.node
    model.graph.ClearField("initializer")
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return model


def _batch1(arch: str) -> onnx.ModelProto:
    model = exported(arch, 17)
    for vi in (*model.graph.input, *model.graph.output):
        dim = vi.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = 1
    return model


def _float16(arch: str) -> onnx.ModelProto:
    """Every float tensor float16: initializers, Constant values, ConstantOfShape fills, Casts to
    float, the graph's inputs and outputs (value_info dropped, onnxruntime infers it)."""
    model = exported(arch, 17)
    half = TensorProto.FLOAT16

    def convert(t: onnx.TensorProto) -> onnx.TensorProto:
        if t.data_type != TensorProto.FLOAT:
            return t
        return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name)

    for t in model.graph.initializer:
        t.CopyFrom(convert(t))
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                a.t.CopyFrom(convert(a.t))
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = half
    for vi in (*model.graph.input, *model.graph.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = half
    model.graph.ClearField("value_info")
    onnx.checker.check_model(model)
    return model


def _overflow(arch: str) -> onnx.ModelProto:
    """The classifier made to overflow: weights |W| * 1e38 and every bias the largest float32.
    Its inputs are Relu'd (>= 0), so A.W is a positive number around 1e36..1e38, and adding it
    to the largest float32 overflows: a logit is +inf for every sample with a live feature (never
    NaN: no product is -inf)."""
    model = exported(arch, 17)
    gemm = next(n for n in model.graph.node if n.output[0] == "logits")
    for name, value in ((gemm.input[1], lambda w: np.abs(w) * np.float32(1e38)),
                        (gemm.input[2], lambda b: np.full_like(b, np.finfo(np.float32).max))):
        tensor = next(t for t in model.graph.initializer if t.name == name)
        tensor.CopyFrom(numpy_helper.from_array(value(numpy_helper.to_array(tensor)), name))
    return model


def _converted(arch: str, opset: int) -> onnx.ModelProto:
    """Down from the opset 9 export (onnx has no down-adapters from 13 for Relu and others)."""
    return onnx.version_converter.convert_version(exported(arch, 9), opset)


FORMS = ["ts9", "ts13", "ts17", "ts21", "v8", "v7", "ir3", "const", "batch1", "fp16", "ext", "overflow"]
BUILDERS = {"ts9": lambda a: exported(a, 9), "ts13": lambda a: exported(a, 13), "ts17": lambda a: exported(a, 17),
            "ts21": lambda a: exported(a, 21), "v8": lambda a: _converted(a, 8), "v7": lambda a: _converted(a, 7),
            "ir3": _ir3, "const": _constant_weights, "batch1": _batch1, "fp16": _float16,
            "overflow": _overflow}
OLD_OPSET = {"v8": 8, "v7": 7}

STEPS = ["stats-relu", "stats-linear", "stats-conv", "insert", "compare", "torch", "fold", "finetune"]

# The cells expected to raise UserError, with the reason the one-line message must match.
# (architecture or "*", form, step): regex
_OPSET_FIX = r"opset {}\b.*\b9\b.*onnx\.version_converter"  # the opset, the minimum, the fix
REFUSED = {
    # older than onnxbn's minimum opset 9: every step that reads the model says so, and how to
    # convert it; compare only runs onnxruntime, which reads any opset
    **{("*", form, step): _OPSET_FIX.format(opset) for form, opset in OLD_OPSET.items()
       for step in STEPS if step != "compare"},
    # logits of +inf make the loss NaN: training cannot proceed, and must say why
    ("*", "overflow", "finetune"): r"(?i)\b(nan|inf|infinite|non-finite|not finite|overflow)",
    # fine-tuning trains in float32 only
    ("*", "fp16", "finetune"): r"computes in float16; fine-tuning needs a float32 model",
}


def expected_refusal(arch: str, form: str, step: str) -> str | None:
    return REFUSED.get((arch, form, step), REFUSED.get(("*", form, step)))


# ----------------------------------------------------------------------------- the matrix

class Matrix:
    """Builds each (architecture, form) once and caches every step's result (or its error), so a
    cell's test does only its own step while every cell can still run alone."""

    def __init__(self, root):
        self.root = root
        self.cache: dict = {}

    def _cached(self, key, make):
        if key not in self.cache:
            try:
                self.cache[key] = (True, make())
            except Exception as exc:  # re-raised to every cell that needs it
                self.cache[key] = (False, exc)
        ok, value = self.cache[key]
        if not ok:
            raise value
        return value

    def model(self, arch: str, form: str):
        """The form's model as the steps receive it: a ModelProto, or a path (ext)."""
        def make():
            if form == "ext":
                folder = self.root / arch
                folder.mkdir()
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(onnxbn.io.save, "PROTOBUF_LIMIT", 1000)
                    mp.setattr(onnxbn.io.save, "EXTERNAL_THRESHOLD", 64)  # these small models hold no 1 KiB tensor
                    path = onnxbn.io.save.save_model(exported(arch, 17), folder / "model.onnx")
                assert (folder / "model.onnx.data").is_file()
                stored = onnx.load(str(path), load_external_data=False)
                assert any(t.data_location == TensorProto.EXTERNAL for t in stored.graph.initializer)
                return str(path)
            model = BUILDERS[form](arch)
            onnx.checker.check_model(model)
            return model
        return self._cached(("model", arch, form), make)

    def proto(self, arch: str, form: str) -> onnx.ModelProto:
        model = self.model(arch, form)
        return onnx.load(model) if isinstance(model, str) else model

    def dtype(self, form: str):
        return np.float16 if form == "fp16" else np.float32

    def x(self, form: str) -> np.ndarray:
        return np.random.default_rng(1).standard_normal((SAMPLES, *SAMPLE)).astype(self.dtype(form))

    def y(self) -> np.ndarray:
        return np.random.default_rng(2).integers(0, CLASSES, SAMPLES)

    def source(self, arch: str, form: str):
        """The model the BN steps start from: the fixed (convert_version 13) one for v8/v7."""
        if form in OLD_OPSET:
            return self._cached(("fixed", arch, form),
                                lambda: onnx.version_converter.convert_version(self.proto(arch, form), 13))
        return self.model(arch, form)

    def stats(self, arch: str, form: str, after):
        key = ("stats", arch, form, after if isinstance(after, str) else tuple(after))
        return self._cached(key, lambda: onnxbn.collect_stats(self.source(arch, form), self.x(form), after=after,
                                                                 device="cpu", workers=0))

    def with_bn(self, arch: str, form: str) -> onnx.ModelProto:
        def make():
            proto = self.source(arch, form)
            proto = onnx.load(proto) if isinstance(proto, str) else proto
            names = expected_points(proto, "relu") + expected_points(proto, "linear")
            names = [n for node in proto.graph.node for n in node.output if n in names]  # graph order
            return onnxbn.insert_bn(self.source(arch, form), self.stats(arch, form, names))
        return self._cached(("with_bn", arch, form), make)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    return Matrix(tmp_path_factory.mktemp("matrix"))


# ----------------------------------------------------------------------------- independent judges

def expected_points(model: onnx.ModelProto, selector: str) -> list[str]:
    """This file's own reading of the selectors, for these architectures: relu = every Relu
    output; linear = every Conv/Gemm output but the graph's; conv = the Relu that alone reads a
    Conv's output, else that output."""
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    outputs = {o.name for o in model.graph.output}
    names = []
    for node in model.graph.node:
        out = node.output[0]
        if (selector == "relu" and node.op_type == "Relu") or \
                (selector == "linear" and node.op_type in ("Conv", "Gemm") and out not in outputs):
            names.append(out)
        elif selector == "conv" and node.op_type == "Conv":
            users = readers.get(out, [])
            names.append(users[0].output[0] if len(users) == 1 and users[0].op_type == "Relu" else out)
    return names


def ort_run(model, x: np.ndarray, fetch: list[str] | None = None) -> list[np.ndarray]:
    """The oracles' plain onnxruntime run of a path or a proto (`fetch` exposed as its outputs)."""
    proto = onnx.load(model) if isinstance(model, str) else model  # external data loaded by onnx
    dim = next(i for i in proto.graph.input if i.name == feed_name(proto)).type.tensor_type.shape.dim[0]
    step = dim.dim_value or None  # a fixed batch is fed that many samples at a time
    return exposed(proto, fetch, x, batch=step) if fetch else ort_outputs(proto, x, batch=step)


def assert_close(expected: np.ndarray, got: np.ndarray, bound: float, what: str) -> None:
    """max|expected - got| / max|expected| <= bound over the finite values; the non-finite
    values (overflowed logits) must be the same values at the same places."""
    expected, got = np.asarray(expected, np.float64), np.asarray(got, np.float64)
    assert expected.shape == got.shape, (what, expected.shape, got.shape)
    finite = np.isfinite(expected)
    assert not np.isnan(expected).any(), f"{what}: the reference itself has NaN"
    np.testing.assert_array_equal(got[~finite], expected[~finite], err_msg=f"{what}: non-finite values differ")
    if finite.any():
        scale = np.abs(expected[finite]).max()
        error = np.abs(expected[finite] - got[finite]).max() / scale if scale else np.abs(got[finite]).max()
        assert error <= bound, f"{what}: relative error {error:.3g} > {bound}"


def bound(form: str, float32: float = FLOAT32_BOUND) -> float:
    return FLOAT16_BOUND if form == "fp16" else float32


def tolerances(form: str) -> dict:
    return {"atol": FLOAT16_BOUND, "rtol": FLOAT16_BOUND} if form == "fp16" else {}


# ----------------------------------------------------------------------------- steps

def step_stats(m: Matrix, arch: str, form: str, selector: str) -> None:
    stats = onnxbn.collect_stats(m.model(arch, form), m.x(form), after=selector, device="cpu", workers=0)
    proto = m.proto(arch, form)
    names = expected_points(proto, selector)
    assert stats.tensors == names
    x = m.x(form)
    for name, value in zip(names, ort_run(proto, x, fetch=names), strict=True):
        value = value.astype(np.float64)
        axes = (0, *range(2, value.ndim))
        moments = stats.moments[name]
        assert moments.count == value.size // value.shape[1]
        spread = np.abs(value).max()
        if form == "fp16":  # the stats graph may see fp16 Conv outputs before their final rounding
            tol = {"rtol": 0, "atol": 2.0**-11 * spread}
            np.testing.assert_allclose(moments.mean, value.mean(axis=axes), **tol)
            np.testing.assert_allclose(moments.var, value.var(axis=axes), rtol=2.0**-9, atol=2.0**-11 * spread**2)
        else:
            np.testing.assert_allclose(moments.mean, value.mean(axis=axes), rtol=1e-5, atol=1e-6 * spread)
            np.testing.assert_allclose(moments.var, value.var(axis=axes), rtol=1e-5, atol=1e-6 * spread**2)


def step_insert(m: Matrix, arch: str, form: str) -> None:
    if form in OLD_OPSET:  # stats from the fixed model, the old model itself: refused
        onnxbn.insert_bn(m.model(arch, form), m.stats(arch, form, "relu"))
    with_bn = m.with_bn(arch, form)
    onnx.checker.check_model(with_bn)
    source = m.source(arch, form)
    source = onnx.load(source) if isinstance(source, str) else source
    wanted = set(expected_points(source, "relu") + expected_points(source, "linear"))
    bns = [n for n in with_bn.graph.node if n.op_type == "BatchNormalization"]
    assert sorted(n.output[0] for n in bns) == sorted(wanted)  # BN takes over the tensor's name
    assert [o.name for o in with_bn.graph.output] == [o.name for o in source.graph.output]


def step_compare(m: Matrix, arch: str, form: str) -> None:
    x = m.x(form)
    original = m.model(arch, form)
    with_bn = m.with_bn(arch, form)
    report = onnxbn.compare(original, with_bn, data=x, device="cpu", **tolerances(form))
    assert report.passed, report.table()
    assert_close(ort_run(original, x)[0], ort_run(with_bn, x)[0], bound(form, IDENTITY_BOUND), "with_bn vs original")


def step_torch(m: Matrix, arch: str, form: str) -> None:
    if form in OLD_OPSET:
        onnxbn.to_torch(m.model(arch, form))
    with_bn = m.with_bn(arch, form)
    x = m.x(form)
    module = onnxbn.to_torch(with_bn).eval()
    with torch.no_grad():
        out = module(torch.from_numpy(x))
    out = out[0] if isinstance(out, tuple) else out
    assert_close(ort_run(with_bn, x)[0], out.numpy(), bound(form), "torch vs onnxruntime")


def step_fold(m: Matrix, arch: str, form: str) -> None:
    if form in OLD_OPSET:
        onnxbn.fold_bn(m.proto(arch, form))
    x = m.x(form)
    original = m.model(arch, form)
    folded = onnxbn.fold_bn(m.with_bn(arch, form))
    onnx.checker.check_model(folded)
    report = onnxbn.compare(original, folded, data=x, device="cpu", **tolerances(form))
    assert report.passed, report.table()
    assert_close(ort_run(original, x)[0], ort_run(folded, x)[0], bound(form), "folded vs original")



def step_finetune(m: Matrix, arch: str, form: str) -> None:
    train = (m.x(form), m.y())
    if form in OLD_OPSET:
        onnxbn.finetune(m.model(arch, form), train, epochs=1, batch_size=8, device="cpu")
    with_bn = m.with_bn(arch, form)
    result = onnxbn.finetune(with_bn, train, epochs=1, lr=1e-2, batch_size=8, device="cpu", seed=0)
    written = result.model
    onnx.checker.check_model(written)
    assert changed_weights(with_bn, written), "finetune changed no weight"
    assert result.log["write_back_check"]["checked"]  # onnxbn's own gate ran (torch vs onnxruntime)
    out = ort_run(written, m.x(form))[0]
    assert out.shape == (SAMPLES, CLASSES) and not np.isnan(out).any()


def run_step(m: Matrix, arch: str, form: str, step: str) -> None:
    if step.startswith("stats-"):
        selector = step.split("-", 1)[1]
        if form in OLD_OPSET:
            onnxbn.collect_stats(m.model(arch, form), m.x(form), after=selector, device="cpu", workers=0)
        step_stats(m, arch, form, selector)
    else:
        {"insert": step_insert, "compare": step_compare, "torch": step_torch, "fold": step_fold,
         "finetune": step_finetune}[step](m, arch, form)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_cell(matrix, arch, form, step):
    reason = expected_refusal(arch, form, step)
    if reason is None:
        run_step(matrix, arch, form, step)
        return
    with pytest.raises(UserError) as refused:
        run_step(matrix, arch, form, step)
    message = str(refused.value)
    assert "\n" not in message.strip(), message
    assert re.search(reason, message), message


@pytest.mark.parametrize("arch", list(ARCHS))
def test_overflow_form_overflows(matrix, arch):
    """The overflow form's premise: onnxruntime's float32 logits are +inf (no NaN)."""
    logits = ort_run(matrix.proto(arch, "overflow"), matrix.x("overflow"))[0]
    assert np.isposinf(logits).mean() >= 0.9 and not np.isnan(logits).any()


# ----------------------------------------------------------------------------- command line

@pytest.mark.parametrize("form", ["ir3", "const"])
@pytest.mark.parametrize("arch", ["vgg", "resnet"])
def test_command_line(matrix, tmp_path, arch, form):
    """stats, insert and check as processes: exit 0, no traceback, and the check passes."""
    model = tmp_path / "model.onnx"
    onnx.save(matrix.proto(arch, form), str(model))
    np.savez(tmp_path / "data.npz", x=matrix.x(form))
    commands = [
        ["stats", model, "--data", tmp_path / "data.npz", "--after", "relu", "--workers", "0", "-o", tmp_path / "s.npz"],
        ["insert", model, "--stats", tmp_path / "s.npz", "-o", tmp_path / "bn.onnx"],
        ["check", model, tmp_path / "bn.onnx", "--data", tmp_path / "data.npz", "--report", tmp_path / "r.json"],
    ]
    for argv in commands:
        proc = subprocess.run([sys.executable, "-m", "onnxbn", "-q", *map(str, argv)], capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (argv[0], proc.stderr)
    with_bn = onnx.load(str(tmp_path / "bn.onnx"))
    assert sum(n.op_type == "BatchNormalization" for n in with_bn.graph.node) == \
        len(expected_points(matrix.proto(arch, form), "relu"))
    if form == "ir3":
        assert with_bn.ir_version == 3
        assert {t.name for t in with_bn.graph.initializer} <= {i.name for i in with_bn.graph.input}
    x = matrix.x(form)
    assert_close(ort_run(matrix.proto(arch, form), x)[0], ort_run(with_bn, x)[0], FLOAT32_BOUND, "CLI with_bn")
