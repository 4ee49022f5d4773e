"""QuantLinear and QuantAttention: the contract's buffers, code meanings and reference computation."""
import copy
import math
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.models import Attention
from quant.pack import pack_codes
from quant.qattention import SLOTS, QuantAttention
from quant import quantizers
from quant.qlinear import QuantLinear
from quant.quantizers import (NF4_CODEBOOK, Log2Quantizer, UniformQuantizer, double_dequantize,
                              quantize_uniform)


def linear(k=20, o=6, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, o)


@pytest.mark.parametrize("fmt, bits", [("int8", 8), ("int4", 4), ("int3", 3), ("int2", 2), ("nf4", 4),
                                       ("ternary", 2), ("binary", 1)])
def test_buffers_have_the_contract_shapes(fmt, bits):
    q = QuantLinear.from_linear(linear(k=20), fmt, group_size=8)
    group_size = 20 if fmt in ("ternary", "binary") else 8
    assert (q.weight_format, q.bits, q.group_size) == (fmt, bits, group_size)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (6, math.ceil(20 * bits / 8))
    assert q.scales.dtype == torch.float32 and q.scales.shape == (6, math.ceil(20 / group_size))
    assert not any(t.is_floating_point() and t.shape == (6, 20) for t in q.state_dict().values())


def test_dequantized_weight_follows_the_code_meanings():
    codes = torch.tensor([[0, 1, 2, 2], [1, 1, 0, 2]], dtype=torch.uint8)
    scales = torch.tensor([[2.0], [0.5]])
    tern = QuantLinear.from_codes(codes, scales, None, None, "ternary")
    assert tern.dequantized_weight().tolist() == [[-2, 0, 2, 2], [0, 0, -0.5, 0.5]]
    binary = QuantLinear.from_codes(codes.clamp(max=1), scales, None, None, "binary")
    assert binary.dequantized_weight().tolist() == [[-2, 2, 2, 2], [0.5, 0.5, -0.5, 0.5]]
    sym = QuantLinear.from_codes(codes + 6, scales, None, None, "int4")          # q = code - 8
    assert sym.dequantized_weight().tolist() == [[-4, -2, 0, 0], [-0.5, -0.5, -1, 0]]
    asym = QuantLinear.from_codes(codes, torch.ones(2, 2), torch.tensor([[1.0, 0.0], [2.0, 1.0]]), None,
                                  "int4", group_size=2)                          # value = code - zero
    assert asym.dequantized_weight().tolist() == [[-1, 0, 2, 2], [-1, -1, -1, 1]]
    nf4 = QuantLinear.from_codes(torch.tensor([[0, 7, 15, 3]], dtype=torch.uint8), torch.ones(1, 1), None,
                                 None, "nf4")
    assert nf4.dequantized_weight().tolist() == NF4_CODEBOOK[[0, 7, 15, 3]].unsqueeze(0).tolist()


def test_packed_buffer_is_pack_codes_of_the_codes():
    lin = linear(k=13)
    q = QuantLinear.from_linear(lin, "int3", group_size=13, asymmetric=True)
    want = quantize_uniform(lin.weight, 3, 13, symmetric=False)
    assert torch.equal(q.packed, pack_codes(want.codes, 3))
    assert torch.equal(q.codes(), want.codes)


def test_forward_without_act_quant_is_linear_with_the_dequantized_weight():
    lin = linear()
    q = QuantLinear.from_linear(lin, "int8")
    x = torch.randn(3, 4, 20)
    assert torch.allclose(q(x), F.linear(x, q.dequantized_weight(), lin.bias), atol=1e-6)
    assert (q(x) - lin(x)).abs().max() < 0.02


def test_int8_token_forward_is_the_integer_dot_product_formula():
    q = QuantLinear.from_linear(linear(), "ternary", act_format="int8_token")
    x = torch.randn(5, 20)
    s = x.abs().amax(-1, keepdim=True) / 127
    qx = torch.clamp(torch.round(x / s), -127, 127)
    codes = q.codes().to(torch.int64) - 1
    acc = qx.to(torch.int64) @ codes.T                               # exact int32-range dot products
    expected = s * q.scales[:, 0] * acc.float() + q.bias
    assert torch.allclose(q(x), expected, atol=1e-5)


