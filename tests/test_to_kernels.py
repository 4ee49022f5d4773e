"""`to_kernels`: a packed model runs on the bitvit ops and computes what QuantLinear's reference forward does."""
import copy

import pytest
import torch
import torch.nn as nn

import quant
from conftest import TINY
from cuda_ops import CUDAGraphModel, KernelLinear, kernel_for, to_kernels
from quant.models import VisionTransformer, save_model
from quant.pack import pack_trit_planes, unpack_codes
from quant.qlinear import QuantLinear
from quant.quantizers import WEIGHT_FORMATS

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# recipe-like settings: (weight_format, group_size, asymmetric, act_format, input LayerNorm)
FORMATS = {
    "w1.58a8": ("ternary", None, False, "int8_token", True),
    "w1a8": ("binary", None, False, "int8_token", True),
    "w8a8": ("int8", None, False, "int8_token", False),
    "w4a8": ("int4", None, False, "int8_token", False),
    "w4": ("int4", 32, False, "none", False),
    "w4-asym": ("int4", 32, True, "none", False),
    "nf4": ("nf4", 32, False, "none", False),
    "w2": ("int2", None, True, "none", False),
    "w8": ("int8", None, False, "none", False),  # the int8 weight-only head of the low-bit PTQ recipes
}


def quantized_tiny(recipe: str, seed: int = 0) -> nn.Module:
    """The tiny test ViT with every nn.Linear made a QuantLinear of the recipe's format."""
    torch.manual_seed(seed)
    model = VisionTransformer(TINY).eval()
    fmt, group, asym, act, norm = FORMATS[recipe]
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        layer = QuantLinear.from_linear(m, fmt, group, asym, act)
        if norm:  # BitNet's LayerNorm before the activation quantizer, with non-trivial parameters
            layer.input_norm = nn.LayerNorm(m.in_features, eps=1e-6)
            nn.init.uniform_(layer.input_norm.weight, 0.5, 1.5)
            nn.init.normal_(layer.input_norm.bias, std=0.1)
        model.set_submodule(name, layer)
    return model


