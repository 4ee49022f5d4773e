"""The Results tab: plots drawn from the project's results files (`assets/results/*.json`), never pasted images.

`quant.report.load` reads the files into entries (what it recognises is listed there); this module
draws them: accuracy against bits per weight (`quant.report.accuracy_vs_bits`), latency, size, app
frame rate, confusion matrices, Q-ViT bit allocations and robustness analyses (`quant.robustness.figure`),
and a summary of what was read and what is missing.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from quant.cli import finite_number
from quant.report import Entry, Results, accuracy_vs_bits, colors, load  # noqa: F401  (the tab's API)


def _bars(entries: list[Entry], values: list[float], xlabel: str, title: str, fmt: str):
    palette = colors([e.source for e in entries])
    fig, ax = plt.subplots(figsize=(7.5, 0.8 + 0.28 * len(entries)))
    y = np.arange(len(entries))
    ax.barh(y, values, color=[palette[e.source] for e in entries])
    ax.set_yticks(y, [e.label for e in entries], fontsize=7)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, " " + fmt.format(v), va="center", fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.margins(x=0.15)
    fig.tight_layout()
    return fig


def latency_bars(res: Results):
    entries = res.having("latency_ms")
    if not entries:
        return None
    return _bars(entries, [e.latency_ms for e in entries], "latency, ms (batch 1 where the file gives batches)",
                 "Latency", "{:.2f} ms")


def size_bars(res: Results):
    entries = res.having("size_mb")
    if not entries:
        return None
    return _bars(entries, [e.size_mb for e in entries], "size on disk, MB", "Size on disk", "{:.2f} MB")


def fps_bars(res: Results):
    entries = res.having("fps")
    if not entries:
        return None
    return _bars(entries, [e.fps for e in entries], "frames per second, both models on every frame",
                 "App frame rate (python -m app.bench)", "{:.1f}")


def confusion_plot(entry: Entry, classes: tuple[str, ...] = ()):
    cm = entry.confusion
    k = cm.shape[0]
    names = list(classes) if len(classes) == k else [str(i) for i in range(k)]
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top1 = entry.top1
    ax.set_title(entry.label + (f", top-1 {100 * top1:.2f} %" if top1 is not None else ""), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def allocation_plot(entry: Entry):
    """Bits per head and block for each attention slot, and each linear layer's weight/input bits."""
    alloc = entry.allocation
    attn = {name: slots for name, slots in alloc["attention"].items() if isinstance(slots, dict)}
    slots = sorted({s for v in attn.values() for s, bits in v.items() if isinstance(bits, list)})
    layers = {n: v for n, v in alloc["layers"].items() if isinstance(v, dict) and finite_number(v.get("weight"))}
    panels = len(slots) + (1 if layers else 0)
    if panels == 0:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(2.6 * panels + 2, 4.2), squeeze=False)
    axes = axes[0]
    for ax, slot in zip(axes, slots):
        rows = [attn[n][slot] for n in attn if isinstance(attn[n].get(slot), list)]
        width = max(len(r) for r in rows)
        grid = np.array([r + [np.nan] * (width - len(r)) for r in rows], dtype=float)
        im = ax.imshow(grid, cmap="viridis", vmin=2, vmax=8, aspect="auto")
        ax.set_title(slot, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("block")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:g}", ha="center", va="center", fontsize=7, color="white")
    if slots:
        fig.colorbar(im, ax=axes[len(slots) - 1], fraction=0.05, label="bits")
    if layers:
        ax = axes[-1]
        names = list(layers)
        y = np.arange(len(names))
        ax.barh(y - 0.2, [layers[n]["weight"] for n in names], 0.4, label="weight")
        ax.barh(y + 0.2, [layers[n].get("input") or 0 for n in names], 0.4, label="input")
        ax.set_yticks(y, names, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("bits")
        ax.legend(fontsize=7)
    extra = f", BitOPs {alloc['bitops_ratio']:.2f}x the budget" if finite_number(alloc.get("bitops_ratio")) else ""
    fig.suptitle(f"Q-ViT bit allocation: {entry.label}{extra}", fontsize=10)
    fig.tight_layout()
    return fig


def summary(res: Results) -> str:
    """Markdown: which files were read (with their command and machine) and what is missing."""
    lines = []
    for stem, ctx in res.files.items():
        n = sum(e.source == stem for e in res.entries)
        detail = "; ".join(f"{k}: `{ctx[k]}`" if k == "command" else f"{k}: {ctx[k]}" for k in ctx)
        lines.append(f"- **{stem}.json**: {f'{n} entries' if n else 'nothing this tab plots'}"
                     + (f" ({detail})" if detail else ""))
    lines += [f"- ⚠ {e}" for e in res.errors]
    lines += [f"- missing: {m}" for m in res.missing]
    return f"Plots drawn from `{res.folder}/*.json` when the app started (or on Reload):\n\n" + "\n".join(lines)


def robustness_plot(entry: Entry):
    """The robustness analysis' figure: drop and KL per block and component, KL and drop per head."""
    from quant.robustness import figure
    return figure(entry.robustness)
