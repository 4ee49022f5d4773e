"""bitvit's quantization core: `quantize(model, recipe)`, the QuantLinear layer and quantized model files.

    import quant
    model = quant.quantize(model, "w4-gptq", calib=images)   # see quant.recipes for every recipe
    quant.save_quantized(model, "vit_w4.safetensors")
    model = quant.load_any("vit_w4.safetensors")             # a full-precision or a quantized file
"""
from quant.packfile import load_any, load_quantized, read_header, save_quantized
from quant.qattention import QuantAttention
from quant.qlinear import QuantLinear
from quant.recipes import RECIPES, quantize, recipe

__all__ = ["QuantAttention", "QuantLinear", "RECIPES", "load_any", "load_quantized", "quantize", "read_header",
           "recipe", "save_quantized"]
