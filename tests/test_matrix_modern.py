"""The modern model matrix: today's vision architectures x the exporters' forms x the torch-side steps.

Architectures (tests/modern_archs.py: torch nn.Modules at seeded random init, 3x32x32 input, <= 16
channels, BatchNorm where the real architecture has it, with random weight, bias and running
statistics, and a classifier of CLASSES logits):

    mobilenetv3   conv-BN-HardSwish, inverted residual with squeeze-excite (ReLU, HardSigmoid, Mul)
    efficientnet  MBConv x2 (SiLU, depthwise 3x3, squeeze-excite with Sigmoid), residual Add
    convnext      patchify 4x4 stem + LayerNorm over channels, depthwise 7x7, LayerNorm, Linear-GELU-Linear,
                  layer scale, residual (no BN: ConvNeXt has none)
    resnext       RegNet/ResNeXt bottleneck: grouped 3x3 (4 groups), strided 1x1 projection, Add
    unet          U-Net/FPN: MaxPool encoder, ConvTranspose 2x2 and bilinear Resize up, Concat skips
    yolo          YOLOv8-style C2f blocks (chunk -> Split/Slice, Concat), nearest Resize up, strided
                  conv down, two scales
    unet and yolo end in a GAP + Linear classifier (their per-pixel / per-scale maps pooled), so
    that `finetune`, which trains classifiers on (N,) labels, trains them.

Forms (each exported once per architecture, cached at module scope):

    ts11 ts13 ts17 ts21  torch.onnx.export(dynamo=False) at that opset, dynamic batch. Exported with
                training=TrainingMode.PRESERVE from eval mode: BN stays an inference-mode
                BatchNormalization node (the TorchScript exporter's default, training=EVAL, folds
                every BN into its Conv)
    dyn         ts17 with dynamic batch, H and W; every step runs at 48x48 (exported at 32x32)
    const       ts11 with dynamic batch, H and W and every initializer a Constant node (the form
                PaddlePaddle and TensorFlow exporters write); steps at 48x48
    dynamo      torch.onnx.export(dynamo=True) as people call it: optimize=True (the default), dynamic
                batch, H and W (torch.export.Dim); steps at 48x48. Its optimizer folds every BN into
                its Conv, so this form has no BN
    dynamo-noopt  the same export with optimize=False: BN kept, chunk written as
                SplitToSequence/SequenceAt, biases computed by Expand(CastLike(0)) chains; steps at 48x48

Steps (one test id per architecture x form x step; N = 16 seeded N(0, 1) inputs, 5 classes):

    torch       onnxbn.to_torch(model) in eval mode equals onnxruntime on the model within BOUND
    finetune    finetune(model, freeze_through=<the first Conv>, epochs=1, batch 8, lr 1e-2): the whole
                body after the stem conv trains in torch (BN in train mode, grouped and transposed
                convs, LayerNorm, weights in Constant nodes); the loss is finite, the write-back gate
                ran and passed (onnxruntime on the written model = the trained torch module, 1e-5,
                at the training inputs' size for dynamic H/W), the graph is unchanged, weights changed
    recalibrate recalibrate(mode="batch", batch size 8, prior=0, var_floor=0: plain re-estimation):
                every BN's mean and var equal, within BOUND relative, the running statistics that
                torch.optim.swa_utils.update_bn computes on
                the original torch module (matched to its ONNX BN by its scale)
    fold        fold_bn(model): no BatchNormalization left, onnxruntime agrees with the original
                within BOUND

BOUND (max|a - b| / max|a|): 1e-5 (float32, other kernels; measured <= 6e-7 here for torch, fold and the gate).

Result per cell: pass, or the UserError listed in REFUSED (one line, matching the reason):

    form            torch     finetune  recalibrate                  fold
    ts11..ts21      pass      pass      pass (convnext: refused)     pass
    dyn const       pass      pass      pass (convnext: refused)     pass
    dynamo          pass      pass      refused (no BN left)         pass (nothing to fold)
    dynamo-noopt    pass      pass      pass (convnext: refused)     pass
                    (yolo: torch/finetune/recalibrate refused, SplitToSequence)

    refused, recalibrate without BN: "the model has no BatchNormalization node" (and says to insert)
    refused, yolo dynamo-noopt: onnxbn imports no sequence types; the default optimize=True writes Split
"""

from __future__ import annotations

import functools
import io
import logging
import re
import warnings

