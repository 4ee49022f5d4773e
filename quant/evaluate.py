"""Score a checkpoint: `python -m quant.evaluate --checkpoint PATH --data PATH [--split test]`.

Prints top-1 (as `top1=0.xxxx` on the last line), per-class accuracy, parameter count, size on disk
and batch-1 latency; writes a confusion-matrix PNG and, with `--out` (or `--json`, its first name), all of it
as JSON (its fields below).
The checkpoint is a bitvit `.safetensors` file (run in torch) or a bitvit `.onnx` export (run in ONNX
Runtime, with bitvit's ops where the graph uses them). Post-training quantization and QAT score their
torch models through `evaluate`, export's benchmark its ONNX Runtime sessions through `predict`. The data
may hold some of the model's classes only, or all in another order, by name (`ImageSet.scored_by`).

The JSON's fields: `top1` (the fraction of images predicted right), `n` (images scored), `per_class`
({class: accuracy}, null for a class without images; a name given to two classes carries each one's index,
"crane (class 134)", and unnamed classes are "class 0", "class 1", ...), `confusion` (counts; rows: true class, columns:
predicted, in `per_class`'s order), `checkpoint`, `runtime` ("torch" or "onnxruntime"), `device` (where it
scored: "cuda:N" for a torch checkpoint where a GPU is visible, else "cpu"), `split`, `params` (each
packed weight counted as one), `size_bytes` (the checkpoint file's), `latency_ms_batch1_cpu` (in ms,
the median of 30 timed runs, after 3 warm-ups, of one random image at the model's input size on the CPU),
`threads` (of torch or ONNX Runtime), `eval_seconds` (the wall time of scoring, loading not included),
`command`, `machine`, `date`, `commit` (where known) and `confusion_png` (the plot's path).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from quant.cli import (HelpFormatter, counted, name_fits, output_file, positive_int, provenance, run, thread_count,
                       write_json, write_png)
from quant.data import ImageSet, class_names, load_split, to_model_input


@torch.no_grad()
def predict(model: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, mean, std, batch_size: int = 500,
            device: str | torch.device = "cpu", progress: bool = False) -> torch.Tensor:
    """Logits (N, K) of uint8 images (N, H, W, 3), computed in batches by a module (put in eval mode) or
    any function of a normalised batch (B, 3, S, S)."""
    from tqdm import tqdm
    if isinstance(model, nn.Module):
        model.eval()
    out = []
    with tqdm(total=len(images), desc="evaluating", unit="img", disable=not progress, leave=False) as bar:
        for i in range(0, len(images), batch_size):
            x = to_model_input(images[i:i + batch_size], mean, std, device=device)
            out.append(model(x).float().cpu())
            bar.update(len(x))
    return torch.cat(out)


def evaluate(model: nn.Module, data: ImageSet, batch_size: int = 500, device="cpu",
             progress: bool = False) -> dict:
    """top1, per-class accuracy and the confusion matrix (rows: true class, columns: predicted), over the model's
    classes (`ImageSet.scored_by`: the data may hold some of them only, or all in another order)."""
    cfg = model.config
    data = data.scored_by(cfg)
    logits = predict(model, data.images, cfg.mean, cfg.std, batch_size, device, progress)
    bad = int((~logits.isfinite().all(1)).sum())
    if bad:  # argmax would call them all class 0 and report a top-1 regardless
        raise ValueError(f"the model gives NaN or infinite logits for {bad} of {len(logits)} images (a damaged model?)")
    pred = logits.argmax(1).numpy()
    k = cfg.num_classes
    confusion = np.bincount(data.labels * k + pred, minlength=k * k).reshape(k, k)
    counts = confusion.sum(1)                                     # images of each true class
    per_class = confusion.diagonal() / np.maximum(counts, 1)
    names = class_names(data.classes, k)  # a name the model gives two classes carries each one's index
    return {"top1": float((pred == data.labels).mean()), "n": int(len(pred)),  # per class: None without images
            "per_class": {c: float(a) if n else None for c, a, n in zip(names, per_class, counts)},
            "confusion": confusion.tolist()}


@torch.no_grad()
def latency_ms(model: nn.Module, img_size: int) -> float:
    """Median wall time (over 30 runs) of one forward pass of a (1, 3, img_size, img_size) input, in ms."""
    x = torch.randn(1, 3, img_size, img_size)
    model.eval()
    for _ in range(3):
        model(x)
    times = []
    for _ in range(30):
        t = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


class OnnxModel(nn.Module):
    """A bitvit ONNX export in ONNX Runtime (on the CPU), behind the module interface `evaluate` and
    `latency_ms` call."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        super().__init__()
        from export.runtime import load  # the export stage, needed only for .onnx files
        self.session = load(path, threads=threads)
        self.config = self.session.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, classes)
        return torch.from_numpy(self.session(x.detach().cpu().numpy()))


