"""Distillation losses from a full-precision teacher, shared by training and quantization-aware training."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _same_shape(logits: torch.Tensor, target: torch.Tensor, what: str) -> None:
    """Refuse a target that is not (B, K) like the logits (broadcasting would give a loss silently)."""
    if logits.ndim != 2 or target.shape != logits.shape:
        raise ValueError(f"the {what} {tuple(target.shape)} do not match the student's logits "
                         f"{tuple(logits.shape)}: give both (B, K), for the same batch and classes")


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (B, K) (label smoothing and mixup produce these)."""
    _same_shape(logits, target, "soft targets")
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float = 1.0) -> torch.Tensor:
    """Loss pulling student logits (B, K) towards the teacher's.

    `hard`: cross-entropy with the teacher's top-1 class (DeiT's hard distillation); NaN where the teacher's
    logits are not all finite.
    `soft`: KL(teacher || student) at `temperature`, scaled by T^2 as in Hinton et al.
    """
    _same_shape(student, teacher, "teacher's logits")
    if kind == "hard":
        # NaN or infinite teacher logits would pick class 0 (or a NaN's: argmax takes NaN as the top) as the
        # target without a word: they make the loss and its gradients NaN instead, as soft distillation's do, which
        # training stops on (at an epoch's end: checking them here would wait for the GPU every step)
        finite = torch.where(torch.isfinite(teacher).all(), 1.0, math.nan)
        return F.cross_entropy(student, teacher.argmax(dim=-1)) * finite
    if kind == "soft":
        t = temperature
        if not 0 < t < math.inf:  # 0 gave NaN, a negative one a loss of the reversed logits
            raise ValueError(f"the distillation temperature must be a positive finite number, got {t!r}")
        return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                        reduction="batchmean", log_target=True) * t * t
    raise ValueError(f"unknown distillation kind {kind!r}; use 'hard' or 'soft'")
