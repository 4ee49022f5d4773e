"""The Results tab: plots drawn from the project's results files (`assets/results/*.json`), never pasted images.

`quant.report.load` reads the files into entries (what it recognises is listed there); this module
draws them: accuracy against bits per weight (`quant.report.accuracy_vs_bits`), latency, size, app
frame rate, confusion matrices, Q-ViT bit allocations and robustness analyses (`quant.robustness.figure`),
and a summary of what was read and what is missing.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from quant.evaluate import confusion_figure
from quant.qvit import allocation_figure
from quant.report import Entry, Results, accuracy_vs_bits, colors, load  # noqa: F401  (the tab's API)


MAX_SIDE = 160  # inches: the page gets each plot as WebP, at most 16383 pixels a side (at matplotlib's 100 dpi)


def _bars(entries: list[Entry], values: list[float], xlabel: str, title: str, fmt: str):
    """One bar an entry, named by its label and given its number; the figure widened by the longest label (7 pt:
    ~0.06 inches a character) so that 5 inches are left for the bars and their numbers, and the value axis logarithmic
    where the values span two decades or more (a GPU's 0.7 ms beside a CPU's 300 ms)."""
    palette = colors([e.source for e in entries])
    longest = max(len(e.label) for e in entries)
    fig, ax = plt.subplots(figsize=(min(max(7.5, 5 + 0.06 * longest), MAX_SIDE),
                                    min(0.8 + 0.28 * len(entries), MAX_SIDE)))
    y = np.arange(len(entries))
    log = max(values) >= 100 * min(values)
    ax.barh(y, values, color=[palette[e.source] for e in entries], log=log)
    ax.set_yticks(y, [e.label for e in entries], fontsize=7, parse_math=False)  # "$" in a name is a dollar, not TeX
    ax.set_ylim(len(entries) - 0.5, -0.5)  # the first entry on top, no empty rows above or below
    for i, v in enumerate(values):
        ax.text(v, i, " " + fmt.format(v), va="center", fontsize=7)
    ax.set_xlabel(xlabel + (" (log scale)" if log else ""))
    ax.set_title(title)
    ax.margins(x=0.2)
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


def _within_webp(fig):
    """`fig` shrunk to at most MAX_SIDE inches a side (an allocation of hundreds of blocks, a robustness analysis
    of over 20 bit widths would be larger) and laid out again."""
    if fig is not None and fig.get_size_inches().max() > MAX_SIDE:
        fig.set_size_inches(np.minimum(fig.get_size_inches(), MAX_SIDE))
        fig.tight_layout()
    return fig


def labels(entries: list[Entry]) -> list[str]:
    """The entries' labels for a menu, a label repeated (two entries of one name in a file) numbered #2, #3, ..."""
    seen: dict[str, int] = {}
    out = []
    for e in entries:
        seen[e.label] = seen.get(e.label, 0) + 1
        out.append(e.label if seen[e.label] == 1 else f"{e.label} #{seen[e.label]}")
    return out


def confusion_plot(entry: Entry):
    """The entry's confusion matrix, its classes named as its own file names them (`quant.evaluate`'s `per_class`,
    in the matrix's order), not as the page's models do: a results folder may score another data set's classes.
    Numbered where the file names none or not one per row."""
    top1 = entry.top1
    per_class = entry.data.get("per_class")
    classes = tuple(map(str, per_class)) if isinstance(per_class, dict) else ()
    return confusion_figure(entry.confusion, classes,
                            entry.label + (f", top-1 {100 * top1:.2f} %" if top1 is not None else ""))


def allocation_plot(entry: Entry):
    """Bits per head and block for each attention slot, and each linear layer's weight/input bits."""
    return _within_webp(allocation_figure(entry.allocation, f"Q-ViT bit allocation: {entry.label}"))


def summary(res: Results) -> str:
    """Markdown: which files were read (with their command and machine) and what is missing."""
    lines = []
    for stem, ctx in res.files.items():
        n = sum(e.source == stem for e in res.entries)
        detail = "; ".join(f"{k}: `{ctx[k]}`" if k == "command" else f"{k}: {ctx[k]}" for k in ctx)
        lines.append(f"- **{stem}.json**: {f'{n} entr' + ('y' if n == 1 else 'ies') if n else 'nothing this tab plots'}"
                     + (f" ({detail})" if detail else ""))
    lines += [f"- ⚠ {e}" for e in res.errors]
    lines += [f"- missing: {m}" for m in res.missing]
    return (f"Plots drawn from `{res.folder}/*.json` when the page first loaded after they changed (or on Reload):\n\n"
            + "\n".join(lines))


def robustness_plot(entry: Entry):
    """The robustness analysis' figure: drop and KL per block and component, KL and drop per head."""
    from quant.robustness import figure
    return _within_webp(figure(entry.robustness))