def test_static_act_quant_rounds_the_input_onto_its_grid():
    q = QuantLinear.from_linear(linear(), "int8", act_format="uint4_tensor")
    q.act_quant.set_range(torch.tensor(-1.0), torch.tensor(2.0))          # scale 0.2, zero 5
    x = torch.randn(7, 20)
    x_hat = (torch.clamp(torch.round(x / 0.2) + 5, 0, 15) - 5) * 0.2
    assert torch.allclose(q(x), F.linear(x_hat, q.dequantized_weight(), q.bias), atol=1e-5)


def test_input_norm_is_applied_first():
    norm = nn.LayerNorm(20, elementwise_affine=False)
    q = QuantLinear.from_codes(torch.ones(6, 20, dtype=torch.uint8), torch.ones(6, 1), None, None, "binary",
                               act_format="int8_token", input_norm=norm)
    x = torch.randn(3, 20) * 5 + 2
    ref = QuantLinear.from_codes(torch.ones(6, 20, dtype=torch.uint8), torch.ones(6, 1), None, None, "binary",
                                 act_format="int8_token")
    assert torch.allclose(q(x), ref(norm(x)))


def test_group_wider_than_the_row_is_one_group_per_row():
    q = QuantLinear.from_linear(linear(k=20), "int4", group_size=64)
    assert q.group_size == 20 and q.scales.shape == (6, 1)


def test_cached_weight_follows_in_place_changes():
    q = QuantLinear.from_linear(linear(), "int4", group_size=10)
    w0 = q.dequantized_weight().clone()
    q.scales.mul_(2)
    assert torch.allclose(q.dequantized_weight(), 2 * w0)


def test_bad_format_group_size_and_act_format_are_refused():
    with pytest.raises(ValueError, match="unknown weight format"):
        QuantLinear(8, 4, "int9")
    with pytest.raises(ValueError, match="group_size"):
        QuantLinear(8, 4, "int4", group_size=-1)
    with pytest.raises(ValueError, match="act_format"):
        QuantLinear(8, 4, "int4", act_format="fp8")
    with pytest.raises(ValueError, match="zero points"):
        QuantLinear(8, 4, "ternary", asymmetric=True)


def test_a_format_named_like_intb_that_is_no_uniform_grid_gets_no_zero_points(monkeypatch):
    monkeypatch.setitem(quantizers.WEIGHT_FORMATS, "int2s", 2)  # a new format: "int" in its name only
    with pytest.raises(ValueError, match="int2s weights have no zero points"):
        QuantLinear(8, 4, "int2s", asymmetric=True)


@pytest.mark.parametrize("act_format", ["uint1_tensor", "uint9_tensor", "uint4_tensors", "int4_tensor"])
def test_static_act_formats_are_uint2_to_uint8_per_tensor_only(act_format):
    with pytest.raises(ValueError, match="act_format"):
        QuantLinear(8, 4, "int4", act_format=act_format)


def test_scales_that_do_not_fit_the_groups_are_refused():
    with pytest.raises(ValueError, match=r"scales of shape \(2, 1\) do not fit 2x8 weights in groups of 4"):
        QuantLinear.from_codes(torch.zeros(2, 8, dtype=torch.uint8), torch.ones(2, 1), None, None, "int4", 4)


@pytest.mark.parametrize("zeros, bias, message", [(torch.ones(2, 1), None, r"zeros of shape \(2, 1\)"),
                                                  (torch.ones(2, 3), None, r"zeros of shape \(2, 3\)"),
                                                  (None, torch.zeros(5), r"bias of shape \(5,\)")])
