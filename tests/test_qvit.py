"""Q-ViT: learned step sizes and bit-widths, the BitOPs budget, the searching stage, freezing, bit allocation."""
import json
import warnings

import pytest
import torch

import quant
from quant import qvit
from quant.lsq import LearnedQuantizer
from quant.qattention import QuantAttention
from quant.qlinear import QuantLinear


def prepared(model, budget=4, learn_bits=True):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    qvit.prepare(model, budget_bits=budget, learn_bits=learn_bits)
    qvit.calibrate(model, x)
    qvit.measure_macs(model, x)
    return model, x


def test_bitops_count_every_quantized_matmul_of_a_known_model(tiny_model):
    model, _ = prepared(tiny_model)
    n, d, hidden, classes = 17, 32, 64, 3            # TINY: 16 patches + class token
    per_block = n * d * 3 * d + n * d * d + n * d * hidden + n * hidden * d + 2 * n * n * d
    macs = 2 * per_block + d * classes
    assert float(qvit.bitops(model, uniform_bits=4)) == pytest.approx(16 * macs)
    # searching starts at budget + 1 = 5 bits everywhere, the head (weight and input) at 8
    assert float(qvit.bitops(model).detach()) == pytest.approx(25 * 2 * per_block + 64 * d * classes)


def test_attention_is_quantized_head_wise_in_all_five_slots(tiny_model):
    model, _ = prepared(tiny_model)
    attn = model.blocks[0].attn
    assert isinstance(attn, QuantAttention)
    for slot in qvit.HEAD_SLOTS:
        q = getattr(attn, slot)
        assert isinstance(q, LearnedQuantizer) and q.bit_groups == 2 and q.learn_bits


def test_calibration_makes_its_tensors_on_the_model_device(tiny_model):
    """On a GPU, a tensor made on torch's default device (the CPU) meeting the CUDA model's fails (the step
    search's clamp bounds did). Here the model is on the CPU and the default device is meta: the same
    mistake fails on a CPU machine."""
    qvit.prepare(tiny_model, budget_bits=4)
    x = torch.randn(4, 3, 16, 16)
    with torch.device("meta"):
        qvit.calibrate(tiny_model, x)
    assert all(bool(q.initialized) and q.scale.device.type == "cpu" for q in qvit.quantizers(tiny_model).values())


def test_budget_penalty_pushes_bit_widths_down(tiny_model):
    model, _ = prepared(tiny_model, budget=3)
    penalty = qvit.BitOpsPenalty(model, budget_bits=3)
    loss = penalty(model)
    assert loss > 0
    loss.backward()
    q = model.blocks[0].mlp.fc1.weight_quant
    assert q.bit_param.grad is not None and q.bit_param.grad.item() > 0   # descent lowers the width


def test_fix_bits_stops_learning_and_meets_the_budget(tiny_model):
    model, _ = prepared(tiny_model, budget=3)
    qvit.fix_bits(model, budget_bits=3)
    assert float(qvit.bitops(model)) <= float(qvit.bitops(model, uniform_bits=3)) + 1e-6
    assert not any(q.learn_bits for q in qvit.quantizers(model).values())


def test_fixing_the_bits_makes_its_tensors_on_the_model_device(tiny_model):
    """fix_bits runs on the training device when no search stage ran (a one-epoch run); meta as the default
    device stands in for a CUDA model meeting host tensors, as in the calibration test."""
    model, _ = prepared(tiny_model, budget=3)
    with torch.device("meta"):
        qvit.fix_bits(model, budget_bits=3)
    assert not any(q.learn_bits for q in qvit.quantizers(model).values())


def test_lsq_plus_mode_refuses_a_budget_of_fractional_bits(tiny_model):
    with pytest.raises(ValueError, match="give whole bits, got 3.5"):
        qvit.prepare(tiny_model, budget_bits=3.5, learn_bits=False)  # rounded to 4, every width would exceed it



@pytest.mark.parametrize("budget", [0, -3, 1, 9, float("nan")])
def test_a_budget_outside_the_candidate_widths_is_refused(tiny_model, budget):
    with pytest.raises(ValueError, match="budget_bits must lie in the candidate widths 2..8"):
        qvit.prepare(tiny_model, budget_bits=budget)  # 0 made a budget of 0 BitOPs: an infinite penalty