def images(n=3, seed=1):
    return torch.randn(n, 3, TINY.img_size, TINY.img_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("recipe", list(FORMATS))
def test_to_kernels_matches_the_quantlinear_reference_forward(recipe):
    model = quantized_tiny(recipe)
    x = images()
    with torch.no_grad():
        ref = model(x)
        fast = to_kernels(copy.deepcopy(model))
        y = fast(x)
    assert not any(isinstance(m, QuantLinear) for m in fast.modules())
    assert sum(isinstance(m, KernelLinear) for m in fast.modules()) == 4 * TINY.depth + 1
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_every_weight_format_a_kernel_runs_is_checked_against_the_reference_here():
    run = {f for f in WEIGHT_FORMATS for act in ("int8_token", "none")
           if kernel_for(QuantLinear(64, 8, f, act_format=act))}  # one scale a row: what every kernel takes
    assert run <= {fmt for fmt, *_ in FORMATS.values()}


@pytest.mark.parametrize("recipe", ["w1.58a8", "nf4", "w4-asym"])
def test_to_kernels_keeps_the_state_dict_names_and_tensors(recipe):
    model = quantized_tiny(recipe)
    before = model.state_dict()
    after = to_kernels(copy.deepcopy(model)).state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_the_base3_ternary_layout_computes_the_same_in_less_weight_memory():
    model = quantized_tiny("w1.58a8")
    x = images()
    with torch.no_grad():
        two_bit = to_kernels(copy.deepcopy(model))
        base3 = to_kernels(copy.deepcopy(model), ternary_layout="base3")
        assert torch.equal(base3(x), two_bit(x))  # same codes, same int32 sums
    assert base3.blocks[0].attn.qkv.op == "ternary_b3"
    wide = QuantLinear.from_linear(nn.Linear(768, 16), "ternary", None, False, "int8_token")  # a ViT-B width
    assert KernelLinear(wide, "base3").packed.shape == (16, 160)  # 1.67 bits a weight, 2 in the 2-bit layout
    assert KernelLinear(wide).packed.shape == (16, 192)


def test_a_2bit_state_dict_does_not_load_into_the_base3_layout_where_their_shapes_agree():
    layer = QuantLinear.from_linear(nn.Linear(128, 16), "ternary", None, False, "int8_token")
    base3 = KernelLinear(copy.deepcopy(layer), "base3")
    assert base3.packed.shape == layer.packed.shape           # 32 bytes a row either way: codes would load as planes
    for source, target in ((layer, base3), (to_kernels(copy.deepcopy(layer)), base3), (base3, layer)):
        with pytest.raises(RuntimeError, match="trit_planes"):
            target.load_state_dict(source.state_dict())


@pytest.mark.parametrize("recipe,layout", [("w1.58a8", "2bit"), ("w1.58a8", "base3"), ("w1a8", "2bit"),
                                           ("w8a8", "2bit"), ("w4", "2bit"), ("nf4", "2bit"), ("w2", "2bit")])
def test_a_kernel_model_forward_makes_no_tensor_on_the_default_device(recipe, layout):
    """On a GPU, a tensor made on torch's default device (the host) beside the model's fails. With the model
    on the CPU and meta as the default device, the same mistake fails here (the CPU kernels' wrappers)."""
    model = to_kernels(quantized_tiny(recipe), ternary_layout=layout)
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    with torch.device("meta"):
        assert torch.equal(model(x), expected)


def test_an_unknown_ternary_layout_is_refused():
    with pytest.raises(ValueError, match="ternary_layout"):
        to_kernels(quantized_tiny("w1.58a8"), ternary_layout="3bit")


def test_casting_the_model_keeps_kernel_scales_in_float32():
    model = to_kernels(quantized_tiny("w4")).to(torch.bfloat16)
    layer = model.blocks[0].mlp.fc1
    assert layer.scales.dtype == torch.float32 and layer.packed.dtype == torch.uint8
    assert layer.bias.dtype == torch.bfloat16
    assert model(images().bfloat16()).dtype == torch.bfloat16


def test_layers_without_a_kernel_keep_their_reference_forward_and_are_named():
    model = quantized_tiny("w8a8")
    model.head = QuantLinear.from_linear(nn.Linear(TINY.embed_dim, TINY.num_classes), "int3", 32)
    with pytest.warns(UserWarning, match=r"1 of 9 quantized layers.*head \(int3"):
        to_kernels(model)
    assert isinstance(model.head, QuantLinear) and isinstance(model.blocks[0].attn.qkv, KernelLinear)


def test_a_single_layer_is_swapped_or_kept_with_a_warning():
    ternary = QuantLinear.from_linear(nn.Linear(32, 8), "ternary", 32, act_format="int8_token")
    assert isinstance(to_kernels(ternary), KernelLinear)
    int3 = QuantLinear.from_linear(nn.Linear(32, 8), "int3", 32)
    with pytest.warns(UserWarning, match=r"no bitvit kernel for this layer \(int3 weights"):
        assert to_kernels(int3) is int3


def test_a_model_without_quantized_layers_is_refused():
    with pytest.raises(ValueError, match="no QuantLinear layers"):
        to_kernels(VisionTransformer(TINY))


@pytest.mark.parametrize("thing", ["assets/vit_cifar_tiny-w1.58a8.safetensors", None])
def test_something_other_than_a_model_is_refused_pointing_to_the_loader(thing):
    with pytest.raises(ValueError, match="to_kernels takes a model .*quant.load_quantized"):
        to_kernels(thing)


def test_a_cuda_graph_of_something_other_than_a_cuda_tensor_is_refused():
    with pytest.raises(ValueError, match="CUDA graphs need"):
        CUDAGraphModel(quantized_tiny("w8"), None)


def test_converting_a_converted_model_again_says_so():
    model = to_kernels(quantized_tiny("w8"))
    with pytest.raises(ValueError, match="already runs on bitvit's kernels"):
        to_kernels(model)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("recipe", list(FORMATS))
def test_to_kernels_on_cuda_in_bf16_matches_the_float32_reference(recipe):
    model = quantized_tiny(recipe)
    x = images(4)
    with torch.no_grad():
        ref = model(x)
        fast = to_kernels(copy.deepcopy(model)).cuda().bfloat16()
        y = fast(x.cuda().bfloat16()).float().cpu()
    assert ((y - ref).norm() / ref.norm()).item() < 0.05  # bf16 residual stream, LayerNorms and attention


@pytest.mark.gpu
@needs_cuda
def test_the_base3_ternary_layout_on_cuda_computes_what_the_2bit_layout_does():
    model = quantized_tiny("w1.58a8")
    x = images(4).cuda().bfloat16()
    with torch.no_grad():
        two_bit = to_kernels(copy.deepcopy(model)).cuda().bfloat16()(x)
        base3 = to_kernels(copy.deepcopy(model), ternary_layout="base3").cuda().bfloat16()(x)
    assert torch.equal(base3, two_bit)


@pytest.mark.gpu
@needs_cuda
def test_a_cuda_graph_replays_what_the_eager_model_computes():
    model = to_kernels(quantized_tiny("w1.58a8")).cuda().bfloat16()
    x = images(1).cuda().bfloat16()
    graphed = CUDAGraphModel(model, x)
    for seed in (2, 3):  # fresh inputs through the same graph
        x = images(1, seed).cuda().bfloat16()
        with torch.no_grad():
            assert torch.equal(graphed(x), model(x))
    with pytest.raises(ValueError, match="captured for"):
        graphed(images(2).cuda().bfloat16())


@pytest.mark.parametrize("layer", [
    QuantLinear.from_linear(nn.Linear(64, 8), "int4", None, True, "int8_token"),  # zero points: no int8 kernel
    QuantLinear.from_linear(nn.Linear(96, 8), "int4", 48),                       # a group splits a kernel tile
    QuantLinear.from_linear(nn.Linear(64, 8), "int4", 32, False, "int8_token"),  # grouped scales: no int8 kernel
    QuantLinear.from_linear(nn.Linear(64, 8), "ternary", None, False, "none"),   # float activations: no a8 kernel
    QuantLinear.from_linear(nn.Linear(64, 8), "nf4", 32, False, "int8_token")],  # int8 activations: no weight-only
    ids=["asymmetric-a8", "tile-splitting-group", "grouped-a8", "ternary-float-activations", "nf4-int8-activations"])
def test_layers_the_kernels_cannot_run_exactly_keep_their_reference_forward(layer):
    with pytest.warns(UserWarning, match=r"no bitvit kernel for this layer"):
        assert to_kernels(layer) is layer


def test_a_weight_only_layer_applies_its_input_layer_norm_first():
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(64, 8), "int4", 32)
    layer.input_norm = nn.LayerNorm(64)
    nn.init.uniform_(layer.input_norm.weight, 0.5, 1.5)
    nn.init.normal_(layer.input_norm.bias, std=0.1)
    x = torch.randn(3, 64) * 2 + 1
    with torch.no_grad():
        torch.testing.assert_close(to_kernels(copy.deepcopy(layer))(x), layer(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer,match", [
    (nn.Linear(32, 8), "KernelLinear wraps a QuantLinear, got Linear"),
    (QuantLinear.from_linear(nn.Linear(32, 8), "int3", 32), "no bitvit kernel for int3 weights")],
    ids=["nn.Linear", "int3"])
