"""Write a bitvit ViT as an ONNX graph, each linear layer in the format its weights are stored in.

The graph is built node by node from the model's modules (no tracing), so every linear layer maps
to exactly the ONNX form chosen for it and the file holds the packed tensors, not float copies:

| layer                                          | ONNX                                                          |
|------------------------------------------------|---------------------------------------------------------------|
| `nn.Linear`                                    | MatMul + Add (fp16: weights stored fp16, cast to fp32 once)   |
| int2/int4/int8 weight-only                     | `com.microsoft` MatMulNBits (block: the largest power of two  |
|                                                |   <= 128 the scale groups are made of, at least 16)           |
| ternary / binary / int4 / int8 (symmetric, a   | bitvit's `TernaryLinear` / `BinaryLinear` / `Int4Linear` /    |
|   scale per output), int8 per-token input      |   `Int8Linear` (`export/ops`)                                 |
| the same with `custom_ops=False`: int8         | per-token quantize (ReduceMax/Div/Round/Clip) + MatMulInteger |
|                                                |   (s8 x s8, exact) + scale                                    |
| the same with `custom_ops=False`: ternary,     | per-token fake-quant + MatMulNBits bits=2: ternary codes      |
|   binary                                       |   w + 2, binary codes 2c + 1 (values -1, +1), zero point 2;   |
|                                                |   exact, 2 bits per weight                                    |
| the same with `custom_ops=False`: int4         | per-token fake-quant + MatMulNBits bits=4                     |

Where bitvit's op runs a layer it also runs what sits around the matmul: the block's LayerNorm in front
of qkv and fc1 and the QuantLinear's `input_norm` (BitNet's LayerNorm before activation quantization),
one after the other in the pass that quantizes the input, and the GELU after fc1; around any other form
they are LayerNormalization and Gelu nodes.
The rest of the ViT is standard opset-20 ONNX (conv stem with BatchNorm folded, LayerNormalization,
Gelu) plus attention as one `com.microsoft` MultiHeadAttention node per block. Input `image`
(batch, 3, H, W), normalised; output `logits` (batch, classes); the batch is dynamic. The model's
config (image size, mean/std, class names) rides in the metadata under `bitvit.config`, its parameter
count (`quant.qlinear.weight_count`) under `bitvit.parameters`.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from quant.cli import file_to_write, written_whole
from quant.models import Attention, VisionTransformer, refuse_meta
from quant.pack import pack_codes
from quant.qlinear import KERNELS_IN_PLACE, QuantLinear, is_qat_layer, runs_on_kernels, weight_count

from .ortops import DOMAIN, DOMAIN_VERSION

OPSET = 20
FORMATS = ("fp32", "fp16", "w8a8", "w4a8", "int4", "ternary", "binary")
# bitvit's op per weight format (with int8 per-token input and one scale per output)
OPS = {"ternary": "TernaryLinear", "binary": "BinaryLinear", "int4": "Int4Linear", "int8": "Int8Linear"}
# weight formats standard ops export (MatMulNBits; int8 with int8 per-token input and a scale a row: MatMulInteger):
# every format of OPS is among them, for runtimes without bitvit's library
STANDARD_FORMATS = ("ternary", "binary", "int2", "int4", "int8")
# (weight format, activation format) -> export format name, where it is not the weight format
_ACT_FORMATS = {("int8", "int8_token"): "w8a8", ("int4", "int8_token"): "w4a8"}
META_FORMAT = "bitvit-onnx/1"


def is_quantized(m: nn.Module) -> bool:
    return isinstance(m, QuantLinear)


def model_format(model: nn.Module) -> str:
    """The format a model's weights are stored in: fp32, or that of the quantized layers holding the
    most weights (low-bit recipes keep a small layer such as the classifier head at int8)."""
    weights = {}
    for m in model.modules():
        if is_quantized(m):
            name = _ACT_FORMATS.get((m.weight_format, m.act_format), m.weight_format)
            weights[name] = weights.get(name, 0) + m.in_features * m.out_features
    return max(weights, key=weights.get) if weights else "fp32"


def on_bitvit_op(m: nn.Module) -> bool:
    """Whether layer `m` exports as one of bitvit's ops (`OPS`: int8 per-token input, one scale per output, no
    zero points) where custom ops are asked for."""
    return (is_quantized(m) and m.weight_format in OPS and m.act_format == "int8_token" and m.scales.shape[1] == 1
            and m.zeros is None)


class _Graph:
    """Nodes and initializers with unique names."""

    def __init__(self, fp16: bool = False):
        self.nodes, self.inits, self.fp16, self._n = [], [], fp16, 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, name: str, value) -> str:
        """An initializer; float weights are stored fp16 (and cast back) in an fp16 export."""
        arr = np.asarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value)
        if self.fp16 and arr.dtype == np.float32 and arr.size > 1:
            if np.abs(arr).max() > np.finfo(np.float16).max:  # it would be stored as inf
                raise ValueError(f"{name} holds values beyond float16's range (65504): export the model as fp32")
            self.inits.append(numpy_helper.from_array(arr.astype(np.float16), name + "_fp16"))
            return self.op("Cast", [name + "_fp16"], to=TensorProto.FLOAT, out=name)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, inputs: list[str], domain: str = "", out: str | None = None, **attrs) -> str:
        out = out or self.name(op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, domain=domain or None, **attrs))
        return out


def _norm_consts(g: _Graph, ln: nn.LayerNorm, name: str) -> list[str]:
    """A LayerNorm's weight and bias as initializers (ones and zeros where it has none)."""
    d = ln.normalized_shape[-1]
    w = ln.weight if ln.weight is not None else torch.ones(d)
    b = ln.bias if ln.bias is not None else torch.zeros(d)
    return [g.const(f"{name}.weight", w), g.const(f"{name}.bias", b)]


