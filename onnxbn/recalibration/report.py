"""What a recalibration did: per BN node old and new statistics, per pass what ran, the prior, floor and guard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxbn.errors import UserError


@dataclass
class BNRecord:
    """One recalibrated BN: where it is, its level (the pass that set it), old and new statistics."""

    node: str
    key: str                     # the BN's first output (unique)
    input: str
    channels: int
    level: int = 0
    training_mode: bool = False  # converted from training mode
    fresh: list = field(default_factory=list)   # slots that got a fresh initializer (shared or computed)
    old_mean: np.ndarray | None = None
    old_var: np.ndarray | None = None
    new_mean: np.ndarray | None = None
    new_var: np.ndarray | None = None
    measured_mean: np.ndarray | None = None   # with a prior: what prior 0 measures (new_* is then the blend)
    measured_var: np.ndarray | None = None

    def to_dict(self) -> dict:
        assert self.new_mean is not None and self.new_var is not None, "a reported BN is recalibrated"
        return {"node": self.node, "input": self.input, "channels": self.channels, "pass": self.level + 1,
                "mean_change": change(self.old_mean, self.new_mean), "var_change": change(self.old_var, self.new_var),
                "dead_channels": int(np.count_nonzero(self.new_var <= 0)), "training_mode": self.training_mode,
                "fresh_initializers": self.fresh}


def change(old: np.ndarray | None, new: np.ndarray) -> float | None:
    """max |new - old| / max(|old|, |new|) over the channels: 0 = unchanged, at most 2 (None: no old value)."""
    if old is None:
        return None
    old, new = np.asarray(old, np.float64), np.asarray(new, np.float64)
    scale = max(float(np.abs(old).max(initial=0)), float(np.abs(new).max(initial=0)))
    return float(np.abs(new - old).max(initial=0)) / scale if scale > 0 else 0.0


@dataclass
class RecalibrationReport:
    """What `recalibrate` did: per BN node old vs new statistics, per pass what ran and how long."""

    mode: str
    bns: list[BNRecord]
    passes: list[dict]
    samples: int = 0
    batch_size: int = 0
    data: str = ""
    provider: str = ""
    seconds: float = 0.0
    cache_mb: float = 0.0
    prior: float = 0.0                                     # the prior used (the one auto chose)
    prior_requested: float | str = 0.0                     # as given: a number, a multiple of n ("2n") or "auto"
    prior_not_applied: list = field(default_factory=list)  # BNs whose old mean/var are computed at run time
    var_floor: float = 0.0
    floored: dict = field(default_factory=dict)            # BN -> number of channels whose variance was floored
    floored_channels: dict = field(default_factory=dict)   # BN -> those channels' indices
    prior_grid: list = field(default_factory=list)         # prior auto: {"prior", "top1", "loss"} per grid point
    eval: dict | None = None                               # the guard: eval_data, before, after, drop, max_drop, refused

    def newly_dead_channels(self) -> int:
        """Channels whose variance was > 0 before and is 0 now: constant on the new data, so inputs that vary
        there (the old domain) are divided by sqrt(eps). BNs whose statistics are computed at run time (no
        old value) do not count."""
        return sum(int(np.count_nonzero((b.old_var > 0) & (b.new_var <= 0))) for b in self.bns
                   if b.old_var is not None and b.new_var is not None)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "samples": self.samples, "batch_size": self.batch_size, "data": self.data,
                "provider": self.provider, "seconds": round(self.seconds, 3), "cache_mb": self.cache_mb,
                "prior": self.prior, "prior_requested": self.prior_requested,
                "prior_not_applied": self.prior_not_applied, "var_floor": self.var_floor, "floored": self.floored,
                "floored_channels": self.floored_channels, "prior_grid": self.prior_grid, "eval": self.eval,
                "passes": self.passes, "nodes": [b.to_dict() for b in self.bns]}

    def table(self) -> str:
        rows = [("BN node", "input", "channels", "pass", "mean change", "var change", "dead")]
        for b in self.bns:
            d = b.to_dict()
            rows.append((b.node + (" (was training mode)" if b.training_mode else ""), b.input, str(b.channels),
                         str(d["pass"]), _fmt(d["mean_change"]), _fmt(d["var_change"]), str(d["dead_channels"])))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for p in self.passes:
            lines.append(f"pass {p['pass']}: {len(p['bns'])} BN, {p['nodes']} nodes from {p['source']}"
                         + (f", kept {p['cached_mib']:.1f} MiB" if p.get("cached_mib") else "") + f", {p['seconds']:.2f}s")
        lines.append(f"{self.mode}: {len(self.bns)} BN nodes recalibrated in {len(self.passes)} pass(es) over "
                     f"{self.samples} samples (batch {self.batch_size}, {self.data}), {self.seconds:.2f}s on "
                     f"{self.provider}; change = max|new-old| / max(|old|,|new|)")
        if self.prior > 0:
            lines.append(f"prior: the old statistics count as {self.prior:g} samples"
                         + (f" ({self.prior_requested})" if isinstance(self.prior_requested, str) else "")
                         + f" against {self.samples} new (--prior 0: the new statistics only)")
        if self.prior_not_applied:
            lines.append(f"prior not applied to {', '.join(self.prior_not_applied)}: the old mean/var are computed "
                         "at run time (no old value); they hold the new statistics")
        if self.floored:
            lines.append(f"variance floor {self.var_floor:g} x old variance applied to: "
                         + "; ".join(f"{k} ({v} channel{'s' if v > 1 else ''}) [{_channel_list(self.floored_channels[k])}]"
                                     for k, v in self.floored.items())
                         + " (channels (nearly) constant on the new data; without the floor old-domain inputs "
                         "there would be divided by sqrt(eps))")
        if self.eval is not None:
            e = self.eval
            if self.prior_grid:
                lines.append(f"--prior auto on {e['data']} (n = {self.samples}): chose {self.prior:g}")
                lines += [f"  prior {g['prior']:g}: top-1 {100 * g['top1']:.2f}%, loss {g['loss']:.4f}"
                          for g in self.prior_grid]
            lines.append(f"eval on {e['data']}: top-1 {100 * e['before']['top1']:.2f}% -> "
                         f"{100 * e['after']['top1']:.2f}%, loss {e['before']['loss']:.4f} -> {e['after']['loss']:.4f}")
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _channel_list(channels: list[int], most: int = 16) -> str:
    return ", ".join(map(str, channels[:most])) + (f", ... ({len(channels) - most} more)" if len(channels) > most else "")


class RecalibrationRefused(UserError):
    """The labelled guard refused the recalibrated model: its top-1 on `eval_data` is more than `max_drop`
    points below the original's. Nothing is returned (the command line writes nothing and exits 1);
    `report` holds the full report, its `eval` the numbers."""

    def __init__(self, report: "RecalibrationReport"):
        e = report.eval
        assert e is not None, "refused by the guard, which has its numbers"
        super().__init__(f"recalibrated top-1 {100 * e['after']['top1']:.2f}% is {e['drop']:.2f} points below the "
                         f"original {100 * e['before']['top1']:.2f}% on {e['data']} (--max-drop {e['max_drop']:g}); "
                         "nothing written")
        self.report = report
