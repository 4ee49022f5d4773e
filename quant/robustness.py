"""Where do the bits matter? `python -m quant.robustness --checkpoint FP --data DATA --out JSON`.

Q-ViT's robustness analysis (Li et al. 2022, section 3.2): quantize ONE component of a full-precision
ViT at a time to b bits (2, 3, 4), keep everything else in floating point, and measure the top-1 drop
(and the KL divergence of the logits from the FP model's) on the val split. Components:
  weights     each block's qkv, proj, fc1 and fc2 weight: round to nearest, symmetric, one scale per
              output channel (`quant.quantizers.fake_quant_uniform`)
  activation  each block's post-GELU activation (fc2's input): unsigned with a zero point
  heads       each attention head's Q, K, V (signed) and its post-softmax attention scores (unsigned),
              through the `quant.qattention.QuantAttention` slots
Activation quantizers are `quant.lsq.LearnedQuantizer`s whose step sizes (and zero points) minimise the
quantization MSE on a calibration batch of training images (no training). Each trial reruns only the
blocks from the quantized one onwards, from cached block inputs. Writes the JSON and a figure: drop per
block for each weight and the post-GELU activation, and a heat map per slot of the drop per head.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.cli import HelpFormatter, output_file, positive_int, provenance, run, thread_count, write_json, write_png
from quant.lsq import LearnedQuantizer
from quant.models import Attention, VisionTransformer, forward_with_hooks
from quant.qattention import QuantAttention
from quant.quantizers import fake_quant_uniform

WEIGHTS = ("qkv", "proj", "fc1", "fc2")
HEAD_SLOTS = {"q": True, "k": True, "v": True, "attn": False}        # slot -> signed


class HeadQuant(nn.Module):
    """Quantize one head `h` of a (B, H, N, ·) tensor; the other heads pass through unchanged."""

    def __init__(self, head: int, quantizer: LearnedQuantizer):
        super().__init__()
        self.head, self.quantizer = head, quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head
        return torch.cat([x[:, :h], self.quantizer(x[:, h:h + 1]), x[:, h + 1:]], dim=1)


def calibrated(x: torch.Tensor, bits: int, signed: bool, offset: bool) -> LearnedQuantizer:
    q = LearnedQuantizer(bits, signed=signed, offset=offset)
    q.init_scales(x)
    return q.eval()


def _wrap_attention(model: VisionTransformer) -> None:
    for i, block in enumerate(model.blocks):
        if isinstance(block.attn, Attention):
            block.attn = QuantAttention.from_attention(block.attn)


@torch.no_grad()
def _activations(model: VisionTransformer, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per block: the inputs of the q, k, v, attn slots (B, H, N, ·) and of fc2 (post-GELU) for batch x."""
    acts = [dict() for _ in model.blocks]
    hooks = []
    for i, block in enumerate(model.blocks):
        for slot in HEAD_SLOTS:
            hooks.append(getattr(block.attn, f"{slot}_quant").register_forward_hook(
                lambda m, inp, out, i=i, slot=slot: acts[i].__setitem__(slot, inp[0])))
        hooks.append(block.mlp.fc2.register_forward_pre_hook(
            lambda m, inp, i=i: acts[i].__setitem__("gelu", inp[0])))
    forward_with_hooks(model, x, hooks)
    return acts


@torch.no_grad()
def _block_inputs(model: VisionTransformer, x: torch.Tensor) -> list[torch.Tensor]:
    """The token tensor (B, N, D) entering each block."""
    inputs = []
    forward_with_hooks(model, x, [b.register_forward_pre_hook(lambda m, inp: inputs.append(inp[0]))
                                  for b in model.blocks])
    return inputs


@torch.no_grad()
def _logits_from(model: VisionTransformer, block: int, tokens: torch.Tensor) -> torch.Tensor:
    x = tokens
    for b in model.blocks[block:]:
        x = b(x)
    return model.head(model.norm(x)[:, 0])


