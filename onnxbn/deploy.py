"""Fold for deployment, verified: the folded model is written only when it computes what the input does.

`fold_verified` folds every exactly foldable BatchNormalization (onnxbn.fold), stages the result next to
`output` (its unchanged weights copied from the input file, never held; the new weights dropped once
written, so onnxruntime reads both models' weights from disk), and compares it with the input
(onnxbn.check.compare): on onnxruntime, and for each runtime in `verify_on` the folded model on that
runtime against the input on onnxruntime. The staged file takes `output`'s place only when every
comparison passes, every element within |a - b| <= atol + rtol * |a| (the defaults of compare); else
nothing is written and the result names the runtimes that failed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from onnxbn import fold as folding
from onnxbn.check.comparison import compare
from onnxbn.check.report import Report
from onnxbn.errors import UserError
from onnxbn.io.model import Model
from onnxbn.io.save import refuse_overwrite
from onnxbn.runtimes.base import check_runtime, parse_runtime
from onnxbn.runtimes.precision import supports_precision


@dataclass
class VerifiedFold:
    """What `fold_verified` decided and measured: the fold's per-BN `decisions` (onnxbn.fold.FoldReport),
    the `check` on onnxruntime, one Report per `verify_on` runtime, and whether `output` was `written`."""

    decisions: list[dict]
    check: Report
    verify_on: dict[str, Report]
    written: bool

    @property
    def failed(self) -> list[str]:
        """The runtimes whose comparison failed, onnxruntime (the plain check) first."""
        return [k for k, r in {"onnxruntime": self.check, **self.verify_on}.items() if not r.passed]

    @property
    def passed(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        return {"decisions": self.decisions, "check": self.check.to_dict(),
                **({"verify_on": {k: r.to_dict() for k, r in self.verify_on.items()}} if self.verify_on else {})}


def fold_verified(model: str | os.PathLike, output: str | os.PathLike, *, verify_on=(), atol: float | None = None,
                  rtol: float | None = None, precision: str | None = None, device: str = "auto", force: bool = False,
                  **inputs) -> VerifiedFold:
    """Fold `model` (a path or ModelProto) and write it to `output` only when it passes the checks above.

    `inputs`: the data compared on, as `compare` takes it (data, random, batch_size, limit, seed, preset,
    workers, strict, min_samples; default 8 seeded random inputs). `verify_on`: runtime specs (NAME or
    NAME:DEVICE, see onnxbn.runtimes), repeats ignored. `precision`: the arithmetic asked of the runtimes
    that take one (openvino); a UserError when none of them does. `output` is never one of the inputs
    unless `force`. Unknown or missing runtimes fail before any work.
    """
    paths = [p for p in (model, inputs.get("data")) if isinstance(p, (str, os.PathLike))]
    refuse_overwrite(output, paths, force)
    verify = list(dict.fromkeys(verify_on))
    names = [parse_runtime(r, device)[0] for r in verify]
    if precision not in (None, "default") and not any(supports_precision(n, precision) for n in names):
        raise UserError(f"--precision {precision} applies to --verify-on openvino; "
                        f"{', '.join(verify) or 'onnxruntime alone'} run(s) the model in its own types")
    for spec in verify:  # an unknown or missing runtime fails before any work
        check_runtime(spec, device)
    folded, report = folding.fold(Model.open(model))
    with folded.stage(output, paths, force) as staged:
        del folded
        check = compare(model, staged.candidate, atol=atol, rtol=rtol, device=device, **inputs)
        checks = {}
        for spec, name in zip(verify, names, strict=True):
            checks[spec] = compare(model, staged.candidate, atol=atol, rtol=rtol, device=device,
                                   reference_runtime="onnxruntime", candidate_runtime=spec,
                                   precision=precision if supports_precision(name, precision) else None, **inputs)
        result = VerifiedFold(report.decisions, check, checks, written=False)
        if result.passed:
            staged.commit()
            result.written = True
    return result