def confusion_figure(confusion, classes, title: str):
    """A confusion matrix (rows: true class) as a heat map of each row's fractions, with the counts (or a
    matrix's own fractions) written in where there are at most 20 classes; `classes` name them where there are at
    most 50 (numbers when they do not fit, or beyond). Names and title are drawn as text: a "$" in them is a
    dollar, not TeX."""
    import matplotlib.pyplot as plt
    cm = np.asarray(confusion, dtype=float)
    k = cm.shape[0]
    names = list(classes) if len(classes) == k else [str(i) for i in range(k)]
    sums = cm.sum(1, keepdims=True)
    norm = cm / np.where(sums > 0, sums, 1)  # (a matrix of fractions, not counts, has rows summing below 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= 50:  # more names run together into a black band (ImageNet's 1000): the axes number the classes
        ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8, parse_math=False)
        ax.set_yticks(range(k), names, fontsize=8, parse_math=False)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, int(cm[i, j]) if cm[i, j].is_integer() else f"{cm[i, j]:.2g}", ha="center",
                        va="center", fontsize=7, color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10, parse_math=False)
    fig.colorbar(im, ax=ax, fraction=0.046).set_label("fraction of the true class's images")
    fig.tight_layout()
    return fig


def plot_confusion(confusion, classes, path: str | os.PathLike, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    fig = confusion_figure(confusion, classes, title)
    write_png(path, fig, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m quant.evaluate", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="bitvit model file (.safetensors, or an .onnx export "
                                                       "run in ONNX Runtime)")
    p.add_argument("--data", required=True, help="CIFAR-10 .tar.gz, its unpacked folder, "
                                                 "cifar-10-batches-py, or an image-folder tree")
    p.add_argument("--split", default="test", help="test (default), val, train, trainval or all")
    p.add_argument("--limit", type=positive_int, help="score only this many images (balanced over classes)")
    p.add_argument("--out", "--json", help="write all results to this JSON file (--json: its first name)")
    p.add_argument("--confusion", help="confusion-matrix PNG (default: next to --out, "
                                       "or <checkpoint>.confusion.png)")
    p.add_argument("--batch-size", type=positive_int, default=500, help="images a forward pass")
    p.add_argument("--threads", type=thread_count, help="CPU threads of torch or ONNX Runtime "
                                                       "(default: torch's, one per core)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out:
        output_file(args.out, ".json", inputs=(args.checkpoint,))
    if args.confusion:
        output_file(args.confusion, ".png", inputs=(args.checkpoint, args.out))

    from quant.qlinear import weight_count
    from quant.packfile import load_any
    onnx = Path(args.checkpoint).suffix.lower() == ".onnx"
    model = OnnxModel(args.checkpoint, torch.get_num_threads()) if onnx else load_any(args.checkpoint)
    cfg = model.config
    confusion_png = args.confusion or (Path(args.out).with_suffix(".confusion.png") if args.out
                                       else Path(str(args.checkpoint) + ".confusion.png"))
    if not args.confusion:  # the default path too, before scoring (here, where the checkpoint's folder is known)
        name_fits(confusion_png, f"give --confusion PATH, or a shorter {'--out' if args.out else 'checkpoint'} name")
        output_file(confusion_png, ".png", inputs=(args.checkpoint, args.out))
    data = load_split(args.data, args.split, image_size=cfg.img_size, limit=args.limit,
                      check=lambda s: s.scored_by(cfg))  # refused, if it must be, before it is decoded
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() and not onnx else "cpu"
    t0 = time.perf_counter()
    res = evaluate(model.to(device), data, args.batch_size, device, progress=True)
    eval_s = time.perf_counter() - t0
    model.cpu()
    size = Path(args.checkpoint).stat().st_size
    params = model.session.weight_count if onnx else weight_count(model)
    print("timing batch-1 latency on the CPU (33 forward passes)...", file=sys.stderr)  # ViT-B's: many seconds
    lat = latency_ms(model, cfg.img_size)
    threads = torch.get_num_threads()  # ONNX Runtime was given as many
    res.update(checkpoint=str(args.checkpoint), runtime="onnxruntime" if onnx else "torch", device=device,
               split=args.split, params=params, size_bytes=size, latency_ms_batch1_cpu=lat, threads=threads,
               eval_seconds=eval_s, **provenance("quant.evaluate", argv))

    plot_confusion(res["confusion"], list(res["per_class"]), confusion_png,
                   f"{Path(args.checkpoint).name} on {counted(res['n'], args.split + ' image')} "
                   f"(top-1 {res['top1']:.4f})")
    res["confusion_png"] = str(confusion_png)

    width = max(map(len, res["per_class"]))
    print(f"{args.checkpoint}: {params:,} parameters, {size / 1e6:.2f} MB on disk, "
          f"batch-1 CPU latency {lat:.2f} ms in {res['runtime']} ({counted(threads, 'thread')})")
    print(f"{args.split} split: {counted(res['n'], 'image')}")
    for c, a in res["per_class"].items():
        print(f"  {c:<{width}}  {'no images' if a is None else f'{a:.4f}'}")
    print(f"confusion matrix: {confusion_png}")
    if args.out:
        write_json(args.out, res)
        print(f"results: {args.out}")
    print(f"top1={res['top1']:.4f}")


if __name__ == "__main__":
    raise SystemExit(run(main))
