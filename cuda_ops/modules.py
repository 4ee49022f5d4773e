"""Putting a packed model on the bitvit kernels: `to_kernels(model)`, and `CUDAGraphModel` for latency.

    model = quant.load_any("assets/vit_cifar_tiny-w1.58a8.safetensors")  # packed: QuantLinear layers
    model = cuda_ops.to_kernels(model).cuda().bfloat16()   # the same layers on the bitvit ops
    # or to_kernels(model, ternary_layout="base3"): ternary codes at 1.6 bits in memory, not 2
    fast = cuda_ops.CUDAGraphModel(model, torch.randn(1, 3, 32, 32, device="cuda", dtype=torch.bfloat16))
    logits = fast(images)                                  # one graph replay per call, images of that shape

Which QuantLinear layers get a kernel:
  ternary / binary / int4 / int8 weights (symmetric), one scale per row, "int8_token" activations
      (the w1.58a8, w1a8, w4a8 and w8a8 recipes)                          -> ternary/binary/int4/int8_linear
      (the layer's input LayerNorm, if any, is fused into the activation quantization; ternary codes
      are repacked as trit planes for ternary_b3_linear with ternary_layout="base3")
  int8 / int4 / int2 (symmetric or asymmetric) / nf4 weights, float activations, groups of a multiple
      of 16 * 8 / bits inputs or one group a row                                -> weight_only_linear
Other layers (int3/int5-7 weights, static uintB activations) keep QuantLinear's reference forward,
and `to_kernels` says which.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from cuda_ops.ops import A8_OPS, weight_only_group_ok, weight_only_linear
from quant.pack import pack_trit_planes, unpack_codes
from quant.qlinear import PackedState, QuantLinear
from quant.quantizers import NF4_CODEBOOK

WEIGHT_ONLY_FORMATS = ("int8", "int4", "int2", "nf4")
TERNARY_LAYOUTS = ("2bit", "base3")  # 2-bit codes (QuantLinear's own), or trit planes (1.6 bits)


def kernel_for(layer: nn.Module) -> str | None:
    """The op family that runs `layer` ("a8" or "weight_only"), or None when no bitvit kernel does (as for
    any layer but a QuantLinear)."""
    if not isinstance(layer, QuantLinear):
        return None
    if layer.weight_format in A8_OPS and layer.act_format == "int8_token":
        return "a8" if layer.zeros is None and layer.scales.shape[1] == 1 else None
    if layer.weight_format in WEIGHT_ONLY_FORMATS and layer.act_format == "none":
        ok = weight_only_group_ok(layer.bits, layer.group_size, layer.in_features)
        return "weight_only" if ok else None
    return None


class KernelLinear(PackedState):
    """A QuantLinear computed by the bitvit ops. It keeps the QuantLinear's tensors under the same names
    (packed, scales, zeros, bias, input_norm), so state dicts carry over (except in the base-3 ternary layout,
    whose `packed` holds trit planes and whose state dict adds a `trit_planes` flag, so that neither loads into
    the other); scales stay float32 whatever dtype the model is cast to, and so does NF4's code book."""
    EXACT = (*PackedState.EXACT, "codebook")

    def __init__(self, layer: QuantLinear, ternary_layout: str = "2bit"):
        super().__init__()
        if not isinstance(layer, QuantLinear):
            raise ValueError(f"KernelLinear wraps a QuantLinear, got {type(layer).__name__}: quantize it first")
        self.kernel = kernel_for(layer)
        if self.kernel is None:
            raise ValueError(f"no bitvit kernel for {layer.weight_format} weights (group size {layer.group_size}) "
                             f"with {layer.act_format} activations")
        if ternary_layout not in TERNARY_LAYOUTS:
            raise ValueError(f"ternary_layout must be one of {TERNARY_LAYOUTS}, got {ternary_layout!r}")
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight_format, self.bits, self.group_size = layer.weight_format, layer.bits, layer.group_size
        self.act_format = layer.act_format
        packed = layer.packed
        self.op = layer.weight_format
        if layer.weight_format == "ternary" and ternary_layout == "base3":
            packed = pack_trit_planes(unpack_codes(packed, 2, layer.in_features))
            self.op = "ternary_b3"
            # in the state dict beside them: 2-bit codes, as many bytes at 128 or 256 inputs, must not load as planes
            self.register_buffer("trit_planes", torch.ones((), dtype=torch.uint8, device=packed.device))
        self.register_buffer("packed", packed)
        self.register_buffer("scales", layer.scales.float())
        self.register_buffer("zeros", None if layer.zeros is None else layer.zeros.float())
        self.register_buffer("codebook", NF4_CODEBOOK.to(layer.packed.device) if layer.weight_format == "nf4"
                             else None, persistent=False)
        self.bias = layer.bias
        self.input_norm = layer.input_norm
        self.scales_dq = layer.scales_dq  # NF4: in the state dict, as QuantLinear's (PackedState)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.input_norm
        if self.kernel == "a8":  # the input LayerNorm goes into the quantization pass
            # x detached, as QuantLinear's quantizer takes it: the op passes it no gradient, and torch.compile
            # otherwise traces the backward of the layers before it on that missing gradient (and crashes)
            return A8_OPS[self.op](
                x.detach(), self.packed, self.scales, self.bias, self.in_features,
                None if norm is None else norm.weight, None if norm is None else norm.bias,
                None if norm is None else norm.eps)
        if norm is not None:
            x = norm(x)
        return weight_only_linear(x, self.packed, self.scales, self.zeros, self.codebook, self.bias, self.bits,
                                  self.group_size, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight_format={self.weight_format}{' asym' if self.zeros is not None else ''}, "
                f"group_size={self.group_size}, act_format={self.act_format}, kernel={self.kernel}"
                + (", layout=base3" if self.op == "ternary_b3" else ""))