@pytest.mark.parametrize("budget", [2, 8])
def test_a_budget_at_either_end_of_the_candidate_widths_is_taken(tiny_model, budget):
    qvit.prepare(tiny_model, budget_bits=budget)


def test_the_budget_is_bounded_by_the_candidate_widths_given(tiny_model):
    with pytest.raises(ValueError, match="budget_bits must lie in the candidate widths 3..6, got 2"):
        qvit.prepare(tiny_model, budget_bits=2, bits=(3, 6))


def test_lsq_plus_mode_keeps_every_width_at_the_budget(tiny_model):
    model, _ = prepared(tiny_model, budget=4, learn_bits=False)
    quantizers = qvit.quantizers(model)
    for name, q in quantizers.items():
        assert set(q.int_bits()) == ({8} if name.startswith("head.") else {4}), name  # the head stays at 8 bits
    assert not any(q.learn_bits for q in quantizers.values())


def test_frozen_model_computes_the_fake_quantized_forward_and_round_trips(tiny_model, tmp_path):
    model, x = prepared(tiny_model, budget=3)
    qvit.fix_bits(model, budget_bits=3)
    model.eval()
    want = model(x)
    qvit.freeze(model)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    assert not qvit.quantizers(model)
    assert torch.allclose(model(x), want, atol=1e-4)
    quant.save_quantized(model, tmp_path / "q.safetensors")
    assert torch.allclose(quant.load_quantized(tmp_path / "q.safetensors")(x), want, atol=1e-4)


def test_bit_allocation_is_saved_as_json_and_plotted(tiny_model, tmp_path):
    model, _ = prepared(tiny_model, budget=3)
    qvit.fix_bits(model, budget_bits=3)
    alloc = qvit.save_allocation(model, tmp_path / "bits.json")
    qvit.plot_allocation(alloc, tmp_path / "bits.png")
    saved = json.loads((tmp_path / "bits.json").read_text())
    assert saved["attention"]["blocks.0.attn"]["q"] == model.blocks[0].attn.q_quant.int_bits()
    assert saved["bitops_ratio"] <= 1 + 1e-9
    assert (tmp_path / "bits.png").stat().st_size > 1000


def test_the_allocation_heat_maps_say_their_cells_are_bits_per_head(tiny_model):
    model, _ = prepared(tiny_model, budget=3)
    qvit.fix_bits(model, budget_bits=3)
    fig = qvit.allocation_figure(qvit.bit_allocation(model))
    heat_maps = [ax for ax in fig.axes if ax.get_xlabel() == "head"]
    assert [ax.get_title() for ax in heat_maps][:1] == ["Q: bits per head"]
    assert all(ax.get_title().endswith(": bits per head") for ax in heat_maps)  # attention probs, head outputs too


def test_a_frozen_lsq_layer_holds_exactly_the_weights_it_trained_with():
    torch.manual_seed(0)
    layer = qvit.LSQLinear(128, 64, bits=(2, 8), init_bits=3)
    with LearnedQuantizer.calibrating(layer):
        layer(torch.randn(4, 128))
    with torch.no_grad():
        layer.weight_quant.scale.mul_(1 + torch.rand(layer.weight_quant.scale.shape))
    assert torch.equal(layer.weight_quant(layer.weight), layer.freeze().dequantized_weight())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_layer_cast_to_half_precision_freezes_into_a_layer_of_its_dtype(dtype):
    torch.manual_seed(0)
    layer = qvit.LSQLinear(128, 64, bits=(2, 8), init_bits=3)
    with LearnedQuantizer.calibrating(layer):
        layer(torch.randn(4, 128))
    layer.to(dtype)
    x = torch.randn(4, 128, dtype=dtype)
    with torch.no_grad():
        frozen = layer.freeze()
        assert frozen.bias.dtype == dtype and torch.equal(frozen(x), layer(x))


def test_freezing_a_model_on_the_meta_device_is_refused_naming_a_tensor_without_values(tiny_model):
    model = qvit.prepare(tiny_model, budget_bits=4).to("meta")
    with pytest.raises(ValueError, match="is on the meta device, without values: load its weights before freezing"):
        qvit.freeze(model)


