"""The demo report's pictures (matplotlib, Agg): the sweep, the per-epoch curves, the inserted BN statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onnxbn.demo.sweep import VARIANT_LABEL, VARIANTS
from onnxbn.io.save import atomic_path


def plot_curves(path: Path, variants: dict) -> None:
    """Validation loss and accuracy per epoch (epoch 0: before fine-tuning) of each curve variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, result in variants.items():
        history = result["history"]
        if not history:
            continue
        epochs = [0] + [e["epoch"] for e in history]
        style = "-" if name.startswith("bn") else "--"
        axes[0].plot(epochs, [result["val_before"]["loss"]] + [e["val_loss"] for e in history], style, marker="o",
                     label=name)
        axes[1].plot(epochs, [result["val_before"]["accuracy"]] + [e["val_accuracy"] for e in history], style,
                     marker="o", label=name)
    axes[0].set(title="validation loss", xlabel="epoch", ylabel="cross-entropy")
    axes[1].set(title="validation accuracy", xlabel="epoch", ylabel="top-1")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_sweep(path: Path, sweep: dict, start: dict, target_accuracy: float) -> None:
    """Final val loss and accuracy vs lr (log x): mean per variant, the seed spread shaded (min..max),
    every seed a dot, diverged runs an x at the top of the panel with their count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.transforms import blended_transform_factory

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"nobn": "tab:orange", "bn": "tab:blue"}
    offsets = {"nobn": 0.93, "bn": 1.07}  # nudge the variants apart on the log axis
    rows = {"nobn": 0.96, "bn": 0.89}  # the diverged markers' heights (axes fraction), one row per variant
    any_diverged = any(v["diverged"] for per in sweep.values() for v in per.values())
    for ax, field, title in ((axes[0], "val_loss", "final validation loss"),
                             (axes[1], "val_accuracy", "final validation accuracy")):
        trans = blended_transform_factory(ax.transData, ax.transAxes)
        for variant in VARIANTS:
            per = sweep.get(variant, {})
            if not per:
                continue
            lrs = [v["lr"] for v in per.values()]
            mean = [v[f"{field}_mean"] if v[f"{field}_mean"] is not None else np.nan for v in per.values()]
            lo = [min((c[field] for c in v["cells"] if c[field] is not None), default=np.nan) for v in per.values()]
            hi = [max((c[field] for c in v["cells"] if c[field] is not None), default=np.nan) for v in per.values()]
            c = colors[variant]
            ax.plot(lrs, mean, "-o", color=c, label=f"{VARIANT_LABEL[variant]} (mean of finished seeds)")
            ax.fill_between(lrs, lo, hi, color=c, alpha=0.2, label=f"{VARIANT_LABEL[variant]} seed range")
            for v in per.values():
                xs = [v["lr"] * offsets[variant]] * v["finished"]
                ys = [cell[field] for cell in v["cells"] if cell[field] is not None]
                ax.scatter(xs, ys, s=10, color=c, alpha=0.7, zorder=3)
                if v["diverged"]:
                    y = rows[variant]
                    ax.scatter([v["lr"] * offsets[variant]], [y], marker="x", s=60, color=c, transform=trans,
                               zorder=4, clip_on=False)
                    ax.annotate(f"{v['diverged']}/{v['seeds']}", (v["lr"] * offsets[variant], y), xycoords=trans,
                                textcoords="offset points", xytext=(-6, -3), ha="right", fontsize=7, color=c)
        if any_diverged:  # headroom: the x markers sit in a band above every finished run
            bottom, top = ax.get_ylim()
            ax.set_ylim(bottom, top + 0.25 * (top - bottom))
        ax.set_xscale("log")
        all_lrs = [v["lr"] for per in sweep.values() for v in per.values()]
        ax.set_xlim(min(all_lrs) / 2, max(all_lrs) * 2)  # also when no run at an lr finished
        ax.grid(alpha=0.3, which="both")
        ax.set(title=title, xlabel="learning rate (Adam)")
    axes[0].axhline(start["loss"], color="grey", ls=":", label="before fine-tuning (mean)")
    axes[1].axhline(start["accuracy"], color="grey", ls=":", label="before fine-tuning (mean)")
    axes[1].axhline(target_accuracy, color="tab:green", ls="--", lw=0.8, label=f"target {target_accuracy:.0%}")
    axes[0].set_ylabel("cross-entropy")
    axes[1].set_ylabel("top-1")
    handles, labels = axes[0].get_legend_handles_labels()
    if any_diverged:
        handles.append(Line2D([], [], marker="x", ls="", color="black"))
        labels.append("diverged runs (loss not finite), count of seeds")
    axes[0].legend(handles, labels, fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_activations(path: Path, stats) -> None:
    """Per-channel mean and std of each tensor the inserted BN layers normalise, dead channels marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    names = stats.tensors
    for i, name in enumerate(names):
        mean, std = stats.mean(name), np.sqrt(stats.var(name))
        dead = stats.var(name) == 0
        jitter = np.random.default_rng(i).uniform(-0.25, 0.25, mean.size)
        for ax, values in ((axes[0], mean), (axes[1], std)):
            ax.scatter(i + jitter[~dead], values[~dead], s=6, alpha=0.5, color="tab:blue")
            ax.scatter(i + jitter[dead], values[dead], s=14, marker="x", color="tab:red",
                       label="dead (zero variance)" if i == 0 else None)
    axes[0].set(title="per-channel statistics the inserted BN layers use", ylabel="channel mean")
    axes[1].set(ylabel="channel std", xticks=range(len(names)),
                xticklabels=[f"{n.split('/')[-2] if '/' in n else n}\n({int(np.sum(stats.var(n) == 0))} dead)"
                             for n in names])
    for ax in axes:
        ax.grid(alpha=0.3)
    if any(np.any(stats.var(n) == 0) for n in names):
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