def to_kernels(model: nn.Module, ternary_layout: str = "2bit") -> nn.Module:
    """Swap every QuantLinear of `model` that has a bitvit kernel for a KernelLinear, in place, and return
    the model. Layers without a kernel keep their reference forward; a warning lists them.
    ternary_layout: "2bit" keeps ternary codes as QuantLinear packs them (4 a byte); "base3" repacks them
    as trit planes (5 a byte, `quant.pack.pack_trit_planes`): up to a fifth less weight memory and traffic (a
    row's bytes round up to a multiple of 16: a sixth less at ViT-B's widths, nothing on 128- and 256-wide
    rows). A model whose ternary layers already run on the kernels in the other layout is refused."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"to_kernels takes a model (nn.Module), got {type(model).__name__}; load a file first "
                         f"with quant.load_quantized(path)")
    if ternary_layout not in TERNARY_LAYOUTS:
        raise ValueError(f"ternary_layout must be one of {TERNARY_LAYOUTS}, got {ternary_layout!r}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not layers:
        if any(isinstance(m, KernelLinear) for m in model.modules()):
            raise ValueError("the model already runs on bitvit's kernels (to_kernels was applied before)")
        raise ValueError("the model has no QuantLinear layers: quantize it first (quant.quantize), or pack a "
                         "model in quantization-aware training first (quant.bitlinear.freeze, quant.qvit.freeze)")
    kept = "ternary_b3" if ternary_layout == "2bit" else "ternary"  # a ternary KernelLinear's op in the other layout
    if any(isinstance(m, KernelLinear) and m.op == kept for m in model.modules()):
        raise ValueError(f"the model's ternary layers already run on bitvit's kernels in the other layout, not "
                         f"{ternary_layout!r}: call to_kernels once, on the model as loaded, with the layout you want")
    if isinstance(model, QuantLinear):
        if kernel_for(model):
            return KernelLinear(model, ternary_layout)
        warnings.warn(f"no bitvit kernel for this layer ({model.weight_format} weights, group "
                      f"{model.group_size}, {model.act_format}), which keeps QuantLinear's reference forward",
                      stacklevel=2)
        return model
    left = []
    for name, layer in layers:
        if kernel_for(layer) is None:
            left.append(f"{name} ({layer.weight_format} weights, group {layer.group_size}, {layer.act_format})")
        else:
            model.set_submodule(name, KernelLinear(layer, ternary_layout))
    if left:
        warnings.warn(f"no bitvit kernel for {len(left)} of {len(layers)} quantized layers, which keep "
                      f"QuantLinear's reference forward: {', '.join(left)}", stacklevel=2)
    return model


def capture_graph(fn, warmups: int = 1) -> torch.cuda.CUDAGraph:
    """fn's GPU work captured in a CUDA graph, after `warmups` calls on a side stream (as capturing asks;
    they also pick and compile kernels, which capturing does not allow). A capture that fails raises with
    the caller's stream current again (a failed capture can leave its own stream current)."""
    stream = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    stream.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        torch.cuda.set_stream(stream)
        raise
    return graph


class CUDAGraphModel:
    """Runs `model` on inputs shaped like `example` by replaying one captured CUDA graph: no per-kernel
    launch gaps, which is what batch-1 latency is made of. The returned tensor is a static buffer that
    the next call overwrites (clone it to keep it)."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        if not isinstance(example, torch.Tensor) or not example.is_cuda:
            raise ValueError("CUDA graphs need the model and the example input on a CUDA device")
        self.model = model.eval()
        self.static_in = example.clone()
        out = []
        with torch.no_grad():
            self.graph = capture_graph(lambda: out.append(model(self.static_in)), warmups=3)
        self.static_out = out[-1]  # the captured call's output, which each replay rewrites

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.static_in.shape or x.dtype != self.static_in.dtype:
            raise ValueError(f"this graph was captured for {tuple(self.static_in.shape)} {self.static_in.dtype} "
                             f"inputs, got {tuple(x.shape)} {x.dtype}")
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out
