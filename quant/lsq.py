"""Learned-step-size fake quantization for QAT: LSQ+, and Q-ViT's learnable bit-width with switchable scales.

`LearnedQuantizer` maps a tensor x to

    x_hat = s_b * clamp(round((x - beta) / s_b), -Qn(b), Qp(b)) + beta

with a learnable step size s (LSQ, Esser et al. 2019; its gradient scaled by 1 / sqrt(numel * Qp), where
numel counts the batch too, not the paper's features per sample: AdamW divides a constant factor out of
a parameter's steps, so it only sets the step sizes' share of the clipped gradient norm),
an optional learnable offset beta (LSQ+, Bhalgat et al. 2020: for activations such as post-GELU
that are not centred on zero; snapped to a whole number of steps, beta = -zero * s, so a trained
quantizer is exactly an integer zero-point quantizer, `quant.quantizers.UniformQuantizer`), and integer
levels Qn(b) = 2**(b-1), Qp(b) = 2**(b-1) - 1 when signed, Qn = 0, Qp = 2**b - 1 when unsigned.

The bit-width b is fixed (LSQ+) or learned (Q-ViT, Li et al. 2022): a float b~ per bit group,
b = round(clamp(b~, b_min, b_max)) with a straight-through round, so the loss reaches b~ through
the clipping levels Qn(b), Qp(b) and through the BitOPs penalty (`quant.qvit`). With several
candidate bit-widths each has its own step size ("switchable scales": one s per candidate b, only
the selected one is used and trained), so a change of b does not throw the step size off by 2x.

Groups: `groups` independent (s, beta) along tensor dimension `dim` (a weight's output channels,
attention heads); bit-widths are shared by all groups (`bit_groups=1`, one code width per layer) or
one per group (`bit_groups=groups`, head-wise). Step sizes are initialised per group and per
candidate bit-width by minimising the quantization MSE on the first tensor seen after
`LearnedQuantizer.calibrating(model)` (a weight, or a calibration batch of activations).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from quant.quantizers import ste, widen


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient backward (straight-through estimator)."""
    return (x.round() - x).detach() + x


