"""GPTQ: it lowers a layer's output error against round to nearest, and honours the code layout."""
import pytest
import torch
import torch.nn as nn

from quant import quantizers
from quant.gptq import capture, execution_order, gptq_model, gptq_weight, hessian
from quant.qlinear import QuantLinear
from quant.quantizers import num_groups, quantize_uniform, uniform_dequantize, uniform_params


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


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_makes_its_tensors_on_the_weight_device(act_order):
    """GPTQ of a CUDA model added a host identity to a CUDA Hessian. Here the weight is on the CPU and
    torch's default device is meta, so a tensor made on the default device fails here too."""
    x, w = correlated_inputs(k=40), torch.randn(8, 40)
    expected = gptq_weight(w, hessian(x), 3, group_size=16, act_order=act_order)
    with torch.device("meta"):
        q = gptq_weight(w, hessian(x), 3, group_size=16, act_order=act_order)
    assert torch.equal(q.codes, expected.codes) and torch.equal(q.scales, expected.scales)


def test_an_input_dead_on_the_calibration_data_keeps_its_weights_rounded_to_nearest():
    x = correlated_inputs(k=16)
    x[:, 3] = 0                            # e.g. a W4A4 channel whose calibration values all quantize to 0
    w = torch.randn(4, 16)
    q = gptq_weight(w, hessian(x), 4, asymmetric=False)
    assert torch.equal(q.codes[:, 3], torch.clamp(torch.round(w[:, 3] / q.scales[:, 0]) + 8, 0, 15).to(q.codes.dtype))
    assert (q.codes[:, 3] != 8).any()


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


def test_gptq_model_refuses_calibration_inputs_that_drive_a_layers_inputs_to_nan_naming_the_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8)).eval()
    x = torch.randn(64, 16) * 1e30                           # finite, but the LayerNorm's variance overflows
    # it was refused as a Hessian 'not positive definite even with damp=0.01', advising a higher damp
    with pytest.raises(ValueError, match="inputs of 2 are NaN or infinite"):
        gptq_model(model, x, lambda name, layer: {"weight_format": "int4"}, progress=False)


def test_gptq_model_refuses_a_singular_hessian_naming_the_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)                                   # 4 tokens: rank 4 < 16 inputs, and no damping
    with pytest.raises(ValueError, match="Hessian of the inputs of 0 is not positive definite") as e:
        gptq_model(model, x, lambda name, layer: {"weight_format": "int4", "damp": 0.0}, progress=False)
    assert "quant.recipe(name, damp=0.1)" in str(e.value)  # the advice for the library's users, not the CLI's only


def test_gptq_model_rounds_a_layer_the_forward_pass_never_calls_to_nearest_instead_of_leaving_it_float():
    from quant.quantizers import quantize_weight
    torch.manual_seed(0)
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.head, self.spare = nn.Linear(16, 8), nn.Linear(16, 4)   # spare: held, never called

        def forward(self, x):
            return self.head(x)
    model = TwoHeads().eval()
    rtn = quantize_weight(model.spare.weight.detach(), "int4", 16, asymmetric=True)   # GPTQ's default
    gptq_model(model, torch.randn(64, 16), lambda name, layer: {"weight_format": "int4", "group_size": 16},
               progress=False)
    assert isinstance(model.spare, QuantLinear)
    assert torch.equal(model.spare.codes(), rtn.codes) and torch.equal(model.spare.zeros, rtn.zeros)


def test_gptq_codes_do_not_depend_on_the_lazy_batch_size():
    torch.manual_seed(0)
    x = torch.randn(2000, 96) @ torch.randn(96, 96) * 0.3
    w = torch.randn(24, 96) * 0.1
    h = hessian(x)
    whole = gptq_weight(w, h, 4, 64, block_size=96)            # one block: no lazy updates
    for block in (40, 50, 128):                                 # groups straddling block ends
        assert torch.equal(gptq_weight(w, h, 4, 64, block_size=block).codes, whole.codes)


@pytest.mark.parametrize("setting", [{"group_size": -2}, {"group_size": 0}, {"group_size": 2.5},
                                     {"block_size": 0}, {"block_size": -1}])
def test_gptq_refuses_a_group_or_block_size_that_is_not_a_positive_integer_naming_it(setting):
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        gptq_weight(torch.randn(4, 8), torch.eye(8), 4, **setting)


