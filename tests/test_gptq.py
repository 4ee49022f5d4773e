"""GPTQ: it lowers a layer's output error against round to nearest, and honours the code layout."""
import pytest
import torch
import torch.nn as nn

from quant.gptq import capture, execution_order, gptq_model, gptq_weight, hessian
from quant.qlinear import QuantLinear
from quant.quantizers import quantize_uniform, uniform_dequantize


def correlated_inputs(t=2048, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    return torch.randn(t, k, generator=g) @ mix + 0.1 * torch.randn(t, k, generator=g)


def output_error(x, w, w_hat):
    return ((x @ (w - w_hat).T) ** 2).mean().item()


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_the_layer_output(bits, act_order):
    x = correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    q = gptq_weight(w, hessian(x), bits, group_size=16, act_order=act_order)
    r = quantize_uniform(w, bits, 16, symmetric=False)
    gptq_err = output_error(x, w, uniform_dequantize(q.codes, q.scales, q.zeros, bits, 16))
    rtn_err = output_error(x, w, uniform_dequantize(r.codes, r.scales, r.zeros, bits, 16))
    assert gptq_err < 0.8 * rtn_err


def test_gptq_codes_are_in_range_and_groups_follow_input_order():
    x, w = correlated_inputs(k=40), torch.randn(8, 40)
    q = gptq_weight(w, hessian(x), 3, group_size=16, act_order=True)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 7
    assert q.scales.shape == (8, 3) and q.zeros.shape == (8, 3)
    # the codes are meant with scales[:, k // 16], whatever order the columns were quantized in
    w_hat = uniform_dequantize(q.codes, q.scales, q.zeros, 3, 16)
    assert ((w_hat - w).abs().amax(0) < 3 * q.scales.amax(0).repeat_interleave(16)[:40]).all()


@pytest.mark.parametrize("act_order,mse_clip", [(False, True), (True, False)])
def test_gptq_makes_its_tensors_on_the_weight_device(act_order, mse_clip):
    """GPTQ of a CUDA model added a host identity to a CUDA Hessian. Here the weight is on the CPU and
    torch's default device is meta, so a tensor made on the default device fails here too."""
    x, w = correlated_inputs(k=40), torch.randn(8, 40)
    expected = gptq_weight(w, hessian(x), 3, group_size=16, act_order=act_order, mse_clip=mse_clip)
    with torch.device("meta"):
        q = gptq_weight(w, hessian(x), 3, group_size=16, act_order=act_order, mse_clip=mse_clip)
    assert torch.equal(q.codes, expected.codes) and torch.equal(q.scales, expected.scales)


def test_dead_inputs_get_zero_weights():
    x = correlated_inputs(k=16)
    x[:, 3] = 0
    q = gptq_weight(torch.randn(4, 16), hessian(x), 4, asymmetric=False)
    assert (q.codes[:, 3] == 8).all()      # symmetric code 8 is the value 0


def test_gptq_model_quantizes_in_forward_order_with_quantized_upstream_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    x = torch.randn(256, 16)
    assert execution_order(model, x[:1]) == ["0", "2"]
    ref = model(x)
    gptq_model(model, x, lambda name, layer: {"weight_format": "int4", "group_size": 16}, progress=False)
    assert all(isinstance(model[i], QuantLinear) for i in (0, 2))
    assert torch.equal(capture(model, model[2], x), model[1](model[0](x)))
    assert (model(x) - ref).norm() / ref.norm() < 0.1


def test_gptq_codes_do_not_depend_on_the_lazy_batch_size():
    torch.manual_seed(0)
    x = torch.randn(2000, 96) @ torch.randn(96, 96) * 0.3
    w = torch.randn(24, 96) * 0.1
    h = hessian(x)
    whole = gptq_weight(w, h, 4, 64, block_size=96)            # one block: no lazy updates
    for block in (40, 50, 128):                                 # groups straddling block ends
        assert torch.equal(gptq_weight(w, h, 4, 64, block_size=block).codes, whole.codes)
