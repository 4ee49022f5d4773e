"""Results files: every stage's JSON read into one list of measurements, and the table and plot of
accuracy against bits per weight drawn from them: `python -m quant.report`.

Each stage writes its own JSON layout (PTQ and QAT tables, the export benchmark, the CUDA benchmark,
Q-ViT bit allocations), so `load` does not assume one. It walks every `*.json` file of a folder and
collects *entries*: the dicts that carry a known measurement,
  top1                                    accuracy (0..1)
  bits_per_weight | mean_weight_bits      bits per weight
  size_bytes                              size on disk
  latency_ms (a number, or {batch: ms})   latency; batch 1 is plotted | latency_ms_batch1_cpu | ms (a
                                          model's, at batch 1; per-layer kernel timings and tuner
                                          picks are left out)
  confusion                               a square confusion matrix (rows: true class)
  attention + layers + bitops             a Q-ViT bit allocation (`quant.qvit.bit_allocation`), or
  allocation: "<file>.bits.json"          a path to one (as `quant.qat` records it)
  fps                                     frames per second of the app's live handler (`app.bench`)
  fp_top1 + trials                        a robustness analysis (`quant.robustness`; its trials are
                                          part of it, not entries of their own)
named by their own "name"/"recipe"/"variant" field, else by the key holding them (or the path of keys
and list positions leading to a list item), after the "model" they or a dict holding them name (a
benchmark of several models runs the same variants on each), plus, for context, a file's "command",
"machine"/"device", "date", "commit", "split" and wall time ("wall_time_s"/"wall_s") where present. The app's Results tab (`app.results`)
plots the rest of what `load` finds.

The command prints the entries with top-1 and bits per weight as one markdown table and plots them
(`--out`, default `assets/results/accuracy_vs_bits.png`), the full-precision model as a dashed line.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from quant.cli import HelpFormatter, finite_number, output_file, run, write_png  # noqa: E402

BITS_KEYS = ("bits_per_weight", "mean_weight_bits")
NAME_KEYS = ("name", "recipe", "variant")
CONTEXT_KEYS = ("command", "machine", "device", "date", "commit", "split", "wall_time_s", "wall_s")


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
            if finite_number(self.data.get(key)) and 0 < self.data[key] <= 64:  # no weight format holds more
                return float(self.data[key])
        return None

    @property
    def size_mb(self) -> float | None:
        return self.data["size_bytes"] / 1e6 if _positive(self.data.get("size_bytes")) else None

    @property
    def latency_ms(self) -> float | None:
        v = self.data.get("latency_ms", self.data.get("latency_ms_batch1_cpu"))
        if v is None and _model_ms(self.data):
            v = self.data["ms"]
        if isinstance(v, dict):  # {batch: ms}: batch 1, else the smallest batch given
            numeric = {int(k): x for k, x in v.items()  # (a batch size of thousands of digits is none)
                       if str(k).isdecimal() and len(str(k)) <= 18 and int(k) >= 1 and finite_number(x)}
            v = numeric[min(numeric)] if numeric else None
        return float(v) if _positive(v) else None

    @property
    def fps(self) -> float | None:
        v = self.data.get("fps")
        return float(v) if _positive(v) else None

    @property
    def confusion(self) -> np.ndarray | None:
        try:
            cm = np.asarray(self.data.get("confusion"), dtype=float)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an integer too large for a float
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
        layers = [v for v in d["layers"].values() if isinstance(v, dict) and finite_number(v.get("weight"))]
        if not any(rows) and not layers:  # nothing to draw
            return None
        return d if all(finite_number(b) for row in rows for b in row) else None

    @property
    def robustness(self) -> dict | None:
        d = self.data
        trials = d.get("trials")
        ok = (finite_number(d.get("fp_top1")) and finite_number(d.get("n")) and isinstance(trials, list) and trials
              and all(isinstance(t, dict) and isinstance(t.get("component"), str) and isinstance(t.get("bits"), int)
                      and isinstance(t.get("block"), int) and (t.get("head") is None or isinstance(t["head"], int))
                      and finite_number(t.get("drop")) and finite_number(t.get("kl")) for t in trials))
        return d if ok else None


def _positive(v) -> bool:
    """A time, size or rate a measurement can give: a finite number above 0 (not one drawn as a bar to the left)."""
    return finite_number(v) and v > 0


def _robustness_keys(keys) -> bool:
    return {"fp_top1", "trials"} <= set(keys)


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
                  (("allocation",), "Q-ViT bit allocation (a quant.qvit bit_allocation JSON)"),
                  (("robustness",), "robustness analysis (python -m quant.robustness)")]
        out += [f"no {what}" for props, what in checks if not self.having(*props)]
        return out


def _model_ms(d: dict) -> bool:
    """A whole model's batch-1 time under the plain key "ms" (not one layer's kernel, not the kernel tuner's
    pick for a shape, which `cuda_ops.bench` records under its "key", not batch 8)."""
    return finite_number(d.get("ms")) and "layer" not in d and "key" not in d and d.get("batch", 1) == 1


def _is_entry(d: dict) -> bool:
    keys = set(d)
    return _model_ms(d) or bool(keys & {"top1", "confusion", "fps", *BITS_KEYS, "size_bytes", "latency_ms",
                        "latency_ms_batch1_cpu"}) or {"attention", "layers", "bitops"} <= keys or _robustness_keys(keys)


def _walk(node, path: list[str], source: str, out: list[Entry], model: str | None = None) -> None:
    if isinstance(node, dict):
        model = node["model"] if isinstance(node.get("model"), str) else model
        if _is_entry(node):
            own = next((node[k] for k in NAME_KEYS if isinstance(node.get(k), str)), None)
            if own is None and _robustness_keys(node) and isinstance(node.get("checkpoint"), str):
                own = Path(node["checkpoint"]).stem  # the model analysed
            key = path[-1] if path and not path[-1].isdigit() else " / ".join(path)  # {"w4": {...}}: "w4"
            name = own or key or source
            out.append(Entry(source, f"{model}: {name}" if model else name, node))
            if {"attention", "layers", "bitops"} <= set(node) or _robustness_keys(node):
                return  # an allocation's per-layer dicts, a robustness analysis' trials: part of it
        for k, v in node.items():
            if isinstance(v, (dict, list)):
                _walk(v, path + [str(k)], source, out, model)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            if isinstance(v, (dict, list)):
                _walk(v, path + [str(i)], source, out, model)


def _read_json(path: Path):
    """A file's JSON; a ValueError for one holding a lone surrogate ("\\ud800"), no text a plot can draw."""
    data = json.loads(path.read_text())
    json.dumps(data, ensure_ascii=False).encode()
    return data


