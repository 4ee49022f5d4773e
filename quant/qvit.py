"""Q-ViT (Li et al. 2022): quantization-aware training with learned step sizes AND learned bit-widths.

`prepare(model, budget_bits=4)` makes a ViT's linear layers and attention fake-quantized with
`quant.lsq.LearnedQuantizer`s (candidate widths 2..8, one step size per candidate: switchable scales):
  * every nn.Linear (qkv, proj, fc1, fc2 of each block, and the classification head): its weight
    (one learned width per layer, a step size per output channel) and its input (per tensor; the
    post-GELU input of fc2 with an LSQ+ offset; proj's input is the head outputs, quantized below);
  * each attention block (`quant.qattention.QuantAttention` slots), head-wise: Q, K, V, the
    post-softmax attention probabilities and the head outputs each learn one width per head.
The patch embedding and its conv stem stay in floating point, as in every bitvit recipe (the packed
format is for linear layers); their multiply-adds are outside the BitOPs count.

BitOPs (`bitops`): sum over quantized matmuls of multiply-adds per image x weight bits x input bits,
head by head in attention (q k^T: b_q * b_k, attn @ v: b_attn * b_v, proj: b_w * b_out). The budget
of "N bits" is the BitOPs of the same model at N-bit weights and N-bit inputs everywhere; the
penalty `eta * max(0, bitops / budget - 1)**2` joins the loss (Q-ViT's eq. 13, made scale-free).

Training (`quant.qat`) runs Q-ViT's two stages: a searching stage (a fraction `search_ratio` of the
epochs; widths and weights learn together, starting from N + 1 bits and 8 bits for the head), then
`fix_bits` rounds the widths, lowers the least certain ones until the budget holds, and the model is
fine-tuned with the widths fixed. With `learn_bits=False` every width stays at N: plain LSQ+.

Departures from the paper: the projection weights (qkv, proj) learn one width per layer, not one per
head (the packed format holds one width a layer); the patch embedding stays in floating point (the paper
learns its width from 8 bits); `quant.qat`'s defaults search for half the epochs (`--search-ratio 0.5`; the
paper's 0.9) with a penalty weight of 1.0 (`--bitops-weight`; the paper's eta is 0.1), the settings the
shipped runs used on short CPU schedules.

`bit_allocation` / `save_allocation` / `plot_allocation` (`allocation_figure`) write the learned widths
(JSON) and draw them per layer and per head; `freeze` turns the model into packed `QuantLinear` layers
(int2..int8 codes, static uint input quantizers) and `UniformQuantizer`s in the attention slots, computing
the same function.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.cli import finite_number, write_json, write_png
from quant.lsq import LearnedQuantizer, levels
from quant.models import Attention, Mlp, forward_with_hooks, linear_from, refuse_meta
from quant.qattention import QuantAttention
from quant.qlinear import QuantLinear
from quant.quantizers import UniformQuantizer, widen

BIT_RANGE = (2, 8)
HEAD_SLOTS = {"q_quant": True, "k_quant": True, "v_quant": True, "attn_quant": False, "out_quant": True}  # signed?


class LSQLinear(nn.Linear):
    """nn.Linear with a learned-step-size weight quantizer (per output channel, one width for the
    layer) and, unless its input is quantized upstream, a per-tensor input quantizer."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 bits: tuple[int, int] = BIT_RANGE, init_bits: float = 4, learn_bits: bool = True,
                 input_quant: bool = True, input_signed: bool = True, input_offset: bool = False):
        super().__init__(in_features, out_features, bias)
        self.weight_quant = LearnedQuantizer(bits, signed=True, groups=out_features, dim=0,
                                             init_bits=init_bits, learn_bits=learn_bits)
        self.input_quant = LearnedQuantizer(bits, signed=input_signed, offset=input_offset, init_bits=init_bits,
                                            learn_bits=learn_bits) if input_quant else None
        self.macs = 0.0  # multiply-adds per image, set by `measure_macs`

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "LSQLinear":
        return linear_from(cls, linear, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.weight_quant(self.weight), self.bias)

    @torch.no_grad()
    def freeze(self) -> QuantLinear:
        """The packed layer: int{b} weight codes with the learned per-channel step sizes, and the
        input quantizer as a static `uint{b}_tensor` quantizer (same zero point and step)."""
        wq = self.weight_quant
        b = wq.int_bits()[0]
        s = wq.scale.view(wq.groups, -1)[:, b - wq.b_min].abs() + 1e-8          # (O,)
        qn, qp = 2 ** (b - 1), 2 ** (b - 1) - 1
        # divided in float32 at least, as the training forward divides a half model's weights
        codes = (torch.clamp(torch.round(widen(self.weight) / s[:, None]), -qn, qp) + qn).to(torch.uint8)
        act_format = "none"
        if self.input_quant is not None:
            act_format = f"uint{self.input_quant.int_bits()[0]}_tensor"
        layer = QuantLinear.from_codes(codes, s[:, None], None, self.bias, f"int{b}", act_format=act_format)
        if self.input_quant is not None:
            _to_uniform(self.input_quant, layer.act_quant)
        return layer.to(self.weight)  # the model's device and dtype