def test_prepare_keeps_the_weights_and_biases_of_the_layers_it_replaces(tiny_model):
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.01)                                  # biases too, which start at zero
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    qvit.prepare(tiny_model, budget_bits=4)
    after = tiny_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_post_gelu_and_post_softmax_inputs_are_quantized_unsigned_the_post_gelu_one_with_an_offset(tiny_model):
    qvit.prepare(tiny_model, budget_bits=4)
    fc2_input = tiny_model.blocks[0].mlp.fc2.input_quant
    assert not fc2_input.signed and fc2_input.offset is not None
    attn = tiny_model.blocks[0].attn
    assert not attn.attn_quant.signed
    assert all(getattr(attn, s).signed for s in ("q_quant", "k_quant", "v_quant", "out_quant"))
    assert attn.proj.input_quant is None                        # its input is the head outputs, quantized head-wise


def test_bitops_pair_each_matmuls_own_widths_head_by_head(tiny_model):
    model, _ = prepared(tiny_model)
    for q in qvit.quantizers(model).values():
        q.set_bits(2)
    widths = {"q_quant": [2, 3], "k_quant": [4, 5], "v_quant": [6, 7], "attn_quant": [8, 2], "out_quant": [3, 4]}
    for block in model.blocks:
        for slot, bits in widths.items():
            getattr(block.attn, slot).set_bits(bits)
        block.attn.proj.weight_quant.set_bits(5)
    n, d, hidden, classes = 17, 32, 64, 3
    per_head = n * n * d // 2                                        # 2 heads of width 16
    attention = per_head * (2 * 4 + 3 * 5 + 8 * 6 + 2 * 7) + n * d * d // 2 * (5 * 3 + 5 * 4)
    linear = 4 * (n * d * 3 * d + n * d * hidden + n * hidden * d)    # qkv, fc1, fc2 at 2-bit weights and inputs
    assert float(qvit.bitops(model).detach()) == pytest.approx(2 * (attention + linear) + 4 * d * classes)


def test_bitops_before_measuring_the_macs_are_refused():
    model = qvit.prepare(torch.nn.Sequential(torch.nn.Linear(4, 4)), budget_bits=4)
    with pytest.raises(ValueError, match="run measure_macs"):
        qvit.bitops(model)


@pytest.mark.parametrize("count", [lambda m: qvit.bit_allocation(m, 3), lambda m: qvit.BitOpsPenalty(m, 3)])
def test_bitops_of_a_model_without_qvit_layers_are_refused(tiny_model, count):
    """A model never prepared, or already frozen, has 0 BitOPs: the allocation divided by a budget of 0
    (ZeroDivisionError), the penalty would be 0 / 0 = NaN."""
    with pytest.raises(ValueError, match="holds no Q-ViT layers"):
        count(tiny_model)

def test_the_budget_penalty_is_zero_within_the_budget(tiny_model):
    model, _ = prepared(tiny_model, budget=4)                        # searching starts at 5 bits, the head at 8
    assert float(qvit.BitOpsPenalty(model, budget_bits=6)(model).detach()) == 0.0


def test_a_budget_below_the_lowest_width_cannot_be_met(tiny_model):
    model, _ = prepared(tiny_model, budget=3)
    with pytest.raises(ValueError, match="budget cannot be met even at the lowest widths"):
        qvit.fix_bits(model, budget_bits=1.5)


def test_fix_bits_lowers_the_width_that_lies_closest_to_rounding_down(tiny_model):
    model, _ = prepared(tiny_model)
    for q in qvit.quantizers(model).values():
        q.set_bits(4)                                                # 0.5 above the rounding threshold
    q = model.blocks[1].attn.k_quant
    with torch.no_grad():
        q.bit_param.copy_(torch.tensor([4.45, 3.55]) / q.bit_lr_scale)   # both round to 4; head 1 barely
    full = float(qvit.bitops(model).detach())
    per_head = 17 * 17 * 16
    budget_bits = 4 * (1 - 2 * per_head / full) ** 0.5               # 2 per_head under: any one lowering meets it
    qvit.fix_bits(model, budget_bits=budget_bits)
    assert q.int_bits() == [4, 3]
    assert all(set(p.int_bits()) == {4} for p in qvit.quantizers(model).values() if p is not q)