def scale_grad(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """x forward, gradient multiplied by `factor` backward."""
    y = x * factor
    return x.detach() + (y - y.detach())   # exactly x in the forward pass


def levels(bits: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(Qn, Qp): the number of negative and positive integer levels of `bits`-wide codes."""
    if signed:
        return 2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1
    return torch.zeros_like(bits), 2.0 ** bits - 1


class LearnedQuantizer(nn.Module):
    """Fake-quantize with learned step size(s), optional learned offset and optional learned bit-width.

    bits: one int (fixed width) or a (b_min, b_max) pair of candidate widths; `init_bits` is where a
    learned width starts. `learn_bits` makes b~ trainable; `freeze_bits()` fixes it for good.
    """

    bit_lr_scale = 100.0  # b~ = bit_lr_scale * bit_param (see __init__)

    def __init__(self, bits: int | tuple[int, int], signed: bool = True, offset: bool = False,
                 groups: int = 1, dim: int = 0, bit_groups: int = 1, init_bits: float | None = None,
                 learn_bits: bool = False):
        super().__init__()
        b_min, b_max = (bits, bits) if isinstance(bits, int) else bits
        if not 1 <= b_min <= b_max <= 8:
            raise ValueError(f"bit-widths must lie in 1..8, got {bits}")
        if bit_groups not in (1, groups):
            raise ValueError(f"bit_groups must be 1 or groups ({groups}), got {bit_groups}")
        if b_min == 1 and signed:
            raise ValueError("a signed 1-bit uniform quantizer has no positive level; use the binary quantizer")
        self.b_min, self.b_max = b_min, b_max
        self.signed, self.groups, self.dim, self.bit_groups = signed, groups, dim, bit_groups
        nb = b_max - b_min + 1
        # Flat 1-D parameters: the optimizer's "no weight decay for 1-D tensors" rule then covers them.
        self.scale = nn.Parameter(torch.ones(groups * nb))             # viewed as (groups, nb)
        self.offset = nn.Parameter(torch.zeros(groups)) if offset else None
        start = float(init_bits if init_bits is not None else b_max)
        # b~ = bit_lr_scale * bit_param: Adam moves bit_param by ~lr a step, so the width moves by
        # ~lr * bit_lr_scale (1e-4 * 100 = 0.01 bit a step) without a separate optimizer group.
        self.bit_param = nn.Parameter(torch.full((bit_groups,), start / self.bit_lr_scale),
                                      requires_grad=learn_bits and nb > 1)
        self.register_buffer("initialized", torch.tensor(False))
        # the step sizes as the last training forward left them, and which of them it used (all, before one)
        # (saved with the rest, so that a resumed run goes on exactly as an uninterrupted one)
        self.register_buffer("held", torch.ones(groups * nb))
        self.register_buffer("used", torch.ones(groups * nb, dtype=torch.bool))
        self._calibrating = False
        self._ready = False  # `initialized` once seen True (read once: on a GPU each read waits for the device)

    # ------------------------------------------------------------------ bit-width
    @property
    def learn_bits(self) -> bool:
        return self.bit_param.requires_grad

    def soft_bits(self) -> torch.Tensor:
        """The float bit-width b~ clamped to the candidate range, (bit_groups,).

        The clamp is straight-through (a width pushed past 8 still feels the BitOPs penalty), and the
        gradient reaching `bit_param` is dL/db~ / bit_lr_scale: Adam ignores a gradient's size, and a
        small one keeps the widths out of the global gradient-norm clipping of the weights.
        """
        b = scale_grad(self.bit_param, 1.0 / self.bit_lr_scale ** 2) * self.bit_lr_scale
        return b + (b.clamp(self.b_min, self.b_max) - b).detach()

    def bits(self) -> torch.Tensor:
        """Integer bit-widths b (as floats, straight-through to b~), (bit_groups,)."""
        return round_ste(self.soft_bits())

    def int_bits(self) -> list[int]:
        return [int(b) for b in self.bits().detach().round().tolist()]

    def set_bits(self, bits: list[int] | int) -> None:
        """Fix the bit-width(s) to integers (in the candidate range)."""
        b = torch.as_tensor(bits, dtype=torch.float32, device=self.bit_param.device).expand(self.bit_groups).clone()
        if (b < self.b_min).any() or (b > self.b_max).any():
            raise ValueError(f"bit-widths {b.tolist()} outside {self.b_min}..{self.b_max}")
        with torch.no_grad():
            self.bit_param.copy_(b / self.bit_lr_scale)

    def freeze_bits(self) -> None:
        """Round the learned widths and stop learning them (Q-ViT's end of the searching stage)."""
        self.set_bits(self.int_bits())
        self.bit_param.requires_grad_(False)

    # ------------------------------------------------------------------ forward
    def _per_group(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A (groups,) tensor shaped to broadcast along `self.dim` of x."""
        if self.groups == 1:
            return t.reshape(())
        shape = [1] * x.ndim
        shape[self.dim] = self.groups
        return t.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups > 1 and x.shape[self.dim] != self.groups:
            raise ValueError(f"quantizer has {self.groups} groups along dim {self.dim}, "
                             f"tensor has shape {tuple(x.shape)}")
        if self._calibrating and not bool(self.initialized):
            self.init_scales(x.detach())
        if not self._ready:
            if not bool(self.initialized):  # its step sizes would be 1.0: outputs of whole numbers, silently
                raise RuntimeError("a learned quantizer was run before calibration: run quant.qvit.calibrate(model, "
                                   "x) on a batch of inputs first")
            self._ready = True
        dtype, x = x.dtype, widen(x)  # the arithmetic below in float32 also for half inputs (autocast)
        bits = self.bits()                                                  # (bit_groups,)
        bits = bits.expand(self.groups)                                     # (groups,)
        idx = (bits.detach() - self.b_min).long()
        if self.training and not self._calibrating and self.scale.numel() > self.groups:
            self._hold_unselected(idx)
        s = self.scale.view(self.groups, -1).gather(1, idx[:, None])[:, 0]  # each group's step at its width
        qn, qp = levels(bits, self.signed)
        n_per_group = x.numel() / self.groups
        g = 1.0 / torch.sqrt(n_per_group * qp.detach().clamp(min=1))        # LSQ gradient scale
        s = self._per_group(scale_grad(s, g), x).abs() + 1e-8
        qn, qp = self._per_group(qn, x), self._per_group(qp, x)
        # rounded before the zero point is added, as the frozen quantizer does (x/s + zero can round to a .5
        # tie in float32 that round(x/s) + zero does not)
        v = x / s
        z = round_ste(v)
        if self.offset is not None:  # beta = -zero * s with an integer zero point, so a frozen quantizer is exact
            zero = round_ste(-self._per_group(scale_grad(self.offset, g), x) / s)
            z, v = z + zero, v + zero
        # clipped where the unrounded v lies outside [-Qn, Qp] (LSQ; Q-ViT's eq. 8 clamps before rounding): there
        # the gradient reaches the level (its width), elsewhere x and s. (Clamping the rounded z split it half and
        # half with the level over the half step either side of each bound, where round(v) ties with it.)
        clipped = torch.where(v >= qp, qp, torch.where(v <= -qn, -qn, z))
        out = ste(clipped, torch.minimum(torch.maximum(z, -qn), qp).detach())  # the values as before, exactly
        return ((out - zero) * s if self.offset is not None else out * s).to(dtype)

    @torch.no_grad()
    def _hold_unselected(self, idx: torch.Tensor) -> None:
        """Put back the step sizes the last training forward did not use: they had no gradient, but the
        optimizer's momentum (Adam's running mean) goes on moving them for a few steps after a switch of
        width; only the selected step size trains. Then remember the step sizes and this forward's choice."""
        self.scale.copy_(torch.where(self.used, self.scale, self.held))
        used = torch.zeros(self.groups, self.b_max - self.b_min + 1, dtype=torch.bool, device=idx.device)
        self.used.copy_(used.scatter_(1, idx[:, None], True).view(-1))
        self.held.copy_(self.scale)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a state written before `held` and `used` were kept (an earlier Q-ViT run's last.pt): nothing held
        # yet, as in a fresh quantizer (all used: the next training forward puts nothing back)
        scale = state_dict.get(prefix + "scale")
        if isinstance(scale, torch.Tensor) and prefix + "held" not in state_dict and prefix + "used" not in state_dict:
            state_dict[prefix + "held"] = scale.detach().clone()
            state_dict[prefix + "used"] = torch.ones(scale.shape, dtype=torch.bool, device=scale.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.initialized)  # a state may be one never calibrated

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_scales(self, x: torch.Tensor) -> None:
        """Per group and per candidate bit-width, the step size (and offset) of least squared error."""
        xg = x.float().movedim(self.dim, 0).reshape(self.groups, -1) if self.groups > 1 \
            else x.float().reshape(1, -1)
        if xg.shape[1] > 65536:  # a random subsample keeps the search cheap on big activations; a fixed one
            pick = torch.randperm(xg.shape[1], generator=torch.Generator().manual_seed(0))[:65536]  # reproduces
            xg = xg[:, pick.to(xg.device)]
        lo, hi = xg.min(1).values, xg.max(1).values
        scales = self.scale.view(self.groups, -1)
        ratios = torch.linspace(0.05, 1.0, 40, device=xg.device)  # 40 candidate fractions of the full range
        best_zero = torch.zeros_like(lo)
        for j, b in enumerate(range(self.b_min, self.b_max + 1)):
            qn, qp = levels(torch.tensor(float(b), device=xg.device), self.signed)
            if self.offset is not None:      # [lo, hi] onto the codes, lo at code -qn
                full = (hi - lo) / (qp + qn)
            elif self.signed:                # symmetric: the range is set by the largest magnitude
                full = torch.maximum(hi, -lo) / qp
            else:
                full = hi.clamp(min=0) / qp
            full = full.clamp(min=1e-8)
            best, best_err = full.clone(), torch.full_like(full, float("inf"))
            for r in ratios:
                s = (full * r)[:, None]
                zero = torch.round(-lo[:, None] / s) - qn if self.offset is not None else 0.0
                err = (((torch.clamp(torch.round(xg / s) + zero, -qn, qp) - zero) * s - xg) ** 2).mean(1)
                better = err < best_err
                best = torch.where(better, s[:, 0], best)
                best_err = torch.where(better, err, best_err)
                if self.offset is not None and b == self.b_max:
                    best_zero = torch.where(better, zero[:, 0], best_zero)
            scales[:, j] = best
        if self.offset is not None:  # one offset for all widths: the widest width's zero point
            self.offset.copy_(-best_zero * scales[:, -1])
        self.used.fill_(True)  # the calibrated step sizes stand: the next training forward puts none back
        self.initialized.fill_(True)

    @staticmethod
    @contextlib.contextmanager
    def calibrating(model: nn.Module):
        """Within this block, every not-yet-initialised quantizer of `model` sets its step sizes
        from the first tensor it quantizes (run a forward pass on a calibration batch inside it)."""
        qs = [m for m in model.modules() if isinstance(m, LearnedQuantizer)]
        for q in qs:
            q._calibrating = True
        try:
            yield
        finally:
            for q in qs:
                q._calibrating = False

    def extra_repr(self) -> str:
        bits = f"{self.b_min}" if self.b_min == self.b_max else f"{self.b_min}..{self.b_max}"
        return (f"bits={bits}, signed={self.signed}, offset={self.offset is not None}, "
                f"groups={self.groups}, bit_groups={self.bit_groups}, learn_bits={self.learn_bits}")