@contextlib.contextmanager
def _swapped(module: nn.Module, name: str, new):
    """Temporarily set `module.name` (a submodule or a parameter's data) to `new`."""
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        saved = old.data
        old.data = new
        try:
            yield
        finally:
            old.data = saved
    else:
        setattr(module, name, new)
        try:
            yield
        finally:
            setattr(module, name, old)


@contextlib.contextmanager
def _pre_quant(layer: nn.Module, quantizer: nn.Module):
    """Quantize `layer`'s input with `quantizer` while inside the block."""
    h = layer.register_forward_pre_hook(lambda m, inp: (quantizer(inp[0]),))
    try:
        yield
    finally:
        h.remove()


def _trials(model: VisionTransformer, acts, bits: int):
    """(component kind, block, head or None, context manager quantizing that component)."""
    for i, block in enumerate(model.blocks):
        for name in WEIGHTS:
            layer = block.attn.qkv if name == "qkv" else block.attn.proj if name == "proj" \
                else getattr(block.mlp, name)
            w = fake_quant_uniform(layer.weight.detach(), bits)
            yield f"w_{name}", i, None, _swapped(layer, "weight", w)
        yield "a_gelu", i, None, _pre_quant(block.mlp.fc2, calibrated(acts[i]["gelu"], bits, False, True))
        for slot, signed in HEAD_SLOTS.items():
            x = acts[i][slot]
            for h in range(block.attn.num_heads):
                q = calibrated(x[:, h:h + 1], bits, signed, False)
                yield f"h_{slot}", i, h, _swapped(block.attn, f"{slot}_quant", HeadQuant(h, q))


@torch.no_grad()
def analyse(model: VisionTransformer, images: torch.Tensor, labels: torch.Tensor, calib: torch.Tensor,
            bits=(2, 3, 4), progress: bool = True) -> dict:
    """Top-1 drop (points) and logit KL from the FP model for every single-component quantization.

    images (N, 3, H, W) normalised eval inputs with labels (N,); calib (M, 3, H, W) training inputs.
    Returns {"fp_top1", "n", "trials": [{"bits", "component", "block", "head", "top1", "drop", "kl"}]}.
    """
    from tqdm import tqdm
    batch_size = 250  # evaluation images per forward pass
    model.eval()
    _wrap_attention(model)
    chunks = [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    # the FP model's passes over the calibration batch and every chunk: minutes for ViT-B, before any trial
    bar = tqdm(total=1 + len(chunks), desc="FP model", unit="batch", disable=not progress, leave=False)
    acts = _activations(model, calib)
    bar.update()
    cached, fp_logits = [], []                                           # [chunk][block] (b, N, D), [chunk] (b, K)
    for x, _ in chunks:
        cached.append(_block_inputs(model, x))
        fp_logits.append(_logits_from(model, 0, cached[-1][0]))
        bar.update()
    bar.close()
    bad = sum(int((~lg.isfinite().all(1)).sum()) for lg in fp_logits)
    if bad:  # every trial's drop and KL would be measured against NaN
        raise ValueError(f"the model gives NaN or infinite logits for {bad} of {len(images)} images (a damaged model?)")
    fp_top1 = sum(int((l.argmax(1) == y).sum()) for l, (_, y) in zip(fp_logits, chunks)) / len(images)
    per_bits = 5 * len(model.blocks) + len(HEAD_SLOTS) * sum(b.attn.num_heads for b in model.blocks)
    bar = tqdm(total=per_bits * len(bits), desc="robustness", unit="trial", disable=not progress)
    trials = []
    for b in bits:
        for kind, block, head, ctx in _trials(model, acts, b):
            correct, kl = 0, 0.0
            with ctx:
                for c, fp, (_, y) in zip(cached, fp_logits, chunks):
                    logits = _logits_from(model, block, c[block])
                    correct += int((logits.argmax(1) == y).sum())
                    kl += float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(fp, -1), log_target=True,
                                         reduction="sum"))
            top1 = correct / len(images)
            trials.append({"bits": b, "component": kind, "block": block, "head": head, "top1": top1,
                           "drop": 100 * (fp_top1 - top1), "kl": kl / len(images)})
            bar.update()
    bar.close()
    return {"fp_top1": fp_top1, "n": len(images), "trials": trials}


