"""LSQ+ / Q-ViT learned quantizer: values on the integer grid, straight-through gradients, switchable scales."""
import copy

import pytest
import torch

from quant.lsq import LearnedQuantizer, round_ste, scale_grad
from quant.quantizers import UniformQuantizer
from quant.qvit import _to_uniform


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def calibrated(q: LearnedQuantizer, x: torch.Tensor) -> LearnedQuantizer:
    with LearnedQuantizer.calibrating(q):
        q(x)
    return q


def test_signed_values_lie_on_the_b_bit_grid():
    x = torch.randn(4, 256)
    q = calibrated(LearnedQuantizer(3, signed=True, groups=4, dim=0), x)
    y = q(x).detach()
    s = q.scale.view(4, 1).abs()
    codes = y / s
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.min() >= -4 and codes.max() <= 3
    assert all(len(torch.unique(row)) <= 8 for row in y)


def test_unsigned_with_offset_is_an_integer_zero_point_quantizer_covering_post_gelu_values():
    a = torch.nn.functional.gelu(torch.randn(4096) * 2)
    q = calibrated(LearnedQuantizer(4, signed=False, offset=True), a)
    y = q(a).detach()
    s = q.scale.abs()
    zero = -q.offset / s
    assert zero.item() == pytest.approx(round(zero.item()), abs=1e-4)
    codes = y / s + zero
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= 0 and codes.round().max() <= 15
    assert ((y - a) ** 2).mean() < 0.01 * (a ** 2).mean()
    fine = calibrated(LearnedQuantizer(8, signed=False, offset=True), a)
    assert fine(a).min() < -0.15  # at 8 bits the offset spends levels on GELU's negative dip


def test_mse_init_beats_max_scaling_and_more_bits_mean_less_error():
    x = torch.randn(20000) ** 3  # heavy tails: clipping pays
    errors = {}
    for b in (2, 4, 8):
        q = calibrated(LearnedQuantizer(b), x)
        errors[b] = ((q(x) - x) ** 2).mean().item()
        s_max = x.abs().max() / (2 ** (b - 1) - 1)
        max_err = ((torch.clamp(torch.round(x / s_max), -2 ** (b - 1), 2 ** (b - 1) - 1) * s_max - x) ** 2).mean()
        assert errors[b] < 0.95 * max_err.item()  # the search clips the tails: 0.35-0.92 of max scaling's error
    assert errors[2] > errors[4] > errors[8]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_calibration_finds_the_step_size_of_least_squared_error(bits):
    x = torch.randn(20000) ** 3                # heavy tails: at 2 bits the best step spans an eighth of the range
    q = calibrated(LearnedQuantizer(bits), x)
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    steps = x.abs().max() / qp * torch.linspace(0.005, 1, 1000)
    best = min(((torch.clamp(torch.round(x / s), -qn, qp) * s - x) ** 2).mean().item() for s in steps)
    assert ((q(x) - x) ** 2).mean().item() <= 1.01 * best


def test_calibrating_on_a_subsampled_large_activation_does_not_depend_on_the_global_random_state():
    x = torch.randn(2, 200000) ** 3  # over the 65,536 values a group's range search looks at
    scales = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        scales.append(calibrated(LearnedQuantizer(3, signed=True, groups=2, dim=0), x).scale.detach())
    assert torch.equal(scales[0], scales[1])


