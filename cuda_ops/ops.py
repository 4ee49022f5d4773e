"""The bitvit custom ops (`torch.ops.bitvit.*`): packed low-bit linear layers and per-token activation
quantization, each with a CPU kernel, a Triton kernel for CUDA and a fake (meta) kernel, so they run
eagerly anywhere, trace under `torch.compile` and export with `torch.export`.

Weights are the packed codes of `quant/pack.py` (`pack_codes` layout), as `quant.QuantLinear` holds them,
or, for `ternary_b3_linear`, its trit planes (5 codes a byte).

- `quantize_per_token(x, norm_weight=None, norm_bias=None, norm_eps=None) -> (q, s)`: x (..., K)
  float -> q int8 (..., K), s float32 (...); s = max_k |x| / 127, q = clamp(round(x / s), -127, 127),
  round half to even (a zero row gives s = 0, q = 0). With `norm_eps` set, of LayerNorm(x) (weight and
  bias optional): the input norm of BitNet layers, fused into the same pass on CUDA.
- `ternary_linear`, `ternary_b3_linear`, `binary_linear`, `int4_linear`, `int8_linear` (x, packed, scales,
  bias, in_features, norm_weight, norm_bias, norm_eps) -> y: W1.58A8 (2-bit codes, or base-3 trit planes at
  1.6 bits, `quant.pack.pack_trit_planes`), W1A8, W4A8 and W8A8. The input (after the optional LayerNorm) is
  quantized per token inside the op, the dot products are exact int32 sums, and
  y[t, o] = s_x[t] * scales[o] * sum_k q_x[t, k] * w[o, k] (+ bias[o]), in x's dtype.
  Weight value of a code: ternary code - 1, binary 2 * code - 1, int4 code - 8, int8 code - 128.
  scales: (N,) or (N, 1) float32, one per output row (a per-tensor scale is stored repeated).
- `weight_only_linear(x, packed, scales, zeros, codebook, bias, bits, group_size, in_features) -> y`:
  2-, 4- or 8-bit weight-only, group-quantized, for bf16/fp16 (or fp32) activations (the W4A16 of
  the w4/w4-gptq/nf4 recipes, their int8 head, and w2): W[o, k] = (value(code) - zero) * scale, per group of
  `group_size` inputs; value = codebook[code] (NF4) or code; without zeros and without a code book
  the symmetric offset 2**(bits-1) is subtracted (code = q + 2**(bits-1)).

The CPU kernels unpack the codes to int8 and use `torch._int_mm` (exact int32 accumulation), or
dequantize and use a float matmul for the weight-only op. The CUDA kernels (cuda_ops/triton_kernels.py)
read the packed bytes directly and never expand the weights in global memory.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from quant.pack import packed_row_bytes, trit_plane_bytes, unpack_trit_planes

# weight format -> (code width in bits, value = code * mul - off); ternary_b3: trit planes, which the
# kernel steps through in 2-bit-sized byte tiles (a8_row_bytes gives their row length)
A8_FORMATS = {"ternary": (2, 1, 1), "ternary_b3": (2, 1, 1), "binary": (1, 2, 1), "int4": (4, 1, 8),
              "int8": (8, 1, 128)}


def a8_row_bytes(name: str, k: int) -> int:
    """Bytes of one packed weight row of `k` inputs for an A8 format."""
    return trit_plane_bytes(k) if name == "ternary_b3" else packed_row_bytes(k, A8_FORMATS[name][0])


# ----------------------------------------------------------------------------- argument checks

# activation dtypes the kernels take (float8 has no LayerNorm, matmul or Triton dot of its own here)
ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_names = [str(d).removeprefix("torch.") for d in ACT_DTYPES]
ACT_DTYPE_NAMES = f"{', '.join(_names[:-1])} or {_names[-1]}"  # as the refusals name them


def _check_x(x: Tensor, in_features: int, name: str) -> None:
    if in_features < 1:
        raise ValueError(f"{name}: in_features must be at least 1, got {in_features}")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"{name}: the input must be a float tensor ({ACT_DTYPE_NAMES}), got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{name}: the input's last dimension is {tuple(x.shape)[-1:] or '()'}, "
                         f"the layer has in_features={in_features}")


def _check_packed(packed: Tensor, in_features: int, row_bytes: int, what: str, name: str) -> int:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"{name}: packed weights must be a 2-D uint8 tensor, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    if packed.shape[0] == 0:
        raise ValueError(f"{name}: packed weights have no output rows")
    if packed.shape[1] != row_bytes:
        raise ValueError(f"{name}: packed rows have {packed.shape[1]} bytes, {in_features} {what} "
                         f"codes need {row_bytes}")
    return packed.shape[0]


def _check_vector(t: Optional[Tensor], n: int, what: str, name: str) -> None:
    if t is not None and (t.numel() != n or not t.is_floating_point()):
        raise ValueError(f"{name}: {what} must be a float tensor of {n} values (one per output row), "
                         f"got {t.dtype} {tuple(t.shape)}")


def _check_devices(x: Tensor, others: tuple, name: str) -> None:
    """Every tensor operand on x's device (a kernel would read foreign memory otherwise)."""
    for t in others:
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: the input is on {x.device} but a weight tensor is on {t.device}; "
                             f"move the layer and its input to one device")