def test_a_kernel_linear_of_a_layer_without_a_kernel_is_refused(layer, match):
    with pytest.raises(ValueError, match=match):
        KernelLinear(layer)


def test_a_kernel_linear_with_an_unknown_ternary_layout_is_refused():
    ternary = QuantLinear.from_linear(nn.Linear(32, 8), "ternary", None, False, "int8_token")
    with pytest.raises(ValueError, match="ternary_layout must be one of"):
        KernelLinear(ternary, "3bit")


def test_a_single_ternary_layer_is_swapped_into_the_base3_layout():
    ternary = QuantLinear.from_linear(nn.Linear(40, 8), "ternary", None, False, "int8_token")
    fast = to_kernels(ternary, ternary_layout="base3")
    assert isinstance(fast, KernelLinear) and fast.op == "ternary_b3"
    assert torch.equal(fast.packed, pack_trit_planes(unpack_codes(ternary.packed, 2, 40)))


@pytest.mark.parametrize("recipe,name", [("w4-asym", "zeros"), ("nf4", "codebook")])
def test_casting_the_model_keeps_zero_points_and_the_code_book_in_float32(recipe, name):
    model = to_kernels(quantized_tiny(recipe)).to(torch.bfloat16)
    assert getattr(model.blocks[0].mlp.fc1, name).dtype == torch.float32