def test_zeros_or_a_bias_that_do_not_fit_the_layer_are_refused(zeros, bias, message):
    with pytest.raises(ValueError, match=message + r" do not fit 2x8 weights in groups of 4: expected"):
        QuantLinear.from_codes(torch.zeros(2, 8, dtype=torch.uint8), torch.ones(2, 2), zeros, bias, "int4", 4)


def test_nf4_layer_defaults_to_groups_of_64():
    q = QuantLinear.from_linear(linear(k=128), "nf4")
    assert q.group_size == 64 and q.scales.shape == (6, 2)


def test_nf4_layer_keeps_the_double_quantized_scales_it_was_built_from():
    q = QuantLinear.from_linear(linear(k=128), "nf4")
    assert q.scales_dq is not None and torch.equal(double_dequantize(q.scales_dq), q.scales)


def test_a_half_layer_keeps_float32_scales_so_a_scale_past_float16s_range_gives_finite_outputs():
    codes = torch.full((2, 4), 8, dtype=torch.uint8)                    # NF4 level 0.08: weights 0.08 * 1e5 fit
    layer = QuantLinear.from_codes(codes, torch.full((2, 1), 1e5), None, torch.zeros(2), "nf4").half()
    assert layer.scales.dtype == torch.float32 and layer.bias.dtype == torch.float16
    assert torch.isfinite(layer(torch.ones(1, 4, dtype=torch.float16))).all()


def test_a_bfloat16_layer_computes_with_the_float32_weight_cast_once():
    layer = QuantLinear.from_linear(nn.Linear(64, 8), "int8")
    w = layer.dequantized_weight().to(torch.bfloat16)                   # the scales not rounded to 8 bits first
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    layer = layer.bfloat16()
    assert torch.equal(layer(x), F.linear(x, w, layer.bias))


def test_cached_weight_follows_a_replaced_buffer():
    a = QuantLinear.from_linear(linear(seed=0), "int4", group_size=10)
    b = QuantLinear.from_linear(linear(seed=1), "int4", group_size=10)
    a.dequantized_weight()
    a.packed, a.scales = b.packed, b.scales
    assert torch.equal(a.dequantized_weight(), b.dequantized_weight())


def test_cached_weight_follows_a_buffer_replaced_through_data():
    q = QuantLinear.from_linear(linear(), "int4", group_size=10)
    w0 = q.dequantized_weight().clone()
    q.scales.data = q.scales.data * 2  # the same tensor, its version counter as it was
    assert torch.allclose(q.dequantized_weight(), 2 * w0)


def test_cached_weight_follows_a_buffer_replaced_through_data_twice_between_calls():
    """The second replacement is often made at the address the first freed, the one the cache was checked by (with
    glibc, mostly, at this size: scales of 128 kB)."""
    q = QuantLinear.from_linear(linear(k=5120, o=64), "int4", group_size=10)
    for _ in range(5):
        w = q.dequantized_weight().clone()
        for _ in range(2):
            q.scales.data = q.scales.data * 2
        assert torch.allclose(q.dequantized_weight(), 4 * w)


def test_a_layer_exports_with_torch_export():
    """Traced, the buffers are fake tensors, which have no storage address to check the cache by."""
    q = QuantLinear.from_linear(linear(), "int4", group_size=10)
    x = torch.randn(3, 20)
    ep = torch.export.export(q, (x,))
    assert torch.allclose(ep.module()(x), q(x))


@pytest.mark.parametrize("norm", [{"elementwise_affine": True}, {"elementwise_affine": False}, {"bias": False}],
                         ids=["affine", "no-affine", "no-bias"])
def test_a_layer_is_rebuilt_from_its_spec(norm):
    """Also with a LayerNorm without bias, which must not come back with one."""
    layer = QuantLinear(20, 6, "int4", 8, asymmetric=True, act_format="uint4_tensor",
                        input_norm=nn.LayerNorm(20, eps=1e-3, **norm))
    back = QuantLinear.from_spec(layer.spec())
    assert back.spec() == layer.spec()
    assert {k: v.shape for k, v in back.state_dict().items()} == {k: v.shape for k, v in layer.state_dict().items()}


