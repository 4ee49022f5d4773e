"""Q-ViT: learned step sizes and bit-widths, the BitOPs budget, the searching stage, freezing, bit allocation."""
import json

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


def test_a_frozen_lsq_layer_holds_exactly_the_weights_it_trained_with():
    torch.manual_seed(0)
    layer = qvit.LSQLinear(128, 64, bits=(2, 8), init_bits=3)
    with LearnedQuantizer.calibrating(layer):
        layer(torch.randn(4, 128))
    with torch.no_grad():
        layer.weight_quant.scale.mul_(1 + torch.rand(layer.weight_quant.scale.shape))
    assert torch.equal(layer.weight_quant(layer.weight), layer.freeze().dequantized_weight())