def _layer_norm(g: _Graph, x: str, ln: nn.LayerNorm, name: str) -> str:
    return g.op("LayerNormalization", [x, *_norm_consts(g, ln, name)], axis=-1, epsilon=float(ln.eps))


def _token_scale(g: _Graph, x: str, name: str) -> tuple[str, str]:
    """Per-token int8 quantization with standard ops: (q as float, s), s = max|x| / 127 per row."""
    amax = g.op("ReduceMax", [g.op("Abs", [x]), g.const(f"{name}.axes", np.array([-1], np.int64))], keepdims=1)
    s = g.op("Div", [amax, g.const(f"{name}.127", np.array(127, np.float32))])
    safe = g.op("Max", [s, g.const(f"{name}.tiny", np.array(np.finfo(np.float32).tiny, np.float32))])
    q = g.op("Clip", [g.op("Round", [g.op("Div", [x, safe])]), g.const(f"{name}.lo", np.array(-127, np.float32)),
                      g.const(f"{name}.hi", np.array(127, np.float32))])
    return q, s


def _matmul_nbits(g: _Graph, x: str, codes: torch.Tensor, scales: torch.Tensor, zeros, bits: int,
                  group: int, bias, name: str) -> str:
    """MatMulNBits over codes (N, K) with per-group scales (N, K / group); zero point 2**(bits-1) unless given."""
    n, k = codes.shape
    # MatMulNBits needs a power-of-two block of at least 16 that the scale groups are made of.
    if group >= k:  # one scale per row: any block will do
        block = 128 if k >= 128 else max(16, 1 << (k - 1).bit_length())
    else:
        block = min(128, group & -group)
        if block < 16:
            raise ValueError(f"{name}: group size {group} is not a multiple of a power of two >= 16, "
                             f"which MatMulNBits needs")
    blocks = -(-k // block)
    codes = torch.nn.functional.pad(codes, (0, blocks * block - k), value=1 << (bits - 1))  # pad with value 0
    packed = pack_codes(codes.reshape(n, blocks, block), bits)                    # (N, blocks, blob)

    def per_block(t: torch.Tensor) -> torch.Tensor:                               # (N, groups) -> (N * blocks)
        t = t[:, :1].expand(n, blocks) if group >= k else t.repeat_interleave(group // block, 1)[:, :blocks]
        return t.reshape(-1).float()

    inputs = [x, g.const(f"{name}.packed", packed), g.const(f"{name}.scales", per_block(scales))]
    if zeros is not None:
        inputs.append(g.const(f"{name}.zeros", per_block(zeros)))
    if bias is not None:
        inputs += [""] * (5 - len(inputs)) + [g.const(f"{name}.bias", bias)]
    return g.op("MatMulNBits", inputs, domain="com.microsoft", K=k, N=n, bits=bits, block_size=block)


def _linear(g: _Graph, x: str, m: nn.Module, name: str, custom_ops: bool,
            pre_norm: tuple[nn.LayerNorm, str] | None = None, gelu: bool = False) -> str:
    """Layer `m` on x, after the LayerNorm `pre_norm` (module, name) and with GELU on its output when
    asked: all inside bitvit's op where the layer runs as one, as nodes around the layer otherwise."""
    norms = [pre_norm] if pre_norm is not None else []                 # (LayerNorm, name), in the order applied
    if not isinstance(m, nn.Linear):
        if not is_quantized(m):
            raise ValueError(f"{name}: cannot export a {type(m).__name__} layer")
        norm = m.input_norm
        if norm is not None and not isinstance(norm, nn.LayerNorm):
            raise ValueError(f"{name}: cannot export an input_norm of type {type(norm).__name__}")
        fmt, act = m.weight_format, m.act_format
        if act not in ("none", "int8_token"):
            raise ValueError(f"{name}: activation format {act!r} has no ONNX export (only none and int8_token)")
        if norm is not None:
            norms.append((norm, f"{name}.input_norm"))
        if custom_ops and on_bitvit_op(m):
            # bitvit's op: the LayerNorms (up to two), per-token int8, the packed matmul and GELU in one node
            op = OPS[fmt]
            inputs = [x, g.const(f"{name}.packed", m.packed), g.const(f"{name}.scales", m.scales[:, 0].float()),
                      "" if m.bias is None else g.const(f"{name}.bias", m.bias)]
            attrs = {"in_features": m.in_features, **({"activation": "gelu"} if gelu else {})}
            for (ln, ln_name), eps in zip(norms, ("epsilon", "epsilon2")):
                inputs += _norm_consts(g, ln, ln_name)
                attrs[eps] = float(ln.eps)
            return g.op(op, inputs if norms or m.bias is not None else inputs[:3], domain=DOMAIN, **attrs)
    for ln, ln_name in norms:
        x = _layer_norm(g, x, ln, ln_name)
    if isinstance(m, nn.Linear):
        y = g.op("MatMul", [x, g.const(f"{name}.weight", m.weight.t())])
        y = y if m.bias is None else g.op("Add", [y, g.const(f"{name}.bias", m.bias)])
    else:
        y = _quantized_linear(g, x, m, name)
    return g.op("Gelu", [y]) if gelu else y


def _quantized_linear(g: _Graph, x: str, m: nn.Module, name: str) -> str:
    """A QuantLinear (its input LayerNorm already applied) in standard and com.microsoft ops."""
    fmt, act = m.weight_format, m.act_format
    per_row = m.scales.shape[1] == 1
    if fmt == "int8" and m.zeros is not None:
        raise ValueError(f"{name}: int8 weights with zero points have no ONNX Runtime kernel (MatMulNBits runs "
                         f"8 bits without them only); quantize to symmetric int8 (asymmetric=False)")
    codes = m.codes()
    if fmt == "int8" and act == "int8_token" and per_row:
        q, s = _token_scale(g, x, name)
        w = (codes.to(torch.int16) - 128).to(torch.int8).t()                             # (K, N)
        y = g.op("MatMulInteger", [g.op("Cast", [q], to=TensorProto.INT8), g.const(f"{name}.qweight", w)])
        y = g.op("Mul", [g.op("Mul", [g.op("Cast", [y], to=TensorProto.FLOAT), s]),
                         g.const(f"{name}.scales", m.scales[:, 0].float())])
        return y if m.bias is None else g.op("Add", [y, g.const(f"{name}.bias", m.bias)])
    if act == "int8_token":
        q, s = _token_scale(g, x, name)
        x = g.op("Mul", [q, s])
    if fmt == "ternary":   # codes w + 1 -> w + 2 with the default zero point 2
        return _matmul_nbits(g, x, codes + 1, m.scales, None, 2, m.group_size, m.bias, name)
    if fmt == "binary":    # codes {0, 1} -> {1, 3}: values (c - 2) = -1, +1
        return _matmul_nbits(g, x, codes * 2 + 1, m.scales, None, 2, m.group_size, m.bias, name)
    if fmt in STANDARD_FORMATS:  # int2, int4, int8: the codes and zero points as they are
        return _matmul_nbits(g, x, codes, m.scales, m.zeros, m.bits, m.group_size, m.bias, name)
    raise ValueError(f"{name}: weight format {fmt!r} has no ONNX export (the weight formats that export: "
                     f"{', '.join(STANDARD_FORMATS)})")


def _attention(g: _Graph, x: str, attn: nn.Module, name: str, custom_ops: bool,
               pre_norm: tuple[nn.LayerNorm, str]) -> str:
    if type(attn) is not Attention:
        raise ValueError(f"{name}: cannot export attention of type {type(attn).__name__} "
                         f"(quantized attention has no ONNX export)")
    d = attn.num_heads * attn.head_dim
    qkv = _linear(g, x, attn.qkv, f"{name}.qkv", custom_ops, pre_norm)               # (B, N, 3D)
    q, k, v = f"{name}.q", f"{name}.k", f"{name}.v"                                   # (B, N, D) each
    g.nodes.append(helper.make_node("Split", [qkv, g.const(f"{name}.split", np.array([d, d, d], np.int64))],
                                    [q, k, v], name=f"{name}.split", axis=-1))
    # softmax(q k^T / sqrt(head_dim)) v per head, heads side by side in D as timm lays out qkv
    out = g.op("MultiHeadAttention", [q, k, v], domain="com.microsoft", num_heads=attn.num_heads)  # (B, N, D)
    return _linear(g, out, attn.proj, f"{name}.proj", custom_ops)


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * s + (conv.bias * s if conv.bias is not None else 0)
    return conv.weight * s.view(-1, 1, 1, 1), bias


@torch.no_grad()
def to_onnx(model: VisionTransformer, fmt: str = "fp32", custom_ops: bool = True) -> onnx.ModelProto:
    """The ONNX graph of `model` as it stands (FP or with quantized layers), which it leaves unchanged.
    `fmt` is the format its weights are in (`model_format`; an FP model's is fp32, or "fp16" to store the
    float weights at half precision) and is written to the metadata."""
    if not isinstance(custom_ops, (bool, np.bool_)):  # "False" would ask for bitvit's ops
        raise ValueError(f"custom_ops must be True or False, got {custom_ops!r}")
    _check_exportable(model, fmt)
    cfg = model.config
    g = _Graph(fp16=fmt == "fp16")
    x = "image"
    pe = model.patch_embed
    if pe.backbone is not None:
        layers = list(pe.backbone)
        for i in range(0, len(layers), 3):
            conv, bn = layers[i], layers[i + 1]
            w, b = _fold_bn(conv, bn)
            x = g.op("Conv", [x, g.const(f"stem{i}.weight", w), g.const(f"stem{i}.bias", b)],
                     pads=[conv.padding[0]] * 4, strides=list(conv.stride))
            x = g.op("Gelu", [x])
    p = cfg.patch_size
    x = g.op("Conv", [x, g.const("patch_embed.proj.weight", pe.proj.weight), g.const("patch_embed.proj.bias", pe.proj.bias)],
             strides=[p, p], kernel_shape=[p, p])                                     # (B, D, h, w)
    d = cfg.embed_dim
    x = g.op("Transpose", [g.op("Reshape", [x, g.const("tokens_shape", np.array([0, d, -1], np.int64))])],
             perm=[0, 2, 1])                                                          # (B, N, D)
    batch = g.op("Shape", [x], start=0, end=1)
    cls_shape = g.op("Concat", [batch, g.const("cls_shape", np.array([1, d], np.int64))], axis=0)
    cls = g.op("Expand", [g.const("cls_token", model.cls_token), cls_shape])
    x = g.op("Add", [g.op("Concat", [cls, x], axis=1), g.const("pos_embed", model.pos_embed)])
    for i, blk in enumerate(model.blocks):
        if type(blk.mlp.act) is not nn.GELU or blk.mlp.act.approximate != "none":
            raise ValueError(f"blocks.{i}.mlp.act: only exact GELU is exported")
        n = f"blocks.{i}"
        x = g.op("Add", [x, _attention(g, x, blk.attn, f"{n}.attn", custom_ops, (blk.norm1, f"{n}.norm1"))])
        h = _linear(g, x, blk.mlp.fc1, f"{n}.mlp.fc1", custom_ops, (blk.norm2, f"{n}.norm2"), gelu=True)
        x = g.op("Add", [x, _linear(g, h, blk.mlp.fc2, f"{n}.mlp.fc2", custom_ops)])
    x = _layer_norm(g, x, model.norm, "norm")
    x = g.op("Gather", [x, g.const("cls_index", np.array(0, np.int64))], axis=1)     # (B, D)
    g.op("Identity", [_linear(g, x, model.head, "head", custom_ops)], out="logits")

    graph = helper.make_graph(
        g.nodes, "bitvit_vit",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, cfg.img_size, cfg.img_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", cfg.num_classes])], g.inits)
    uses_custom = any(nd.domain == DOMAIN for nd in g.nodes)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    if uses_custom:
        opsets.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    proto = helper.make_model(graph, opset_imports=opsets, ir_version=10, producer_name="bitvit")
    meta = {"format": META_FORMAT, "bitvit.format": fmt if fmt in ("fp32", "fp16") else model_format(model),
            "bitvit.config": cfg.to_json(), "bitvit.custom_ops": DOMAIN if uses_custom else "",
            "bitvit.parameters": str(weight_count(model))}
    helper.set_model_props(proto, meta)
    return proto


# export format -> the round-to-nearest QuantLinear its FP layers become
RECIPES = {"w8a8": dict(weight_format="int8", act_format="int8_token"),
           "w4a8": dict(weight_format="int4", act_format="int8_token"),
           "int4": dict(weight_format="int4", group_size=32),
           "ternary": dict(weight_format="ternary", act_format="int8_token"),
           "binary": dict(weight_format="binary", act_format="int8_token")}


def _refuse_qat_layers(model: nn.Module) -> None:
    """Refuse a model still in quantization-aware training: its layers are no format the exporter knows, and
    as nn.Linear subclasses `quantize_for_export` would round their latent weights."""
    if any(is_qat_layer(m) for m in model.modules()):
        raise ValueError("the model holds quantization-aware training layers: pack them first "
                         "(quant.bitlinear.freeze or quant.qvit.freeze), then export the packed model")


def quantize_for_export(model: VisionTransformer, fmt: str) -> VisionTransformer:
    """A copy of an FP model with every nn.Linear quantized (round to nearest) into what `fmt`
    exports; fp32/fp16 return the model itself. Trained (QAT/GPTQ) models come quantized already."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _refuse_qat_layers(model)
    if fmt in ("fp32", "fp16"):
        return model
    refuse_meta(model, "quantizing it")
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, QuantLinear.from_linear(child, **RECIPES[fmt]))
    return model


def _check_exportable(model: VisionTransformer, fmt: str) -> None:
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"can only export bitvit's VisionTransformer, got {type(model).__name__}")
    quantized = any(is_quantized(m) for m in model.modules())
    if fmt not in FORMATS and not (quantized and fmt == model_format(model)):
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if runs_on_kernels(model):  # (its KernelLinear layers are no format the exporter knows)
        raise ValueError(f"the model runs on bitvit's kernels (cuda_ops.to_kernels): export the QuantLinear model "
                         f"it was made from ({KERNELS_IN_PLACE})")
    _refuse_qat_layers(model)
    refuse_meta(model, "exporting it")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("export the float32 model (format fp16 stores its float weights at half precision)")
    if quantized and fmt != model_format(model):
        held = model_format(model)
        to_onnx(model, held)  # a held format that has no ONNX export at all is the error to report
        fix = (f"export its full-precision model as {fmt}" if fmt in ("fp32", "fp16") else
               f"re-quantize its full-precision model to get {fmt}")
        raise ValueError(f"the model holds {held} weights, so it exports as {held}, not {fmt} ({fix})")
    if not quantized and fmt not in ("fp32", "fp16"):
        raise ValueError(f"the model holds fp32 weights, not {fmt}; quantize it first "
                         f"(export.exporter.quantize_for_export)")


def export(model: VisionTransformer, path: str | Path, fmt: str = "fp32", custom_ops: bool = True) -> Path:
    """Build the graph of `model` as it stands (see `quantize_for_export`), check it, write it to `path`."""
    return write_onnx(to_onnx(model, fmt, custom_ops), path)  # (to_onnx checks the model first)


def write_onnx(proto: onnx.ModelProto, path: str | Path) -> Path:
    """Check a graph `to_onnx` built and write it to `path`."""
    path = file_to_write(path)
    onnx.checker.check_model(proto)
    with written_whole(path) as tmp:  # a run killed meanwhile leaves no half-written model behind
        onnx.save(proto, str(tmp), format="protobuf")
    return path