import numpy as np
import onnx
import pytest
import torch
from modern_archs import ARCHS, CLASSES, build
from onnx import helper
from oracles import ort_outputs, rel_error

import onnxbn
from models import changed_weights, weight_values
from onnxbn import UserError

EXPORT_SIZE = 32
RUN_SIZE = {"dyn": 48, "const": 48, "dynamo": 48, "dynamo-noopt": 48}  # forms with dynamic H, W
SAMPLES = 16
BATCH = 8
BOUND = 1e-5


# ----------------------------------------------------------------------------- forms

@functools.cache
def _torchscript(arch: str, opset: int, hw: bool) -> bytes:
    axes = {0: "batch", 2: "height", 3: "width"} if hw else {0: "batch"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(build(arch), (torch.zeros(1, 3, EXPORT_SIZE, EXPORT_SIZE),), buffer, dynamo=False,
                          opset_version=opset, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": axes, "logits": {0: "batch"}},
                          training=torch.onnx.TrainingMode.PRESERVE)
    return buffer.getvalue()


@functools.cache
def _dynamo(arch: str) -> tuple[bytes, bytes]:
    """(optimize=False, optimize=True) of one dynamo export."""
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height", min=16, max=256),
            3: torch.export.Dim("width", min=16, max=256)}
    logging.disable(logging.WARNING)  # the exporter's progress lines
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(build(arch), (torch.zeros(2, 3, EXPORT_SIZE, EXPORT_SIZE),), dynamo=True,
                                        optimize=False, input_names=["input"], output_names=["logits"],
                                        dynamic_shapes=(dims,), verbose=False)
            raw = program.model_proto.SerializeToString()
            program.optimize()  # what optimize=True (the default) runs after the export
            return raw, program.model_proto.SerializeToString()
    finally:
        logging.disable(logging.NOTSET)


def _constant_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every initializer becomes a Constant node of the same name, ahead of the graph's nodes."""
    nodes = [helper.make_node("Constant", [], [t.name], name=f"{t.name}/const", value=t) for t in model.graph.initializer]
    nodes += model.graph.node
    model.graph.ClearField("initializer")
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return model


BUILDERS = {
    "ts11": lambda a: onnx.load_from_string(_torchscript(a, 11, False)),
    "ts13": lambda a: onnx.load_from_string(_torchscript(a, 13, False)),
    "ts17": lambda a: onnx.load_from_string(_torchscript(a, 17, False)),
    "ts21": lambda a: onnx.load_from_string(_torchscript(a, 21, False)),
    "dyn": lambda a: onnx.load_from_string(_torchscript(a, 17, True)),
    "const": lambda a: _constant_weights(onnx.load_from_string(_torchscript(a, 11, True))),
    "dynamo": lambda a: onnx.load_from_string(_dynamo(a)[1]),
    "dynamo-noopt": lambda a: onnx.load_from_string(_dynamo(a)[0]),
}
FORMS = list(BUILDERS)
STEPS = ["torch", "finetune", "recalibrate", "fold"]

# (architecture or "*", form or "*", step): regex the one-line UserError must match
_NO_BN = r"^the model has no BatchNormalization node; .*insert"
_SEQUENCE = r"'node_split' \(SplitToSequence, opset \d+\): op not supported"
REFUSED = {
    # ConvNeXt has no BN; the dynamo exporter's optimizer folded every BN into its Conv
    ("convnext", "*", "recalibrate"): _NO_BN,
    ("*", "dynamo", "recalibrate"): _NO_BN,
    # optimize=False writes torch.chunk as SplitToSequence + SequenceAt: sequence types, which onnxbn's
    # importer does not run (the default optimize=True writes Split, which it does)
    ("yolo", "dynamo-noopt", "torch"): _SEQUENCE,
    ("yolo", "dynamo-noopt", "finetune"): _SEQUENCE,
    ("yolo", "dynamo-noopt", "recalibrate"): _SEQUENCE,
}


def expected_refusal(arch: str, form: str, step: str) -> str | None:
    for key in ((arch, form, step), (arch, "*", step), ("*", form, step)):
        if key in REFUSED:
            return REFUSED[key]
    return None


@functools.cache
def _model(arch: str, form: str) -> bytes:
    model = BUILDERS[form](arch)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def model_of(arch: str, form: str) -> onnx.ModelProto:
    """A fresh copy of the form's model."""
    return onnx.load_from_string(_model(arch, form))


