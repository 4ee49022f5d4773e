"""The post-training results table: every PTQ recipe on one model, scored, in one results file.

    python -m quant.ptq_results --checkpoint assets/vit_cifar_tiny.safetensors \\
        --data ../shared/data/cifar10-jpeg.tar.gz --out assets/results/ptq.json

For the full-precision model and each recipe (default: w8a8, w4a8, w4a8-gptq, w4, nf4, w4-gptq, w4a4,
and w3, w3-gptq, w2, w2-gptq to show what GPTQ buys over round to nearest at 3 and 2 bits, groups of
64), it does
what `python -m quant.ptq` and `python -m quant.evaluate` do: quantizes with `--calib-size` training images
(`quant.ptq.calibration_inputs`: the first of each class, never the test split's), writes the packed file
under `--models`, loads that file back (`quant.load_any`)
and scores it on `--split` (default test). Each entry records top-1, the drop against the FP model,
the file's size and bits per linear weight (scales and zeros included), the two equivalent
commands, the machine, the date and the wall times. Entries already in `--out` for other recipes or
checkpoints are kept, so recipes can be run one at a time (`--recipes w4a4`); a rerun replaces those of the
same recipe and checkpoint file, however its path is spelled (entries of that file scored on another split or
number of images are refused: the drops are against one fp32 score). Draw the plot with
`python -m quant.report`.
"""
from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

import torch

from quant.cli import (HelpFormatter, finite_number, name_fits, output_file, positive_int, provenance, results_file,
                       run, run_folder, thread_count, utc_now, write_json)

TABLE_KEYS = ("recipe", "top1", "drop", "bits_per_weight", "size_bytes", "quantize_s")
DEFAULT_RECIPES = ("w8a8", "w4a8", "w4a8-gptq", "w4", "nf4", "w4-gptq", "w4a4", "w3", "w3-gptq", "w2", "w2-gptq")


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        entries = list(json.loads(path.read_text())["results"])
        if not all(isinstance(e, dict) for e in entries):
            raise TypeError("an entry of 'results' is not an object")
        for e in entries:  # what `table` prints of every entry, checked before hours of work, not after
            bad = [k for k in TABLE_KEYS
                   if not (isinstance(e.get(k), str) if k == "recipe" else finite_number(e.get(k)))]
            if bad:
                raise TypeError(f"entry {e.get('recipe')!r} has no valid {bad[0]!r}")
        return entries
    except (OSError, ValueError, RecursionError, KeyError, TypeError) as e:  # ValueError: a 5000-digit integer too
        raise ValueError(f"{path} is not a results file of quant.ptq_results ({e}); move it away or pick "
                         f"another --out") from None


def write_results(path: Path, entries: list[dict]) -> None:
    write_json(path, {"description": "post-training quantization of a bitvit model (python -m quant.ptq_results)",
                      "results": entries})


def score(path: Path, data, device: str) -> tuple[dict, float]:
    """top-1 etc. of the model in file `path` (loaded back from disk) and the seconds it took."""
    from quant import load_any
    from quant.evaluate import evaluate
    model = load_any(path)
    t0 = time.perf_counter()
    res = evaluate(model.to(device), data, device=device, progress=True)
    return res, time.perf_counter() - t0