@torch.no_grad()
def _to_uniform(q: LearnedQuantizer, u: UniformQuantizer) -> None:
    """Copy a learned quantizer's selected step size, zero point and width(s) into a UniformQuantizer
    (of a shape that broadcasts like the learned quantizer's groups): the same function."""
    bits = torch.tensor(q.int_bits(), dtype=torch.float32, device=q.scale.device).expand(q.groups)
    s = q.scale.view(q.groups, -1).gather(1, (bits - q.b_min).long()[:, None])[:, 0].abs() + 1e-8
    qn, _ = levels(bits, q.signed)
    zero = qn + (torch.round(-q.offset / s) if q.offset is not None else 0)
    u.scale.copy_(s.reshape(u.scale.shape))
    u.zero.copy_(zero.reshape(u.zero.shape))
    u.bits.copy_(bits.reshape(u.bits.shape))


def _head_quantizer(heads: int, signed: bool, init_bits: float, learn_bits: bool, bits) -> LearnedQuantizer:
    return LearnedQuantizer(bits, signed=signed, groups=heads, dim=1, bit_groups=heads,
                            init_bits=init_bits, learn_bits=learn_bits)


def prepare(model: nn.Module, budget_bits: float = 4, learn_bits: bool = True,
            bits: tuple[int, int] = BIT_RANGE) -> nn.Module:
    """Make `model` (a bitvit ViT, or any model of nn.Linear layers) Q-ViT-trainable, in place.

    Widths start at budget + 1 (learned) or at the budget (LSQ+), the classification head at 8 bits; the
    budget lies within the candidate widths `bits`. Call `calibrate` on a batch, then `measure_macs`, before training.
    """
    if not bits[0] <= budget_bits <= bits[1]:  # 0 would be a budget of 0 BitOPs, one below bits[0] unmeetable
        raise ValueError(f"budget_bits must lie in the candidate widths {bits[0]}..{bits[1]}, got {budget_bits}")
    if not learn_bits and budget_bits != int(budget_bits):
        raise ValueError(f"LSQ+ (learn_bits=False) keeps every width at the budget: give whole bits, got {budget_bits}")
    head_bits = 8
    start = min(budget_bits + 1, bits[1]) if learn_bits else budget_bits
    for name, m in list(model.named_modules()):
        if isinstance(m, Attention):
            qa = QuantAttention.from_attention(m)
            for slot, signed in HEAD_SLOTS.items():
                setattr(qa, slot, _head_quantizer(m.num_heads, signed, start, learn_bits, bits))
            model.set_submodule(name, qa.to(m.qkv.weight.device))
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantAttention):
            model.set_submodule(f"{name}.qkv", LSQLinear.from_linear(m.qkv, bits=bits, init_bits=start,
                                                                     learn_bits=learn_bits))
            model.set_submodule(f"{name}.proj", LSQLinear.from_linear(m.proj, bits=bits, init_bits=start,
                                                                      learn_bits=learn_bits, input_quant=False))
        elif isinstance(m, Mlp):
            model.set_submodule(f"{name}.fc1", LSQLinear.from_linear(m.fc1, bits=bits, init_bits=start,
                                                                     learn_bits=learn_bits))
            model.set_submodule(f"{name}.fc2", LSQLinear.from_linear(  # post-GELU input: LSQ+ offset
                m.fc2, bits=bits, init_bits=start, learn_bits=learn_bits, input_signed=False, input_offset=True))
    for name, m in list(model.named_modules()):  # every other linear layer (the head, or a plain model's)
        if type(m) is nn.Linear:
            width = head_bits if name == "head" else start
            model.set_submodule(name, LSQLinear.from_linear(m, bits=bits, init_bits=min(width, bits[1]),
                                                            learn_bits=learn_bits))
    model.qvit_budget_bits = budget_bits
    return model


