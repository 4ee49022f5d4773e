"""A small ResNet to distil the reference ViT from: DeiT's recipe of a quickly trained CNN teacher.

    python -m quant.train --model resnet_cifar --data DATA --out runs/cnn            # the teacher
    python -m quant.train --model vit_cifar_small --data DATA --out runs/vit \\
        --teacher runs/cnn/model.safetensors --distill hard                           # the student

The teacher trains like any bitvit model (same data, augmentation, schedule and checkpoints); the
student then learns from the teacher's hard predictions beside the labels, which hands a ViT trained
on little data some of a CNN's locality bias. The network is ResNet-9-shaped (the DAWNBench CIFAR-10
design): a 3x3 stem, three stages that each double the width and halve the resolution, a residual
pair of 3x3 convolutions after the first and the last stage, global max pooling and a linear
classifier. It is a teacher only: nothing quantizes, exports or ships it.

A teacher file is one safetensors file whose metadata holds its `CNNConfig` (format "bitvit-cnn/1").
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from quant.cli import is_positive_int
from quant.models import (CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, build_and_load, check_image_config,
                          read_safetensors, refuse_newer, write_safetensors)
from quant.qlinear import is_quantized_layer

FORMAT = "bitvit-cnn/1"


@dataclass(frozen=True)
class CNNConfig:
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)  # stem, stage 1, 2, 3
    img_size: int = 32
    num_classes: int = 10
    classes: tuple[str, ...] = CIFAR10_CLASSES
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD

    def __post_init__(self):
        """Refuse a config no network can be built from (a damaged or hand-edited file's), naming the field."""
        check = check_image_config(self, "CNN teacher", ("img_size",))
        check(isinstance(self.widths, tuple) and len(self.widths) == 4
              and all(map(is_positive_int, self.widths)), "widths", "four positive integers (stem, stage 1, 2, 3)")
        check(self.img_size >= 8, "img_size", "at least 8 (three 2x poolings)")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str | None) -> "CNNConfig":
        try:
            raw = json.loads(text)
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        except (TypeError, AttributeError, json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"not a CNN teacher config ({e})") from None


CONFIGS = {"resnet_cifar": CNNConfig(), "resnet_cifar_half": CNNConfig(widths=(32, 64, 128, 256))}


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class ResNetTeacher(nn.Module):
    def __init__(self, cfg: CNNConfig):
        super().__init__()
        self.config = cfg
        w0, w1, w2, w3 = cfg.widths
        self.stem = _conv(3, w0)
        self.stage1 = nn.Sequential(_conv(w0, w1), nn.MaxPool2d(2))
        self.res1 = nn.Sequential(_conv(w1, w1), _conv(w1, w1))
        self.stage2 = nn.Sequential(_conv(w1, w2), nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(_conv(w2, w3), nn.MaxPool2d(2))
        self.res3 = nn.Sequential(_conv(w3, w3), _conv(w3, w3))
        self.head = nn.Linear(w3, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.config.img_size
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1:] != (3, s, s) or not x.is_floating_point():
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"
            raise ValueError(f"expected {s}x{s} images as a float tensor (B, 3, {s}, {s}), got {got}")
        dtype = self.stem[0].weight.dtype  # (the conv the images meet: a quantized head holds no float weight)
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"the teacher's weights are {dtype} but the images {x.dtype}: give x.to({dtype})")
        x = self.stage1(self.stem(x))                  # (B, w1, s/2, s/2)
        x = x + self.res1(x)
        x = self.stage3(self.stage2(x))                # (B, w3, s/8, s/8)
        x = x + self.res3(x)
        return self.head(x.amax(dim=(2, 3)))           # (B, classes)


def create_teacher(name: str, **overrides) -> ResNetTeacher:
    if not isinstance(name, str) or name not in CONFIGS:  # (a list is unhashable)
        raise ValueError(f"unknown teacher {name!r}; known: {', '.join(CONFIGS)}")
    return ResNetTeacher(dataclasses.replace(CONFIGS[name], **overrides))


def save_teacher(model: ResNetTeacher, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a float teacher as `load_teacher` reads it; a wrapped (torch.compile'd) or quantized one is refused,
    as save_model refuses them (their tensors' names would not load)."""
    if not isinstance(model, ResNetTeacher):
        raise ValueError(f"save_teacher writes bitvit's ResNetTeacher, got {type(model).__name__}")
    if any(is_quantized_layer(m) for m in model.modules()):
        raise ValueError("the teacher holds quantized layers: write it with quant.save_quantized (packed codes)")
    meta = {**(metadata or {}), "format": FORMAT, "config": model.config.to_json()}
    write_safetensors(model.state_dict(), path, meta)


def load_teacher(path: str | os.PathLike) -> ResNetTeacher:
    """A teacher file, in eval mode, on the CPU; one clear error for anything else."""
    state, meta = read_safetensors(path)
    refuse_newer(meta.get("format"), FORMAT, path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a bitvit CNN teacher (format {meta.get('format')!r})")
    try:
        cfg = CNNConfig.from_json(meta.get("config"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return build_and_load(lambda: ResNetTeacher(cfg), state, str(path)).eval()
