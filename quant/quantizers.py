"""Every bitvit quantizer, as plain functions: weights to integer codes + scales, and fake-quant paths.

Weights are (out_features, in_features) = (O, K) matrices; their scales are (O, G) with
G = ceil(K / group_size) groups of `group_size` consecutive inputs per output row (group_size = K:
per output channel; a per-tensor scale is the same value repeated in every row). Codes are uint8
and mean what `quant.pack` and the QuantLinear contract say:

  format       code range     value of a code                       scale
  intB (sym)   0 .. 2**B - 1  code - 2**(B-1)                       absmax / (2**(B-1) - 1)
  intB (asym)  0 .. 2**B - 1  code - zero  (zero an integer code)   (max - min) / (2**B - 1)
  nf4          0 .. 15        NF4_CODEBOOK[code]                    absmax of the group
  ternary      0, 1, 2        code - 1                              mean |W| (BitNet b1.58)
  binary       0, 1           2 * code - 1                          mean |W| (BitNet)

so the dequantized weight is W[o, k] = value(code[o, k]) * scales[o, k // group_size].

Scales of uniform and ternary/binary weights are rounded to float16-representable values when they
are made (all but those beyond float16's range), so a file that stores them as float16 reloads the exact
same model. NF4 scales go through
QLoRA's double quantization (`double_quantize`) instead.

Training paths (`fake_quant_*`) return the dequantized tensor in the forward pass and pass the
gradient straight through (the straight-through estimator, identity on the input) in the backward.

Activations: BitNet's per-token absmax int8 (`quantize_int8_token`, the `int8_token` act format of
QuantLinear), static unsigned uniform codes with a calibrated scale and zero point per tensor,
channel or head (`UniformQuantizer`), and the log-sqrt(2) quantizer for post-softmax attention
probabilities (`quantize_log2`, `Log2Quantizer`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from quant.cli import is_positive_int

# ----------------------------------------------------------------------------- helpers


def ste(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """`x_hat`'s values with `x`'s gradient: the straight-through estimator for a whole quantizer. Written
    x_hat + (x - x.detach()), which adds an exact zero, so the forward value is x_hat bit for bit (the
    usual x + (x_hat - x).detach() can miss it by an ulp, enough to move a later layer's int8 rounding).
    Without a gradient to carry (inference, or an x that needs none) it is x_hat itself: two passes fewer."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return x_hat
    return x_hat + (x - x.detach())


def widen(x: torch.Tensor) -> torch.Tensor:
    """x in float32 when it is float16/bfloat16 (quantizer arithmetic: x / scale and its rounding must not
    happen at 8 or 11 mantissa bits, or codes differ from the kernels' float32 ones), else x itself."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def fp16_scale(s: torch.Tensor, up: bool = False) -> torch.Tensor:
    """Round positive scales to float16-representable float32 values, at least 2**-24 (fp16's smallest).
    Below float16's normal range (6.1e-5) its steps are coarse enough that rounding a scale down would clip
    its group's largest weights (by up to 8 % near 1e-6), so there a scale is rounded up; above it, rounding
    to nearest is off by at most 2**-11 relative, too little to clip any code of a symmetric grid. `up` rounds
    up everywhere, for asymmetric grids, whose zero point may use up the half step of slack
    (`uint_range_params`). A scale beyond float16's range (65504) stays as it is, and files store it in
    float32: saturated, it would clip its group's largest weights."""
    s = s.clamp(min=2.0 ** -24)
    h = s.clamp(max=65504.0).to(torch.float16)
    above = torch.nextafter(h, torch.full_like(h, float("inf")))
    return torch.where(s > 65504.0, s, torch.where((h.float() < s) & ((s < 2.0 ** -14) | up), above, h).float())


def num_groups(k: int, group_size: int) -> int:
    return (k + group_size - 1) // group_size


def _group_stat(w: torch.Tensor, group_size: int, fn) -> torch.Tensor:
    """A reduction `fn(values) -> scalar` over each group's real (unpadded) entries: (O, K) -> (O, G)."""
    if not is_positive_int(group_size):  # range() would give no groups (a negative size) or a TypeError
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    o, k = w.shape
    return torch.stack([fn(w[:, i:i + group_size]) for i in range(0, k, group_size)], dim=1)


def expand_groups(s: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Per-group values (O, G) -> per-weight values (O, K)."""
    return s.repeat_interleave(group_size, dim=1)[:, :k]


class QuantizedWeight(NamedTuple):
    """Integer codes (O, K) uint8, scales (O, G) float32 and zero points (O, G) float32 or None."""
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None


# ----------------------------------------------------------------------------- uniform b-bit weights


def uniform_params(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (O, G) and, when asymmetric, integer zero points (O, G) for uniform b-bit codes of w (O, K).

    Symmetric: scale = absmax / (2**(bits-1) - 1), codes 0 .. 2**bits - 1 hold q + 2**(bits-1).
    Asymmetric: the range [min(w, 0), max(w, 0)] maps onto 0 .. 2**bits - 1 (`uint_range_params`).
    The full range, never clipped: shrinking it to minimise each group's squared rounding error (a search
    over clip factors 0.5..1) cost accuracy on the tiny CIFAR ViT at 2 and 3 bits, round to nearest and
    GPTQ alike (quant/README.md, "Post-training results").
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"uniform weight codes need 2..8 bits, got {bits}")
    w = w.detach().float()
    group_size = group_size or w.shape[1]
    lo = _group_stat(w, group_size, lambda x: x.amin(1)).clamp(max=0)
    hi = _group_stat(w, group_size, lambda x: x.amax(1)).clamp(min=0)
    if symmetric:
        return fp16_scale(torch.maximum(-lo, hi) / (2 ** (bits - 1) - 1)), None
    return uint_range_params(lo, hi, bits, fp16=True)


def uniform_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                  group_size: int) -> torch.Tensor:
    """uint8 codes (O, K) of w (O, K) on the grid given by scales/zeros (O, G) (see `uniform_params`)."""
    k = w.shape[1]
    s = expand_groups(scales, k, group_size)
    z = expand_groups(zeros, k, group_size) if zeros is not None else 2 ** (bits - 1)
    return torch.clamp(torch.round(w.detach().float() / s) + z, 0, 2 ** bits - 1).to(torch.uint8)


def uniform_dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                       group_size: int) -> torch.Tensor:
    """float32 (O, K) weight from uniform codes (O, K) and scales/zeros (O, G)."""
    k = codes.shape[1]
    z = expand_groups(zeros, k, group_size) if zeros is not None else 2 ** (bits - 1)
    return (codes.float() - z) * expand_groups(scales, k, group_size)


def quantize_uniform(w: torch.Tensor, bits: int, group_size: int | None = None,
                     symmetric: bool = True) -> QuantizedWeight:
    """Round-to-nearest b-bit codes of a weight (O, K): codes (O, K), scales (O, G), zeros (O, G) or None."""
    group_size = group_size or w.shape[1]
    scales, zeros = uniform_params(w, bits, group_size, symmetric)
    return QuantizedWeight(uniform_codes(w, scales, zeros, bits, group_size), scales, zeros)


def fake_quant_uniform(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Dequantized symmetric round-to-nearest weight (O, K) with a straight-through gradient."""
    group_size = group_size or w.shape[1]
    q = quantize_uniform(w, bits, group_size)
    return ste(w, uniform_dequantize(q.codes, q.scales, q.zeros, bits, group_size).to(w.dtype))


# ----------------------------------------------------------------------------- NF4 (QLoRA)


def _nf4_codebook() -> torch.Tensor:
    """QLoRA's 4-bit NormalFloat levels: normal quantiles, asymmetric so that 0 is exactly representable.

    8 positive levels are the standard normal quantiles at 8 evenly spaced probabilities from 1/2 to
    `offset`, 7 negative levels the mirrored quantiles at 7 probabilities, plus 0; all divided by the
    largest so that they span [-1, 1] (Dettmers et al. 2023, appendix; offset 0.9677 is theirs).
    """
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).to(torch.float32)


NF4_CODEBOOK: torch.Tensor = _nf4_codebook()  # (16,) float32, ascending, NF4_CODEBOOK[7] == 0


def nf4_codes(w: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Index (O, K) uint8 of the code-book level nearest to w / scale, scales (O, G)."""
    s = expand_groups(scales, w.shape[1], group_size).clamp_min(1e-12)
    x = (w.detach().float() / s).clamp(-1, 1)
    book = NF4_CODEBOOK.to(w.device)
    mids = (book[1:] + book[:-1]) / 2                   # decision boundaries between levels
    return torch.bucketize(x, mids).to(torch.uint8)


class DoubleQuantized(NamedTuple):
    """QLoRA's quantized quantization constants: scales (O, G) = offset + codes * absmax / 127 per block."""
    codes: torch.Tensor     # (O, G) int8
    absmax: torch.Tensor    # (ceil(O * G / block),) float32, one per block of `block` scales
    offset: torch.Tensor    # () float32, the mean scale, subtracted before quantizing
    block: int


def double_quantize(scales: torch.Tensor) -> DoubleQuantized:
    """Quantize positive scales (O, G) to int8 in blocks of 256 (row-major), after subtracting their mean.

    QLoRA stores 8-bit floats here; bitvit stores symmetric linear int8 per block, which is as good
    where a block's scales lie close together once the mean is removed, and worse where a few scales
    are far larger than the rest of their block: the small ones then keep few levels (a 64x256 weight
    with 4 rows 100x larger, groups of 64: NF4 relative error on the other rows 0.092 with float32
    scales, 0.156 with these, 0.103 with e4m3 floats; measured 2026-12-04).
    """
    block = 256  # scales per absmax, as in QLoRA
    flat = scales.detach().float().reshape(-1)
    offset = flat.mean()
    n = flat.numel()
    padded = torch.nn.functional.pad(flat - offset, (0, (-n) % block)).reshape(-1, block)
    absmax = padded.abs().amax(1).clamp_min(1e-12)
    codes = torch.round(padded / absmax[:, None] * 127).clamp(-127, 127).to(torch.int8)
    return DoubleQuantized(codes.reshape(-1)[:n].reshape(scales.shape), absmax, offset, block)


def double_dequantize(dq: DoubleQuantized) -> torch.Tensor:
    """float32 scales (O, G) from `double_quantize`'s output, clamped at 0 (a scale is never negative)."""
    shape, n = dq.codes.shape, dq.codes.numel()
    codes = torch.nn.functional.pad(dq.codes.reshape(-1).float(), (0, (-n) % dq.block)).reshape(-1, dq.block)
    flat = (codes * (dq.absmax[:, None] / 127) + dq.offset).reshape(-1)[:n]
    return flat.clamp_min(0).reshape(shape)


def quantize_nf4(w: torch.Tensor, group_size: int = 64,
                 double_quant: bool = True) -> tuple[QuantizedWeight, DoubleQuantized | None]:
    """NF4 codes of w (O, K) with absmax scales per group, the scales double-quantized (QLoRA) unless
    `double_quant` is False.

    Returns the codes and the float32 scales they are meant with (after double quantization, so
    codes are chosen against the scales the file will hold), and the double-quantized form (None
    without double quantization).
    """
    absmax = _group_stat(w.detach().float(), group_size, lambda x: x.abs().amax(1))
    dq = double_quantize(absmax) if double_quant else None
    scales = double_dequantize(dq) if dq is not None else absmax
    return QuantizedWeight(nf4_codes(w, scales, group_size), scales, None), dq


# ----------------------------------------------------------------------------- ternary and binary (BitNet)


def quantize_ternary(w: torch.Tensor) -> QuantizedWeight:
    """BitNet b1.58 absmean ternary codes of w (O, K): q = clamp(round(w / mean|w|), -1, 1), code = q + 1.

    One scale for the tensor, mean |w|, stored repeated as (O, 1).
    """
    w = w.detach().float()
    gamma = fp16_scale(w.abs().mean().clamp_min(1e-5))
    q = torch.clamp(torch.round(w / gamma), -1, 1)
    return QuantizedWeight((q + 1).to(torch.uint8), gamma.expand(w.shape[0], 1).clone(), None)


def quantize_binary(w: torch.Tensor) -> QuantizedWeight:
    """BitNet binary codes of w (O, K): sign(w - mean(w)) (zero counts as +1), code 1 = +1, code 0 = -1.

    One scale for the tensor, beta = mean |w|, stored repeated as (O, 1).
    """
    w = w.detach().float()
    beta = fp16_scale(w.abs().mean())
    return QuantizedWeight((w >= w.mean()).to(torch.uint8), beta.expand(w.shape[0], 1).clone(), None)


# ----------------------------------------------------------------------------- codes -> values


WEIGHT_FORMATS = {"int8": 8, "int7": 7, "int6": 6, "int5": 5, "int4": 4, "int3": 3, "int2": 2,
                  "nf4": 4, "ternary": 2, "binary": 1}  # format -> code width in bits


def max_code(weight_format: str) -> int:
    """The largest code of a weight format: ternary's 2-bit codes stop at 2, every other format uses all its bits."""
    return 2 if weight_format == "ternary" else 2 ** WEIGHT_FORMATS[weight_format] - 1


def is_uniform_format(weight_format: str) -> bool:
    """Whether a weight format is a uniform integer grid, intB: the formats with zero points (asymmetric) and
    the only ones GPTQ solves for. Every other format has a code meaning of its own here."""
    return isinstance(weight_format, str) and weight_format == f"int{WEIGHT_FORMATS.get(weight_format)}"


def _unknown_format(weight_format: str) -> ValueError:
    if weight_format in WEIGHT_FORMATS:  # listed, but given no code meaning (nor quantizer) below
        return ValueError(f"weight format {weight_format!r} is in WEIGHT_FORMATS but quant.quantizers gives its "
                          f"codes no meaning: add it to code_values and quantize_weight")
    return ValueError(f"unknown weight format {weight_format!r}; known: {', '.join(WEIGHT_FORMATS)}")


def code_values(codes: torch.Tensor, weight_format: str, zeros: torch.Tensor | None = None,
                group_size: int | None = None) -> torch.Tensor:
    """float32 values (O, K) of codes (O, K) before scaling (zeros (O, G) for asymmetric int formats)."""
    if weight_format == "ternary":
        return codes.float() - 1
    if weight_format == "binary":
        return codes.float() * 2 - 1
    if weight_format == "nf4":
        return NF4_CODEBOOK.to(codes.device)[codes.long()]
    if is_uniform_format(weight_format):
        if zeros is not None:
            return codes.float() - expand_groups(zeros, codes.shape[1], group_size or codes.shape[1])
        return codes.float() - 2 ** (WEIGHT_FORMATS[weight_format] - 1)
    raise _unknown_format(weight_format)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, weight_format: str,
               group_size: int) -> torch.Tensor:
    """The float32 weight (O, K) any bitvit codes (O, K) and scales (O, G) stand for."""
    values = code_values(codes, weight_format, zeros, group_size)
    return values * expand_groups(scales, codes.shape[1], group_size)


def quantize_weight(w: torch.Tensor, weight_format: str, group_size: int | None = None,
                    asymmetric: bool = False) -> QuantizedWeight:
    """Round-to-nearest codes of w (O, K) in any format (NF4 without double quantization of the scales)."""
    if weight_format == "ternary":
        return quantize_ternary(w)
    if weight_format == "binary":
        return quantize_binary(w)
    if weight_format == "nf4":
        return quantize_nf4(w, group_size or 64, double_quant=False)[0]
    if is_uniform_format(weight_format):
        return quantize_uniform(w, WEIGHT_FORMATS[weight_format], group_size, not asymmetric)
    raise _unknown_format(weight_format)


# ----------------------------------------------------------------------------- activations


def quantize_int8_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet's per-token absmax int8: x (..., K) -> integer-valued q (..., K) in [-127, 127], scale (..., 1).

    s = max_k |x[..., k]| / 127 and q = clamp(round(x / s), -127, 127), round half to even; a token
    of zeros gets s = 0 and q = 0. x ~= q * s.
    """
    xw = widen(x.detach())
    s = xw.abs().amax(-1, keepdim=True) / 127
    q = torch.clamp(torch.round(xw / torch.where(s > 0, s, torch.ones_like(s))), -127, 127)
    return q.to(x.dtype), s.to(x.dtype)


def uint_range_params(lo: torch.Tensor, hi: torch.Tensor, bits: int | torch.Tensor,
                      fp16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point mapping [lo, hi] (widened to include 0) onto 0 .. 2**bits - 1 (`bits`
    an int or a tensor of widths that broadcasts against lo and hi); `fp16`: the scale float16-exact
    (`fp16_scale`), as weight scales are, and the zero point chosen against it."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    if fp16:  # rounded up, not to nearest: a scale a little short of the range clips the group's extreme weights
        scale = fp16_scale(scale, up=True)  # once the zero point's rounding has taken the half step of slack
    return scale, torch.round(-lo / scale).clamp(max=levels)


def uint_fake(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
    """x quantized onto unsigned codes and back, no gradient path: (clamp(round(x / scale) + zero, 0,
    2**bits - 1) - zero) * scale, with scale, zero and bits (an int or a tensor of widths) broadcasting
    against x."""
    codes = (torch.round(x / scale) + zero).clamp(min=0).clamp(max=2 ** bits - 1)
    return (codes - zero) * scale


def quantize_log2(p: torch.Tensor, bits: int, offset: int | torch.Tensor = 0) -> torch.Tensor:
    """log-sqrt(2) codes of probabilities p in [0, 1] (post-softmax attention, after RepQ-ViT's quantizer).

    code = clamp(round(-2 * log2 p) - offset, 0) while below 2**bits - 1; code 2**bits - 1 stands for
    0 (every smaller p). Value of code c < 2**bits - 1: 2**(-(c + offset) / 2). Half-octave steps keep
    the small probabilities' ratios that uniform 4-bit codes would flush to zero. The integer `offset`
    (a scalar, or one per head shaped (1, H, 1, 1)) slides the 2**bits - 1 levels down from
    [2**-7, 1] (4 bits, offset 0) to where a long sequence's probabilities lie: with 257 tokens most
    probabilities are below 2**-7, and p above the top level 2**(-offset / 2) is clipped to it.
    """
    c = p.clamp_min(1e-30).log2_().mul_(-2).round_().sub_(offset)  # in place on one new (B, H, N, N) tensor
    return c.clamp_(0, 2 ** bits - 1)


def log2_dequantize(codes: torch.Tensor, bits: int, offset: int | torch.Tensor = 0) -> torch.Tensor:
    v = (codes + offset).mul_(-0.5).exp2_()
    return v.masked_fill_(codes >= 2 ** bits - 1, 0.0)


def fake_quant_log2(p: torch.Tensor, bits: int, offset: int | torch.Tensor = 0) -> torch.Tensor:
    """log-sqrt(2) quantize-dequantize of probabilities p, straight-through gradient."""
    codes = quantize_log2(widen(p.detach()), bits, offset)
    return ste(p, log2_dequantize(codes, bits, offset).to(p.dtype))


# ----------------------------------------------------------------------------- activation quantizer modules


def undo_dtype_casts(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> torch.nn.Module:
    """After `nn.Module._apply`: each tensor of `before` (name: the tensor before it) that the conversion cast to
    another dtype is put back in its own dtype, on the device it moved to; the others keep the conversion's result
    (to_empty's fresh storage off the meta device). For an `_apply` override whose tensors must stay exact."""
    for name, t in before.items():
        if getattr(module, name).dtype != t.dtype:
            setattr(module, name, t.to(getattr(module, name).device))
    return module


class UniformQuantizer(torch.nn.Module):
    """Static unsigned uniform activation quantizer with calibrated scale, zero point and bit-width.

    x -> (clamp(round(x / scale) + zero, 0, 2**bits - 1) - zero) * scale, straight-through gradient.
    Buffers `scale`, `zero` and `bits` (float32 whatever dtype the model is cast to) share one `shape` that
    broadcasts against the input: () for one range per tensor, (1, H, 1, 1) for one per attention head of a
    (B, H, N, d) tensor, (K,) for one per channel of a (..., K) tensor; `bits` may differ between elements
    (head-wise bit-widths).
    """

    def __init__(self, bits: int = 8, shape: tuple[int, ...] = ()):
        super().__init__()
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero", torch.zeros(shape))
        self.register_buffer("bits", torch.full(shape, float(bits)))

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Calibrate: map [lo, hi] (tensors of this quantizer's shape) onto the codes."""
        scale, zero = uint_range_params(lo, hi, self.bits.to(lo.device))
        self.scale.copy_(scale)
        self.zero.copy_(zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = uint_fake(widen(x.detach()), self.scale, self.zero, self.bits)
        return ste(x, x_hat.to(x.dtype))

    def _apply(self, fn, recurse=True):
        # the ranges follow the model's device, never its dtype (.half()): in float16 a scale below 3e-8 (a range
        # calibrated on zeros gets 1e-8) would become 0, and a zero input 0 / 0 = NaN
        ranges = {n: getattr(self, n) for n in ("scale", "zero", "bits")}
        super()._apply(fn, recurse)
        return undo_dtype_casts(self, ranges)

    def spec(self) -> dict:
        return {"kind": "uniform", "shape": list(self.scale.shape)}

    def extra_repr(self) -> str:
        b = self.bits.unique().int().tolist()
        return f"bits={b[0] if len(b) == 1 else b}, shape={tuple(self.scale.shape)}"


class Log2Quantizer(torch.nn.Module):
    """Post-softmax attention probabilities (B, H, N, N) -> log-sqrt(2) codes (`quantize_log2`) and back.

    `offsets`: the integer level offset, one for all heads (a 1-list) or one per head (an H-list).
    """

    def __init__(self, bits: int = 4, offsets: list[int] = (0,)):
        super().__init__()
        self.n_bits = bits
        shape = (1, len(offsets), 1, 1) if len(offsets) > 1 else ()
        # in the state dict, so a state-dict round trip keeps calibrated offsets (a packed file's header holds them)
        self.register_buffer("offset", torch.tensor([float(o) for o in offsets]).reshape(shape))

    @property
    def offsets(self) -> list[int]:
        return [int(o) for o in self.offset.flatten().tolist()]

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return fake_quant_log2(p, self.n_bits, self.offset)

    def spec(self) -> dict:
        return {"kind": "log2", "bits": self.n_bits, "offsets": self.offsets}

    def extra_repr(self) -> str:
        return f"bits={self.n_bits}, offsets={self.offsets}"


def quantizer_from_spec(spec: dict | None) -> torch.nn.Module:
    """Rebuild an (uncalibrated) activation quantizer from its `spec()`; None is the identity."""
    if spec is None:
        return torch.nn.Identity()
    kind = spec.get("kind")
    if kind == "uniform":
        shape = spec.get("shape")  # () per tensor, (1, H, 1, 1) per head, (K,) per channel
        if not (isinstance(shape, list) and len(shape) <= 4 and all(is_positive_int(n) and n <= 65536 for n in shape)
                and math.prod(shape) <= 65536):  # a damaged header must not ask for gigabytes of ranges
            raise ValueError(f"a uniform quantizer's shape must be up to 4 sizes of at most 65536 values in all, "
                             f"got {shape!r}")
        return UniformQuantizer(shape=tuple(shape))
    if kind == "log2":
        bits = spec.get("bits")
        if not (is_positive_int(bits) and bits <= 8):
            raise ValueError(f"a log2 quantizer's bits must be an integer in 1..8, got {bits!r}")
        offsets = spec.get("offsets", [0])  # files written before offsets existed used offset 0
        if not (isinstance(offsets, list) and 1 <= len(offsets) <= 65536
                and all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o < 2 ** bits - 1 for o in offsets)):
            raise ValueError(f"a log2 quantizer's offsets must be a list of integers in 0..{2 ** bits - 2}, "
                             f"got {offsets!r}")
        return Log2Quantizer(bits, offsets)
    raise ValueError(f"unknown activation quantizer kind {kind!r}")


def quantizer_spec(module: torch.nn.Module) -> dict | None:
    if isinstance(module, torch.nn.Identity):
        return None
    if not hasattr(module, "spec"):
        raise ValueError(f"{type(module).__name__} cannot be saved: freeze it to a UniformQuantizer "
                         f"or Log2Quantizer first")
    return module.spec()