def _linked_allocation(entry: Entry, folder: Path) -> Entry | None:
    """The bit allocation an entry names by path (absolute, from the working directory, from the
    repository root, or by file name in the results folder), read as an entry of its own."""
    ref = entry.data.get("allocation")
    if not isinstance(ref, str):
        return None
    for candidate in (Path(ref), folder.parent.parent / ref, folder / Path(ref).name):
        try:
            if not candidate.is_file():  # a device or pipe ("/dev/zero") would be read forever
                continue
            data = _read_json(candidate)
        except (OSError, ValueError, RecursionError):  # unreadable, not JSON, a NUL byte in the path, nested too deep
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
        name = os.fsencode(path.name).decode(errors="replace")  # a name not in UTF-8 is no text a plot can draw
        if not path.is_file():  # a folder, pipe or device named *.json: a pipe would be waited on for ever
            res.errors.append(f"{name}: not a file")
            continue
        try:
            data = _read_json(path)
            _walk(data, [], Path(name).stem, found)
        except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON's, a bad encoding, a 5000-digit integer
            res.errors.append(f"{name}: not readable JSON ({type(e).__name__})")
            continue
        found += [a for e in found if (a := _linked_allocation(e, folder)) is not None]
        res.files[Path(name).stem] = {k: data[k] for k in CONTEXT_KEYS if isinstance(data, dict) and k in data}
        res.entries += found
    return res


# ----------------------------------------------------------------------------- accuracy against bits

def colors(sources: list[str]) -> dict[str, tuple]:
    """One colour per results file, the same in every plot: ten strong ones, or twenty (each hue dark and light) for
    more files, and only past twenty does a colour come round again."""
    files = list(dict.fromkeys(sources))
    cmap = plt.get_cmap("tab10" if len(files) <= 10 else "tab20")
    return {s: cmap(i % cmap.N) for i, s in enumerate(files)}


