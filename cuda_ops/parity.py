"""Does a real quantized model compute the same on the bitvit kernels? `python -m cuda_ops.parity`.

    python -m cuda_ops.parity --model assets/vit_cifar_tiny.safetensors --data cifar10-jpeg.tar.gz \\
        --split test --recipes w8a8,w4a8,w4,nf4,w2 --quantized assets/vit_cifar_tiny-w1.58a8.safetensors \\
        --out assets/results/cuda_parity.json

For each post-training recipe applied to the FP model (round to nearest: no calibration data needed),
and each already-quantized bitvit file (`--quantized`, e.g. a QAT ternary model), the split is scored
twice: with QuantLinear's reference forward and after `to_kernels` (on this machine's device: the CPU
kernels on a CPU, the Triton kernels on a GPU). Reported: both top-1s, how many predictions agree,
and the logits' relative error. Kernel and reference differ only by float rounding (the integer dot
products are exact), so the top-1s should agree to within a few images.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from cuda_ops.modules import KernelLinear, kernel_for, to_kernels
from quant.cli import HelpFormatter, output_file, positive_int, provenance, run, write_json
from quant.data import load_split
from quant.evaluate import predict
from quant.models import ViTConfig, load_model


RECIPES = "w8a8,w4a8,w4,nf4,w2"  # --recipes' default


def compare(name: str, model: torch.nn.Module, data, device: str, batch_size: int) -> dict:
    """Top-1 and logits of `model` (QuantLinear layers) against the same model on the kernels."""
    cfg = model.config
    t0 = time.perf_counter()
    ref = predict(model.to(device), data.images, cfg.mean, cfg.std, batch_size, device, progress=True).double()
    t_ref = time.perf_counter() - t0
    fast = to_kernels(copy.deepcopy(model)).to(device)
    n_kernels = sum(isinstance(m, KernelLinear) for m in fast.modules())
    t0 = time.perf_counter()
    out = predict(fast, data.images, cfg.mean, cfg.std, batch_size, device, progress=True).double()
    t_kernels = time.perf_counter() - t0
    labels = torch.as_tensor(data.labels)
    p_ref, p_out = ref.argmax(1), out.argmax(1)
    return {"model": name, "kernel_layers": n_kernels, "n": len(labels),
            "top1_reference": (p_ref == labels).double().mean().item(),
            "top1_kernels": (p_out == labels).double().mean().item(),
            "predictions_agree": (p_ref == p_out).double().mean().item(),
            "logits_rel_err": ((out - ref).norm() / ref.norm()).item(),
            "seconds_reference": t_ref, "seconds_kernels": t_kernels}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cuda_ops.parity", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", help="a full-precision bitvit model file, quantized with each of --recipes")
    p.add_argument("--recipes", help="comma-separated post-training recipes that need no calibration data "
                                     f"(default: {RECIPES})")
    p.add_argument("--quantized", default="", help="comma-separated quantized bitvit files to check as they are")
    p.add_argument("--data", required=True, help="CIFAR-10 .tar.gz or any source quant.data reads")
    p.add_argument("--split", default="test", help="split to score on")
    p.add_argument("--limit", type=positive_int, help="only this many images (balanced over classes)")
    p.add_argument("--batch-size", type=positive_int, default=500, help="images a forward pass")
    p.add_argument("--out", type=Path, help="write the results JSON here")
    args = p.parse_args(argv)
    if args.out:
        output_file(args.out, ".json")
    import quant
    if args.recipes is not None and not args.model:  # else left unused without a word
        raise ValueError("--recipes quantizes the --model file: give --model too, or leave --recipes out")
    names = RECIPES if args.recipes is None else args.recipes
    recipes = list(dict.fromkeys(r for r in names.split(",") if r)) if args.model else []  # (each once)
    files = list(dict.fromkeys(f for f in args.quantized.split(",") if f))
    if not recipes and not files:
        raise ValueError("nothing to check: give --model (with --recipes) and/or --quantized files")
    from quant.recipes import RTN
    for r in recipes:
        if not isinstance(quant.recipe(r), RTN):
            raise ValueError(f"recipe {r!r} is not a round-to-nearest recipe: quantize it with quant first and "
                             f"pass the file with --quantized")
    headers = {f: quant.read_header(f) for f in files}  # refuses a file that is not a packed bitvit model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fp = load_model(args.model) if args.model else None
    models = [(f"{Path(args.model).name} {r}", quant.quantize(copy.deepcopy(fp), r)) for r in recipes]
    models += [(Path(f).name, quant.load_quantized(f)) for f in files]
    for name, model in models:  # before any is scored (minutes each on a CPU's full test split)
        if not any(map(kernel_for, model.modules())):  # else both forwards are the reference: "agreement"
            raise ValueError(f"{name} has no layer bitvit's kernels run (to_kernels would leave every quantized layer "
                             f"on the reference forward): give a model quantized to a format with a kernel "
                             f"(cuda_ops/README.md)")
    configs = [(Path(args.model).name, fp.config)] if fp is not None else []
    configs += [(Path(f).name, ViTConfig.from_json(json.dumps(h["architecture"]["config"]), f))
                for f, h in headers.items() if h["architecture"] is not None]

    def fits(data):  # every model's classes before the first is scored (and before the split is decoded): top-1s
        for name, cfg in configs:  # against other classes' labels mean nothing
            data.require_classes(cfg, whose=f"{name}'s")
        return data
    data = load_split(args.data, args.split, image_size=models[0][1].config.img_size, limit=args.limit, check=fits)
    start = time.monotonic()
    result = {**provenance("cuda_ops.parity", argv), "cpu_threads": torch.get_num_threads(),
              "device": device, "data": f"{args.data} split={args.split} n={len(data)}", "rows": [],
              "complete": False}  # until the last row: a run killed or refused midway leaves a partial file
    count = len(models)
    for i in range(1, count + 1):
        name, model = models.pop(0)  # let go once scored: `compare` moves it to the GPU
        if data.images.shape[1] != model.config.img_size:  # a file of another input size: the split at its size
            data = load_split(args.data, args.split, image_size=model.config.img_size, limit=args.limit, check=fits)
        # (the two bars, one a pass, name no model: minutes a model on a CPU's full test split)
        print(f"[{i}/{count}] {name}: {len(data)} images through the reference forward, then the kernels",
              file=sys.stderr)
        result["rows"].append(compare(name, model, data, device, args.batch_size))
        result["wall_s"] = time.monotonic() - start
        result["complete"] = len(result["rows"]) == count
        if args.out:
            write_json(args.out, result)
    print(f"\n{'model':<44}{'layers':>7}{'top-1 ref':>10}{'kernels':>9}{'agree':>8}{'logit err':>11}")
    for r in result["rows"]:
        print(f"{r['model']:<44}{r['kernel_layers']:>7}{r['top1_reference']:>10.4f}{r['top1_kernels']:>9.4f}"
              f"{r['predictions_agree']:>8.4f}{r['logits_rel_err']:>11.2e}")
    print(f"{result['data']} on {device}; wall time {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
