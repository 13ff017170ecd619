"""Evaluation through onnxruntime: cross-entropy loss and top-1/top-5 accuracy on labelled data."""

from __future__ import annotations

import numpy as np

from onnxbn.errors import UserError
from onnxbn.feeding import open_model_data, run_batches
from onnxbn.io.model import Model
from onnxbn.training.outputs import are_probabilities, check_labels, output_kind


def evaluate(model, data, batch_size: int = 32, device: str = "auto", limit: int | None = None, seed: int = 0,
             workers: int = 0, preset: str | None = None, strict: bool = False) -> dict:
    """Cross-entropy loss and top-1/top-5 accuracy of `model` on labelled `data`, through onnxruntime.

    The loss is the negative log-likelihood of the labels under the output read by `output_kind`:
    probabilities (-log p), log-probabilities, or logits (log_softmax first); `output` in the result
    says which, `output_read_by` how (the graph, or every row of the data being probabilities).
    """
    from onnxbn.runtimes.ort_backend import make_session, session_provider

    # a model file is read as structure only: onnxruntime reads its weights from the file itself
    opened = Model.open(model)
    proto = opened.proto
    dataset = open_model_data(proto, data, preset=preset, limit=limit, seed=seed)
    if not dataset.has_labels():
        raise UserError(f"{dataset.description}: evaluation needs labels (class folders, y in the .npz, or (x, y) items)")
    session = make_session(opened, device)
    out_name = proto.graph.output[0].name
    graph_kind = output_kind(proto)[0]
    nll = {"probs": 0.0, "logprobs": 0.0, "logits": 0.0}  # summed -log p of the labels under each reading
    top1 = top5 = n = 0.0
    rows_are_probs = True  # every row so far non-negative and summing to 1 (are_probabilities)
    for _, y, (out,) in run_batches(session, dataset, [out_name], proto, batch_size, workers=workers, strict=strict,
                                    desc="eval"):
        out = out.astype(np.float64)
        check_labels(y, out.shape[1], dataset.description)
        picked = np.arange(len(y)), y
        if graph_kind == "logprobs":
            nll["logprobs"] -= float(out[picked].sum())
        if graph_kind == "probs" or rows_are_probs:
            rows_are_probs = rows_are_probs and are_probabilities(out)
            nll["probs"] -= float(np.log(np.clip(out[picked], 1e-30, None)).sum())
        if graph_kind == "logits":
            shifted = out - out.max(axis=1, keepdims=True)
            nll["logits"] -= float((shifted[picked] - np.log(np.exp(shifted).sum(axis=1))).sum())
        order = np.argsort(-out, axis=1, kind="stable")[:, :5]  # every reading ranks the classes as the output does
        top1 += float((order[:, 0] == y).sum())
        top5 += float((order == y[:, None]).any(axis=1).sum())
        n += len(y)
    if n == 0:
        raise UserError(f"{dataset.description}: no sample could be read ({len(dataset.skipped)} unreadable); "
                        "nothing was evaluated")
    kind, how = output_kind(proto, rows_are_probs)
    return {"samples": int(n), "skipped": len(dataset.skipped), "loss": nll[kind] / n, "top1": top1 / n, "top5": top5 / n,
            "provider": session_provider(session), "output": kind, "output_read_by": how}