def test_an_int8_activation_layer_applies_its_input_layer_norm_with_its_own_eps():
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(64, 8), "ternary", None, False, "int8_token")
    layer.input_norm = nn.LayerNorm(64, eps=10.0)  # far from the default: a fused eps that ignored it shows
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(to_kernels(copy.deepcopy(layer))(x), layer(x), rtol=1e-4, atol=1e-5)


def test_a_cuda_graph_of_a_cpu_tensor_is_refused():
    with pytest.raises(ValueError, match="CUDA graphs need the model and the example input on a CUDA device"):
        CUDAGraphModel(quantized_tiny("w8"), torch.randn(1, 3, TINY.img_size, TINY.img_size))


def test_a_kernel_linear_says_which_kernel_runs_it_and_in_which_layout():
    asym = KernelLinear(QuantLinear.from_linear(nn.Linear(64, 8), "int4", 32, True))
    assert repr(asym).endswith("(in_features=64, out_features=8, weight_format=int4 asym, group_size=32, "
                               "act_format=none, kernel=weight_only)")
    ternary = QuantLinear.from_linear(nn.Linear(64, 8), "ternary", None, False, "int8_token")
    assert "kernel=a8, layout=base3" in repr(KernelLinear(ternary, "base3"))
    assert "layout" not in repr(KernelLinear(ternary))


