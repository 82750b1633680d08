"""The held-out eval's plots (katdata.evaluate): think-on rate by difficulty, tokens by mode, accuracy against tokens."""

from __future__ import annotations

import os
from pathlib import Path

from katdata.errors import require
from katdata.eval_items import accuracy, mean  # the figures eval.json reports, plotted as they are


def heldout_plots(rows: list[dict], out: Path) -> list[str]:
    """think_on_by_difficulty.png, tokens_by_mode.png, accuracy_vs_tokens.png (written via temp + rename)."""
    matplotlib = require("matplotlib", "local")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    written = []

    def save(fig, name):
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, out / name)
        written.append(name)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    diffs = sorted({str(r["difficulty"]) for r in rows if r["setting"] == "auto"})
    for k, m in enumerate(models):
        rates = []
        for d in diffs:
            sel = [r for r in rows if r["model"] == m and r["setting"] == "auto" and r["mode"]
                   and str(r["difficulty"]) == d]
            rates.append(sum(r["mode"] == "on" for r in sel) / len(sel) if sel else 0.0)
        ax.bar([i + k * 0.8 / len(models) for i in range(len(diffs))], rates, width=0.8 / len(models), label=m)
    ax.set_xticks(range(len(diffs)), diffs)
    ax.set(xlabel="difficulty tag", ylabel="think-on rate (auto)", ylim=(0, 1), title="Think-on rate by difficulty")
    ax.legend()
    save(fig, "think_on_by_difficulty.png")

    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        for mode in ("on", "off"):
            toks = [r["tokens"] for r in rows if r["model"] == m and r["setting"] == "auto" and r["mode"] == mode]
            if toks:
                ax.hist(toks, bins=20, alpha=0.6, label=f"think-{mode} (n={len(toks)})")
        ax.set(title=f"{m}: tokens per response (auto)", xlabel="completion tokens", ylabel="responses")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    save(fig, "tokens_by_mode.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m in models:
        for s in ("auto", "on", "off"):
            sel = [r for r in rows if r["model"] == m and r["setting"] == s]
            acc = accuracy(sel)
            if sel and acc is not None:
                ax.scatter([mean([r["tokens"] for r in sel])], [acc], label=f"{m} {s}")
    ax.set(xlabel="mean completion tokens", ylabel="accuracy", ylim=(-0.02, 1.02), title="Accuracy against tokens")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    save(fig, "accuracy_vs_tokens.png")
    return written