def test_a_width_fix_bits_lowered_counts_as_well_inside_its_new_width_not_as_far_above_it():
    model = qvit.prepare(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)), budget_bits=4)
    qvit.calibrate(model, torch.randn(4, 8))
    qvit.measure_macs(model, torch.randn(1, 8))                      # 64 multiply-adds a layer
    qs = [model[0].weight_quant, model[0].input_quant, model[1].weight_quant, model[1].input_quant]
    with torch.no_grad():
        for q, b in zip(qs, (4.2, 4.2, 4.6, 5.45)):                  # widths 4, 4, 5, 5: 64 * 41 BitOPs, budget 64 * 32
            q.bit_param.fill_(b / q.bit_lr_scale)
    qvit.fix_bits(model, budget_bits=4)
    # 4.6 is lowered to 4 first (0.1 above rounding down), then sits 0.5 above 3.5 and goes before 4.2 (0.7);
    # had it kept its 4.6 (1.1 above 3.5), the first layer's weight would have gone to 3 instead
    assert [q.int_bits()[0] for q in qs] == [4, 4, 3, 5]


def test_calibration_keeps_the_models_training_mode(tiny_model):
    qvit.prepare(tiny_model.train(), budget_bits=4)
    qvit.calibrate(tiny_model, torch.randn(2, 3, 16, 16))
    assert tiny_model.training


def test_calibration_refuses_a_quantizer_the_forward_pass_does_not_reach():
    class Partly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    model = qvit.prepare(Partly(), budget_bits=4)
    with pytest.raises(ValueError, match="calibration did not reach quantizers \\['unused.weight_quant'"):
        qvit.calibrate(model, torch.randn(2, 4))


def test_bit_allocation_records_each_layers_macs_and_the_parameter_weighted_mean_weight_width(tiny_model):
    model, _ = prepared(tiny_model, budget=4, learn_bits=False)    # 4 bits, the head 8
    alloc = qvit.bit_allocation(model)
    assert alloc["layers"]["head"]["macs"] == 32 * 3
    assert alloc["layers"]["blocks.0.mlp.fc1"]["macs"] == 17 * 32 * 64
    blocks, head = 2 * (32 * 96 + 32 * 32 + 32 * 64 + 64 * 32), 32 * 3
    assert alloc["mean_weight_bits"] == pytest.approx((4 * blocks + 8 * head) / (blocks + head))


def test_bit_allocation_during_the_search_raises_no_warning(tiny_model):
    """The BitOPs of widths still being learned carry a gradient: turned into a float without detaching
    them, torch warned 'Converting a tensor with requires_grad=True to a scalar'."""
    model, _ = prepared(tiny_model, budget=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert qvit.bit_allocation(model, 3)["bitops_ratio"] > 1

def test_an_allocation_holding_no_widths_draws_no_figure():
    assert qvit.allocation_figure({"layers": {}, "attention": {}}) is None


def test_an_allocation_holding_no_widths_is_refused_as_a_plot_file(tmp_path):
    with pytest.raises(ValueError, match="holds no layers or attention heads to plot"):
        qvit.plot_allocation({"layers": {}, "attention": {}}, tmp_path / "bits.png")
    assert not (tmp_path / "bits.png").exists()


def test_lsq_plus_keeps_every_width_at_the_budget_when_the_widths_are_fixed(tiny_model):
    model, _ = prepared(tiny_model, budget=4, learn_bits=False)
    qvit.fix_bits(model, 4)
    widths = {n: set(q.int_bits()) for n, q in qvit.quantizers(model).items()}
    assert all(w == ({8} if n.startswith("head.") else {4}) for n, w in widths.items())


def test_freezing_a_student_that_was_never_calibrated_is_refused(tiny_model):
    """Its step sizes are still 1.0: every weight would freeze to code 0."""
    model = qvit.prepare(tiny_model, budget_bits=4)
    with pytest.raises(ValueError, match=r"never calibrated: run qvit.calibrate\(model, x\)"):
        qvit.freeze(model)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
