"""Quantizers: the values each one produces, their code ranges, and their straight-through gradients."""
import pytest
import torch

from quant.quantizers import (NF4_CODEBOOK, WEIGHT_FORMATS, Log2Quantizer, UniformQuantizer, code_values, dequantize,
                              double_dequantize, double_quantize, fake_quant_log2, fake_quant_uniform,
                              log2_dequantize, nf4_codes, quantize_binary, quantize_int8_token,
                              quantize_log2, quantize_nf4, quantize_ternary, quantize_uniform,
                              quantize_weight, quantizer_from_spec, quantizer_spec, ste, uniform_codes,
                              uniform_dequantize)


def weight(o=6, k=40, seed=0):
    return torch.randn(o, k, generator=torch.Generator().manual_seed(seed))


# -- uniform


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_uniform_error_is_at_most_half_a_step(bits):
    w = weight()
    q = quantize_uniform(w, bits, group_size=16)
    assert q.zeros is None and q.scales.shape == (6, 3)
    w_hat = uniform_dequantize(q.codes, q.scales, None, bits, 16)
    step = q.scales.repeat_interleave(16, 1)[:, :40]
    assert ((w_hat - w).abs() <= step / 2 + 1e-6).all()
    assert int(q.codes.max()) < 2 ** bits


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_asymmetric_uniform_uses_the_full_range_of_codes(bits):
    w = weight().abs() + 0.5            # all positive: an asymmetric grid still includes 0
    q = quantize_uniform(w, bits, group_size=None, symmetric=False)
    assert q.zeros is not None and (q.zeros == 0).all()
    assert (q.codes.amax(1) == 2 ** bits - 1).all()
    w_hat = uniform_dequantize(q.codes, q.scales, q.zeros, bits, 40)
    assert ((w_hat - w).abs() <= q.scales / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [5, 6, 7, 8])
def test_asymmetric_uniform_error_is_at_most_half_a_step(bits):
    """The float16 scale must still cover the group's range: rounded down, it clipped the extreme weights
    (by up to 0.1 step at 8 bits) once the zero point's rounding had used the half step of slack."""
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    q = quantize_uniform(w, bits, group_size=16, symmetric=False)
    w_hat = uniform_dequantize(q.codes, q.scales, q.zeros, bits, 16)
    assert ((w_hat - w).abs() <= q.scales.repeat_interleave(16, 1) / 2 + 1e-6).all()


def test_signed_codes_are_offset_by_half_the_range():
    w = torch.tensor([[-7.0, 0.0, 7.0, 3.0]])
    q = quantize_uniform(w, 4)
    assert q.scales.item() == 1.0 and q.codes.tolist() == [[1, 8, 15, 11]]
    assert code_values(q.codes, "int4").tolist() == [[-7, 0, 7, 3]]


def test_scales_are_float16_exact():
    q = quantize_uniform(weight(), 4, group_size=8)
    assert torch.equal(q.scales.half().float(), q.scales)


def test_uniform_fake_quant_passes_the_gradient_straight_through():
    w = weight().requires_grad_()
    out = fake_quant_uniform(w, 4, group_size=8)
    q = quantize_uniform(w, 4, group_size=8)
    assert torch.equal(out.detach(), uniform_dequantize(q.codes, q.scales, None, 4, 8))
    (out * torch.arange(40.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(40.0).expand(6, 40))


def test_the_straight_through_estimator_gives_the_quantized_values_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1000, generator=g) * 0.3).requires_grad_()
    x_hat = torch.randn(1000, generator=g) * 100           # x + (x_hat - x) misses 13 of them by an ulp
    assert torch.equal(ste(x, x_hat), x_hat)


def test_each_group_scale_comes_from_its_own_inputs_only():
    q = quantize_uniform(torch.tensor([[1.0, 1.0, 1.0, 1.0, 8.0, 8.0, 8.0, 8.0]]), 4, group_size=4)
    assert q.scales.tolist() == [[torch.tensor(1 / 7).half().item(), torch.tensor(8 / 7).half().item()]]


@pytest.mark.parametrize("bits", [1, 9])
def test_uniform_weight_codes_need_2_to_8_bits(bits):
    with pytest.raises(ValueError, match="need 2..8 bits"):
        quantize_uniform(weight(), bits)


def test_asymmetric_grid_of_an_all_negative_weight_ends_at_zero():
    w = -weight().abs() - 0.5           # all negative: the grid's top code stands for 0
    q = quantize_uniform(w, 3, group_size=None, symmetric=False)
    assert (q.zeros == 7).all() and (q.codes.amin(1) == 0).all()
    w_hat = uniform_dequantize(q.codes, q.scales, q.zeros, 3, 40)
    assert ((w_hat - w).abs() <= q.scales / 2 + 1e-6).all()