def obs_reference(w, H, bits, group_size, asymmetric, act_order, damp=0.01):
    """GPTQ's Algorithm 1 the slow way: one column at a time in float64, the inverse Hessian of the columns
    still to quantize kept explicitly and shrunk by one row and column after each (the OBS update), no
    Cholesky factor and no lazy batches. Group scales come from the group's weights as updated so far
    (with act_order: from the original weights, before any update)."""
    W, H = w.double().clone(), H.double().clone()
    o, k = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    gs, maxq = group_size or k, 2 ** bits - 1
    S = torch.zeros(o, num_groups(k, gs), dtype=torch.double)
    Z = torch.full_like(S, float(2 ** (bits - 1)))

    def set_group(g, block):
        s, z = uniform_params(block.float(), bits, None, not asymmetric)
        S[:, g] = s[:, 0].double()
        if z is not None:
            Z[:, g] = z[:, 0].double()

    order = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(k)
    if act_order:
        for g in range(S.shape[1]):
            set_group(g, W[:, g * gs:(g + 1) * gs])
    Hinv = torch.linalg.inv(H + damp * H.diagonal().mean() * torch.eye(k, dtype=H.dtype))[order][:, order]
    Wp, codes = W[:, order], torch.zeros(o, k, dtype=torch.uint8)
    for j, col in enumerate(order.tolist()):
        g = col // gs
        if not act_order and col % gs == 0:
            set_group(g, Wp[:, j:j + gs])
        q = torch.clamp(torch.round(Wp[:, j] / S[:, g]) + Z[:, g], 0, maxq)
        codes[:, col] = q.to(torch.uint8)
        err = (Wp[:, j] - (q - Z[:, g]) * S[:, g]) / Hinv[0, 0]
        Wp[:, j:] -= err[:, None] * Hinv[0][None, :]                       # spread the error over the rest
        Hinv = Hinv[1:, 1:] - Hinv[1:, :1] @ Hinv[:1, 1:] / Hinv[0, 0]     # drop the quantized column
    return codes, S.float(), Z.float()


@pytest.mark.parametrize("k, group_size, act_order, asymmetric, block_size", [
    (100, 32, False, True, 16), (100, 32, True, True, 16), (96, None, False, False, 128),
    (130, 64, False, True, 128), (130, 64, True, False, 40)])
def test_gptq_computes_the_obs_updates_of_its_definition(k, group_size, act_order, asymmetric, block_size):
    torch.manual_seed(k + block_size)
    x = torch.randn(400, k) * torch.rand(k) * 3
    x[:, 5] = 0                                                            # a dead input
    w = torch.randn(24, k)
    H = hessian(x)
    got = gptq_weight(w, H, 3, group_size, asymmetric=asymmetric, act_order=act_order, block_size=block_size)
    codes, scales, zeros = obs_reference(w, H, 3, group_size, asymmetric, act_order)
    assert (got.codes != codes).float().mean() <= 0.002                    # a rounding tie may fall either way
    torch.testing.assert_close(got.scales, scales, rtol=1e-4, atol=1e-6)
    if asymmetric:
        assert torch.equal(got.zeros, zeros)


def test_execution_order_names_a_layer_called_twice_once():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.GELU(), shared, nn.Linear(8, 2)).eval()   # the shared layer runs twice
    assert execution_order(model, torch.randn(1, 8)) == ["0", "3"]


def test_gptq_weighs_a_layer_called_twice_by_the_inputs_of_both_calls():
    torch.manual_seed(0)
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))
    model = Twice().eval()
    x = torch.randn(64, 8)
    both = torch.cat([x, torch.relu(model.fc(x))]).detach()     # the two calls' inputs, the layer still float
    want = gptq_weight(model.fc.weight, hessian(both), 4, 8)
    gptq_model(model, x, lambda name, layer: {"weight_format": "int4", "group_size": 8}, progress=False)
    assert torch.equal(model.fc.codes(), want.codes)


def test_gptq_model_refuses_a_format_named_like_intb_that_is_no_uniform_grid(monkeypatch):
    monkeypatch.setitem(quantizers.WEIGHT_FORMATS, "int2s", 2)  # a new format: "int" in its name only
    with pytest.raises(ValueError, match=r"GPTQ makes uniform integer codes \(intB\), not 'int2s'"):
        gptq_model(nn.Sequential(nn.Linear(8, 4)), torch.randn(16, 8), lambda name, layer: {"weight_format": "int2s"},
                   progress=False)


def test_capturing_a_module_the_forward_pass_never_runs_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="Linear never ran in the model's forward pass"):
        capture(model, nn.Linear(4, 4), torch.randn(2, 4))