def test_a_model_partly_on_the_kernels_is_not_saved_as_a_quantized_file_that_cannot_load(tmp_path):
    model = quantized_tiny("w8a8")
    model.head = QuantLinear.from_linear(nn.Linear(TINY.embed_dim, TINY.num_classes), "int3", 32)
    with pytest.warns(UserWarning, match="no bitvit kernel"):
        to_kernels(model)  # the int3 head stays a QuantLinear
    with pytest.raises(ValueError, match="runs on bitvit's kernels .*save the QuantLinear model it was made from"):
        quant.save_quantized(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("write", ["save_quantized", "save_model", "export"])
def test_a_model_on_the_kernels_is_refused_saying_that_to_kernels_changed_it_in_place(tmp_path, write):
    """The refusal asks for the QuantLinear model it was made from, which the in-place swap consumed."""
    from export.exporter import export
    model = to_kernels(quantized_tiny("w8a8"))
    call = {"save_quantized": quant.save_quantized, "save_model": save_model,
            "export": lambda m, p: export(m, p, "w8a8")}[write]
    with pytest.raises(ValueError, match=r"swaps layers in place: load its file again, or give to_kernels a copy"):
        call(model, tmp_path / "m.out")


def test_a_model_on_the_kernels_is_not_saved_as_a_full_precision_file(tmp_path):
    model = to_kernels(quantized_tiny("w8a8"))
    with pytest.raises(ValueError, match="runs on bitvit's kernels .*save the QuantLinear model it was made from"):
        save_model(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_a_model_on_the_kernels_is_not_quantized_again():
    model = quantized_tiny("w8a8")
    model.head = nn.Linear(TINY.embed_dim, TINY.num_classes)  # a full-precision layer a recipe would take
    to_kernels(model)
    with pytest.raises(ValueError, match="already quantized, on bitvit's kernels"):
        quant.quantize(model, "w4")
    assert isinstance(model.head, nn.Linear) and not isinstance(model.head, QuantLinear)


@pytest.mark.parametrize("recipe", ["w1.58a8", "w4"])
def test_a_kernel_model_compiles_with_gradients_enabled(recipe):
    """torch.compile traces the backward too where the model's parameters require gradients (the default)."""
    model = to_kernels(quantized_tiny(recipe))
    x = images()
    with torch.no_grad():
        expected = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recipe", ["w1.58a8", "w4a8", "w4", "nf4"])
def test_a_kernel_model_backpropagates_what_the_quantlinear_reference_does(recipe):
    """Per-token int8 quantization passes no gradient (its input is detached); a weight-only layer passes
    x's gradient through its dequantized weights; biases get theirs."""
    model = quantized_tiny(recipe)
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.bias is not None:
            m.bias.requires_grad_(True)
    fast = to_kernels(copy.deepcopy(model))
    grads = []
    for net in (model, fast):
        x = images().requires_grad_()
        net(x).square().sum().backward()
        grads.append([x.grad] + [p.grad for p in net.parameters()])
    for ref, got in zip(*grads):
        if ref is None or got is None:  # no gradient on one side: none or zeros on the other
            assert (ref if got is None else got) is None or not (ref if got is None else got).any()
        else:
            assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("recipe", ["w1.58a8", "w8a8"])
def test_a_compiled_kernel_model_trains_its_biases_as_the_reference_does(recipe):
    """Biases requiring gradients: torch.compile traced the attention's backward on the input gradient the
    int8-activation ops do not pass (the input is detached, as QuantLinear's quantizer takes it) and crashed."""
    model = quantized_tiny(recipe)
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.bias is not None:
            m.bias.requires_grad_(True)
    fast = to_kernels(copy.deepcopy(model))
    torch.compile(fast, backend="aot_eager", fullgraph=True)(images()).square().sum().backward()
    model(images()).square().sum().backward()
    assert torch.allclose(fast.head.bias.grad, model.head.bias.grad, rtol=1e-4, atol=1e-6)


def test_kernel_for_a_layer_that_is_not_a_quantlinear_is_none():
    assert kernel_for(nn.Linear(32, 8)) is None and kernel_for(nn.LayerNorm(32)) is None
    assert kernel_for(QuantLinear.from_linear(nn.Linear(32, 8), "int8", act_format="int8_token")) == "a8"


@pytest.mark.parametrize("first,again", [("2bit", "base3"), ("base3", "2bit")])
def test_converting_a_partly_converted_model_again_in_the_other_ternary_layout_is_refused(first, again):
    model = quantized_tiny("w1.58a8")
    model.head = QuantLinear.from_linear(nn.Linear(TINY.embed_dim, TINY.num_classes), "int3", 32)  # no kernel
    with pytest.warns(UserWarning, match="no bitvit kernel"):
        to_kernels(model, ternary_layout=first)
    with pytest.raises(ValueError, match=f"already run on bitvit's kernels in the other layout, not '{again}'"):
        to_kernels(model, ternary_layout=again)


def test_a_kernel_model_moved_to_the_meta_device_takes_fresh_storage_with_to_empty():
    model = to_kernels(quantized_tiny("w4")).to("meta").to_empty(device="cpu")
    layer = next(m for m in model.modules() if isinstance(m, KernelLinear))
    assert layer.scales.device.type == "cpu" and layer.scales.dtype == torch.float32


def test_a_kernel_models_scales_follow_it_to_another_device_when_it_is_cast():
    model = to_kernels(quantized_tiny("w4")).to("meta", torch.float16)  # as model.to("cuda", torch.float16)
    layer = next(m for m in model.modules() if isinstance(m, KernelLinear))
    assert layer.scales.device.type == "meta" and layer.scales.dtype == torch.float32