def test_asymmetric_zero_point_is_the_nearest_code_to_zero():
    q = quantize_uniform(torch.tensor([[-1.0, 3.0]]), 4, symmetric=False)   # -lo / scale = 1 / (4 / 15) = 3.75
    assert q.zeros.item() == 4 and q.codes.tolist() == [[0, 15]]


def test_uniform_codes_clip_values_beyond_the_grid_to_the_end_codes():
    codes = uniform_codes(torch.tensor([[100.0, -100.0, 2.0]]), torch.ones(1, 1), None, 4, 3)
    assert codes.tolist() == [[15, 0, 10]]


def test_an_all_zero_weight_row_gets_the_zero_code_and_a_positive_scale():
    q = quantize_uniform(torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]]), 4)
    assert q.codes[0].tolist() == [8, 8, 8] and q.scales[0].item() == 2.0 ** -24


@pytest.mark.parametrize("symmetric", [True, False])
def test_scales_beyond_float16_range_stay_float32_and_clip_no_weight(symmetric):
    w = torch.tensor([[1e6, -2.3e5, 3e5]])
    q = quantize_uniform(w, 4, symmetric=symmetric)
    assert q.scales.item() > 65504.0   # saturated at 65504, 1e6 came back as 7 * 65504 = 458528
    assert ((uniform_dequantize(q.codes, q.scales, q.zeros, 4, 3) - w).abs() <= q.scales / 2).all()


def test_a_ternary_scale_beyond_float16_range_stays_float32():
    w = torch.tensor([[1e5, -1e5]])
    q = quantize_ternary(w)
    assert torch.equal((q.codes.float() - 1) * q.scales, w)


def test_uniform_fake_quant_keeps_the_weight_dtype():
    assert fake_quant_uniform(weight().half(), 4, group_size=8).dtype == torch.float16


# -- NF4 and double quantization


def test_nf4_codebook_is_qloras():
    assert NF4_CODEBOOK.shape == (16,) and NF4_CODEBOOK[7] == 0
    assert NF4_CODEBOOK[0] == -1 and NF4_CODEBOOK[15] == 1
    # QLoRA's published levels (bitsandbytes' NF4 table)
    assert NF4_CODEBOOK[1].item() == pytest.approx(-0.6961928009986877, abs=1e-6)
    assert NF4_CODEBOOK[8].item() == pytest.approx(0.07958029955625534, abs=1e-6)
    assert NF4_CODEBOOK[14].item() == pytest.approx(0.7229568362236023, abs=1e-6)


def test_nf4_picks_the_nearest_level():
    w = weight(4, 64)
    q, _ = quantize_nf4(w, 32, double_quant=False)
    x = w / q.scales.repeat_interleave(32, 1)
    nearest = (x.unsqueeze(-1) - NF4_CODEBOOK).abs().argmin(-1)
    assert torch.equal(q.codes.long(), nearest)
    assert torch.allclose(dequantize(q.codes, q.scales, None, "nf4", 32), NF4_CODEBOOK[nearest] * q.scales.repeat_interleave(32, 1))


@pytest.mark.parametrize("spread", [0.1, 1e-4])
def test_double_quantization_round_trip_is_close_and_stable(spread):
    scales = torch.rand(30, 17) * spread + 0.02   # 510 scales: two blocks of 256, the last one short
    dq = double_quantize(scales)
    assert dq.codes.dtype == torch.int8 and dq.codes.shape == (30, 17) and dq.absmax.shape == (2,)
    back = double_dequantize(dq)
    step = (scales - scales.mean()).abs().max() / 127   # the mean removed, the spread sets the step, not the size
    assert (back - scales).abs().max() <= step / 2 + 1e-8
    assert torch.equal(double_quantize(back).codes, dq.codes)  # stable: quantizing again keeps the codes


def test_double_quantization_gives_each_block_of_256_scales_its_own_absmax():
    scales = torch.cat([torch.rand(256) * 0.1 + 0.02, torch.full((254,), 0.05)]).reshape(30, 17)
    back = double_dequantize(double_quantize(scales)).flatten()
    torch.testing.assert_close(back[256:], scales.flatten()[256:], rtol=1e-6, atol=0)  # code +-127 of its absmax


