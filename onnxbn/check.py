"""Numerical equivalence of two models on the same inputs, on one runtime or across two.

Per output, over all samples, with a = reference and b = candidate (in float64):
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
An element passes when |a - b| <= atol + rtol * |a| (NaN/Inf must match); an element of
a non-numeric output (strings, objects) when it equals the reference's, and such an output
reports only its element and mismatch counts and the first mismatch. The comparison
passes when every element of every output does. At bf16, f16 or tf32 (a runtime that
lowers the model, or a model that computes in float16/bfloat16) the default rule adds
`scaled * max|a|` over the element's sample (all axes but the first), as rounding error
follows the sample's scale (runtimes.precision.TOLERANCES).
`tolerances` (a file or dict, see onnxbn.tolerances) gives outputs their own element rule
and gates (median and p99 error, cosine, PSNR, top-k, ...); the report names the rule that
decided each output and each gate's value against its bound.
The reference may be golden outputs stored earlier (onnxbn.golden, `save_outputs`): the
candidate runs alone on the data they were made from, checked sample by sample by digest.
`layerwise` runs the first few samples (LAYERWISE_SAMPLES) with the activations the two graphs
share exposed (not initializers or what constants alone compute), at most `max_marked` per
session, and names the first one, in the reference's topological order, that fails the same
rule; per tensor it reports max, mean and p99 |a - b| and the max relative error.

Each side runs on a runtime of `onnxbn.runtimes` (onnxruntime by default; openvino,
tract, reference), so one model can be checked on the runtime it ships to against
another on onnxruntime. The report names each side's runtime, version, device and the
precision the runtime chose. Tolerances left as None take the default for the precisions
the two sides actually ran at, and for a float16/bfloat16 model its own type's
(runtimes.precision.tolerance_choice: 1e-5 at full precision); the report says which applied and why
(`tolerance`, `tolerance_reason`).
Layerwise exposes the shared tensors as graph outputs on both runtimes; where a runtime
cannot load the exposed graph, the report says so instead of comparing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import onnx

from onnxbn.activations import LAYERWISE_SAMPLES, MAX_MARKED, activation_names, chunks
from onnxbn.errors import UserError
from onnxbn.feeding import fit_batch_size, fixed_batch, model_input, open_model_data, run_batches
from onnxbn.golden import GoldenOutputs, GoldenWriter, sample_digests
from onnxbn.graph import FLOAT_TYPES, graph_inputs, value_types
from onnxbn.io.copies import model_sha256
from onnxbn.io.load import load_model, load_structure
from onnxbn.runtimes.base import check_runtime, expose, parse_runtime
from onnxbn.runtimes.precision import TOLERANCES, RuntimeInfo, model_precision, tolerance_choice
from onnxbn.runtimes.sessions import open_session
from onnxbn.tolerances import INT8_WHY, QuantileGate, Rule, holds_qdq, int8_rule, load_tolerances

RANDOM_BATCH_BYTES = 2**30  # the most one batch of --random inputs may take (a sample over it is refused)


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


def _layerwise_text(layerwise: dict) -> str:
    """'120 shared activations compared (2 passes, at most 64 exposed per session)'."""
    passes = layerwise.get("passes", 1)
    return (f"{layerwise['compared']} shared activations compared ({passes} pass{'es' if passes != 1 else ''}, "
            f"at most {layerwise.get('max_marked', MAX_MARKED)} exposed per session)")


def _tensor_stats(entry: dict) -> str:
    """A layerwise tensor's statistics: 'max abs 4.5, mean abs 0.3, p99 abs 2.1, max rel 0.8' (or why not)."""
    if "reason" in entry:
        return entry["reason"]
    return ", ".join(f"{label} {entry[key]:.3g}" for key, label in (
        ("max_abs_error", "max abs"), ("mean_abs_error", "mean abs"), ("p99_abs_error", "p99 abs"),
        ("max_rel_error", "max rel")))


def _cell(metrics: dict, key: str, spec: str) -> str:
    """One table cell: the metric formatted, or '-' where the output has none (no classes, not numeric)."""
    return format(metrics[key], spec) if key in metrics else "-"


