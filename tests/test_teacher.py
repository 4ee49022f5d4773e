"""The CNN teacher: its shapes, its file, and distilling a ViT from it through the training CLI."""
import json

import pytest
import torch

from quant.packfile import load_any
from quant.teacher import CNNConfig, ResNetTeacher, create_teacher, load_teacher, save_teacher
from quant.train import main


def test_the_teacher_maps_images_to_class_logits_and_refuses_other_sizes():
    model = create_teacher("resnet_cifar_half", num_classes=3, classes=("a", "b", "c"))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="expected 32x32 images"):
        model(torch.randn(2, 3, 16, 16))


def test_the_teacher_refuses_channels_last_uint8_double_or_numpy_images_naming_what_to_give():
    import numpy as np
    model = create_teacher("resnet_cifar_half")
    for x in (torch.zeros(2, 32, 32, 3), torch.zeros(2, 3, 32, 32, dtype=torch.uint8), np.zeros((2, 3, 32, 32))):
        with pytest.raises(ValueError, match=r"expected 32x32 images as a float tensor \(B, 3, 32, 32\), got"):
            model(x)
    with pytest.raises(ValueError, match=r"weights are torch.float32 but the images torch.float64"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.float64))


def test_a_quantized_teacher_runs_as_quantize_makes_it():
    import quant
    model = create_teacher("resnet_cifar_half").eval()
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    torch.testing.assert_close(quant.quantize(model, "w8a8")(x), logits, atol=0.01, rtol=0.01)  # (in place)


def test_a_teacher_file_rebuilds_the_same_network(tmp_path):
    model = create_teacher("resnet_cifar_half").eval()
    save_teacher(model, tmp_path / "t.safetensors")
    loaded = load_any(tmp_path / "t.safetensors")
    assert isinstance(loaded, ResNetTeacher) and loaded.config == model.config
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("field, value, message", [
    ("widths", [-1, 64, 128, 256], "CNN teacher config field 'widths'"),
    ("widths", ["a", 64, 128, 256], "CNN teacher config field 'widths'"),
    ("mean", [0.5, 0.5], "CNN teacher config field 'mean'"),
    ("std", [0.0, 0.0, 0.0], "CNN teacher config field 'std'"),
    ("img_size", 0, "CNN teacher config field 'img_size'"),
    ("classes", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "CNN teacher config field 'classes'"),
    ("widths", [32, 64, 128], "CNN teacher config field 'widths'"),
    ("img_size", 4, "CNN teacher config field 'img_size' must be at least 8"),
    ("img_size", 2 ** 62, "CNN teacher config field 'img_size' must be at most 16384 pixels"),
    ("depth", 9, "not a CNN teacher config"),
    ("widths", [32, 64, 128, 2_000_000], "does not fit this model")],  # on a skeleton: no terabytes allocated
    ids=["negative-width", "text-width", "two-means", "zero-std", "no-size", "numeric-classes", "three-widths",
         "too-small", "too-large", "unknown-field", "huge"])
def test_a_teacher_file_with_a_damaged_config_is_refused_naming_the_field(tmp_path, field, value, message):
    from safetensors import safe_open
    from safetensors.torch import save_file
    save_teacher(create_teacher("resnet_cifar_half"), tmp_path / "t.safetensors")
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = {**json.loads(meta["config"]), field: value}
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, "config": json.dumps(config)})
    with pytest.raises(ValueError, match=f"bad.safetensors.*{message}"):
        load_teacher(tmp_path / "bad.safetensors")


def test_the_smallest_teacher_takes_8x8_images():
    assert create_teacher("resnet_cifar_half", img_size=8).eval()(torch.randn(1, 3, 8, 8)).shape == (1, 10)


def test_a_teacher_config_that_is_not_a_json_object_is_refused():
    with pytest.raises(ValueError, match="not a CNN teacher config"):
        CNNConfig.from_json("[32, 64, 128, 256]")


