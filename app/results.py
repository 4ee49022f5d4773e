"""The Results tab: plots drawn from the project's results files (`assets/results/*.json`), never pasted images.

Each stage writes its own JSON layout (PTQ and QAT tables, the export benchmark, the CUDA benchmark,
Q-ViT bit allocations), so this module does not assume one. It walks every file and collects
*entries*: the dicts that carry a known measurement,
  top1                                    accuracy (0..1)
  bits_per_weight | bpw | mean_weight_bits  bits per weight
  size_bytes | size_mb                    size on disk
  latency_ms (a number, or {batch: ms})   latency; batch 1 is plotted | latency_ms_batch1_cpu | ms (a
                                          model's, at batch 1; per-layer kernel timings are left out)
  confusion                               a square confusion matrix (rows: true class)
  attention + layers + bitops             a Q-ViT bit allocation (`quant.qvit.bit_allocation`), or
  allocation: "<file>.bits.json"          a path to one (as `quant.qat` records it)
  fps                                     frames per second of the app's live handler (`app.bench`)
named by their own "name"/"recipe"/"variant"/"label" field or else by the keys leading to them,
plus, for context, a file's "command", "machine"/"device", "date" and "split" where present. A plot is
drawn for what exists; `Results.missing` says what does not.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from quant.cli import finite_number  # noqa: E402

BITS_KEYS = ("bits_per_weight", "bpw", "mean_weight_bits")
NAME_KEYS = ("name", "recipe", "variant", "label", "format")
CONTEXT_KEYS = ("command", "machine", "device", "date", "split", "wall_time_s", "wall_s")


@dataclass
class Entry:
    source: str                  # results file stem
    name: str
    data: dict

    @property
    def label(self) -> str:
        return f"{self.name} ({self.source})"

    @property
    def top1(self) -> float | None:
        v = self.data.get("top1")
        return float(v) if finite_number(v) and 0 <= v <= 1 else None

    @property
    def bits(self) -> float | None:
        for key in BITS_KEYS:
            if finite_number(self.data.get(key)):
                return float(self.data[key])
        return None

    @property
    def size_mb(self) -> float | None:
        if finite_number(self.data.get("size_bytes")):
            return self.data["size_bytes"] / 1e6
        return float(self.data["size_mb"]) if finite_number(self.data.get("size_mb")) else None

    @property
    def latency_ms(self) -> float | None:
        v = self.data.get("latency_ms", self.data.get("latency_ms_batch1_cpu"))
        if v is None and _model_ms(self.data):
            v = self.data["ms"]
        if isinstance(v, dict):  # {batch: ms}: batch 1, else the smallest batch given
            numeric = {int(k): x for k, x in v.items() if str(k).isdigit() and finite_number(x)}
            v = numeric[min(numeric)] if numeric else None
        return float(v) if finite_number(v) else None

    @property
    def fps(self) -> float | None:
        v = self.data.get("fps")
        return float(v) if finite_number(v) else None

    @property
    def confusion(self) -> np.ndarray | None:
        try:
            cm = np.asarray(self.data.get("confusion"), dtype=float)
        except (TypeError, ValueError):
            return None
        ok = cm.ndim == 2 and cm.shape[0] == cm.shape[1] > 1 and np.isfinite(cm).all() and (cm >= 0).all()
        return cm if ok else None

    @property
    def allocation(self) -> dict | None:
        d = self.data
        if not ({"attention", "layers", "bitops"} <= d.keys() and isinstance(d["attention"], dict)
                and isinstance(d["layers"], dict)):
            return None
        rows = [bits for slots in d["attention"].values() if isinstance(slots, dict)
                for bits in slots.values() if isinstance(bits, list)]  # bits per head, one list a block and slot
        return d if all(finite_number(b) for row in rows for b in row) else None


@dataclass
class Results:
    folder: Path
    files: dict[str, dict] = field(default_factory=dict)     # stem -> context (command, machine, ...)
    entries: list[Entry] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def having(self, *props: str) -> list[Entry]:
        return [e for e in self.entries if all(getattr(e, p) is not None for p in props)]

    @property
    def missing(self) -> list[str]:
        out = []
        if not self.files:
            out.append(f"no results files in {self.folder} yet")
        checks = [(("top1", "bits"), "accuracy against bits per weight (entries with top1 and bits_per_weight)"),
                  (("latency_ms",), "latency (entries with latency_ms)"),
                  (("size_mb",), "size on disk (entries with size_bytes)"),
                  (("confusion",), "confusion matrices (entries with confusion)"),
                  (("fps",), "app frame rates (python -m app.bench)"),
                  (("allocation",), "Q-ViT bit allocation (a quant.qvit bit_allocation JSON)")]
        out += [f"no {what}" for props, what in checks if not self.having(*props)]
        return out



def _model_ms(d: dict) -> bool:
    """A whole model's batch-1 time under the plain key "ms" (not one layer's kernel, not batch 8)."""
    return finite_number(d.get("ms")) and "layer" not in d and d.get("batch", 1) == 1


def _is_entry(d: dict) -> bool:
    keys = set(d)
    return _model_ms(d) or bool(keys & {"top1", "confusion", "fps", *BITS_KEYS, "size_bytes", "size_mb", "latency_ms",
                        "latency_ms_batch1_cpu"}) or {"attention", "layers", "bitops"} <= keys


def _walk(node, path: list[str], source: str, out: list[Entry]) -> None:
    if isinstance(node, dict):
        if _is_entry(node):
            own = next((node[k] for k in NAME_KEYS if isinstance(node.get(k), str)), None)
            out.append(Entry(source, own or " / ".join(path) or source, node))
            if {"attention", "layers", "bitops"} <= set(node):
                return  # an allocation's per-layer dicts are part of it, not entries of their own
        for k, v in node.items():
            if isinstance(v, (dict, list)):
                _walk(v, path + [str(k)], source, out)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            if isinstance(v, (dict, list)):
                _walk(v, path + [str(i)], source, out)


def _linked_allocation(entry: Entry, folder: Path) -> Entry | None:
    """The bit allocation an entry names by path (absolute, from the working directory, from the
    repository root, or by file name in the results folder), read as an entry of its own."""
    ref = entry.data.get("allocation")
    if not isinstance(ref, str):
        return None
    for candidate in (Path(ref), folder.parent.parent / ref, folder / Path(ref).name):
        try:
            data = json.loads(candidate.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        alloc = Entry(entry.source, f"{entry.name} bit allocation", data if isinstance(data, dict) else {})
        return alloc if alloc.allocation is not None else None
    return None


def load(folder: str | Path) -> Results:
    """Every `*.json` in `folder`, read into entries; unreadable files are listed in `errors`."""
    folder = Path(folder)
    res = Results(folder)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        found: list[Entry] = []
        try:
            data = json.loads(path.read_text())
            _walk(data, [], path.stem, found)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            res.errors.append(f"{path.name}: not readable JSON ({type(e).__name__})")
            continue
        found += [a for e in found if (a := _linked_allocation(e, folder)) is not None]
        res.files[path.stem] = {k: data[k] for k in CONTEXT_KEYS if isinstance(data, dict) and k in data}
        res.entries += found
    return res


# ----------------------------------------------------------------------------- plots

def _colors(sources: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {s: cmap(i % 10) for i, s in enumerate(dict.fromkeys(sources))}


def accuracy_vs_bits(res: Results):
    """Top-1 against bits per weight, one colour per results file."""
    entries = res.having("top1", "bits")
    if not entries:
        return None
    colors = _colors([e.source for e in entries])
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for source, color in colors.items():
        group = [e for e in entries if e.source == source]
        ax.scatter([e.bits for e in group], [100 * e.top1 for e in group], color=color, label=source, s=36)
        for e in group:
            ax.annotate(e.name, (e.bits, 100 * e.top1), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per weight (log scale)")
    ax.set_ylabel("top-1 accuracy, %")
    ax.set_title("Accuracy against bits per weight")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _bars(entries: list[Entry], values: list[float], xlabel: str, title: str, fmt: str):
    colors = _colors([e.source for e in entries])
    fig, ax = plt.subplots(figsize=(7.5, 0.8 + 0.28 * len(entries)))
    y = np.arange(len(entries))
    ax.barh(y, values, color=[colors[e.source] for e in entries])
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
