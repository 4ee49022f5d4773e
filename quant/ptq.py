"""Post-training quantization: `python -m quant.ptq --checkpoint FP --recipe R --calib DATA --out PATH`.

Loads a full-precision bitvit checkpoint, takes `--calib-size` TRAINING images of `--calib` (split
`trainval`, balanced over classes; never the test split) as calibration inputs for the recipes that
need them (GPTQ, W4A4; the others, which round to nearest, say on stderr that they ignore both), quantizes
with the recipe (any field overridable: `--set group_size=128`), and writes one packed file
(`quant.save_quantized`). Prints the storage cost: bits per linear weight (scales and zeros included) and
the file size. Score the file with `python -m quant.evaluate`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from quant.cli import HelpFormatter, output_file, positive_int, run, thread_count


def parse_overrides(items: list[str]) -> dict:
    """`field=value` strings -> a dict, values read as JSON when they parse (numbers, true/false, null)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects field=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            out[key] = value
        if isinstance(out[key], list):
            out[key] = tuple(tuple(v) if isinstance(v, list) else v for v in out[key])
    return out


def calibration_inputs(data: str, n: int, cfg) -> torch.Tensor:
    """(n, 3, H, W) normalised training images for calibration: split `trainval`, as calibration needs no
    validation hold-out (the first images of each class, so those of split `train` where it has enough)."""
    from quant.data import load_split, to_model_input
    train = load_split(data, "trainval", image_size=cfg.img_size, limit=n)
    return to_model_input(train.images, cfg.mean, cfg.std)


def main(argv=None):
    from quant import quantize, recipe, save_quantized
    from quant.models import load_model
    from quant.recipes import GPTQ, QAT, W4A4
    from quant.train import resolve_device
    p = argparse.ArgumentParser(prog="python -m quant.ptq", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="full-precision bitvit model (.safetensors)")
    p.add_argument("--recipe", required=True,
                   help="w8a8, w4a8, w4a8-gptq, w4, w3, w2, nf4, w4-gptq, w3-gptq, w2-gptq, w4a4")
    p.add_argument("--calib", help="data for calibration (its training images); needed by GPTQ and W4A4, "
                                   "ignored (with a note) by the recipes that round to nearest")
    p.add_argument("--calib-size", type=positive_int,  # (None: not given, which a round-to-nearest recipe notes)
                   help="calibration images (default 256, as quant.ptq_results and quant/README.md's tables)")
    p.add_argument("--out", required=True, help="quantized model file to write (.safetensors)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a recipe field, e.g. --set group_size=128 --set act_order=true")
    p.add_argument("--device", help="cpu or cuda[:N] to calibrate and quantize on (default: cuda when available)")
    p.add_argument("--threads", type=thread_count, help="torch CPU threads")
    p.add_argument("--float16", action="store_true",
                   help="store the parameters left in floating point (embeddings, norms, biases) in float16; "
                        "calibrated activation ranges stay float32")
    args = p.parse_args(argv)
    output_file(args.out, ".safetensors", inputs=(args.checkpoint,))
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    r = recipe(args.recipe, **parse_overrides(args.set))
    if isinstance(r, QAT):
        raise ValueError(f"{args.recipe} is a quantization-aware training recipe: "
                         f"use python -m quant.qat --teacher {args.checkpoint} --recipe {args.recipe} ...")
    model = load_model(args.checkpoint).to(device)
    calib = None
    if isinstance(r, (GPTQ, W4A4)):  # the other recipes round to nearest: no images needed
        if not args.calib:
            raise ValueError(f"recipe {args.recipe} calibrates: give --calib DATA (training images to calibrate on)")
        calib = calibration_inputs(args.calib, args.calib_size or 256, model.config)
    elif given := [o for o, v in (("--calib", args.calib), ("--calib-size", args.calib_size)) if v is not None]:
        # not refused: quant.ptq_results records its commands with --calib and --calib-size for every recipe
        print(f"note: recipe {args.recipe} rounds to nearest and calibrates on nothing: {' and '.join(given)} "
              f"{'is' if len(given) == 1 else 'are'} ignored", file=sys.stderr)
    # (round to nearest draws no bar: a minute for vit_base_patch16_224 on a 2-core CPU)
    # the fields --set changed beside the name: "w2" with weight_format=ternary writes no int2 weights
    what = args.recipe + (f" ({', '.join(args.set)})" if args.set else "")
    print(f"quantizing {args.checkpoint} with {what}...")  # (stdout: an error after it is stderr's one line)
    t0 = time.perf_counter()
    quantize(model, r, calib=calib)  # calibration inputs follow the model to its device
    seconds = time.perf_counter() - t0
    model.cpu()
    storage = save_quantized(model, args.out, args.float16)
    size = Path(args.out).stat().st_size
    fp_size = Path(args.checkpoint).stat().st_size
    print(f"{what}: quantized in {seconds:.1f} s"
          + (f" with {len(calib)} calibration images" if calib is not None else ""))
    print(f"linear weights: {storage['linear_weights']:,} at {storage['bits_per_weight']:.3f} bits/weight "
          f"(scales and zeros included)")
    print(f"wrote {args.out}: {size / 1e6:.3f} MB ({fp_size / size:.1f}x smaller than the "
          f"{fp_size / 1e6:.3f} MB full-precision file)")


if __name__ == "__main__":
    raise SystemExit(run(main))
