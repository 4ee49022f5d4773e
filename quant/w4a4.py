"""ViT-aware W4A4 post-training quantization (the `w4a4` recipe), after RepQ-ViT (Li et al. 2023).

Two ViT activations break naive 4-bit quantization, and each gets its own treatment:

* Post-LayerNorm activations (inputs of `qkv` and `fc1`) vary wildly between channels, so one
  per-tensor range wastes most codes. We calibrate a range per channel c (scale s_c, integer zero
  z_c), then reparameterize the scales into the model (RepQ-ViT's scale reparameterization): with
  s = mean_c s_c, z = round(mean_c z_c), r1_c = s_c / s and r2_c = z_c - z,
      LayerNorm:  gamma' = gamma / r1,  beta' = (beta + s_c * r2) / r1
      next layer: W' = W * r1 (per input column),  b' = b - W @ (s_c * r2)
  after which ONE per-tensor quantizer (s, z) gives every channel exactly the codes its own
  per-channel quantizer gave, and the layer's output is unchanged. The kernels see a plain
  per-tensor uint4 input.
* Post-softmax attention probabilities are heavy-tailed in [0, 1]: a log-sqrt(2) quantizer
  (`quantize_log2`: half-octave levels 2^(-(c + offset)/2), the last code for 0) keeps the small
  probabilities that uniform 4-bit codes would flush to zero. Its integer offset is calibrated per
  head to minimise the error of the attention output ||(P - P_hat) V||: at 4 bits and offset 0 the
  smallest level is 2^-7, and with vit_cifar_small's 257 tokens a third to a half of each block's
  attention mass lies below it, which offset 0 would zero; the calibrated offsets there are 5-8.
* Post-GELU activations (inputs of `fc2`) are skewed (a short negative tail down to -0.17, a long
  positive one): an asymmetric per-tensor uint4 range whose clipping is searched to minimise the
  error of the layer's OUTPUT, ||(X - X_hat) W^T||, rather than of X itself (the same for the
  attention head outputs feeding `proj`).
Q, K and V get per-head asymmetric uint4 ranges (MSE-searched). Weights are 4-bit, per output
channel, by GPTQ with the Hessian of the quantized inputs each layer really sees; then each layer's
bias absorbs its mean output error on the calibration tokens (bias correction, as in Nagel et al.
2019, here for weight and input rounding together). Calibration goes
block by block, so every range is found on inputs that already passed through the quantized blocks
before it (the inputs of block i are computed once, by the quantized blocks 0..i-1, and each
capture inside block i runs only that block), and inside a block the layers are quantized in
forward order (qkv, proj, fc1, fc2), each on inputs that passed through the block's quantized layers
before it. The classifier head stays at int8 weights and per-token int8 inputs; the patch embedding
(a convolution) stays in floating point.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from quant.gptq import capture, gptq_weight, hessian, refuse_non_finite_inputs
from quant.models import forward_with_hooks
from quant.qattention import QuantAttention
from quant.qlinear import QuantLinear
from quant.quantizers import (WEIGHT_FORMATS, Log2Quantizer, UniformQuantizer, fake_quant_log2, is_uniform_format,
                              quantize_weight, uint_fake, uint_range_params)
from quant.recipes import format_override

_CLIPS = torch.linspace(1.0, 0.2, 33)   # candidate range shrink factors for the searches below
_MAX_TOKENS = 4096                      # tokens used by the range searches (a random subset)


def _subset(x: torch.Tensor, n: int = _MAX_TOKENS) -> torch.Tensor:
    if len(x) <= n:
        return x
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]]


def channel_ranges(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale and integer zero (K,) of x (T, K), each channel's clipping searched for least MSE."""
    s, z = tensor_range(_subset(x), bits, dims=(0,))  # (1, K) each
    return s[0], z[0]


