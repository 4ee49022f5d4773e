"""quantize(model, recipe): the named recipes, overrides, and models that are not bitvit's ViT."""
import copy
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import quant
from quant import gptq
from quant.bitlinear import BitLinear
from quant.qlinear import QuantLinear
from quant.recipes import GPTQ, RECIPES, RTN, W4A4, BitNet, QViT


class TwoTower(nn.Module):
    """Not a ViT: linear layers in a ModuleDict and a nested Sequential, with a skip connection."""

    def __init__(self):
        super().__init__()
        self.towers = nn.ModuleDict({"a": nn.Linear(24, 48), "b": nn.Linear(24, 48)})
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(96, 5))

    def forward(self, x):
        return self.out(torch.cat([self.towers["a"](x), self.towers["b"](x) + x.repeat(1, 2)], -1))


def plain_model():
    torch.manual_seed(0)
    return TwoTower().eval()


def test_every_issue_recipe_name_exists():
    assert {"w8a8", "w4", "nf4", "w4-gptq", "w3-gptq", "w4a4", "w1.58a8", "w1a8", "qvit"} <= set(RECIPES)


def test_recipe_fields_can_be_overridden_and_unknown_ones_are_refused():
    assert quant.recipe("w4", group_size=128).group_size == 128
    with pytest.raises(ValueError, match="no field 'bitz'"):
        quant.recipe("w4", bitz=3)
    with pytest.raises(ValueError, match="unknown recipe"):
        quant.recipe("w5")


def test_a_recipe_name_that_is_no_string_is_refused_as_an_unknown_one():
    with pytest.raises(ValueError, match=r"unknown recipe \['w4'\]; known: w8a8"):
        quant.recipe(["w4"])


@pytest.mark.parametrize("override, message", [({"group_size": "abc"}, "must be int | None"),
                                               ({"group_size": True}, "must be int | None"),
                                               ({"group_size": -3}, "at least 1"),
                                               ({"group_size": 0}, "at least 1"),
                                               ({"asymmetric": 1}, "must be bool")])
def test_overrides_of_the_wrong_type_or_range_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        quant.recipe("w4", **override)


@pytest.mark.parametrize("name, override, message", [("w4a4", {"act_bits": 99}, "act_bits must lie in 2..8"),
                                                     ("w4a4", {"act_bits": 1}, "act_bits must lie in 2..8"),
                                                     ("w4a4", {"weight_bits": 9}, "weight_bits must lie in 2..8"),
                                                     ("w4-gptq", {"bits": 12}, "bits must lie in 2..8"),
                                                     ("qvit", {"max_bits": 9}, "max_bits must lie in 2..8"),
                                                     ("qvit", {"min_bits": 1}, "min_bits must lie in 2..8")])
def test_bit_widths_no_format_has_are_refused_before_any_work(name, override, message):
    with pytest.raises(ValueError, match=message):
        quant.recipe(name, **override)


@pytest.mark.parametrize("name, override, message", [
    ("w4a4", {"softmax": "linear"}, "softmax must be one of log2, uniform, got 'linear'"),
    ("w4", {"weight_format": "int9"}, "weight_format must be one of int8, .*binary, got 'int9'"),
    ("w4-gptq", {"layer_formats": (("head", "fp8"),)}, "layer_formats names unknown weight format 'fp8'")])
def test_formats_and_quantizers_that_do_not_exist_are_refused_before_any_work(name, override, message):
    with pytest.raises(ValueError, match=message):
        quant.recipe(name, **override)


@pytest.mark.parametrize("build, message", [(lambda: W4A4(softmax="linear"), "softmax must be one of"),
                                            (lambda: RTN("mine", "int9"), "weight_format must be one of"),
                                            (lambda: GPTQ("mine", 4, damp=2.0), "damp .* must lie in 0..1"),
                                            (lambda: BitNet("mine", "int4"), "BitNet's weight_format is ternary or binary"),
                                            (lambda: BitNet("mine", "ternary", input_norm="yes"),
                                             "input_norm must be bool"),
                                            (lambda: QViT(budget_bits=9.0), "min_bits <= budget_bits <= max_bits")])