@dataclass
class Report:
    """The result of `compare`: `.passed`, per-output metrics, `.to_dict()`, table, JUnit."""

    outputs: dict[str, OutputMetrics]
    atol: float
    rtol: float
    samples: int
    inputs: str
    provider: str
    reference: str = ""
    candidate: str = ""
    layerwise: dict | None = None
    skipped_inputs: list[str] = field(default_factory=list)
    reference_runtime: dict = field(default_factory=dict)
    candidate_runtime: dict = field(default_factory=dict)
    tolerance: str = "given"  # "given", or the precision whose default tolerances applied
    scaled_atol: float = 0.0  # times max|a| of each sample, added to atol (the bf16/f16/tf32 defaults)
    tolerance_reason: str = ""  # why these tolerances: which were given, what set the precision of the defaults
    tolerances: str | None = None  # the tolerance file whose rules judged the outputs
    golden: dict | None = None  # the stored reference outputs compared with (path and their meta)

    @property
    def passed(self) -> bool:
        return all(m.passed for m in self.outputs.values())

    def to_dict(self) -> dict:
        d = {"passed": self.passed, "reference": self.reference, "candidate": self.candidate,
             "atol": self.atol, "rtol": self.rtol, "samples": self.samples, "inputs": self.inputs,
             "provider": self.provider, "outputs": {k: m.to_dict() for k, m in self.outputs.items()}}
        if self.reference_runtime or self.candidate_runtime:
            d["runtimes"] = {"reference": self.reference_runtime, "candidate": self.candidate_runtime}
            d["tolerance"] = self.tolerance
            d["tolerance_reason"] = self.tolerance_reason
            d["scaled_atol"] = self.scaled_atol
        if self.tolerances is not None:
            d["tolerances"] = self.tolerances
        if self.golden is not None:
            d["reference_outputs"] = self.golden
        if self.layerwise is not None:
            d["layerwise"] = self.layerwise
        d["skipped"] = len(self.skipped_inputs)
        if self.skipped_inputs:
            d["skipped_inputs"] = self.skipped_inputs
        return d

    def table(self) -> str:
        rule = ("rule",) if self.tolerances is not None else ()
        rows = [("output", "max abs", "max rel", "mean abs", "cosine", "top-1", "top-5", *rule, "result")]
        for name, m in self.outputs.items():
            d = m.to_dict()
            rows.append((name, *(_cell(d, k, f) for k, f in (("max_abs_error", ".3g"), ("max_rel_error", ".3g"),
                         ("mean_abs_error", ".3g"), ("cosine_similarity", ".9f"), ("top1_agreement", ".2%"),
                         ("top5_agreement", ".2%"))), *((m.rule.key,) if rule else ()),
                         m.result_text() + (" exact" if m.exact else "")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        verdict = "PASS" if self.passed else "FAIL"
        skipped = f", {len(self.skipped_inputs)} unreadable skipped" if self.skipped_inputs else ""
        tolerance = "" if self.tolerance in ("given", "f32", "f64", "int8") else f" (default for {self.tolerance})"
        scale = f" + {self.scaled_atol:g}*max|a(sample)|" if self.scaled_atol else ""
        rules = f" (default; per-output rules from {self.tolerances})" if self.tolerances is not None else ""
        lines.append(f"{verdict}: {self.samples} samples compared ({self.inputs}{skipped}), "
                     f"|a-b| <= {self.atol:g}{scale} + {self.rtol:g}*|a|{tolerance}{rules}, {self._runtimes_text()}")
        lines += self._rule_lines()
        if self.golden is not None:
            lines.append(f"reference: golden outputs {self.golden['path']} ({self.golden['origin']})")
        for side, info in (("reference", self.reference_runtime), ("candidate", self.candidate_runtime)):
            if info.get("note"):
                lines.append(f"{side}: {info['note']}")
        if self.layerwise is not None:
            first = self.layerwise.get("first_divergence")
            if not self.layerwise.get("available", True):
                lines.append(f"layerwise: not available: {self.layerwise['reason']}")
            else:
                lines.append(f"layerwise: {_layerwise_text(self.layerwise)}; "
                             + (f"first divergence at {first['tensor']!r} ({_tensor_stats(first)})"
                                if first else "none diverges"))
        return "\n".join(lines)

    def _rule_lines(self, code: str = "") -> list[str]:
        """Per output under a tolerance file: the rule that decided it, its element rule, each gate's value
        against its bound (`code` quotes names and metrics, for Markdown)."""
        if self.tolerances is None:
            return []
        lines = []
        for name, m in self.outputs.items():
            r = m.rule
            element = (f"|a-b| <= {r.atol:g} + {r.rtol:g}*|a|" + (f" + {r.scaled:g}*max|a(sample)|" if r.scaled else "")
                       if r.elements else "element rule off (gates decide)")
            if code:
                element = element.replace("|", "\\|")
            gates = [f"{code}{g['gate']}{code} {g['value']:.4g} {g['op']} {g['bound']:g} "
                     f"{'pass' if g['passed'] else 'FAIL'}" for g in m.gates]
            lines.append(f"{code}{name}{code}: rule {code}{r.key}{code}: " + "; ".join([element, *gates]))
        return lines

    def _runtimes_text(self) -> str:
        ref, cand = self.reference_runtime, self.candidate_runtime
        plain = {"onnxruntime"} >= {ref.get("runtime", "onnxruntime"), cand.get("runtime", "onnxruntime")}
        if plain and not cand.get("lowered") and ref.get("precision") == cand.get("precision") \
                and ref.get("device", self.provider) == cand.get("device", self.provider):
            return f"onnxruntime on {self.provider}"

        def label(info: dict) -> str:
            how = "the runtime's default" if info["requested"] == "default" else f"asked {info['requested']}"
            return f"{info['runtime']} {info['version']} on {info['device']}, {info['precision']} ({how})"
        return f"reference: {label(ref)}; candidate: {label(cand)}"

    def markdown(self) -> str:
        """A short Markdown summary for a CI page: verdict, per-output table, first divergence."""
        icon = "PASS" if self.passed else "FAIL"
        lines = [f"### onnxbn check: **{icon}**", "",
                 f"`{self.reference or 'reference'}` vs `{self.candidate or 'candidate'}`: {self.samples} samples "
                 f"compared ({self.inputs}" + (f", {len(self.skipped_inputs)} unreadable skipped" if self.skipped_inputs
                                               else "") + f"), {self._runtimes_text()}", "",
                 "| output | max abs | max rel | cosine | top-1 | result |", "|---|---|---|---|---|---|"]
        for name, m in self.outputs.items():
            d = m.to_dict()
            result = ("pass" if m.passed else f"**fail** {m.result_text()[5:]}") + (" (exact)" if m.exact else "")
            lines.append(f"| `{name}` | {_cell(d, 'max_abs_error', '.3g')} | {_cell(d, 'max_rel_error', '.3g')} | "
                         f"{_cell(d, 'cosine_similarity', '.9f')} | {_cell(d, 'top1_agreement', '.2%')} | {result} |")
        scale = f" + {self.scaled_atol:g}*max\\|a(sample)\\|" if self.scaled_atol else ""
        rules = f" (default; per-output rules from `{self.tolerances}`)" if self.tolerances is not None else ""
        lines += ["", f"Rule: \\|a-b\\| <= {self.atol:g}{scale} + {self.rtol:g}*\\|a\\|{rules}."]
        lines += [f"- {line}" for line in self._rule_lines(code="`")]
        if self.layerwise is not None:
            first = self.layerwise.get("first_divergence")
            if not self.layerwise.get("available", True):
                lines.append(f"Layerwise: not available ({self.layerwise['reason']}).")
            else:
                lines.append(f"Layerwise: {_layerwise_text(self.layerwise)}; " + (
                    f"first divergence at `{first['tensor']}` ({_tensor_stats(first)})." if first
                    else "none diverges."))
        return "\n".join(lines) + "\n"

    def node_data(self) -> dict:
        """The layerwise errors as Model Explorer node data (one graph's `GraphNodeData`): `results`
        keyed by tensor name (Model Explorer matches a node by its output tensor names) with each
        tensor's max relative error as `value` (Model Explorer's schema takes one value per node; the
        other statistics are in the JSON report), and thresholds colouring a node green within the
        relative tolerance, orange up to 100x it, red beyond. JSON has no infinity: inf becomes 1e308."""
        if not self.layerwise or not self.layerwise.get("tensors"):
            raise UserError("node data needs layerwise errors: add --layerwise (and models that share tensor names)")
        results = {}
        for t in self.layerwise["tensors"]:
            value = t.get("max_rel_error", math.inf)
            results[t["tensor"]] = {"value": value if math.isfinite(value) else 1e308}
        bound = max(self.rtol, 1e-12)
        return {"results": results,
                "thresholds": [{"value": bound, "bgColor": "#a5d6a7"}, {"value": 100 * bound, "bgColor": "#ffcc80"},
                               {"value": 1e308, "bgColor": "#ef9a9a"}]}

    def plot(self, path) -> None:
        """Max relative error, p99 and mean |a-b| per shared tensor in the reference's topological order
        (log scale), the relative tolerance as a line and the first divergence marked; a PNG at `path`."""
        if not self.layerwise or not self.layerwise.get("tensors"):
            raise UserError("--plot needs layerwise errors: add --layerwise")
        try:
            import matplotlib
        except ImportError:
            raise UserError("--plot needs matplotlib: pip install 'onnxbn[report]'") from None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tensors = self.layerwise["tensors"]
        floor = 1e-12
        values = [max(min(t.get("max_rel_error", math.inf), 1e6), floor) for t in tensors]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(values)), 4), dpi=100)
        ax.semilogy(range(len(values)), values, marker="o", markersize=3, linewidth=1, label="max rel error")
        for key, label in (("p99_abs_error", "p99 |a-b|"), ("mean_abs_error", "mean |a-b|")):
            ax.semilogy(range(len(values)), [max(min(t.get(key, math.inf), 1e6), floor) for t in tensors],
                        linewidth=1, alpha=0.7, label=label)
        ax.axhline(max(self.rtol, floor), color="tab:orange", linestyle="--", label=f"rtol {self.rtol:g}")
        first = self.layerwise.get("first_divergence")
        if first is not None:
            i = next(k for k, t in enumerate(tensors) if t["tensor"] == first["tensor"])
            ax.axvline(i, color="tab:red", linewidth=1, label=f"first divergence: {first['tensor']}")
        ax.set_xlabel("shared tensor (reference's topological order)")
        ax.set_ylabel(f"error (floor {floor:g})")
        ax.set_title("onnxbn check --layerwise: " + ("PASS" if self.passed else "FAIL"))
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png")
        plt.close(fig)

    def junit(self) -> str:
        suite = ET.Element("testsuite", name="onnxbn.check", tests=str(len(self.outputs)),
                           failures=str(sum(not m.passed for m in self.outputs.values())))
        if self.reference_runtime or self.candidate_runtime:
            props = ET.SubElement(suite, "properties")
            for side, info in (("reference", self.reference_runtime), ("candidate", self.candidate_runtime)):
                for key in ("runtime", "version", "device", "precision", "requested"):
                    ET.SubElement(props, "property", name=f"{side}.{key}", value=str(info.get(key, "")))
            ET.SubElement(props, "property", name="atol", value=f"{self.atol:g}")
            ET.SubElement(props, "property", name="rtol", value=f"{self.rtol:g}")
            ET.SubElement(props, "property", name="scaled_atol", value=f"{self.scaled_atol:g}")
        for name, m in self.outputs.items():
            case = ET.SubElement(suite, "testcase", classname="onnxbn.check", name=name)
            if m.rule is not None:
                props = ET.SubElement(case, "properties")
                ET.SubElement(props, "property", name="rule", value=m.rule.key)
                for g in m.gates:
                    ET.SubElement(props, "property", name=f"gate.{g['gate']}",
                                  value=f"{g['value']:.6g} {g['op']} {g['bound']:g} {'pass' if g['passed'] else 'fail'}")
            if not m.passed:
                failed = [f"{g['gate']} {g['value']:.4g} not {g['op']} {g['bound']:g}" for g in m.gates if not g["passed"]]
                counted = m.violations and (m.rule is None or m.rule.elements)
                message = [f"{m.violations} of {m.elements} elements " + ("differ" if m.exact else "outside tolerance")
                           ] if counted else []
                failure = ET.SubElement(case, "failure", message="; ".join(message + failed))
                failure.text = json.dumps(m.to_dict(), indent=1)
        return ET.tostring(suite, encoding="unicode")


