"""Quantized model files: one safetensors file of packed integer weights, their scales and a JSON header.

`save_quantized(model, path)` / `load_quantized(path)` / `load_any(path)` (FP or quantized bitvit file).

Layout. Safetensors metadata `format` = "bitvit-quant/2" and `header` = JSON with
  recipe          the recipe the model was made with (a dict, or null)
  architecture    {"kind": "bitvit-vit", "config": ViTConfig} (null for a model that is not a bitvit
                  ViT: `load_quantized(path, model=fp_skeleton)` then rebuilds into the given model)
  layers          {module name: QuantLinear spec + how its tensors are stored}
  attention       {module name: QuantAttention spec (which activation quantizer sits in each slot)}
  storage         totals: linear weights, their bytes on disk (codes + scales + zeros) and bits per weight
  sha256          digest of the rest of the header and of every tensor's name, dtype, shape and bytes
                  (a damaged file is refused)
Tensors, per quantized layer NAME:
  NAME.packed     uint8 codes in `quant.pack.pack_codes` layout, except ternary, which is stored at
                  1.6 bits per weight in base 3 (`quant.pack.pack_base3`, 5 codes per byte): 20 % smaller
                  than the 2-bit layout, decoded once at load time into the in-memory 2-bit layout.
  NAME.scales     float16 when every scale is exactly a float16 (the PTQ and BitNet quantizers make them so,
                  but for one beyond float16's range), else float32 (that one, or Q-ViT's learned step
                  sizes); a single value when one scale serves the whole tensor. NF4 layers store their
                  double-quantized scales instead: NAME.scales.codes (int8), NAME.scales.absmax (float32
                  per block of 256 scales) and NAME.scales.offset (float32).
  NAME.zeros      uint8 zero points of asymmetric formats.
Every other tensor of the model (embeddings, norms, biases, calibrated activation ranges, layers left
in full precision) is stored under its state-dict name in float32; with `save_quantized(...,
float16=True)` its parameters are stored in float16 (one beyond float16's range stays float32), its
buffers (calibrated activation ranges, BatchNorm statistics) stay float32. Loading casts them to the
model's dtype. The header's `storage` says which (`float16`: true or false).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings

import torch
import torch.nn as nn

from quant.cli import finite_number
from quant.models import FORMAT as FP_FORMAT
from quant.models import (ViTConfig, VisionTransformer, check_depth, is_torch_file, load_model, load_state_dict,
                          meta_skeleton, path_text, read_safetensors, read_safetensors_metadata, refuse_meta,
                          refuse_newer, unchanged_on_error, write_safetensors)
from quant.pack import pack_base3, pack_codes, packed_row_bytes, unpack_base3, unpack_codes
from quant.qattention import QuantAttention
from quant.qlinear import DQ_STATE_KEYS, KERNELS_IN_PLACE, QuantLinear, is_qat_layer, runs_on_kernels
from quant.quantizers import WEIGHT_FORMATS, DoubleQuantized, Log2Quantizer, double_dequantize, max_code, num_groups

FORMAT = "bitvit-quant/2"  # /1 (before 2026-12-03) had the same layout, its checksum covering the tensors only
_OWN = ("packed", "scales", "zeros", *DQ_STATE_KEYS)  # QuantLinear state stored in packed form


def is_quantized_format(fmt) -> bool:
    """Whether a safetensors file's `format` names a quantized bitvit file, of this version or an older one
    (`load_quantized` then says which)."""
    return str(fmt).startswith("bitvit-quant/")


def _digest(tensors: dict[str, torch.Tensor], header: dict) -> str:
    """sha256 of the header (all but this digest) and of every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of a large tensor
    return h.hexdigest()