def test_a_recipe_built_directly_is_checked_as_an_override_is(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("name, field", [("w1.58a8", "act_format"), ("w1.58a8", "budget_bits"),
                                         ("qvit", "input_norm"), ("qvit", "weight_format")])
def test_a_qat_recipe_refuses_fields_its_method_does_not_read(name, field):
    with pytest.raises(ValueError, match=f"has no field '{field}'"):
        quant.recipe(name, **{field: None})


@pytest.mark.parametrize("override", [{"min_bits": 8, "max_bits": 2}, {"budget_bits": 100.0}])
def test_a_qvit_budget_outside_its_bit_range_is_refused(override):
    with pytest.raises(ValueError, match="min_bits <= budget_bits <= max_bits must hold"):
        quant.recipe("qvit", **override)


def test_lsq_refuses_a_budget_of_fractional_bits():
    with pytest.raises(ValueError, match="a whole number of bits"):
        quant.recipe("lsq", budget_bits=3.5)


@pytest.mark.parametrize("name, override", [("qvit", {"min_bits": 2, "budget_bits": 2.0}),
                                            ("qvit", {"budget_bits": 8}), ("w4a4", {"weight_bits": 2, "act_bits": 2}),
                                            ("w4-gptq", {"bits": 8, "damp": 0.0})])
def test_the_range_ends_of_widths_budgets_and_damping_are_accepted(name, override):
    r = quant.recipe(name, **override)
    assert all(getattr(r, k) == v for k, v in override.items())


@pytest.mark.parametrize("name", ["w8a8", "w4a8", "w4a8-gptq", "w4", "w3", "nf4", "w4-gptq", "w2-gptq"])
def test_quantize_turns_every_linear_of_a_plain_model_into_quantlinear(name):
    model, x = plain_model(), torch.randn(64, 24)
    ref = model(x)
    out = quant.quantize(model, name, calib=x)
    assert out is model
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert len([m for m in model.modules() if isinstance(m, QuantLinear)]) == 3
    rel = (model(x) - ref).norm() / ref.norm()
    assert rel < {"w8a8": 0.02, "w4a8": 0.2, "w4a8-gptq": 0.2, "w4": 0.15, "w3": 0.3, "nf4": 0.15, "w4-gptq": 0.15,
                  "w2-gptq": 0.8}[name]


def test_plain_model_round_trips_through_a_file(tmp_path):
    model, x = plain_model(), torch.randn(8, 24)
    quant.quantize(model, "w4")
    quant.save_quantized(model, tmp_path / "m.safetensors")
    back = quant.load_quantized(tmp_path / "m.safetensors", model=TwoTower())
    assert torch.equal(back(x), model(x))


def test_vit_head_stays_int8_in_low_bit_recipes(tiny_model):
    quant.quantize(tiny_model, "w3")
    assert tiny_model.head.weight_format == "int8"
    assert tiny_model.blocks[0].mlp.fc1.weight_format == "int3"


@pytest.mark.parametrize("name", ["w4", "w4-gptq"])
def test_a_layer_format_override_is_per_output_channel_and_symmetric(name):
    model = plain_model()                                       # out.1 has 96 inputs: more than one group of 64
    quant.quantize(model, quant.recipe(name, layer_formats=(("out.1", "int8"),)), calib=torch.randn(16, 24))
    out = model.out[1]
    assert (out.weight_format, out.scales.shape, out.zeros) == ("int8", (5, 1), None)


def test_the_first_matching_layer_format_pattern_wins():
    model = plain_model()
    quant.quantize(model, quant.recipe("w4", layer_formats=(("out.*", "int8"), ("out.1", "int2"))))
    assert model.out[1].weight_format == "int8" and model.towers["a"].weight_format == "int4"


def test_w4_holds_asymmetric_int4_in_groups_of_64():
    model = plain_model()
    quant.quantize(model, "w4")
    fc = model.out[1]                                           # 96 inputs: groups of 64 and 32
    assert (fc.weight_format, fc.scales.shape, fc.zeros.shape) == ("int4", (5, 2), (5, 2))


def test_nf4_with_group_size_none_has_one_scale_per_output_channel():
    model = plain_model()                                       # out.1 has 96 inputs: two groups of 64 by default
    quant.quantize(model, quant.recipe("nf4", group_size=None, layer_formats=()))
    fc = model.out[1]
    assert (fc.weight_format, fc.group_size, fc.scales.shape) == ("nf4", 96, (5, 1))


def test_quantize_records_the_recipe_on_the_model():
    model = quant.quantize(plain_model(), quant.recipe("w4", group_size=32))
    assert model.quant_recipe == {"type": "RTN", "name": "w4", "weight_format": "int4", "group_size": 32,
                                  "asymmetric": True, "act_format": "none", "layer_formats": (("head", "int8"),)}


def test_a_qat_recipe_is_recorded_on_the_model_too():
    model = quant.quantize(plain_model(), "w1.58a8")
    assert model.quant_recipe["type"] == "BitNet" and model.quant_recipe["weight_format"] == "ternary"


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_quantize_that_fails_halfway_leaves_the_model_as_it_was_and_a_retry_works(monkeypatch):
    model, calib = plain_model().train(), torch.randn(64, 24)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    solve, calls = gptq.gptq_weight, []

    def fail_on_the_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("GPTQ: the inputs' Hessian is not positive definite")
        return solve(*args, **kwargs)

    monkeypatch.setattr(gptq, "gptq_weight", fail_on_the_second_layer)
    with pytest.raises(ValueError, match="not positive definite"):
        quant.quantize(model, "w4-gptq", calib=calib)
    assert len(calls) == 2 and model.training and not hasattr(model, "quant_recipe")
    assert [type(m) for m in model.modules() if isinstance(m, (nn.Linear, QuantLinear))] == [nn.Linear] * 3
    assert same_state(model.state_dict(), before)
    monkeypatch.setattr(gptq, "gptq_weight", solve)
    assert isinstance(quant.quantize(model, "w4-gptq", calib=calib).out[1], QuantLinear)


def test_a_gptq_recipe_missing_its_calibration_leaves_the_models_mode_alone():
    model = plain_model().train()
    with pytest.raises(ValueError, match="calibration"):
        quant.quantize(model, "w4-gptq")
    assert model.training


def test_w4a4_refuses_a_layer_outside_the_blocks_no_layer_format_matches_before_touching_the_model(
        tiny_model, monkeypatch):
    from quant import w4a4
    monkeypatch.setattr(w4a4, "capture", lambda *a, **k: pytest.fail("W4A4 calibrated before refusing"))
    with pytest.raises(ValueError, match="none matches 'head'"):
        quant.quantize(tiny_model, quant.recipe("w4a4", layer_formats=()), calib=torch.randn(4, 3, 32, 32))


@pytest.mark.parametrize("name, advice", [("w4", ", or give layer_formats naming '1.head'"),
                                          ("nf4", ", or give layer_formats naming '1.head'"),
                                          ("w4-gptq", ", or give layer_formats naming '1.head'"),
                                          ("w1.58a8", ", or give skip naming '1.head'"), ("qvit", "")])
def test_a_wrapped_vits_head_is_refused_rather_than_quantized_at_the_recipes_low_width(tiny_model, name, advice):
    model = nn.Sequential(nn.Identity(), tiny_model)   # its head is '1.head', which the default 'head' misses
    with pytest.raises(ValueError, match=rf"this model's head is '1\.head': quantize the model inside, "
                                         rf"model\.get_submodule\('1'\){re.escape(advice)}$"):
        quant.quantize(model, name, calib=torch.randn(2, 3, 16, 16))
    assert type(tiny_model.head) is nn.Linear


def test_gptq_solves_the_layers_named_in_layer_formats_with_the_recipes_damping_and_order(monkeypatch):
    seen, solve = {}, gptq.gptq_weight

    def record(w, H, bits, **settings):
        seen[bits] = settings
        return solve(w, H, bits, **settings)

    monkeypatch.setattr(gptq, "gptq_weight", record)
    quant.quantize(plain_model(), quant.recipe("w4-gptq", layer_formats=(("out.1", "int8"),), damp=0.2,
                                               act_order=True, block_size=16), calib=torch.randn(64, 24))
    assert {k: seen[8][k] for k in ("damp", "act_order", "block_size")} == {"damp": 0.2, "act_order": True,
                                                                            "block_size": 16}
    assert seen[8]["group_size"] is None and seen[4]["damp"] == 0.2


def test_quantize_returns_the_model_in_eval_mode():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).train()
    assert not quant.quantize(model, "w4").training