def _check_norm(norm_weight, norm_bias, norm_eps, k: int, name: str) -> None:
    if norm_eps is not None and not 0 < norm_eps < float("inf"):  # an infinite eps normalizes every row to 0
        raise ValueError(f"{name}: norm_eps must be positive and finite, got {norm_eps}")
    for t, what in ((norm_weight, "norm_weight"), (norm_bias, "norm_bias")):
        if t is not None and (norm_eps is None or t.shape != (k,) or not t.is_floating_point()):
            raise ValueError(f"{name}: {what} must be a 1-D float tensor of {k} values, with norm_eps set")


def _check_a8(name, x, packed, scales, bias, in_features, norm_weight, norm_bias, norm_eps) -> int:
    _check_x(x, in_features, name)
    bits, mul, off = A8_FORMATS[name]
    if in_features * 127 * max(off, (2 ** bits - 1) * mul - off) >= 2 ** 31:
        raise ValueError(f"{name}: {in_features} inputs could overflow the int32 dot product")
    _check_norm(norm_weight, norm_bias, norm_eps, in_features, name)
    what = "base-3 (trit-plane)" if name == "ternary_b3" else f"{A8_FORMATS[name][0]}-bit"
    n = _check_packed(packed, in_features, a8_row_bytes(name, in_features), what, name)
    if scales.dim() == 2 and scales.shape[1] != 1:
        raise ValueError(f"{name}: scales must hold one value per output row ({n}, 1); grouped scales "
                         f"{tuple(scales.shape)} do not give an int32 dot product")
    _check_vector(scales, n, "scales", name)
    _check_vector(bias, n, "bias", name)
    _check_devices(x, (packed, scales, bias, norm_weight, norm_bias), name)
    return n


WEIGHT_ONLY_BITS = (2, 4, 8)