def _store_layer(name: str, layer: QuantLinear, out: dict[str, torch.Tensor]) -> dict:
    """Put one layer's packed tensors into `out`; return its header entry."""
    entry = layer.spec()
    codes = layer.codes().cpu()
    if layer.weight_format == "ternary":
        out[f"{name}.packed"] = pack_base3(codes)
        entry["packing"] = "base3"
    else:
        out[f"{name}.packed"] = layer.packed.cpu().contiguous()
        entry["packing"] = "bits"
    scales = layer.scales.detach().cpu().float()
    if not torch.isfinite(scales).all() or (scales < 0).any():  # loading refuses a negative one
        raise ValueError(f"{name} has NaN, infinite or negative scales (did training diverge?); nothing written")
    dq = layer.scales_dq
    if dq is not None and torch.equal(double_dequantize(dq).cpu(), scales):
        out[f"{name}.scales.codes"] = dq.codes.cpu().contiguous()
        out[f"{name}.scales.absmax"] = dq.absmax.cpu().float().contiguous()
        out[f"{name}.scales.offset"] = dq.offset.cpu().float().reshape(1)
        entry["scales"], entry["dq_block"] = "double_quant", dq.block
    else:
        per_tensor = bool((scales == scales.flatten()[0]).all())
        stored = scales.flatten()[:1] if per_tensor else scales
        exact16 = torch.equal(stored.half().float(), stored)
        out[f"{name}.scales"] = stored.half() if exact16 else stored.contiguous()
        entry["scales"] = ("float16" if exact16 else "float32") + ("_tensor" if per_tensor else "")
    if layer.zeros is not None:
        z = layer.zeros.detach().cpu()
        if not torch.equal(z, z.round()) or z.min() < 0 or z.max() > 2 ** layer.bits - 1:
            raise ValueError(f"{name}: zero points must be integer codes in 0..{2 ** layer.bits - 1}")
        out[f"{name}.zeros"] = z.to(torch.uint8)
    return entry