@pytest.mark.parametrize("name", ["w4", "w4-gptq", "w4a4"])
def test_quantize_returns_every_module_in_eval_mode_the_quantized_layers_too(tiny_model, name):
    model = quant.quantize(tiny_model.train(), name, calib=torch.randn(4, 3, 16, 16))
    assert [n for n, m in model.named_modules() if m.training] == []


def test_a_model_without_linear_layers_is_refused():
    with pytest.raises(ValueError, match="no nn.Linear layers"):
        quant.quantize(nn.Sequential(nn.ReLU()), "w4")


def test_w8a8_quantizes_activations_per_token(tiny_model):
    quant.quantize(tiny_model, "w8a8")
    assert {m.act_format for m in tiny_model.modules() if isinstance(m, QuantLinear)} == {"int8_token"}


@pytest.mark.parametrize("name", ["w4a8", "w4a8-gptq"])
def test_w4a8_holds_symmetric_int4_rows_with_per_token_int8_inputs_and_an_int8_head(tiny_model, name):
    quant.quantize(tiny_model, name, calib=torch.randn(16, 3, 16, 16))
    fc1, head = tiny_model.blocks[0].mlp.fc1, tiny_model.head
    assert (fc1.weight_format, fc1.scales.shape[1], fc1.zeros, fc1.act_format) == ("int4", 1, None, "int8_token")
    assert (head.weight_format, head.act_format) == ("int8", "int8_token")


