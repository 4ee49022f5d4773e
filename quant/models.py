"""The Vision Transformer bitvit quantizes, with timm's parameter names, and its checkpoint files.

Parameter names follow timm's `VisionTransformer` (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.N.norm1`, `blocks.N.attn.qkv`, `blocks.N.attn.proj`, `blocks.N.norm2`, `blocks.N.mlp.fc1`,
`blocks.N.mlp.fc2`, `norm`, `head`), so timm and DeiT checkpoints load without renaming. The CIFAR
configs may put a small convolutional stem in front of the patch projection (`patch_embed.backbone`,
the name timm gives a hybrid ViT's backbone); the transformer blocks are always the standard
pre-norm MHSA + GELU MLP blocks.

A bitvit checkpoint is one safetensors file whose metadata holds the `ViTConfig` as JSON, so a file
rebuilds its own model: `save_model(model, path)` / `load_model(path)`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import json
import math
import os
import pickle
import reprlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.cli import counted, file_to_write, finite_number, is_positive_int, written_whole

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FORMAT = "bitvit-vit/1"  # safetensors metadata key "format" of a full-precision bitvit checkpoint
MAX_LAYERS = 1000  # blocks, and stem layers, a ViT config may ask for
MAX_TENSORS = 100_000  # in a model file: a ViT of MAX_LAYERS quantized blocks holds about 25,000


def check_image_config(cfg, kind: str, sizes: tuple[str, ...]) -> Callable[[bool, str, str], None]:
    """Refuse a model config (ViT or CNN teacher) whose `sizes` fields, num_classes, classes, mean or std
    no model can be built from or fed with, naming the field; returns the check for the kind's own fields."""
    def check(ok: bool, field: str, want: str):
        if not ok:  # reprlib: a file's 10^6 class names shown as the first six, not as a message of megabytes
            raise ValueError(f"{kind} config field {field!r} must be {want}, got {reprlib.repr(getattr(cfg, field))}")

    for f in (*sizes, "num_classes"):
        check(is_positive_int(getattr(cfg, f)), f, "a positive integer")
    check(cfg.img_size <= 16384, "img_size", "at most 16384 pixels")  # a damaged file's 2**62 fed nothing
    check(isinstance(cfg.classes, tuple) and all(isinstance(c, str) for c in cfg.classes)
          and len(cfg.classes) in (0, cfg.num_classes), "classes", f"{cfg.num_classes} class names or none")
    for f in ("mean", "std"):
        v = getattr(cfg, f)
        check(isinstance(v, tuple) and len(v) == 3 and all(map(finite_number, v)), f, "three numbers (R, G, B)")
    check(all(s > 0 for s in cfg.std), "std", "positive")
    return check