def test_straight_through_gradient_is_one_inside_the_range_and_zero_outside():
    q = LearnedQuantizer(4)
    q.init_scales(torch.linspace(-1, 1, 100))
    x = torch.tensor([-100.0, -0.3, 0.01, 0.5, 100.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0


def test_step_size_gradient_is_lsqs_scaled_by_one_over_sqrt_of_numel_times_qp():
    """LSQ: d x_hat / d s = -Qn below the range, Qp above it, round(x / s) - x / s inside, summed over the
    tensor and scaled by g = 1 / sqrt(numel * Qp)."""
    q = LearnedQuantizer(4)                                 # signed: Qn = 8, Qp = 7
    q.init_scales(torch.linspace(-1, 1, 100))
    x = torch.tensor([-100.0, -0.3, 0.01, 0.5, 0.77, 100.0])
    q(x).sum().backward()
    v = x / q.scale.detach()
    want = torch.where(v <= -8, -8.0, torch.where(v >= 7, 7.0, v.round() - v)).sum() / (x.numel() * 7) ** 0.5
    torch.testing.assert_close(q.scale.grad, want.reshape(1))


def test_each_groups_step_size_gradient_is_scaled_by_its_own_groups_numel():
    q = LearnedQuantizer(4, groups=2, dim=1)                # signed: Qp = 7; 3 of the 6 values in each group
    with torch.no_grad():
        q.scale.copy_(torch.tensor([0.1, 0.2]))
        q.initialized.fill_(True)
    x = torch.tensor([[-100.0, 0.33], [0.01, 0.52], [0.77, 100.0]])
    q(x).sum().backward()
    v = x / q.scale.detach()
    want = torch.where(v <= -8, -8.0, torch.where(v >= 7, 7.0, v.round() - v)).sum(0) / (3 * 7) ** 0.5
    torch.testing.assert_close(q.scale.grad, want)


def test_the_clipping_that_stops_the_gradient_is_of_x_over_s_not_of_its_rounding():
    """LSQ and Q-ViT's eq. 8 clip x / s before rounding: inside [-Qn, Qp] the gradient is 1 (x) and
    round(x / s) - x / s (s), past a bound 0 and -Qn or Qp, also within the half step that rounds onto it."""
    for signed, bounds in ((True, (-8, 7)), (False, (0, 15))):
        q = LearnedQuantizer(4, signed=signed)
        with torch.no_grad():
            q.scale.fill_(1.0)
            q.initialized.fill_(True)
        v = torch.tensor([bounds[0] - 0.3, bounds[0] + 0.3, bounds[1] - 0.3, bounds[1] + 0.3], requires_grad=True)
        q(v).sum().backward()
        assert v.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
        want = (bounds[0] - 0.3 + 0.3 + bounds[1]) / (4 * bounds[1]) ** 0.5   # -Qn, -0.3 and 0.3 inside, Qp
        assert q.scale.grad.item() == pytest.approx(want)


def test_bit_width_gets_gradient_only_through_clipped_values():
    q = LearnedQuantizer((2, 8), init_bits=4, learn_bits=True)
    q.init_scales(torch.linspace(-1, 1, 100))
    q(torch.linspace(-0.5, 0.5, 50)).pow(2).sum().backward()
    assert q.bit_param.grad.abs().item() == 0
    q.bit_param.grad = None
    q(torch.tensor([10.0, -10.0, 0.2])).pow(2).sum().backward()  # clipped: y**2 grows with the top level
    assert q.bit_param.grad.item() > 0


def test_switchable_scales_one_step_size_per_candidate_width():
    x = torch.randn(5000)
    q = calibrated(LearnedQuantizer((2, 8), init_bits=8, learn_bits=True), x)
    steps = q.scale.detach().clone()
    assert torch.all(steps[:-1] > steps[1:])  # one scale per width, shrinking as bits grow
    q.set_bits(3)
    q(x).sum().backward()
    assert (q.scale.grad != 0).tolist() == [False, True, False, False, False, False, False]


def test_a_step_size_left_by_a_switch_of_width_stays_where_it_was_under_adam_momentum():
    x = torch.randn(5000)
    q = calibrated(LearnedQuantizer((2, 8), init_bits=8, learn_bits=True), x)
    q.freeze_bits()  # the width switches below by hand only
    opt = torch.optim.AdamW(q.parameters(), lr=1e-2)

    def step():
        opt.zero_grad()
        (q(x) - x).pow(2).mean().backward()
        opt.step()
    for _ in range(3):
        step()   # the 8-bit step size trains and gathers momentum
    q.set_bits(4)
    left = q.scale.detach().clone()
    for _ in range(3):
        step()
    q(x)     # a training forward puts back what momentum moved since the last one
    assert q.scale[-1] == left[-1] and q.scale[2] != left[2]


def test_a_resumed_switch_of_width_goes_on_exactly_as_the_uninterrupted_one():
    x = torch.randn(5000)

    def steps(q, opt, n):
        for _ in range(n):
            opt.zero_grad()
            (q(x) - x).pow(2).mean().backward()
            opt.step()
    q = calibrated(LearnedQuantizer((2, 8), init_bits=8, learn_bits=True), x)
    q.freeze_bits()
    opt = torch.optim.AdamW(q.parameters(), lr=1e-2)
    steps(q, opt, 3)
    q.set_bits(4)
    steps(q, opt, 1)
    saved = copy.deepcopy((q.state_dict(), opt.state_dict()))
    steps(q, opt, 2)
    resumed = LearnedQuantizer((2, 8), init_bits=8, learn_bits=True)
    resumed.freeze_bits()
    resumed.load_state_dict(saved[0])
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(saved[1])
    steps(resumed, opt2, 2)
    assert torch.equal(resumed.scale, q.scale)


def test_bits_round_and_clamp_to_the_candidate_range_and_freeze():
    q = LearnedQuantizer((2, 8), init_bits=5, learn_bits=True)
    with torch.no_grad():
        q.bit_param.fill_(3.6 / q.bit_lr_scale)
    assert q.int_bits() == [4]
    with torch.no_grad():
        q.bit_param.fill_(11.0 / q.bit_lr_scale)
    assert q.int_bits() == [8]
    q.freeze_bits()
    assert q.int_bits() == [8] and not q.bit_param.requires_grad
    with pytest.raises(ValueError, match="outside"):
        q.set_bits(9)


def test_head_wise_bit_widths_quantize_each_head_at_its_own_width():
    x = torch.randn(2, 3, 10, 16)  # (B, heads, N, head_dim)
    q = calibrated(LearnedQuantizer((2, 8), groups=3, dim=1, bit_groups=3, learn_bits=True), x)
    q.set_bits([2, 4, 8])
    y = q(x).detach()
    distinct = [len(torch.unique(y[:, h])) for h in range(3)]
    assert distinct[0] <= 4 and distinct[1] <= 16 and distinct[2] > 16


def test_a_tensor_with_the_wrong_group_count_is_refused():
    q = LearnedQuantizer(4, groups=3, dim=1)
    with pytest.raises(ValueError, match="3 groups"):
        q(torch.randn(2, 4, 5))


def test_round_ste_passes_gradient_through():
    x = torch.tensor([0.4, 1.6], requires_grad=True)
    y = round_ste(x)
    y.sum().backward()
    assert y.tolist() == [0.0, 2.0] and x.grad.tolist() == [1.0, 1.0]


def test_scale_grad_leaves_the_forward_value_exactly_unchanged():
    torch.manual_seed(0)
    x = torch.rand(10000) * 3
    for factor in (1 / (128 * 7) ** 0.5, 1 / 3 ** 0.5, 1e-3):   # LSQ's 1 / sqrt(N * Qp) and others
        assert torch.equal(scale_grad(x, factor), x)


def test_a_learned_quantizer_and_the_uniform_quantizer_it_freezes_into_agree_exactly():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 17, 16) * 2
    for signed in (True, False):
        q = LearnedQuantizer((2, 8), signed=signed, groups=4, dim=1, bit_groups=4, learn_bits=True)
        with LearnedQuantizer.calibrating(q):
            q(x)
        q.set_bits([2, 3, 5, 8])
        with torch.no_grad():
            q.scale.mul_(1 + torch.rand(q.scale.shape))    # step sizes with full float32 mantissas
        u = UniformQuantizer(shape=(1, 4, 1, 1))
        _to_uniform(q, u)
        assert torch.equal(q(x), u(x))


def test_a_learned_quantizer_rounds_a_bfloat16_input_as_it_rounds_its_float32_value():
    torch.manual_seed(0)
    x = (torch.randn(512, 256) * 2).bfloat16()
    q = LearnedQuantizer(8, signed=False, offset=True)
    with LearnedQuantizer.calibrating(q):
        q(x.float())
    assert torch.equal(q(x), q(x.float()).bfloat16())


def test_a_width_pushed_past_the_range_still_gets_its_gradient_scaled_down_by_bit_lr_scale():
    q = LearnedQuantizer((2, 8), learn_bits=True)
    with torch.no_grad():
        q.bit_param.fill_(9.0 / q.bit_lr_scale)          # b~ = 9, beyond b_max
    b = q.soft_bits()
    assert b.item() == pytest.approx(8.0)
    b.sum().backward()                                   # straight-through clamp: dL/db~ = 1 reaches bit_param
    assert q.bit_param.grad.item() == pytest.approx(1 / q.bit_lr_scale)


def test_a_learned_width_quantizer_takes_its_offset_from_the_widest_width():
    a = torch.nn.functional.gelu(torch.randn(4096) * 2)
    q = calibrated(LearnedQuantizer((2, 8), signed=False, offset=True, learn_bits=True), a)
    fixed = calibrated(LearnedQuantizer(8, signed=False, offset=True), a)
    assert q.scale[-1] == fixed.scale[0] and fixed.offset.item() != 0
    torch.testing.assert_close(q.offset, fixed.offset)


def test_calibration_sets_the_step_size_from_the_first_tensor_only():
    q = LearnedQuantizer(4)
    with LearnedQuantizer.calibrating(q):
        q(torch.randn(1000))
        first = q.scale.detach().clone()
        q(torch.randn(1000) * 10)                        # a later batch with a 10x range
    assert torch.equal(q.scale.detach(), first)


def test_with_an_offset_signed_and_unsigned_codes_give_the_same_quantizer():
    a = torch.nn.functional.gelu(torch.randn(4096) * 2)
    signed = calibrated(LearnedQuantizer(4, signed=True, offset=True), a)      # [lo, hi] onto codes -8..7
    unsigned = calibrated(LearnedQuantizer(4, signed=False, offset=True), a)   # ... or onto 0..15
    torch.testing.assert_close(signed.scale, unsigned.scale)
    torch.testing.assert_close(signed(a), unsigned(a))


def test_an_offset_quantizer_rounds_as_its_frozen_form_even_where_x_over_s_plus_zero_ties_in_float32():
    from quant.qvit import _to_uniform
    q = LearnedQuantizer(4, signed=False, offset=True)
    s = 1.576453447341919
    with torch.no_grad():
        q.scale.fill_(s - 1e-8)
        q.offset.fill_(-9 * s)          # zero point 9
        q.initialized.fill_(True)
    u = UniformQuantizer(shape=())
    _to_uniform(q, u)
    x = torch.tensor([-0.7882266640663147])  # x / s = -0.49999997, + 9 rounds to 8.5 in float32
    with torch.no_grad():
        assert torch.equal(q(x), u(x))


def test_a_state_saved_before_the_held_step_sizes_were_kept_still_loads_and_holds_nothing_back():
    """An earlier Q-ViT run's resume state has no `held`/`used`: it resumes as a fresh quantizer would."""
    x = torch.randn(5000)
    q = calibrated(LearnedQuantizer((2, 8), init_bits=8, learn_bits=True), x)
    old = {k: v for k, v in q.state_dict().items() if k not in ("held", "used")}
    old["scale"] = old["scale"] * 1.5
    resumed = LearnedQuantizer((2, 8), init_bits=8, learn_bits=True)
    resumed.load_state_dict(old)
    resumed.set_bits(4)
    resumed(x)  # a training forward
    assert torch.equal(resumed.scale, old["scale"]) and resumed.used.tolist() == [False, False, True] + [False] * 4
    with pytest.raises(RuntimeError, match="Missing key"):  # a state missing anything else is still refused
        LearnedQuantizer((2, 8), init_bits=8, learn_bits=True).load_state_dict(
            {k: v for k, v in old.items() if k != "initialized"})


def test_a_quantizer_run_before_calibration_is_refused_not_run_with_step_size_1():
    q = LearnedQuantizer(4)
    with pytest.raises(RuntimeError, match="run before calibration: run quant.qvit.calibrate"):
        q(torch.randn(10))


def test_a_quantizer_refused_before_calibration_is_refused_again_not_let_through_the_second_time():
    q = LearnedQuantizer(4)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="run before calibration"):
            q(torch.randn(10))