def accuracy_vs_bits(res: Results, title: str | None = None):
    """Top-1 against bits per weight, one colour and marker per results file; models of 16 bits and more
    (full precision) as dashed lines; titled with the models and splits the entries name unless `title` is given.
    None when no entry has both."""
    entries = res.having("top1", "bits")
    if not entries:
        return None
    if title is None:
        models = sorted({Path(str(e.data["checkpoint"])).stem for e in entries if e.data.get("checkpoint")})
        splits = sorted({str(e.data["split"]) for e in entries if e.data.get("split")})
        title = f"{', '.join(models) or 'bitvit'}: top-1 on the {'/'.join(splits) or 'eval'} split"
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (source, color) in enumerate(colors([e.source for e in entries]).items()):
        group = [e for e in entries if e.source == source]
        for e in group:
            if e.bits >= 16:
                ax.axhline(100 * e.top1, color=color, ls="--", lw=1, label=f"{e.label}: {100 * e.top1:.2f} %")
        low = [e for e in group if e.bits < 16]
        if low:
            ax.scatter([e.bits for e in low], [100 * e.top1 for e in low], color=color, marker="osD^vP*X"[i % 8],
                       s=40, label=source, zorder=3)
    ax.set_xscale("log", base=2)
    ax.autoscale_view()
    ticks = [t for t in (1, 1.6, 2, 3, 4, 8) if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    if len(ticks) < 2:  # points between two of them (all near 4 bits): the axis is numbered at the outermost points
        ticks = sorted({round(e.bits, 2) for e in entries if e.bits < 16}) or ticks
        ticks = sorted({ticks[0], ticks[-1]}) if ticks else ticks
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    _label_points(ax, [(e.bits, 100 * e.top1, e.name) for e in entries if e.bits < 16])
    ax.set_xlabel("bits per linear weight on disk, scales and zeros included (log scale)")
    ax.set_ylabel("top-1 accuracy, %")
    ax.set_title(title, parse_math=False)  # names from results files are text: "$" is a dollar, not TeX
    ax.grid(alpha=0.3)
    for text in ax.legend(loc="best", fontsize=8).get_texts():
        text.set_parse_math(False)
    fig.tight_layout()
    return fig


def _label_points(ax, points: list[tuple[float, float, str]]) -> None:
    """Name each point beside it, on its left where the name would run past the right of the plot, lifting a
    name in steps of one line while it would cover one placed before; a lifted name has a line to its point."""
    size = 7                                             # font size, points
    ax.autoscale_view()                                  # settle the axis limits the positions depend on
    px_per_pt = ax.figure.dpi / 72
    placed = []                                          # (left, bottom, width) of each name, in pixels
    for x, y, text in sorted(points, key=lambda p: (p[1], p[0])):
        px, py = ax.transData.transform((x, y))
        width, height = 0.6 * size * len(text) * px_per_pt, 1.2 * size * px_per_pt
        dx = 4.0 if px + (4 * px_per_pt) + width <= ax.bbox.x1 else -4.0
        left = px + dx * px_per_pt - (width if dx < 0 else 0)
        dy = 3.0
        while any(left < ql + qw and ql < left + width and abs(py + dy * px_per_pt - qb) < height
                  for ql, qb, qw in placed):
            dy += 1.2 * size
        placed.append((left, py + dy * px_per_pt, width))
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=size, parse_math=False,
                    ha="left" if dx > 0 else "right", arrowprops=dict(arrowstyle="-", color="0.6", lw=0.5,
                                                                       shrinkA=0, shrinkB=3) if dy > 3 else None)
    over = max((b + 1.2 * size * px_per_pt for _, b, _ in placed), default=0) - ax.bbox.y1
    if over > 0:                                         # names stacked above the top: make room for them
        lo, hi = ax.get_ylim()
        frac = over / ax.bbox.height
        ax.set_ylim(lo, hi + 1.2 * (hi - lo) * frac / max(1 - frac, 0.2))


def markdown(entries: list[Entry]) -> str:
    lines = ["| results | recipe | top-1 | bits/weight | size (MB) |", "|---|---|---|---|---|"]
    for source in dict.fromkeys(e.source for e in entries):
        for e in sorted((e for e in entries if e.source == source), key=lambda e: -e.bits):
            size = f"{e.size_mb:.3f}" if e.size_mb is not None else ""
            file, name = (" ".join(t.splitlines()).replace("|", "\\|") for t in (e.source, e.name))  # one cell each
            lines.append(f"| {file} | {name} | {e.top1:.4f} | {e.bits:.3f} | {size} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m quant.report", description=" ".join(__doc__.split("\n\n")[0].split()),
                                formatter_class=HelpFormatter)
    p.add_argument("--results", default="assets/results", help="folder of results JSON files")
    p.add_argument("--out", default="assets/results/accuracy_vs_bits.png", help="plot to write (PNG)")
    p.add_argument("--title", help="plot title (default: the models and splits the entries name)")
    args = p.parse_args(argv)
    output_file(args.out, ".png")
    if Path(args.results).is_file():
        raise ValueError(f"{args.results} is a file; --results takes the folder of results files "
                         f"(here {Path(args.results).parent})")
    if not Path(args.results).is_dir():
        raise FileNotFoundError(f"no such results folder: {args.results}")
    res = load(args.results)
    for error in res.errors:
        print(f"skipping {error}")
    entries = res.having("top1", "bits")
    if not entries:
        raise ValueError(f"no entries with top1 and bits_per_weight in {args.results}/*.json: "
                         f"run python -m quant.ptq_results first")
    print(markdown(entries))
    fig = accuracy_vs_bits(res, args.title)
    write_png(args.out, fig, dpi=120)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    raise SystemExit(run(main))
