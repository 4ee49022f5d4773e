"""Batched training augmentation that runs on whatever device the batch is on (GPU when there is one).

`Augment` takes a (B, H, W, 3) uint8 batch and returns (B, 3, H, W) normalised floats and soft
targets: random crop with reflect padding, horizontal flip, a TrivialAugment-style policy (one
randomly chosen op with a random magnitude per image), then mixup or cutmix on the batch and label
smoothing. Every op is vectorised over the batch: no per-image Python loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quant.cli import finite_number
from quant.data import normalize

MIX_ALPHAS = "0 (off) or in [0.01, 1e+38]"


def sound_mix_alpha(alpha) -> bool:
    """Whether `alpha` is a mixup or cutmix alpha torch's float32 Beta draws soundly from: 0 (off), or 0.01 to
    1e38 (a smaller alpha's gamma draws underflow and mix at 0.5, the opposite of its near-0-or-1 mixes, or 1e-300
    fails; a larger one overflows and draws 0)."""
    return finite_number(alpha) and (alpha == 0 or 0.01 <= alpha <= 1e38)


@dataclass
class AugmentConfig:
    crop_padding: int = 4
    flip: bool = True
    trivial_augment: bool = True
    mixup_alpha: float = 0.8      # 0 disables mixup
    cutmix_alpha: float = 1.0     # 0 disables cutmix
    mix_prob: float = 1.0         # chance a batch is mixed at all
    label_smoothing: float = 0.1

    def __post_init__(self):
        """Refuse settings that would fail at the first batch or train on garbage without a word, naming the field
        (crop_padding is checked against the images, in `Augment`)."""
        for name in ("mixup_alpha", "cutmix_alpha"):
            if not sound_mix_alpha(getattr(self, name)):
                raise ValueError(f"AugmentConfig {name} must be a number, {MIX_ALPHAS}, got {getattr(self, name)!r}")
        for name in ("mix_prob", "label_smoothing"):  # a label smoothing over 1 gives negative targets
            if not (finite_number(getattr(self, name)) and 0 <= getattr(self, name) <= 1):
                raise ValueError(f"AugmentConfig {name} must be a number in [0, 1], got {getattr(self, name)!r}")


# TrivialAugment-wide ops. Colour ops act on [0, 1] images; geometric ops build affine matrices.
_COLOR_OPS = ("identity", "brightness", "color", "contrast", "sharpness",
              "posterize", "solarize", "autocontrast", "equalize")
_GEOM_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_OPS = _COLOR_OPS + _GEOM_OPS


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance blend: b + factor * (a - b), clamped to [0, 1]; factor is (B,)."""
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp_(0, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # (B, 1, H, W)


def _random_sign(m: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.rand_like(m) < 0.5, -1.0, 1.0).to(m.dtype)


def _color_op(name: str, x: torch.Tensor, m: torch.Tensor, sign: torch.Tensor | None = None) -> torch.Tensor:
    """Apply one colour op to all of x (B, 3, H, W) in [0, 1]; m (B,) is the magnitude in [0, 1], sign
    (B,) of +-1 its direction (drawn when not given)."""
    sign = _random_sign(m) if sign is None else sign
    factor = 1 + sign * 0.99 * m  # enhance factor in [0.01, 1.99]
    if name == "identity":
        return x
    if name == "brightness":
        return _blend(x, torch.zeros_like(x), factor)
    if name == "color":
        return _blend(x, _gray(x).expand_as(x), factor)
    if name == "contrast":
        return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), factor)
    if name == "sharpness":
        kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype, device=x.device) / 13
        blurred = F.conv2d(x, kernel.expand(3, 1, 3, 3), padding=1, groups=3)  # border unused
        inner = torch.zeros_like(x[:1, :1], dtype=torch.bool)
        inner[..., 1:-1, 1:-1] = True  # PIL's smoothed image keeps the border: sharpness leaves it as it is
        return _blend(x, torch.where(inner, blurred, x), factor)
    if name == "posterize":
        bits = (8 - (m * 6).round()).view(-1, 1, 1, 1)  # keep 2..8 bits
        step = 2 ** (8 - bits)
        return torch.floor(x * 255 / step) * step / 255
    if name == "solarize":
        threshold = (1 - m).view(-1, 1, 1, 1)
        return torch.where(x >= threshold, 1 - x, x)
    if name == "autocontrast":
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)
    if name == "equalize":
        return _equalize(x)
    raise ValueError(name)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize on each channel of x (B, 3, H, W), whose values are multiples of 1/255: a
    channel's levels go through its histogram's cumulative sum, spread over 0..255 in steps of (pixels less
    the top level's count) // 255; a channel with one level, or too few pixels for a step, stays as it is."""
    B, C, H, W = x.shape
    levels = (x * 255).round().long().flatten(2)                          # (B, C, H*W)
    hist = torch.zeros(B, C, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(2, levels, torch.ones_like(levels))                 # (B, C, 256)
    top = 255 - (hist > 0).flip(2).long().argmax(2, keepdim=True)         # highest level present, (B, C, 1)
    step = (H * W - hist.gather(2, top)) // 255
    below = hist.cumsum(2) - hist                                         # pixels under each level
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp_(max=255)      # PIL clips its table to 8 bits
    out = (lut.gather(2, levels).to(x.dtype) / 255).view_as(x)
    return torch.where((step > 0).view(B, C, 1, 1), out, x)


def _affine(op: torch.Tensor, m: torch.Tensor, sign: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 2, 3) affine matrices (normalised coordinates) for per-image geometric op indices (the
    identity for the others)."""
    B = op.shape[0]
    sign = _random_sign(m) if sign is None else sign
    theta = torch.zeros(B, 2, 3, device=m.device, dtype=m.dtype)
    angle = sign * m * math.radians(135) * (op == _OPS.index("rotate"))
    theta[:, 0, 0] = torch.cos(angle)
    theta[:, 0, 1] = -torch.sin(angle)
    theta[:, 1, 0] = torch.sin(angle)
    theta[:, 1, 1] = torch.cos(angle)
    theta[:, 0, 1] += sign * m * 0.99 * (op == _OPS.index("shear_x"))
    theta[:, 1, 0] += sign * m * 0.99 * (op == _OPS.index("shear_y"))
    # Shift by up to 30 % of the image (normalised coordinates span 2).
    theta[:, 0, 2] = sign * m * 0.6 * (op == _OPS.index("translate_x"))
    theta[:, 1, 2] = sign * m * 0.6 * (op == _OPS.index("translate_y"))
    return theta


def _trivial_augment_dense(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """`trivial_augment` without a host sync: every op runs on the whole batch and each image keeps
    its own op's result (boolean indexing and `.any()` wait for the GPU, some 25 times a batch, which
    leaves it idle while the host queues the next ops; these ops cost it next to nothing)."""
    sel = op.view(-1, 1, 1, 1)
    out = x
    for i, name in enumerate(_COLOR_OPS[1:], start=1):
        out = torch.where(sel == i, _color_op(name, x, m, sign), out)
    grid = F.affine_grid(_affine(op, m, sign), list(x.shape), align_corners=False)
    moved = F.grid_sample(x - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5
    return torch.where(sel >= len(_COLOR_OPS), moved, out)


def trivial_augment(x: torch.Tensor, dense: bool | None = None) -> torch.Tensor:
    """One random op of random strength per image; x is (B, 3, H, W) in [0, 1], of any floating dtype (the
    result keeps it). `dense` (default: on CUDA) computes every op for every image and selects, with no host
    sync; the CPU default computes each op on its images only, drawing their directions op by op (so one
    seed augments otherwise than `dense` does)."""
    if not x.is_floating_point():
        raise ValueError(f"trivial_augment takes floating-point images in [0, 1], got {x.dtype} (divide by 255)")
    B = x.shape[0]
    op = torch.randint(len(_OPS), (B,), device=x.device)
    m = torch.rand(B, device=x.device, dtype=x.dtype)
    if x.is_cuda if dense is None else dense:
        return _trivial_augment_dense(x, op, m, _random_sign(m))
    out = x.clone()
    for i, name in enumerate(_COLOR_OPS[1:], start=1):
        sel = op == i
        if sel.any():
            out[sel] = _color_op(name, x[sel], m[sel])
    geom = op >= len(_COLOR_OPS)
    if geom.any():
        grid = F.affine_grid(_affine(op[geom], m[geom]), list(x[geom].shape), align_corners=False)
        # Fill exposed corners with mid-grey (0.5) as torchvision's fill=128 does.
        out[geom] = F.grid_sample(x[geom] - 0.5, grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=False) + 0.5
    return out


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool) -> torch.Tensor:
    """Random crops shifted up to `padding` pixels (reflect padding) and horizontal flips; x (B, C, H, W)."""
    B, C, H, W = x.shape
    if padding:
        padded = F.pad(x, (padding,) * 4, mode="reflect").permute(0, 2, 3, 1)  # (B, H+2p, W+2p, C)
        rows = torch.randint(0, 2 * padding + 1, (B, 1), device=x.device) + torch.arange(H, device=x.device)
        cols = torch.randint(0, 2 * padding + 1, (B, 1), device=x.device) + torch.arange(W, device=x.device)
        batch = torch.arange(B, device=x.device).view(B, 1, 1)
        x = padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, C, H, W)
    if flip:
        x = torch.where(torch.rand(B, 1, 1, 1, device=x.device) < 0.5, x.flip(-1), x)
    return x


def mix(x: torch.Tensor, target: torch.Tensor, cfg: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix (chosen per batch) of images x (B, 3, H, W) and soft targets (B, K)."""
    use = [a for a in (cfg.mixup_alpha, cfg.cutmix_alpha) if a > 0]
    if not use or torch.rand(()) >= cfg.mix_prob:
        return x, target
    perm = torch.randperm(x.shape[0], device=x.device)
    if cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or torch.rand(()) < 0.5):
        lam = float(torch.distributions.Beta(cfg.cutmix_alpha, cfg.cutmix_alpha).sample())
        H, W = x.shape[-2:]
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(H, ())), int(torch.randint(W, ()))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        lam = float(torch.distributions.Beta(cfg.mixup_alpha, cfg.mixup_alpha).sample())
        x = lam * x + (1 - lam) * x[perm]
    return x, lam * target + (1 - lam) * target[perm]


class Augment:
    """uint8 (B, H, W, 3) images + int labels -> normalised (B, 3, H, W) floats + soft targets (B, K)."""

    def __init__(self, cfg: AugmentConfig, num_classes: int, mean, std):
        self.cfg, self.num_classes = cfg, num_classes
        self.mean, self.std = mean, std

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # floats (already in [0, 1]) would be divided by 255 again, one channel broadcast to three
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected (B, H, W, 3) uint8 images, got {tuple(images.shape)} {images.dtype}")
        pad, size = self.cfg.crop_padding, min(images.shape[1:3])
        if not 0 <= pad < size:  # reflect padding needs a border narrower than the image
            raise ValueError(f"crop_padding must be at least 0 and less than the image size ({size}), got {pad}")
        x = images.permute(0, 3, 1, 2).float().div_(255)   # (B, 3, H, W) in [0, 1]
        x = random_crop_flip(x, self.cfg.crop_padding, self.cfg.flip)
        if self.cfg.trivial_augment:
            x = trivial_augment(x)
        s = self.cfg.label_smoothing
        target = F.one_hot(labels, self.num_classes).float() * (1 - s) + s / self.num_classes
        x, target = mix(x, target, self.cfg)
        return normalize(x, self.mean, self.std), target