def tensor_range(x: torch.Tensor, bits: int, weight: torch.Tensor | None = None,
                 dims: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for x, searched over clipping factors of [min, max].

    With `weight` (O, K) the error measured is the next layer's output error ||(x - x_hat) W^T||^2
    for x (T, K); else the squared error of x itself. `dims`: the dimensions reduced for one range
    (default all: per tensor); e.g. (0, 2, 3) gives one range per head of a (B, H, N, d) tensor.
    """
    dims = dims if dims is not None else tuple(range(x.ndim))
    lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    xs = _subset(x) if weight is not None else x
    best = None
    for c in _CLIPS.tolist():
        s, z = uint_range_params(lo * c, hi * c, bits)
        e = uint_fake(xs, s, z, bits) - xs
        err = ((e @ weight.T) ** 2).sum() if weight is not None else (e ** 2).sum(dims, keepdim=True)
        if best is None:
            best = (err, s, z)
        else:
            better = err < best[0]
            best = (torch.where(better, err, best[0]), torch.where(better, s, best[1]), torch.where(better, z, best[2]))
    return best[1], best[2]


def reparameterize_layernorm(norm: nn.LayerNorm, linear: nn.Linear, scale: torch.Tensor,
                             zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold per-channel ranges (scale, zero (K,)) of norm's output into norm and the linear layer after it.

    Returns the per-tensor (scale, zero) that now quantizes norm's output exactly as the per-channel
    ranges did (see the module docstring for the algebra). Changes norm and linear in place.
    """
    if getattr(norm, "weight", None) is None or getattr(norm, "bias", None) is None:  # before anything changes
        raise ValueError(f"W4A4 folds the activation ranges into the LayerNorm's weight and bias: it needs a "
                         f"LayerNorm with both (elementwise_affine and bias), not {norm!r}; or give the recipe "
                         f"reparam_layernorm=False")
    s = scale.mean()
    z = torch.round(zero.mean())
    r1, r2 = scale / s, zero - z
    with torch.no_grad():
        shift = scale * r2                                   # (K,)
        if linear.bias is None:  # a layer without bias (timm's qkv_bias=False) gets one to absorb the shift
            linear.bias = nn.Parameter(torch.zeros_like(linear.weight[:, 0]))
        linear.bias -= linear.weight @ shift
        linear.weight *= r1
        norm.bias.copy_((norm.bias + shift) / r1)
        norm.weight /= r1
    return s, z


def _quantize_linear(layer: nn.Linear, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     recipe, weight_bits: int) -> QuantLinear:
    """QuantLinear with a static uintB input quantizer (scale, zero), GPTQ (or RTN) weights of `weight_bits`,
    corrected bias.

    Bias correction: the quantized layer's mean output error over the calibration tokens x (T, K),
    mean_T (x_hat W_hat^T - x W^T), is subtracted from its bias (a layer without bias gets one), so
    rounding errors that do not average out do not shift the next LayerNorm's or GELU's input.
    """
    bits, fmt = recipe.act_bits, f"int{weight_bits}"
    x_hat = uint_fake(x, scale, zero, bits)
    if recipe.gptq:
        q = gptq_weight(layer.weight, hessian(x_hat), weight_bits, recipe.group_size, asymmetric=False)
    else:
        q = quantize_weight(layer.weight, fmt, recipe.group_size)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(layer.weight[:, 0])
    ql = QuantLinear.from_codes(q.codes, q.scales, q.zeros, bias, fmt, recipe.group_size,
                                act_format=f"uint{bits}_tensor")
    ql.act_quant.scale.copy_(scale.reshape(()))
    ql.act_quant.zero.copy_(zero.reshape(()))
    with torch.no_grad():
        xs = _subset(x, 4 * _MAX_TOKENS)
        ql.bias -= (ql(xs) - layer(xs)).mean(0)                                # (O,)
    return ql


def _blocks(model: nn.Module) -> list[nn.Module]:
    blocks = [m for m in model.modules()
              if all(hasattr(m, a) for a in ("norm1", "attn", "norm2", "mlp"))
              and hasattr(m.attn, "qkv") and hasattr(m.mlp, "fc2")]
    if not blocks:
        raise ValueError("w4a4 is ViT-aware: it needs pre-norm transformer blocks (norm1, attn.qkv/proj, "
                         "norm2, mlp.fc1/fc2), as in bitvit's or timm's ViT")
    for b in blocks:   # what QuantAttention, which replaces each attention, and the calibration read of it
        attn, mlp = b.attn, b.mlp
        if not (all(isinstance(getattr(attn, a, None), nn.Linear) for a in ("qkv", "proj"))
                and all(isinstance(getattr(mlp, a, None), nn.Linear) for a in ("fc1", "fc2"))
                and all(isinstance(getattr(attn, a, None), int) for a in ("num_heads", "head_dim"))
                and attn.num_heads * attn.head_dim * 3 == attn.qkv.out_features):
            raise ValueError(f"w4a4 is ViT-aware: it needs attention modules with nn.Linear qkv and proj and integer "
                             f"num_heads and head_dim (qkv giving 3 x num_heads x head_dim outputs) and MLPs with "
                             f"nn.Linear fc1 and fc2, as in bitvit's or timm's ViT; this model's {type(attn).__name__} "
                             f"and {type(mlp).__name__} do not")
        if lost := [n for n, c in attn.named_children()
                    if n not in ("qkv", "proj") and not isinstance(c, (nn.Identity, nn.Dropout))]:
            raise ValueError(f"w4a4 replaces each attention by a QuantAttention (qkv, softmax, proj), which would drop "
                             f"this model's {type(attn).__name__}.{lost[0]} ({type(getattr(attn, lost[0])).__name__}); "
                             f"quantize a model whose attention has no such module (timm's: qk_norm=False)")
    return blocks


def _check_chained(model: nn.Module, blocks: list[nn.Module], example: torch.Tensor) -> None:
    """Refuse a model whose blocks do not run one after another, each on the previous one's output: W4A4
    computes each block's calibration inputs that way (a pooling stage or a second tower between them would
    calibrate a block on inputs it never sees, or crash)."""
    calls = []  # (block, its input, its output), in the order the forward pass runs them
    forward_with_hooks(model, example, [b.register_forward_hook(lambda m, i, o: calls.append((m, i[0], o)))
                                        for b in blocks])
    fed = all(x is y for (_, _, y), (_, x, _) in zip(calls, calls[1:]))   # each input the output before it
    if not ([m for m, _, _ in calls] == blocks and fed):
        names = {m: n for n, m in model.named_modules()}
        raise ValueError(f"w4a4 calibrates each block on the previous block's outputs, but this model's blocks "
                         f"({', '.join(names[b] for b in blocks[:3])}{', ...' if len(blocks) > 3 else ''}) do not "
                         f"run one after another, each once, on the previous one's output: quantize a plain ViT")


def quantize_w4a4(model: nn.Module, calib: torch.Tensor, recipe) -> nn.Module:
    """Apply the W4A4 recipe to a ViT in place (see the module docstring)."""
    from tqdm import tqdm
    batch_size = 128  # calibration inputs per forward pass
    bits = recipe.act_bits
    blocks = _blocks(model)
    in_blocks = {id(m) for b in blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2)}
    # a layer_formats pattern may set a block layer's weight width (intB); its input stays at act_bits
    weight_bits = {}                                                           # id(layer) -> B
    for n, m in model.named_modules():
        if id(m) in in_blocks:
            fmt = format_override(n, recipe.layer_formats)
            if fmt is not None and not is_uniform_format(fmt):
                raise ValueError(f"w4a4 quantizes the weights of qkv, proj, fc1 and fc2 to uniform integer codes, "
                                 f"so layer_formats can give {n!r} int2..int8, not {fmt!r}")
            weight_bits[id(m)] = recipe.weight_bits if fmt is None else WEIGHT_FORMATS[fmt]
    others = {n: format_override(n, recipe.layer_formats) for n, m in model.named_modules()
              if type(m) is nn.Linear and id(m) not in in_blocks}                  # e.g. the head
    if unplaced := [n for n, fmt in others.items() if fmt is None]:
        raise ValueError(f"w4a4 quantizes the linear layers outside qkv, proj, fc1 and fc2 by the recipe's "
                         f"layer_formats, and none matches {unplaced[0]!r}")
    _check_chained(model, blocks, calib[:1])
    h = capture(model, blocks[0], calib, batch_size, keep_shape=True)          # (B, N, D) into block 0
    for i, block in enumerate(tqdm(blocks, desc="W4A4", unit="block", leave=False)):
        attn = QuantAttention.from_attention(block.attn)
        block.attn = attn
        # in forward order, so each layer is calibrated on the inputs it sees behind the quantized layers before it
        for norm, owner, name in ((block.norm1, attn, "qkv"), (None, attn, "proj"),
                                  (block.norm2, block.mlp, "fc1"), (None, block.mlp, "fc2")):
            layer = getattr(owner, name)
            x = capture(block, layer, h, batch_size)                            # (T, K)
            # e.g. inputs so large a LayerNorm's variance overflows: NaN ranges
            refuse_non_finite_inputs(x, f"the inputs of block {i}'s {name}")
            if norm is None:                                                    # head outputs, post-GELU
                s, z = tensor_range(x, bits, layer.weight.detach())
            elif recipe.reparam_layernorm:                                      # post-LayerNorm
                s_c, z_c = channel_ranges(x, bits)
                s, z = reparameterize_layernorm(norm, layer, s_c, z_c)
                x = capture(block, layer, h, batch_size)
            else:
                s, z = tensor_range(x, bits, layer.weight)
            setattr(owner, name, _quantize_linear(layer, x, s, z, recipe, weight_bits[id(layer)]))
            if name == "qkv":
                _calibrate_attention(block, attn, h, bits, recipe, batch_size)
        with torch.no_grad():                                              # the next block's inputs
            h = torch.cat([block(h[i:i + batch_size]) for i in range(0, len(h), batch_size)])
    for name, fmt in others.items():
        model.set_submodule(name, QuantLinear.from_linear(model.get_submodule(name), fmt, act_format="int8_token"))
    return model