def test_a_calibrated_quantizer_reads_its_calibrated_flag_in_its_first_forward_only():
    x = torch.randn(100)
    q = calibrated(LearnedQuantizer(4), x)
    q(x)
    q.initialized.fill_(False)  # read again, it would refuse: on a GPU each read waits for the device
    q(x)


def test_a_loaded_calibrated_state_sets_the_flag_so_the_first_forward_reads_no_buffer():
    x = torch.randn(100)
    q = LearnedQuantizer(4)
    q.load_state_dict(calibrated(LearnedQuantizer(4), x).state_dict())
    q.initialized.fill_(False)  # read at the first forward, it would refuse
    q(x)


def test_a_state_of_a_never_calibrated_quantizer_loaded_into_a_calibrated_one_is_refused_when_run():
    x = torch.randn(100)
    q = calibrated(LearnedQuantizer(4), x)
    q.load_state_dict(LearnedQuantizer(4).state_dict())
    with pytest.raises(RuntimeError, match="run before calibration"):
        q(x)


def test_calibration_after_a_training_forward_keeps_every_calibrated_step_size():
    x = torch.randn(5000)
    q = LearnedQuantizer((2, 8), init_bits=8, learn_bits=True)
    with pytest.raises(RuntimeError):
        q(x)  # a training forward before calibration (a dry run): refused, and it changes nothing
    q = calibrated(q, x)
    scales = q.scale.detach().clone()
    q(x)
    assert torch.equal(q.scale, scales)