def test_the_spec_records_a_norms_bias_only_where_it_has_none():
    # files of a norm with a bias, every recipe's, keep the header (and size) they had before the key existed
    spec = lambda **kw: QuantLinear(20, 6, "ternary", input_norm=nn.LayerNorm(20, **kw)).spec()["input_norm"]
    assert "bias" not in spec() and spec(bias=False)["bias"] is False


# -- attention


def test_quant_attention_with_identity_slots_equals_attention():
    torch.manual_seed(0)
    attn = Attention(16, 4)
    qa = QuantAttention.from_attention(attn)
    x = torch.randn(2, 5, 16)
    assert torch.allclose(qa(x), attn(x), atol=1e-5)
    assert set(qa.state_dict()) == set(attn.state_dict())


def test_quant_attention_slots_see_the_documented_shapes():
    torch.manual_seed(0)
    qa = QuantAttention(16, 4)
    seen = {}

    def record(slot):
        def hook(module, inputs, output):
            seen[slot] = tuple(output.shape)
        return hook

    for slot in SLOTS:
        getattr(qa, slot).register_forward_hook(record(slot))
    qa(torch.randn(2, 5, 16))
    assert seen == {"q_quant": (2, 4, 5, 4), "k_quant": (2, 4, 5, 4), "v_quant": (2, 4, 5, 4),
                    "attn_quant": (2, 4, 5, 5), "out_quant": (2, 4, 5, 4)}


def test_each_attention_slot_quantizes_its_own_tensor():
    torch.manual_seed(0)
    qa = QuantAttention(16, 4)
    x = torch.randn(2, 5, 16)
    q, k, v = qa.split_heads(qa.qkv(x))
    p = (q @ k.transpose(-2, -1) / 2).softmax(-1)                   # head_dim 4: scaled by 1 / 2
    seen = {}
    for slot in SLOTS:
        getattr(qa, slot).register_forward_hook(lambda m, i, o, slot=slot: seen.setdefault(slot, i[0]))
    qa(x)
    for slot, want in zip(SLOTS, (q, k, v, p, p @ v)):
        torch.testing.assert_close(seen[slot], want, msg=slot)


def test_log2_attention_slot_quantizes_the_softmax_probabilities():
    torch.manual_seed(0)
    qa = QuantAttention(16, 4)
    qa.attn_quant = Log2Quantizer(4)
    probs = []
    qa.attn_quant.register_forward_hook(lambda m, i, o: probs.append(o) and None)
    qa(torch.randn(1, 6, 16))
    p = probs[0]
    kept = p[p > 0]
    assert torch.allclose(-2 * torch.log2(kept), torch.round(-2 * torch.log2(kept)), atol=1e-4)
    assert p.max() <= 1


def test_head_wise_quantizer_uses_each_heads_own_range():
    qa = QuantAttention(16, 4)
    qa.q_quant = UniformQuantizer(2, shape=(1, 4, 1, 1))
    qa.q_quant.set_range(torch.zeros(1, 4, 1, 1), torch.tensor([3.0, 6.0, 9.0, 12.0]).view(1, 4, 1, 1))
    out = qa.q_quant(torch.full((1, 4, 1, 1), 100.0))
    assert out.flatten().tolist() == [3.0, 6.0, 9.0, 12.0]


@pytest.mark.parametrize("copy_of", ["pickle", "deepcopy"])
def test_a_copied_layer_leaves_its_unpacked_weight_behind_and_computes_the_same(copy_of):
    layer = QuantLinear.from_linear(nn.Linear(64, 32), "int4", 32, True)
    x = torch.randn(2, 64)
    y = layer(x)                                            # unpacks and caches the float32 weight
    copied = pickle.loads(pickle.dumps(layer)) if copy_of == "pickle" else copy.deepcopy(layer)
    assert copied._cache is None and len(pickle.dumps(layer)) < 64 * 32 * 4
    assert torch.equal(copied(x), y)