def save_quantized(model: nn.Module, path: str | os.PathLike, float16: bool = False) -> dict:
    """Write a model holding QuantLinear layers to one safetensors file; returns the header's storage totals.

    `float16` stores the parameters that are not quantized in float16: half their bytes (the patch
    embedding, position embeddings, norms, biases and any full-precision head), at the price of
    rounding them, which can change a few predictions. Buffers (calibrated activation ranges, whose
    scales may be far below float16's smallest normal number) stay float32."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"save_quantized writes a model (nn.Module), got {type(model).__name__}")
    if not isinstance(float16, bool):
        raise ValueError(f"float16 must be True or False, got {float16!r}")
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper: its tensors are named
        # _orig_mod.*, and the config it passes on from the ViT would rebuild a model without that prefix
        raise ValueError("the model is torch.compile'd: save the model it compiled, model._orig_mod")
    if runs_on_kernels(model):  # its kernel layers' tensors would be written as unquantized ones
        raise ValueError(f"the model runs on bitvit's kernels (cuda_ops.to_kernels): save the QuantLinear model "
                         f"it was made from ({KERNELS_IN_PLACE})")
    if any(is_qat_layer(m) for m in model.modules()):  # their latent weights would be written as unexpected tensors
        raise ValueError("the model holds quantization-aware training layers: freeze them first "
                         "(quant.bitlinear.freeze or quant.qvit.freeze), then save the packed model")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("the model has no QuantLinear layers: quantize it first (quant.quantize)")
    refuse_meta(model, "saving it")
    tensors: dict[str, torch.Tensor] = {}
    header_layers = {name: _store_layer(name, layer, tensors) for name, layer in layers.items()}
    linear_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items())
    n_weights = sum(l.in_features * l.out_features for l in layers.values())
    own = {f"{n}.{b}" for n in layers for b in _OWN} | _log2_offsets(model)  # (the header holds the offsets)
    params = {n for n, _ in model.named_parameters()}
    rest = {k: v for k, v in model.state_dict().items() if k not in own and not k.endswith("num_batches_tracked")}
    for k, v in rest.items():
        v = v.detach().cpu()
        if v.is_floating_point():
            half = v.half() if float16 and k in params else None
            v = half if half is not None and torch.isfinite(half).all() else v.float()
        tensors[k] = v.contiguous()
    cfg = getattr(model, "config", None)
    storage = {"linear_weights": n_weights, "linear_bytes": linear_bytes,
               "bits_per_weight": 8 * linear_bytes / n_weights, "float16": float16}
    header = {
        "recipe": getattr(model, "quant_recipe", None),
        "architecture": {"kind": "bitvit-vit", "config": json.loads(cfg.to_json())}
        if isinstance(cfg, ViTConfig) else None,
        "layers": header_layers,
        "attention": {n: m.spec() for n, m in model.named_modules() if isinstance(m, QuantAttention)},
        "storage": storage,
    }
    header = json.loads(json.dumps(header))  # as a reader will see it (tuples as lists, keys as strings)
    header["sha256"] = _digest(tensors, header)
    write_safetensors(tensors, path, {"format": FORMAT, "header": json.dumps(header)})
    return storage


# ----------------------------------------------------------------------------- loading


def _take(tensors: dict, key: str, path, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{path} is missing tensor {key!r}")
    t = tensors.pop(key)
    if t.dtype != dtype:
        raise ValueError(f"{path}: tensor {key!r} has dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, the header implies {tuple(shape)}")
    return t


def _load_layer(name: str, entry: dict, tensors: dict, path) -> QuantLinear:
    fmt = entry.get("weight_format")
    if isinstance(fmt, str) and fmt not in WEIGHT_FORMATS:  # files keep their format version when a format is added
        raise ValueError(f"{path}: layer {name!r} holds {fmt!r} weights, a format this bitvit does not know (it "
                         f"knows {', '.join(WEIGHT_FORMATS)}): update bitvit if a newer one wrote the file, else "
                         f"the file is damaged")
    try:
        layer = QuantLinear.from_spec(entry)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: header entry of layer {name!r} is damaged ({type(e).__name__}: {e})") from None
    o, k, bits = layer.out_features, layer.in_features, layer.bits
    if entry.get("bits") != bits:
        raise ValueError(f"{path}: layer {name!r} says {entry.get('bits')} bits for {layer.weight_format}")
    norm = entry.get("input_norm")  # from_spec takes any eps: a string would fail in forward, eps <= 0 give NaN
    if norm is not None and not (finite_number(norm.get("eps")) and norm["eps"] > 0
                                 and isinstance(norm.get("affine"), bool) and isinstance(norm.get("bias", True), bool)):
        raise ValueError(f"{path}: layer {name!r} has input_norm {norm!r}, expected a positive eps and a "
                         f"true/false affine and bias")
    if entry.get("packing") == "base3" and layer.weight_format == "ternary":
        packed = _take(tensors, f"{name}.packed", path, (o, (k + 4) // 5), torch.uint8)
        try:
            codes = unpack_base3(packed, k)
        except ValueError as e:  # a byte above 242: say which file and layer
            raise ValueError(f"{path}: layer {name!r}: {e}") from None
        layer.packed.copy_(pack_codes(codes, 2))
    elif entry.get("packing") == "bits":
        layer.packed.copy_(_take(tensors, f"{name}.packed", path, (o, packed_row_bytes(k, bits)), torch.uint8))
        codes = unpack_codes(layer.packed, bits, k)
    else:
        raise ValueError(f"{path}: layer {name!r} has unknown packing {entry.get('packing')!r}")
    if codes.numel() and int(codes.max()) > max_code(layer.weight_format):  # ternary's 3, say
        raise ValueError(f"{path}: layer {name!r} holds {layer.weight_format} code {int(codes.max())} (codes are "
                         f"0..{max_code(layer.weight_format)})")
    g = num_groups(k, layer.group_size)
    kind = entry.get("scales")
    if kind == "double_quant":
        block = entry.get("dq_block")
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"{path}: layer {name!r} has dq_block {block!r}, expected a positive integer")
        dq = DoubleQuantized(_take(tensors, f"{name}.scales.codes", path, (o, g), torch.int8),
                             _take(tensors, f"{name}.scales.absmax", path, ((o * g + block - 1) // block,),
                                   torch.float32),
                             _take(tensors, f"{name}.scales.offset", path, (1,), torch.float32)[0], block)
        layer.scales.copy_(double_dequantize(dq))
        layer.scales_dq = dq
    elif kind in ("float16", "float32", "float16_tensor", "float32_tensor"):
        dtype = torch.float16 if kind.startswith("float16") else torch.float32
        shape = (1,) if kind.endswith("_tensor") else (o, g)
        layer.scales.copy_(_take(tensors, f"{name}.scales", path, shape, dtype).float().expand(o, g)
                           if kind.endswith("_tensor") else _take(tensors, f"{name}.scales", path, shape, dtype))
    else:
        raise ValueError(f"{path}: layer {name!r} has unknown scale storage {kind!r}")
    if not torch.isfinite(layer.scales).all() or (layer.scales < 0).any():
        raise ValueError(f"{path}: layer {name!r} has negative or non-finite scales")
    if layer.zeros is not None:
        z = _take(tensors, f"{name}.zeros", path, (o, g), torch.uint8)
        if z.numel() and int(z.max()) > 2 ** bits - 1:
            raise ValueError(f"{path}: layer {name!r} has zero point {int(z.max())}, beyond {bits}-bit codes")
        layer.zeros.copy_(z.float())
    return layer


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a quantized bitvit file (without loading its tensors)."""
    return _parse_header(read_safetensors_metadata(path), path)


