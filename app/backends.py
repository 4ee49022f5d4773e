"""The models the app runs, behind one small interface: `open_model(path)` -> `Backend`.

A `Backend` maps normalised images, float32 (B, 3, S, S), to logits (B, classes) and says what it is:
its file, the runtime that runs it, its weight format, size on disk and bits per weight. How a bitvit
`.safetensors` file (full precision or packed) runs is decided in one place, `RUNTIME`:
  "onnxruntime"  the model is exported once (`export.exporter`, cached under the file's hash in a folder
                 per version of bitvit's code in quant/ and export/, so changed code writes a new graph;
                 `tidy_cache` removes the versions unused for a week) and runs
                 as an ONNX Runtime session (`export.runtime`): bitvit's ternary/binary/int4/int8 ops
                 (standard MatMulNBits and MatMulInteger ops when bitvit's op library cannot be built
                 here, which is asked once per process: `bitvit_ops_missing`), MatMulNBits for
                 weight-only formats. A model the exporter cannot express (quantized attention,
                 activation formats other than int8 per token) runs in torch instead, and its backend
                 says why.
  "torch"        the model runs as loaded by `quant.load_any` (QuantLinear's reference forward).
`.onnx` files always run in ONNX Runtime.

Size and bits per weight: `size_bytes` is the file the model ships as; `bits_per_weight` is
8 * size_bytes / (parameters of the full-precision architecture), everything in the file counted;
`linear_bits` is a packed file's own figure for its linear layers (codes + scales + zeros).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

import export
import quant
from quant.cli import file_sha256, finite_number, shortened_name, written_whole
from quant.data import cache_dir, check_model_input
from quant.models import FORMAT as FP_FORMAT
from quant.models import ViTConfig, existing_file, fp_parameters, is_torch_file, read_safetensors_metadata
from quant.packfile import FORMAT as QUANT_FORMAT
from quant.packfile import is_quantized_format

RUNTIME = "onnxruntime"
MODEL_SUFFIXES = (".safetensors", ".onnx")
# the code that makes the files the app caches: loading, quantizing, packing and exporting a model
CODE = (Path(quant.__file__).parent, Path(export.__file__).parent)


@dataclass
class Backend:
    name: str                         # the model file's name
    runtime: str                      # "torch" or "ONNX Runtime"
    weight_format: str                # "fp32"; in ONNX Runtime the export's format ("ternary", "w8a8", "int4", ...),
                                      # in torch the layers' ("ternary", "int8", ...; `joined_formats` when they differ)
    config: ViTConfig
    size_bytes: int
    run: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    linear_bits: float | None = None
    note: str = ""                    # anything the page should say about how this model runs

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.size_bytes / fp_parameters(self.config)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits (B, classes) of normalised float32 images (B, 3, S, S)."""
        return self.run(x)


def joined_formats(weights: dict[str, int]) -> str:
    """Weight formats "+"-joined, the one holding the most weights first (the one the ONNX export, and so the
    model's card, names it by: "ternary+int8" for ternary blocks and an int8 head), or "fp32" for none.
    `weights` in layer order: formats holding as many weights go in the order of their first layers, as the export
    breaks the tie."""
    return "+".join(sorted(weights, key=lambda f: -weights[f])) or "fp32"


def weight_format(model: nn.Module) -> str:
    weights = {}
    for m in model.modules():
        if isinstance(m, quant.QuantLinear):
            weights[m.weight_format] = weights.get(m.weight_format, 0) + m.in_features * m.out_features
    return joined_formats(weights)