def test_calibrating_recipes_need_calibration_inputs():
    with pytest.raises(ValueError, match="calibration inputs"):
        quant.quantize(plain_model(), "w4-gptq")


@pytest.mark.parametrize("calib, message", [(torch.full((4, 3, 16, 16), float("nan")), "NaN"),
                                            (torch.zeros(0, 3, 16, 16), "N >= 1"),
                                            (torch.tensor(1.0), "N >= 1"),
                                            (np.zeros((4, 3, 16, 16), np.float32), "a tensor of N >= 1")])
def test_calibration_inputs_that_cannot_calibrate_are_refused(tiny_model, calib, message):
    with pytest.raises(ValueError, match=message):
        quant.quantize(tiny_model, "w4-gptq", calib=calib)


def test_a_model_fed_token_ids_calibrates_on_integer_inputs():
    model = nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
    quant.quantize(model, quant.recipe("w4-gptq", layer_formats=()), calib=torch.randint(0, 50, (16, 5)))
    assert all(isinstance(m, QuantLinear) for m in (model[1], model[3]))


@pytest.mark.parametrize("override, message", [({"name": "mine"}, "has no field 'name'"),
                                               ({"layer_formats": ((1, 2),)}, "layer_formats must be"),
                                               ({"layer_formats": (("head",),)}, "layer_formats must be"),
                                               ({"act_format": "uint4_tensor"}, "calibrates no activation ranges")])
def test_overrides_a_round_to_nearest_recipe_cannot_honour_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        quant.recipe("w4", **override)


def test_gptq_refuses_static_activation_formats_it_cannot_calibrate():
    with pytest.raises(ValueError, match="calibrates no activation ranges"):
        quant.recipe("w4-gptq", act_format="uint4_tensor")


def test_gptq_settings_of_the_recipe_reach_every_layer_it_solves(monkeypatch):
    seen = []
    solve = gptq.gptq_weight

    def spy(w, H, bits, what, **settings):   # `what`: the layer, named in a refusal
        seen.append((bits, settings))
        return solve(w, H, bits, what=what, **settings)

    monkeypatch.setattr(gptq, "gptq_weight", spy)
    r = quant.recipe("w3-gptq", group_size=8, asymmetric=False, act_order=True, damp=0.1, block_size=16,
                     layer_formats=())
    quant.quantize(plain_model(), r, calib=torch.randn(16, 24))
    assert seen == 3 * [(3, {"group_size": 8, "asymmetric": False, "act_order": True, "damp": 0.1, "block_size": 16})]


def test_a_negative_gptq_damping_is_refused():
    with pytest.raises(ValueError, match="damp .* must lie in 0..1"):
        quant.recipe("w4-gptq", damp=-1.0)