def plot(result: dict, path: str | Path) -> None:
    """Write `figure(result)` to `path` (PNG)."""
    fig = figure(result)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_png(path, fig, dpi=100)


def figure(result: dict):
    """Row 1: per bit-width, the top-1 drop and the logit KL per block for each weight and the post-GELU
    activation. Rows 2-3: per slot (Q, K, V, attention scores), block x head heat maps of the KL and of
    the top-1 drop at the lowest bit-width (the Q-ViT paper's figure 2, made per head), the drop red, a gain (a
    negative drop) blue and no change white.
    On a few hundred images the drop moves in steps of 100 / n points; the KL resolves far smaller effects (its
    cells are written to two significant digits in the panel's power of ten, named by its colour bar: with 0.0052
    nats the largest, "1e-3 nats", 0.0052 reads 5.2 and 0.0004 0.4)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    trials = result["trials"]
    bits = sorted({t["bits"] for t in trials})
    blocks = sorted({t["block"] for t in trials})
    heads = sorted({t["head"] for t in trials if t.get("head") is not None})  # (a results file may leave it out)
    ncol = max(2 * len(bits), len(HEAD_SLOTS))
    fig, axes = plt.subplots(3, ncol, figsize=(4 * ncol, 11), squeeze=False)
    comps = [f"w_{w}" for w in WEIGHTS] + ["a_gelu"]
    for j in range(2 * len(bits), ncol):
        axes[0, j].axis("off")
    for i, b in enumerate(bits):
        for ax, metric in zip(axes[0, 2 * i:2 * i + 2], ("drop", "kl")):
            width = 0.8 / len(comps)
            for k, comp in enumerate(comps):
                d = {t["block"]: t[metric] for t in trials if t["bits"] == b and t["component"] == comp}
                # as floats: matplotlib and numpy take no Python int beyond 64 bits (a damaged file's 2**63)
                ax.bar(np.array(blocks, float) + (k - len(comps) / 2 + 0.5) * width,
                       [float(d.get(x, 0)) for x in blocks], width,
                       label=comp.replace("w_", "weight ").replace("a_gelu", "post-GELU act"))
            ax.set_title(f"{b}-bit, one component at a time")
            ax.set_xlabel("block")
            ax.set_ylabel("top-1 drop (points)" if metric == "drop" else "logit KL from FP (nats)")
            ax.set_xticks(np.array(blocks, float), [str(x) for x in blocks])
            if metric == "kl" and any(t["kl"] > 0 for t in trials if t["bits"] == b and t["component"] in comps):
                ax.set_yscale("log")
            if i == 0 and metric == "drop":
                ax.legend(fontsize=7)
    low = bits[0]
    for row, metric in ((1, "kl"), (2, "drop")):
        for j in range(ncol):
            ax = axes[row, j]
            if j >= len(HEAD_SLOTS) or not heads:  # (an analysis of weights alone has no heat maps)
                ax.axis("off")
                continue
            slot = list(HEAD_SLOTS)[j]
            grid = np.zeros((len(blocks), len(heads)))
            for t in trials:
                if t["bits"] == low and t["component"] == f"h_{slot}" and t.get("head") is not None:
                    grid[blocks.index(t["block"]), heads.index(t["head"])] = t[metric]
            unit = "points"
            if metric == "kl":  # 0 up; a panel's largest below 0.1 nats: in its power of ten (0.0052 reads 5.2)
                e = int(np.floor(np.log10(grid.max()))) if 0 < grid.max() < 0.1 else 0
                grid, unit = grid / 10.0 ** e, f"1e{e} nats" if e else "nats"
                im = ax.imshow(grid, cmap="magma_r", vmin=0, vmax=max(grid.max(), 1e-6), aspect="auto")
                dark = lambda v: im.norm(v) > 0.6  # noqa: E731
            else:  # a drop or a gain (below 0): red or blue, no change white
                m = max(np.abs(grid).max(), 1e-6)
                im = ax.imshow(grid, cmap="RdBu_r", vmin=-m, vmax=m, aspect="auto")
                dark = lambda v: abs(im.norm(v) - 0.5) > 0.3  # noqa: E731
            for r in range(grid.shape[0]):
                for c in range(grid.shape[1]):
                    ax.text(c, r, f"{grid[r, c]:.2g}" if metric == "kl" else f"{grid[r, c]:.1f}", ha="center",
                            va="center", fontsize=7, color="white" if dark(grid[r, c]) else "black")
            ax.set_xticks(range(len(heads)))
            ax.set_yticks(range(len(blocks)))
            ax.set_xlabel("head")
            ax.set_ylabel("block")
            name = {"attn": "attention scores"}.get(slot, slot.upper())
            ax.set_title(f"{name}, {low}-bit: " + ("logit KL" if metric == "kl" else "top-1 drop") + " per head")
            fig.colorbar(im, ax=ax, fraction=0.046).set_label(unit)
    fig.suptitle(f"Quantizing one component at a time (FP top-1 {result['fp_top1']:.4f}, "
                 f"{result['n']} {result.get('split', '')} images)", parse_math=False)
    fig.tight_layout()
    return fig


def summary(result: dict) -> list[str]:
    """Mean drop per component kind and bit-width, and the most sensitive single components."""
    lines = []
    kinds = sorted({t["component"] for t in result["trials"]})
    for b in sorted({t["bits"] for t in result["trials"]}):
        means = []
        for k in kinds:
            d = [t["drop"] for t in result["trials"] if t["bits"] == b and t["component"] == k]
            means.append(f"{k} {sum(d) / len(d):+.2f}")
        lines.append(f"{b}-bit mean drop (points): " + ", ".join(means))
    worst = sorted(result["trials"], key=lambda t: -t["kl"])[:5]
    def where(t):
        return f"block {t['block']}" + ("" if t["head"] is None else f" head {t['head']}")
    lines.append("largest logit KL from the FP model: " + ", ".join(
        f"{t['component']} {where(t)} {t['bits']}-bit (KL {t['kl']:.3f}, {t['drop']:+.1f} pts)" for t in worst))
    return lines


def main(argv=None):
    from quant.data import load_split, to_model_input
    from quant.models import load_model
    p = argparse.ArgumentParser(prog="python -m quant.robustness", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="full-precision bitvit model (.safetensors)")
    p.add_argument("--data", required=True, help="CIFAR-10 .tar.gz, its folder, cifar-10-batches-py or an image tree")
    p.add_argument("--out", required=True, help="results JSON to write; the plot goes next to it (.png)")
    p.add_argument("--split", default="val", help="split to score on (default val; keep test for final numbers)")
    p.add_argument("--limit", type=positive_int, default=1000, help="images scored per trial (balanced over classes)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4], help="bit widths each layer is tried at, 2..8")
    p.add_argument("--calib-size", type=positive_int, default=128, help="training images that set activation ranges")
    p.add_argument("--threads", type=thread_count, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(not 2 <= b <= 8 for b in args.bits):
        raise ValueError(f"--bits must lie in 2..8, got {args.bits}")
    args.bits = list(dict.fromkeys(args.bits))  # a width given twice is analysed once
    out = output_file(args.out, ".json")
    output_file(out.with_suffix(".png"), ".png")  # the plot's path too, before minutes of trials
    model = load_model(args.checkpoint)
    cfg = model.config
    data = load_split(args.data, args.split, cfg.img_size, limit=args.limit, check=lambda s: s.scored_by(cfg))
    calib = load_split(args.data, "train", cfg.img_size, limit=args.calib_size)
    t0 = time.perf_counter()
    result = analyse(model, to_model_input(data.images, cfg.mean, cfg.std), torch.from_numpy(data.labels),
                     to_model_input(calib.images, cfg.mean, cfg.std), tuple(args.bits))
    result.update(checkpoint=str(args.checkpoint), split=args.split, bits=args.bits, calib_size=len(calib),
                  **provenance("quant.robustness", argv), wall_time_s=round(time.perf_counter() - t0, 1))
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print("\n".join(summary(result)))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    raise SystemExit(run(main))
