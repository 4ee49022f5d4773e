"""Quantized model files: exact round trips in every format, honest sizes, and refusal of bad files."""
import json

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import quant
from quant.models import VisionTransformer, load_model, save_model
from quant.qlinear import QuantLinear
from quant.quantizers import WEIGHT_FORMATS, is_uniform_format

FORMATS = list(WEIGHT_FORMATS)  # a format added there is round-tripped here


def mlp(k: int, hidden: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(k, hidden), nn.GELU(), nn.Linear(hidden, 3))


def quantized_mlp(fmt: str, k: int, hidden: int, group_size: int | None, asymmetric: bool, seed: int = 0):
    model = mlp(k, hidden, seed)
    for i in (0, 2):
        model[i] = QuantLinear.from_linear(model[i], fmt, group_size, asymmetric and is_uniform_format(fmt))
    return model


@settings(max_examples=25, deadline=None)
@given(fmt=st.sampled_from(FORMATS), k=st.integers(1, 70), hidden=st.integers(1, 9),
       group=st.integers(1, 70), asymmetric=st.booleans(), seed=st.integers(0, 1000))
def test_every_format_round_trips_on_any_shape(tmp_path_factory, fmt, k, hidden, group, asymmetric, seed):
    model = quantized_mlp(fmt, k, hidden, min(group, k), asymmetric, seed)
    path = tmp_path_factory.mktemp("rt") / "m.safetensors"
    quant.save_quantized(model, path)
    back = quant.load_quantized(path, model=mlp(k, hidden))
    for i in (0, 2):
        assert torch.equal(back[i].codes(), model[i].codes())
        assert torch.equal(back[i].dequantized_weight(), model[i].dequantized_weight())
        assert back[i].spec() == model[i].spec()
    x = torch.randn(4, k)
    assert torch.equal(back(x), model(x))


@pytest.mark.parametrize("name", ["w8a8", "w4", "nf4", "w3-gptq", "w4a4"])
def test_quantized_vit_reloads_to_the_same_outputs(tmp_path, tiny_model, name):
    x = torch.randn(16, 3, 16, 16)
    model = quant.quantize(tiny_model, name, calib=x)
    quant.save_quantized(model, tmp_path / "q.safetensors")
    back = quant.load_any(tmp_path / "q.safetensors")
    assert torch.equal(back(x), model(x))
    assert back.quant_recipe["name"] == name


def test_float16_storage_halves_the_unquantized_parameters_and_loads_back_as_float32(tmp_path, tiny_model):
    model = quant.quantize(tiny_model, "w4")
    quant.save_quantized(model, tmp_path / "16.safetensors", float16=True)
    params = [n for n, _ in model.named_parameters()]
    with safe_open(str(tmp_path / "16.safetensors"), "pt") as f:
        assert "pos_embed" in params and all(f.get_tensor(k).dtype == torch.float16 for k in params)
    back = quant.load_any(tmp_path / "16.safetensors")
    assert back.pos_embed.dtype == torch.float32
    assert torch.equal(back.pos_embed, model.pos_embed.half().float())
    x = torch.randn(4, 3, 16, 16)
    assert torch.allclose(back(x), model(x), atol=1e-2)