def log2_offsets(p: torch.Tensor, v: torch.Tensor, bits: int) -> list[int]:
    """Per head, the log2 quantizer offset (0 .. 2**bits - 2) with the least attention output error.

    p (B, H, N, N) attention probabilities, v (B, H, N, d) the values they weight; the error of
    offset o for head h is sum ||(P_hat_o - P) V||^2 over that head's rows.
    """
    errors = torch.stack([((fake_quant_log2(p, bits, o) - p) @ v).pow(2).sum((0, 2, 3))
                          for o in range(2 ** bits - 1)])                       # (offsets, H)
    return errors.argmin(0).tolist()


def _calibrate_attention(model, attn: QuantAttention, calib, bits, recipe, batch_size) -> None:
    """Per-head ranges for Q, K, V from the quantized qkv's outputs; the softmax quantizer."""
    y = capture(model, attn.qkv, calib, batch_size, output=True)                # (B, N, 3 D)
    y = _subset(y, max(1, _MAX_TOKENS // y.shape[1]))                           # ~_MAX_TOKENS tokens per head
    for t, slot in zip(attn.split_heads(y), ("q_quant", "k_quant", "v_quant")):   # each (B, H, N, d)
        quantizer = UniformQuantizer(bits, shape=(1, attn.num_heads, 1, 1)).to(y.device)
        s, z = tensor_range(t, bits, dims=(0, 2, 3))
        quantizer.scale.copy_(s)
        quantizer.zero.copy_(z)
        setattr(attn, slot, quantizer)
    if recipe.softmax == "log2":
        with torch.no_grad():
            p, v = attn.attend(y)                                                  # (B, H, N, N), (B, H, N, d)
        attn.attn_quant = Log2Quantizer(bits, log2_offsets(p, v, bits)).to(y.device)
    else:  # "uniform": the W4A4 recipe refuses any other value when it is built
        quantizer = UniformQuantizer(bits).to(y.device)
        quantizer.set_range(torch.tensor(0.0, device=y.device), torch.tensor(1.0, device=y.device))
        attn.attn_quant = quantizer
