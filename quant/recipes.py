"""Recipes: small dataclasses naming how a model is quantized, and `quantize(model, recipe)`, the one entry point.

    import quant
    model = quant.quantize(model, "w4")                                  # round to nearest, int4, groups of 64
    model = quant.quantize(model, quant.recipe("w4", group_size=128))    # any field overridden
    model = quant.quantize(model, "w4-gptq", calib=images)                # GPTQ needs calibration inputs

Names (`RECIPES`):
  w8a8        int8 per-channel weights, per-token int8 activations (BitNet's absmax), RTN
  w4a8, w4a8-gptq   symmetric int4 per-channel weights (RTN or GPTQ), per-token int8 activations:
              integer activations, so they run on bitvit's int kernels as w8a8 does
  w4, w3, w2  round-to-nearest int4/int3/int2, asymmetric, one scale and zero per group of 64 inputs
  nf4         NF4 with absmax scales per group of 64, double-quantized as in QLoRA
  w4-gptq, w3-gptq, w2-gptq   GPTQ at 4/3/2 bits, asymmetric, groups of 64
  w4a4        ViT-aware W4A4 post-training quantization (`quant.w4a4`: RepQ-ViT-style)
  w1.58a8     ternary BitNet b1.58 weights, int8 per-token activations: quantization-aware training
  w1a8        binary BitNet weights, int8 per-token activations: quantization-aware training
  qvit        Q-ViT: learned head-wise mixed precision under a BitOPs budget (`budget_bits`)
  lsq         LSQ+: learned step sizes (and offsets for post-GELU inputs) with every width at `budget_bits`
              (the classifier head at 8): Q-ViT's layers with the widths fixed, quantization-aware training

`quantize` works on any model built of nn.Linear layers (every one of them is quantized, unless a
`layer_formats` pattern says otherwise); the classifier `head` of a bitvit ViT is kept at int8 in the
low-bit PTQ recipes, as PTQ papers keep the last layer at 8 bits (a wrapped ViT, whose head is `1.head`, is
refused unless `layer_formats` names its head). It changes the model in place and
returns it. Post-training recipes return a model of QuantLinear layers (save it with
`quant.save_quantized`); quantization-aware recipes return the model with training-time layers,
to be trained (`python -m quant.qat`) and frozen into QuantLinear layers.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass

import torch
import torch.nn as nn

from quant.models import refuse_meta, unchanged_on_error
from quant.qlinear import QuantLinear, is_quantized_layer, runs_on_kernels
from quant.quantizers import WEIGHT_FORMATS, is_uniform_format


def _linears(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    if not names:
        raise ValueError("the model has no nn.Linear layers to quantize")
    if empty := next((n for n in names if not model.get_submodule(n).weight.numel()), None):
        layer = model.get_submodule(empty)
        raise ValueError(f"linear layer {empty!r} has no weights ({layer.in_features} inputs, {layer.out_features} "
                         f"outputs): give a model whose linear layers have at least one input and one output")
    return names


def format_override(name: str, layer_formats: tuple[tuple[str, str], ...]) -> str | None:
    """The weight format the first matching (fnmatch pattern, format) pair gives layer `name`."""
    for pattern, fmt in layer_formats:
        if fnmatch.fnmatchcase(name, pattern):
            return fmt
    return None


def _need_calib(recipe, calib, model: nn.Module) -> torch.Tensor:
    """The calibration inputs, checked, on the model's device."""
    if calib is None:
        raise ValueError(f"recipe {recipe.name!r} needs calibration inputs: quantize(model, recipe, calib=x) "
                         f"with x a batch of model inputs (a few hundred training images)")
    if not isinstance(calib, torch.Tensor) or calib.ndim < 1 or not len(calib):
        raise ValueError(f"calibration inputs must be a tensor of N >= 1 model inputs (for a ViT: float "
                         f"(N, 3, H, W)), got {type(calib).__name__} {getattr(calib, 'dtype', '')} "
                         f"{tuple(getattr(calib, 'shape', ()))}")
    if calib.is_floating_point() and not torch.isfinite(calib).all():
        raise ValueError("the calibration inputs hold NaN or infinite values")
    first = next(model.parameters(), calib)
    if calib.is_floating_point() and calib.dtype != first.dtype:
        raise ValueError(f"the calibration inputs are {calib.dtype}, the model {first.dtype}: "
                         f"give calib.to({first.dtype})")
    return calib.to(first.device)