def test_w4a4_refuses_a_model_without_vit_blocks():
    with pytest.raises(ValueError, match="ViT-aware"):
        quant.quantize(plain_model(), "w4a4", calib=torch.randn(4, 24))


@pytest.mark.parametrize("model, recipe, message", [
    ("model.safetensors", "w4", "quantize takes a model"), (None, "w4", "quantize takes a model"),
    ("half", "w4", "quantize a float32 model"), ("tiny", quant.recipes.RTN, "not a recipe"),
    ("linear", "w4", r"cannot replace the model itself: give a model holding the layer \(nn.Sequential"),
    ("linear", "w1.58a8", "cannot replace the model itself")])
def test_quantize_refuses_what_it_cannot_quantize_saying_what_to_give(tiny_model, model, recipe, message):
    model = {"tiny": tiny_model, "half": tiny_model.half(), "linear": torch.nn.Linear(8, 4)}.get(model, model)
    with pytest.raises(ValueError, match=message):
        quant.quantize(model, recipe)


def test_a_model_holding_nan_weights_is_refused_before_quantizing(tiny_model):
    with torch.no_grad():
        tiny_model.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="blocks.0.mlp.fc1.weight holds NaN"):
        quant.quantize(tiny_model, "w4")


def test_calibration_inputs_of_another_dtype_than_the_model_are_refused(tiny_model):
    with pytest.raises(ValueError, match="calibration inputs are torch.float64, the model torch.float32"):
        quant.quantize(tiny_model, "w4-gptq", calib=torch.zeros(4, 3, 16, 16, dtype=torch.float64))


def test_qat_recipe_hands_over_training_time_layers(tiny_model):
    model = quant.quantize(tiny_model, "w1.58a8")
    kinds = {type(m).__name__ for m in model.modules()}
    assert "BitLinear" in kinds and isinstance(model.head, nn.Linear)


def test_qvit_recipe_hands_over_learnable_quantizers(tiny_model):
    model = quant.quantize(tiny_model, quant.recipe("qvit", budget_bits=3))
    assert any(type(m).__name__ == "LSQLinear" for m in model.modules())


@pytest.mark.parametrize("name", ["w1.58a8", "w1a8", "qvit"])
def test_qat_layers_are_built_on_the_model_device(name):
    """A CUDA model's Q-ViT attention quantizers were left on the host. A model on the meta device (with the
    default device the CPU) shows the same: every tensor of the prepared model must be on meta."""
    from conftest import TINY
    from quant.models import VisionTransformer
    with torch.device("meta"):
        model = VisionTransformer(TINY)
    quant.quantize(model, name)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}


def test_an_already_quantized_model_is_refused(tiny_model):
    quantized = quant.quantize(tiny_model, "w8a8")
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize(quantized, "w4")


def test_quantizing_a_model_again_with_another_recipe_is_refused_saying_the_first_call_changed_it_in_place(
        tiny_model):
    quant.quantize(tiny_model, "w8a8")       # the notebook's first try, result unassigned
    with pytest.raises(ValueError, match=r"changes the model it is given in place: load it again, or quantize a "
                                         r"copy\.deepcopy\(model\)"):
        quant.quantize(tiny_model, "w4")


def test_a_model_holding_multihead_attention_is_not_taken_for_a_quantized_one():
    """nn.MultiheadAttention's out_proj is an nn.Linear subclass, not a QAT layer: the plain linears are quantized."""
    class WithAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.fc = nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(self.attn(x, x, x)[0])

    model = quant.quantize(WithAttention(), "w8a8")
    assert isinstance(model.fc, QuantLinear) and type(model.attn.out_proj) is not QuantLinear
    assert model(torch.randn(2, 5, 16)).shape == (2, 5, 4)


def test_gptq_refuses_a_layer_format_it_cannot_solve_for_before_touching_the_model():
    with pytest.raises(ValueError, match="layer_formats must be int2..int8, got 'nf4'"):
        quant.recipe("w4-gptq", layer_formats=(("2", "nf4"),))


def test_gptq_refuses_a_layer_format_named_like_intb_that_is_no_uniform_grid(monkeypatch):
    monkeypatch.setitem(quant.quantizers.WEIGHT_FORMATS, "int2s", 2)  # a new format: "int" in its name only
    with pytest.raises(ValueError, match="layer_formats must be int2..int8, got 'int2s'"):
        quant.recipe("w4-gptq", layer_formats=(("2", "int2s"),))


