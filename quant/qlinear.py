"""QuantLinear: what an nn.Linear becomes once quantized, its weight stored packed.

The layer holds no float copy of its weight. Its state is:
  packed  uint8 (out_features, ceil(in_features * bits / 8))  codes laid out by `quant.pack.pack_codes`
  scales  float32 (out_features, n_groups)                    n_groups = ceil(in_features / group_size)
  zeros   float32 (out_features, n_groups) or None            integer zero points, asymmetric int formats
  bias    float32 (out_features,) or None
(scales and zeros stay float32 when the layer is cast to another dtype (.half()), as on the kernels;
NF4 layers also keep `scales_dq`, the double-quantized form of `scales`, which files store instead and the
state dict carries as scales_dq.codes, .absmax, .offset and .block.)
and the dequantized weight is W[o, k] = value(code[o, k]) * scales[o, k // group_size], with the code
meanings of `quant.quantizers` (ternary code = w + 1; binary code 1 = +1, 0 = -1; symmetric intB
code = q + 2**(B-1); asymmetric value = code - zero; nf4 an index into NF4_CODEBOOK).

Input transforms, applied in this order before the packed matmul (kernels and exporters apply the
same with standard ops):
  input_norm  optional LayerNorm over in_features (BitNet's LayerNorm before activation quantization)
  act_format  "none": the float input as it is;
              "int8_token": per token s[t] = max_k |x[t, k]| / 127, q = clamp(round(x / s), -127, 127)
                (round half to even), y[t, o] = s[t] * sum_k q[t, k] * W[o, k] + bias[o];
              "uintB_tensor" (B in 2..8): a calibrated static per-tensor quantizer `act_quant`
                (scale, zero): code = clamp(round(x / scale) + zero, 0, 2**B - 1), x_hat = (code - zero) * scale,
                y = x_hat @ W.T + bias.
`forward` is the plain-torch reference every kernel and exporter is checked against.
"""
from __future__ import annotations

import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.cli import is_positive_int
from quant.pack import pack_codes, packed_row_bytes, unpack_codes
from quant.quantizers import (WEIGHT_FORMATS, DoubleQuantized, UniformQuantizer, dequantize, is_uniform_format,
                              max_code, num_groups, quantize_int8_token, quantize_nf4, quantize_weight,
                              undo_dtype_casts)

_UINT_TENSOR = re.compile(r"uint([2-8])_tensor")
DQ_STATE_KEYS = ("scales_dq.codes", "scales_dq.absmax", "scales_dq.offset", "scales_dq.block")


