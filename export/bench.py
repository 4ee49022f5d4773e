"""`python -m export.bench`: latency and size of every ONNX variant against torch, plus their accuracy.

On the CPU, with `--threads` (2) threads, at batch 1 and 8, median of `--runs` (>= 30) timed runs
taken round-robin over the variants (so background load hits them alike), each timed call right
after an untimed one of the same variant (so a variant is timed with its threads awake, not waking them
from the sleep they fell into while the others ran: torch's OpenMP threads doze off within
milliseconds), for the reference model and a ViT-S/16 at 224 with random weights. ONNX Runtime's worker
threads sleep between calls, as in `export.runtime`; with `--spinning` they spin-wait (ONNX Runtime's
own default) and each variant's runs are timed together, one variant after another, since the threads
one session leaves spinning slow the next:
  torch fp32 | ORT fp32 | ORT dynamic int8 (onnxruntime.quantization.quantize_dynamic of ORT fp32) |
  ORT w8a8 (MatMulInteger: the w8a8 model in standard ops) | bitvit int8 op (the same model) |
  bitvit int4 op (w4a8: int4 weights, one scale per output, int8 activations) |
  ORT MatMulNBits 4-bit (weight-only, groups of 32) | ORT MatMulNBits 2-bit (the ternary model in standard
  ops) | bitvit ternary op | bitvit binary op
Quantized variants come from the FP model by round to nearest unless `--quantized` gives trained
files (e.g. the QAT ternary model; one with no ONNX export, or whose layers would not run on the bitvit op
its row names, is refused). With `--data`, each reference variant is also scored on its
`--split` (test) in ONNX Runtime and in torch, side by side, with the share of predictions that agree
(nothing enforces a match: integer rounding ties move a few images, and ORT dynamic int8's torch model is the
float one it was quantized from). Prints tables, writes
`--out` (JSON) and a plot next to it.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from quant.cli import (HelpFormatter, load_average, max_threads, output_file, positive_int, provenance, results_file,
                       run, thread_count, write_json, write_png)
from quant.models import VisionTransformer, create_model, save_model
from quant.packfile import load_any

from .exporter import export, is_quantized, model_format, quantize_for_export, to_onnx, write_onnx
from .runtime import load


@dataclass
class Variant:
    fn: Callable[[np.ndarray], np.ndarray]   # float32 (B, 3, S, S) -> logits (B, classes)
    model: torch.nn.Module                    # the torch model it came from (the accuracy reference)
    size_bytes: int                           # its file on disk
    weights: str                              # where its weights come from


VARIANTS = ("torch fp32", "ORT fp32", "ORT dynamic int8", "ORT w8a8 (MatMulInteger)", "bitvit int8 op",
            "bitvit int4 op", "ORT MatMulNBits 4-bit", "ORT MatMulNBits 2-bit", "bitvit ternary op",
            "bitvit binary op")
# variant -> (export format, bitvit custom ops)
EXPORTS = {"ORT fp32": ("fp32", True), "ORT w8a8 (MatMulInteger)": ("w8a8", False),
           "bitvit int8 op": ("w8a8", True), "bitvit int4 op": ("w4a8", True),
           "ORT MatMulNBits 4-bit": ("int4", True), "ORT MatMulNBits 2-bit": ("ternary", False),
           "bitvit ternary op": ("ternary", True), "bitvit binary op": ("binary", True)}
BITVIT_OP_FORMATS = {fmt for name, (fmt, _) in EXPORTS.items() if name.startswith("bitvit")}


def build_variants(fp_model, quantized: dict, workdir: Path, threads: int, spinning: bool) -> dict[str, Variant]:
    """Every variant of `fp_model`; `quantized` maps an export format to (trained model, its file, its graph
    on bitvit's ops, built when it was checked)."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = {}
    fp_file = workdir / "fp32.safetensors"
    save_model(fp_model, fp_file)
    out["torch fp32"] = Variant(_torch_fn(fp_model), fp_model, fp_file.stat().st_size, "full precision")
    models = {}
    for name, (fmt, custom) in EXPORTS.items():
        if fmt not in models:
            models[fmt] = quantized.get(fmt) or (quantize_for_export(fp_model, fmt),
                                                 "full precision" if fmt == "fp32" else "round to nearest", None)
        model, weights, graph = models[fmt]
        path = workdir / f"{name.replace(' ', '_')}.onnx"
        path = write_onnx(graph, path) if custom and graph is not None else export(model, path, fmt, custom)
        out[name] = Variant(load(path, threads, spinning), model, path.stat().st_size, weights)
        if name == "ORT fp32":
            from onnxruntime.quantization import QuantType, quantize_dynamic
            dyn = workdir / "dynamic_int8.onnx"
            logging.getLogger().setLevel(logging.ERROR)  # its advice to run pre-processing first
            # its shape inference does not type the outputs of com.microsoft's MultiHeadAttention: float
            quantize_dynamic(str(path), str(dyn), per_channel=True, weight_type=QuantType.QInt8,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            out["ORT dynamic int8"] = Variant(load(dyn, threads, spinning), fp_model, dyn.stat().st_size,
                                              "onnxruntime.quantization.quantize_dynamic (per channel)")
    return {k: out[k] for k in VARIANTS}


def _torch_fn(model):
    def fn(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()
    return fn


def time_variants(variants: dict, img_size: int, batch: int, runs: int, round_robin: bool) -> dict[str, float]:
    """Median ms per call of each variant after 3 warm-up calls, each timed call following an untimed
    call of the same variant; round-robin over the variants, or all of one variant's runs together."""
    from tqdm import tqdm
    x = np.random.default_rng(batch).standard_normal((batch, 3, img_size, img_size)).astype(np.float32)
    times = {k: [] for k in variants}
    # round-robin: one group of every variant; otherwise a group per variant, timed one after another
    groups = [list(variants.items())] if round_robin else [[item] for item in variants.items()]
    bar = tqdm(total=runs * len(variants), desc=f"batch {batch}", unit="run", leave=False)
    for group in groups:
        for _, v in group:
            for _ in range(3):
                v.fn(x)
        for _ in range(runs):
            for name, v in group:
                v.fn(x)
                t = time.perf_counter()
                v.fn(x)
                times[name].append((time.perf_counter() - t) * 1e3)
                bar.update()
    bar.close()
    return {k: statistics.median(v) for k, v in times.items()}


def accuracy(variants: dict, data, mean, std) -> dict[str, dict]:
    """Top-1 on --data of each variant in its runtime and of the torch model it came from."""
    from tqdm import tqdm

    from quant.evaluate import predict
    res = {}
    for name, v in tqdm(variants.items(), desc="accuracy", unit="variant"):
        # (an inner bar of images for each pass: a variant's two passes over 10,000 images take minutes)
        preds = predict(lambda x, fn=v.fn: torch.from_numpy(fn(x.numpy())), data.images, mean, std, 250, progress=True)
        ref = predict(v.model, data.images, mean, std, 250, progress=True)
        preds, ref = preds.argmax(1).numpy(), ref.argmax(1).numpy()
        res[name] = {"top1": float((preds == data.labels).mean()), "torch_top1": float((ref == data.labels).mean()),
                     "prediction_agreement": float((preds == ref).mean())}
    return res


def print_table(title: str, rows: dict, batches) -> None:
    print(f"\n{title}")
    fp32 = rows["ORT fp32"]["latency_ms"]
    head = "| variant | size (MB) | " + " | ".join(f"b{b} ms | vs ORT fp32" for b in batches) + " | top-1 ORT / torch |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, r in rows.items():
        cells = " | ".join(f"{r['latency_ms'][str(b)]:.2f} | {fp32[str(b)] / r['latency_ms'][str(b)]:.2f}x"
                           for b in batches)
        acc = f"{r['top1']:.4f} / {r['torch_top1']:.4f}" if "top1" in r else "-"
        print(f"| {name} | {r['size_bytes'] / 1e6:.2f} | {cells} | {acc} |")


def targets(rows: dict) -> dict[str, dict]:
    """Issue 5's targets at batch 1: measured value, goal, met."""
    ms = {name: r["latency_ms"]["1"] for name, r in rows.items()}
    tern, binary = ms["bitvit ternary op"], ms["bitvit binary op"]
    checks = {
        "ternary speed-up over ORT fp32": (ms["ORT fp32"] / tern, 2.0),
        "ternary speed-up over ORT dynamic int8": (ms["ORT dynamic int8"] / tern, 1.0),
        "ternary speed-up over ORT dynamic int8 (stretch)": (ms["ORT dynamic int8"] / tern, 1.3),
        "ternary file size, fraction of ORT fp32 (at most)": (
            rows["bitvit ternary op"]["size_bytes"] / rows["ORT fp32"]["size_bytes"], 1 / 12),
        "binary speed-up over ternary": (tern / binary, 1.0),
    }
    return {k: {"value": round(v, 4), "goal": round(g, 4), "met": bool(v <= g if "at most" in k else v >= g)}
            for k, (v, g) in checks.items()}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m export.bench", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", default="assets/vit_cifar_tiny.safetensors", help="the reference FP model")
    p.add_argument("--quantized", nargs="*", default=[],
                   help="trained quantized files of the reference model (e.g. its QAT ternary model) to use "
                        "instead of round to nearest for their format")
    p.add_argument("--data", help="data for top-1: CIFAR-10 .tar.gz, its folder, cifar-10-batches-py or an image tree "
                                  "of the model's classes (e.g. ../shared/data/cifar10-jpeg.tar.gz)")
    p.add_argument("--split", help="split --data is scored on (default: test)")
    p.add_argument("--limit", type=positive_int, help="score only this many images (a balanced subset; for dry runs)")
    p.add_argument("--runs", type=int, default=30, help="timed runs per model and batch, 30..10000 (default 30)")
    p.add_argument("--threads", type=thread_count, default=min(2, max_threads()),
                   help="CPU threads of torch and ONNX Runtime")
    p.add_argument("--batches", type=positive_int, nargs="+", default=[1, 8], help="batch sizes timed, 1 among them")
    p.add_argument("--no-vit-s", action="store_true", help="skip the ViT-S/16 224 model")
    p.add_argument("--spinning", action="store_true",
                   help="ONNX Runtime's worker threads spin-wait between calls (its own default) instead of sleeping")
    p.add_argument("--out", help="results JSON, the plot beside it (default assets/results/export_bench.json, the "
                                 "shipped results, which a --limit dry run must not overwrite: it needs --out)")
    args = p.parse_args(argv)
    args.out = results_file(args.out, args.limit, "assets/results/export_bench.json")
    for flag, given in (("--split", args.split), ("--limit", args.limit)):
        if given and not args.data:  # (timing alone scores no images: left out silently, it was a surprise)
            raise ValueError(f"{flag} picks the images of --data that top-1 is scored on: give --data too")
    args.split = args.split or "test"
    output_file(args.out, ".json")
    output_file(Path(args.out).with_suffix(".png"), ".png")  # the plot beside it, checked before the timing
    if not 30 <= args.runs <= 10_000:
        raise ValueError(f"--runs must lie in 30..10000 (the medians are reported), got {args.runs}")
    args.batches = list(dict.fromkeys(args.batches))  # a batch given twice is timed once
    if 1 not in args.batches:
        raise ValueError(f"--batches must include 1 (the targets are at batch 1), got {args.batches}")
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    load_before = load_average()

    ref = load_any(args.checkpoint).eval()
    if not isinstance(ref, VisionTransformer):  # (a CNN teacher file loads too)
        raise ValueError(f"{args.checkpoint} holds a {type(ref).__name__}, not a bitvit ViT; --checkpoint takes the "
                         f"full-precision ViT whose exports the bench times")
    if any(is_quantized(m) for m in ref.modules()):
        raise ValueError(f"{args.checkpoint} is a quantized model; --checkpoint takes the full-precision one "
                         f"(pass quantized files with --quantized)")
    quantized, given = {}, {}  # export format -> (model, its weights' label, its graph), the file it came from
    for path in args.quantized:
        qm = load_any(path).eval()
        fmt = model_format(qm)
        if fmt not in {f for f, _ in EXPORTS.values()} - {"fp32"}:
            raise ValueError(f"{path} holds {fmt} weights; the bench compares "
                             f"{', '.join(sorted({f for f, _ in EXPORTS.values()} - {'fp32'}))}")
        try:  # (W4A4 holds int4 weights, but its quantized attention has no export): refused now, not mid-bench
            proto = to_onnx(qm, fmt)
        except ValueError as e:
            raise ValueError(f"{path} has no ONNX export: {e}") from None
        if fmt in BITVIT_OP_FORMATS and {n.op_type for n in proto.graph.node} & {"MatMulNBits", "MatMulInteger"}:
            raise ValueError(f"{path}: its {fmt} layers do not all run on bitvit's op (grouped scales, zero points "
                             f"or float activations export in ONNX Runtime's standard ops instead), which the bench "
                             f"times for {fmt}; give a file with one symmetric scale per output and int8 activations")
        if not qm.config.same_model(ref.config):
            raise ValueError(f"{path} is not a quantized {Path(args.checkpoint).name}: its architecture, classes "
                             f"or input normalisation differ")
        if fmt in given:
            raise ValueError(f"{path} and {given[fmt]} both hold {fmt} weights; give one file per format")
        given[fmt] = path
        quantized[fmt] = (qm, f"trained: {Path(path).name}", proto)
    data = None
    if args.data:  # decoded (and refused, if it must be) before minutes of timing
        from quant.data import load_split
        data = load_split(args.data, args.split, image_size=ref.config.img_size, limit=args.limit,
                          check=lambda s: s.scored_by(ref.config))
    torch.manual_seed(0)
    suites = {"reference": (ref, Path(args.checkpoint).name)}
    if not args.no_vit_s:
        suites["vit_s16_224"] = (create_model("deit_small_patch16_224").eval(), "deit_small_patch16_224, random weights")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, (model, desc) in suites.items():
            print(f"{key}: exporting {len(VARIANTS)} variants of {desc} ...", file=sys.stderr)
            variants = build_variants(model, quantized if key == "reference" else {}, Path(tmp) / key, args.threads,
                                      args.spinning)
            rows = {name: {"size_bytes": v.size_bytes, "weights": v.weights, "latency_ms": {}}
                    for name, v in variants.items()}
            for b in args.batches:
                print(f"{key}: timing batch {b} ({args.runs} runs x {len(variants)} variants) ...", file=sys.stderr)
                for name, ms in time_variants(variants, model.config.img_size, b, args.runs,
                                              round_robin=not args.spinning).items():
                    rows[name]["latency_ms"][str(b)] = ms
            if key == "reference" and data is not None:
                for name, acc in accuracy(variants, data, model.config.mean, model.config.std).items():
                    rows[name].update(acc)
            results[key] = {"model": desc, "variants": rows, "targets": targets(rows)}
            print_table(f"{key} ({desc}), {args.threads} threads{', spinning' if args.spinning else ''}, "
                        f"median of {args.runs} runs", rows, args.batches)
            for name, t in results[key]["targets"].items():
                print(f"  {'met   ' if t['met'] else 'MISSED'} {name}: {t['value']:.3f} (goal {t['goal']:.3f})")
    split = None
    if args.data:
        split = f"{args.split} split of {Path(args.data).name}" + (
            f", {len(data.labels)} images balanced over classes" if args.limit else "")
    from .ortops import kernel_isa, library_path
    out = {**provenance("export.bench", argv), "bitvit_ops_isa": kernel_isa(library_path()),
           "split": split, "threads": args.threads, "ort_spinning": args.spinning, "runs": args.runs,
           "batches": args.batches,
           "load_average_before": load_before, "load_average_after": load_average(),
           "wall_s": round(time.perf_counter() - t_start, 1), "results": results}
    path = Path(args.out)
    write_json(path, out)
    plot(out, path.with_suffix(".png"))
    print(f"\nresults: {path}, plot: {path.with_suffix('.png')}")


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    suites = res["results"]
    fig, axes = plt.subplots(1, len(suites), figsize=(6.5 * len(suites), 4.5), squeeze=False)
    for ax, (key, suite) in zip(axes[0], suites.items()):
        names = list(suite["variants"])
        b1 = [suite["variants"][n]["latency_ms"]["1"] for n in names]
        ax.barh(names, b1, color=["#888" if not n.startswith("bitvit") else "#d62728" for n in names])
        for i, n in enumerate(names):
            ax.text(b1[i], i, f" {b1[i]:.2f} ms, {suite['variants'][n]['size_bytes'] / 1e6:.1f} MB", va="center", fontsize=8)
        ax.invert_yaxis()
        spin = ", ORT spinning" if res["ort_spinning"] else ""
        ax.set_xlabel(f"batch-1 latency, ms ({res['threads']} threads{spin}, median of {res['runs']})")
        ax.set_title(f"{key}: {suite['model']}", fontsize=9)
        ax.set_xlim(0, max(b1) * 1.45)
    fig.tight_layout()
    write_png(path, fig, dpi=110)


if __name__ == "__main__":
    raise SystemExit(run(main))
