"""The quantization report: what was done (BN fold, opset, ranges, recovery) and the INT8 check against the float model.

The gate (`passed`) is the check's int8 rule (onnxbn.tolerances.INT8_GATES): on every output the cosine similarity
is at least `min_cosine` and the top-1 agreement at least `min_top1`; element-wise tolerances do not apply to INT8.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onnxbn.tolerances import INT8_GATES

DEFAULT_MIN_COSINE = INT8_GATES["cosine"]  # check's int8 rule
DEFAULT_MIN_TOP1 = INT8_GATES["top1"]


@dataclass
class QuantizeReport:
    method: str
    per_channel: bool
    activations: str
    recover: list[str]
    opset: tuple[int, int]
    bn_folded: list[str] = field(default_factory=list)
    bn_kept: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    ranges: dict = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    equalized: dict = field(default_factory=dict)
    passes: int = 0
    check: dict = field(default_factory=dict)
    min_cosine: float = DEFAULT_MIN_COSINE
    min_top1: float = DEFAULT_MIN_TOP1
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        outs = self.check.get("outputs", {})
        return bool(outs) and all(o["cosine_similarity"] >= self.min_cosine and
                                  o.get("top1_agreement", 1.0) >= self.min_top1 for o in outs.values())

    def to_dict(self) -> dict:
        return {"method": self.method, "per_channel": self.per_channel, "activations": self.activations,
                "recover": self.recover, "opset": list(self.opset), "bn_folded": self.bn_folded,
                "bn_kept": self.bn_kept, "excluded": self.excluded, "ranges": self.ranges, "layers": self.layers,
                "equalized": self.equalized,
                "recovery_passes": self.passes, "check": self.check, "min_cosine": self.min_cosine,
                "min_top1": self.min_top1, "passed": self.passed, "seconds": round(self.seconds, 3)}

    def table(self) -> str:
        lines = [f"INT8 QDQ: weights int8 {'per channel' if self.per_channel else 'per tensor'}, activations "
                 f"{self.activations} per tensor, ranges {self.method}, recovery {','.join(self.recover) or 'none'}"]
        if self.bn_folded or self.bn_kept:
            lines.append(f"BN folded first: {len(self.bn_folded)}" + (f"; kept in float: {', '.join(self.bn_kept)}"
                                                                      if self.bn_kept else ""))
        for name, o in self.check.get("outputs", {}).items():
            top1 = f"  top-1 agreement {o['top1_agreement']:.2%}" if "top1_agreement" in o else ""
            lines.append(f"{name}: cosine {o['cosine_similarity']:.5f}{top1}  max rel error "
                         f"{o['max_rel_error']:.3g}  ({self.check.get('samples')} samples)")
        lines.append(("PASS" if self.passed else "FAIL") + f" (gate: cosine >= {self.min_cosine}, top-1 agreement >= "
                     f"{self.min_top1})")
        return "\n".join(lines)
