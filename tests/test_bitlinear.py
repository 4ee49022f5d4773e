"""BitNet's training-time layers (binary w1a8, ternary w1.58a8) and their freezing into packed QuantLinear layers."""
import pytest
import torch
import torch.nn as nn

import quant
from quant import bitlinear
from quant.bitlinear import BitLinear, freeze, prepare
from quant.qlinear import QuantLinear
from quant.quantizers import quantize_int8_token, quantize_weight


def layer(fmt, norm=True):
    torch.manual_seed(0)
    return BitLinear.from_linear(nn.Linear(16, 8), fmt, input_norm=norm)


def test_ternary_weights_are_absmean_scaled_minus_one_zero_one():
    w = layer("ternary").quantized_weight().detach()
    beta = layer("ternary").weight.abs().mean()
    assert torch.allclose(w.unique().abs().unique(), torch.stack([torch.zeros(()), beta]), rtol=1e-3)


def test_binary_weights_are_sign_of_mean_centred_weight_times_mean_abs():
    m = layer("binary")
    w = m.quantized_weight().detach()
    centred = m.weight.detach() - m.weight.detach().mean()
    assert torch.equal(torch.sign(w), torch.where(centred >= 0, 1.0, -1.0))
    assert torch.allclose(w.abs(), m.weight.abs().mean().expand_as(w), rtol=1e-3)


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
def test_gradient_passes_straight_through_to_latent_weights(fmt):
    m = layer(fmt, norm=False)
    x = torch.randn(5, 16)
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    q, s = quantize_int8_token(x)
    x_hat = q.float() * s  # (5, 16): what the quantized weights multiply
    assert torch.allclose(m.weight.grad, g.T @ x_hat, atol=1e-5)  # dL/dW as if W_q were W itself


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
def test_frozen_layer_computes_the_fake_quantized_forward(fmt):
    m = layer(fmt)
    x = torch.randn(3, 7, 16)
    q = m.freeze()
    assert isinstance(q, QuantLinear) and q.weight_format == fmt and q.act_format == "int8_token"
    assert torch.allclose(q(x), m(x), atol=1e-5)


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
def test_a_frozen_and_reloaded_model_gives_its_training_forms_logits_bit_for_bit(tiny_model, tmp_path, fmt):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 16, 16)
    model = prepare(tiny_model, fmt)
    with torch.no_grad():  # a trained student: latent weights and input norms away from their start
        for m in model.modules():
            if isinstance(m, BitLinear):
                m.weight.add_(0.05 * torch.randn_like(m.weight))
                m.input_norm.weight.normal_(1.0, 0.5)
                m.input_norm.bias.normal_(0.0, 0.5)
    model.eval()
    with torch.no_grad():
        want = model(x)
        freeze(model)
        assert torch.equal(model(x), want)
        quant.save_quantized(model, tmp_path / "m.safetensors")
        assert torch.equal(quant.load_quantized(tmp_path / "m.safetensors")(x), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_student_cast_to_half_precision_freezes_into_layers_of_its_dtype(tiny_model, dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16, dtype=dtype)
    model = prepare(tiny_model, "ternary").to(dtype).eval()
    with torch.no_grad():
        want = model(x)
        freeze(model)
        assert {p.dtype for p in model.parameters()} == {dtype}
        assert torch.equal(model(x), want)


def test_freezing_a_student_on_the_meta_device_is_refused_naming_a_tensor_without_values(tiny_model):
    model = prepare(tiny_model, "ternary").to("meta")
    with pytest.raises(ValueError, match="is on the meta device, without values: load its weights before freezing"):
        freeze(model)


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
def test_input_gradient_is_the_straight_through_estimators(fmt):
    m = layer(fmt, norm=False)
    x = torch.randn(4, 5, 16, requires_grad=True)
    g = torch.randn(4, 5, 8)
    (m(x) * g).sum().backward()
    assert torch.allclose(x.grad, g @ m.quantized_weight().detach(), atol=1e-5)


def test_unknown_weight_format_is_refused():
    with pytest.raises(ValueError, match="binary or ternary"):
        BitLinear(4, 4, weight_format="int4")


def test_a_format_added_to_bitlinears_formats_packs_its_own_codes_not_binary_ones(monkeypatch):
    monkeypatch.setattr(bitlinear, "FORMATS", (*bitlinear.FORMATS, "int2"))  # a third BitNet format, say
    m = layer("int2")
    assert torch.equal(m.freeze().codes(), quantize_weight(m.weight, "int2").codes)


def test_prepare_keeps_the_head_and_freeze_saves_and_loads(tiny_model, tmp_path):
    x = torch.randn(2, 3, 16, 16)
    model = prepare(tiny_model, "ternary")
    assert isinstance(model.head, nn.Linear) and isinstance(model.blocks[0].attn.qkv, BitLinear)
    model.eval()
    want = model(x)
    freeze(model)
    assert not any(isinstance(m, BitLinear) for m in model.modules())
    assert torch.allclose(model(x), want, atol=1e-4)
    quant.save_quantized(model, tmp_path / "t.safetensors")
    assert torch.allclose(quant.load_quantized(tmp_path / "t.safetensors")(x), want, atol=1e-4)


def test_fitted_input_norms_bring_the_model_closer_to_its_full_precision_function(tiny_model):
    import copy
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    want = tiny_model(x)
    fresh = prepare(copy.deepcopy(tiny_model), "ternary")
    fitted = prepare(copy.deepcopy(tiny_model), "ternary")
    from quant.bitlinear import init_input_norms
    init_input_norms(fitted, x)
    assert (fitted(x) - want).pow(2).mean() < 0.5 * (fresh(x) - want).pow(2).mean()


def test_fitted_input_norm_recovers_the_affine_map_its_layernorm_removed():
    from quant.bitlinear import init_input_norms
    m = layer("ternary")
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    z = (z - z.mean(1, keepdim=True)) / z.std(1, unbiased=False, keepdim=True)   # already normalised tokens
    init_input_norms(m, 3.0 * z + 0.5)                                           # LN(y) = z exactly
    assert torch.allclose(m.input_norm.weight, torch.full((16,), 3.0), atol=1e-3)
    assert torch.allclose(m.input_norm.bias, torch.full((16,), 0.5), atol=1e-3)


def test_fitting_input_norms_on_one_token_gives_finite_parameters():
    from quant.bitlinear import init_input_norms
    m = layer("binary")
    init_input_norms(m, torch.randn(1, 16))  # every channel constant over the batch: nothing to fit
    assert torch.isfinite(m.input_norm.weight).all() and torch.isfinite(m.input_norm.bias).all()


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
def test_a_zero_input_row_gives_the_bias_and_finite_gradients_in_training(fmt):
    m = layer(fmt, norm=False)
    x = torch.zeros(2, 16, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert torch.equal(y, m.bias.expand(2, 8)) and torch.isfinite(x.grad).all()


def test_prepare_leaves_the_skipped_head_a_plain_linear_layer(tiny_model):
    assert type(prepare(tiny_model, "binary").head) is nn.Linear   # BitLinear is an nn.Linear too
