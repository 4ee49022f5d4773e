"""W4A4: LayerNorm reparameterization is exact, and each activation gets the quantizer the method says."""
import pytest
import torch
import torch.nn as nn

import quant
from quant.qattention import QuantAttention
from quant.qlinear import QuantLinear
from quant.quantizers import Log2Quantizer, UniformQuantizer
from quant.recipes import W4A4
from quant.w4a4 import (_quantize_linear, channel_ranges, log2_offsets, reparameterize_layernorm,
                        tensor_range)


def norm_and_linear(k=24, seed=0):
    torch.manual_seed(seed)
    norm, lin = nn.LayerNorm(k), nn.Linear(k, 10)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(k) * 4 + 0.1)        # channels with very different spreads
        norm.bias.copy_(torch.randn(k))
    return norm, lin


def fake(x, s, z, bits=4):
    return (torch.clamp(torch.round(x / s) + z, 0, 2 ** bits - 1) - z) * s


def test_reparameterization_keeps_the_float_output():
    norm, lin = norm_and_linear()
    x = torch.randn(200, 24)
    ref = lin(norm(x))
    s_c, z_c = channel_ranges(norm(x).detach(), 4)
    reparameterize_layernorm(norm, lin, s_c, z_c)
    assert torch.allclose(lin(norm(x)), ref, atol=1e-4)


def test_reparameterization_keeps_the_float_output_of_a_linear_layer_without_bias():
    norm, _ = norm_and_linear()
    lin = nn.Linear(24, 10, bias=False)                     # timm's qkv_bias=False
    x = torch.randn(200, 24)
    ref = lin(norm(x))
    s_c, z_c = channel_ranges(norm(x).detach(), 4)
    reparameterize_layernorm(norm, lin, s_c, z_c)
    assert torch.allclose(lin(norm(x)), ref, atol=1e-4)


@pytest.mark.parametrize("norm", [nn.LayerNorm(24, elementwise_affine=False), nn.LayerNorm(24, bias=False)],
                         ids=["no-affine", "no-bias"])
def test_a_layer_norm_without_weight_and_bias_is_refused_before_anything_changes(norm):
    lin = nn.Linear(24, 10)
    before = lin.weight.clone()
    s_c, z_c = channel_ranges(norm(torch.randn(200, 24)).detach(), 4)
    with pytest.raises(ValueError, match="needs a LayerNorm with both"):
        reparameterize_layernorm(norm, lin, s_c, z_c)
    assert torch.equal(lin.weight, before)