def _parse_header(meta: dict, path) -> dict:
    if meta.get("format") == "bitvit-quant/1":
        raise ValueError(f"{path} was written by an older bitvit (format bitvit-quant/1); quantize its "
                         f"full-precision model again to get a {FORMAT} file")
    refuse_newer(meta.get("format"), FORMAT, path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a quantized bitvit file (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    try:
        header = json.loads(meta["header"])
    except (KeyError, TypeError, ValueError, RecursionError) as e:  # ValueError: JSON's, or a 5000-digit integer
        raise ValueError(f"{path} has a damaged header ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a damaged header (not a JSON object)")
    want = {"layers": dict, "attention": dict, "architecture": (dict, type(None)), "storage": dict, "sha256": str}
    for key, kind in want.items():
        if key not in header or not isinstance(header[key], kind):
            raise ValueError(f"{path} has a damaged header (its {key!r} is missing or of the wrong type)")
    for section in ("layers", "attention"):
        if not all(isinstance(entry, dict) for entry in header[section].values()):
            raise ValueError(f"{path} has a damaged header (an entry of its {section!r} is not an object)")
    return header


def load_quantized(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a quantized model from its file, in eval mode (on the CPU, unless `model` is given).

    A bitvit ViT is rebuilt from the architecture in the header. For any other model, pass `model`,
    a full-precision instance of its architecture: its nn.Linear layers named in the header are
    replaced and its other tensors loaded from the file, on the device and in the dtype the model has (a model on
    the meta device holds no values, so the one returned holds none either: a warning says so).
    Refuses a file whose header, tensor names, shapes, dtypes, code ranges or checksum disagree, with a
    ValueError saying what.
    """
    given = model is not None
    if given and not isinstance(model, nn.Module):  # a path given for it, say
        raise ValueError(f"model must be a full-precision nn.Module of the file's architecture, got "
                         f"{type(model).__name__}")
    device = next((t.device for t in model.state_dict().values()), torch.device("cpu")) if given else None
    if given and device.type == "meta":
        warnings.warn(f"the model given for {path} is on the meta device, which holds no values: the model returned "
                      f"is on it too and cannot run; give one on the CPU or a GPU (model.to_empty(device='cpu'))",
                      stacklevel=2)
    tensors, meta = read_safetensors(path)
    header = _parse_header(meta, path)
    if _digest(tensors, header) != header["sha256"]:
        raise ValueError(f"{path} is corrupt: its header or tensors do not match the checksum in its header")
    arch = header["architecture"]
    if arch is not None:
        if arch.get("kind") != "bitvit-vit":
            raise ValueError(f"{path}: unknown architecture kind {arch.get('kind')!r}")
        cfg = ViTConfig.from_json(json.dumps(arch.get("config")), path)
        if model is None:
            _check_architecture(cfg, header, tensors, path)
            model = VisionTransformer(cfg)
        elif not isinstance(getattr(model, "config", None), ViTConfig):
            raise ValueError(f"{path} holds a different architecture than the model given")
        elif differs := model.config.differences(cfg):
            raise ValueError(f"{path} holds {differs} than the model given")
    elif model is None:
        raise ValueError(f"{path} holds a model that is not a bitvit ViT: rebuild it with quant.load_quantized(path, "
                         f"model=...), given a full-precision instance of its architecture")

    # a given model is left as it was when a layer of the file does not fit; a fresh one needs no copy
    with unchanged_on_error(model) if given else contextlib.nullcontext():
        _rebuild_modules(model, header, tensors, path)
        load_state_dict(model, tensors, source=str(path),  # the other tensors
                        loaded=frozenset(f"{n}.{b}" for n in header["layers"] for b in _OWN) | _log2_offsets(model))
    model.quant_recipe = header.get("recipe")
    return (model.to(device) if given else model).eval()  # the rebuilt layers join the given model's device


def _log2_offsets(model: nn.Module) -> set[str]:
    """The state-dict names of the model's log2 softmax offsets, which a file's header holds (attention specs)."""
    return {f"{n}.offset" for n, m in model.named_modules() if isinstance(m, Log2Quantizer)}


def _check_architecture(cfg: ViTConfig, header: dict, tensors: dict, path) -> None:
    """Check the header's layer sizes and the file's other tensors against a skeleton of the header's
    architecture on the meta device, before building it: a damaged header could otherwise ask for terabytes."""
    quantized = tuple(f"{name}." for name in (*header["layers"], *header["attention"]))
    check_depth(cfg, tensors.keys() | header["layers"].keys(), path)
    skeleton = meta_skeleton(lambda: VisionTransformer(cfg), path)
    for name, entry in header["layers"].items():
        _check_layer_fits(_module(skeleton, name, path), entry, name, path)
    load_state_dict(skeleton, {k: v for k, v in tensors.items() if not k.startswith(quantized)}, source=str(path),
                    loaded=frozenset(k for k in skeleton.state_dict() if k.startswith(quantized)), copy=False)
    # the tensors of the layers the header names are checked after the model is built: their sizes must not
    # ask for more than the file holds (a 7 kB file's header asked for a 10^9-class head, 32 GB of float32)
    weights, held = sum(t.numel() for t in skeleton.state_dict().values()), sum(t.nbytes for t in tensors.values())
    if weights > 8 * held:
        raise ValueError(f"{path}: its architecture has {weights:,} weights, but the file holds {held:,} bytes of "
                         f"tensors, under the 1 bit a weight that the smallest format takes (a damaged header?)")


def _check_layer_fits(old: nn.Module, entry: dict, name: str, path) -> None:
    """The header's layer `entry` has the size of the architecture's layer `old` it replaces."""
    shape = (getattr(old, "out_features", None), getattr(old, "in_features", None))
    if not isinstance(old, (nn.Linear, QuantLinear)) or shape != (entry.get("out_features"), entry.get("in_features")):
        raise ValueError(f"{path}: layer {name!r} is {entry.get('out_features')}x{entry.get('in_features')} "
                         f"in the file but {type(old).__name__} {shape} in the architecture")


def _rebuild_modules(model: nn.Module, header: dict, tensors: dict, path) -> None:
    """Swap the attention blocks and linear layers the header names for their quantized versions."""
    for name, spec in header["attention"].items():
        attn = _module(model, name, path)
        if not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
            raise ValueError(f"{path}: module {name!r} is not an attention block in this architecture")
        if (spec.get("dim"), spec.get("num_heads")) != (attn.num_heads * attn.head_dim, attn.num_heads):
            raise ValueError(f"{path}: attention {name!r} has {spec.get('num_heads')} heads of width "
                             f"{spec.get('dim')} in the file, {attn.num_heads} of {attn.num_heads * attn.head_dim} "
                             f"in the architecture")
        try:
            model.set_submodule(name, QuantAttention.from_spec(spec, attn.qkv, attn.proj))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path}: header entry of attention {name!r} is damaged ({type(e).__name__}: {e})") \
                from None
    for name, entry in header["layers"].items():
        old = _module(model, name, path)
        _check_layer_fits(old, entry, name, path)
        dtype = next(old.parameters(), torch.empty(0)).dtype  # a given half model's stay half (scales: float32)
        model.set_submodule(name, _load_layer(name, entry, tensors, path).to(dtype))


def _module(model: nn.Module, name: str, path) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{path} names module {name!r}, which this architecture does not have") from None


def load_any(path: str | os.PathLike) -> nn.Module:
    """A bitvit model from a full-precision, a quantized or a CNN-teacher file (told apart by its format)."""
    path = path_text(path)
    if is_torch_file(path):
        return load_model(path)
    fmt = read_safetensors_metadata(path).get("format")
    if is_quantized_format(fmt):
        return load_quantized(path)
    if fmt == FP_FORMAT or not str(fmt or "").startswith("bitvit-"):  # timm's files are tagged "pt": load_model
        return load_model(path)                                       # says to name their architecture
    from quant.teacher import FORMAT as TEACHER_FORMAT, load_teacher
    if fmt == TEACHER_FORMAT:
        return load_teacher(path)
    for known in (FP_FORMAT, FORMAT, TEACHER_FORMAT):
        refuse_newer(fmt, known, path)
    raise ValueError(f"{path} is a {fmt!r} file, neither a bitvit ViT ({FP_FORMAT}), a quantized one ({FORMAT}) "
                     f"nor a CNN teacher ({TEACHER_FORMAT})")