def quantizers(model: nn.Module) -> dict[str, LearnedQuantizer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LearnedQuantizer)}


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor) -> None:
    """Initialise every quantizer's step sizes (MSE, per candidate width) from a batch of inputs x, with
    a progress bar (the search takes minutes on a small CPU)."""
    from tqdm import tqdm
    was = model.training
    model.eval()
    qs = [m for m in model.modules() if isinstance(m, LearnedQuantizer) and not bool(m.initialized)]
    with tqdm(total=len(qs), desc="Q-ViT step sizes", unit="quantizer", leave=False) as bar:
        def done(*_) -> None:  # a forward hook's return value would replace the quantizer's output
            bar.update()

        hooks = [q.register_forward_hook(done) for q in qs]
        try:
            with LearnedQuantizer.calibrating(model):
                model(x)
        finally:
            for h in hooks:
                h.remove()
    model.train(was)
    missing = [n for n, q in quantizers(model).items() if not bool(q.initialized)]
    if missing:
        raise ValueError(f"calibration did not reach quantizers {missing[:3]}...")


@torch.no_grad()
def measure_macs(model: nn.Module, x: torch.Tensor) -> float:
    """Record each quantized layer's and attention block's multiply-adds per image from one forward pass
    of x (B, ...); returns the total."""
    hooks = []

    def linear_hook(m, inp, out):
        m.macs = inp[0].numel() / inp[0].shape[0] * m.out_features

    def attn_hook(m, inp, out):
        _, n, _ = inp[0].shape
        m.matmul_macs = 2.0 * m.num_heads * n * n * m.head_dim  # q @ k^T and attn @ v, per image

    for m in model.modules():
        if isinstance(m, LSQLinear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, QuantAttention):
            hooks.append(m.register_forward_hook(attn_hook))
    forward_with_hooks(model, x, hooks)
    return sum(getattr(m, "macs", 0.0) + getattr(m, "matmul_macs", 0.0) for m in model.modules()
               if isinstance(m, (LSQLinear, QuantAttention)))


def bitops(model: nn.Module, uniform_bits: float | None = None) -> torch.Tensor:
    """BitOPs per image of the quantized matmuls with the current (straight-through) widths, or, with
    `uniform_bits`, with every weight and input at that width (the budget)."""
    if not any(isinstance(m, LSQLinear) for m in model.modules()):  # a budget of 0 BitOPs would divide by zero
        raise ValueError("the model holds no Q-ViT layers to count BitOPs of: count them after qvit.prepare "
                         "and before qvit.freeze")
    total = torch.zeros((), device=next(model.parameters()).device)
    for m in model.modules():
        if isinstance(m, QuantAttention) and isinstance(m.q_quant, LearnedQuantizer):
            if not getattr(m, "matmul_macs", 0):
                raise ValueError("run measure_macs(model, x) before counting BitOPs")
            per_head = m.matmul_macs / 2 / m.num_heads
            proj = m.proj
            if uniform_bits is not None:
                total = total + m.matmul_macs * uniform_bits ** 2 + proj.macs * uniform_bits ** 2
                continue
            b = {s: getattr(m, s).bits() for s in HEAD_SLOTS}              # each (H,)
            total = total + per_head * (b["q_quant"] * b["k_quant"] + b["attn_quant"] * b["v_quant"]).sum()
            total = total + proj.macs / m.num_heads * (proj.weight_quant.bits() * b["out_quant"]).sum()
        elif isinstance(m, LSQLinear) and m.input_quant is not None:
            if not m.macs:
                raise ValueError("run measure_macs(model, x) before counting BitOPs")
            if uniform_bits is not None:
                total = total + m.macs * uniform_bits ** 2
            else:
                total = total + m.macs * (m.weight_quant.bits() * m.input_quant.bits()).sum()
    return total


class BitOpsPenalty:
    """Q-ViT's penalty for exceeding the BitOPs budget, `eta * max(0, bitops / budget - 1)**2`; use it as
    `quant.train.fit`'s `extra_loss`."""

    def __init__(self, model: nn.Module, budget_bits: float, eta: float = 1.0):  # quant.qat's --bitops-weight
        self.budget = float(bitops(model, uniform_bits=budget_bits))
        self.eta = eta

    def __call__(self, model: nn.Module) -> torch.Tensor:
        over = F.relu(bitops(model) / self.budget - 1)
        return self.eta * over ** 2