class RandomInputs:
    """`count` seeded standard-normal samples of shape `dims`, generated batch by batch.

    A dataset for `run_batches`: each batch is made in the type asked for (the model's input
    type), a sample at a time, so only one batch of that type and one float64 sample are ever
    held. The values are those of `np.random.default_rng(seed).standard_normal((count, *dims))`
    cast to that type (one stream, drawn in the same order)."""

    is_images = False

    def __init__(self, dims: tuple[int, ...], count: int, seed: int):
        self.dims, self.total, self.seed = dims, count, seed
        self.description = f"random N(0,1), seed {seed}"
        self.skipped: list[str] = []
        self.consumed = 0

    def has_labels(self) -> bool:
        return False

    def batches(self, batch_size: int, workers: int = 0, strict: bool = False, start: int = 0,
                dtype=np.float32) -> Iterator[tuple[np.ndarray, None]]:
        """(x of `dtype`, None) batches of `batch_size` samples from sample `start` on."""
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
        rng = np.random.default_rng(self.seed)
        for _ in range(start):
            rng.standard_normal(self.dims)
        for begin in range(start, self.total, batch_size):
            x = np.empty((min(batch_size, self.total - begin), *self.dims), dtype=dtype)
            for i in range(len(x)):
                x[i] = rng.standard_normal(self.dims)
            self.consumed = begin + len(x)
            yield x, None


