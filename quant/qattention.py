"""QuantAttention: multi-head self-attention written out step by step, with an activation quantizer slot
at every matmul input.

It replaces `quant.models.Attention` (same `qkv` and `proj` submodules and state-dict names, so a
ViT's weights load unchanged) and computes, for x (B, N, D) with H heads of width d = D / H:

    q, k, v = split(qkv(x))                   each (B, H, N, d)
    q, k, v = q_quant(q), k_quant(k), v_quant(v)          slots 1-3, (B, H, N, d)
    attn    = softmax(q @ k^T / sqrt(d))       (B, H, N, N)
    attn    = attn_quant(attn)                 slot 4: post-softmax probabilities, (B, H, N, N)
    out     = out_quant(attn @ v)              slot 5: head outputs, (B, H, N, d)
    y       = proj(merge_heads(out))           (B, N, D)

Every slot defaults to the identity, so a fresh QuantAttention computes Attention's function (equal up to
float rounding: Attention calls scaled_dot_product_attention).
Slot modules map a tensor to its quantize-dequantized value with a straight-through gradient; for a
head-wise quantizer, give it per-head parameters of shape (1, H, 1, 1). W4A4 PTQ fills the slots
with `UniformQuantizer`s (q, k, v) and a `Log2Quantizer` (attn); Q-ViT puts its head-wise learnable
quantizers in all five. `qkv` and `proj` may be nn.Linear or QuantLinear.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from quant.cli import is_positive_int
from quant.quantizers import Log2Quantizer, quantizer_from_spec, quantizer_spec

SLOTS = ("q_quant", "k_quant", "v_quant", "attn_quant", "out_quant")


class QuantAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv: nn.Module | None = None, proj: nn.Module | None = None):
        super().__init__()
        if not (is_positive_int(dim) and is_positive_int(num_heads)):
            raise ValueError(f"dim and num_heads must be positive integers, got dim {dim!r} and "
                             f"num_heads {num_heads!r}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = qkv if qkv is not None else nn.Linear(dim, dim * 3)
        self.proj = proj if proj is not None else nn.Linear(dim, dim)
        for slot in SLOTS:
            setattr(self, slot, nn.Identity())

    @classmethod
    def from_attention(cls, attn: nn.Module) -> "QuantAttention":
        """Wrap a `quant.models.Attention` (sharing its qkv and proj modules)."""
        return cls(attn.num_heads * attn.head_dim, attn.num_heads, attn.qkv, attn.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        attn, v = self.attend(self.qkv(x))
        out = self.out_quant(self.attn_quant(attn) @ v)                # (B, H, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))

    def split_heads(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv's output (B, N, 3 D) -> q, k, v, each (B, H, N, d)."""
        B, N, _ = y.shape
        return y.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def attend(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """qkv's output (B, N, 3 D) -> the attention probabilities (B, H, N, N) of the quantized q and k,
        before `attn_quant`, and the quantized values v (B, H, N, d)."""
        q, k, v = self.split_heads(y)
        q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        return (q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim))).softmax(-1), v

    def spec(self) -> dict:
        """The slots' quantizer kinds (their calibrated values are buffers in the state dict); refused where
        `from_spec` would refuse it (a slot's ranges neither per tensor nor per head), so no file fails to load."""
        spec = {"dim": self.num_heads * self.head_dim, "num_heads": self.num_heads,
                "slots": {s: quantizer_spec(getattr(self, s)) for s in SLOTS}}
        QuantAttention.from_spec(spec, self.qkv, self.proj)
        return spec

    @classmethod
    def from_spec(cls, spec: dict, qkv: nn.Module, proj: nn.Module) -> "QuantAttention":
        m = cls(spec["dim"], spec["num_heads"], qkv, proj)
        unknown = set(spec["slots"]) - set(SLOTS)
        if unknown:
            raise ValueError(f"unknown attention quantizer slots {sorted(unknown)}")
        for slot, s in spec["slots"].items():
            shape = s.get("shape") if isinstance(s, dict) and s.get("kind") == "uniform" else []
            if shape not in ([], [1, m.num_heads, 1, 1]):
                raise ValueError(f"slot {slot}'s uniform quantizer has shape {shape!r}; an attention slot's is [] "
                                 f"(per tensor) or [1, {m.num_heads}, 1, 1] (per head)")
            setattr(m, slot, quantizer_from_spec(s))
            n = getattr(m, slot).offset.numel() if isinstance(getattr(m, slot), Log2Quantizer) else 1
            if n not in (1, m.num_heads):
                raise ValueError(f"slot {slot} has {n} log2 offsets for {m.num_heads} heads")
        return m