@dataclass(frozen=True)
class ModelFile:
    """What a model file is, read from its header without loading its weights."""
    path: Path
    kind: str                  # "fp" (full precision) or "quant" (packed, or a low-precision ONNX export)
    weight_format: str
    config: ViTConfig
    linear_bits: float | None  # a packed file's bits per linear-layer weight (scales included)
    activations: str = ""      # a packed file's activation formats: "int8", "float", "uint4", "+"-joined

    @property
    def label(self) -> str:
        """The app's menu entry, e.g. "int4+int8 weights · int8 activations · x.safetensors · linear layers 4.06
        bits/weight" (the weight format holding the most weights first; a weight-only file reads "float
        activations": the two run differently)."""
        what = f"{self.weight_format} weights · {self.activations} activations" if self.activations \
            else self.weight_format
        bits = f" · linear layers {self.linear_bits:.2f} bits/weight" if self.linear_bits is not None else ""
        return f"{what} · {self.path.name}{bits}"


def inspect_file(path: str | os.PathLike) -> ModelFile:
    """Read a bitvit model file's header (FP or packed safetensors, or a bitvit ONNX export)."""
    path = existing_file(path)
    if path.suffix.lower() == ".onnx":
        from export.runtime import bitvit_metadata, read_onnx
        meta = bitvit_metadata(read_onnx(path), path)
        if "bitvit.config" not in meta:
            raise ValueError(f"{path} is not a bitvit ONNX export (no bitvit.config metadata)")
        fmt = meta.get("bitvit.format", "?")
        return ModelFile(path, "fp" if fmt == "fp32" else "quant", fmt,
                         ViTConfig.from_json(meta["bitvit.config"], path), None)
    torch_file = is_torch_file(str(path))  # bitvit writes safetensors under any name: a timm/DeiT .pth
    meta = {} if torch_file else read_safetensors_metadata(path)
    if not str(meta.get("format", "")).startswith("bitvit-"):  # a .pth, or timm's safetensors (tagged "pt")
        what = "a torch checkpoint" if torch_file else f"a safetensors file of format {meta.get('format')!r}"
        raise ValueError(f"{path} is {what}, not a bitvit model file; the app runs bitvit .safetensors files and "
                         f"ONNX exports (a timm/DeiT checkpoint: quant.models.load_model(path, name=...), then "
                         f"save_model)")
    if meta.get("format") == FP_FORMAT:
        return ModelFile(path, "fp", "fp32", ViTConfig.from_json(meta.get("config"), path), None)
    if not is_quantized_format(meta.get("format")):
        raise ValueError(f"{path} is not a bitvit ViT file (format {meta.get('format')!r}); the app runs "
                         f"full-precision ({FP_FORMAT!r}) and quantized ({QUANT_FORMAT!r}) bitvit ViTs")
    header = quant.read_header(path)  # refuses other versions of the quantized format
    arch = header.get("architecture") or {}
    if arch.get("kind") != "bitvit-vit":
        raise ValueError(f"{path} holds no bitvit ViT architecture")
    weights = {}
    for entry in header["layers"].values():
        fmt = str(entry.get("weight_format", "?"))
        k, n = entry.get("in_features"), entry.get("out_features")  # a damaged entry's: refused when opened
        weights[fmt] = weights.get(fmt, 0) + (k * n if isinstance(k, int) and isinstance(n, int) else 0)
    acts = sorted({activation_name(str(entry.get("act_format", "?"))) for entry in header["layers"].values()})
    bits = header["storage"].get("bits_per_weight")
    return ModelFile(path, "quant", joined_formats(weights), ViTConfig.from_json(json.dumps(arch.get("config")), path),
                     float(bits) if finite_number(bits) else None, "+".join(acts))


def activation_name(act_format: str) -> str:
    """A layer's activation format as the menu says it: "none" -> "float", "int8_token" -> "int8",
    "uint4_tensor" -> "uint4"."""
    return "float" if act_format == "none" else act_format.split("_")[0]


def scan(folder: str | os.PathLike) -> tuple[list[ModelFile], list[str]]:
    """Every bitvit model file directly in `folder`, and a line for each file that is not one."""
    found, skipped = [], []
    for path in sorted(Path(folder).glob("*")):
        if path.suffix.lower() in MODEL_SUFFIXES:
            try:
                found.append(inspect_file(path))
            except (ValueError, OSError) as e:
                skipped.append(f"{path.name}: {e}")
    return found, skipped


