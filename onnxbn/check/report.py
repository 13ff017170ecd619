"""The result of `compare` and its renderings: JSON (`to_dict`), the text table, a Markdown summary for a
CI page, JUnit XML, Model Explorer node data and the layerwise error plot (PNG, matplotlib).
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from onnxbn.check.activations import MAX_MARKED
from onnxbn.check.metrics import OutputMetrics
from onnxbn.errors import UserError


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
        rows: list[tuple[str, ...]] = [
            ("output", "max abs", "max rel", "mean abs", "cosine", "top-1", "top-5", *rule, "result")]
        for name, m in self.outputs.items():
            d = m.to_dict()
            rows.append((name, *(_cell(d, k, f) for k, f in (("max_abs_error", ".3g"), ("max_rel_error", ".3g"),
                         ("mean_abs_error", ".3g"), ("cosine_similarity", ".9f"), ("top1_agreement", ".2%"),
                         ("top5_agreement", ".2%"))), *((m.rule.key,) if rule and m.rule else ()),
                         m.result_text() + (" exact" if m.exact else "")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
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
            if r is None:  # every output has a rule under a tolerance file
                continue
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