def test_nf4_codes_are_chosen_against_the_double_quantized_scales():
    w = weight(64, 1024)
    q, dq = quantize_nf4(w, 64)
    assert torch.equal(q.scales, double_dequantize(dq))
    x = w / q.scales.repeat_interleave(64, 1)  # against the raw absmax scales 209 of these codes differ
    assert torch.equal(q.codes.long(), (x.unsqueeze(-1) - NF4_CODEBOOK).abs().argmin(-1))
    rel = (dequantize(q.codes, q.scales, None, "nf4", 64) - w).norm() / w.norm()
    assert rel < 0.12


def test_nf4_codes_an_all_zero_group_at_the_zero_level():
    assert nf4_codes(torch.zeros(1, 4), torch.zeros(1, 1), 4).tolist() == [[7, 7, 7, 7]]


def test_double_dequantized_scales_are_never_negative():
    dq = double_quantize(torch.tensor([[0.0, 0.0, 0.0, 0.0, 10.0]]))   # the zeros' code -32 alone gives -0.016
    assert double_dequantize(dq).tolist() == [[0.0, 0.0, 0.0, 0.0, 10.0]]


def test_nf4_scales_are_double_quantized_in_blocks_of_256():
    _, dq = quantize_nf4(weight(64, 640), 64)        # 640 scales: three blocks
    assert dq.block == 256 and dq.absmax.shape == (3,)


def test_nf4_weight_codes_default_to_groups_of_64():
    assert quantize_weight(weight(4, 128), "nf4").scales.shape == (4, 2)


@pytest.mark.parametrize("fmt", ["int4", "nf4"])
@pytest.mark.parametrize("group_size", [-5, 2.5])
def test_a_group_size_that_is_not_a_positive_integer_is_refused(fmt, group_size):
    with pytest.raises(ValueError, match=f"group_size must be a positive integer, got {group_size}"):
        quantize_weight(weight(), fmt, group_size)


# -- ternary and binary


def test_ternary_is_absmean_round_clip():
    w = torch.tensor([[0.9, -0.1, -2.0, 0.6], [0.2, 0.0, -0.5, 1.5]])
    gamma = w.abs().mean()                      # 0.725
    q = quantize_ternary(w)
    assert q.codes.tolist() == [[2, 1, 0, 2], [1, 1, 0, 2]]   # round(w / 0.725) clipped, + 1
    assert q.scales.shape == (2, 1) and q.scales[0, 0].item() == pytest.approx(gamma.item(), rel=1e-3)
    assert torch.equal(dequantize(q.codes, q.scales, None, "ternary", 4), (q.codes.float() - 1) * q.scales)


def test_binary_is_sign_of_the_mean_centred_weight_times_mean_abs():
    w = torch.tensor([[1.0, 2.0, 3.0, -6.0]])    # mean 0: sign(w - 0); beta = mean|w| = 3
    q = quantize_binary(w)
    assert q.codes.tolist() == [[1, 1, 1, 0]] and q.scales.item() == 3.0
    w2 = torch.tensor([[1.0, 2.0, 3.0, 6.0]])    # mean 3: only 3 and 6 are >= the mean
    assert quantize_binary(w2).codes.tolist() == [[0, 0, 1, 1]]
    q2 = quantize_binary(w2)
    assert dequantize(q2.codes, q2.scales, None, "binary", 4).tolist() == [[-3.0, -3.0, 3.0, 3.0]]
    assert code_values(q.codes, "binary").tolist() == [[1, 1, 1, -1]]


@pytest.mark.parametrize("fmt", ["ternary", "binary", "int4", "nf4"])
def test_dequantize_is_code_value_times_group_scale(fmt):
    codes = torch.randint(0, 2 if fmt == "binary" else 3, (3, 10), dtype=torch.uint8)
    scales = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    w = dequantize(codes, scales, None, fmt, 5)
    assert torch.equal(w, code_values(codes, fmt) * scales.repeat_interleave(5, 1))


@pytest.mark.parametrize("quantize", [lambda: code_values(torch.zeros(2, 2, dtype=torch.uint8), "fp8"),
                                      lambda: quantize_weight(weight(), "fp8")])
def test_an_unknown_weight_format_is_refused_naming_the_known_ones(quantize):
    with pytest.raises(ValueError, match="unknown weight format 'fp8'; known: int8, .*binary"):
        quantize()


@pytest.mark.parametrize("quantize", [lambda: code_values(torch.zeros(2, 2, dtype=torch.uint8), "sym2"),
                                      lambda: quantize_weight(weight(), "sym2")])
def test_a_listed_weight_format_without_code_meaning_is_refused_not_read_as_a_uniform_grid(monkeypatch, quantize):
    monkeypatch.setitem(WEIGHT_FORMATS, "sym2", 2)  # a new format listed, its quantizer not yet written
    with pytest.raises(ValueError, match="weight format 'sym2' is in WEIGHT_FORMATS but quant.quantizers gives its "
                                         "codes no meaning"):
        quantize()