def test_float16_storage_keeps_calibrated_activation_ranges_in_float32(tmp_path, tiny_model):
    x = torch.randn(16, 3, 16, 16)
    model = quant.quantize(tiny_model, "w4a4", calib=x)
    buffers = {k for k, v in model.state_dict().items() if k.endswith((".scale", ".zero")) and v.is_floating_point()}
    assert buffers  # the static activation quantizers' calibrated ranges
    storage = quant.save_quantized(model, tmp_path / "16.safetensors", float16=True)
    assert storage["float16"] is True
    with safe_open(str(tmp_path / "16.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float32 for k in buffers)
        assert f.get_tensor("pos_embed").dtype == torch.float16


def test_float16_storage_keeps_a_tensor_beyond_its_range_in_float32(tmp_path):
    model = quantized_mlp("int8", 8, 4, None, False)
    with torch.no_grad():
        model[2].bias[0] = 1e6
    quant.save_quantized(model, tmp_path / "m.safetensors", float16=True)
    back = quant.load_quantized(tmp_path / "m.safetensors", model=mlp(8, 4))
    assert back[2].bias[0] == 1e6


def test_ternary_file_costs_about_1_6_bits_per_weight(tmp_path):
    model = quantized_mlp("ternary", 640, 256, None, False)
    storage = quant.save_quantized(model, tmp_path / "t.safetensors")
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert tuple(f.get_tensor("0.packed").shape) == (256, 128)       # 640 codes in 128 base-3 bytes
        assert tuple(f.get_tensor("0.scales").shape) == (1,)             # one scale for the tensor
    assert storage["bits_per_weight"] < 1.61
    assert quant.read_header(tmp_path / "t.safetensors")["storage"] == storage


def test_storage_counts_scales_and_zeros(tmp_path):
    model = quantized_mlp("int4", 128, 64, 64, True)                      # 4 bits + fp16 scale + uint8 zero per 64
    storage = quant.save_quantized(model, tmp_path / "m.safetensors")
    assert storage["bits_per_weight"] == pytest.approx(4 + 16 / 64 + 8 / 64, abs=0.01)


def test_nf4_file_stores_double_quantized_scales(tmp_path):
    model = quantized_mlp("nf4", 256, 64, 64, False)
    storage = quant.save_quantized(model, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.get_tensor("0.scales.codes").dtype == torch.int8
    assert storage["bits_per_weight"] < 4.2                               # 4 + 8/64 + a little


def test_a_loaded_nf4_model_saved_again_keeps_its_double_quantized_scales(tmp_path):
    model = quantized_mlp("nf4", 256, 64, 64, False)
    first = quant.save_quantized(model, tmp_path / "a.safetensors")
    back = quant.load_quantized(tmp_path / "a.safetensors", model=mlp(256, 64))
    assert quant.save_quantized(back, tmp_path / "b.safetensors") == first      # 4.13 bits, not 4.5 with float32 scales


def test_an_nf4_model_loaded_through_load_state_dict_is_saved_with_double_quantized_scales(tmp_path):
    source, target = quantized_mlp("nf4", 256, 64, 64, False), quantized_mlp("nf4", 256, 64, 64, False, seed=1)
    target.load_state_dict(source.state_dict())
    first = quant.save_quantized(source, tmp_path / "a.safetensors")
    assert quant.save_quantized(target, tmp_path / "b.safetensors") == first    # 4.13 bits, not 4.5


def test_an_nf4_state_dict_without_double_quantized_scales_still_loads_and_is_saved_as_its_scales(tmp_path):
    source, target = quantized_mlp("nf4", 128, 8, 64, False), quantized_mlp("nf4", 128, 8, 64, False, seed=1)
    old = {k: v for k, v in source.state_dict().items() if ".scales_dq." not in k}   # as state dicts were before
    target.load_state_dict(old)
    quant.save_quantized(target, tmp_path / "m.safetensors")
    back = quant.load_quantized(tmp_path / "m.safetensors", model=mlp(128, 8))
    assert torch.equal(back[0].scales, source[0].scales)


def test_an_nf4_layers_double_quantized_scales_join_the_given_models_device(tmp_path):
    quant.save_quantized(quantized_mlp("nf4", 128, 8, 64, False), tmp_path / "m.safetensors")
    with pytest.warns(UserWarning, match="meta device"):
        back = quant.load_quantized(tmp_path / "m.safetensors", model=mlp(128, 8).to("meta"))
    assert {t.device.type for t in back.state_dict().values()} == {"meta"}


def test_nf4_scales_changed_after_quantizing_are_stored_as_they_are_not_as_the_stale_double_quantized_form(tmp_path):
    model = quantized_mlp("nf4", 128, 8, 64, False)
    with torch.no_grad():
        model[0].scales.mul_(2)                                           # scales_dq no longer gives them
    quant.save_quantized(model, tmp_path / "m.safetensors")
    back = quant.load_quantized(tmp_path / "m.safetensors", model=mlp(128, 8))
    assert torch.equal(back[0].scales, model[0].scales)


# -- refusals


@pytest.fixture
def saved(tmp_path, tiny_model):
    path = tmp_path / "q.safetensors"
    quant.save_quantized(quant.quantize(tiny_model, "w4"), path)
    return path


def rewrite(path, out, edit_tensors=None, edit_header=None, fix_checksum=True):
    """A copy of a quantized file with its tensors and header edited, and (as a forger would) the checksum fixed."""
    from quant.packfile import _digest
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["header"])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_header:
        edit_header(header)
    if fix_checksum:
        header["sha256"] = _digest(tensors, header)
    save_file(tensors, str(out), metadata={**meta, "header": json.dumps(header)})
    return out


def test_flipped_byte_is_refused_by_the_checksum(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[-100] ^= 0x40
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        quant.load_quantized(tmp_path / "bad.safetensors")


def test_truncated_file_is_refused(saved, tmp_path):
    (tmp_path / "cut.safetensors").write_bytes(saved.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        quant.load_any(tmp_path / "cut.safetensors")


def test_header_disagreeing_with_the_tensors_is_refused(saved, tmp_path):
    def shrink(h):
        h["layers"]["blocks.0.mlp.fc1"]["group_size"] = 16   # the file holds one group per row (32 inputs)
    bad = rewrite(saved, tmp_path / "bad.safetensors", edit_header=shrink)
    with pytest.raises(ValueError, match="header implies"):
        quant.load_quantized(bad)


def test_layer_that_does_not_fit_the_architecture_is_refused(saved, tmp_path):
    def widen(h):
        h["layers"]["blocks.0.mlp.fc1"]["in_features"] = 64
    with pytest.raises(ValueError, match="in the architecture"):
        quant.load_quantized(rewrite(saved, tmp_path / "bad.safetensors", edit_header=widen))


def test_packed_tensor_of_the_wrong_size_is_refused_even_with_a_fixed_checksum(saved, tmp_path):
    def cut(t):
        t["blocks.0.attn.qkv.packed"] = t["blocks.0.attn.qkv.packed"][:, :-1].contiguous()
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.packed"):
        quant.load_quantized(rewrite(saved, tmp_path / "bad.safetensors", edit_tensors=cut))


def test_an_edited_header_is_refused_by_the_checksum(saved, tmp_path):
    def more_heads(h):
        h["architecture"]["config"]["num_heads"] = 4
    bad = rewrite(saved, tmp_path / "bad.safetensors", edit_header=more_heads, fix_checksum=False)
    with pytest.raises(ValueError, match="corrupt"):
        quant.load_quantized(bad)


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["layers"]["blocks.0.mlp.fc1"].update(input_norm="x"), "layer 'blocks.0.mlp.fc1' is damaged"),
    (lambda h: h["layers"]["blocks.0.mlp.fc1"].pop("act_format"), "layer 'blocks.0.mlp.fc1' is damaged"),
    (lambda h: h["layers"]["blocks.0.mlp.fc1"].update(weight_format="int9"),  # maybe a newer bitvit's format
     "layer 'blocks.0.mlp.fc1' holds 'int9' weights, a format this bitvit does not know .*update bitvit"),
    (lambda h: h["architecture"].pop("config"), "the ViT config is not a JSON object"),
    (lambda h: h["architecture"]["config"].update(num_heads=0), "ViT config field 'num_heads'"),
    (lambda h: h["layers"]["blocks.0.mlp.fc1"].update(group_size=True), "layer 'blocks.0.mlp.fc1' is damaged"),
    (lambda h: h["layers"]["blocks.0.mlp.fc1"].update(bits=3), "layer 'blocks.0.mlp.fc1' says 3 bits for int4"),
    (lambda h: h["layers"]["blocks.0.mlp.fc1"].update(weight_format=["int4"]), "layer 'blocks.0.mlp.fc1' is damaged")],
    ids=["norm", "act", "int9", "noconfig", "heads", "group-true", "bits", "format-list"])
def test_a_header_of_the_wrong_shape_is_refused_naming_the_file_even_with_a_fixed_checksum(saved, tmp_path, edit,
                                                                                           message):
    with pytest.raises(ValueError, match=f"bad.safetensors: .*{message}"):
        quant.load_quantized(rewrite(saved, tmp_path / "bad.safetensors", edit_header=edit))


def test_a_header_asking_for_a_huge_architecture_is_refused_before_building_it(saved, tmp_path):
    def huge(h):
        h["architecture"]["config"].update(embed_dim=65536)  # 400 GB of float32 weights
    with pytest.raises(ValueError, match="bad.safetensors: layer .* in the architecture"):
        quant.load_quantized(rewrite(saved, tmp_path / "bad.safetensors", edit_header=huge))


def test_a_header_asking_for_more_blocks_than_the_file_holds_is_refused_before_building_it(saved, tmp_path):
    def deep(h):
        h["architecture"]["config"].update(depth=1000)  # the most a config may ask for
    with pytest.raises(ValueError, match="the config has 1000 blocks, the file holds tensors of"):
        quant.load_quantized(rewrite(saved, tmp_path / "bad.safetensors", edit_header=deep))


def test_a_header_asking_for_more_weights_than_its_bytes_can_pack_is_refused_before_building_the_model(saved,
                                                                                                       tmp_path):
    """The quantized layers' tensors are checked once the model is built: a header whose head (with all its
    tensors) is quantized could ask for 10^12 classes, 32 TB of float32, from a file of a few kB."""
    def wide(h):
        h["architecture"]["config"].update(num_classes=10**12, classes=[])
        h["layers"]["head"]["out_features"] = 10**12
    with pytest.raises(ValueError, match="bad.safetensors: its architecture has 33,000,000,0.* weights, but the file "
                                         "holds .* bytes of tensors, under the 1 bit a weight"):
        quant.load_quantized(rewrite(saved, tmp_path / "bad.safetensors", edit_header=wide))


def test_a_header_whose_layers_ask_for_more_than_the_file_holds_is_refused_before_building_the_model(
        saved, tmp_path, monkeypatch):
    built = []

    def recording(cfg):
        model = VisionTransformer(cfg)
        built.append(next(model.parameters()).device.type)
        return model
    monkeypatch.setattr("quant.packfile.VisionTransformer", recording)
    bad = rewrite(saved, tmp_path / "bad.safetensors",
                  edit_header=lambda h: h["architecture"]["config"].update(mlp_ratio=2000.0))
    with pytest.raises(ValueError, match="layer 'blocks.0.mlp.fc1' is .* in the architecture"):
        quant.load_quantized(bad)
    assert built == ["meta"]


@pytest.mark.parametrize("spec, message", [({"kind": "uniform", "shape": [-1]}, "uniform quantizer has shape"),
                                           ({"kind": "uniform", "shape": "4"}, "uniform quantizer has shape"),
                                           ({"kind": "uniform", "shape": [65536, 256]}, "uniform quantizer has shape"),
                                           ({"kind": "log2", "bits": 99}, "bits must be"),
                                           ({"kind": "log2", "bits": 4, "offsets": [15]}, "offsets must be"),
                                           ({"kind": "log2", "bits": 4, "offsets": [0, 1, 2]}, "3 log2 offsets for 2 heads")],
                         ids=["negative-shape", "text-shape", "huge-shape", "log2-bits", "log2-offset",
                              "log2-offset-count"])
def test_a_damaged_attention_quantizer_entry_is_refused_on_loading(tmp_path, tiny_model, spec, message):
    path = tmp_path / "w4a4.safetensors"
    quant.save_quantized(quant.quantize(tiny_model, "w4a4", calib=torch.randn(8, 3, 16, 16)), path)
    bad = rewrite(path, tmp_path / "bad.safetensors",
                  edit_header=lambda h: h["attention"]["blocks.0.attn"]["slots"].update(attn_quant=spec))
    with pytest.raises(ValueError, match=f"attention 'blocks.0.attn' is damaged.*{message}"):
        quant.load_quantized(bad)


@pytest.fixture
def saved_ternary(tmp_path, tiny_model):
    """A BitNet ternary file: base-3 packed codes and LayerNorms inside the quantized layers."""
    from quant.bitlinear import freeze, prepare
    path = tmp_path / "t.safetensors"
    quant.save_quantized(freeze(prepare(tiny_model, "ternary")), path)
    return path


@pytest.mark.parametrize("edit_header, edit_tensors, message", [
    (lambda h: h["layers"]["blocks.0.mlp.fc1"]["input_norm"].update(eps="x"), None, "has input_norm"),
    (lambda h: h["layers"]["blocks.0.mlp.fc1"]["input_norm"].update(eps=-1.0), None, "has input_norm"),
    (lambda h: h["layers"]["blocks.0.mlp.fc1"]["input_norm"].update(affine="yes"), None, "has input_norm"),
    (lambda h: h["layers"]["blocks.0.mlp.fc1"]["input_norm"].update(bias="yes"), None, "has input_norm"),
    (None, lambda t: t.update({"blocks.0.mlp.fc1.scales": -t["blocks.0.mlp.fc1.scales"]}), "negative"),
    (None, lambda t: t["blocks.0.mlp.fc1.scales"].fill_(float("inf")), "non-finite scales"),
    (None, lambda t: t["blocks.0.mlp.fc1.packed"].fill_(243), "byte value 243")],
    ids=["eps-text", "eps-negative", "affine-text", "bias-text", "negative-scale", "inf-scale", "base3-byte"])
def test_a_forged_ternary_layer_is_refused_on_loading_naming_the_file_and_layer(saved_ternary, tmp_path,
                                                                                edit_header, edit_tensors, message):
    bad = rewrite(saved_ternary, tmp_path / "bad.safetensors", edit_tensors=edit_tensors, edit_header=edit_header)
    with pytest.raises(ValueError, match=f"bad.safetensors: layer 'blocks.0.mlp.fc1'.*{message}"):
        quant.load_quantized(bad)


def test_a_file_of_the_first_format_version_is_refused_as_older(saved, tmp_path):
    with safe_open(str(saved), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={**meta, "format": "bitvit-quant/1"})
    for load in (quant.load_quantized, quant.load_any):
        with pytest.raises(ValueError, match="written by an older bitvit"):
            load(tmp_path / "old.safetensors")


def test_a_tensor_of_another_dtype_is_refused_even_with_a_fixed_checksum(saved, tmp_path):
    def to_int(t):
        t["pos_embed"] = t["pos_embed"].to(torch.int64)
    with pytest.raises(ValueError, match="'pos_embed' has dtype torch.int64"):
        quant.load_quantized(rewrite(saved, tmp_path / "bad.safetensors", edit_tensors=to_int))


def test_a_model_with_nan_weights_is_not_saved(tmp_path, tiny_model):
    q = quant.quantize(tiny_model, "w4")
    with torch.no_grad():
        q.norm.weight[0] = float("nan")
    with pytest.raises(ValueError, match="norm.weight holds NaN"):
        quant.save_quantized(q, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_damaged_header_is_refused(saved, tmp_path):
    with safe_open(str(saved), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, "header": "{not json"})
    with pytest.raises(ValueError, match="damaged header"):
        quant.load_quantized(tmp_path / "bad.safetensors")


def test_full_precision_file_is_not_a_quantized_one(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "fp.safetensors")
    with pytest.raises(ValueError, match="not a quantized bitvit file"):
        quant.load_quantized(tmp_path / "fp.safetensors")
    assert type(quant.load_any(tmp_path / "fp.safetensors")).__name__ == "VisionTransformer"


def test_a_timm_safetensors_file_is_refused_saying_to_name_its_architecture(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "f.safetensors"), metadata={"format": "pt"})  # timm's tag
    with pytest.raises(ValueError, match=r"carries no bitvit config.*load_model\(path, name=\.\.\.\)"):
        quant.load_any(tmp_path / "f.safetensors")


