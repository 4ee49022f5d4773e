"""Accuracy against bits per weight, drawn from the results files: `python -m quant.report`.

Reads every JSON file in `--results` (default `assets/results/`), collects each entry (a dict, at
any depth) that has both `top1` and `bits_per_weight` (the post-training table of
`quant.ptq_results`, the QAT runs, ...), prints them as one markdown table and plots top-1 against
bits per weight, one marker style per results file, the full-precision model as a dashed line.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from quant.cli import finite_number, output_file, run


def _walk(obj, name: str | None = None):
    if isinstance(obj, dict):
        top1, bits = obj.get("top1"), obj.get("bits_per_weight")
        if finite_number(top1) and 0 <= top1 <= 1 and finite_number(bits) and bits > 0:
            yield {**obj, "recipe": obj.get("recipe") or obj.get("name") or name or "?"}
            return
        for k, v in obj.items():
            yield from _walk(v, k)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v, name)


def collect(folder: str | Path) -> dict[str, list[dict]]:
    """{results file stem: its entries with top1 and bits_per_weight}, files without any left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such results folder: {folder}")
    out = {}
    for path in sorted(folder.glob("*.json")):
        try:
            entries = list(_walk(json.loads(path.read_text())))
        except (OSError, ValueError, RecursionError) as e:  # not JSON, not UTF-8, a folder, nested too deep
            print(f"skipping {path}: not readable JSON ({type(e).__name__}: {e})")
            continue
        if entries:
            out[path.stem] = entries
    return out


def markdown(results: dict[str, list[dict]]) -> str:
    lines = ["| results | recipe | top-1 | bits/weight | size (MB) |", "|---|---|---|---|---|"]
    for source, entries in results.items():
        for e in sorted(entries, key=lambda e: -e["bits_per_weight"]):
            size = f"{e['size_bytes'] / 1e6:.3f}" if isinstance(e.get("size_bytes"), (int, float)) else ""
            lines.append(f"| {source} | {e['recipe']} | {e['top1']:.4f} | {e['bits_per_weight']:.3f} | {size} |")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: str | Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = "osD^vP*X"
    fp_drawn = False
    for i, (source, entries) in enumerate(results.items()):
        quantized = [e for e in entries if e["bits_per_weight"] < 16]
        for e in entries:
            if e["bits_per_weight"] >= 16 and not fp_drawn:
                ax.axhline(e["top1"], color="grey", ls="--", lw=1, label=f"full precision ({e['top1']:.4f})")
                fp_drawn = True
        if not quantized:
            continue
        ax.scatter([e["bits_per_weight"] for e in quantized], [e["top1"] for e in quantized],
                   marker=markers[i % len(markers)], s=45, label=source, zorder=3)
        for e in quantized:
            ax.annotate(e["recipe"], (e["bits_per_weight"], e["top1"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.set_xlabel("bits per linear weight on disk (scales and zeros included)")
    ax.set_ylabel("top-1")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m quant.report", description=__doc__.splitlines()[0])
    p.add_argument("--results", default="assets/results", help="folder of results JSON files")
    p.add_argument("--out", default="assets/results/accuracy_vs_bits.png", help="plot to write (PNG)")
    p.add_argument("--title", help="plot title (default: the models and split the entries name)")
    args = p.parse_args(argv)
    output_file(args.out, ".png")
    results = collect(args.results)
    if not results:
        raise ValueError(f"no entries with top1 and bits_per_weight in {args.results}/*.json: "
                         f"run python -m quant.ptq_results first")
    print(markdown(results))
    entries = [e for v in results.values() for e in v]
    models = sorted({Path(str(e["checkpoint"])).stem for e in entries if e.get("checkpoint")})
    splits = sorted({str(e["split"]) for e in entries if e.get("split")})
    title = args.title or f"{', '.join(models) or 'bitvit'}: top-1 on the {'/'.join(splits) or 'eval'} split"
    plot(results, args.out, title)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    raise SystemExit(run(main))