def open_model(path: str | os.PathLike, threads: int | None = None, runtime: str = RUNTIME) -> Backend:
    """A bitvit model file (FP or packed `.safetensors`, or a bitvit `.onnx` export), ready to run."""
    path = existing_file(path)
    if path.suffix.lower() == ".onnx":
        return _ort_backend(path, path, threads, None)
    linear_bits = inspect_file(path).linear_bits
    model = quant.load_any(path).eval()
    why = []  # why each op set failed, bitvit's first
    if runtime == "onnxruntime":
        from export.exporter import on_bitvit_op
        for custom_ops in (True, False):  # bitvit's own ops first, then standard ops (MatMulNBits)
            if custom_ops and any(map(on_bitvit_op, model.modules())) and bitvit_ops_missing():
                error = bitvit_ops_missing()  # no library here: not exported nor loaded only to fail again
            else:
                out = _export_path(model, path, custom_ops)
                for again in (False, True) if out.is_file() else (True,):  # a cached export that fails is written again
                    try:
                        backend = _ort_backend(_exported(model, out, custom_ops, again), path, threads, linear_bits)
                        backend.note = f"bitvit ops failed: {why[0]}" if why else ""
                        return backend
                    except (ValueError, OSError, RuntimeError) as e:  # not exportable, not cached, or does not load
                        error = e
            lines = str(error).splitlines()  # a failed command's: what failed, then its output: its last line says why
            why.append(lines[0] + (f" {lines[-1].strip()}" if len(lines) > 1 else ""))
        reason = (why[0] if why[0] == why[1]  # a model the exporter refuses whatever the ops: said once
                  else f"bitvit ops failed: {why[0]}; standard ONNX ops failed: {why[1]}")
        return _torch_backend(model, path, linear_bits, threads, f"runs in torch: ONNX Runtime could not take it "
                                                                 f"({reason})")
    return _torch_backend(model, path, linear_bits, threads, "")


@functools.cache
def bitvit_ops_missing() -> Exception | None:
    """Why bitvit's ONNX Runtime op library cannot be had here (no C++ compiler, a failed build, a library ONNX
    Runtime will not load), or None: asked once per process, when the first model that needs it opens, so that
    the models after it go straight to standard ops."""
    import onnxruntime as ort
    from export import runtime
    try:
        runtime.register_library(ort.SessionOptions())  # what export.runtime.load does for a graph of bitvit's ops
    except (ValueError, OSError, RuntimeError) as e:
        return e
    return None


ON_THE_FLY = ("w8a8", "w4")  # PTQ recipes the app builds from the FP model when assets/ holds no packed model


def quantize_on_the_fly(fp_path: str | os.PathLike, recipe: str, again: bool = False) -> Path:
    """A packed model file built from a full-precision one with a round-to-nearest PTQ recipe.

    `quant.quantize(model, recipe)` quantizes every nn.Linear (no calibration data needed; the low-bit
    recipes keep the classifier head at 8 bits), then `quant.save_quantized` writes it into the bitvit
    cache, once per FP file, recipe and version of bitvit's code (`code_digest`); the app then opens it
    like a shipped packed model, so its size on disk is real. The cache is one that can be written
    (`app.main.writable_cache`, which the app and its bench call first, makes it so); a write that fails
    all the same (a disk that filled up since) is an OSError, which the page reports for that model.
    `again`: built anew, over a cached file that failed to open."""
    fp_path = Path(fp_path)
    r = quant.recipe(recipe)
    if not isinstance(r, quant.recipes.RTN):
        raise ValueError(f"recipe {recipe!r} is not a round-to-nearest PTQ recipe (it needs training or calibration)")
    digest = file_sha256(fp_path)[:16]
    tail = f"-{digest}-{recipe}.safetensors"
    out = _cache() / f"{shortened_name(fp_path.stem, len(tail))}{tail}"  # a long name shortened, not refused
    if out.is_file() and not again:
        return out
    model = quant.load_any(fp_path)
    if weight_format(model) != "fp32":
        raise ValueError(f"{fp_path} is already quantized")
    out.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(out) as tmp:
        quant.save_quantized(quant.quantize(model, r), tmp)
    return out


