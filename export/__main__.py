"""Export a checkpoint to ONNX: `python -m export --checkpoint PATH --out model.onnx [--format F] [--standard-ops]`.

Writes a bitvit checkpoint (FP or quantized) as ONNX, then checks the file in ONNX Runtime against
the torch model on random images and prints the agreement (where bitvit's op library cannot be built,
for lack of a C++ compiler, of a writable cache or of ONNX Runtime's headers (offline), a file on
bitvit's ops is written unchecked, and the command says so). Formats: fp32, fp16 (weights stored at half
precision), w8a8 and w4a8 (int8 per-token activations x int8 or int4 weights, one scale per output), int4
(weight-only, MatMulNBits), ternary and binary; w8a8, w4a8, ternary and binary run on bitvit's custom ops
(`--standard-ops` writes MatMulInteger and MatMulNBits instead, for runtimes without bitvit's library). An
FP checkpoint is quantized (round to nearest) for the quantized formats; a quantized checkpoint exports as
the format it holds.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from quant.cli import HelpFormatter, max_threads, output_file, run, thread_count
from quant.packfile import load_any

from .exporter import FORMATS, export, is_quantized, model_format, on_bitvit_op, quantize_for_export
from .ortops import library_path
from .runtime import load


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="bitvit model file (.safetensors)")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--format", choices=("auto",) + FORMATS, default="auto",
                   help="auto (default): fp32 for an FP checkpoint, else the format it holds")
    p.add_argument("--standard-ops", action="store_true",
                   help="w8a8 as MatMulInteger, w4a8/ternary/binary as com.microsoft MatMulNBits, "
                        "instead of bitvit's ops")
    p.add_argument("--threads", type=thread_count, default=min(2, max_threads()),
                   help="threads for the check run (default: 2, or 1 on a one-core machine)")
    args = p.parse_args(argv)

    output_file(args.out, ".onnx", inputs=(args.checkpoint,))
    model = load_any(args.checkpoint).eval()
    if any(is_quantized(m) for m in model.modules()):
        fmt = model_format(model) if args.format == "auto" else args.format  # another is refused by export
    else:
        fmt = "fp32" if args.format == "auto" else args.format
        if fmt in ("ternary", "binary"):
            print(f"note: rounding a full-precision model to {fmt} weights without training loses much of its "
                  f"accuracy; {fmt} models are trained (python -m quant.qat --recipe "
                  f"{'w1.58a8' if fmt == 'ternary' else 'w1a8'}): export the trained file instead", file=sys.stderr)
        if fmt != "fp32":  # (seconds; ViT-B's 86 M weights: half a minute)
            print(f"rounding {args.checkpoint} to {fmt}...")  # (stdout, as the next: an error is stderr's one line)
        model = quantize_for_export(model, fmt)
    path = export(model, args.out, fmt, custom_ops=not args.standard_ops)

    lib = None
    if not args.standard_ops and any(map(on_bitvit_op, model.modules())):  # the file is on bitvit's ops
        try:
            lib = library_path()
        except (OSError, ValueError) as e:  # no compiler, no writable cache, no headers to download, a failed
            # compile: bitvit's op library cannot be built here, and the file stands
            advice = "" if "--standard-ops" in str(e) else " (or export with --standard-ops)"  # Windows' says it
            print(f"{path}: {fmt}, {path.stat().st_size / 1e6:.2f} MB, custom ops: bitvit; not checked against "
                  f"torch: {e}{advice}", file=sys.stderr)
            return
    print(f"checking {path} against torch on 8 random images...")  # a minute for ViT-B's torch forward
    session = load(path, threads=args.threads, library=lib)  # the library looked up once
    cfg = model.config
    x = torch.randn(8, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
    out = session(x.numpy())
    agree = int((out.argmax(1) == ref.argmax(1)).sum())
    print(f"{path}: {fmt}{' (standard ops)' if args.standard_ops else ''}, {path.stat().st_size / 1e6:.2f} MB, "
          f"custom ops: {'bitvit' if session.uses_custom_ops else 'none'}")
    print(f"ONNX Runtime vs torch on 8 random images: max |logit diff| {np.abs(out - ref).max():.2e}, "
          f"top-1 agreement {agree}/8")


if __name__ == "__main__":
    raise SystemExit(run(main))
