"""BitNet's training-time linear layers, 1-bit (`w1a8`) and ternary b1.58 (`w1.58a8`), and their freezing.

`BitLinear` computes, for x (..., K) and a float latent weight W (O, K) that the optimizer updates,

    x   = LayerNorm(x)                                   optional `input_norm` (BitNet's LN before quant)
    x_q = per-token absmax int8 of x                     s[t] = max|x[t]| / 127, round half to even
    W_q = sign(W - mean W) * mean|W|                     binary  (BitNet, Wang et al. 2023)
        = clamp(round(W / mean|W|), -1, 1) * mean|W|     ternary (BitNet b1.58, Ma et al. 2024)
    y   = x_q @ W_q^T + bias

with straight-through gradients for both quantizers (`quant.quantizers`). Against the 1-bit ViT paper's
BitLinear (per-tensor absmax, a [0, Q_b] range before non-linearities, W - mean <= 0 mapped to -1): the
activations are quantized per token to [-127, 127] throughout, as in BitNet b1.58, and a weight equal to
the mean maps to +1. `freeze()` turns it into
the packed `QuantLinear` (weight codes + one scale, `act_format="int8_token"`, the same LayerNorm as
`input_norm`), which computes exactly the same function: y[t, o] = s[t] * beta * sum_k q[t, k] c[o, k] + b[o].
The training forward takes the same steps in the same order (codes times weights, then the token scale,
then the bias), so in float32 a frozen model's logits equal its training form's bit for bit (computing
the dequantized input (q s) @ W_q^T instead differs by an ulp, enough to flip later tokens' int8 rounding
and move a 6-block model's logits by ~2e-3).

`prepare(model, ...)` swaps a model's nn.Linear layers (all but `skip`) for BitLinear layers, for
quantization-aware training from the model's own weights; `freeze(model)` swaps them for QuantLinear.
A fresh LayerNorm re-normalises every token, which moves a pretrained model far from its function
(the shipped CIFAR ViT, 74 % top-1, starts ternary QAT at 37 % with it, 46 % without it):
`init_input_norms` sets each inserted LayerNorm's weight and bias to the per-channel affine map that
best undoes the normalisation on a calibration batch (least squares), which starts it at 44 %.
Attention matmuls stay in floating point, as in BitNet.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.models import forward_with_hooks, linear_from, refuse_meta
from quant.qlinear import QuantLinear
from quant.quantizers import dequantize, quantize_int8_token, quantize_weight, ste

FORMATS = ("binary", "ternary")


class BitLinear(nn.Linear):
    """nn.Linear with BitNet's binary or ternary weights and per-token int8 inputs (fake-quantized)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_format: str = "binary",
                 input_norm: bool = True):
        super().__init__(in_features, out_features, bias)
        if weight_format not in FORMATS:
            raise ValueError(f"BitLinear weights are {' or '.join(FORMATS)}, not {weight_format!r}")
        self.weight_format = weight_format
        self.input_norm = nn.LayerNorm(in_features, eps=1e-6) if input_norm else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_format: str, input_norm: bool = True) -> "BitLinear":
        return linear_from(cls, linear, weight_format, input_norm)

    def _codes(self):
        return quantize_weight(self.weight, self.weight_format)  # BitNet's absmean ternary or binary codes

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight (O, K), straight-through to the latent weight: the very codes and
        (float16-exact) scale that `freeze` packs, so the frozen layer computes the same function."""
        q = self._codes()
        w = dequantize(q.codes, q.scales, None, self.weight_format, self.in_features)
        return ste(self.weight, w.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_norm is not None:
            x = self.input_norm(x)
        q, s = quantize_int8_token(x)                       # QuantLinear's int8_token steps, in its order:
        xs = x / torch.where(s > 0, s, torch.ones_like(s))  # q's gradient is x's over s, the scale multiplies it
        y = F.linear(ste(xs, q), self.quantized_weight())  # back: the plain straight-through gradient
        y = y * s.to(y.dtype)                               # (bfloat16 under autocast, as F.linear's output)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    @torch.no_grad()
    def freeze(self) -> QuantLinear:
        """The packed layer computing this layer's function (weights as codes + one scale)."""
        q = self._codes()
        norm = None
        if self.input_norm is not None:
            norm = nn.LayerNorm(self.in_features, eps=self.input_norm.eps)
            norm.load_state_dict(self.input_norm.state_dict())
        return QuantLinear.from_codes(q.codes, q.scales, None, self.bias, self.weight_format,  # in the model's
                                      act_format="int8_token", input_norm=norm).to(self.weight)  # dtype too

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_format={self.weight_format}, input_norm={self.input_norm is not None}"


def prepare(model: nn.Module, weight_format: str, input_norm: bool = True,
            skip: tuple[str, ...] = ("head",)) -> nn.Module:
    """Replace every nn.Linear of `model` whose name is not in `skip` by a BitLinear (in place)."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in skip]
    if not names:
        raise ValueError("the model has no nn.Linear layers to turn into BitLinear layers")
    for name in names:
        model.set_submodule(name, BitLinear.from_linear(model.get_submodule(name), weight_format, input_norm))
    return model


@torch.no_grad()
def init_input_norms(model: nn.Module, x: torch.Tensor) -> None:
    """Fit every BitLinear's `input_norm` affine (weight, bias per channel) so that LN(y) ~= y on the
    inputs y the layer sees for the batch x (least squares; layers in forward order, each seeing the
    already-quantized layers before it)."""
    def fit(m, inp):
        y = inp[0].detach().float().reshape(-1, m.in_features)               # (tokens, K)
        z = F.layer_norm(y, (m.in_features,), eps=m.input_norm.eps)
        zc, yc = z - z.mean(0), y - y.mean(0)
        w = (zc * yc).mean(0) / zc.pow(2).mean(0).clamp_min(1e-12)
        m.input_norm.weight.copy_(w)
        m.input_norm.bias.copy_(y.mean(0) - w * z.mean(0))

    forward_with_hooks(model, x, [m.register_forward_pre_hook(fit) for m in model.modules()
                                  if isinstance(m, BitLinear) and m.input_norm is not None])


def freeze(model: nn.Module) -> nn.Module:
    """Replace every BitLinear of `model` by its packed QuantLinear (in place)."""
    refuse_meta(model, "freezing it")
    for name in [n for n, m in model.named_modules() if isinstance(m, BitLinear)]:
        model.set_submodule(name, model.get_submodule(name).freeze())
    return model