@dataclass(frozen=True)
class ViTConfig:
    """Everything needed to rebuild a ViT and feed it images."""
    img_size: int = 32
    patch_size: int = 4
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    stem_channels: tuple[int, ...] = ()  # 3x3 conv+BN+GELU layers before `patch_embed.proj`
    num_classes: int = 10
    classes: tuple[str, ...] = CIFAR10_CLASSES  # may be empty for hub models without label names
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    drop_path_rate: float = 0.0  # stochastic depth; a training setting, kept so resumed runs match

    def __post_init__(self):
        """Refuse a config no model can be built from (a damaged or hand-edited file's), naming the field."""
        check = check_image_config(self, "ViT", ("img_size", "patch_size", "embed_dim", "depth", "num_heads"))
        check(self.patch_size <= self.img_size, "patch_size", f"at most img_size ({self.img_size})")
        check(self.embed_dim % self.num_heads == 0, "num_heads", f"a divisor of embed_dim ({self.embed_dim})")
        check(finite_number(self.mlp_ratio) and self.mlp_ratio > 0, "mlp_ratio", "a positive number")
        check(self.embed_dim * self.mlp_ratio >= 1, "mlp_ratio",  # the MLP's width is int(embed_dim * mlp_ratio)
              f"at least 1/embed_dim (1/{self.embed_dim}) for an MLP at least 1 wide")
        check(finite_number(self.drop_path_rate) and 0 <= self.drop_path_rate < 1, "drop_path_rate", "in [0, 1)")
        check(isinstance(self.stem_channels, tuple) and all(map(is_positive_int, self.stem_channels)),
              "stem_channels", "a list of positive integers")
        # a file's config is built (as a skeleton on the meta device) before its tensors are checked, at milliseconds
        # a layer: a crafted 100 kB config of 100,000 layers took minutes and gigabytes (ViT-22B has 48 blocks)
        check(self.depth <= MAX_LAYERS, "depth", f"at most {MAX_LAYERS} blocks")
        check(len(self.stem_channels) <= MAX_LAYERS, "stem_channels", f"at most {MAX_LAYERS} layers")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def same_model(self, other: "ViTConfig") -> bool:
        """Whether the two configs describe the same model: network, classes and input normalisation
        (training settings such as drop_path_rate aside)."""
        return not self.differences(other)

    def differences(self, other: "ViTConfig") -> str:
        """What keeps the two configs from describing the same model, for an error message ("a different
        architecture and different classes"), or "" where they describe the same one."""
        a, b = dataclasses.asdict(self), dataclasses.asdict(other)
        network = [k for k in a if k not in ("classes", "mean", "std", "drop_path_rate")]
        groups = {"a different architecture": network, "different classes": ["classes"],
                  "a different input normalisation": ["mean", "std"]}
        return " and ".join(what for what, keys in groups.items() if any(a[k] != b[k] for k in keys))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str | None, source: str | os.PathLike | None = None) -> "ViTConfig":
        """The config in `text`; errors start with `source` (the file it came from) when given."""
        where = f"{source}: " if source is not None else ""
        try:
            raw = json.loads(text)
        except (TypeError, ValueError, RecursionError) as e:  # ValueError: JSON's, or a 5000-digit integer
            raise ValueError(f"{where}the ViT config is not valid JSON ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:120]})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{where}the ViT config is not a JSON object: {text[:80]!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"{where}unknown ViT config fields {sorted(unknown)}")
        for key in ("stem_channels", "classes", "mean", "std"):
            if isinstance(raw.get(key), list):
                raw[key] = tuple(raw[key])
        try:
            return cls(**raw)
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None


_IMAGENET = dict(img_size=224, patch_size=16, num_classes=1000, classes=(),
                 mean=IMAGENET_MEAN, std=IMAGENET_STD)

CONFIGS: dict[str, ViTConfig] = {
    # CIFAR models, 32x32 input. `vit_cifar_tiny` trains on a 2-core CPU in hours (64 tokens);
    # `vit_cifar_small` is the GPU reference recipe (256 tokens, CCT-7/3x1-like cost).
    "vit_cifar_tiny": ViTConfig(patch_size=4, embed_dim=128, depth=6, num_heads=4,
                                mlp_ratio=2.0, stem_channels=(32,)),
    "vit_cifar_small": ViTConfig(patch_size=2, embed_dim=256, depth=7, num_heads=4,
                                 mlp_ratio=2.0, stem_channels=(64,)),
    # Standard ImageNet configs; their weights come from timm/DeiT checkpoints.
    "deit_tiny_patch16_224": ViTConfig(embed_dim=192, depth=12, num_heads=3, **_IMAGENET),
    "deit_small_patch16_224": ViTConfig(embed_dim=384, depth=12, num_heads=6, **_IMAGENET),
    "deit_base_patch16_224": ViTConfig(embed_dim=768, depth=12, num_heads=12, **_IMAGENET),
    "vit_base_patch16_224": ViTConfig(embed_dim=768, depth=12, num_heads=12,
                                      **{**_IMAGENET, "mean": (0.5,) * 3, "std": (0.5,) * 3}),
}

# Hugging Face hub repositories holding timm's safetensors weights for the standard configs.
HUB_IDS = {
    "deit_tiny_patch16_224": "timm/deit_tiny_patch16_224.fb_in1k",
    "deit_small_patch16_224": "timm/deit_small_patch16_224.fb_in1k",
    "deit_base_patch16_224": "timm/deit_base_patch16_224.fb_in1k",
    "vit_base_patch16_224": "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
}


class PatchEmbed(nn.Module):
    """(B, 3, H, W) image -> (B, N, D) tokens: optional conv stem, then a strided patch conv."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        layers, c_in = [], 3
        for c_out in cfg.stem_channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]
            c_in = c_out
        self.backbone = nn.Sequential(*layers) if layers else None
        self.proj = nn.Conv2d(c_in, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)
        self.img_size = cfg.img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.img_size
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"expected {s}x{s} RGB images as a float tensor (B, 3, {s}, {s}), got a "
                             f"{type(x).__name__} (torch.from_numpy(x) makes one)")
        if x.ndim != 4 or x.shape[1:] != (3, s, s) or not x.is_floating_point():
            raise ValueError(f"expected {s}x{s} RGB images as a float tensor (B, 3, {s}, {s}), got {x.dtype} "
                             f"{tuple(x.shape)}")
        dtype = self.proj.weight.dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"the model's weights are {dtype} but the images {x.dtype}: give x.to({dtype})")
        if self.backbone is not None:
            x = self.backbone(x)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        """Stochastic depth: drop the whole residual branch per sample while training."""
        if not self.training or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        mask = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep)
        return x * mask / keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._drop(self.attn(self.norm1(x)))
        return x + self._drop(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.embed_dim))
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()  # cpu: also under a meta device
        self.blocks = nn.Sequential(*[Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self._init_weights()

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / w[0].numel()))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)                                    # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))                           # (B, N + 1, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[:, 0])            # (B, num_classes)


def create_model(name: str, **overrides) -> VisionTransformer:
    """A randomly initialised model of a named config (see `CONFIGS`), with fields overridden."""
    cfg = _config(name)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ViTConfig)}
    if unknown:
        raise ValueError(f"{name}: no config fields {sorted(unknown)}; its fields: "
                         f"{', '.join(f.name for f in dataclasses.fields(ViTConfig))}")
    return VisionTransformer(dataclasses.replace(cfg, **overrides))


# ----------------------------------------------------------------------------- checkpoints

def load_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint",
                    loaded: frozenset[str] = frozenset(), copy: bool = True) -> None:
    """Copy `state` into `model` (as its dtypes), refusing any missing, unexpected, differently shaped, non-float
    (where the model's is float) or non-finite tensor by name. `loaded` names tensors the model already holds and
    `state` does not (a packed file's quantized layers, read by their own rules)."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    own_keys = {k for k in own if not k.endswith("num_batches_tracked")} - loaded
    missing = sorted(own_keys - set(state))
    unexpected = sorted(set(state) - own_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {counted(len(missing), 'tensor')}, first {missing[0]!r}")
        if unexpected:
            parts.append(f"unexpected {counted(len(unexpected), 'tensor')}, first {unexpected[0]!r}")
        raise ValueError(f"{source} does not fit this model: {'; '.join(parts)}")
    cast = {}  # the file's tensors in the model's dtypes
    for k, v in state.items():
        if v.layout != torch.strided or v.device.type != "cpu" or (
                v.is_floating_point() and v.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64)):
            raise ValueError(f"{source}: tensor {k!r} is a {v.layout} {v.dtype} tensor on {v.device}; a model file "
                             f"holds dense float16/bfloat16/float32/float64 tensors")
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{source} does not fit this model: tensor {k!r} has shape "
                             f"{tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
        if v.is_floating_point() != own[k].is_floating_point():
            raise ValueError(f"{source}: tensor {k!r} has dtype {v.dtype}, expected {own[k].dtype}")
        cast[k] = v.to(own[k].dtype)
        if v.is_floating_point() and not torch.isfinite(cast[k]).all():  # float64 past float32's range too
            raise ValueError(f"{source}: tensor {k!r} holds NaN or infinite values, or values beyond the model's "
                             f"{own[k].dtype} (a damaged file?)")
    if copy:  # a tensor on the meta device holds no values: it gets itself (torch warns at each value copied in)
        model.load_state_dict({**{k: v for k, v in cast.items() if not own[k].is_meta},
                               **{k: t for k, t in own.items() if t.is_meta}}, strict=False)


def save_model(model: VisionTransformer, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write `model` (float32) as one safetensors file carrying its config (and any extra string metadata); a
    model holding NaN or infinite values (a diverged run) is refused, as loading would refuse it."""
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"save_model writes bitvit's VisionTransformer, got {type(model).__name__}")
    from quant.qlinear import KERNELS_IN_PLACE, is_quantized_layer, runs_on_kernels
    if runs_on_kernels(model):  # its packed layers would be written as a full-precision model's tensors
        raise ValueError(f"the model runs on bitvit's kernels (cuda_ops.to_kernels): save the QuantLinear model "
                         f"it was made from, with quant.save_quantized ({KERNELS_IN_PLACE})")
    if any(is_quantized_layer(m) for m in model.modules()):
        raise ValueError("the model holds quantized layers: write it with quant.save_quantized (packed codes)")
    refuse_meta(model, "saving it")
    state = {k: (v.float() if v.is_floating_point() else v)
             for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    write_safetensors(state, path, {**(metadata or {}), "format": FORMAT, "config": model.config.to_json()})


def write_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """A state dict and its string metadata as one safetensors file, after the checks every model file
    gets: metadata of strings, an output path that can be written, no NaN or infinite value. The file is
    readable as the umask allows, as any other written file (safetensors makes it owner-only), and written
    whole or not at all; a failed write (a full disk) is an OSError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map strings to strings (safetensors' header)")
    refuse_non_finite(state)
    path = file_to_write(path_text(path))
    umask = os.umask(0)
    os.umask(umask)
    with written_whole(path) as tmp:
        try:
            save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
        except SafetensorError as e:  # "Error while serializing: I/O error: No space left on device (os error 28)"
            raise OSError(f"cannot write {path}: {e}") from None
        _sort_metadata(tmp)
        os.chmod(tmp, 0o666 & ~umask)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors file's header with its metadata in sorted order of keys. safetensors writes them in
    an order drawn afresh for every file (its issue #584), so saving the same model twice gave two files of
    different bytes, and sha1 sums (the model cards') that no rerun reproduces."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        # the same keys and values, escaped as serde_json escapes them: the same length, the tensors stay where they are
        text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
        if len(text) > size:  # (an escaping of another length: left unsorted rather than written over a tensor)
            return
        f.seek(8)
        f.write(text.ljust(size))  # (safetensors pads its header with spaces)


def refuse_non_finite(state: dict[str, torch.Tensor]) -> None:
    """One error naming the first float tensor that holds NaN or infinite values, before anything is written."""
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ValueError(f"{bad} holds NaN or infinite values (did training diverge? lower --lr); nothing written")


def path_text(path) -> str:
    """A file path given as str or os.PathLike, as text; anything else (a model, None) is one clear error."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"expected a file path, got {type(path).__name__}")
    return os.fspath(path)


def refuse_newer(found, known: str, path) -> None:
    """One error for a file in a later version of the bitvit format `known` ("name/N") than this bitvit reads."""
    name, _, version = known.rpartition("/")
    later = found[len(name) + 1:] if isinstance(found, str) and found.startswith(name + "/") else ""
    if later.isdecimal() and int(later) > int(version):
        raise ValueError(f"{path} was written by a newer bitvit (format {found}; this one reads {known}): update "
                         f"bitvit to load it")


def existing_file(path: str | os.PathLike, kind: str = "model") -> Path:
    """`path` if it is a file; else one clear error (missing, a folder, a pipe) naming the `kind` of file."""
    path = Path(path_text(path))
    a = "an" if kind[0] in "AEIOUaeiou" else "a"
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not {a} {kind} file")
    if path.exists() and not path.is_file():  # a pipe or device, which reading would wait on for ever
        raise ValueError(f"{path} is not a regular file; give {a} {kind} file")
    if not path.is_file():
        raise FileNotFoundError(f"no such {kind} file: {path}")
    return path


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with one clear error for a missing or broken file."""
    from safetensors import safe_open
    path = existing_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, names = f.metadata() or {}, f.keys()
            # (unread past the count: a header of 10^6 empty tensors took a minute and 2 GB to read)
            tensors = {k: f.get_tensor(k) for k in names} if len(names) <= MAX_TENSORS else None
    except Exception as e:  # safetensors raises its own error types for truncated/garbage files
        raise unreadable_safetensors(path, e) from None
    if tensors is None:
        raise ValueError(f"{path} holds {len(names):,} tensors, over the {MAX_TENSORS:,} of any model bitvit builds "
                         f"(a damaged file?)")
    return tensors, meta


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's metadata, without reading its tensors, with the same one clear error."""
    from safetensors import safe_open
    path = existing_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise unreadable_safetensors(path, e) from None


def unreadable_safetensors(path, error: Exception) -> ValueError:
    """The one error for a file safetensors cannot open; an ONNX file is told where it belongs."""
    if str(path).lower().endswith(".onnx"):
        return ValueError(f"{path} is an ONNX file: this takes a torch model file (.safetensors, .pth); "
                          f"ONNX files run with export.runtime.load")
    return ValueError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error})")


def refuse_compressed_zip(path: Path) -> None:
    """torch.save writes its zip archive uncompressed; a compressed entry could inflate to gigabytes before any
    check (a zip bomb), so a .pth/.pt holding one is refused unread."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = next((i.filename for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED), None)
    except (zipfile.BadZipFile, OSError):  # not a zip (a legacy torch file) or damaged: torch.load says which
        return
    if bad is not None:
        raise ValueError(f"{path} holds a compressed entry ({bad}), which torch.save never writes; refused unread")


def is_torch_file(path: str) -> bool:
    """Whether `path` is a torch checkpoint rather than safetensors: by the zip signature torch.save writes, or the
    pickle protocol opcode its legacy format (before torch 1.6) starts with, or by its suffix, any case (.pth, .pt,
    .bin, .ckpt), unless it starts as a safetensors file does (save_model writes safetensors under whatever name it
    is given)."""
    suffix = path.lower().endswith((".pth", ".pt", ".bin", ".ckpt"))
    if not os.path.isfile(path):  # missing, a folder or a pipe (never opened): the reader names the problem
        return suffix
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:  # unreadable: the reader names the problem
        return suffix
    if head[8:] == b"{":  # safetensors: the header's length in 8 bytes, then the header's JSON
        return False
    return suffix or head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"


# what quant.train's resume state (last.pt) holds: told apart from a model checkpoint by it
RESUME_STATE_KEYS = frozenset({"model", "optimizer", "rng", "epoch", "trained_seconds", "config"})


def read_torch_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a .pth/.pt file (timm or DeiT style, nested under "model" or "state_dict" or not), loaded
    with `weights_only=True`."""
    path = existing_file(path)
    refuse_compressed_zip(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # the weights-only unpickler met a class or function (torch 2.6-2.13's wording)
            raise ValueError(f"{path} holds pickled objects other than tensors; refused unread "
                             f"(bitvit loads .pth files with torch.load(weights_only=True))") from None
        raise ValueError(f"{path} is not a torch checkpoint (not a pickle of tensors; another format, "
                         f"or damaged)") from None
    except Exception as e:
        first = (str(e).splitlines() or [""])[0]
        if "weights_only" in first:  # torch's advice to load unsafely, which bitvit never does
            first = "not a torch checkpoint of tensors"
        raise ValueError(f"{path} is not a loadable torch checkpoint of plain tensors "
                         f"({type(e).__name__}{': ' + first if first else ''})") from None
    if isinstance(obj, dict) and RESUME_STATE_KEYS <= set(obj):
        raise ValueError(f"{path} is a training run's resume state (quant.train's last.pt), not a model file; "
                         f"give the model file the run saved instead (RUN_DIR/model.safetensors)")
    for key in ("model", "state_dict", "model_ema"):  # DeiT and training scripts nest the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{path} holds no state dict of tensors")
    # a pickle may view a few stored values with zero strides as any shape: a 10^9-class head from 4 bytes, which
    # the checks that follow (and the model built to that head) would expand to gigabytes
    wide = next((k for k, v in obj.items() if v.layout == torch.strided
                 and v.numel() * v.element_size() > v.untyped_storage().nbytes()), None)
    if wide is not None:
        stored = obj[wide].untyped_storage().nbytes()
        raise ValueError(f"{path}: tensor {wide!r} of shape {tuple(obj[wide].shape)} repeats the {stored:,} bytes the "
                         f"file stores for it; a model's state dict holds each value once")
    return obj


def load_model(source: str | os.PathLike, name: str | None = None) -> VisionTransformer:
    """Load a full-precision ViT, in eval mode, on the CPU.

    `source` is a bitvit safetensors file (its config is inside), or, with `name` naming a config,
    a timm/DeiT `.safetensors`/`.pth` file or a Hugging Face hub id (`hf-hub:timm/...`, or
    `name` alone with `source="hub"` for the config's default repository); such a file's head may have
    another class count than the config's (`fitted_head`).
    """
    source = path_text(source)
    if source == "hub" or source.startswith("hf-hub:"):
        if name is None:
            raise ValueError("loading from the hub needs a config name (e.g. deit_tiny_patch16_224)")
        _config(name)  # a misspelt name is the error to report, not its missing repository
        repo = HUB_IDS.get(name) if source == "hub" else source[len("hf-hub:"):]
        if repo is None:
            raise ValueError(f"no default hub repository for {name!r}")
        return _load_from_hub(repo, name)
    if is_torch_file(source):
        state, meta = read_torch_state(source), {}
    else:
        state, meta = read_safetensors(source)
    if meta.get("format") == FORMAT:
        cfg = ViTConfig.from_json(meta.get("config"), source)
        check_depth(cfg, state, source)
        if name is not None and (differs := _config(name).differences(cfg)):
            raise ValueError(f"{source} holds {differs} than {name!r}")
    elif str(meta.get("format", "")).startswith("bitvit-"):  # not Hugging Face's "pt" tag of timm files
        refuse_newer(meta["format"], FORMAT, source)
        raise ValueError(f"{source} is a {meta['format']!r} file, not a full-precision bitvit ViT (quantized ViTs "
                         f"load with quant.load_quantized, CNN teachers with quant.teacher.load_teacher)")
    elif name is None:
        raise ValueError(f"{source} carries no bitvit config, so it is not a bitvit model file; a timm/DeiT "
                         f"checkpoint loads in Python with its architecture named, quant.models.load_model(path, "
                         f"name=...), one of {', '.join(CONFIGS)}")
    else:
        if state and all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
            state = {k[len("module."):]: v for k, v in state.items()}
        cfg = fitted_head(_config(name), state)
    return build_and_load(lambda: VisionTransformer(cfg), state, source).eval()


def fitted_head(cfg: ViTConfig, state: dict[str, torch.Tensor]) -> ViTConfig:
    """`cfg` with as many classes as a timm/DeiT file's `head.weight` has rows where that differs (a head
    fine-tuned on other data, e.g. timm's `create_model(..., num_classes=10)`): classes unnamed, taken in the
    order of the head's rows. Any other disagreement is left for `load_state_dict` to name."""
    head = state.get("head.weight")
    if head is None or head.dim() != 2 or head.shape[1] != cfg.embed_dim or head.shape[0] in (0, cfg.num_classes):
        return cfg
    return dataclasses.replace(cfg, num_classes=head.shape[0], classes=())


def check_depth(cfg: ViTConfig, tensors: dict, source) -> None:
    """Refuse a config of more blocks than the file holds tensors of before a skeleton of it is built (a
    damaged config's 100,000 blocks would take minutes to build even on the meta device)."""
    held = {k.split(".")[1] for k in tensors if k.startswith("blocks.")}
    if cfg.depth > len(held):
        first = next(i for i in range(cfg.depth) if str(i) not in held)
        raise ValueError(f"{source} does not fit its config: the config has {cfg.depth} blocks, the file holds "
                         f"tensors of {len(held)} (none of 'blocks.{first}')")


def meta_skeleton(build: Callable[[], nn.Module], source) -> nn.Module:
    """`build()` on the meta device, which holds no memory, or one error for a config whose tensors no
    storage could hold (a damaged file's 10^9-wide layers overflow even there)."""
    try:
        with torch.device("meta"):
            return build()
    except (RuntimeError, OverflowError, TypeError) as e:  # TypeError: a size past int64 (torch's own wording)
        raise ValueError(f"{source}: its config describes a model too large to build "
                         f"({(str(e).splitlines() or [''])[0][:160]})") from None


def build_and_load(build: Callable[[], nn.Module], state: dict[str, torch.Tensor],
                   source: str | os.PathLike) -> nn.Module:
    """`build()` with `state` loaded. The state is first checked against a skeleton built on the meta device,
    which holds no memory: a damaged config in a file could otherwise ask for terabytes."""
    load_state_dict(meta_skeleton(build, source), state, source=source, copy=False)
    model = build()
    load_state_dict(model, state, source=source)
    return model


def _config(name) -> ViTConfig:
    """The config named `name`, or one error listing the known ones (for a name that is no string, too)."""
    if not isinstance(name, str) or name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name]


def _load_from_hub(repo: str, name: str) -> VisionTransformer:
    """Download (or find in the local hub cache) timm's `model.safetensors` and label names."""
    from huggingface_hub import hf_hub_download
    cfg = _config(name)  # before any download: a wrong name is the error to report
    try:
        path = hf_hub_download(repo, "model.safetensors")
    except OSError as e:  # the hub's errors (not cached and offline, no such repository, HTTP) are OSErrors;
        # first: huggingface_hub 0.x's LocalEntryNotFoundError is a ValueError too
        raise FileNotFoundError(f"hf-hub:{repo}: model.safetensors is neither in the local hub cache nor downloadable "
                                f"({': '.join([type(e).__name__, *str(e).splitlines()[:1]])[:200]})") from None
    except ValueError as e:  # huggingface_hub's HFValidationError: a malformed repository id
        raise ValueError(f"hf-hub:{repo} is not a valid hub repository id "
                         f"({(str(e).splitlines() or [type(e).__name__])[0][:160]})") from None
    try:
        with open(hf_hub_download(repo, "config.json")) as f:
            labels = json.load(f).get("label_names") or ()
    except Exception:  # label names are a nicety; weights are what matters
        labels = ()
    state, _ = read_safetensors(path)
    cfg = fitted_head(cfg, state)
    if isinstance(labels, list) and len(labels) == cfg.num_classes and all(isinstance(x, str) for x in labels):
        cfg = dataclasses.replace(cfg, classes=tuple(labels))
    model = VisionTransformer(cfg)
    load_state_dict(model, state, source=f"hf-hub:{repo}")
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=None)
def fp_parameters(cfg: ViTConfig) -> int:
    """Parameters of the full-precision model of this architecture (the weights a file stores); counted on
    the meta device, so nothing is allocated."""
    with torch.device("meta"):
        return count_parameters(VisionTransformer(cfg))


def refuse_meta(model: nn.Module, before: str) -> None:
    """One error for a model with a tensor on the meta device, which holds no values (`model.to("meta")`, a
    skeleton built under `torch.device("meta")`): nothing to write, export or quantize `before` its weights load."""
    name = next((n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta), None)
    if name is not None:
        raise ValueError(f"the model's {name} is on the meta device, without values: load its weights before {before}")


def linear_from(cls: type[nn.Linear], linear: nn.Linear, *args, **kwargs) -> nn.Linear:
    """A `cls(in_features, out_features, bias, *args, **kwargs)` layer on `linear`'s device holding its weight
    and bias: how a training recipe swaps its own nn.Linear subclass in for a model's linear layer."""
    layer = cls(linear.in_features, linear.out_features, linear.bias is not None, *args, **kwargs)
    layer.to(linear.weight.device)
    with torch.no_grad():
        layer.weight.copy_(linear.weight)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
    return layer


@torch.no_grad()
def forward_with_hooks(model: nn.Module, x: torch.Tensor, hooks: list) -> torch.Tensor:
    """One eval-mode forward pass of x, without gradients, for the sake of the hooks (handles of registered
    hooks) it runs; the hooks are removed and every module's train/eval mode restored afterwards, even on an
    error."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return model(x)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training


@contextlib.contextmanager
def unchanged_on_error(model: nn.Module):
    """Put `model` back as it was if the block raises: its module tree, every module's attributes (mode,
    added biases, recorded recipes) and every parameter's and buffer's values. Quantizing and loading
    swap and edit layers one at a time, and a refusal halfway must not leave a half-quantized model."""
    attrs = {m: {k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in vars(m).items()}
             for m in model.modules()}
    values = [(t, t.detach().clone()) for t in itertools.chain(model.parameters(), model.buffers())]
    try:
        yield model
    except BaseException:
        for m, saved in attrs.items():
            vars(m).clear()
            vars(m).update(saved)
        with torch.no_grad():
            for t, v in values:
                t.copy_(v)
        raise