def fix_bits(model: nn.Module, budget_bits: float) -> None:
    """End the searching stage: round every learned width and stop learning it; then, while the BitOPs
    exceed the budget, lower by one bit the width whose float value lies closest to rounding down. Widths that
    were never learned (LSQ+, `learn_bits=False`) stay as they are."""
    qs = [q for q in quantizers(model).values() if q.b_max > q.b_min and q.learn_bits]
    soft = {id(q): q.soft_bits().detach().clone() for q in qs}
    for q in qs:
        q.freeze_bits()
    if not qs:  # nothing learned a width (LSQ+): nothing to lower
        return
    budget = float(bitops(model, uniform_bits=budget_bits))
    while float(bitops(model)) > budget * (1 + 1e-9):
        best = None
        for q in qs:
            b = torch.tensor(q.int_bits(), dtype=torch.float32, device=soft[id(q)].device)
            margin = soft[id(q)] - (b - 0.5)           # how far above the rounding threshold b~ lies
            margin[b <= q.b_min] = float("inf")
            i = int(margin.argmin())
            if best is None or margin[i] < best[0]:
                best = (float(margin[i]), q, i)
        if best is None or best[0] == float("inf"):
            raise ValueError("the BitOPs budget cannot be met even at the lowest widths")
        _, q, i = best
        b = q.int_bits()
        b[i] -= 1
        q.set_bits(b)
        soft[id(q)][i] = b[i]  # lowered: now well inside its new width


# ----------------------------------------------------------------------------- bit allocation


def bit_allocation(model: nn.Module, budget_bits: float | None = None) -> dict:
    """The widths of every quantized layer and attention head, and the BitOPs against the budget."""
    layers, attention = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, LSQLinear):
            layers[name] = {"weight": m.weight_quant.int_bits()[0],
                            "input": m.input_quant.int_bits()[0] if m.input_quant is not None else None,
                            "macs": m.macs}
        elif isinstance(m, QuantAttention) and isinstance(m.q_quant, LearnedQuantizer):
            attention[name] = {s.removesuffix("_quant"): getattr(m, s).int_bits() for s in HEAD_SLOTS}
            attention[name]["macs"] = m.matmul_macs
    budget_bits = budget_bits if budget_bits is not None else getattr(model, "qvit_budget_bits", None)
    total = float(bitops(model).detach())  # widths still learned carry a gradient
    out = {"bitops": total, "layers": layers, "attention": attention}
    if budget_bits is not None:
        budget = float(bitops(model, uniform_bits=budget_bits))
        out.update(budget_bits=budget_bits, budget_bitops=budget, bitops_ratio=total / budget)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, LSQLinear))
    out["mean_weight_bits"] = sum(m.weight.numel() * m.weight_quant.int_bits()[0] for m in model.modules()
                                  if isinstance(m, LSQLinear)) / max(weights, 1)
    return out


def save_allocation(model: nn.Module, path: str | os.PathLike, budget_bits: float | None = None) -> dict:
    alloc = bit_allocation(model, budget_bits)
    write_json(path, alloc)
    return alloc