@pytest.mark.parametrize("loader", [quant.load_any, quant.load_quantized, load_model])
def test_an_onnx_file_is_refused_pointing_to_the_onnx_runtime(tmp_path, loader):
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(ValueError, match="is an ONNX file.*export.runtime.load"):
        loader(tmp_path / "m.onnx")


def test_plain_model_file_needs_its_architecture(tmp_path):
    quant.save_quantized(quantized_mlp("int4", 16, 8, 8, True), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="model="):
        quant.load_quantized(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="in the architecture"):
        quant.load_quantized(tmp_path / "m.safetensors", model=mlp(16, 9))


def test_load_any_of_a_plain_model_file_points_to_load_quantized_with_its_model(tmp_path):
    quant.save_quantized(quantized_mlp("int4", 16, 8, 8, True), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"quant\.load_quantized\(path, model="):  # load_any takes no model=
        quant.load_any(tmp_path / "m.safetensors")


def test_a_model_argument_that_is_no_module_is_refused_naming_its_type(tmp_path):
    quant.save_quantized(quantized_mlp("int4", 16, 8, 8, True), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="model must be a full-precision nn.Module .*, got str"):
        quant.load_quantized(tmp_path / "m.safetensors", model="mlp.safetensors")


def test_a_model_a_file_does_not_fit_is_left_as_it_was(tmp_path):
    quant.save_quantized(quantized_mlp("int4", 16, 8, 8, True), tmp_path / "m.safetensors")
    other = nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 4))   # the first layer fits, the last not
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="layer '2' is 3x8 in the file"):
        quant.load_quantized(tmp_path / "m.safetensors", model=other)
    assert [type(m) for m in other] == [nn.Linear, nn.GELU, nn.Linear]
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        quant.load_any(tmp_path / "absent.safetensors")


