"""The ViT: timm's names and semantics, shapes, checkpoint files, hub loading, and refusals."""
import dataclasses
import json
import math
import os
import pickle
import stat

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import quant

from quant.models import (CONFIGS, FORMAT, MAX_LAYERS, MAX_TENSORS, ViTConfig, VisionTransformer, create_model,
                          forward_with_hooks, load_model, load_state_dict, read_safetensors_metadata, save_model)
from tests.conftest import TINY

TIMM_BLOCK_KEYS = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                   "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                   "mlp.fc2.weight", "mlp.fc2.bias"]


def timm_keys(depth: int) -> set[str]:
    """The state-dict keys timm's VisionTransformer has (class token, no conv stem)."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias", "head.weight", "head.bias"}
    return keys | {f"blocks.{i}.{k}" for i in range(depth) for k in TIMM_BLOCK_KEYS}


def timm_reference_forward(state: dict, x: torch.Tensor, cfg: ViTConfig) -> torch.Tensor:
    """timm's ViT forward, written out from its definition, reading a state dict by timm's names."""
    x = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), x], 1) + state["pos_embed"]
    B, N, D = x.shape
    h = cfg.num_heads
    for i in range(cfg.depth):
        p = lambda k: state[f"blocks.{i}.{k}"]  # noqa: E731
        y = F.layer_norm(x, (D,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        q, k, v = F.linear(y, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(B, N, 3, h, D // h) \
            .permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(D // h)).softmax(-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(B, N, D), p("attn.proj.weight"), p("attn.proj.bias"))
        y = F.layer_norm(x, (D,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias"))),
                         p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    x = F.layer_norm(x, (D,), state["norm.weight"], state["norm.bias"], eps=1e-6)
    return F.linear(x[:, 0], state["head.weight"], state["head.bias"])


PLAIN = dataclasses.replace(TINY, stem_channels=())


def test_parameter_names_are_timms():
    assert set(VisionTransformer(PLAIN).state_dict()) == timm_keys(PLAIN.depth)


def test_standard_configs_have_timm_shapes():
    model = create_model("deit_tiny_patch16_224")
    state = model.state_dict()
    assert state["pos_embed"].shape == (1, 197, 192)
    assert state["blocks.11.mlp.fc1.weight"].shape == (768, 192)
    assert state["head.weight"].shape == (1000, 192)
    assert sum(p.numel() for p in model.parameters()) == 5_717_416  # timm's deit_tiny_patch16_224


def test_timm_state_dict_loads_and_computes_what_timm_computes():
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.1 for k, v in VisionTransformer(PLAIN).state_dict().items()}
    model = VisionTransformer(PLAIN)
    load_state_dict(model, state)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(model.eval()(x), timm_reference_forward(state, x, PLAIN), atol=1e-5)


def test_cifar_configs_output_logits_per_class():
    for name in ("vit_cifar_tiny", "vit_cifar_small"):
        model = create_model(name).eval()
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        assert model.patch_embed.proj.weight.shape[-1] == CONFIGS[name].patch_size


@pytest.mark.parametrize("x", [torch.randn(1, 3, 32, 32), torch.randn(1, 1, 16, 16), torch.randn(1, 16, 16, 3),
                               torch.zeros(1, 3, 16, 16, dtype=torch.uint8), torch.randn(3, 16, 16)],
                         ids=["size", "gray", "hwc", "uint8", "unbatched"])
def test_input_that_is_not_a_batch_of_the_models_images_is_refused(tiny_model, x):
    with pytest.raises(ValueError, match=r"expected 16x16 RGB images as a float tensor \(B, 3, 16, 16\)"):
        tiny_model(x)


def test_a_hooked_forward_pass_removes_its_hooks_and_restores_the_mode_even_on_failure(tiny_model):
    seen = []
    tiny_model.train()
    tiny_model.blocks[1].eval()                            # a part kept in eval mode inside a training model

    def fail(m, inp):
        seen.append(m.training)
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        forward_with_hooks(tiny_model, torch.randn(2, 3, 16, 16),
                           [tiny_model.blocks[0].register_forward_pre_hook(fail)])
    assert seen == [False]                                 # the pass ran in eval mode
    assert tiny_model.training and not tiny_model.blocks[1].training
    assert not tiny_model.blocks[0]._forward_pre_hooks


def test_saved_model_rebuilds_itself(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.config == tiny_model.config
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), tiny_model(x))


def test_saving_the_same_model_twice_writes_the_same_bytes(tiny_model, tmp_path):
    # (safetensors writes its metadata in a random order of keys: six keys make a chance match 1 in 720)
    metadata = {f"key{i}": str(i) for i in range(4)}
    for name in ("a", "b"):
        save_model(tiny_model, tmp_path / f"{name}.safetensors", metadata)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


@pytest.mark.parametrize("pad", range(8))  # safetensors pads its header to a multiple of 8 bytes: each padding
def test_a_saved_models_header_lists_its_metadata_in_sorted_order_whatever_the_values(tiny_model, tmp_path, pad):
    metadata = {"z": "caf\u00e9 \u65e5\u672c \U0001f642", "b": "\x00\x1f\n\t\"quoted\" \\ /", "m": "x" * (1000 + pad), "a": ""}
    save_model(tiny_model, tmp_path / "m.safetensors", metadata)
    raw = (tmp_path / "m.safetensors").read_bytes()
    keys = list(json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"])
    assert keys == sorted(keys) and set(metadata) <= set(keys)
    assert {k: read_safetensors_metadata(tmp_path / "m.safetensors")[k] for k in metadata} == metadata
    assert load_model(tmp_path / "m.safetensors").config == tiny_model.config  # the tensors where they were


def test_extra_metadata_cannot_overwrite_the_files_format_or_config(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m.safetensors", metadata={"format": "other", "config": "{}", "run": "r1"})
    assert load_model(tmp_path / "m.safetensors").config == tiny_model.config


def test_a_half_precision_file_loads_as_float32(tiny_model, tmp_path):
    state = {k: v.half() if v.is_floating_point() else v for k, v in tiny_model.state_dict().items()}
    save_file(state, str(tmp_path / "f16.safetensors"),
              metadata={"format": FORMAT, "config": tiny_model.config.to_json()})
    loaded = load_model(tmp_path / "f16.safetensors")
    assert next(loaded.parameters()).dtype == torch.float32


def test_timm_pth_checkpoint_loads_with_a_config_name(tmp_path):
    model = VisionTransformer(dataclasses.replace(CONFIGS["deit_tiny_patch16_224"]))
    torch.save({"model": model.state_dict()}, tmp_path / "deit.pth")  # DeiT's release layout
    loaded = load_model(tmp_path / "deit.pth", name="deit_tiny_patch16_224")
    assert torch.equal(loaded.state_dict()["head.weight"], model.state_dict()["head.weight"])


def test_a_timm_file_fine_tuned_to_ten_classes_loads_with_ten_unnamed_classes(tmp_path):
    model = VisionTransformer(dataclasses.replace(CONFIGS["deit_tiny_patch16_224"], num_classes=10, classes=()))
    torch.save(model.state_dict(), tmp_path / "deit_cifar.pth")  # timm's create_model(..., num_classes=10)
    loaded = load_model(tmp_path / "deit_cifar.pth", name="deit_tiny_patch16_224")
    assert (loaded.config.num_classes, loaded.config.classes) == (10, ())
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_a_timm_file_whose_head_is_of_another_width_is_still_refused_naming_it(tmp_path):
    state = VisionTransformer(CONFIGS["deit_tiny_patch16_224"]).state_dict()
    state["head.weight"] = torch.zeros(10, 100)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="head.weight"):
        load_model(tmp_path / "odd.pth", name="deit_tiny_patch16_224")


def test_a_timm_file_whose_head_has_no_rows_is_refused_naming_the_head_not_the_config(tmp_path):
    state = VisionTransformer(CONFIGS["deit_tiny_patch16_224"]).state_dict()
    state["head.weight"], state["head.bias"] = torch.zeros(0, 192), torch.zeros(0)
    torch.save(state, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match=r"empty.pth does not fit this model: tensor 'head.weight' has shape \(0, 192\)"):
        load_model(tmp_path / "empty.pth", name="deit_tiny_patch16_224")


def test_a_file_for_a_config_that_names_its_classes_fine_tuned_to_three_loads_with_them_unnamed(tmp_path):
    model = VisionTransformer(dataclasses.replace(CONFIGS["vit_cifar_tiny"], num_classes=3, classes=()))
    torch.save(model.state_dict(), tmp_path / "three.pth")  # not CIFAR-10's ten names for three rows
    assert load_model(tmp_path / "three.pth", name="vit_cifar_tiny").config.classes == ()


def test_a_legacy_torch_checkpoint_named_without_a_torch_suffix_loads_as_a_torch_file(tmp_path):
    model = VisionTransformer(dataclasses.replace(CONFIGS["vit_cifar_tiny"], num_classes=3, classes=()))
    # the pickle torch.save wrote before torch 1.6 (and still does when asked); its zip archive was told by its bytes
    torch.save(model.state_dict(), tmp_path / "weights", _use_new_zipfile_serialization=False)
    assert load_model(tmp_path / "weights", name="vit_cifar_tiny").config.num_classes == 3


def test_a_safetensors_file_named_without_a_suffix_whose_first_byte_is_a_pickles_loads_as_safetensors(tmp_path):
    model, path = VisionTransformer(TINY), tmp_path / "weights"
    for pad in range(256):  # a header of 128 bytes and more, 256 apart, starts the file with 0x80 (a pickle's opcode)
        save_model(model, path, metadata={"note": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80" and load_model(path).config == model.config


def test_a_hub_repository_fine_tuned_to_ten_classes_loads_with_its_ten_label_names(tmp_path, monkeypatch):
    local_hub_cache(tmp_path, monkeypatch, [f"c{i}" for i in range(10)])
    model = VisionTransformer(dataclasses.replace(CONFIGS["deit_tiny_patch16_224"], num_classes=10, classes=()))
    snap = tmp_path / "hub" / "models--timm--deit_tiny_patch16_224.fb_in1k" / "snapshots" / ("a" * 40)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snap / "model.safetensors"))
    assert load_model("hub", name="deit_tiny_patch16_224").config.classes == tuple(f"c{i}" for i in range(10))


@pytest.mark.parametrize("nest", ["model", "state_dict", "safetensors"])
def test_a_file_saved_from_a_distributed_wrapper_loads_without_its_module_prefix(tmp_path, nest):
    model = VisionTransformer(CONFIGS["deit_tiny_patch16_224"])
    state = {"module." + k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / ("ddp.safetensors" if nest == "safetensors" else "ddp.pth")
    save_file(state, str(path)) if nest == "safetensors" else torch.save({nest: state}, path)
    loaded = load_model(path, name="deit_tiny_patch16_224")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_a_fine_tuned_head_saved_from_a_distributed_wrapper_gives_its_class_count(tmp_path):
    model = VisionTransformer(dataclasses.replace(CONFIGS["deit_tiny_patch16_224"], num_classes=10, classes=()))
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "ddp.pth")
    assert load_model(tmp_path / "ddp.pth", name="deit_tiny_patch16_224").config.num_classes == 10


def test_a_pth_whose_names_are_only_partly_prefixed_module_is_refused_naming_them_unchanged(tmp_path):
    model = VisionTransformer(CONFIGS["deit_tiny_patch16_224"])
    torch.save({("module." + k if k.startswith("head.") else k): v for k, v in model.state_dict().items()},
               tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match=r"missing 2 tensors, first 'head.bias'; unexpected 2 tensors, first "
                                         r"'module.head.bias'"):
        load_model(tmp_path / "mixed.pth", name="deit_tiny_patch16_224")


def test_a_training_runs_resume_state_is_refused_as_a_model_file_naming_what_to_give(tiny_model, tmp_path):
    torch.save({"model": tiny_model.state_dict(), "optimizer": {}, "rng": torch.get_rng_state(), "epoch": 1,
                "trained_seconds": 1.0, "config": "{}"}, tmp_path / "last.pt")   # the keys quant.train writes
    with pytest.raises(ValueError, match="last.pt is a training run's resume state.*RUN_DIR/model.safetensors"):
        load_model(tmp_path / "last.pt")


def local_hub_cache(tmp_path, monkeypatch, labels: list[str]) -> VisionTransformer:
    """timm's deit_tiny_patch16_224 repository in a local hub cache (weights and these label names), with the
    hub offline; returns the model whose weights it holds."""
    repo_dir = tmp_path / "hub" / "models--timm--deit_tiny_patch16_224.fb_in1k"
    snap = repo_dir / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("a" * 40)
    model = create_model("deit_tiny_patch16_224")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps({"label_names": labels}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return model


@pytest.mark.parametrize("source", ["hub", "hf-hub:timm/deit_tiny_patch16_224.fb_in1k"])
def test_hub_loading_reads_the_local_hub_cache(tmp_path, monkeypatch, source):
    """The real `hf_hub_download` path, served from a local cache with the hub offline."""
    model = local_hub_cache(tmp_path, monkeypatch, [f"c{i}" for i in range(1000)])
    loaded = load_model(source, name="deit_tiny_patch16_224")
    assert loaded.config.classes[:2] == ("c0", "c1")
    assert torch.equal(loaded.state_dict()["pos_embed"], model.state_dict()["pos_embed"])


@pytest.mark.parametrize("labels", [["cat", "dog", "frog"], "x" * 1000, list(range(1000))],
                         ids=["too-few", "a-string", "numbers"])
def test_hub_label_names_that_are_not_one_name_a_class_are_left_out(tmp_path, monkeypatch, labels):
    local_hub_cache(tmp_path, monkeypatch, labels)
    assert load_model("hub", name="deit_tiny_patch16_224").config.classes == ()


def test_a_malformed_hub_repository_id_is_one_error_naming_it():
    with pytest.raises(ValueError, match="hf-hub:../../etc is not a valid hub repository id"):
        load_model("hf-hub:../../etc", name="deit_tiny_patch16_224")


def test_loading_from_the_hub_needs_a_config_that_names_its_repository():
    with pytest.raises(ValueError, match="needs a config name"):
        load_model("hub")
    with pytest.raises(ValueError, match="no default hub repository for 'vit_cifar_tiny'"):
        load_model("hub", name="vit_cifar_tiny")


def test_an_unknown_config_name_for_the_hub_is_refused_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'deit_tiny_patch16'; known: .*deit_tiny_patch16_224"):
        load_model("hub", name="deit_tiny_patch16")


def test_a_hub_model_neither_cached_nor_downloadable_is_one_error_naming_the_repository(tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))  # empty
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)                 # no download tried, as on this machine
    with pytest.raises(FileNotFoundError, match="hf-hub:timm/deit_tiny_patch16_224.* neither in the local hub cache"):
        load_model("hub", name="deit_tiny_patch16_224")


@pytest.mark.parametrize("error, message", [(OSError, r"neither in the local hub cache nor downloadable \(OSError\)"),
                                            (ValueError, r"not a valid hub repository id \(ValueError\)")])
def test_a_hub_error_without_text_is_still_one_clear_error(monkeypatch, error, message):
    import huggingface_hub

    def download(repo, filename):
        raise error()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(error, match=message):
        load_model("hub", name="deit_tiny_patch16_224")


def test_a_hub_model_not_cached_offline_is_not_called_a_malformed_id_on_huggingface_hub_0x(monkeypatch):
    import huggingface_hub

    class LocalEntryNotFoundError(FileNotFoundError, ValueError):  # its bases in huggingface_hub 0.24-0.36
        pass

    def download(repo, filename):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache, and offline")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(FileNotFoundError, match="deit_tiny_patch16_224.*neither in the local hub cache"):
        load_model("hub", name="deit_tiny_patch16_224")


@pytest.mark.parametrize("x, message", [
    (torch.zeros(1, 3, 16, 16, dtype=torch.float64), "weights are torch.float32 but the images torch.float64"),
    ([[0.0]], "got a list")])
def test_images_the_model_cannot_take_are_refused_saying_what_to_give(tiny_model, x, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(x)


def test_a_config_field_that_does_not_exist_is_refused_naming_it():
    with pytest.raises(ValueError, match="no config fields \\['depht'\\]"):
        create_model("vit_cifar_tiny", depht=2)


def test_save_model_refuses_a_quantized_model_pointing_to_save_quantized(tiny_model, tmp_path):
    import quant
    with pytest.raises(ValueError, match="quant.save_quantized"):
        save_model(quant.quantize(tiny_model, "w8a8"), tmp_path / "m.safetensors")


def test_save_model_refuses_a_model_on_the_meta_device_naming_a_tensor_without_values(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="cls_token is on the meta device, without values"):
        save_model(tiny_model.to("meta"), tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_save_model_refuses_a_model_with_one_vector_on_the_meta_device_naming_it(tiny_model, tmp_path):
    tiny_model.head.bias = torch.nn.Parameter(torch.empty_like(tiny_model.head.bias, device="meta"))  # a bias left out
    with pytest.raises(ValueError, match="the model's head.bias is on the meta device, without values"):
        save_model(tiny_model, tmp_path / "m.safetensors")


def test_save_model_refuses_something_other_than_a_path_as_a_path(tiny_model):
    with pytest.raises(ValueError, match="expected a file path, got NoneType"):
        save_model(tiny_model, None)


def test_save_model_refuses_a_folder_and_a_path_under_a_file(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        save_model(tiny_model, tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="f is a file, not a folder"):
        save_model(tiny_model, tmp_path / "f" / "m.safetensors")


def test_a_model_file_the_disk_has_no_room_for_is_named_and_the_old_file_kept_whole(tiny_model, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError
    path = tmp_path / "m.safetensors"
    save_model(tiny_model, path)
    old = path.read_bytes()

    def full(tensors, filename, metadata=None):  # half a file written, then the disk is full
        with open(filename, "wb") as f:
            f.write(old[:100])
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match=f"cannot write {path}: .*No space left on device"):
        save_model(VisionTransformer(TINY), path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_checkpoint_of_another_shape_names_the_tensor(tiny_model):
    wide = VisionTransformer(dataclasses.replace(TINY, mlp_ratio=4.0))
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight.* shape \(128, 32\).*\(64, 32\)"):
        load_state_dict(tiny_model, wide.state_dict())


def test_checkpoint_of_another_architecture_names_the_missing_tensor(tiny_model):
    state = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("blocks.1.")}
    with pytest.raises(ValueError, match=r"missing .*'blocks\.1\.attn\.proj\.bias'"):
        load_state_dict(tiny_model, state)


def test_foreign_safetensors_needs_an_architecture_name(tmp_path):
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="carries no bitvit config"):
        load_model(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="unexpected 1 tensor, first"):
        load_model(tmp_path / "x.safetensors", name="deit_tiny_patch16_224")


def test_corrupt_file_is_refused_clearly(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(tmp_path / "m.safetensors")


def test_pickled_code_in_a_pth_is_not_run(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="holds pickled objects other than tensors; refused unread"):
        load_model(tmp_path / "evil.pth", name="deit_tiny_patch16_224")
    assert not (tmp_path / "pwned").exists()


def test_a_bitvit_file_without_its_config_is_refused_naming_it(tmp_path):
    save_file({"head.weight": torch.zeros(3, 4)}, tmp_path / "noconfig.safetensors", metadata={"format": FORMAT})
    with pytest.raises(ValueError, match="noconfig.safetensors: the ViT config is not valid JSON"):
        load_model(tmp_path / "noconfig.safetensors")


@pytest.mark.parametrize("field, value", [("num_heads", 0), ("num_heads", 5), ("img_size", "32"), ("classes", 5),
                                          ("stem_channels", 32), ("mean", [0.5]), ("std", [0, 0, 0]),
                                          ("classes", ["cat", "dog"]), ("mean", [0.5] * 4), ("patch_size", 64),
                                          ("mlp_ratio", 0), ("drop_path_rate", 1)])
def test_a_config_field_of_the_wrong_type_or_range_is_refused_naming_it(field, value):
    with pytest.raises(ValueError, match=f"m.safetensors: ViT config field '{field}'"):
        ViTConfig.from_json(json.dumps({field: value}), "m.safetensors")


def test_a_config_field_refused_shows_a_long_value_shortened():
    names = [f"class{i}" for i in range(100_000)]  # 1.2 MB of names for a config of 10 classes
    with pytest.raises(ValueError, match=r"field 'classes' must be 10 class names or none, got "
                                         r"\('class0', 'class1', .*, \.\.\.\)$") as e:
        ViTConfig.from_json(json.dumps({"classes": names}), "m.safetensors")
    assert len(str(e.value)) < 200


def test_an_mlp_ratio_giving_a_zero_wide_mlp_is_refused_naming_it():
    with pytest.raises(ValueError, match="ViT config field 'mlp_ratio' must be at least 1/embed_dim"):
        dataclasses.replace(TINY, mlp_ratio=0.01)  # int(32 * 0.01) = 0 hidden units


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_checkpoint_holding_nan_or_infinity_is_refused_naming_the_tensor(tiny_model, tmp_path, value):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    state["norm.weight"][0] = value  # written past save_model, which refuses it
    save_file(state, tmp_path / "m.safetensors", metadata={"format": FORMAT, "config": TINY.to_json()})
    with pytest.raises(ValueError, match="'norm.weight' holds NaN"):
        load_model(tmp_path / "m.safetensors")


def test_a_float64_checkpoint_holding_values_beyond_float32_is_refused_naming_the_tensor(tiny_model):
    state = {k: v.double() for k, v in tiny_model.state_dict().items()}
    state["head.bias"][0] = 1e300  # finite in float64, infinite once loaded as float32
    with pytest.raises(ValueError, match="tensor 'head.bias' holds .* values beyond the model's torch.float32"):
        load_state_dict(tiny_model, state)


@pytest.mark.parametrize("value", [float("nan"), float("-inf")], ids=["nan", "-inf"])
def test_a_model_holding_nan_or_infinity_is_not_saved(tiny_model, tmp_path, value):
    with torch.no_grad():
        tiny_model.norm.weight[0] = value
    with pytest.raises(ValueError, match="norm.weight holds NaN or infinite values .*nothing written"):
        save_model(tiny_model, tmp_path / "new" / "m.safetensors")
    assert not (tmp_path / "new").exists()  # not even the folder it would have gone in


def test_a_config_of_more_blocks_than_the_file_holds_is_refused_before_a_model_is_built(tiny_model, tmp_path):
    state = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    deep = dataclasses.replace(TINY, depth=MAX_LAYERS)  # seconds to build, even on meta
    save_file(state, tmp_path / "m.safetensors", metadata={"format": FORMAT, "config": deep.to_json()})
    with pytest.raises(ValueError, match=f"the config has {MAX_LAYERS} blocks, the file holds tensors of {TINY.depth} "
                                         f"\\(none of 'blocks.{TINY.depth}'\\)"):
        load_model(tmp_path / "m.safetensors")


@pytest.mark.parametrize("field, value, limit", [("depth", MAX_LAYERS + 1, "1000 blocks"),
                                                 ("stem_channels", [1] * (MAX_LAYERS + 1), "1000 layers")])
def test_a_config_of_more_layers_than_any_vit_has_is_refused_before_a_skeleton_is_built(field, value, limit):
    """A file naming one empty tensor per block passes the depth check: 100,000 blocks took minutes on meta."""
    with pytest.raises(ValueError, match=f"m.safetensors: ViT config field '{field}' must be at most {limit}"):
        ViTConfig.from_json(json.dumps({field: value}), "m.safetensors")


def test_a_file_of_more_tensors_than_any_model_holds_is_refused_before_they_are_read(tmp_path):
    names = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(MAX_TENSORS + 1)}
    header = json.dumps(names).encode()  # (written by hand: safetensors' writer takes seconds for as many)
    (tmp_path / "m.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ValueError, match="m.safetensors holds 100,001 tensors, over the 100,000 of any model"):
        load_model(tmp_path / "m.safetensors")


def test_a_config_too_large_for_any_storage_is_refused_with_a_message(tiny_model, tmp_path):
    state = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    huge = dataclasses.replace(TINY, embed_dim=10**9, num_heads=1)
    save_file(state, tmp_path / "m.safetensors", metadata={"format": FORMAT, "config": huge.to_json()})
    with pytest.raises(ValueError, match="its config describes a model too large to build"):
        load_model(tmp_path / "m.safetensors")


def test_an_integer_tensor_is_refused_naming_it(tiny_model):
    state = {**tiny_model.state_dict(), "head.bias": torch.zeros(3, dtype=torch.int32)}
    with pytest.raises(ValueError, match="'head.bias' has dtype torch.int32"):
        load_state_dict(tiny_model, state)


def test_a_pth_tensor_viewing_a_few_stored_values_as_a_huge_shape_is_refused_before_it_is_expanded(tmp_path):
    torch.save({"head.weight": torch.zeros(1, 1).expand(10**12, 192)}, tmp_path / "x.pth")  # 4 bytes stored
    with pytest.raises(ValueError, match=r"x.pth: tensor 'head.weight' of shape \(1000000000000, 192\) repeats the "
                                         r"4 bytes the file stores for it"):
        load_model(tmp_path / "x.pth", name="deit_tiny_patch16_224")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["empty", "plain pickle"])
def test_a_pth_that_is_no_torch_checkpoint_is_refused_without_blaming_pickled_code(tmp_path, kind):
    content = {"empty": b"", "plain pickle": pickle.dumps({"a": 1}, protocol=4)}[kind]
    (tmp_path / "x.pth").write_bytes(content)
    with pytest.raises(ValueError, match="torch checkpoint") as e:
        load_model(tmp_path / "x.pth", name="deit_tiny_patch16_224")
    assert "pickled objects" not in str(e.value)


@pytest.mark.parametrize("load", ["create", "file", "hub"])
def test_a_config_name_that_is_no_string_is_refused_as_an_unknown_one(tiny_model, tmp_path, load):
    save_model(tiny_model, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"unknown model \['vit_cifar_tiny'\]; known: .*vit_cifar_tiny"):
        {"create": lambda: create_model(["vit_cifar_tiny"]),
         "file": lambda: load_model(tmp_path / "m.safetensors", name=["vit_cifar_tiny"]),
         "hub": lambda: load_model("hub", name=["vit_cifar_tiny"])}[load]()


def test_an_unknown_architecture_name_is_refused_for_a_bitvit_file_too(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="unknown model 'bogus'"):
        load_model(tmp_path / "m.safetensors", name="bogus")


@pytest.mark.parametrize("source", [None, 3])
def test_something_other_than_a_path_is_refused_as_a_path(source):
    with pytest.raises(ValueError, match="expected a file path"):
        load_model(source)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model file"):
        load_model(tmp_path / "absent.safetensors")


def test_a_config_asking_for_a_huge_model_is_refused_before_allocating_it(tiny_model, tmp_path):
    """A damaged or hand-edited config (here 2.7 * 10^8 patches) is checked against the tensors on the meta
    device, so the file gets one clear error instead of a failed many-gigabyte allocation."""
    cfg = json.loads(tiny_model.config.to_json())
    cfg.update(img_size=16_384, patch_size=1)
    state = {k: v.contiguous() for k, v in tiny_model.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(tmp_path / "m.safetensors"), metadata={"format": FORMAT, "config": json.dumps(cfg)})
    with pytest.raises(ValueError, match="does not fit this model: tensor 'patch_embed.proj.weight'"):
        load_model(tmp_path / "m.safetensors")


def test_a_model_still_loads_its_weights_after_the_shape_check(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert all(not p.is_meta for p in loaded.parameters())
    assert torch.equal(loaded.pos_embed, tiny_model.pos_embed)


def test_an_unknown_config_name_for_a_hub_id_is_refused_before_any_download(monkeypatch):
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded before checking the config name")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    with pytest.raises(ValueError, match="unknown model 'bogus'"):
        load_model("hf-hub:timm/some_repo", name="bogus")


def test_a_config_field_that_does_not_exist_in_a_file_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"m.safetensors: unknown ViT config fields \['depht'\]"):
        ViTConfig.from_json(json.dumps({"depht": 2}), "m.safetensors")


def test_a_config_that_is_not_a_json_object_is_refused():
    with pytest.raises(ValueError, match="m.safetensors: the ViT config is not a JSON object"):
        ViTConfig.from_json("[1, 2]", "m.safetensors")


def test_stochastic_depth_grows_linearly_from_nothing_at_the_first_block_to_the_rate_at_the_last():
    model = VisionTransformer(dataclasses.replace(TINY, depth=3, drop_path_rate=0.2))
    assert [b.drop_path for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2])


def test_stochastic_depth_drops_whole_samples_and_scales_the_kept_ones_to_keep_the_expectation():
    torch.manual_seed(0)
    block = VisionTransformer(dataclasses.replace(TINY, drop_path_rate=0.25)).blocks[-1].train()   # its rate: 0.25
    out = block._drop(torch.ones(2000, 3, 4))
    kept = out[:, 0, 0] != 0
    assert torch.equal(out[kept], torch.full_like(out[kept], 1 / 0.75))   # a kept sample is scaled by 1 / keep
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))          # a dropped one is dropped whole
    assert 0.7 < kept.float().mean() < 0.8                                # each sample is kept with 1 - rate


def test_stochastic_depth_is_off_in_eval_mode():
    torch.manual_seed(0)
    model = VisionTransformer(dataclasses.replace(TINY, drop_path_rate=0.5)).eval()
    x = torch.randn(8, 3, 16, 16)
    first = model(x)
    assert all(torch.equal(model(x), first) for _ in range(3))


def test_a_new_models_linear_biases_start_at_zero(tiny_model):
    assert all(not m.bias.any() for m in tiny_model.modules() if isinstance(m, torch.nn.Linear))


def test_a_file_loads_under_its_config_name_whatever_its_training_settings_but_not_under_another(tmp_path):
    save_model(create_model("vit_cifar_tiny", drop_path_rate=0.1), tmp_path / "m.safetensors")
    assert load_model(tmp_path / "m.safetensors", name="vit_cifar_tiny").config.drop_path_rate == 0.1
    with pytest.raises(ValueError, match="holds a different architecture than 'vit_cifar_small'"):
        load_model(tmp_path / "m.safetensors", name="vit_cifar_small")


@pytest.mark.parametrize("change, differs", [(dict(classes=tuple("abcdefghij")), "different classes"),
                                             (dict(mean=(0.5, 0.5, 0.5)), "a different input normalisation")])
def test_a_file_of_another_config_name_is_refused_saying_what_differs(tmp_path, change, differs):
    save_model(create_model("vit_cifar_tiny", **change), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=f"m.safetensors holds {differs} than 'vit_cifar_tiny'$"):
        load_model(tmp_path / "m.safetensors", name="vit_cifar_tiny")


def test_save_model_refuses_metadata_that_is_not_text(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="metadata must map strings to strings"):
        save_model(tiny_model, tmp_path / "m.safetensors", metadata={"epoch": 3})


def test_a_folder_is_refused_as_a_model_file(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not a model file"):
        load_model(tmp_path)


@pytest.mark.timeout(20)  # opening a pipe waits for a writer for ever
@pytest.mark.parametrize("file", ["pipe.safetensors", "pipe.pth"])
def test_a_pipe_given_as_a_model_file_is_refused_not_waited_on(tmp_path, file):
    os.mkfifo(tmp_path / file)
    with pytest.raises(ValueError, match=f"{file} is not a regular file"):
        load_model(tmp_path / file)


def test_an_onnx_file_is_pointed_to_the_onnx_runtime(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07onnx graph")
    with pytest.raises(ValueError, match="m.onnx is an ONNX file.*export.runtime.load"):
        load_model(tmp_path / "m.onnx")


@pytest.mark.parametrize("layout", ["model", "state_dict", "model_ema", "model+model_ema", "plain"])
def test_a_pth_loads_the_weights_nested_as_deit_and_training_scripts_nest_them(tmp_path, layout):
    torch.manual_seed(0)
    model, ema = create_model("vit_cifar_tiny"), create_model("vit_cifar_tiny")
    state = model.state_dict()
    content = {"model": {"model": state}, "state_dict": {"state_dict": state, "epoch": 3},
               "model_ema": {"model_ema": state}, "model+model_ema": {"model": state, "model_ema": ema.state_dict()},
               "plain": state}[layout]
    torch.save(content, tmp_path / "m.pth")
    loaded = load_model(tmp_path / "m.pth", name="vit_cifar_tiny")
    assert torch.equal(loaded.pos_embed, model.pos_embed)


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_pt_and_bin_files_load_as_torch_checkpoints(tmp_path, suffix):
    model = create_model("vit_cifar_tiny")
    torch.save(model.state_dict(), tmp_path / f"m{suffix}")
    assert torch.equal(load_model(tmp_path / f"m{suffix}", name="vit_cifar_tiny").pos_embed, model.pos_embed)


def test_a_pth_holding_no_tensors_is_refused(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "m.pth")
    with pytest.raises(ValueError, match="m.pth holds no state dict of tensors"):
        load_model(tmp_path / "m.pth", name="vit_cifar_tiny")


def test_a_file_of_another_bitvit_format_is_refused_naming_its_format(tmp_path):
    save_file({"w": torch.zeros(1)}, str(tmp_path / "t.safetensors"), metadata={"format": "bitvit-cnn/1"})
    with pytest.raises(ValueError, match="is a 'bitvit-cnn/1' file, not a full-precision bitvit ViT"):
        load_model(tmp_path / "t.safetensors")


@pytest.mark.parametrize("file", ["m.pth", "m.bin"])
def test_a_model_saved_under_a_torch_suffix_loads_back(tiny_model, tmp_path, file):
    save_model(tiny_model, tmp_path / file)  # a safetensors file, whatever its name
    assert torch.equal(load_model(tmp_path / file).pos_embed, tiny_model.pos_embed)


def test_a_loaded_model_is_in_eval_mode(tiny_model, tmp_path):
    save_model(tiny_model.train(), tmp_path / "m.safetensors")
    assert not any(m.training for m in load_model(tmp_path / "m.safetensors").modules())


@pytest.mark.parametrize("packed", [False, True])
def test_a_written_model_file_has_the_permissions_the_umask_gives(tmp_path, packed):
    model = VisionTransformer(TINY)
    old = os.umask(0o022)
    try:
        if packed:
            quant.save_quantized(quant.quantize(model, "w8a8"), tmp_path / "m.safetensors")
        else:
            save_model(model, tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o644


def test_a_pth_whose_zip_entries_are_compressed_is_refused_unread(tmp_path, tiny_model):
    import zipfile
    plain = tmp_path / "plain.pth"
    torch.save(tiny_model.state_dict(), plain)
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))      # what a zip bomb would be: entries that inflate
    with pytest.raises(ValueError, match="holds a compressed entry .*refused unread"):
        load_model(bomb, name="vit_cifar_tiny")


@pytest.mark.parametrize("make", [lambda v: v.to(torch.float8_e4m3fn), lambda v: v.to_sparse(),
                                  lambda v: torch.empty_like(v, device="meta")], ids=["float8", "sparse", "meta"])
def test_a_tensor_of_a_kind_no_model_file_holds_is_refused_by_name(tmp_path, make):
    model = VisionTransformer(TINY)
    state = dict(model.state_dict())
    state["pos_embed"] = make(state["pos_embed"])
    with pytest.raises(ValueError, match="tensor 'pos_embed' is a .* a model file holds dense"):
        load_state_dict(VisionTransformer(TINY), state, source="x.pth")


def test_a_pth_with_keys_that_are_not_names_is_refused(tmp_path, tiny_model):
    torch.save({**tiny_model.state_dict(), 0: torch.zeros(1)}, tmp_path / "m.pth")
    with pytest.raises(ValueError, match="holds no state dict of tensors"):
        load_model(tmp_path / "m.pth", name="vit_cifar_tiny")


@pytest.mark.parametrize("text, message", [("[" * 100000 + "]" * 100000, "RecursionError"),
                                           ('{"img_size": ' + "9" * 5000 + "}", "4300 digits")],
                         ids=["deeply-nested", "5000-digit-integer"])
def test_a_config_json_that_json_itself_cannot_read_is_refused_naming_the_file(text, message):
    with pytest.raises(ValueError, match=f"m.safetensors: the ViT config is not valid JSON .*{message}"):
        ViTConfig.from_json(text, "m.safetensors")


def test_a_config_whose_sizes_overflow_torchs_integers_is_refused_as_too_large():
    from quant.models import meta_skeleton
    with pytest.raises(ValueError, match="m.safetensors: its config describes a model too large to build"):
        meta_skeleton(lambda: VisionTransformer(dataclasses.replace(TINY, mlp_ratio=1e300)), "m.safetensors")


@pytest.mark.parametrize("file", ["UPPER.PTH", "model.ckpt", "weights.data"], ids=["upper-case", "ckpt", "zip-only"])
def test_a_torch_checkpoint_is_read_as_one_whatever_its_suffix(tmp_path, file):
    model = create_model("vit_cifar_tiny")
    torch.save(model.state_dict(), tmp_path / file)
    loaded = load_model(tmp_path / file, name="vit_cifar_tiny")
    assert torch.equal(loaded.state_dict()["pos_embed"], model.state_dict()["pos_embed"])


def test_a_safetensors_checkpoint_tagged_format_pt_as_hugging_face_writes_it_loads_with_a_config_name(tmp_path):
    model = create_model("vit_cifar_tiny")
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    assert torch.equal(load_model(tmp_path / "m.safetensors", name="vit_cifar_tiny").pos_embed, model.pos_embed)


def test_a_timm_safetensors_file_tagged_format_pt_without_a_config_name_is_told_to_name_one(tmp_path):
    save_file(create_model("vit_cifar_tiny").state_dict(), str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="carries no bitvit config.*load_model\\(path, name=...\\)"):
        load_model(tmp_path / "m.safetensors")