def allocation_figure(alloc: dict, title: str = "Q-ViT bit allocation"):
    """Heat maps of the widths per head and block for Q, K, V, attention probabilities and head outputs,
    and bars of each linear layer's weight and input widths (the Q-ViT paper's figures 4 and 5). Draws
    what the dict holds (the app reads them from results files): None where it holds neither part."""
    import matplotlib.pyplot as plt
    import numpy as np
    slot_names = [s.removesuffix("_quant") for s in HEAD_SLOTS]
    attn = {n: {s: v[s] for s in slot_names if isinstance(v.get(s), list)}   # block -> slot -> bits per head
            for n, v in alloc["attention"].items() if isinstance(v, dict)}
    attn = {n: v for n, v in attn.items() if v}
    slots = [s for s in slot_names if any(s in v for v in attn.values())]
    layers = {n: v for n, v in alloc["layers"].items()
              if isinstance(v, dict) and finite_number(v.get("weight"))}
    if not slots and not layers:
        return None
    names = list(attn)
    top = max(1.5, 0.35 * len(names)) if slots else 0
    fig = plt.figure(figsize=(max(3.2 * len(slots), 8), 1 + top + (3.5 if layers else 0)))
    grid = fig.add_gridspec(bool(slots) + bool(layers), max(len(slots), 1),
                            height_ratios=[r for r in (top, 3.2 if layers else 0) if r])
    for j, slot in enumerate(slots):
        ax = fig.add_subplot(grid[0, j])
        rows = [attn[n].get(slot, []) for n in names]
        width = max(len(r) for r in rows)
        data = np.array([r + [np.nan] * (width - len(r)) for r in rows], dtype=float)   # (blocks, heads)
        ax.imshow(data, cmap="viridis", vmin=BIT_RANGE[0], vmax=BIT_RANGE[1], aspect="auto")
        for r, c in zip(*np.nonzero(np.isfinite(data))):
            ax.text(c, r, f"{data[r, c]:g}", ha="center", va="center", fontsize=8,
                    color="white" if data[r, c] < 5 else "black")
        ax.set_xticks(range(width))
        ax.set_yticks(range(len(names)), [n.replace(".attn", "") for n in names] if j == 0 else [], parse_math=False)
        ax.set_xlabel("head")
        ax.set_title({"attn": "attention probs", "out": "head outputs"}.get(slot, slot.upper()) + ": bits per head")
    if layers:
        ax = fig.add_subplot(grid[-1, :])
        x = np.arange(len(layers))
        # as floats: matplotlib turns a Python int beyond 64 bits (a damaged file's 2**63) into an OverflowError
        ax.bar(x - 0.2, [float(v["weight"]) for v in layers.values()], 0.4, label="weight")
        ax.bar(x + 0.2, [float(v["input"]) if finite_number(v.get("input")) else 0 for v in layers.values()], 0.4,
               label="input (0: head-wise, above)")
        ax.set_xticks(x, list(layers), rotation=60, ha="right", fontsize=7, parse_math=False)  # "$": no TeX
        ax.set_ylabel("bits")
        ax.set_ylim(0, BIT_RANGE[1] + 0.5)
        ax.legend(fontsize=8, loc="upper left")
    summary = []
    if finite_number(alloc.get("bitops")):
        summary.append(f"BitOPs {alloc['bitops'] / 1e6:.1f} M")
        if finite_number(alloc.get("budget_bitops")) and finite_number(alloc.get("budget_bits")):
            summary[-1] += f" / budget {alloc['budget_bitops'] / 1e6:.1f} M ({alloc['budget_bits']:g}-bit)"
    if finite_number(alloc.get("mean_weight_bits")):
        summary.append(f"mean weight bits {alloc['mean_weight_bits']:.2f}")
    fig.suptitle(f"{title}: {', '.join(summary)}" if summary else title, parse_math=False)
    fig.tight_layout()
    return fig


def plot_allocation(alloc: dict, path: str | os.PathLike, title: str = "Q-ViT bit allocation") -> None:
    """`allocation_figure` saved as an image."""
    import matplotlib
    matplotlib.use("Agg")
    fig = allocation_figure(alloc, title)
    if fig is None:
        raise ValueError("the bit allocation holds no layers or attention heads to plot")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_png(path, fig, dpi=110)


# ----------------------------------------------------------------------------- freezing


def freeze(model: nn.Module) -> nn.Module:
    """Replace LSQLinear layers by packed QuantLinear layers and learned attention quantizers by
    `UniformQuantizer`s of the same widths, step sizes and zero points (in place)."""
    refuse_meta(model, "freezing it")
    if missing := [n for n, q in quantizers(model).items() if not bool(q.initialized)]:  # step sizes still 1.0
        raise ValueError(f"quantizer {missing[0]} was never calibrated: run qvit.calibrate(model, x) on a batch of "
                         f"inputs before training and freezing")
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantAttention):
            for slot in HEAD_SLOTS:
                q = getattr(m, slot)
                if isinstance(q, LearnedQuantizer):
                    u = UniformQuantizer(shape=(1, m.num_heads, 1, 1)).to(q.scale.device)
                    _to_uniform(q, u)
                    setattr(m, slot, u)
    for name in [n for n, m in model.named_modules() if isinstance(m, LSQLinear)]:
        model.set_submodule(name, model.get_submodule(name).freeze())
    return model