def test_saving_an_unquantized_model_is_refused(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="no QuantLinear"):
        quant.save_quantized(tiny_model, tmp_path / "x.safetensors")


def test_a_model_moved_to_the_meta_device_is_refused_rather_than_crashing_midway(tmp_path, tiny_model):
    model = quant.quantize(tiny_model, "w8a8").to("meta")
    with pytest.raises(ValueError, match="is on the meta device, without values: load its weights before saving"):
        quant.save_quantized(model, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("frozen", [False, True])
def test_a_model_still_holding_training_time_layers_is_refused_naming_freeze(tmp_path, tiny_model, frozen):
    """Not 'quantize it first' for a model in QAT; and one layer frozen by hand no longer writes a file that
    loading refuses (the other layers' latent weights and input norms as unexpected tensors)."""
    model = quant.quantize(tiny_model, "w1.58a8")
    if frozen:
        model.blocks[0].mlp.fc1 = model.blocks[0].mlp.fc1.freeze()
    with pytest.raises(ValueError, match=r"training layers: freeze them first \(quant\.bitlinear\.freeze or "):
        quant.save_quantized(model, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_compiled_model_is_refused_rather_than_saved_to_a_file_that_does_not_load(tmp_path, tiny_model):
    model = torch.compile(quant.quantize(tiny_model, "w4"))   # names under _orig_mod., beside the ViT's config
    with pytest.raises(ValueError, match=r"torch\.compile'd: save the model it compiled, model\._orig_mod"):
        quant.save_quantized(model, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("model, kwargs, message", [("path", {}, "writes a model"),
                                                    ("tiny", {"float16": "no"}, "float16 must be True or False")])
def test_saving_something_other_than_a_model_or_a_flag_that_is_not_a_bool_is_refused(tmp_path, tiny_model, model,
                                                                                      kwargs, message):
    with pytest.raises(ValueError, match=message):
        quant.save_quantized(tiny_model if model == "tiny" else "m.safetensors", tmp_path / "x.safetensors", **kwargs)


def test_layers_rebuilt_into_a_given_model_join_its_device(tmp_path):
    quant.save_quantized(quantized_mlp("int4", 16, 8, 8, False), tmp_path / "m.safetensors")
    with pytest.warns(UserWarning, match="meta device"):
        back = quant.load_quantized(tmp_path / "m.safetensors", model=mlp(16, 8).to("meta"))  # as a GPU would be
    assert {t.device.type for t in back.state_dict().values()} == {"meta"}


def test_a_file_loaded_into_a_meta_model_gives_one_warning_saying_it_holds_no_values(tmp_path, tiny_model):
    quant.save_quantized(quant.quantize(tiny_model, "w4"), tmp_path / "m.safetensors")
    with torch.device("meta"):
        skeleton = VisionTransformer(tiny_model.config)
    with pytest.warns(UserWarning) as caught:
        quant.load_quantized(tmp_path / "m.safetensors", model=skeleton)
    assert len(caught) == 1 and "is on the meta device, which holds no values" in str(caught[0].message)


def test_layers_rebuilt_into_a_given_half_model_run_in_half_keeping_float32_scales(tmp_path):
    model = quantized_mlp("int4", 16, 8, 8, True)
    quant.save_quantized(model, tmp_path / "m.safetensors")
    back = quant.load_quantized(tmp_path / "m.safetensors", model=mlp(16, 8).half())
    x = torch.randn(4, 16)
    assert {p.dtype for p in back.parameters()} == {torch.float16}
    assert {back[i].scales.dtype for i in (0, 2)} == {back[i].zeros.dtype for i in (0, 2)} == {torch.float32}
    assert torch.allclose(back(x.half()).float(), model(x), atol=1e-2)


def test_a_file_loads_into_a_given_model_already_quantized(tmp_path):
    model = quantized_mlp("int4", 16, 8, 8, True)
    quant.save_quantized(model, tmp_path / "m.safetensors")
    back = quant.load_quantized(tmp_path / "m.safetensors", model=quantized_mlp("int4", 16, 8, 8, True))
    x = torch.randn(4, 16)
    assert torch.equal(back(x), model(x))


def test_scales_that_are_not_float16_values_are_stored_exactly(tmp_path):
    model = quantized_mlp("int4", 16, 8, 8, True)
    with torch.no_grad():
        model[0].scales.mul_(1 + 2 ** -14)                                # no longer float16 values
    quant.save_quantized(model, tmp_path / "m.safetensors")
    back = quant.load_quantized(tmp_path / "m.safetensors", model=mlp(16, 8))
    assert torch.equal(back[0].scales, model[0].scales)
    assert quant.read_header(tmp_path / "m.safetensors")["layers"]["0"]["scales"] == "float32"


@pytest.mark.parametrize("zero", [16, 7.5])
def test_zero_points_beyond_the_code_range_or_between_codes_are_not_saved(tmp_path, zero):
    model = quantized_mlp("int4", 16, 8, 8, True)
    with torch.no_grad():
        model[0].zeros[0, 0] = zero
    with pytest.raises(ValueError, match=r"zero points must be integer codes in 0\.\.15"):
        quant.save_quantized(model, tmp_path / "m.safetensors")


@pytest.mark.parametrize("scale", [float("nan"), -1.0])
def test_a_layer_with_nan_or_negative_scales_is_not_saved(tmp_path, scale):
    """A negative scale would be written into a file that loading refuses."""
    model = quantized_mlp("int4", 16, 8, 8, True)
    with torch.no_grad():
        model[2].scales[0, 0] = scale
    with pytest.raises(ValueError, match="2 has NaN, infinite or negative scales"):
        quant.save_quantized(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_a_forged_zero_point_beyond_the_code_range_is_refused_even_with_a_fixed_checksum(tmp_path):
    path = tmp_path / "m.safetensors"
    quant.save_quantized(quantized_mlp("int4", 16, 8, 8, True), path)
    bad = rewrite(path, tmp_path / "bad.safetensors", edit_tensors=lambda t: t["0.zeros"].fill_(16))
    with pytest.raises(ValueError, match="layer '0' has zero point 16, beyond 4-bit codes"):
        quant.load_quantized(bad, model=mlp(16, 8))


def test_a_forged_ternary_layer_in_the_two_bit_layout_holding_code_3_is_refused(saved_ternary, tmp_path):
    def two_bit(t):                                                       # fc1: 32 inputs, 8 bytes of 2-bit codes
        t["blocks.0.mlp.fc1.packed"] = torch.full((len(t["blocks.0.mlp.fc1.packed"]), 8), 255, dtype=torch.uint8)
    bad = rewrite(saved_ternary, tmp_path / "bad.safetensors", edit_tensors=two_bit,
                  edit_header=lambda h: h["layers"]["blocks.0.mlp.fc1"].update(packing="bits"))
    with pytest.raises(ValueError, match="layer 'blocks.0.mlp.fc1' holds ternary code 3"):
        quant.load_quantized(bad)


def test_a_forged_input_norm_with_eps_zero_is_refused(saved_ternary, tmp_path):
    bad = rewrite(saved_ternary, tmp_path / "bad.safetensors",
                  edit_header=lambda h: h["layers"]["blocks.0.mlp.fc1"]["input_norm"].update(eps=0.0))
    with pytest.raises(ValueError, match="layer 'blocks.0.mlp.fc1' has input_norm"):
        quant.load_quantized(bad)


def test_a_vit_file_loaded_into_a_model_of_another_config_is_refused(saved, tiny_model):
    import dataclasses
    other = VisionTransformer(dataclasses.replace(tiny_model.config, classes=("a", "b", "c")))  # same shapes
    with pytest.raises(ValueError, match="holds different classes than the model given"):
        quant.load_quantized(saved, model=other)


def test_a_quantizer_spec_asking_for_more_than_65536_ranges_is_refused_before_allocating():
    from quant.quantizers import quantizer_from_spec
    with pytest.raises(ValueError, match="at most 65536 values in all"):
        quantizer_from_spec({"kind": "uniform", "shape": [65536, 65536, 65536, 65536]})


@pytest.mark.parametrize("fmt", ["bitvit-quant/3", "bitvit-vit/2", "bitvit-cnn/9"])
def test_a_file_of_a_newer_bitvit_format_says_so(tmp_path, fmt):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "m.safetensors"), metadata={"format": fmt})
    with pytest.raises(ValueError, match=f"written by a newer bitvit \\(format {fmt}; this one reads"):
        quant.load_any(tmp_path / "m.safetensors")


def test_bits_per_weight_are_not_rounded_before_they_are_printed(tmp_path):
    model = quantized_mlp("int4", 14, 10, None, False)               # 5.22353 bits, "5.224"; rounded to 5.2235, "5.223"
    storage = quant.save_quantized(model, tmp_path / "m.safetensors")
    assert f"{storage['bits_per_weight']:.3f}" == f"{8 * storage['linear_bytes'] / storage['linear_weights']:.3f}"
    assert storage["bits_per_weight"] == 8 * storage["linear_bytes"] / storage["linear_weights"]  # exact, not rounded finer