def test_a_layer_formats_pattern_that_matches_no_layer_is_refused_naming_it(tiny_model):
    typo = quant.recipe("w4", layer_formats=(("head", "int8"), ("blocks.*.mlp.fc3", "int8")))
    with pytest.raises(ValueError, match=r"pattern 'blocks\.\*\.mlp\.fc3' matches no linear layer"):
        quant.quantize(tiny_model, typo)
    assert not any(isinstance(m, QuantLinear) for m in tiny_model.modules())


@pytest.mark.parametrize("name", ["w4", "w4-gptq"])
def test_a_linear_layer_shared_under_two_names_is_refused_naming_both(name):
    fc = nn.Linear(8, 8)
    model = nn.Sequential(fc, nn.ReLU(), fc)                   # quantized as '0', '2' stayed float
    with pytest.raises(ValueError, match="one linear layer as both '0' and '2'"):
        quant.quantize(model, quant.recipe(name, layer_formats=()), calib=torch.randn(4, 8))
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))


@pytest.mark.parametrize("name", ["w4", "w4-gptq"])
def test_post_training_quantization_of_a_model_on_the_meta_device_is_refused(name):
    with torch.device("meta"):
        model = plain_model()
    with pytest.raises(ValueError, match="on the meta device, without values"):
        quant.quantize(model, name, calib=torch.randn(4, 24))


@pytest.mark.parametrize("name", ["w4", "w4a4", "w1.58a8"])
def test_a_model_made_under_inference_mode_is_refused_outside_it_and_quantized_inside_it(tiny_model, name):
    x = torch.randn(4, 3, 16, 16)
    with torch.inference_mode():
        model = copy.deepcopy(tiny_model)            # as quant.load_any inside it loads one
    with pytest.raises(ValueError, match=r"model's cls_token was made under torch.inference_mode.* quantize the "
                                         r"model inside torch.inference_mode\(\)"):
        quant.quantize(model, name, calib=x)
    with torch.inference_mode():
        assert quant.quantize(model, name, calib=x)(x).shape == (4, 3)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("name", ["w4", "nf4", "w4-gptq"])
def test_a_linear_layer_without_inputs_is_refused_naming_it(name):
    model = nn.Sequential(nn.Linear(0, 4))
    with pytest.raises(ValueError, match="linear layer '0' has no weights"):
        quant.quantize(model, quant.recipe(name, layer_formats=()), calib=torch.randn(4, 0))


def test_a_bitnet_skip_name_that_is_no_layer_of_the_model_is_refused_naming_it(tiny_model):
    typo = quant.recipe("w1.58a8", skip=("head", "blocks.*.mlp.fc2"))     # a pattern, not a layer name
    with pytest.raises(ValueError, match=r"skip names 'blocks\.\*\.mlp\.fc2', which is not a linear layer"):
        quant.quantize(tiny_model, typo)
    assert not any(isinstance(m, BitLinear) for m in tiny_model.modules())


def test_bitnet_skip_keeps_the_layers_it_names_in_floating_point(tiny_model):
    quant.quantize(tiny_model, quant.recipe("w1.58a8", skip=("head", "blocks.0.mlp.fc2")))
    assert type(tiny_model.blocks[0].mlp.fc2) is nn.Linear and isinstance(tiny_model.blocks[1].mlp.fc2, BitLinear)


def test_bitnet_skip_must_hold_layer_names():
    with pytest.raises(ValueError, match=r"skip must be tuple\[str, ...\], got \(1,\)"):
        quant.recipe("w1a8", skip=(1,))


def test_the_default_head_pattern_holds_only_where_a_model_has_a_head():
    model = quant.quantize(plain_model(), "w4")
    assert all(m.weight_format == "int4" for m in model.modules() if isinstance(m, QuantLinear))


@pytest.mark.parametrize("calib", [torch.randn(8, 23), torch.ones(8, 24, dtype=torch.long)])
def test_calibration_inputs_the_model_cannot_run_on_are_refused_with_one_message(calib):
    with pytest.raises(ValueError, match="cannot run on the calibration inputs"):
        quant.quantize(plain_model(), "w4-gptq", calib=calib)