_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "None": type(None)}


# bit-width fields: formats exist for 2..8 bits of integer weights, static activations and Q-ViT's learned
# widths (signed weight codes: 1 bit is the binary format, not a uniform one)
_BIT_FIELDS = ("bits", "weight_bits", "act_bits", "min_bits", "max_bits")
_CHOICES = {"weight_format": tuple(WEIGHT_FORMATS), "softmax": ("log2", "uniform")}


def _check_field(recipe, key: str, annotation: str, value) -> None:
    """A recipe's field must have its type (from the annotation), be positive for counts, name a bit width
    that a format exists for, and name formats and quantizers that exist."""
    name = recipe.name
    if key == "layer_formats":  # ((fnmatch pattern, weight format), ...)
        ok = isinstance(value, tuple) and all(
            isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, str) for x in v) for v in value)
    elif annotation == "tuple[str, ...]":   # BitNet's skip: layer names
        ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    elif annotation.startswith("tuple"):
        ok = isinstance(value, tuple)
    else:
        kinds = tuple(_TYPES[t.strip()] for t in annotation.split("|"))
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        raise ValueError(f"recipe {name!r}: {key} must be {annotation}, got {value!r}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ValueError(f"recipe {name!r}: {key} must be one of {', '.join(_CHOICES[key])}, got {value!r}")
    if key == "layer_formats" and (bad := [f for _, f in value if f not in WEIGHT_FORMATS]):
        raise ValueError(f"recipe {name!r}: layer_formats names unknown weight format {bad[0]!r}; known: "
                         f"{', '.join(WEIGHT_FORMATS)}")
    if key in ("group_size", "block_size", "budget_bits") and value is not None and value < 1:
        raise ValueError(f"recipe {name!r}: {key} must be at least 1, got {value!r}")
    if key in _BIT_FIELDS and not 2 <= value <= 8:
        raise ValueError(f"recipe {name!r}: {key} must lie in 2..8, got {value!r}")
    if key == "damp" and not 0 <= value <= 1:
        raise ValueError(f"recipe {name!r}: damp (a fraction of the Hessian's mean diagonal) must lie in 0..1, "
                         f"got {value!r}")
    if key == "act_format" and value not in ("none", "int8_token"):   # a field of RTN and GPTQ only
        raise ValueError(f"recipe {name!r}: act_format must be none or int8_token ({type(recipe).__name__} "
                         f"calibrates no activation ranges; use w4a4 for static activation quantizers), got {value!r}")


class _Checked:
    """Every recipe's fields are checked when it is built, however it is built (`RTN(...)`,
    `quant.recipe(name, **overrides)`, `dataclasses.replace`)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.name != "name":
                _check_field(self, f.name, f.type, getattr(self, f.name))


@dataclass(frozen=True)
class RTN(_Checked):
    """Round-to-nearest weights (and optional per-token int8 activations)."""
    name: str
    weight_format: str                      # int8 .. int2, nf4, ternary, binary
    group_size: int | None = 64             # None: one scale per output channel
    asymmetric: bool = True                 # intB only
    act_format: str = "none"                # none | int8_token
    layer_formats: tuple[tuple[str, str], ...] = (("head", "int8"),)

    def apply(self, model: nn.Module, calib: torch.Tensor | None = None) -> nn.Module:
        for name in _linears(model):
            layer, fmt = model.get_submodule(name), format_override(name, self.layer_formats)
            if fmt is not None:   # an override, symmetric: a scale per output channel (nf4: groups of 64)
                q = QuantLinear.from_linear(layer, fmt, None, False,
                                            "int8_token" if self.act_format != "none" else "none")
            else:   # group_size None is one scale per output channel, for NF4 too (from_linear's own default is 64)
                q = QuantLinear.from_linear(layer, self.weight_format, self.group_size or layer.in_features,
                                            self.asymmetric and is_uniform_format(self.weight_format),
                                            self.act_format)
            model.set_submodule(name, q)
        return model


@dataclass(frozen=True)
class GPTQ(_Checked):
    """GPTQ weights (`quant.gptq`), layer by layer in forward order, from calibration inputs."""
    name: str
    bits: int
    group_size: int | None = 64
    asymmetric: bool = True
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128
    act_format: str = "none"                # none | int8_token
    layer_formats: tuple[tuple[str, str], ...] = (("head", "int8"),)

    def __post_init__(self):
        super().__post_init__()
        if bad := [f for _, f in self.layer_formats if not is_uniform_format(f)]:
            raise ValueError(f"recipe {self.name!r}: GPTQ solves for uniform integer codes, so its layer_formats "
                             f"must be int2..int8, got {bad[0]!r}")

    def apply(self, model: nn.Module, calib: torch.Tensor | None = None) -> nn.Module:
        from quant.gptq import gptq_model
        names = set(_linears(model))

        def plan(name: str, layer: nn.Module) -> dict | None:
            if name not in names:
                return None
            solver = {"act_order": self.act_order, "damp": self.damp, "block_size": self.block_size,
                      "act_format": self.act_format}
            fmt = format_override(name, self.layer_formats)
            if fmt is not None:  # per output, symmetric: e.g. the head at int8
                return {"weight_format": fmt, "group_size": None, "asymmetric": False, **solver}
            return {"weight_format": f"int{self.bits}", "group_size": self.group_size, "asymmetric": self.asymmetric,
                    **solver}

        return gptq_model(model, _need_calib(self, calib, model), plan)


@dataclass(frozen=True)
class W4A4(_Checked):
    """ViT-aware W4A4 post-training quantization (see `quant.w4a4` for the method)."""
    name: str = "w4a4"
    weight_bits: int = 4
    act_bits: int = 4
    group_size: int | None = None           # weights: per output channel
    gptq: bool = True                       # weights by GPTQ (else round to nearest)
    softmax: str = "log2"                   # post-softmax quantizer: log2 (log-sqrt(2)) | uniform
    reparam_layernorm: bool = True          # RepQ-ViT scale reparameterization of post-LayerNorm inputs
    layer_formats: tuple[tuple[str, str], ...] = (("head", "int8"),)   # block layers: intB weights only

    def apply(self, model: nn.Module, calib: torch.Tensor | None = None) -> nn.Module:
        from quant.w4a4 import quantize_w4a4
        return quantize_w4a4(model, _need_calib(self, calib, model), self)


@dataclass(frozen=True)
class BitNet(_Checked):
    """BitNet quantization-aware training (`quant.bitlinear`): `apply` swaps in BitLinear layers with ternary
    (b1.58) or binary weights and per-token int8 activations after a LayerNorm (`input_norm`); the `skip`
    layers stay in floating point."""
    name: str
    weight_format: str                      # ternary | binary
    input_norm: bool = True
    skip: tuple[str, ...] = ("head",)

    def __post_init__(self):
        super().__post_init__()
        if self.weight_format not in ("ternary", "binary"):
            raise ValueError(f"recipe {self.name!r}: BitNet's weight_format is ternary or binary, "
                             f"got {self.weight_format!r}")

    def apply(self, model: nn.Module, calib: torch.Tensor | None = None) -> nn.Module:
        from quant.bitlinear import prepare
        return prepare(model, self.weight_format, self.input_norm, self.skip)


@dataclass(frozen=True)
class QViT(_Checked):
    """Q-ViT quantization-aware training (`quant.qvit`): `apply` swaps in layers with learnable scales and
    bit-widths in [min_bits, max_bits], trained under a BitOPs budget equal to a uniform `budget_bits`-bit model;
    with `learn_bits` off, every width stays at `budget_bits` (the head at 8) and only the scales learn (LSQ+)."""
    name: str = "qvit"
    budget_bits: float = 4.0
    min_bits: int = 2
    max_bits: int = 8
    learn_bits: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not self.min_bits <= self.budget_bits <= self.max_bits:
            raise ValueError(f"recipe {self.name!r}: min_bits <= budget_bits <= max_bits must hold, got "
                             f"{self.min_bits}, {self.budget_bits}, {self.max_bits}")
        if not self.learn_bits and self.budget_bits != int(self.budget_bits):
            raise ValueError(f"recipe {self.name!r}: with learn_bits off every width is budget_bits, a whole "
                             f"number of bits; got {self.budget_bits}")

    def apply(self, model: nn.Module, calib: torch.Tensor | None = None) -> nn.Module:
        from quant.qvit import prepare
        return prepare(model, budget_bits=self.budget_bits, learn_bits=self.learn_bits,
                       bits=(self.min_bits, self.max_bits))


QAT = BitNet | QViT                         # the recipes `python -m quant.qat` trains

Recipe = RTN | GPTQ | W4A4 | BitNet | QViT

RECIPES: dict[str, Recipe] = {r.name: r for r in [
    RTN("w8a8", "int8", group_size=None, asymmetric=False, act_format="int8_token", layer_formats=()),
    RTN("w4a8", "int4", group_size=None, asymmetric=False, act_format="int8_token"),
    GPTQ("w4a8-gptq", 4, group_size=None, asymmetric=False, act_format="int8_token"),
    RTN("w4", "int4"),
    RTN("w3", "int3"),
    RTN("w2", "int2"),
    RTN("nf4", "nf4"),
    GPTQ("w4-gptq", 4),
    GPTQ("w3-gptq", 3),
    GPTQ("w2-gptq", 2),
    W4A4(),
    BitNet("w1.58a8", "ternary"),
    BitNet("w1a8", "binary"),
    QViT(),
    QViT("lsq", learn_bits=False),
]}


def recipe(name: str, /, **overrides) -> Recipe:
    """The named recipe, with any of its fields overridden (`recipe("w4", group_size=128)`)."""
    if not isinstance(name, str) or name not in RECIPES:  # (a list is unhashable)
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    fields = [f.name for f in dataclasses.fields(RECIPES[name]) if f.name != "name"]
    if unknown := [key for key in overrides if key not in fields]:
        raise ValueError(f"recipe {name!r} has no field {unknown[0]!r}; its fields: {', '.join(fields)}")
    return dataclasses.replace(RECIPES[name], **overrides)   # checked by the recipe's __post_init__


def _check_patterns(r, model: nn.Module) -> None:
    """Each `layer_formats` pattern given (the recipe's default, the head at int8, holds only where there is
    a head) must match a linear layer: a mistyped one would quantize its layers at the recipe's width. So must
    each name BitNet's `skip` gives (the default, the head, aside): a mistyped one would quantize that layer.
    The defaults (and Q-ViT's 8-bit head) name the layer `head`: a model whose head is nested (`1.head` in
    nn.Sequential(prep, vit), `_orig_mod.head` once torch.compile'd) is refused rather than quantized whole."""
    defaults = {f.name: f.default for f in dataclasses.fields(r)}
    skip, given = getattr(r, "skip", ()), getattr(r, "layer_formats", ())
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    nested = next((n for n in linears if n.endswith(".head")), None) if "head" not in linears else None
    if nested and (isinstance(r, QViT) or skip == defaults.get("skip") or given == defaults.get("layer_formats")):
        field = "" if isinstance(r, QViT) else "skip" if isinstance(r, BitNet) else "layer_formats"
        raise ValueError(f"recipe {r.name!r} keeps the layer named 'head' at higher precision, and this model's "
                         f"head is {nested!r}: quantize the model inside, model.get_submodule("
                         f"{nested[:-len('.head')]!r}){f', or give {field} naming {nested!r}' if field else ''}")
    skip = () if skip == defaults.get("skip") else skip
    given = () if given == defaults.get("layer_formats") else given
    if not skip and not given:
        return
    names = _linears(model)
    listing = f"its linear layers: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
    if bad := next((s for s in skip if s not in names), None):
        raise ValueError(f"recipe {r.name!r}: skip names {bad!r}, which is not a linear layer of the model "
                         f"(skip takes layer names, not patterns; {listing})")
    for pattern, _ in given:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"recipe {r.name!r}: layer_formats pattern {pattern!r} matches no linear layer of "
                             f"the model ({listing})")


def quantize(model: nn.Module, recipe: Recipe | str, calib: torch.Tensor | None = None) -> nn.Module:
    """Quantize `model` in place with `recipe` (a Recipe or its name); returns the model: post-training recipes
    in eval mode, quantization-aware ones (BitNet, QViT) with their training-time layers, to be trained
    (QViT's learned step sizes first set by `quant.qvit.calibrate(model, x)`: before that they refuse to run).

    `calib` is a batch of model inputs (e.g. a few hundred normalised training images, (N, 3, H, W))
    for the recipes that calibrate (GPTQ, W4A4). The recipe is recorded on the model
    (`model.quant_recipe`) and in the file `quant.save_quantized` writes.
    """
    r = globals()["recipe"](recipe) if isinstance(recipe, str) else recipe
    if not dataclasses.is_dataclass(r) or isinstance(r, type) or not hasattr(r, "apply"):
        raise ValueError(f"not a recipe: {recipe!r} (give a name, e.g. 'w4', or quant.recipe(name, ...))")
    if not isinstance(model, nn.Module):
        raise ValueError(f"quantize takes a model (nn.Module), got {type(model).__name__}; load a file first "
                         f"(quant.models.load_model)")
    if type(model) is nn.Linear:  # else torch's "Cannot set the submodule without a target name!"
        raise ValueError("quantize replaces the linear layers inside a model and cannot replace the model itself: "
                         "give a model holding the layer (nn.Sequential(layer)), or quantize one layer with "
                         "quant.qlinear.QuantLinear.from_linear(layer, weight_format)")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes - {torch.float32}:
        raise ValueError(f"quantize a float32 model (this one holds {sorted(map(str, dtypes))}); cast the "
                         f"quantized model afterwards (.half(), .bfloat16())")
    made = next((n for n, t in model.state_dict(keep_vars=True).items() if t.is_inference()), None)
    if made is not None and not torch.is_inference_mode_enabled():
        raise ValueError(f"the model's {made} was made under torch.inference_mode, outside which torch lets it be "
                         f"neither changed nor used by autograd: quantize the model inside torch.inference_mode(), "
                         f"or load it outside")
    bad = next((n for n, p in model.named_parameters() if not p.is_meta and not torch.isfinite(p).all()), None)
    if bad is not None:
        raise ValueError(f"the model's {bad} holds NaN or infinite values: nothing to quantize")
    if not isinstance(r, QAT):   # QAT recipes only swap layers: a meta skeleton is fine
        refuse_meta(model, "post-training quantization")
    in_place = "quantize changes the model it is given in place: load it again, or quantize a copy.deepcopy(model)"
    if any(is_quantized_layer(m) for m in model.modules()):
        raise ValueError(f"the model is already quantized: quantize its full-precision original ({in_place})")
    if runs_on_kernels(model):
        raise ValueError(f"the model is already quantized, on bitvit's kernels (cuda_ops.to_kernels): quantize "
                         f"its full-precision original ({in_place})")
    first: dict[nn.Module, str] = {}   # a layer reached under two names would be swapped under the first only
    for name, m in model.named_modules(remove_duplicate=False):
        if type(m) is nn.Linear and first.setdefault(m, name) != name:
            raise ValueError(f"the model uses one linear layer as both {first[m]!r} and {name!r}, and quantizing "
                             f"would replace it under the first name only: quantize a model whose layers are not shared")
    _check_patterns(r, model)
    with unchanged_on_error(model):  # a refusal halfway (GPTQ's Hessian, say) leaves the model as it was
        if isinstance(r, QAT):
            model = r.apply(model, calib)
        else:
            model.eval()
            with torch.no_grad():
                model = r.apply(model, calib).eval()  # the layers it swapped in are built in training mode
    model.quant_recipe = {"type": type(r).__name__, **dataclasses.asdict(r)}
    return model
