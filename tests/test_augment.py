"""Training augmentation: value ranges, per-image draws, label mixing that matches the pixels, and an
input that, with every augmentation off, is exactly what evaluation feeds the model."""
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quant.augment import Augment, AugmentConfig, _color_op, mix, random_crop_flip, trivial_augment
from quant.data import to_model_input
from quant.models import CIFAR10_MEAN, CIFAR10_STD

OFF = AugmentConfig(crop_padding=0, flip=False, trivial_augment=False, mixup_alpha=0, cutmix_alpha=0,
                    label_smoothing=0)


def _images(n=64, size=16, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def test_with_everything_off_the_training_input_is_the_evaluation_input():
    images, labels = _images(), torch.arange(64) % 10
    x, target = Augment(OFF, 10, CIFAR10_MEAN, CIFAR10_STD)(images, labels)
    assert torch.equal(x, to_model_input(images, CIFAR10_MEAN, CIFAR10_STD))  # normalised once, the same way
    assert torch.equal(target, F.one_hot(labels, 10).float())


def test_float_or_one_channel_images_are_refused_not_scaled_or_broadcast_without_a_word():
    augment = Augment(OFF, 10, CIFAR10_MEAN, CIFAR10_STD)
    for images in (_images(4).float() / 255, _images(4)[..., :1]):
        with pytest.raises(ValueError, match=r"expected \(B, H, W, 3\) uint8 images"):
            augment(images, torch.arange(4))


def test_a_crop_padding_not_less_than_the_image_size_is_refused_naming_the_setting():
    for padding in (4, -1):
        augment = Augment(AugmentConfig(crop_padding=padding), 10, CIFAR10_MEAN, CIFAR10_STD)
        with pytest.raises(ValueError, match=rf"crop_padding must be .* less than the image size \(4\), got {padding}"):
            augment(_images(4, size=4), torch.arange(4))


def test_a_crop_padding_not_less_than_a_wide_or_tall_images_shorter_side_is_refused():
    augment = Augment(AugmentConfig(crop_padding=4), 10, CIFAR10_MEAN, CIFAR10_STD)
    for images in (_images(4, size=8)[:, :, :4], _images(4, size=8)[:, :4]):  # 8 by 4, 4 by 8: 4 bounds the padding
        with pytest.raises(ValueError, match=r"crop_padding must be .* less than the image size \(4\), got 4"):
            augment(images.contiguous(), torch.arange(4))


def test_the_full_pipeline_gives_normalised_floats_and_soft_targets_that_sum_to_one():
    torch.manual_seed(0)
    images, labels = _images(), torch.arange(64) % 10
    x, target = Augment(AugmentConfig(), 10, CIFAR10_MEAN, CIFAR10_STD)(images, labels)
    assert x.shape == (64, 3, 16, 16) and x.dtype == torch.float32
    lo = min((0 - m) / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD))
    hi = max((1 - m) / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD))
    assert lo - 1e-5 <= float(x.min()) and float(x.max()) <= hi + 1e-5
    assert torch.allclose(target.sum(1), torch.ones(64)) and float(target.min()) >= 0.1 / 10 - 1e-6


def test_trivial_augment_keeps_images_in_range_and_draws_an_op_per_image():
    torch.manual_seed(0)
    x = _images(256).permute(0, 3, 1, 2).float() / 255
    y = trivial_augment(x)
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    unchanged = (y == x).flatten(1).all(1).float().mean()
    assert 0.02 < unchanged < 0.2  # identity is one op in 14; the rest change the image


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dense", [False, True], ids=["cpu", "dense"])
def test_trivial_augment_takes_images_of_any_floating_dtype_and_keeps_it(dtype, dense):
    torch.manual_seed(0)  # 64 images draw every op, the geometric ones (float32 matrices, which failed) too
    y = trivial_augment(_images(64, size=8).permute(0, 3, 1, 2).to(dtype) / 255, dense=dense)
    assert y.dtype == dtype and float(y.min()) >= 0 and float(y.max()) <= 1


def test_trivial_augment_refuses_integer_images_with_one_clear_error():
    with pytest.raises(ValueError, match=r"floating-point images in \[0, 1\], got torch.uint8"):
        trivial_augment(_images(4, size=8).permute(0, 3, 1, 2))