def random_inputs(model: onnx.ModelProto, count: int, seed: int = 0, batch_size: int = 32) -> tuple[RandomInputs, int]:
    """`count` seeded standard-normal inputs of the model's input shape and type, and the batch size
    to feed them at: `batch_size`, lowered where that many samples would take more than
    RANDOM_BATCH_BYTES. A UserError when the shape past the batch axis is not fixed, or when one
    sample (or the model's fixed batch) alone takes more than RANDOM_BATCH_BYTES."""
    _, dtype, shape = model_input(model)
    dims = shape[1:]
    if not shape or any(not (isinstance(d, int) and d > 0) for d in dims):
        raise UserError(f"the model's input shape {shape} is not fixed past the batch axis; give --data instead of --random")
    if count < 1:
        raise UserError(f"--random must be at least 1 (got {count})")
    sample_bytes = math.prod(dims) * np.dtype(dtype).itemsize
    fixed = fixed_batch(shape)
    smallest = (fixed or 1) * sample_bytes
    if smallest > RANDOM_BATCH_BYTES:
        raise UserError(f"--random: the model's input ({', '.join(map(str, shape))}) {np.dtype(dtype).name} takes "
                        f"{smallest / 2**30:.1f} GiB per {'batch' if fixed else 'sample'}, over the "
                        f"{RANDOM_BATCH_BYTES / 2**30:g} GiB that generated inputs may take; give --data with real "
                        "inputs, or use a model with smaller fixed dims")
    return RandomInputs(tuple(dims), count, seed), min(batch_size, RANDOM_BATCH_BYTES // sample_bytes)


LAYERWISE_STATS = ("max_abs_error", "mean_abs_error", "p99_abs_error", "max_rel_error")


def _layerwise(ref: onnx.ModelProto, cand: onnx.ModelProto, x: np.ndarray, feed_name: str, atol, rtol,
               ref_side: dict, cand_side: dict, scaled: float = 0.0, max_marked: int = MAX_MARKED):
    """Every float activation the two graphs share (onnxbn.activations: not initializers, Constant
    outputs or what is computed from them alone), compared on the first inputs under the same rule,
    at most `max_marked` exposed per session (one run of both sides per group of tensors).

    Per tensor: max, mean and 99th-percentile |a - b| (the percentile as the tolerance files' p99
    gate computes it, at most 0.1 % low) and max |a - b| / max |a|. `ref_side` / `cand_side`:
    open_session keyword arguments (runtime, device, precision). A runtime that cannot load the
    exposed graph gives {"available": False, "reason": ...}.
    """
    if max_marked < 1:
        raise UserError(f"--max-marked must be at least 1 (got {max_marked})")
    ref_types, cand_types = value_types(ref), value_types(cand)
    cand_names = set(activation_names(cand))
    names = [o for o in activation_names(ref)  # in the reference's node order
             if o in cand_names and o in ref_types and o in cand_types
             and ref_types[o].tensor_type.elem_type in FLOAT_TYPES]
    tensors, first = [], None
    for group in chunks(names, max_marked):
        values = []
        for model, types, side in ((ref, ref_types, ref_side), (cand, cand_types, cand_side)):
            try:
                values.append(open_session(expose(model, group, types), **side).run(group, {feed_name: x}))
            except UserError as exc:
                return {"available": False, "compared": 0, "first_divergence": None, "tensors": [],
                        "reason": f"{side['runtime']} cannot return this graph's intermediate tensors ({exc})"}
        for name, a, b in zip(group, *values):
            if a.shape != b.shape:
                entry = {"tensor": name, "passed": False, "max_abs_error": math.inf,
                         "reason": f"shape {a.shape} vs {b.shape}"}
            else:
                m = OutputMetrics(quantiles={"p99_abs": QuantileGate(0.99, math.inf)})
                m.update(a, b, atol, rtol, scaled)
                stats = m.metrics()
                entry = {"tensor": name, "passed": m.passed, **{k: stats[k] for k in LAYERWISE_STATS}}
            tensors.append(entry)
            if first is None and not entry["passed"]:
                first = entry
        del values
    out = {"compared": len(names), "max_marked": max_marked, "passes": -(-len(names) // max_marked),
           "first_divergence": first, "tensors": tensors}
    if {ref_side["runtime"], cand_side["runtime"]} - {"onnxruntime", "reference"}:
        out["method"] = ("intermediate tensors exposed as graph outputs: an optimising runtime may fuse less "
                         "around them than in the deployed graph")
    return out


def _side_model(model, side: dict) -> tuple[onnx.ModelProto, str | None]:
    """(proto, folder) for one side: a file for onnxruntime as its structure (the weights stay in
    the file, read by onnxruntime from `folder`); anything else loaded whole."""
    if isinstance(model, (str, os.PathLike)) and parse_runtime(side["runtime"])[0] == "onnxruntime":
        return load_structure(model)
    return load_model(model), None


def _open_inputs(model: onnx.ModelProto, data, random: int | None, seed: int, limit: int | None, preset,
                 batch_size: int):
    """(dataset, description, batch size) of compare's inputs: `data`, or `random` seeded normal inputs."""
    _, _, shape = model_input(model)
    if data is None:
        if limit is not None:
            raise UserError("--limit samples --data; with --random N, N is the number of inputs")
        dataset, batch_size = random_inputs(model, random if random is not None else 8, seed, batch_size)
        description = dataset.description
    else:
        description = str(data) if isinstance(data, (str, os.PathLike)) else "array"
        dataset = open_model_data(model, data, preset=preset, limit=limit, seed=seed)
    return dataset, description, fit_batch_size(shape, batch_size, dataset.total)


def _require_samples(dataset, samples: int, min_samples: int) -> None:
    if samples < min_samples:
        skipped = f"; {len(dataset.skipped)} unreadable, e.g. {dataset.skipped[0]}" if dataset.skipped else ""
        raise UserError(f"{dataset.description}: only {samples} sample(s) could be compared (at least {min_samples} "
                        f"needed){skipped}; nothing was verified")


def _golden_meta(reference, proto: onnx.ModelProto, folder, info: RuntimeInfo, description: str, dataset) -> dict:
    """What golden outputs record about where they came from (onnxbn.golden)."""
    return {"model": str(reference) if isinstance(reference, (str, os.PathLike)) else "<model>",
            "model_sha256": model_sha256(proto, folder=folder), "runtime": info.to_dict(), "data": description,
            "skipped": len(dataset.skipped)}


def _golden_info(golden: GoldenOutputs, candidate: onnx.ModelProto) -> RuntimeInfo:
    """The runtime that made golden outputs, from their meta; for ONNX test data, which does not record
    it, an f32 reference of unknown runtime."""
    stored = golden.meta.get("runtime")
    if stored:
        return RuntimeInfo(**{k: stored[k] for k in RuntimeInfo.__dataclass_fields__ if k in stored})
    return RuntimeInfo("unrecorded", "", "unrecorded", "f32", "default", model_precision(candidate),
                       note=f"{golden.path} does not record the runtime that made its outputs")


def _golden_batches(golden: GoldenOutputs, session, dataset, names: list[str], model: onnx.ModelProto,
                    batch_size: int, workers: int, strict: bool):
    """(x, golden outputs, candidate outputs) batch by batch; a UserError as soon as a sample's digest
    differs from the stored one or the data runs past the stored samples."""
    seen = 0
    made_from = f"{golden.meta.get('data') or golden.path}, {golden.samples} samples"
    for x, _, outputs in run_batches(session, dataset, names, model, batch_size, workers=workers, strict=strict,
                                     desc="check"):
        end = seen + len(x)
        if end > golden.samples:
            raise UserError(f"{dataset.description}: holds more samples than the {golden.samples} the golden outputs "
                            f"{golden.path} were made from ({made_from}); give the same data")
        differ = np.flatnonzero((sample_digests(x) != golden.digests[seen:end]).any(axis=1))
        if len(differ):
            raise UserError(f"{dataset.description}: sample {seen + int(differ[0])} differs from the input the golden "
                            f"outputs {golden.path} were made from ({made_from}; inputs sha256 "
                            f"{golden.meta.get('inputs_sha256', 'of its inputs')[:16]}); give the same data "
                            "(and --limit, --seed, --preset)")
        yield x, golden.rows(seen, end), outputs
        seen = end


def compare(reference, candidate, data=None, atol: float | None = None, rtol: float | None = None,
            batch_size: int = 32, device: str = "auto", layerwise: bool = False, random: int | None = None,
            seed: int = 0, limit: int | None = None, workers: int = 0, preset: str | None = None, strict: bool = False,
            min_samples: int = 1, *, runtime: str | None = None, reference_runtime: str | None = None,
            candidate_runtime: str | None = None, precision: str | None = None,
            reference_precision: str | None = "f32", tolerances=None, save_outputs=None,
            max_marked: int = MAX_MARKED) -> Report:
    """Run both models on the same inputs and report how far apart their outputs are.

    `reference`/`candidate`: paths or ModelProtos with the same input and outputs;
    `data`: image folder, .npz, array, or None with `random` = N seeded normal inputs (default 8;
    generated batch by batch, see random_inputs; `limit` applies to `data` only);
    `preset`: image preprocessing (default: the reference's metadata, else imagenet).
    Unreadable images are skipped and listed in the report (`strict` raises instead).
    Fewer than `min_samples` compared samples raises UserError: a check of nothing never passes.
    `runtime` runs both sides there; `reference_runtime` / `candidate_runtime` each side
    (default onnxruntime; NAME or NAME:DEVICE, see onnxbn.runtimes). `precision` is the
    candidate's (None = the runtime's own choice; f32, bf16, f16 for openvino),
    `reference_precision` the reference's (f32). `atol` and `rtol` both None: the defaults
    for the precisions the two sides ran at, or the model's own float type where that is
    float16/bfloat16 (1e-5 at full precision; at bf16/f16/tf32 looser,
    plus a term relative to each sample's scale, see runtimes.precision.TOLERANCES); giving either
    one applies the plain rule |a-b| <= atol + rtol*|a| (the other defaulting as above).
    `tolerances`: per-output rules and gates, a JSON/YAML file or a dict (onnxbn.tolerances); outputs
    no rule matches keep the rule above.
    `reference` may be golden outputs (`onnxbn.load_outputs`): the candidate alone runs on `data`
    (default: a test-data folder's own inputs; else as above), which must be the inputs the outputs
    were made from: a sample whose digest differs, or a different number of samples, is a UserError.
    The tolerance defaults then follow the runtime and precision the golden outputs record.
    `save_outputs`: also store the reference model's outputs there, as `save_outputs` does.
    `layerwise`: also compare every shared activation on the first LAYERWISE_SAMPLES inputs, at most
    `max_marked` exposed per runtime session (see _layerwise).
    """
    golden = reference if isinstance(reference, GoldenOutputs) else None
    if runtime is not None and (reference_runtime is not None or candidate_runtime is not None):
        raise UserError("give --runtime (both sides) or --reference-runtime/--candidate-runtime, not both")
    ref_side = {"runtime": reference_runtime or runtime or "onnxruntime", "device": device,
                "precision": reference_precision}
    cand_side = {"runtime": candidate_runtime or runtime or "onnxruntime", "device": device, "precision": precision}
    for side in (cand_side,) if golden is not None else (cand_side, ref_side):  # fail before any work
        check_runtime(**side)
    if (atol is not None and atol < 0) or (rtol is not None and rtol < 0):
        raise UserError("--atol and --rtol must not be negative")
    if golden is not None:
        if layerwise or save_outputs is not None:
            raise UserError(f"{'--layerwise' if layerwise else '--save-outputs'} needs the reference model; golden "
                            "outputs hold only its outputs")
        ref, ref_folder = cand, cand_folder = _side_model(candidate, cand_side)
        out_names = golden.output_names(cand)
        if data is None and golden.inputs is not None:
            data = golden.inputs
        if np.dtype(model_input(cand)[1]) != golden.input_dtype:
            raise UserError(f"the candidate takes {np.dtype(model_input(cand)[1]).name} inputs; the golden outputs "
                            f"{golden.path} were made from {golden.input_dtype.name} inputs")
    else:
        # onnxruntime reads a model file's weights itself: Python holds only the graph (load_structure)
        (ref, ref_folder), (cand, cand_folder) = (_side_model(m, side) for m, side in ((reference, ref_side),
                                                                                       (candidate, cand_side)))
        out_names = [o.name for o in ref.graph.output]
        missing = [n for n in out_names if n not in {o.name for o in cand.graph.output}]
        if missing:
            raise UserError(f"the candidate has no output {missing[0]!r}; compare models with the same outputs")
    feed_name, dtype, shape = model_input(ref)
    if [i.name for i in graph_inputs(cand)] != [feed_name]:
        raise UserError(f"the candidate's inputs {[i.name for i in graph_inputs(cand)]} differ from the reference's [{feed_name!r}]")
    rules = load_tolerances(tolerances) if tolerances is not None else None
    if rules is not None:
        rules.check_covers(out_names)
    dataset, description, batch_size = _open_inputs(ref, data, random, seed, limit, preset, batch_size)
    if golden is not None and data is golden.inputs:
        description = str(golden.path)
    s_ref = open_session(ref, folder=ref_folder, **ref_side) if golden is None else None
    s_cand = open_session(cand, folder=cand_folder, **cand_side)
    ref_info = s_ref.info if golden is None else _golden_info(golden, cand)
    precision, why = tolerance_choice(ref_info, s_cand.info)
    d_atol, d_rtol, d_scaled = TOLERANCES.get(precision, TOLERANCES["f32"])
    if atol is None and rtol is None:
        tolerance, reason, scaled = precision, why, d_scaled
    else:
        given = [name for name, value in (("atol", atol), ("rtol", rtol)) if value is not None]
        tolerance, reason, scaled = "given", " and ".join(given) + " given", 0.0
        if len(given) == 1:
            reason += f"; {'rtol' if given == ['atol'] else 'atol'} the {precision} default ({why})"
    int8 = atol is None and rtol is None and holds_qdq(cand)  # an INT8 candidate: gates, not elements
    if int8:
        tolerance, reason = "int8", INT8_WHY
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    metrics = {}
    for n in out_names:
        rule = rules.rule_for(n, atol, rtol, scaled) if rules is not None else None
        if int8 and (rule is None or rule.key == "default"):
            rule = int8_rule(atol, rtol, scaled)
        metrics[n] = OutputMetrics(name=n, rule=rule, quantiles=rule.quantile_gates() if rule else {})
    samples, first_batch = 0, None
    if golden is not None:
        batches = _golden_batches(golden, s_cand, dataset, out_names, cand, batch_size, workers, strict)
    else:
        batches = ((x, a_vals, s_cand.run(out_names, {feed_name: x})) for x, _, a_vals in run_batches(
            s_ref, dataset, out_names, ref, batch_size, workers=workers, strict=strict, desc="check"))
    inputs = [m for m in (reference, candidate, data) if isinstance(m, (str, os.PathLike))]
    with GoldenWriter(save_outputs, out_names, feed_name, inputs) if save_outputs is not None else \
            contextlib.nullcontext() as writer:
        for x, a_vals, b_vals in batches:
            first_batch = x if first_batch is None else first_batch
            if writer is not None:
                writer.add(x, a_vals)
            for name, a, b in zip(out_names, a_vals, b_vals):
                m = metrics[name]
                m.update(a, b, *((m.rule.atol, m.rule.rtol, m.rule.scaled) if m.rule else (atol, rtol, scaled)))
            samples += len(x)
        if golden is not None and samples != golden.samples:
            raise UserError(f"{dataset.description}: {samples} samples compared, but the golden outputs {golden.path} "
                            f"hold {golden.samples}; give the data they were made from")
        _require_samples(dataset, samples, min_samples)
        for m in metrics.values():
            m.finish()
        if writer is not None:
            writer.commit(_golden_meta(reference, ref, ref_folder, s_ref.info, description, dataset))
    report = Report(metrics, atol, rtol, samples, description, s_cand.info.device,
                    reference=str(golden.path) if golden is not None else str(reference)
                    if not isinstance(reference, onnx.ModelProto) else "<model>",
                    candidate=str(candidate) if not isinstance(candidate, onnx.ModelProto) else "<model>",
                    skipped_inputs=dataset.skipped, reference_runtime=ref_info.to_dict(),
                    candidate_runtime=s_cand.info.to_dict(), tolerance=tolerance, scaled_atol=scaled,
                    tolerance_reason=reason,
                    tolerances=rules.source if rules is not None else "the int8 rule" if int8 else None,
                    golden=golden.summary() if golden is not None else None)
    if layerwise and first_batch is not None:
        report.layerwise = _layerwise(ref, cand, first_batch[:LAYERWISE_SAMPLES], feed_name, atol, rtol,
                                      dict(ref_side, folder=ref_folder), dict(cand_side, folder=cand_folder), scaled,
                                      max_marked)
    return report


def save_outputs(reference, path, data=None, *, random: int | None = None, seed: int = 0, limit: int | None = None,
                 batch_size: int = 32, device: str = "auto", runtime: str | None = None,
                 precision: str | None = "f32", preset: str | None = None, workers: int = 0, strict: bool = False,
                 min_samples: int = 1, force: bool = False) -> dict:
    """Run `reference` alone on `data` (or `random` seeded normal inputs, as `compare` makes them) and
    store its outputs at `path` as golden outputs (onnxbn.golden: a `.npz`, or any other path a new
    folder in ONNX's test-data layout), streamed batch by batch, with the inputs' digests, the model's
    sha256 and the runtime and precision that made them; returns that meta. `runtime` and `precision`
    are the reference side's (onnxruntime, f32). Later: `compare(load_outputs(path), candidate, data)`.
    """
    side = {"runtime": runtime or "onnxruntime", "device": device, "precision": precision}
    check_runtime(**side)
    proto, folder = _side_model(reference, side)
    feed_name, _, _ = model_input(proto)
    names = [o.name for o in proto.graph.output]
    dataset, description, batch_size = _open_inputs(proto, data, random, seed, limit, preset, batch_size)
    session = open_session(proto, folder=folder, **side)
    inputs = [m for m in (reference, data) if isinstance(m, (str, os.PathLike))]
    with GoldenWriter(path, names, feed_name, inputs, force) as writer:
        samples = 0
        for x, _, outputs in run_batches(session, dataset, names, proto, batch_size, workers=workers, strict=strict,
                                         desc="golden"):
            writer.add(x, outputs)
            samples += len(x)
        _require_samples(dataset, samples, min_samples)
        return writer.commit(_golden_meta(reference, proto, folder, session.info, description, dataset))
