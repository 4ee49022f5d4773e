"""The bitvit custom ops: CPU kernels against float64 references, refusals, torch.compile / export tracing,
and (marked gpu) the CUDA kernels against the same references."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cuda_ops  # noqa: F401  (registers torch.ops.bitvit)
from cuda_ops.ops import A8_FORMATS, unpack_aligned
from kernel_reference import (WEIGHT_ONLY_CASES, gen, make_a8_layer, make_weight_only_layer, quantize_tokens,
                              reference_a8, reference_weight_only, rel_err)
from quant.pack import pack_codes, unpack_codes

OPS = torch.ops.bitvit
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def a8(fmt):
    return getattr(OPS, f"{fmt}_linear")


# ----------------------------------------------------------------------------- activation quantization

def test_quantize_per_token_rounds_half_to_even_and_keeps_zero_rows_zero():
    x = torch.tensor([[127.0, 2.5, 3.5, -2.5, -0.5, 0.49], [0, 0, 0, 0, 0, 0]])
    q, s = OPS.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.tolist() == [[127, 2, 4, -2, 0, 0], [0] * 6]
    assert s.tolist() == [1.0, 0.0]


def test_quantize_per_token_matches_the_contract_on_any_leading_shape():
    x = torch.randn(2, 5, 77, generator=gen()) * 3
    q, s = OPS.quantize_per_token(x)
    q_ref, s_ref = quantize_tokens(x)
    assert q.shape == (2, 5, 77) and s.shape == (2, 5)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


# ----------------------------------------------------------------------------- packed linear ops (CPU)

@pytest.mark.parametrize("fmt", A8_FORMATS)
@pytest.mark.parametrize("m,n,k", [(1, 37, 300), (19, 70, 129), (64, 16, 8), (5, 9, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_a8_linear_matches_float64_reference(fmt, m, n, k, bias):
    g = gen(m * n + k)
    packed, scales, b = make_a8_layer(fmt, n, k, g, bias)
    x = torch.randn(m, k, generator=g)
    y = a8(fmt)(x, packed, scales, b, k)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert rel_err(y, reference_a8(x, packed, fmt, scales, b, k)) < 1e-6


@pytest.mark.parametrize("fmt", A8_FORMATS)
def test_a8_linear_returns_the_input_dtype_and_leading_shape(fmt):
    g = gen(1)
    packed, scales, b = make_a8_layer(fmt, 24, 96, g)
    x = torch.randn(2, 7, 96, generator=g).bfloat16()
    y = a8(fmt)(x, packed, scales, b, 96)
    assert y.shape == (2, 7, 24) and y.dtype == torch.bfloat16
    assert rel_err(y, reference_a8(x, packed, fmt, scales, b, 96)) < 1e-2


@pytest.mark.parametrize("fmt", A8_FORMATS)
def test_a8_linear_applies_its_input_layer_norm_first(fmt):
    g = gen(2)
    packed, scales, b = make_a8_layer(fmt, 30, 100, g)
    x = torch.randn(4, 100, generator=g) * 3 + 1
    w, nb = torch.rand(100, generator=g) + 0.5, torch.randn(100, generator=g) * 0.1
    y = a8(fmt)(x, packed, scales, b, 100, w, nb, 1e-6)
    x_normed = torch.nn.functional.layer_norm(x, (100,), w, nb, 1e-6)
    assert rel_err(y, reference_a8(x_normed, packed, fmt, scales, b, 100)) < 1e-6
    q, s = OPS.quantize_per_token(x, None, None, 1e-5)
    q_ref, s_ref = quantize_tokens(torch.nn.functional.layer_norm(x, (100,), eps=1e-5))
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


# (bits, kind, in_features, group_size): every weight-only flavour, groups not dividing in_features
@pytest.mark.parametrize("bits,kind,k,group_size", WEIGHT_ONLY_CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_weight_only_linear_matches_float64_reference(bits, kind, k, group_size, dtype, tol):
    g = gen(k + group_size)
    packed, scales, zeros, codebook, b = make_weight_only_layer(kind, bits, 45, k, group_size, g)
    x = torch.randn(3, 11, k, generator=g).to(dtype)
    y = OPS.weight_only_linear(x, packed, scales, zeros, codebook, b, bits, group_size, k)
    assert y.shape == (3, 11, 45) and y.dtype == dtype
    ref = reference_weight_only(x, packed, bits, scales, zeros, codebook, b, group_size, k)
    assert rel_err(y, ref) < tol


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), n=st.integers(1, 5), k=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_aligned_unpacking_agrees_with_the_pack_module(bits, n, k, seed):
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen(seed)).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert torch.equal(unpack_aligned(packed, bits, k), unpack_codes(packed, bits, k))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_an_input_row_holding_nan_or_inf_gives_a_nan_output_row(bad):
    packed, scales, b = make_a8_layer("ternary", 8, 40, gen())
    x = torch.randn(3, 40, generator=gen(1))
    x[1, 7] = bad
    y = OPS.ternary_linear(x, packed, scales, b, 40)
    assert y[1].isnan().all() and torch.isfinite(y[[0, 2]]).all()
    q, s = OPS.quantize_per_token(x)
    assert s[1].isnan() and q[1, 7] == {"nan": 0, "inf": 127, "-inf": -127}[str(bad)]  # the row's codes: x / 1


def test_zero_input_rows_give_the_bias():
    packed, scales, b = make_a8_layer("ternary", 8, 40, gen())
    y = OPS.ternary_linear(torch.zeros(3, 40), packed, scales, b, 40)
    assert torch.equal(y, b.expand(3, 8))


@pytest.mark.parametrize("fmt", ["ternary", "int8"])
def test_a_bias_of_one_value_per_output_row_shaped_n_by_1_is_added_per_row(fmt):
    packed, scales, b = make_a8_layer(fmt, 8, 40, gen())
    x = torch.randn(8, 40, generator=gen(1))  # as many rows as outputs: an (8, 1) bias would broadcast
    y = a8(fmt)(x, packed, scales, b.reshape(8, 1), 40)
    assert rel_err(y, reference_a8(x, packed, fmt, scales, b, 40)) < 1e-6


def test_a_weight_only_bias_or_code_book_shaped_as_a_column_is_used_as_its_values():
    packed, scales, zeros, codebook, b = make_weight_only_layer("lut", 4, 8, 64, 32, gen())
    x = torch.randn(8, 64, generator=gen(1))
    y = OPS.weight_only_linear(x, packed, scales, zeros, codebook.reshape(16, 1), b.reshape(8, 1), 4, 32, 64)
    assert rel_err(y, reference_weight_only(x, packed, 4, scales, zeros, codebook, b, 32, 64)) < 1e-6


# ----------------------------------------------------------------------------- refusals

def test_wrong_input_width_is_refused():
    packed, scales, b = make_a8_layer("ternary", 8, 40, gen())
    with pytest.raises(ValueError, match="in_features=40"):
        OPS.ternary_linear(torch.randn(2, 41), packed, scales, b, 40)


def test_packed_rows_of_the_wrong_width_are_refused():
    packed, scales, b = make_a8_layer("binary", 8, 40, gen())  # 5 bytes a row
    with pytest.raises(ValueError, match="need 10"):
        OPS.ternary_linear(torch.randn(2, 40), packed, scales, b, 40)


def test_grouped_scales_are_refused_by_the_integer_ops():
    packed, _, b = make_a8_layer("ternary", 8, 64, gen())
    with pytest.raises(ValueError, match="one value per output row"):
        OPS.ternary_linear(torch.randn(2, 64), packed, torch.ones(8, 2), b, 64)


def test_weight_only_group_size_that_splits_a_kernel_tile_is_refused():
    packed, scales, zeros, codebook, b = make_weight_only_layer("sym", 4, 8, 96, 48, gen())
    with pytest.raises(ValueError, match="multiple of 32 for 4-bit codes"):
        OPS.weight_only_linear(torch.randn(2, 96), packed, scales, zeros, codebook, b, 4, 48, 96)


def test_weight_only_code_widths_without_a_kernel_are_refused():
    packed, scales, zeros, codebook, b = make_weight_only_layer("sym", 4, 8, 96, 96, gen())
    with pytest.raises(ValueError, match="bits must be one of"):
        OPS.weight_only_linear(torch.randn(2, 96), packed, scales, zeros, codebook, b, 3, 96, 96)


def test_layer_norm_parameters_of_the_wrong_size_are_refused():
    packed, scales, b = make_a8_layer("ternary", 8, 40, gen())
    with pytest.raises(ValueError, match="norm_weight must be a 1-D float tensor of 40"):
        OPS.ternary_linear(torch.randn(2, 40), packed, scales, b, 40, torch.ones(39), None, 1e-6)
    with pytest.raises(ValueError, match="norm_weight must be a 1-D float tensor of 40"):
        OPS.ternary_linear(torch.randn(2, 40), packed, scales, b, 40, torch.ones(40, 1), None, 1e-6)
    with pytest.raises(ValueError, match="norm_eps must be positive"):
        OPS.ternary_linear(torch.randn(2, 40), packed, scales, b, 40, torch.ones(40), None, -1.0)


def test_layers_without_inputs_or_outputs_are_refused():
    packed, scales, b = make_a8_layer("ternary", 8, 40, gen())
    with pytest.raises(ValueError, match="in_features must be at least 1"):
        OPS.ternary_linear(torch.randn(5, 0), torch.zeros(8, 0, dtype=torch.uint8), scales, b, 0)
    with pytest.raises(ValueError, match="no output rows"):
        OPS.ternary_linear(torch.randn(5, 40), packed[:0], scales[:0], None, 40)
    with pytest.raises(ValueError, match="K >= 1"):
        OPS.quantize_per_token(torch.randn(2, 0))


def test_an_input_width_whose_dot_products_could_overflow_int32_is_refused():
    k = 140_000
    with pytest.raises(ValueError, match="overflow the int32 dot product"):
        OPS.int8_linear(torch.ones(1, k), torch.full((1, k), 255, dtype=torch.uint8), torch.ones(1), None, k)


def test_a_weight_only_group_larger_than_the_row_is_one_group():
    packed, scales, zeros, codebook, b = make_weight_only_layer("sym", 4, 8, 96, 96, gen())
    x = torch.randn(2, 96, generator=gen(1))
    torch.testing.assert_close(OPS.weight_only_linear(x, packed, scales, zeros, codebook, b, 4, 2 ** 20, 96),
                               OPS.weight_only_linear(x, packed, scales, zeros, codebook, b, 4, 96, 96))


@pytest.mark.parametrize("operand", ["packed", "scales", "bias"])
def test_weights_on_another_device_than_the_input_are_refused(operand):
    layer = dict(zip(("packed", "scales", "bias"), make_a8_layer("ternary", 8, 40, gen())))
    layer[operand] = layer[operand].to("meta")
    with pytest.raises(ValueError, match="the input is on cpu but a weight tensor is on meta"):
        OPS.ternary_linear(torch.randn(2, 40), layer["packed"], layer["scales"], layer["bias"], 40)


def test_integer_input_is_refused():
    packed, scales, b = make_a8_layer("int8", 8, 40, gen())
    with pytest.raises(ValueError, match="float tensor"):
        OPS.int8_linear(torch.ones(2, 40, dtype=torch.int32), packed, scales, b, 40)


# ----------------------------------------------------------------------------- tracing

def _op_args():
    g = gen(3)
    x = torch.randn(2, 5, 96, generator=g)
    yield OPS.quantize_per_token, (x,)
    yield OPS.quantize_per_token, (x.transpose(0, 1),)  # a strided input gets contiguous codes
    yield OPS.quantize_per_token, (torch.randn(96, 7, generator=g).t(),)  # strided along K too
    yield OPS.quantize_per_token, (x, torch.rand(96, generator=g), None, 1e-6)
    for fmt in A8_FORMATS:
        yield a8(fmt), (x, *make_a8_layer(fmt, 24, 96, g), 96)
    yield OPS.ternary_linear, (x, *make_a8_layer("ternary", 24, 96, g), 96, torch.rand(96, generator=g),
                               torch.randn(96, generator=g), 1e-6)
    packed, scales, zeros, codebook, b = make_weight_only_layer("asym", 4, 24, 96, 32, g)
    yield OPS.weight_only_linear, (x, packed, scales, zeros, codebook, b, 4, 32, 96)


@pytest.mark.parametrize("op,args", list(_op_args()), ids=lambda v: getattr(v, "__name__", ""))
def test_ops_pass_torch_library_opcheck(op, args):
    torch.library.opcheck(op, args)


class _TwoLayers(torch.nn.Module):
    """A ternary layer feeding a 4-bit one, as packed tensors."""

    def __init__(self):
        super().__init__()
        g = gen(4)
        self.t = make_a8_layer("ternary", 64, 48, g)
        self.w = make_weight_only_layer("sym", 4, 16, 64, 32, g)

    def forward(self, x):
        h = OPS.ternary_linear(x, *self.t, 48)
        return OPS.weight_only_linear(torch.relu(h), *self.w, 4, 32, 64)


def test_ops_trace_under_torch_compile_with_their_fake_kernels():
    model = _TwoLayers()
    x = torch.randn(3, 10, 48, generator=gen(5))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    assert torch.allclose(compiled(x), model(x))
    assert compiled(x[:1, :4]).shape == (1, 4, 16)  # dynamic shapes go through the fake kernels


def test_ops_export_with_torch_export():
    model = _TwoLayers()
    x = torch.randn(2, 10, 48, generator=gen(6))
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"bitvit.ternary_linear.default", "bitvit.weight_only_linear.default"} <= targets
    assert torch.allclose(ep.module()(x), model(x))


# ----------------------------------------------------------------------------- CUDA kernels (GPU machine)

@gpu
@needs_cuda
@pytest.mark.parametrize("fmt", A8_FORMATS)
@pytest.mark.parametrize("m,n,k", [(1, 37, 300), (197, 2304, 768), (1576, 768, 3072), (333, 1000, 1030)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a8_linear_on_cuda_matches_float64_reference(fmt, m, n, k, dtype):
    g = gen(m + n + k)
    packed, scales, b = make_a8_layer(fmt, n, k, g)
    x = torch.randn(m, k, generator=g).to(dtype)
    y = a8(fmt)(x.cuda(), packed.cuda(), scales.cuda(), b.cuda(), k)
    assert y.dtype == dtype and y.is_cuda
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(y, reference_a8(x, packed, fmt, scales, b, k)) < tol


@gpu
@needs_cuda
@pytest.mark.parametrize("fmt", A8_FORMATS)
@pytest.mark.parametrize("k", [768, 10000])  # 10000: LayerNorm before the two-pass quantization
@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.bfloat16])  # a bf16 model's LayerNorm, uncast
def test_a8_linear_with_input_norm_on_cuda_matches_float64_reference(fmt, k, norm_dtype):
    g = gen(k)
    packed, scales, b = make_a8_layer(fmt, 300, k, g)
    x = torch.randn(197, k, generator=g) * 2 + 0.5
    w, nb = torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g) * 0.1
    w, nb = w.to(norm_dtype), nb.to(norm_dtype)
    y = a8(fmt)(x.cuda(), packed.cuda(), scales.cuda(), b.cuda(), k, w.cuda(), nb.cuda(), 1e-6)
    x_normed = torch.nn.functional.layer_norm(x.double(), (k,), w.double(), nb.double(), 1e-6).float()
    assert rel_err(y, reference_a8(x_normed, packed, fmt, scales, b, k)) < 1e-4  # a code may flip at a tie


@gpu
@needs_cuda
@pytest.mark.parametrize("fmt", A8_FORMATS)
def test_a8_linear_on_cuda_agrees_with_the_cpu_kernel(fmt):
    g = gen(7)
    packed, scales, b = make_a8_layer(fmt, 384, 1536, g)
    x = torch.randn(4, 65, 1536, generator=g)
    y_gpu = a8(fmt)(x.cuda(), packed.cuda(), scales.cuda(), b.cuda(), 1536).cpu()
    y_cpu = a8(fmt)(x, packed, scales, b, 1536)
    assert rel_err(y_gpu, y_cpu.double()) < 1e-6  # same int32 sums, fp32 epilogue


@gpu
@needs_cuda
@pytest.mark.parametrize("bits,kind", [(4, "sym"), (4, "asym"), (4, "lut"), (2, "asym"), (8, "sym")])
@pytest.mark.parametrize("m,k,group_size", [(1, 300, 300), (197, 768, 128), (1576, 3072, 64), (50, 1088, 64)])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-5)])
def test_weight_only_linear_on_cuda_matches_float64_reference(bits, kind, m, k, group_size, dtype, tol):
    g = gen(m + k)
    packed, scales, zeros, codebook, b = make_weight_only_layer(kind, bits, 515, k, group_size, g)
    x = torch.randn(m, k, generator=g).to(dtype)
    cu = lambda t: None if t is None else t.cuda()  # noqa: E731
    y = OPS.weight_only_linear(x.cuda(), packed.cuda(), scales.cuda(), cu(zeros), cu(codebook), cu(b), bits,
                               group_size, k)
    assert y.dtype == dtype
    assert rel_err(y, reference_weight_only(x, packed, bits, scales, zeros, codebook, b, group_size, k)) < tol


@gpu
@needs_cuda
def test_quantize_per_token_on_cuda_is_bit_exact():
    x = torch.randn(1000, 3000, generator=gen(8)) * 5
    x[7] = 0
    q, s = OPS.quantize_per_token(x.cuda())
    q_ref, s_ref = quantize_tokens(x)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


@gpu
@needs_cuda
def test_ops_run_under_torch_compile_on_cuda():
    model = _TwoLayers()
    for name, t in [("t", model.t), ("w", model.w)]:
        setattr(model, name, tuple(None if v is None else v.cuda() for v in t))
    x = torch.randn(3, 10, 48, generator=gen(9)).cuda()
    compiled = torch.compile(model, fullgraph=True)
    assert rel_err(compiled(x), model(x).double()) < 1e-5


def test_a_ternary_input_width_whose_dot_products_could_overflow_int32_is_refused():
    # a 2-bit ternary code can hold 3 (value 2): the bound is K * 127 * 2, not K * 127
    k = 9_000_000
    meta = dict(device="meta")
    with pytest.raises(ValueError, match="overflow the int32 dot product"):
        OPS.ternary_linear(torch.empty(1, k, **meta), torch.empty(1, k // 4, dtype=torch.uint8, **meta),
                           torch.ones(1, **meta), None, k)


def test_a_zero_norm_eps_is_refused():
    packed, scales, b = make_a8_layer("ternary", 8, 40, gen())
    with pytest.raises(ValueError, match="norm_eps must be positive"):
        OPS.ternary_linear(torch.randn(2, 40), packed, scales, b, 40, torch.ones(40), None, 0.0)


def test_weight_only_scales_or_zeros_of_the_wrong_group_count_are_refused():
    packed, scales, zeros, codebook, b = make_weight_only_layer("asym", 4, 8, 96, 32, gen())  # 3 groups
    with pytest.raises(ValueError, match=r"scales must be float \(8, 3\)"):
        OPS.weight_only_linear(torch.randn(2, 96), packed, scales[:, :2], zeros, codebook, b, 4, 32, 96)
    with pytest.raises(ValueError, match=r"zeros must be float \(8, 3\)"):
        OPS.weight_only_linear(torch.randn(2, 96), packed, scales, torch.cat([zeros, zeros], 1), codebook, b, 4, 32, 96)


# ----------------------------------------------------------------------------- fake (meta) kernels and more refusals

def _on_meta(*tensors):
    return tuple(None if t is None else t.to("meta") for t in tensors)


def test_the_fake_quantize_per_token_gives_int8_codes_and_float32_scales_whatever_the_input_dtype():
    q, s = OPS.quantize_per_token(torch.empty(2, 5, 96, dtype=torch.bfloat16, device="meta"))
    assert (q.shape, q.dtype, s.shape, s.dtype) == ((2, 5, 96), torch.int8, (2, 5), torch.float32)


@pytest.mark.parametrize("fmt", A8_FORMATS)
def test_the_fake_a8_linear_gives_one_output_per_packed_row_in_the_input_dtype(fmt):
    packed, scales, b = _on_meta(*make_a8_layer(fmt, 24, 96, gen()))
    y = a8(fmt)(torch.empty(2, 5, 96, dtype=torch.bfloat16, device="meta"), packed, scales, b.bfloat16(), 96)
    assert y.shape == (2, 5, 24) and y.dtype == torch.bfloat16


def test_the_fake_weight_only_linear_gives_one_output_per_packed_row_in_the_input_dtype():
    packed, scales, zeros, codebook, b = _on_meta(*make_weight_only_layer("asym", 4, 24, 96, 32, gen()))
    x = torch.empty(2, 5, 96, dtype=torch.float16, device="meta")
    y = OPS.weight_only_linear(x, packed, scales, zeros, codebook, b.half(), 4, 32, 96)
    assert y.shape == (2, 5, 24) and y.dtype == torch.float16


def test_the_fake_kernels_refuse_what_the_cpu_kernels_refuse():
    packed, scales, b = _on_meta(*make_a8_layer("ternary", 8, 40, gen()))
    with pytest.raises(ValueError, match="in_features=40"):
        OPS.ternary_linear(torch.empty(2, 41, device="meta"), packed, scales, b, 40)
    with pytest.raises(ValueError, match="K >= 1"):
        OPS.quantize_per_token(torch.empty(2, 0, device="meta"))


def test_a_zero_dimensional_input_is_refused():
    packed, scales, b = make_a8_layer("ternary", 8, 40, gen())
    with pytest.raises(ValueError, match=r"last dimension is \(\)"):
        OPS.ternary_linear(torch.tensor(1.0), packed, scales, b, 40)
    with pytest.raises(ValueError, match="K >= 1"):
        OPS.quantize_per_token(torch.tensor(1.0))


@pytest.mark.parametrize("change", [lambda p: p.view(torch.int8), lambda p: p.reshape(-1)], ids=["int8", "1-D"])
def test_packed_weights_that_are_not_a_2d_uint8_tensor_are_refused(change):
    packed, scales, b = make_a8_layer("ternary", 8, 40, gen())
    with pytest.raises(ValueError, match="packed weights must be a 2-D uint8 tensor"):
        OPS.ternary_linear(torch.randn(2, 40), change(packed), scales, b, 40)


def test_scales_or_bias_of_the_wrong_count_or_dtype_are_refused():
    packed, scales, b = make_a8_layer("ternary", 8, 40, gen())
    with pytest.raises(ValueError, match="scales must be a float tensor of 8 values"):
        OPS.ternary_linear(torch.randn(2, 40), packed, scales[:7], b, 40)
    with pytest.raises(ValueError, match="bias must be a float tensor of 8 values"):
        OPS.ternary_linear(torch.randn(2, 40), packed, scales, b.int(), 40)


def test_layer_norm_parameters_without_norm_eps_or_of_integer_dtype_are_refused():
    packed, scales, b = make_a8_layer("ternary", 8, 40, gen())
    with pytest.raises(ValueError, match="norm_weight must be a 1-D float tensor of 40 values, with norm_eps set"):
        OPS.ternary_linear(torch.randn(2, 40), packed, scales, b, 40, torch.ones(40), None, None)
    with pytest.raises(ValueError, match="norm_bias must be a 1-D float tensor of 40"):
        OPS.ternary_linear(torch.randn(2, 40), packed, scales, b, 40, None, torch.zeros(40, dtype=torch.int32), 1e-6)


def test_layer_norm_parameters_on_another_device_than_the_input_are_refused():
    packed, scales, b = make_a8_layer("ternary", 8, 40, gen())
    meta_ones = torch.ones(40, device="meta")
    with pytest.raises(ValueError, match="a weight tensor is on meta"):
        OPS.ternary_linear(torch.randn(2, 40), packed, scales, b, 40, meta_ones, None, 1e-6)
    with pytest.raises(ValueError, match="a weight tensor is on meta"):
        OPS.quantize_per_token(torch.randn(2, 40), None, meta_ones, 1e-6)


def test_integer_input_to_quantize_per_token_is_refused():
    with pytest.raises(ValueError, match="needs a float tensor"):
        OPS.quantize_per_token(torch.ones(2, 40, dtype=torch.int32))


def test_the_int8_overflow_bound_counts_the_code_minus_128_of_magnitude_128():
    # |q_x| <= 127, |w| <= 128: K = 133,000 could reach 2**31 (K * 127 * 128), K = 132,000 cannot
    meta = dict(device="meta")
    for k in (132_000, 133_000):
        args = (torch.empty(1, k, **meta), torch.empty(1, k, dtype=torch.uint8, **meta), torch.ones(1, **meta), None, k)
        if k == 132_000:
            assert OPS.int8_linear(*args).shape == (1, 1)
        else:
            with pytest.raises(ValueError, match="overflow the int32 dot product"):
                OPS.int8_linear(*args)


def test_a_weight_only_group_size_of_zero_is_refused():
    packed, scales, zeros, codebook, b = make_weight_only_layer("sym", 4, 8, 96, 96, gen())
    with pytest.raises(ValueError, match="group_size must be a multiple of 32 .* got 0"):
        OPS.weight_only_linear(torch.randn(2, 96), packed, scales, zeros, codebook, b, 4, 0, 96)


def test_a_weight_only_code_book_of_the_wrong_size_or_device_is_refused():
    packed, scales, zeros, codebook, b = make_weight_only_layer("lut", 4, 8, 96, 32, gen())
    with pytest.raises(ValueError, match="a code book of 4-bit codes holds 16 float values"):
        OPS.weight_only_linear(torch.randn(2, 96), packed, scales, zeros, codebook[:8], b, 4, 32, 96)
    with pytest.raises(ValueError, match="a weight tensor is on meta"):
        OPS.weight_only_linear(torch.randn(2, 96), packed, scales, zeros, codebook.to("meta"), b, 4, 32, 96)


def test_weight_only_integer_scales_are_refused():
    packed, scales, zeros, codebook, b = make_weight_only_layer("asym", 4, 8, 96, 32, gen())
    with pytest.raises(ValueError, match=r"scales must be float \(8, 3\)"):
        OPS.weight_only_linear(torch.randn(2, 96), packed, scales.int(), zeros, codebook, b, 4, 32, 96)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_activations_are_refused_by_every_op(dtype):
    """No kernel takes them: the CPU kernels ran them (the fused LayerNorm failed inside torch)."""
    x = torch.randn(3, 64, generator=gen()).to(dtype)
    packed, scales, b = make_a8_layer("ternary", 8, 64, gen())
    wo = make_weight_only_layer("sym", 4, 8, 64, 32, gen())
    calls = [lambda: OPS.quantize_per_token(x), lambda: OPS.ternary_linear(x, packed, scales, b, 64),
             lambda: OPS.ternary_linear(x, packed, scales, b, 64, torch.ones(64), None, 1e-5),
             lambda: OPS.weight_only_linear(x, *wo, 4, 32, 64)]
    for call in calls:
        with pytest.raises(ValueError, match="float32, bfloat16, float16 or float64"):
            call()


def test_an_infinite_norm_eps_is_refused():
    """LayerNorm with it gives every row its bias alone: the layer's output no longer depends on the input."""
    packed, scales, b = make_a8_layer("ternary", 8, 40, gen())
    with pytest.raises(ValueError, match="norm_eps must be positive and finite, got inf"):
        OPS.ternary_linear(torch.randn(2, 40), packed, scales, b, 40, torch.ones(40), None, float("inf"))
    with pytest.raises(ValueError, match="norm_eps must be positive and finite, got inf"):
        OPS.quantize_per_token(torch.randn(2, 40), None, None, float("inf"))


def test_a_weight_only_row_holding_inf_is_multiplied_as_a_float_matmul_does():
    """No per-token scale to turn it into NaN: the row is non-finite as the reference's, the others finite."""
    packed, scales, zeros, codebook, b = make_weight_only_layer("sym", 8, 8, 64, 64, gen())
    x = torch.randn(3, 64, generator=gen(1))
    x[1, 5] = float("inf")
    y = OPS.weight_only_linear(x, packed, scales, zeros, codebook, b, 8, 64, 64)
    ref = reference_weight_only(x, packed, 8, scales, zeros, codebook, b, 64, 64)
    assert torch.equal(y[1].isnan(), ref[1].isnan()) and torch.equal(y[1].isposinf(), ref[1].isposinf())
    assert not torch.isfinite(y[1]).any() and torch.isfinite(y[[0, 2]]).all()
