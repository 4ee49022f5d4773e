"""How much smaller packed files are, per architecture and recipe: `python -m quant.sizes`.

For each model (randomly initialised: a file's size does not depend on the weights' values) it
writes the full-precision file (`quant.models.save_model`, float32), then quantizes a fresh copy
with each recipe and writes the packed file (`quant.save_quantized`) twice: with the tensors left in
floating point (patch embedding, position embeddings, norms, biases, a full-precision head) in
float32, and in float16 (`--float16` of quant.ptq / quant.qat). It prints one table of sizes and
ratios, and with `--out` (or `--json`, its first name) writes it with the command, machine and date
(under keys of its own, so the app's Results tab does not plot these random models beside trained ones).
QAT recipes are frozen right after their layers are swapped in (no training: the file layout is what is
measured); recipes that calibrate get random calibration inputs.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from quant.cli import HelpFormatter, output_file, provenance, run, write_json

DEFAULT_MODELS = ["vit_cifar_tiny", "vit_cifar_small", "deit_small_patch16_224", "vit_base_patch16_224"]
DEFAULT_RECIPES = ["w8a8", "w4", "nf4", "w2", "w1.58a8", "w1a8"]


def packed_model(name: str, recipe_name: str) -> torch.nn.Module:
    """A randomly initialised `name` model quantized with `recipe_name`, ready to save."""
    from quant import bitlinear, quantize, recipe
    from quant.models import create_model
    from quant.recipes import GPTQ, W4A4, BitNet
    torch.manual_seed(0)
    model = create_model(name)
    r = recipe(recipe_name)
    cfg = model.config
    calib = torch.randn(8, 3, cfg.img_size, cfg.img_size) if isinstance(r, (GPTQ, W4A4)) else None
    model = quantize(model, r, calib=calib)
    if isinstance(r, BitNet):  # ternary or binary layers
        bitlinear.freeze(model)
    return model


def measure(name: str, recipes: list[str], folder: Path) -> list[dict]:
    """One row per recipe: the float32 file's and the packed files' sizes in bytes."""
    from quant import save_quantized
    from quant.models import count_parameters, create_model, save_model
    fp_path = folder / f"{name}.safetensors"
    fp = create_model(name)
    params = count_parameters(fp)
    save_model(fp, fp_path)
    del fp
    fp_bytes = fp_path.stat().st_size
    rows = []
    for r in recipes:
        model = packed_model(name, r)
        sizes = {}
        for label, half in (("float32", False), ("float16", True)):
            path = folder / f"{name}-{r}-{label}.safetensors"
            storage = save_quantized(model, path, float16=half)
            sizes[label] = path.stat().st_size
            path.unlink()
        rows.append({"model": name, "recipe": r, "parameters": params,
                     "fp32_bytes": fp_bytes, "file_bytes": sizes["float32"], "file_bytes_float16": sizes["float16"],
                     "linear_bytes": storage["linear_bytes"], "linear_bits": storage["bits_per_weight"]})
    fp_path.unlink()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | parameters | recipe | linear bits/weight | fp32 file MB | packed MB | x smaller "
             "| packed MB, rest float16 | x smaller |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fp32, f32, f16 = r["fp32_bytes"], r["file_bytes"], r["file_bytes_float16"]
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['recipe']} | {r['linear_bits']:.3f} "
                     f"| {fp32 / 1e6:.2f} | {f32 / 1e6:.3f} | {fp32 / f32:.1f}x "
                     f"| {f16 / 1e6:.3f} | {fp32 / f16:.1f}x |")
    return "\n".join(lines)


def main(argv=None):
    from tqdm import tqdm
    from quant.models import CONFIGS
    from quant.recipes import RECIPES, QViT
    p = argparse.ArgumentParser(prog="python -m quant.sizes", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    # lists are spaced, as in the other commands; commas (this command's first form, in recorded commands) work too
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help=f"of: {', '.join(CONFIGS)}")
    p.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES,
                   help="recipe names (not qvit or lsq, whose files need training)")
    p.add_argument("--out", "--json", help="write the table here as well (.json; --json: its first name)")
    args = p.parse_args(argv)
    if args.out:
        output_file(args.out, ".json")
    models = list(dict.fromkeys(m for a in args.models for m in a.split(",") if m))
    recipes = list(dict.fromkeys(r for a in args.recipes for r in a.split(",") if r))
    # Q-ViT's layers (qvit, lsq) freeze only with calibrated step sizes, and qvit's widths come from training
    fixed = [n for n, r in RECIPES.items() if not isinstance(r, QViT)]
    for what, given, known in (("model", models, list(CONFIGS)), ("recipe", recipes, fixed)):
        if not given:
            raise ValueError(f"--{what}s must name at least one of: {', '.join(known)}")
        if bad := [g for g in given if g not in known]:  # named, so one valid name beside them reads right
            raise ValueError(f"--{what}s names {', '.join(bad)}, not one of: {', '.join(known)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in tqdm(models, desc="models", unit="model"):
            rows += measure(name, recipes, Path(tmp))
    print(table(rows))
    if args.out:
        write_json(args.out, {**provenance("quant.sizes", argv), "rows": rows})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    raise SystemExit(run(main))