def test_the_gpu_augment_path_makes_no_tensor_on_the_default_device():
    """The dense path runs on the GPU: a tensor made there on the default device (the host) would fail.
    With the batch on the CPU and meta as the default device, the same mistake fails here."""
    torch.manual_seed(0)
    x = _images(32).permute(0, 3, 1, 2).float() / 255
    with torch.device("meta"):
        y = random_crop_flip(trivial_augment(x, dense=True), 4, True)
    assert y.device.type == "cpu" and y.shape == x.shape


def test_posterize_matches_pils_bit_mask_on_every_level():
    k = torch.arange(256, dtype=torch.float32)
    x = (k / 255).view(1, 1, 1, 256).expand(1, 3, 1, 256)
    for bits in range(2, 9):
        out = _color_op("posterize", x, torch.tensor([(8 - bits) / 6]))[0, 0, 0]
        assert torch.allclose(out * 255, (k.long() & ~((1 << (8 - bits)) - 1)).float(), atol=1e-3)


def test_sharpness_matches_pils_and_leaves_the_border_pixels_as_they_are():
    from PIL import Image, ImageEnhance
    a = _images(1, 8)[0].numpy()
    x = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255
    for factor in (0.3, 1.7):  # PIL's smoothed image keeps the border: blending leaves it unchanged
        want = torch.tensor(np.array(ImageEnhance.Sharpness(Image.fromarray(a)).enhance(factor)), dtype=torch.float32)
        y = _color_op("sharpness", x, torch.tensor([abs(factor - 1) / 0.99]), torch.tensor([1.0 if factor > 1 else -1.0]))
        assert (y[0].permute(1, 2, 0) * 255 - want).abs().max() <= 1.5, factor
    small = torch.rand(2, 3, 2, 2)  # all border
    assert torch.equal(_color_op("sharpness", small, torch.ones(2)), small)


def test_equalize_matches_pils_on_every_channel_and_leaves_single_level_channels_alone():
    from PIL import Image, ImageOps
    rng = np.random.default_rng(0)
    flat = np.full((5, 7, 3), 90, dtype=np.uint8)
    flat[0, 0, 0] = 3  # channel 0: two levels, too few pixels for a step; channels 1, 2: one level
    for a in (rng.integers(0, 256, (9, 11, 3), dtype=np.uint8), rng.integers(100, 110, (16, 16, 3), dtype=np.uint8),
              (rng.integers(0, 3, (16, 16, 3)) * 120).astype(np.uint8), flat):
        want = np.array(ImageOps.equalize(Image.fromarray(a)))
        y = _color_op("equalize", torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255, torch.ones(1))
        assert np.array_equal((y[0].permute(1, 2, 0) * 255).round().byte().numpy(), want)


def test_crops_and_flips_are_drawn_per_image():
    torch.manual_seed(0)
    x = torch.arange(16 * 16, dtype=torch.float32).view(1, 1, 16, 16).expand(64, 3, 16, 16)
    y = random_crop_flip(x, 4, True)
    assert len({tuple(img.flatten().tolist()) for img in y[:, 0]}) > 20


def test_cutmix_and_mixup_targets_match_the_mixed_pixels():
    for seed in range(50):
        torch.manual_seed(seed)
        labels = torch.randint(0, 10, (16,))
        x = labels.float().view(16, 1, 1, 1).expand(16, 3, 16, 16).clone()  # an image's pixels = its label
        xm, tm = mix(x, F.one_hot(labels, 10).float(), AugmentConfig())
        # mixup and cutmix both: each image's mean pixel is the target's expected label
        assert torch.allclose(xm.mean((1, 2, 3)), tm @ torch.arange(10.0), atol=1e-4)
        if torch.equal(xm, xm.round()):  # cutmix: the fraction of each label's pixels is its target
            frac = torch.stack([(xm[:, 0] == k).float().mean((1, 2)) for k in range(10)], 1)
            assert torch.allclose(frac, tm, atol=1e-6)


def test_the_dense_trivial_augment_gives_each_image_its_own_op():
    """The sync-free path (CUDA's default) against one image at a time."""
    from quant.augment import _COLOR_OPS, _OPS, _affine, _trivial_augment_dense
    torch.manual_seed(0)
    x = _images(130).permute(0, 3, 1, 2).float() / 255
    op = torch.arange(130) % len(_OPS)
    m, sign = torch.rand(130), torch.where(torch.rand(130) < 0.5, -1.0, 1.0)
    y = _trivial_augment_dense(x, op, m, sign)
    for j in range(130):
        xj, k = x[j:j + 1], int(op[j])
        if k == 0:
            want = xj
        elif k < len(_COLOR_OPS):
            want = _color_op(_OPS[k], xj, m[j:j + 1], sign[j:j + 1])
        else:
            grid = F.affine_grid(_affine(op[j:j + 1], m[j:j + 1], sign[j:j + 1]), list(xj.shape), align_corners=False)
            want = F.grid_sample(xj - 0.5, grid, align_corners=False) + 0.5
        assert torch.allclose(y[j:j + 1], want, atol=1e-6), _OPS[k]
    z = trivial_augment(x, dense=True)
    assert z.shape == x.shape and float(z.min()) >= 0 and float(z.max()) <= 1