@functools.cache
def code_digest() -> str:
    """A hash of every .py file in CODE (quant/ and export/), read once per process: the cache's exports and
    packed files are keyed by it, so a change to any of that code (rounding, packing, the graph) makes new
    ones. (bitvit's C++ ops are no part of a graph: `export.ortops` keys the library it builds by their source.)"""
    h = hashlib.sha256()
    for folder in CODE:
        for path in sorted(folder.rglob("*.py")):
            name = path.relative_to(folder.parent).as_posix()
            h.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _cache() -> Path:
    """The app's cache folder for this version of bitvit's code: `<cache>/app/<code_digest()[:16]>/`."""
    return cache_dir() / "app" / code_digest()[:16]


def tidy_cache() -> None:
    """Keep the app's cache bounded: mark this code version's folder as used (its mtime) and remove the other
    versions' folders unused for 7 days, and the files bitvit cached directly in `<cache>/app/` before it kept
    version folders. Two checkouts run alternately keep each other's files; what cannot be removed (a file in use,
    no permission, removed by another process first) is left. The app and `app.bench` call it at start, through
    `app.main.writable_cache`, once the cache is known to be writable."""
    current = _cache()
    try:
        current.mkdir(parents=True, exist_ok=True)
        os.utime(current)
        entries = list(current.parent.iterdir())
    except OSError:
        return
    week_ago = time.time() - 7 * 24 * 3600
    for path in entries:
        try:
            if path.is_dir():
                if re.fullmatch(r"[0-9a-f]{16}", path.name) and path != current and path.stat().st_mtime < week_ago:
                    shutil.rmtree(path, ignore_errors=True)
            elif path.suffix in (".onnx", ".safetensors", ".tmp"):  # a killed write's leftover too
                path.unlink()
        except OSError:
            continue


def _torch_backend(model: nn.Module, path: Path, linear_bits, threads, note: str) -> Backend:
    @torch.inference_mode()
    def run(x: np.ndarray) -> np.ndarray:
        x = check_model_input(x, model.config.img_size)  # refused as the ONNX Runtime backend refuses it
        if threads:
            torch.set_num_threads(threads)
        return model(torch.from_numpy(x)).float().numpy()
    return Backend(path.name, "torch", weight_format(model), model.config, path.stat().st_size, run, linear_bits,
                   note)


def _ort_backend(onnx_path: Path, source: Path, threads: int | None, linear_bits) -> Backend:
    from export.runtime import load
    session = load(onnx_path, threads=threads)
    return Backend(source.name, "ONNX Runtime", session.format, session.config, source.stat().st_size,
                   session, linear_bits)


def _export_path(model: nn.Module, source: Path, custom_ops: bool) -> Path:
    """Where the bitvit cache keeps a model's ONNX export: one file per source file and op set in the folder of
    this version of bitvit's code."""
    from export import exporter
    digest = file_sha256(source)[:16]
    return _cache() / f"{digest}-{exporter.model_format(model)}{'' if custom_ops else '-standard-ops'}.onnx"


def _exported(model: nn.Module, out: Path, custom_ops: bool = True, again: bool = False) -> Path:
    """`out`, the ONNX export of a loaded model in the bitvit cache (`_export_path`), written there once
    (`again`: written anew, over a cached file that failed to load)."""
    from export import exporter
    if again or not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)  # here, where an unwritable cache leaves the model to torch
        with written_whole(out) as tmp:
            exporter.export(model, tmp, exporter.model_format(model), custom_ops=custom_ops)
    return out