class PackedState(nn.Module):
    """The state QuantLinear shares with the modules that carry its tensors over (cuda_ops' KernelLinear): the
    tensors named in `EXACT` (scales, zero points) follow the device, never the dtype (.half(), .bfloat16()): in
    float16 a scale above 65504 would become inf, and bfloat16 would round every scale to 8 bits; and NF4's
    double-quantized scales (`scales_dq`) are in the state dict, as scales_dq.{codes,absmax,offset,block}, so that a
    model loaded through load_state_dict is saved with them (a state dict without them, an older one, loads as
    before)."""
    EXACT = ("scales", "zeros")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.scales_dq is not None:
            codes, absmax, offset, block = self.scales_dq
            for key, t in zip(DQ_STATE_KEYS, (codes, absmax, offset, torch.tensor(block, device=codes.device))):
                destination[prefix + key] = t.detach()

    def _apply(self, fn, recurse=True):
        exact = {n: getattr(self, n) for n in self.EXACT if getattr(self, n) is not None}
        super()._apply(fn, recurse)
        undo_dtype_casts(self, exact)
        if self.scales_dq is not None:  # plain tensors, not buffers: likewise the device, never the dtype
            def follow(t):
                moved = fn(t)
                return moved if moved.dtype == t.dtype else t.to(moved.device)
            codes, absmax, offset, block = self.scales_dq
            self.scales_dq = DoubleQuantized(follow(codes), follow(absmax), follow(offset), block)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        dq = [state_dict.pop(prefix + key, None) for key in DQ_STATE_KEYS]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if all(t is None for t in dq):
            if prefix + "scales" in state_dict:  # new scales without their double-quantized form
                self.scales_dq = None
            return
        codes, absmax, offset, block = dq
        if (self.weight_format != "nf4" or any(t is None for t in dq) or codes.dtype != torch.int8
                or tuple(codes.shape) != tuple(self.scales.shape) or block.numel() != 1 or int(block) < 1
                or absmax.shape != (-(-codes.numel() // int(block)),)):
            error_msgs.append(f"{prefix}scales_dq: expected, for an nf4 layer, int8 codes of the scales' shape "
                              f"{tuple(self.scales.shape)}, a positive block and one absmax per block of codes")
            return
        device = self.scales.device
        self.scales_dq = DoubleQuantized(codes.to(device), absmax.float().to(device), offset.float().to(device),
                                         int(block))


class QuantLinear(PackedState):
    def __init__(self, in_features: int, out_features: int, weight_format: str, group_size: int | None = None,
                 bias: bool = True, asymmetric: bool = False, act_format: str = "none",
                 input_norm: nn.LayerNorm | None = None):
        super().__init__()
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weight format {weight_format!r}; known: {', '.join(WEIGHT_FORMATS)}")
        if asymmetric and not is_uniform_format(weight_format):
            raise ValueError(f"{weight_format} weights have no zero points; only intB formats are asymmetric")
        for field, v in (("in_features", in_features), ("out_features", out_features), ("group_size", group_size)):
            if not ((v is None and field == "group_size") or is_positive_int(v)):
                raise ValueError(f"{field} must be a positive integer, got {v!r}")
        group_size = min(group_size or in_features, in_features)  # a group wider than a row is the row
        uint_act = _UINT_TENSOR.fullmatch(act_format)
        if act_format not in ("none", "int8_token") and not uint_act:
            raise ValueError(f"unknown act_format {act_format!r}; use none, int8_token or uintB_tensor (B in 2..8)")
        self.in_features, self.out_features = in_features, out_features
        self.weight_format, self.bits, self.group_size = weight_format, WEIGHT_FORMATS[weight_format], group_size
        self.act_format = act_format
        g = num_groups(in_features, group_size)
        self.register_buffer("packed", torch.zeros(out_features, packed_row_bytes(in_features, self.bits),
                                                   dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, g))
        self.register_buffer("zeros", torch.zeros(out_features, g) if asymmetric else None)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.input_norm = input_norm
        self.act_quant = UniformQuantizer(int(uint_act.group(1))) if uint_act else None
        self.scales_dq: DoubleQuantized | None = None  # NF4: the double-quantized form `scales` came from
        self._cache: tuple | None = None

    # -- construction

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   bias: torch.Tensor | None, weight_format: str, group_size: int | None = None,
                   act_format: str = "none", input_norm: nn.LayerNorm | None = None) -> "QuantLinear":
        """A layer from uint8 codes (O, K), scales (O, G), zeros (O, G) or None, bias (O,) or None."""
        o, k = codes.shape
        layer = cls(k, o, weight_format, group_size, bias is not None, zeros is not None, act_format, input_norm)
        top = max_code(weight_format)  # never cast: int8 -1 or 256 would wrap
        if codes.dtype != torch.uint8 or (codes.numel() and int(codes.max()) > top):
            got = codes.dtype if codes.dtype != torch.uint8 else f"a {int(codes.max())}"
            raise ValueError(f"{weight_format} codes must be uint8 in 0..{top}, got {got}")
        for field, t, want in (("scales", scales, layer.scales), ("zeros", zeros, layer.zeros),
                               ("bias", bias, layer.bias)):
            if t is not None and tuple(t.shape) != tuple(want.shape):
                raise ValueError(f"{field} of shape {tuple(t.shape)} do not fit {o}x{k} weights in groups of "
                                 f"{layer.group_size}: expected {tuple(want.shape)}")
        layer.packed.copy_(pack_codes(codes.cpu(), layer.bits))
        layer.scales.copy_(scales)
        if zeros is not None:
            layer.zeros.copy_(zeros)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer.to(codes.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_format: str, group_size: int | None = None,
                    asymmetric: bool = False, act_format: str = "none") -> "QuantLinear":
        """Round-to-nearest quantization of an nn.Linear (NF4: group size 64 by default, scales
        double-quantized as in QLoRA; ternary and binary: one scale per tensor)."""
        if weight_format in ("ternary", "binary"):
            group_size = None
        if weight_format == "nf4":
            q, dq = quantize_nf4(linear.weight, group_size or 64)
            layer = cls.from_codes(q.codes, q.scales, None, linear.bias, "nf4", group_size or 64, act_format)
            layer.scales_dq = dq
            return layer
        q = quantize_weight(linear.weight, weight_format, group_size, asymmetric)
        return cls.from_codes(q.codes, q.scales, q.zeros, linear.bias, weight_format, group_size, act_format)

    # -- the weight

    def codes(self) -> torch.Tensor:
        """uint8 codes (out_features, in_features)."""
        return unpack_codes(self.packed, self.bits, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 (out_features, in_features), cached until `packed`, `scales` or `zeros` is replaced (also
        through `.data = t`) or changed in place. An in-place write through `.data` (`layer.scales.data.mul_(2)`)
        leaves no trace to tell it by: write on the tensor itself (`layer.scales.mul_(2)`, under torch.no_grad()
        where needed) instead; comparing the contents at each call would cost a fifth of a 64-token forward."""
        tensors = (self.packed, self.scales, self.zeros)
        if torch.compiler.is_compiling() or any(t is not None and t.is_inference() for t in tensors):
            # traced (torch.export, torch.compile: fake tensors have no address), or built under torch.inference_mode
            # (no version counter to tell an in-place change by): the weight is unpacked afresh
            return dequantize(self.codes(), self.scales, self.zeros, self.weight_format, self.group_size)
        # a write through `.data` leaves the version as it was: `.data = t` is told by the storage's address
        state = tuple(None if t is None else (t._version, t.data_ptr()) for t in tensors)
        c = self._cache  # unpacking is slow: reuse the weight until a buffer is replaced or changed in place
        if (c is None or c[1] != state or any(a is not b for a, b in zip(c[0], tensors))
                or c[2].is_inference() and not torch.is_inference_mode_enabled()):  # unusable by autograd
            # aliases hold the storages, so that the address of one replaced meanwhile cannot come back; this call
            # returns its own weight (another thread's, stored meanwhile, may be an inference tensor)
            c = self._cache = (tensors, state, dequantize(self.codes(), self.scales, self.zeros, self.weight_format,
                                                          self.group_size),
                               tuple(None if t is None else t.detach() for t in tensors))
        return c[2]

    def __getstate__(self):
        # pickled, deep-copied or torch.save'd without the unpacked float32 weight (4 to 32 times the packed bytes),
        # which the copy would not reuse anyway: its buffers are other tensors
        return {**super().__getstate__(), "_cache": None}

    # -- the reference computation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_norm is not None:
            x = self.input_norm(x)
        w = self.dequantized_weight().to(x.dtype)
        if self.act_format == "int8_token":
            q, s = quantize_int8_token(x)
            y = F.linear(q, w) * s
            return y + self.bias if self.bias is not None else y
        if self.act_quant is not None:
            x = self.act_quant(x)
        return F.linear(x, w, self.bias)

    def spec(self) -> dict:
        """Everything but the tensors needed to rebuild this layer (the packed file's header entry)."""
        norm = self.input_norm
        return {"weight_format": self.weight_format, "bits": self.bits, "in_features": self.in_features,
                "out_features": self.out_features, "group_size": self.group_size,
                "asymmetric": self.zeros is not None, "bias": self.bias is not None,
                "act_format": self.act_format,
                "input_norm": None if norm is None else {"eps": norm.eps, "affine": norm.elementwise_affine,
                                                         **({} if norm.bias is not None else {"bias": False})}}

    @classmethod
    def from_spec(cls, spec: dict) -> "QuantLinear":
        norm = spec.get("input_norm")
        if norm is not None:
            norm = nn.LayerNorm(spec["in_features"], eps=norm["eps"], elementwise_affine=norm["affine"],
                                bias=norm.get("bias", True))  # recorded only where the norm has none
        return cls(spec["in_features"], spec["out_features"], spec["weight_format"], spec["group_size"],
                   spec["bias"], spec["asymmetric"], spec["act_format"], norm)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight_format={self.weight_format}{' asym' if self.zeros is not None else ''}, "
                f"group_size={self.group_size}, act_format={self.act_format}, bias={self.bias is not None}")


def weight_count(model: nn.Module) -> int:
    """The model's parameters, each packed QuantLinear weight counted as its in x out weights (they are
    buffers there): what `quant.evaluate` reports, and a bitvit ONNX export records for it."""
    return sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))


def is_qat_layer(m: nn.Module) -> bool:
    """A layer still in quantization-aware training (BitNet's BitLinear, Q-ViT's LSQLinear), not yet packed.
    (Other nn.Linear subclasses, such as nn.MultiheadAttention's out_proj, are not.)"""
    from quant.bitlinear import BitLinear   # they import this module
    from quant.qvit import LSQLinear
    return isinstance(m, BitLinear | LSQLinear)


def is_quantized_layer(m: nn.Module) -> bool:
    """A packed QuantLinear or a layer in quantization-aware training."""
    return isinstance(m, QuantLinear) or is_qat_layer(m)


# what the refusals of a model on the kernels add: the model it was made from is gone
KERNELS_IN_PLACE = "to_kernels swaps layers in place: load its file again, or give to_kernels a copy.deepcopy(model)"


def runs_on_kernels(model: nn.Module) -> bool:
    """Whether `cuda_ops.to_kernels` put layers of `model` on the bitvit ops (cuda_ops.modules.KernelLinear:
    no QuantLinear any more, and no layer quant's recipes or files know). None exists before cuda_ops is
    imported, so quant does not import it."""
    kernels = sys.modules.get("cuda_ops.modules")
    return kernels is not None and any(isinstance(m, kernels.KernelLinear) for m in model.modules())
