"""Streaming error metrics of one output: reference a, candidate b, accumulated batch by batch in float64.

    max_abs_error     max |a - b|
    max_rel_error     max |a - b| / max |a|: the error relative to the output's scale
                      (an element-wise ratio would be meaningless for near-zero
                      values, whose rounding error follows the scale of the terms
                      that summed to them, so every value is floored at max |a|)
    mean_abs_error    mean |a - b|
    cosine_similarity <a, b> / (|a| |b|) over the whole output
    psnr_db           10 log10(max|a|^2 / mean (a - b)^2), in dB (inf when a == b)
    top1/top5         for (N, classes) outputs: share of samples whose top-1 class
                      (top-5 set) is the same
An element passes when |a - b| <= atol + rtol * |a| (+ scaled * max|a| over the element's sample,
the bf16/f16/tf32 defaults; NaN/Inf must match); an element of a non-numeric output (strings,
objects) when it equals the reference's, and such an output reports only its element and mismatch
counts and the first mismatch. A tolerance file's rule (onnxbn.tolerances) may switch the element
rule off and adds gates (median and p99 error, cosine, PSNR, top-k, ...), judged by `finish`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from onnxbn.errors import UserError
from onnxbn.tolerances import QuantileGate, Rule


@dataclass
class OutputMetrics:
    """Streaming error metrics of one output."""

    elements: int = 0
    violations: int = 0
    max_abs_error: float = 0.0
    max_reference: float = 0.0
    sum_abs_error: float = 0.0
    dot: float = 0.0
    norm_a: float = 0.0
    norm_b: float = 0.0
    rows: int = 0
    top1_same: int = 0
    top5_same: int = 0
    has_classes: bool = False
    exact: bool = False  # a non-numeric output (strings, objects): compared for equality only
    samples: int = 0  # of an exact output, to place its first mismatch
    first_mismatch: dict | None = None  # of an exact output: sample, index within it, both values
    sum_sq_error: float = 0.0
    name: str = ""
    rule: Rule | None = None  # from a tolerance file (None: the plain element rule decides)
    quantiles: dict[str, QuantileGate] = field(default_factory=dict)  # the rule's median/p99 gates, streamed
    gates: list[dict] = field(default_factory=list)  # the rule's gates, judged by `finish`

    def update(self, a: np.ndarray, b: np.ndarray, atol: float, rtol: float, scaled: float = 0.0) -> None:
        if a.shape != b.shape:
            raise UserError(f"output shapes differ: reference {a.shape}, candidate {b.shape}")
        if a.dtype.kind in "OSU" or b.dtype.kind in "OSU":
            self._update_exact(a, b)
            return
        a = a.astype(np.float64)
        b = b.astype(np.float64)
        with np.errstate(invalid="ignore"):  # inf - inf is NaN here; matching non-finite values are handled below
            diff = np.abs(a - b)
        both_nonfinite = ~np.isfinite(a) & ~np.isfinite(b) & ((a == b) | (np.isnan(a) & np.isnan(b)))
        diff = np.where(both_nonfinite, 0.0, diff)
        diff = np.where(np.isnan(diff), np.inf, diff)
        finite_a = np.where(np.isfinite(a), a, 0.0)
        self.elements += a.size
        bound = atol + rtol * np.abs(finite_a)
        if scaled and a.ndim >= 1 and a.size:
            bound = bound + scaled * np.abs(finite_a).reshape(len(a), -1).max(axis=1).reshape(
                (-1,) + (1,) * (a.ndim - 1))
        self.violations += int(np.count_nonzero(~(diff <= bound)))
        if a.size:
            self.max_abs_error = max(self.max_abs_error, float(diff.max()))
            self.max_reference = max(self.max_reference, float(np.abs(finite_a).max()))
        self.sum_abs_error += float(diff[np.isfinite(diff)].sum())
        self.sum_sq_error += float(np.square(diff).sum())
        for gate in self.quantiles.values():
            gate.update(diff)
        fb = np.where(np.isfinite(b), b, 0.0)
        self.dot += float((finite_a * fb).sum())
        self.norm_a += float((finite_a * finite_a).sum())
        self.norm_b += float((fb * fb).sum())
        if a.ndim == 2 and a.shape[1] >= 2:
            self.has_classes = True
            self.rows += a.shape[0]
            self.top1_same += int(np.count_nonzero(a.argmax(1) == b.argmax(1)))
            if a.shape[1] > 5:
                ta = np.sort(np.argpartition(-a, 5, axis=1)[:, :5], axis=1)
                tb = np.sort(np.argpartition(-b, 5, axis=1)[:, :5], axis=1)
                self.top5_same += int(np.count_nonzero((ta == tb).all(axis=1)))
            else:
                self.top5_same += a.shape[0]

    def _update_exact(self, a: np.ndarray, b: np.ndarray) -> None:
        """Count the elements of a non-numeric output that differ from the reference's."""
        self.exact = True
        a, b = np.atleast_1d(a), np.atleast_1d(b)
        differ = np.asarray(a != b, dtype=bool)
        if self.first_mismatch is None and differ.any():
            where = tuple(int(i) for i in np.argwhere(differ)[0])
            self.first_mismatch = {"sample": self.samples + where[0], "index": list(where[1:]),
                                   "reference": str(a[where]), "candidate": str(b[where])}
        self.elements += a.size
        self.violations += int(np.count_nonzero(differ))
        self.samples += len(a)

    @property
    def passed(self) -> bool:
        elements = self.violations == 0 or (self.rule is not None and not self.rule.elements)
        return elements and all(g["passed"] for g in self.gates)

    def finish(self) -> None:
        """Judge the rule's gates on the metrics gathered (a UserError for a gate the output cannot have)."""
        if self.rule is not None and self.rule.gates:
            self.gates = self.rule.judge(self.name, {} if self.exact else self.metrics(), self.quantiles)

    @property
    def max_rel_error(self) -> float:
        if self.max_reference > 0:
            return self.max_abs_error / self.max_reference
        return 0.0 if self.max_abs_error == 0 else math.inf

    def metrics(self) -> dict:
        """The error statistics of a numeric output (median/p99 where the rule gates them)."""
        cos = self.dot / math.sqrt(self.norm_a * self.norm_b) if self.norm_a > 0 and self.norm_b > 0 else \
            (1.0 if self.norm_a == self.norm_b else 0.0)
        mse = self.sum_sq_error / max(self.elements, 1)
        peak = self.max_reference ** 2
        psnr = math.inf if mse == 0 else (10 * math.log10(peak / mse) if peak > 0 else -math.inf)
        out = {"elements": self.elements, "violations": self.violations,
               "max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
               "mean_abs_error": self.sum_abs_error / max(self.elements, 1), "cosine_similarity": cos,
               "psnr_db": psnr}
        for gate, quantile in self.quantiles.items():
            out[f"{gate}_error"] = quantile.result()[0]
        if self.has_classes:
            out["top1_agreement"] = self.top1_same / self.rows
            out["top5_agreement"] = self.top5_same / self.rows
        return out

    def to_dict(self) -> dict:
        if self.exact:
            out = {"passed": self.passed, "elements": self.elements, "violations": self.violations,
                   "comparison": "exact", "first_mismatch": self.first_mismatch}
        else:
            out = {"passed": self.passed, **self.metrics()}
        if self.rule is not None:
            out["rule"] = {"key": self.rule.key, "atol": self.rule.atol, "rtol": self.rule.rtol,
                           "scaled": self.rule.scaled, "elements_decide": self.rule.elements}
            out["gates"] = self.gates
        return out

    def result_text(self) -> str:
        """PASS, or FAIL with the elements outside the rule and the gates that failed."""
        if self.passed:
            return "PASS"
        why = [f"{self.violations} of {self.elements}"] if self.violations and (
            self.rule is None or self.rule.elements) else []
        why += [g["gate"] for g in self.gates if not g["passed"]]
        return f"FAIL ({'; '.join(why)})"