def main(argv=None):
    from quant import quantize, recipe, save_quantized
    from quant.data import load_split
    from quant.models import load_model
    from quant.ptq import calibration_inputs
    from quant.recipes import QAT
    p = argparse.ArgumentParser(prog="python -m quant.ptq_results", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="full-precision bitvit model (.safetensors)")
    p.add_argument("--data", required=True, help="CIFAR-10 .tar.gz, its folder, cifar-10-batches-py or an image tree "
                                                 "(calibration on its training images, scoring on --split)")
    p.add_argument("--out", help="results file (entries are merged; default assets/results/ptq.json, the shipped "
                                 "results, which a --limit dry run must not overwrite: it needs --out)")
    p.add_argument("--models", default="runs/ptq", help="folder for the quantized model files")
    p.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), help="PTQ recipes to run")
    p.add_argument("--split", default="test", help="split to score on (default test)")
    p.add_argument("--limit", type=positive_int, help="score only this many images (dry runs)")
    p.add_argument("--calib-size", type=positive_int, default=256, help="calibration images (default 256)")
    p.add_argument("--threads", type=thread_count, help="torch CPU threads")
    args = p.parse_args(argv)
    args.out = results_file(args.out, args.limit, "assets/results/ptq.json")
    output_file(args.out, ".json")
    run_folder(args.models)  # not a file: checked before the full-precision model is scored
    if args.threads:
        torch.set_num_threads(args.threads)
    args.recipes = list(dict.fromkeys(args.recipes))  # a recipe named twice is quantized and scored once
    for name in args.recipes:                          # refuse an unknown or a QAT recipe before any work
        if isinstance(recipe(name), QAT):
            raise ValueError(f"{name} is a quantization-aware training recipe: train it with python -m quant.qat")
    ckpt, out, models = Path(args.checkpoint), Path(args.out), Path(args.models)

    def quantized_file(name: str) -> Path:
        return models / f"{ckpt.stem}.{name}.safetensors"
    for name in args.recipes:  # the quantized files' names, made from the checkpoint's: refused now, not after minutes
        name_fits(quantized_file(name), "give the checkpoint a shorter name (each quantized model is named after it "
                  "and its recipe)")
    entries = load_results(out)
    cfg = load_model(ckpt).config
    data = load_split(args.data, args.split, image_size=cfg.img_size, limit=args.limit,
                      check=lambda s: s.scored_by(cfg))  # refused, if it must be, before it is decoded
    for e in entries:  # one table, one fp32 score its drops are measured against
        if of_file(e, ckpt) and (e.get("split", args.split), e.get("n", len(data))) != (args.split, len(data)):
            raise ValueError(f"{out} holds {ckpt.name}'s {e['recipe']} scored on {e.get('n')} {e.get('split')} "
                             f"images, not {len(data)} {args.split} images as this run; give another --out")
    calib = calibration_inputs(args.data, args.calib_size, cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sweep = provenance("quant.ptq_results", argv)
    common = {"checkpoint": str(ckpt), "split": args.split, "n": len(data), "device": device,
              "machine": sweep["machine"], "cpu_threads": torch.get_num_threads(), "sweep_command": sweep["command"],
              **({"commit": sweep["commit"]} if "commit" in sweep else {})}
    limit = ["--limit", str(args.limit)] if args.limit else []

    def eval_cmd(path) -> str:
        return shlex.join(["python", "-m", "quant.evaluate", "--checkpoint", str(path), "--data", args.data,
                           "--split", args.split, *limit])

    def record(entry: dict) -> None:  # into the file as it is now: another sweep may have written it meanwhile
        nonlocal entries
        entries = [e for e in load_results(out) if not (e.get("recipe") == entry["recipe"] and of_file(e, ckpt))]
        entries.append({**entry, **common, "date": utc_now()})
        write_results(out, entries)

    fp, eval_s = score(ckpt, data, device)
    n_fp = sum(m.in_features * m.out_features for m in load_model(ckpt).modules() if isinstance(m, torch.nn.Linear))
    record({"recipe": "fp32", "top1": fp["top1"], "drop": 0.0, "size_bytes": ckpt.stat().st_size,
            "bits_per_weight": 32.0, "linear_weights": n_fp, "command": eval_cmd(ckpt),
            "quantize_s": 0.0, "eval_s": round(eval_s, 1), "wall_s": round(eval_s, 1)})
    print(f"fp32: top1={fp['top1']:.4f}")
    for name in args.recipes:
        r = recipe(name)
        path = quantized_file(name)
        model = load_model(ckpt)
        t0 = time.perf_counter()
        quantize(model, r, calib=calib)
        quantize_s = time.perf_counter() - t0
        storage = save_quantized(model, path)
        res, eval_s = score(path, data, device)
        ptq_cmd = shlex.join(["python", "-m", "quant.ptq", "--checkpoint", str(ckpt), "--recipe", name,
                              "--calib", args.data, "--calib-size", str(args.calib_size), "--out", str(path)])
        record({"recipe": name, "top1": res["top1"], "drop": round(fp["top1"] - res["top1"], 4),
                "size_bytes": path.stat().st_size, "bits_per_weight": storage["bits_per_weight"],
                "linear_weights": storage["linear_weights"], "calib": f"{len(calib)} train-split images",
                "command": f"{ptq_cmd} && {eval_cmd(path)}", "quantize_s": round(quantize_s, 1),
                "eval_s": round(eval_s, 1), "wall_s": round(quantize_s + eval_s, 1)})
        print(f"{name}: top1={res['top1']:.4f} (drop {100 * (fp['top1'] - res['top1']):+.2f} points), "
              f"{storage['bits_per_weight']:.3f} bits/weight, {path.stat().st_size / 1e6:.3f} MB, "
              f"quantized in {quantize_s:.0f} s")
    print(table(entries, str(ckpt)))
    print(f"results: {out}")


def of_file(entry: dict, checkpoint: str | Path) -> bool:
    """Whether a results entry is of the checkpoint file, however either spells its path (relative, a/../b)."""
    c = entry.get("checkpoint")
    return isinstance(c, str) and Path(c).resolve() == Path(checkpoint).resolve()


def table(entries: list[dict], checkpoint: str | None = None) -> str:
    """A markdown table of the entries (of one checkpoint file, however each entry spells its path)."""
    rows = [e for e in entries if checkpoint is None or of_file(e, checkpoint)]
    lines = ["| recipe | top-1 | drop (points) | bits/weight | size (MB) | quantize (s) |", "|---|---|---|---|---|---|"]
    for e in rows:
        lines.append(f"| {e['recipe']} | {e['top1']:.4f} | {100 * e['drop']:+.2f} | {e['bits_per_weight']:.3f} | "
                     f"{e['size_bytes'] / 1e6:.3f} | {e['quantize_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(run(main))
