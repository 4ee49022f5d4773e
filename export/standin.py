"""TEMPORARY stand-in for the quant core's `quant.QuantLinear` and `quant.quantize`, until they land.

Implements exactly the quantized-layer contract (packed codes in `quant.pack` layout, scales,
`weight_format`, `act_format`, `dequantized_weight()`, a reference `forward`) with plain
round-to-nearest quantizers, so the exporter, its parity tests and the benchmark run today.
Delete this file and switch `export.exporter.quantize_for_export` to `quant.quantize` when
`quant/qlinear.py` exists.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from quant.pack import pack_codes, unpack_codes

BITS = {"int8": 8, "int4": 4, "ternary": 2, "binary": 1}


class QuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, weight_format: str, act_format: str, group_size: int | None = None):
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_format, self.act_format, self.bits = weight_format, act_format, BITS[weight_format]
        self.group_size = group_size or self.in_features
        self.input_norm = None
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        if weight_format == "ternary":
            scale = w.abs().mean(1, keepdim=True).clamp_min(1e-8)
            codes = (torch.round(w / scale).clamp(-1, 1) + 1).to(torch.uint8)
            scales = scale
        elif weight_format == "binary":
            centred = w - w.mean(1, keepdim=True)
            codes = (centred > 0).to(torch.uint8)
            scales = w.abs().mean(1, keepdim=True)
        else:
            half = 1 << (self.bits - 1)
            g = w.reshape(self.out_features, -1, self.group_size)
            scales = (g.abs().amax(-1) / (half - 1)).clamp_min(1e-8)                 # (out, groups)
            q = torch.round(g / scales.unsqueeze(-1)).clamp(-(half - 1), half - 1)
            codes = (q + half).reshape(self.out_features, self.in_features).to(torch.uint8)
        self.register_buffer("packed", pack_codes(codes, self.bits))
        self.register_buffer("scales", scales.float().contiguous())
        self.zeros = None

    def dequantized_weight(self) -> torch.Tensor:
        codes = unpack_codes(self.packed, self.bits, self.in_features).float()
        if self.weight_format == "ternary":
            values = codes - 1
        elif self.weight_format == "binary":
            values = codes * 2 - 1
        else:
            values = codes - (1 << (self.bits - 1))
        return values * self.scales.repeat_interleave(self.group_size, 1)[:, :self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_format == "int8_token":
            s = x.abs().amax(-1, keepdim=True) / 127
            x = torch.clamp(torch.round(x / torch.where(s > 0, s, 1)), -127, 127) * s
        return nn.functional.linear(x, self.dequantized_weight(), self.bias)


RECIPES = {  # export format -> (weight format, activation format, group size)
    "w8a8": ("int8", "int8_token", None),
    "int4": ("int4", "none", 32),
    "ternary": ("ternary", "int8_token", None),
    "binary": ("binary", "int8_token", None),
}


def quantize(model: nn.Module, fmt: str) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a round-to-nearest QuantLinear of `fmt`."""
    weight_format, act_format, group = RECIPES[fmt]
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                g = group if group and child.in_features % group == 0 else None
                setattr(module, child_name, QuantLinear(child, weight_format, act_format, g))
    return model