def weight_only_group_ok(bits: int, group_size: int, in_features: int) -> bool:
    """Whether the weight-only kernel takes this grouping: a K tile (at least 16 bytes of codes) must
    fit inside a group, so groups are multiples of 16 * 8 // bits inputs, or span the whole row."""
    return group_size >= in_features or group_size % (16 * 8 // bits) == 0


def _check_weight_only(x, packed, scales, zeros, codebook, bias, bits, group_size, in_features) -> int:
    name = "weight_only_linear"
    if bits not in WEIGHT_ONLY_BITS:
        raise ValueError(f"{name}: bits must be one of {WEIGHT_ONLY_BITS}, got {bits}")
    _check_x(x, in_features, name)
    n = _check_packed(packed, in_features, packed_row_bytes(in_features, bits), f"{bits}-bit", name)
    if group_size < 1 or not weight_only_group_ok(bits, group_size, in_features):
        raise ValueError(f"{name}: group_size must be a multiple of {16 * 8 // bits} for {bits}-bit codes or "
                         f"span all {in_features} inputs, got {group_size}")
    g = -(-in_features // group_size)
    for t, what in ((scales, "scales"), (zeros, "zeros")):
        if t is not None and (tuple(t.shape) != (n, g) or not t.is_floating_point()):
            raise ValueError(f"{name}: {what} must be float ({n}, {g}), got {t.dtype} {tuple(t.shape)}")
    if codebook is not None and (codebook.numel() != 1 << bits or not codebook.is_floating_point()):
        raise ValueError(f"{name}: a code book of {bits}-bit codes holds {1 << bits} float values, got "
                         f"{codebook.dtype} {tuple(codebook.shape)}")
    _check_vector(bias, n, "bias", name)
    _check_devices(x, (packed, scales, zeros, codebook, bias), name)
    return n


# ----------------------------------------------------------------------------- CPU kernels

def unpack_aligned(packed: Tensor, bits: int, k: int) -> Tensor:
    """uint8 codes (N, K) of `pack_codes` rows for bits in {1, 2, 4, 8} (whole codes per byte)."""
    if bits == 8:
        return packed[:, :k]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (N, KB, 8 // bits)
    return codes.reshape(packed.shape[0], -1)[:, :k]


def _a8_weights(name: str, packed: Tensor, k: int) -> Tensor:
    """int8 weight values (N, K), code * mul - off, of packed ternary/binary/int4/int8 codes (int8: a flip
    of the sign bit is code - 128)."""
    bits, mul, off = A8_FORMATS[name]
    if name == "ternary_b3":
        return unpack_trit_planes(packed, k).view(torch.int8) - 1
    if bits == 8:
        return (packed[:, :k] ^ 128).view(torch.int8)
    codes = unpack_aligned(packed, bits, k).view(torch.int8)  # 0 .. 15: the same bits as int8
    return codes * mul - off


def _quantize_torch(x2: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row absmax int8 codes (M, K), contiguous, and scales (M,); a row holding NaN or inf gets a NaN
    scale (so NaN outputs), and its NaN codes become 0 rather than whatever a cast of NaN gives."""
    xf = x2.float()
    s = xf.abs().amax(-1) / 127
    s = torch.where(torch.isinf(s), torch.nan, s)
    q = torch.round(xf / torch.where(s > 0, s, 1.0)[:, None]).clamp_(-127, 127).nan_to_num_(0.0)
    return q.to(torch.int8).contiguous(), s


def _layer_norm(x: Tensor, norm_weight, norm_bias, norm_eps) -> Tensor:
    cast = lambda t: None if t is None else t.to(x.dtype)  # noqa: E731
    return F.layer_norm(x, x.shape[-1:], cast(norm_weight), cast(norm_bias), norm_eps)


def _a8_torch(name: str, x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor], in_features: int,
              norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], norm_eps: Optional[float]) -> Tensor:
    n = _check_a8(name, x, packed, scales, bias, in_features, norm_weight, norm_bias, norm_eps)
    if norm_eps is not None:
        x = _layer_norm(x, norm_weight, norm_bias, norm_eps)
    x2 = x.reshape(-1, in_features)
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], n))
    q, s = _quantize_torch(x2)
    w = _a8_weights(name, packed, in_features)
    # (M, N) int32, exact; torch's CPU _int_mm is wrong for K = 1 (torch 2.13), where a plain product is cheap
    acc = torch._int_mm(q, w.t()) if in_features > 1 else q.int() * w.int().t()
    y = acc.float().mul_(s[:, None]).mul_(scales.reshape(1, n).float())
    if bias is not None:  # n values in any shape, as the check takes them (a (n, 1) bias must not broadcast)
        y.add_(bias.reshape(n).float())
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def dequantize_weight_only(packed: Tensor, scales: Tensor, zeros: Optional[Tensor], codebook: Optional[Tensor],
                           bits: int, group_size: int, in_features: int) -> Tensor:
    """float32 (N, K) weights of a weight-only packed layer (what the CPU kernel multiplies by)."""
    group_size = min(group_size, in_features)  # one group a row, however large group_size is
    codes = unpack_aligned(packed, bits, in_features).long()
    v = codebook.float().reshape(-1)[codes] if codebook is not None else codes.float()  # 2**bits values, any shape
    if zeros is not None:
        v = v - zeros.float().repeat_interleave(group_size, 1)[:, :in_features]
    elif codebook is None:
        v = v - (1 << (bits - 1))
    return v * scales.float().repeat_interleave(group_size, 1)[:, :in_features]


def _weight_only_torch(x, packed, scales, zeros, codebook, bias, bits, group_size, in_features) -> Tensor:
    _check_weight_only(x, packed, scales, zeros, codebook, bias, bits, group_size, in_features)
    w = dequantize_weight_only(packed, scales, zeros, codebook, bits, group_size, in_features).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.reshape(-1).to(x.dtype))  # (n, 1) would broadcast


# ----------------------------------------------------------------------------- the ops

def _check_quantize(x, norm_weight, norm_bias, norm_eps) -> None:
    if x.dtype not in ACT_DTYPES or x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"quantize_per_token: needs a float tensor ({ACT_DTYPE_NAMES}) (..., K) with K >= 1, "
                         f"got {x.dtype} {tuple(x.shape)}")
    _check_norm(norm_weight, norm_bias, norm_eps, x.shape[-1], "quantize_per_token")
    _check_devices(x, (norm_weight, norm_bias), "quantize_per_token")


@torch.library.custom_op("bitvit::quantize_per_token", mutates_args=())
def quantize_per_token(x: Tensor, norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None,
                       norm_eps: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Per-token absmax int8 codes and scales of x (..., K), of LayerNorm(x) when norm_eps is set."""
    _check_quantize(x, norm_weight, norm_bias, norm_eps)
    if norm_eps is not None:
        x = _layer_norm(x, norm_weight, norm_bias, norm_eps)
    q, s = _quantize_torch(x.reshape(-1, x.shape[-1]))
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


@quantize_per_token.register_fake
def _(x, norm_weight=None, norm_bias=None, norm_eps=None):
    _check_quantize(x, norm_weight, norm_bias, norm_eps)
    # contiguous codes whatever x's strides, as the CPU and Triton kernels return them
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _make_a8_op(name: str):
    @torch.library.custom_op(f"bitvit::{name}_linear", mutates_args=())
    def op(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor], in_features: int,
           norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None,
           norm_eps: Optional[float] = None) -> Tensor:
        return _a8_torch(name, x, packed, scales, bias, in_features, norm_weight, norm_bias, norm_eps)

    @op.register_fake
    def _(x, packed, scales, bias, in_features, norm_weight=None, norm_bias=None, norm_eps=None):
        n = _check_a8(name, x, packed, scales, bias, in_features, norm_weight, norm_bias, norm_eps)
        return x.new_empty((*x.shape[:-1], n))

    op.__doc__ = (f"y = s_x * scales * (q_x @ w^T) (+ bias) for packed {name} weights and per-token int8 "
                  f"activations quantized inside the op (after LayerNorm(norm_weight, norm_bias, norm_eps) "
                  f"when norm_eps is set); x (..., in_features) -> y (..., N) in x's dtype.")
    return op


ternary_linear = _make_a8_op("ternary")
ternary_b3_linear = _make_a8_op("ternary_b3")
binary_linear = _make_a8_op("binary")
int4_linear = _make_a8_op("int4")
int8_linear = _make_a8_op("int8")
A8_OPS = {"ternary": ternary_linear, "ternary_b3": ternary_b3_linear, "binary": binary_linear, "int4": int4_linear,
          "int8": int8_linear}


@torch.library.custom_op("bitvit::weight_only_linear", mutates_args=())
def weight_only_linear(x: Tensor, packed: Tensor, scales: Tensor, zeros: Optional[Tensor],
                       codebook: Optional[Tensor], bias: Optional[Tensor], bits: int, group_size: int,
                       in_features: int) -> Tensor:
    """y = x @ W^T (+ bias) for 2/4/8-bit group-quantized weights (integer codes or a code book)."""
    return _weight_only_torch(x, packed, scales, zeros, codebook, bias, bits, group_size, in_features)


@weight_only_linear.register_fake
def _(x, packed, scales, zeros, codebook, bias, bits, group_size, in_features):
    n = _check_weight_only(x, packed, scales, zeros, codebook, bias, bits, group_size, in_features)
    return x.new_empty((*x.shape[:-1], n))


# ----------------------------------------------------------------------------- gradients
# As QuantLinear's reference forward has them, so that a model on the ops runs backward, and traces under
# torch.compile with gradients enabled (AOTAutograd traces the backward too): per-token int8 quantization
# takes a detached input (no gradient reaches x or the input LayerNorm), the weight-only op is a linear
# layer in x, the bias gets the output's gradient, and the packed weights, scales and code books (buffers)
# get none.

def _bias_grad(grad: Tensor, bias: tuple) -> Tensor:
    shape, dtype = bias
    return grad.reshape(-1, grad.shape[-1]).sum(0).reshape(shape).to(dtype)


def _setup_a8(ctx, inputs, output):
    bias = inputs[3]
    ctx.bias_like = None if bias is None else (bias.shape, bias.dtype)


def _backward_a8(ctx, grad):
    bias = None if ctx.bias_like is None or not ctx.needs_input_grad[3] else _bias_grad(grad, ctx.bias_like)
    return None, None, None, bias, None, None, None, None


for _op in A8_OPS.values():
    _op.register_autograd(_backward_a8, setup_context=_setup_a8)


def _setup_weight_only(ctx, inputs, output):
    x, packed, scales, zeros, codebook, bias, bits, group_size, in_features = inputs
    ctx.save_for_backward(packed, scales, zeros, codebook)
    ctx.layout = (bits, group_size, in_features, x.dtype)
    ctx.bias_like = None if bias is None else (bias.shape, bias.dtype)


def _backward_weight_only(ctx, grad):
    packed, scales, zeros, codebook = ctx.saved_tensors
    bits, group_size, in_features, dtype = ctx.layout
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = dequantize_weight_only(packed, scales, zeros, codebook, bits, group_size, in_features)
        grad_x = (grad @ w.to(grad.dtype)).to(dtype)
    if ctx.bias_like is not None and ctx.needs_input_grad[5]:
        grad_bias = _bias_grad(grad, ctx.bias_like)
    return grad_x, None, None, None, None, grad_bias, None, None, None


weight_only_linear.register_autograd(_backward_weight_only, setup_context=_setup_weight_only)


def _backward_quantize(ctx, grad_q, grad_s):
    return None, None, None, None


quantize_per_token.register_autograd(_backward_quantize)


# ----------------------------------------------------------------------------- CUDA kernels (Triton)

def _rows(x: Tensor, k: int) -> Tensor:
    """x (..., K) as a (M, K) view (or copy) with unit stride along K."""
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm(norm_weight, norm_bias, norm_eps):
    """The triton launchers' LayerNorm argument, or None. The parameters go in as they are (the kernel
    widens them to fp32 as it loads them): no cast kernels per call."""
    from cuda_ops.triton_kernels import Norm
    if norm_eps is None:
        return None
    cont = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return Norm(cont(norm_weight), cont(norm_bias), float(norm_eps))


@quantize_per_token.register_kernel("cuda")
def _(x, norm_weight=None, norm_bias=None, norm_eps=None):
    from cuda_ops import triton_kernels as tk
    _check_quantize(x, norm_weight, norm_bias, norm_eps)
    x2 = _rows(x, x.shape[-1])
    q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    s = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):  # Triton launches on the current device, which may be another
        tk.quantize_rows(x2, q, s, _norm(norm_weight, norm_bias, norm_eps))
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


def _register_a8_cuda(name: str):
    bits, mul, off = A8_FORMATS[name]

    @A8_OPS[name].register_kernel("cuda")
    def _(x, packed, scales, bias, in_features, norm_weight=None, norm_bias=None, norm_eps=None):
        from cuda_ops import triton_kernels as tk
        n = _check_a8(name, x, packed, scales, bias, in_features, norm_weight, norm_bias, norm_eps)
        x2 = _rows(x, in_features)
        y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
        with torch.cuda.device(x.device):
            tk.a8_gemm(x2, packed.contiguous(), scales.reshape(n).float().contiguous(),
                       None if bias is None else bias.contiguous(), y, bits, mul, off,
                       _norm(norm_weight, norm_bias, norm_eps), trits=name == "ternary_b3")
        return y.reshape(*x.shape[:-1], n)


for _name in A8_FORMATS:
    _register_a8_cuda(_name)


@weight_only_linear.register_kernel("cuda")
def _(x, packed, scales, zeros, codebook, bias, bits, group_size, in_features):
    from cuda_ops import triton_kernels as tk
    n = _check_weight_only(x, packed, scales, zeros, codebook, bias, bits, group_size, in_features)
    x2 = _rows(x, in_features)
    y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    with torch.cuda.device(x.device):
        tk.weight_only_gemm(x2, packed.contiguous(), f32(scales), f32(zeros), f32(codebook),
                            None if bias is None else bias.contiguous(), bits, min(group_size, in_features), y)
    return y.reshape(*x.shape[:-1], n)