def test_colour_ops_weaken_or_strengthen_by_their_sign():
    x = torch.full((2, 3, 4, 4), 0.5)
    y = _color_op("brightness", x, torch.tensor([0.5, 0.5]), torch.tensor([-1.0, 1.0]))
    assert float(y[0].max()) < 0.5 < float(y[1].min())


def test_solarize_inverts_the_pixels_above_one_minus_the_magnitude():
    x = torch.linspace(0, 1, 11).view(1, 1, 1, 11).expand(1, 3, 1, 11)
    y = _color_op("solarize", x, torch.tensor([0.25]))
    assert torch.allclose(y, torch.where(x >= 0.75, 1 - x, x))


def test_about_half_of_the_images_are_flipped():
    torch.manual_seed(0)
    x = torch.arange(8.0).view(1, 1, 1, 8).expand(200, 3, 4, 8)
    y = random_crop_flip(x, 0, True)
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    assert ((y == x).flatten(1).all(1) | flipped).all() and 0.3 < float(flipped.float().mean()) < 0.7


def test_crops_take_every_shift_up_to_the_padding_both_ways():
    torch.manual_seed(0)
    x = torch.arange(64.0).view(1, 1, 8, 8).expand(400, 1, 8, 8)
    y = random_crop_flip(x, 2, False)
    padded = F.pad(x[:1], (2,) * 4, mode="reflect")[0, 0]
    shifts = {next((i, j) for i in range(5) for j in range(5) if torch.equal(img, padded[i:i + 8, j:j + 8]))
              for img in y[:, 0]}
    assert shifts == {(i, j) for i in range(5) for j in range(5)}


def test_corners_a_geometric_op_exposes_are_mid_grey_on_the_cpu_path_too():
    torch.manual_seed(0)
    y = trivial_augment(torch.zeros(64, 3, 8, 8), dense=False)   # every op keeps black black; only fill is grey
    assert float(y.max()) == 0.5


def test_a_batch_is_mixed_with_probability_mix_prob():
    torch.manual_seed(0)
    x, target = torch.rand(8, 3, 4, 4), F.one_hot(torch.arange(8) % 4, 4).float()
    xm, tm = mix(x, target, AugmentConfig(mix_prob=0.0))
    assert torch.equal(xm, x) and torch.equal(tm, target)


def test_with_both_alphas_a_batch_gets_mixup_or_cutmix():
    kinds = set()
    for seed in range(20):
        torch.manual_seed(seed)
        labels = torch.randint(0, 10, (16,))
        x = labels.float().view(16, 1, 1, 1).expand(16, 3, 16, 16).clone()
        xm, _ = mix(x, F.one_hot(labels, 10).float(), AugmentConfig())
        kinds.add("cutmix" if torch.equal(xm, xm.round()) else "mixup")
    assert kinds == {"cutmix", "mixup"}


@pytest.mark.parametrize("field, value", [("cutmix_alpha", 1e-300), ("mixup_alpha", 0.001), ("cutmix_alpha", 1e39),
                                          ("mixup_alpha", float("nan")), ("mixup_alpha", -1.0),
                                          ("label_smoothing", 5.0), ("mix_prob", float("nan"))])
def test_a_setting_augmentation_cannot_use_is_refused_when_the_config_is_built(field, value):
    # a Python caller's 1e-300 failed at the first batch; 0.001 mixed at 0.5, 1e39 at 0, a smoothing of 5 gave
    # negative targets, all without a word
    with pytest.raises(ValueError, match=rf"AugmentConfig {field} must be a number.*, got {re.escape(repr(value))}$"):
        AugmentConfig(**{field: value})


def test_mixup_and_cutmix_alphas_at_the_ends_of_the_sound_range_are_taken():
    cfg = AugmentConfig(mixup_alpha=0.01, cutmix_alpha=1e38)  # [0.01, 1e38], both ends in
    assert (cfg.mixup_alpha, cfg.cutmix_alpha) == (0.01, 1e38)