# -- activations


def test_int8_token_quantizes_each_token_by_its_absmax():
    x = torch.tensor([[[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [254.0, 1.0, -127.0]]])
    q, s = quantize_int8_token(x)
    assert s.squeeze().tolist() == pytest.approx([1 / 127, 0.0, 2.0])
    assert q[0, 0].tolist() == [64, -127, 32]          # 63.5 rounds half to even: 64; 31.75 -> 32
    assert q[0, 1].tolist() == [0, 0, 0]
    assert q[0, 2].tolist() == [127, 0, -64]           # 0.5 -> 0 and -63.5 -> -64 (half to even)


def test_log2_quantizer_keeps_half_octave_levels_and_zeros_the_tail():
    p = torch.tensor([1.0, 0.5, 0.7071, 2.0 ** -7, 2.0 ** -7.5, 1e-4, 0.0])
    codes = quantize_log2(p, 4)
    assert codes.tolist() == [0, 2, 1, 14, 15, 15, 15]       # 2**-7 is code 14, the smallest kept level
    assert log2_dequantize(codes, 4).tolist() == pytest.approx([1.0, 0.5, 2 ** -0.5, 2 ** -7, 0, 0, 0])
    p.requires_grad_()
    fake_quant_log2(p, 4).sum().backward()
    assert torch.equal(p.grad, torch.ones_like(p))


def test_log2_codes_round_minus_two_log2_p_to_the_nearest_integer():
    p = torch.tensor([0.8, 0.6, 0.55, 0.3])                  # -2 log2 p = 0.64, 1.47, 1.72, 3.47
    assert quantize_log2(p, 4).tolist() == [1, 1, 2, 3]


def test_log2_offset_slides_the_levels_down_and_clips_above_the_top_one():
    p = torch.tensor([1.0, 2.0 ** -2, 2.0 ** -9, 2.0 ** -9.5])
    assert fake_quant_log2(p, 4, offset=4).tolist() == pytest.approx([2 ** -2, 2 ** -2, 2 ** -9, 0.0])


def test_log2_quantizer_takes_one_offset_per_head():
    p = torch.full((1, 2, 1, 1), 2.0 ** -9)
    assert Log2Quantizer(4, [0, 4])(p).flatten().tolist() == pytest.approx([0.0, 2 ** -9])


def test_uniform_act_quantizer_calibrates_a_range_per_head():
    qz = UniformQuantizer(4, shape=(1, 2, 1, 1))
    qz.set_range(torch.tensor([-1.0, 0.0]).view(1, 2, 1, 1), torch.tensor([1.0, 3.0]).view(1, 2, 1, 1))
    x = torch.tensor([-1.0, 1.0, 0.0, 3.0]).view(1, 2, 1, 2)
    assert torch.allclose(qz(x), x, atol=0.07)           # range ends are reproduced
    assert qz.scale.flatten().tolist() == pytest.approx([2 / 15, 3 / 15])
    assert qz(torch.full((1, 2, 1, 1), 100.0)).flatten().tolist() == pytest.approx([1.0 + 1 / 15, 3.0], abs=1e-5)


def test_log2_quantizer_keeps_powers_of_sqrt2_exact():
    assert Log2Quantizer(4)(torch.tensor([0.25, 2 ** -0.5, 1.0])).tolist() == pytest.approx([0.25, 2 ** -0.5, 1.0])


def test_quantizers_round_a_bfloat16_input_as_the_float32_kernels_do():
    torch.manual_seed(0)
    x = (torch.randn(512, 256) * 2).bfloat16()
    q, s = quantize_int8_token(x)
    assert q.dtype == torch.bfloat16 and torch.equal(q.float(), quantize_int8_token(x.float())[0])
    u = UniformQuantizer(4)
    u.set_range(torch.tensor(-3.0), torch.tensor(5.0))
    assert torch.equal(u(x), u(x.float()).bfloat16())
    p = torch.tensor([0.419921875, 0.2099609375, 0.1494140625]).bfloat16()  # -2 log2 p rounds otherwise in bf16
    assert torch.equal(fake_quant_log2(p, 4), fake_quant_log2(p.float(), 4).bfloat16())


def test_int8_token_quantizes_a_float16_input_as_its_float32_value():
    torch.manual_seed(0)
    x = (torch.randn(512, 256) * 2).half()
    assert torch.equal(quantize_int8_token(x)[0].float(), quantize_int8_token(x.float())[0])


@pytest.mark.parametrize("lo, hi, scale, zero", [(1.0, 3.0, 0.2, 0.0), (-3.0, -1.0, 0.2, 15.0)])
def test_a_calibrated_range_is_widened_to_include_zero(lo, hi, scale, zero):
    qz = UniformQuantizer(4)
    qz.set_range(torch.tensor(lo), torch.tensor(hi))
    assert qz.scale.item() == pytest.approx(scale) and qz.zero.item() == zero
    assert qz(torch.tensor(0.0)).item() == 0.0


def test_a_range_of_zeros_quantizes_without_nan():
    qz = UniformQuantizer(4)
    qz.set_range(torch.tensor(0.0), torch.tensor(0.0))
    assert torch.isfinite(qz(torch.tensor([-3.0, 0.0, 5.0]))).all()


def test_a_range_of_zeros_in_a_model_cast_to_float16_still_quantizes_without_nan():
    qz = UniformQuantizer(4)
    qz.set_range(torch.tensor(0.0), torch.tensor(0.0))      # scale 1e-8: 0 in float16, and 0 / 0 = NaN
    qz = qz.half()
    y = qz(torch.tensor([0.0, 1.0], dtype=torch.float16))
    assert y.dtype == torch.float16 and torch.isfinite(y).all() and y[0] == 0
    assert qz.scale.dtype == torch.float32


def test_a_quantizers_ranges_follow_a_cast_models_device_and_all_stay_float32():
    qz = UniformQuantizer(4, (3,)).to("meta", torch.float16)  # as model.to("cuda", torch.float16)
    for t in (qz.scale, qz.zero, qz.bits):
        assert t.device.type == "meta" and t.dtype == torch.float32


def test_a_quantizer_built_on_the_meta_device_takes_storage_with_to_empty():
    with torch.device("meta"):
        qz = UniformQuantizer(4, (3,))
    qz.to_empty(device="cpu")                               # failed: its ranges were copied out of the meta device
    assert qz.scale.device.type == "cpu" and qz.scale.shape == (3,) and qz.scale.dtype == torch.float32


def test_act_zero_point_is_the_nearest_code_to_zero():
    qz = UniformQuantizer(4)
    qz.set_range(torch.tensor(-1.0), torch.tensor(3.0))     # -lo / scale = 3.75
    assert qz.zero.item() == 4.0


def test_uniform_act_quantizer_clips_inputs_outside_its_range_to_the_range_ends():
    qz = UniformQuantizer(4)
    qz.set_range(torch.tensor(-2.0), torch.tensor(1.0))     # scale 0.2, zero 10
    assert qz(torch.tensor([-100.0, 100.0])).tolist() == pytest.approx([-2.0, 1.0])


def test_uniform_act_quantizer_defaults_to_8_bits():
    qz = UniformQuantizer()
    qz.set_range(torch.tensor(0.0), torch.tensor(255.0))
    assert qz(torch.tensor([300.0, 7.0])).tolist() == [255.0, 7.0]


# -- quantizer specs


@pytest.mark.parametrize("quantizer", [UniformQuantizer(shape=(1, 2, 3, 4)), Log2Quantizer(8, [0, 254])])
def test_an_activation_quantizer_is_rebuilt_from_its_spec(quantizer):
    spec = quantizer_spec(quantizer)
    assert quantizer_spec(quantizer_from_spec(spec)) == spec


def test_the_identity_quantizer_has_no_spec():
    assert quantizer_spec(torch.nn.Identity()) is None
    assert isinstance(quantizer_from_spec(None), torch.nn.Identity)


@pytest.mark.parametrize("spec, message", [({"kind": "log2", "bits": 9}, "bits must be an integer in 1..8"),
                                           ({"kind": "log2", "bits": 4, "offsets": [15]}, "integers in 0..14"),
                                           ({"kind": "uniform", "shape": [1, 1, 1, 1, 1]}, "up to 4 sizes")])
def test_an_activation_quantizer_spec_out_of_range_is_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        quantizer_from_spec(spec)


@pytest.mark.parametrize("amax, bits", [(1e-3, 8), (2e-4, 8), (2e-5, 4), (0.5, 8), (0.5, 4)])
def test_a_group_of_tiny_weights_is_never_clipped_by_its_float16_scale(amax, bits):
    from quant.quantizers import uniform_codes, uniform_dequantize, uniform_params
    w = torch.linspace(-amax, amax, 64)[None]
    s, z = uniform_params(w, bits, None, True)
    err = (uniform_dequantize(uniform_codes(w, s, z, bits, 64), s, z, bits, 64) - w).abs().max()
    assert err <= s[0, 0] / 2 * (1 + 1e-6)     # rounding only: the extremes lie within the codes' range