@pytest.mark.parametrize("norm", [nn.RMSNorm(32), nn.Identity()], ids=["rms-norm", "identity"])
def test_a_block_norm_that_is_no_layer_norm_is_refused_with_one_clear_error(tiny_model, norm):
    tiny_model.blocks[0].norm1 = norm                         # it raised AttributeError (no bias, no weight)
    with pytest.raises(ValueError, match="needs a LayerNorm with both.*reparam_layernorm=False"):
        quant.quantize(tiny_model, "w4a4", calib=torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("gptq", [True, False])
def test_calibration_inputs_driving_a_layers_inputs_to_nan_are_refused_naming_the_layer(tiny_model, gptq):
    calib = torch.randn(2, 3, 16, 16) * 1e20                 # finite, but block 0's LayerNorm overflows
    # GPTQ blamed its Hessian (advising a damp the recipe has no field for); round to nearest gave a NaN model
    with pytest.raises(ValueError, match="inputs of block 0's qkv are NaN or infinite on the calibration"):
        quant.quantize(tiny_model, quant.recipe("w4a4", gptq=gptq), calib=calib)


def test_per_tensor_quantizer_after_reparameterization_equals_per_channel_before():
    norm, lin = norm_and_linear()
    x = torch.randn(200, 24)
    y = norm(x).detach()
    s_c, z_c = channel_ranges(y, 4)
    per_channel = lin(fake(y, s_c, z_c))
    s, z = reparameterize_layernorm(norm, lin, s_c, z_c)
    assert s.ndim == 0 and z.ndim == 0
    per_tensor = lin(fake(norm(x).detach(), s, z))
    assert torch.allclose(per_tensor, per_channel, atol=1e-4)


def test_output_aware_range_clips_a_rare_outlier():
    x = torch.rand(4000, 16)
    x[0, 0] = 50.0                                       # one token far out
    s, z = tensor_range(x, 4, weight=torch.randn(8, 16))
    assert (15 - z) * s < 25                             # the range does not stretch to 50


def test_head_wise_range_per_head():
    x = torch.randn(2, 3, 5, 4) * torch.tensor([1.0, 10.0, 100.0]).view(1, 3, 1, 1)
    s, z = tensor_range(x, 4, dims=(0, 2, 3))
    assert s.shape == (1, 3, 1, 1) and s[0, 0] < s[0, 1] < s[0, 2]


@pytest.mark.parametrize("bias", [True, False])
def test_bias_correction_leaves_no_mean_output_error_on_the_calibration_tokens(bias):
    torch.manual_seed(0)
    layer = nn.Linear(32, 8, bias=bias)
    x = torch.rand(2000, 32) * 3 - 0.2                   # skewed, like a post-GELU input
    s, z = tensor_range(x, 4)
    ql = _quantize_linear(layer, x, s, z, W4A4(), 4)
    with torch.no_grad():
        err = ql(x) - layer(x)
    assert err.mean(0).abs().max() < 1e-4 < err.abs().mean()    # rounding errors remain, their mean does not


def test_gptq_weighs_the_weight_error_by_the_layers_inputs_after_their_4_bit_rounding():
    from quant.gptq import gptq_weight, hessian
    torch.manual_seed(0)
    layer = nn.Linear(32, 8)
    x = torch.randn(2000, 32) @ torch.randn(32, 32) * 0.3
    x[:, 0] *= 20                                        # one wide channel sets the range: the others round coarsely
    s, z = tensor_range(x, 4)
    ql = _quantize_linear(layer, x, s, z, W4A4(), 4)
    want = gptq_weight(layer.weight, hessian(fake(x, s, z)), 4, None, asymmetric=False)   # 131 codes differ with x's
    assert torch.equal(ql.codes(), want.codes)


def test_softmax_offset_follows_each_heads_attention():
    n = 512
    diffuse = torch.full((n, n), 1.0 / n)                # every probability 2**-9, below offset 0's levels
    peaked = torch.eye(n)                                # one probability of 1 per row
    p = torch.stack([diffuse, peaked])[None]             # (1, 2, N, N)
    offsets = log2_offsets(p, torch.randn(1, 2, n, 8), 4)
    assert offsets[0] >= 4 and offsets[1] == 0


def test_w4a4_puts_each_quantizer_in_its_place(tiny_model):
    x = torch.randn(16, 3, 16, 16)
    ref = tiny_model(x)
    model = quant.quantize(tiny_model, "w4a4", calib=x)
    for block in model.blocks:
        attn = block.attn
        assert isinstance(attn, QuantAttention)
        for slot in ("q_quant", "k_quant", "v_quant"):
            assert isinstance(getattr(attn, slot), UniformQuantizer)
            assert getattr(attn, slot).scale.shape == (1, 2, 1, 1)      # one range per head
        assert isinstance(attn.attn_quant, Log2Quantizer) and attn.attn_quant.n_bits == 4
        for layer in (attn.qkv, attn.proj, block.mlp.fc1, block.mlp.fc2):
            assert isinstance(layer, QuantLinear)
            assert (layer.weight_format, layer.act_format) == ("int4", "uint4_tensor")
            assert layer.group_size == layer.in_features                 # per output channel
    assert (model.head.weight_format, model.head.act_format) == ("int8", "int8_token")
    assert torch.isfinite(model(x)).all()
    assert (model(x).argmax(1) == ref.argmax(1)).float().mean() > 0.5


def test_a_layer_formats_pattern_sets_the_weight_width_of_block_layers(tiny_model):
    r = quant.recipe("w4a4", layer_formats=(("head", "int8"), ("blocks.0.mlp.*", "int8")))
    model = quant.quantize(tiny_model, r, calib=torch.randn(8, 3, 16, 16))
    widths = {n: m.weight_format for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert widths["blocks.0.mlp.fc1"] == widths["blocks.0.mlp.fc2"] == "int8"
    assert widths["blocks.0.attn.qkv"] == widths["blocks.1.mlp.fc1"] == "int4"
    assert model.blocks[0].mlp.fc1.act_format == "uint4_tensor"        # the inputs stay at act_bits


def test_a_layer_formats_pattern_giving_a_block_layer_a_non_integer_format_is_refused(tiny_model):
    r = quant.recipe("w4a4", layer_formats=(("head", "int8"), ("blocks.*.attn.qkv", "nf4")))
    with pytest.raises(ValueError, match="'blocks.0.attn.qkv' int2..int8, not 'nf4'"):
        quant.quantize(tiny_model, r, calib=torch.randn(8, 3, 16, 16))


def test_a_block_layer_given_a_format_named_like_intb_that_is_no_uniform_grid_is_refused(tiny_model, monkeypatch):
    monkeypatch.setitem(quant.quantizers.WEIGHT_FORMATS, "int2s", 2)  # a new format: "int" in its name only
    r = quant.recipe("w4a4", layer_formats=(("head", "int8"), ("blocks.*.attn.qkv", "int2s")))
    with pytest.raises(ValueError, match="'blocks.0.attn.qkv' int2..int8, not 'int2s'"):
        quant.quantize(tiny_model, r, calib=torch.randn(8, 3, 16, 16))


class HeadlessAttention(nn.Module):
    """qkv and proj as in a ViT, but the head count under another name (no num_heads, head_dim)."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))


def test_a_block_whose_attention_has_no_head_count_is_refused_with_one_clear_error():
    block = nn.Module()
    block.norm1, block.attn, block.norm2 = nn.LayerNorm(16), HeadlessAttention(), nn.LayerNorm(16)
    block.mlp = nn.Module()
    block.mlp.fc1, block.mlp.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
    model = nn.Sequential(block, nn.Linear(16, 3))   # (never run: refused before calibrating)
    with pytest.raises(ValueError, match="integer num_heads and head_dim.*HeadlessAttention"):
        quant.quantize(model, quant.recipe("w4a4", layer_formats=(("1", "int8"),)), calib=torch.randn(2, 5, 16))


class QKNormAttention(nn.Module):
    """timm's attention with qk_norm=True: a LayerNorm on each head's queries and keys, which QuantAttention lacks."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm, self.attn_drop = nn.LayerNorm(dim // heads), nn.LayerNorm(dim // heads), nn.Dropout()

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = nn.functional.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


def test_an_attention_with_a_module_quant_attention_would_drop_is_refused_naming_it(tiny_model):
    tiny_model.blocks[1].attn = QKNormAttention()            # its q_norm and k_norm were dropped without a word
    with pytest.raises(ValueError, match=r"would drop this model's QKNormAttention.q_norm \(LayerNorm\)"):
        quant.quantize(tiny_model, "w4a4", calib=torch.randn(2, 3, 16, 16))


def test_a_model_whose_blocks_do_not_feed_each_other_directly_is_refused(tiny_model):
    b0, b1 = tiny_model.blocks
    tiny_model.blocks = nn.Sequential(b0, nn.LayerNorm(32), b1)   # block 1 was calibrated on block 0's raw outputs
    with pytest.raises(ValueError, match=r"blocks \(blocks.0, blocks.2\) do not run one after another"):
        quant.quantize(tiny_model, "w4a4", calib=torch.randn(2, 3, 16, 16))


def test_softmax_offset_candidates_reach_the_largest_offset():
    p = torch.full((1, 1, 4, 4), 2.0 ** -14)             # exactly offset 14's smallest level (code 14 of 0..15)
    assert log2_offsets(p, torch.randn(1, 1, 4, 2), 4) == [14]


def test_head_outputs_and_post_gelu_inputs_get_output_aware_ranges(tiny_model, monkeypatch):
    import quant.w4a4 as w4a4
    real, per_tensor = w4a4.tensor_range, []

    def spy(x, bits, weight=None, dims=None):
        if dims is None:                                 # per-tensor ranges: proj's and fc2's inputs
            per_tensor.append(weight is not None)
        return real(x, bits, weight, dims)
    monkeypatch.setattr(w4a4, "tensor_range", spy)
    quant.quantize(tiny_model, "w4a4", calib=torch.randn(8, 3, 16, 16))
    assert per_tensor == [True] * 4                      # 2 blocks x (proj, fc2), each with its layer's weight


def test_bias_correction_sees_the_inputs_after_the_layer_norm_is_reparameterized(tiny_model):
    import copy
    from quant.gptq import capture
    x = torch.randn(16, 3, 16, 16)
    fp = copy.deepcopy(tiny_model)
    model = quant.quantize(tiny_model, "w4a4", calib=x)
    want = capture(fp, fp.blocks[0].attn.qkv, x, output=True)          # block 0's qkv: inputs as in float
    got = capture(model, model.blocks[0].attn.qkv, x, output=True)
    assert (got - want).mean((0, 1)).abs().max() < 1e-4 < (got - want).abs().mean()


def test_the_range_search_keeps_the_clip_of_least_error_on_the_4_bit_grid():
    from quant.quantizers import uint_range_params
    from quant.w4a4 import _CLIPS
    torch.manual_seed(0)
    x = torch.nn.functional.gelu(torch.randn(4000, 16) * 2)    # post-GELU: a long positive tail
    errors = [((fake(x, *uint_range_params(x.min() * c, x.max() * c, 4)) - x) ** 2).sum() for c in _CLIPS.tolist()]
    s, z = tensor_range(x, 4)
    assert ((fake(x, s, z) - x) ** 2).sum() <= min(errors) * (1 + 1e-6)


def test_w4a4_calibrates_the_softmax_offsets_on_the_attention_it_sees():
    import dataclasses
    from conftest import TINY
    from quant.models import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(dataclasses.replace(TINY, img_size=64)).eval()          # 257 tokens
    with torch.no_grad():
        for block in model.blocks:                       # q = 0: uniform attention, 1/257 everywhere
            block.attn.qkv.weight[:32] = 0
            block.attn.qkv.bias[:32] = 0
            block.attn.qkv.bias[64:] = 1                 # values far from zero: flushing the weights costs
    model = quant.quantize(model, "w4a4", calib=torch.randn(2, 3, 64, 64))
    offsets = [block.attn.attn_quant.offset.flatten().tolist() for block in model.blocks]
    assert offsets == [[2.0, 2.0]] * 2                   # 1/257 ~ 2**-8: offset 2's smallest level (0 flushes it)


def test_a_later_block_is_calibrated_on_the_outputs_of_the_quantized_blocks_before_it(tiny_model):
    import copy
    from quant.gptq import capture
    x = torch.randn(16, 3, 16, 16)
    fp = copy.deepcopy(tiny_model)
    model = quant.quantize(tiny_model, "w4a4", calib=x)
    fc2 = model.blocks[1].mlp.fc2                        # its float weight is not reparameterized
    s, z = tensor_range(capture(model, fc2, x), 4, fp.blocks[1].mlp.fc2.weight.detach())
    torch.testing.assert_close(fc2.act_quant.scale, s.reshape(()))
    torch.testing.assert_close(fc2.act_quant.zero, z.reshape(()))


def test_fc1_is_calibrated_on_inputs_that_passed_through_the_quantized_proj(tiny_model):
    """Layers are quantized in forward order (qkv, proj, fc1, fc2), so fc1's range (and GPTQ Hessian) come from
    the inputs it sees once its block's proj is quantized, not from those of a float proj."""
    import copy
    from quant.gptq import capture
    x = torch.randn(16, 3, 16, 16)
    fp = copy.deepcopy(tiny_model)
    model = quant.quantize(tiny_model, W4A4(reparam_layernorm=False), calib=x)   # fc1's float weight kept
    fc1 = model.blocks[0].mlp.fc1
    s, z = tensor_range(capture(model, fc1, x), 4, fp.blocks[0].mlp.fc1.weight.detach())
    torch.testing.assert_close(fc1.act_quant.scale, s.reshape(()))
    torch.testing.assert_close(fc1.act_quant.zero, z.reshape(()))


def test_a_state_dict_round_trip_keeps_the_calibrated_softmax_offsets(tiny_model):
    import copy
    import io
    x = torch.randn(8, 3, 16, 16)
    model = quant.quantize(copy.deepcopy(tiny_model), "w4a4", calib=x)
    fresh = quant.quantize(tiny_model, "w4a4", calib=x)
    with torch.no_grad():
        model.blocks[0].attn.attn_quant.offset.fill_(5)      # as calibrated on other images
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert fresh.blocks[0].attn.attn_quant.offsets == model.blocks[0].attn.attn_quant.offsets
    assert torch.equal(fresh(x), model(x))