def test_a_weight_cached_under_inference_mode_still_serves_autograd():
    layer = QuantLinear.from_linear(nn.Linear(16, 8), "int4", 8, True)
    with torch.inference_mode():
        layer(torch.randn(2, 16))
    x = torch.randn(2, 16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None


def test_a_weight_another_thread_caches_meanwhile_under_inference_mode_does_not_reach_this_calls_autograd():
    """Two threads' first calls, one under torch.inference_mode: its weight, stored just after this call's, was
    what this call returned (an inference tensor, which autograd refuses to save)."""
    class Raced(QuantLinear):
        def __setattr__(self, name, value):
            super().__setattr__(name, value)
            if name == "_cache" and value is not None and not torch.is_inference_mode_enabled():
                with torch.inference_mode():   # the other thread's call, storing its weight right after
                    other = (value[0], value[1], value[2].clone(), value[3])
                super().__setattr__(name, other)

    torch.manual_seed(0)
    layer = Raced(16, 8, "int4", 8)
    x = torch.randn(2, 16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None


def test_a_layer_built_under_inference_mode_runs_there_and_follows_in_place_changes():
    with torch.inference_mode():  # as quant.load_any or quant.quantize inside it build one
        layer = QuantLinear.from_linear(nn.Linear(16, 8), "int4", 8, True)
        x = torch.randn(2, 16)
        y = layer(x)
        layer.scales.mul_(2)
        assert torch.allclose(layer(x) - layer.bias, 2 * (y - layer.bias))


def test_a_symmetric_layer_built_under_inference_mode_runs_there():
    with torch.inference_mode():  # no zeros buffer: the scales and codes alone are inference tensors
        layer = QuantLinear.from_linear(nn.Linear(16, 8), "int4", 8, False)
        x = torch.randn(2, 16)
        assert torch.allclose(layer(x), layer(x))


def test_quant_attention_spec_naming_an_unknown_slot_is_refused():
    spec = {"dim": 16, "num_heads": 4, "slots": {"qk_quant": None}}
    with pytest.raises(ValueError, match=r"unknown attention quantizer slots \['qk_quant'\]"):
        QuantAttention.from_spec(spec, nn.Linear(16, 48), nn.Linear(16, 16))


def test_an_attention_slot_neither_per_tensor_nor_per_head_is_refused_when_saved_not_when_loaded():
    qa = QuantAttention(16, 4)
    qa.out_quant = UniformQuantizer(4, shape=(4,))            # one range per channel of each head: it runs,
    qa(torch.randn(2, 5, 16))                                # but its file was refused as damaged on loading
    with pytest.raises(ValueError, match=r"slot out_quant's uniform quantizer has shape \[4\]; .* \[1, 4, 1, 1\]"):
        qa.spec()


def test_quant_attention_refuses_a_width_its_heads_do_not_divide():
    with pytest.raises(ValueError, match="dim 10 is not divisible by num_heads 4"):
        QuantAttention(10, 4)


@pytest.mark.parametrize("num_heads", [0, -4, 4.0])
def test_quant_attention_refuses_a_head_count_that_is_not_a_positive_integer(num_heads):
    with pytest.raises(ValueError, match=f"num_heads must be positive integers, got dim 32 and num_heads {num_heads}"):
        QuantAttention(32, num_heads)


@pytest.mark.parametrize("codes, fmt, message", [
    (torch.full((2, 8), 3, dtype=torch.uint8), "ternary", r"ternary codes must be uint8 in 0\.\.2, got a 3"),
    (torch.full((2, 8), -1, dtype=torch.int8), "int8", r"int8 codes must be uint8 in 0\.\.255, got torch\.int8"),
    (torch.full((2, 8), 256), "int8", r"int8 codes must be uint8 in 0\.\.255, got torch\.int64")])
def test_codes_outside_the_formats_range_or_not_uint8_are_refused_not_wrapped(codes, fmt, message):
    with pytest.raises(ValueError, match=message):
        QuantLinear.from_codes(codes, torch.ones(2, 1), None, None, fmt)