def test_the_residual_pairs_add_to_their_input_and_the_head_reads_the_global_max():
    torch.manual_seed(0)
    model = create_teacher("resnet_cifar_half").eval()
    seen = {}
    model.res1.register_forward_hook(lambda m, inp, out: seen.update(res1=inp[0] + out))
    model.stage2.register_forward_pre_hook(lambda m, inp: seen.update(stage2=inp[0]))
    model.res3.register_forward_hook(lambda m, inp, out: seen.update(res3=inp[0] + out))
    model.head.register_forward_pre_hook(lambda m, inp: seen.update(head=inp[0]))
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(seen["stage2"], seen["res1"])
    assert torch.equal(seen["head"], seen["res3"].amax(dim=(2, 3)))


def test_an_unknown_teacher_name_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="unknown teacher 'resnet50'; known: resnet_cifar, resnet_cifar_half"):
        create_teacher("resnet50")


def test_a_teacher_name_that_is_no_string_is_refused_as_an_unknown_one():
    with pytest.raises(ValueError, match=r"unknown teacher \['resnet_cifar'\]; known: resnet_cifar"):
        create_teacher(["resnet_cifar"])


def test_extra_metadata_cannot_overwrite_the_teacher_files_format_or_config(tmp_path):
    teacher = create_teacher("resnet_cifar_half", num_classes=3, classes=("a", "b", "c"))
    save_teacher(teacher, tmp_path / "t.safetensors", metadata={"format": "other", "config": "{}", "run": "r1"})
    assert load_teacher(tmp_path / "t.safetensors").config == teacher.config


def test_a_teacher_is_saved_with_the_checks_every_model_file_gets(tmp_path):
    teacher = create_teacher("resnet_cifar_half")
    with pytest.raises(ValueError, match="is a folder"):
        save_teacher(teacher, tmp_path)
    with torch.no_grad():
        next(teacher.parameters())[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values.*nothing written"):
        save_teacher(teacher, tmp_path / "t.safetensors")
    assert not (tmp_path / "t.safetensors").exists()


@pytest.mark.parametrize("wrap", ["compiled", "quantized"])
def test_a_compiled_or_quantized_teacher_is_refused_rather_than_saved_to_a_file_that_does_not_load(tmp_path, wrap):
    import quant
    teacher = create_teacher("resnet_cifar_half").eval()
    model = torch.compile(teacher) if wrap == "compiled" else quant.quantize(teacher, "w8a8")
    with pytest.raises(ValueError, match="save_teacher writes bitvit's ResNetTeacher|holds quantized layers: write it "
                                         "with quant.save_quantized"):
        save_teacher(model, tmp_path / "t.safetensors")
    assert not (tmp_path / "t.safetensors").exists()


def test_a_vit_file_is_not_a_teacher_file(tmp_path, tiny_model):
    from quant.models import save_model
    save_model(tiny_model, tmp_path / "vit.safetensors")
    with pytest.raises(ValueError, match="not a bitvit CNN teacher"):
        load_teacher(tmp_path / "vit.safetensors")


def test_a_vit_distils_from_a_cnn_teacher_trained_by_the_same_command(tmp_path, image_tree, capsys):
    common = ["--data", str(image_tree), "--epochs", "1", "--batch-size", "4", "--limit", "12"]
    main(["--model", "resnet_cifar_half", "--out", str(tmp_path / "cnn"), *common])
    main(["--model", "vit_cifar_tiny", "--out", str(tmp_path / "vit"), "--teacher",
          str(tmp_path / "cnn" / "model.safetensors"), *common])
    config = json.loads(torch.load(tmp_path / "vit" / "last.pt", weights_only=True)["config"])
    assert config["distill"] == "hard"
    assert load_any(tmp_path / "vit" / "model.safetensors").config.classes == load_any(
        tmp_path / "cnn" / "model.safetensors").config.classes


def test_a_teacher_of_other_classes_is_refused(tmp_path, image_tree):
    save_teacher(create_teacher("resnet_cifar_half"), tmp_path / "cifar.safetensors")  # CIFAR-10's classes
    with pytest.raises(ValueError, match=r"the data.s classes .* are not the teacher .*.s"):
        main(["--model", "vit_cifar_tiny", "--data", str(image_tree), "--out", str(tmp_path / "vit"),
              "--epochs", "1", "--batch-size", "4", "--limit", "12", "--teacher", str(tmp_path / "cifar.safetensors")])