def inputs(form: str) -> tuple[np.ndarray, np.ndarray]:
    size = RUN_SIZE.get(form, EXPORT_SIZE)
    x = np.random.default_rng(1).standard_normal((SAMPLES, 3, size, size)).astype(np.float32)
    return x, np.random.default_rng(2).integers(0, CLASSES, SAMPLES)


def bn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


# ----------------------------------------------------------------------------- steps

def step_torch(arch: str, form: str) -> None:
    model = model_of(arch, form)
    x, _ = inputs(form)
    module = onnxbn.to_torch(model).eval()
    with torch.no_grad():
        out = module(torch.from_numpy(x))
    error = rel_error(ort_outputs(model, x)[0], out.numpy())
    assert error <= BOUND, f"torch vs onnxruntime: {error:.3g}"


def step_finetune(arch: str, form: str) -> None:
    model = model_of(arch, form)
    stem = next(n.name for n in model.graph.node if n.op_type == "Conv")
    x, y = inputs(form)
    result = onnxbn.finetune(model, (x, y), epochs=1, lr=1e-2, batch_size=BATCH, device="cpu", seed=0,
                             freeze_through=stem)
    assert np.isfinite(result.log["history"][0]["train_loss"])
    gate = result.log["write_back_check"]
    assert gate["checked"] and gate["max_rel_error"] <= BOUND, gate
    written = result.model
    onnx.checker.check_model(written)
    changed = changed_weights(model, written)
    stem_weight = next(n.input[1] for n in model.graph.node if n.name == stem)
    assert changed and stem_weight not in changed, "the trained part changed, the frozen stem did not"
    out = ort_outputs(written, x)[0]
    assert out.shape == (SAMPLES, CLASSES) and np.isfinite(out).all()


def step_recalibrate(arch: str, form: str) -> None:
    model = model_of(arch, form)
    x, _ = inputs(form)
    out = onnxbn.recalibrate(model, x, mode="batch", batch_size=BATCH, prior=0, var_floor=0)
    reference = build(arch)
    torch.optim.swa_utils.update_bn([torch.from_numpy(x[i:i + BATCH]) for i in range(0, SAMPLES, BATCH)], reference)
    by_scale = {m.weight.detach().numpy().tobytes(): m for m in reference.modules()
                if isinstance(m, torch.nn.BatchNorm2d)}
    values = weight_values(out)
    assert len(bn_nodes(out)) == len(by_scale) > 0
    for node in bn_nodes(out):
        bn = by_scale[values[node.input[1]].tobytes()]
        assert rel_error(bn.running_mean.numpy(), values[node.input[3]]) <= BOUND, node.name
        assert rel_error(bn.running_var.numpy(), values[node.input[4]]) <= BOUND, node.name


def step_fold(arch: str, form: str) -> None:
    model = model_of(arch, form)
    x, _ = inputs(form)
    folded = onnxbn.fold_bn(model)
    onnx.checker.check_model(folded)
    assert not bn_nodes(folded), onnxbn.explain_fold(model)
    error = rel_error(ort_outputs(model, x)[0], ort_outputs(folded, x)[0])
    assert error <= BOUND, f"folded vs original: {error:.3g}"


STEP = {"torch": step_torch, "finetune": step_finetune, "recalibrate": step_recalibrate, "fold": step_fold}


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_cell(arch, form, step):
    reason = expected_refusal(arch, form, step)
    if reason is None:
        STEP[step](arch, form)
        return
    with pytest.raises(UserError) as refused:
        STEP[step](arch, form)
    message = str(refused.value)
    assert "\n" not in message.strip(), message
    assert re.search(reason, message), message


@pytest.mark.parametrize("arch", list(ARCHS))
def test_forms_hold_what_the_matrix_says(arch):
    """The premises: BN in every TorchScript and dynamo-noopt form of an architecture with BN, none
    after dynamo's optimizer; dynamic H and W where the steps run at another size."""
    has_bn = arch != "convnext"
    for form in FORMS:
        model = model_of(arch, form)
        assert bool(bn_nodes(model)) == (has_bn and form != "dynamo"), form
        dims = model.graph.input[0].type.tensor_type.shape.dim
        assert [bool(d.dim_param) for d in dims] == [True, False, form in RUN_SIZE, form in RUN_SIZE], form
    assert not model_of(arch, "const").graph.initializer
