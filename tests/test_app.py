"""The app's pieces on tiny models and synthetic frames: frames, backends, handlers, results plots."""
import base64
import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import quant
from app.bench import bench_pair
from app.bench import main as bench_main
from app.backends import inspect_file, open_model, quantize_on_the_fly, scan, weight_format
from app.examples import SIZE, write_examples
from app.frames import load_image_file, model_view, to_rgb
from app.live import Comparison, LiveStats
from app.main import ASSETS, OTHER, main, make_comparison, open_default
from app.ui import Handlers
from app import results
from quant.cli import run
from quant.models import save_model

from conftest import TINY

S = TINY.img_size


def packed(model, path, fmt="int8"):
    q = quant.quantize(model, quant.recipe("w8a8", weight_format=fmt))
    quant.save_quantized(q, path)
    return path


def packed_other_architecture(folder: Path) -> Path:
    """A ternary model of a wider network than the FP model's, packed into `folder` (named to sort first)."""
    wider = quant.models.ViTConfig(**{**TINY.__dict__, "embed_dim": 48})
    return packed(quant.models.VisionTransformer(wider), folder / "a_wide_ternary.safetensors", "ternary")


@pytest.fixture(autouse=True)
def _asked_anew():
    """What the app learns once per process (its code's hash, whether bitvit's ops can be had) learnt again by every
    test."""
    from app import backends
    backends.code_digest.cache_clear()
    backends.bitvit_ops_missing.cache_clear()


@pytest.fixture
def assets(tmp_path, tiny_model, fp_file):
    """A folder like assets/: the FP model, a ternary and an int8 packed model, and a stray file."""
    folder = tmp_path / "assets"
    folder.mkdir()
    save_model(tiny_model, folder / "fp.safetensors")
    packed(quant.load_any(fp_file), folder / "tiny_int8.safetensors")
    packed(quant.load_any(fp_file), folder / "tiny_ternary.safetensors", "ternary")
    (folder / "notes.safetensors").write_bytes(b"not a model")
    return folder


@pytest.fixture
def handlers(fp_file, tmp_path):
    fp = open_model(fp_file, runtime="torch")
    q = packed(quant.load_any(fp_file), tmp_path / "q.safetensors")
    return Handlers(Comparison(fp, {"int8": lambda: open_model(q, runtime="torch")}))


def frame(shape, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if dtype == np.uint16:
        return rng.integers(0, 65536, shape, dtype=np.uint16)
    return rng.random(shape).astype(dtype)


# ----------------------------------------------------------------------------- frames

@pytest.mark.parametrize("shape", [(48, 64), (48, 64, 1), (48, 64, 3), (48, 64, 4)])
def test_every_colour_mode_becomes_uint8_rgb(shape):
    rgb = to_rgb(frame(shape))
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8


def test_grayscale_is_repeated_into_three_equal_channels():
    rgb = to_rgb(frame((8, 8)))
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_transparent_pixels_are_composited_over_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgb = to_rgb(rgba)
    assert tuple(rgb[0, 0]) == (10, 20, 30) and (rgb[1:, 1:] == 255).all()


@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.float64])
def test_16_bit_and_float_frames_are_scaled_to_uint8(dtype):
    a = frame((6, 6, 3), dtype)
    rgb = to_rgb(a)
    assert rgb.dtype == np.uint8
    expected = a / 257 if dtype == np.uint16 else a * 255
    assert np.abs(rgb.astype(float) - expected).max() <= 1


def test_a_dark_16_bit_png_stays_dark_even_when_no_value_exceeds_255(tmp_path):
    Image.fromarray(np.full((4, 4), 200, np.uint16)).save(tmp_path / "dark.png")   # 200 / 65535: near black
    assert load_image_file(tmp_path / "dark.png").max() == 0


def test_a_dark_uint16_frame_stays_dark_even_when_no_value_exceeds_255():
    assert to_rgb(np.full((4, 4, 3), 200, np.uint16)).max() == 0


def test_a_premultiplied_rgba_image_is_composited_over_white_like_a_straight_one():
    straight = to_rgb(Image.new("RGBA", (2, 2), (20, 40, 60, 128)))
    premultiplied = to_rgb(Image.new("RGBA", (2, 2), (20, 40, 60, 128)).convert("RGBa"))
    assert np.abs(straight.astype(int) - premultiplied).max() <= 2 and straight[0, 0, 0] > 100


def test_an_image_in_a_pil_mode_whose_rgb_conversion_would_garble_its_colours_is_refused():
    with pytest.raises(ValueError, match="PIL mode 'LAB' are not supported"):
        to_rgb(Image.new("LAB", (2, 2), (50, 0, 0)))


def test_a_folder_given_as_an_upload_is_refused_as_a_folder(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not an image file"):
        load_image_file(tmp_path)


@pytest.mark.parametrize("bad, message", [
    (None, "no image"), (np.zeros((4, 4, 2), np.uint8), "expected an image of shape"),
    (np.zeros((2, 4, 4, 3), np.uint8), "expected an image of shape"), (np.zeros((0, 4, 3), np.uint8), "empty"),
    (np.array([["a"]]), "expected an image array"), (np.full((4, 4), np.nan), "NaN"),
    (np.full((4, 4), -5, np.int32), "0..255"), (np.full((4, 4), 300, np.int32), "give 16-bit images as uint16"),
    ([[1, 2], [3]], "rows of different lengths"), (np.full((4, 4), -0.5), "0..1 or 0..255"),
    (np.full((4, 4), 300.0), "0..1 or 0..255"),
    (np.broadcast_to(np.uint8(0), (8000, 8000, 3)), "megapixels")])
def test_frames_that_are_not_images_are_refused_with_a_message(bad, message):
    with pytest.raises(ValueError, match=message):
        to_rgb(bad)


def test_an_out_of_range_frame_is_refused_naming_its_own_value_range():
    with pytest.raises(ValueError, match=r"got 40\.\.300$"):
        to_rgb(np.array([[40, 300]], np.int32))


def test_a_big_endian_16_bit_frame_reads_as_its_native_twin():
    native = frame((6, 5, 3), np.uint16)
    assert np.array_equal(to_rgb(native.astype(">u2")), to_rgb(native))


@pytest.mark.parametrize("hw", [(1, 1), (S, S), (31, 200), (480, 640), (1080, 1920)])
def test_the_model_view_is_the_models_square_for_any_frame_size(hw):
    view = model_view(frame((*hw, 3)), S)
    assert view.shape == (S, S, 3) and view.dtype == np.uint8


def test_a_mirrored_frame_is_flipped_back_before_the_model_sees_it():
    f = frame((40, 60, 3))
    assert np.array_equal(model_view(f[:, ::-1], S, mirrored=True), model_view(f, S))
    assert not np.array_equal(model_view(f, S, mirrored=True), model_view(f, S))


def test_an_uploaded_png_with_alpha_and_a_jpeg_decode(tmp_path):
    Image.fromarray(frame((30, 40, 4))).save(tmp_path / "a.png")
    Image.fromarray(frame((30, 40, 3))).save(tmp_path / "b.jpg")
    for name in ("a.png", "b.jpg"):
        assert load_image_file(tmp_path / name).shape == (30, 40, 3)


def test_bad_uploads_get_one_clear_message(tmp_path):
    (tmp_path / "text.png").write_text("hello, not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(frame((64, 64, 3))).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:300])
    Image.new("1", (10_000, 6_000)).save(tmp_path / "huge.png")   # 60 megapixels, a small file
    expected = {"text.png": "not an image", "empty.png": "empty", "cut.png": "truncated or damaged",
                "huge.png": "megapixels", "missing.png": "gone"}
    for name, words in expected.items():
        with pytest.raises(ValueError, match=words):
            load_image_file(tmp_path / name)


def _damaged(fmt: str) -> bytes:
    if fmt == "QOI":  # the header alone (written by hand: PIL writes QOI only from 11.3)
        return b"qoif" + (32).to_bytes(4, "big") + (24).to_bytes(4, "big") + bytes([3, 0])
    buf = io.BytesIO()
    Image.fromarray(frame((24, 32, 3))).save(buf, fmt)
    data = bytearray(buf.getvalue())
    if fmt == "DDS":
        data[80:84] = (0x400000).to_bytes(4, "little")  # pixel format flags no DDS reader knows
        return bytes(data)
    return bytes(data).replace(b"32 24", b"32 2x", 1)  # PPM: a damaged header


@pytest.mark.parametrize("fmt", ["QOI", "DDS", "PPM"])
def test_a_damaged_image_of_a_format_whose_reader_raises_its_own_errors_gets_the_damaged_file_message(tmp_path, fmt):
    (tmp_path / "x.img").write_bytes(_damaged(fmt))  # PIL: IndexError (QOI), NotImplementedError (DDS), ValueError
    with pytest.raises(ValueError, match="truncated or damaged"):
        load_image_file(tmp_path / "x.img")


# ----------------------------------------------------------------------------- backends

def test_a_packed_file_is_found_and_described_from_its_header(assets):
    found, skipped = scan(assets)
    kinds = {m.path.name: (m.kind, m.weight_format) for m in found}
    assert kinds == {"fp.safetensors": ("fp", "fp32"), "tiny_int8.safetensors": ("quant", "int8"),
                     "tiny_ternary.safetensors": ("quant", "ternary")}
    assert len(skipped) == 1 and skipped[0].startswith("notes.safetensors")


def test_a_backends_size_is_its_file_and_bits_per_weight_follow_from_it(assets):
    b = open_model(assets / "tiny_ternary.safetensors", runtime="torch")
    params = sum(p.numel() for p in quant.models.VisionTransformer(TINY).parameters())
    assert b.size_bytes == os.path.getsize(assets / "tiny_ternary.safetensors")
    assert b.bits_per_weight == pytest.approx(8 * b.size_bytes / params)
    assert b.weight_format == "ternary" and b.linear_bits < 4


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
@pytest.mark.parametrize("x", [np.zeros((1, 3, 16, 16), np.float64), np.full((1, 3, 16, 16), np.nan, np.float32),
                               np.zeros((1, 16, 16, 3), np.float32), np.zeros((0, 3, 16, 16), np.float32)],
                         ids=["float64", "nan", "channels-last", "empty"])
def test_both_runtimes_refuse_what_is_not_a_batch_of_normalised_images_alike(assets, runtime, x, shared_ortops_cache):
    b = open_model(assets / "tiny_ternary.safetensors", runtime=runtime)
    with pytest.raises(ValueError, match="expected float32 input|NaN or infinite"):
        b(x)


def test_foreign_and_missing_model_files_are_refused(tmp_path, assets):
    with pytest.raises(FileNotFoundError):
        open_model(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="notes.safetensors is not a readable safetensors file"):
        inspect_file(assets / "notes.safetensors")


def test_a_timm_pth_checkpoint_is_refused_as_a_torch_checkpoint_saying_how_to_convert_it(tmp_path, tiny_model):
    torch.save({"model": tiny_model.state_dict()}, tmp_path / "deit.pth")  # DeiT's release layout
    with pytest.raises(ValueError, match=r"deit.pth is a torch checkpoint, not a bitvit model file.*load_model\(path, "
                                         r"name=\.\.\.\), then save_model"):
        inspect_file(tmp_path / "deit.pth")


def test_a_timm_safetensors_file_is_refused_saying_how_to_convert_it_as_its_pth_is(tmp_path, tiny_model):
    from safetensors.torch import save_file
    save_file(tiny_model.state_dict(), tmp_path / "deit.safetensors", metadata={"format": "pt"})  # timm's tag
    with pytest.raises(ValueError, match=r"deit.safetensors .*not a bitvit model file.*load_model\(path, name=\.\.\.\), "
                                         r"then save_model"):
        inspect_file(tmp_path / "deit.safetensors")


def test_a_safetensors_state_dict_without_metadata_is_refused_saying_how_to_convert_it(tmp_path, tiny_model):
    from safetensors.torch import save_file
    save_file(tiny_model.state_dict(), tmp_path / "sd.safetensors")  # save_file(model.state_dict()): no format
    with pytest.raises(ValueError, match=r"sd.safetensors .*not a bitvit model file.*load_model\(path, name=\.\.\.\)"):
        inspect_file(tmp_path / "sd.safetensors")


def test_a_bitvit_model_saved_under_a_pth_name_is_read_not_refused_as_a_torch_checkpoint(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "model.pth")  # save_model writes safetensors under any name
    assert inspect_file(tmp_path / "model.pth").kind == "fp"


def test_a_file_whose_format_version_is_a_superscript_digit_is_refused_naming_the_file(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, tmp_path / "odd.safetensors", metadata={"format": "bitvit-quant/\u00b2"})
    with pytest.raises(ValueError, match="odd.safetensors is not a quantized bitvit file"):
        inspect_file(tmp_path / "odd.safetensors")


def test_a_file_with_a_damaged_config_is_refused_naming_the_file(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "damaged.safetensors"
    save_file({"head.weight": torch.zeros(3, 4)}, path,
              metadata={"format": quant.models.FORMAT, "config": "{not json"})
    with pytest.raises(ValueError, match="damaged.safetensors: the ViT config is not valid JSON"):
        inspect_file(path)


def test_the_torch_and_onnx_runtime_backends_agree(fp_file):
    x = np.random.default_rng(0).normal(size=(2, 3, S, S)).astype(np.float32)
    torch_out = open_model(fp_file, runtime="torch")(x)
    ort = open_model(fp_file, runtime="onnxruntime")
    assert ort.runtime == "ONNX Runtime"
    np.testing.assert_allclose(ort(x), torch_out, atol=1e-4)


@pytest.mark.parametrize("module", ["export/exporter.py", "quant/pack.py"])
def test_the_onnx_export_and_the_model_quantized_on_the_fly_are_made_anew_after_a_change_to_bitvits_code(
        fp_file, tmp_path, monkeypatch, module):
    import shutil
    from app import backends
    model = quant.load_any(fp_file)

    def export():  # as the app opens the file
        return backends._exported(model, backends._export_path(model, fp_file, True))
    exported, built = export(), quantize_on_the_fly(fp_file, "w8a8")
    assert export() == exported and quantize_on_the_fly(fp_file, "w8a8") == built
    code = tmp_path / "code"
    for folder in backends.CODE:
        shutil.copytree(folder, code / folder.name, ignore=shutil.ignore_patterns("__pycache__"))
    with open(code / module, "a") as f:
        f.write("# changed\n")
    monkeypatch.setattr(backends, "CODE", tuple(code / folder.name for folder in backends.CODE))
    backends.code_digest.cache_clear()  # as the app's next start
    assert export() != exported
    assert quantize_on_the_fly(fp_file, "w8a8") != built


def test_a_model_whose_export_is_cached_opens_without_building_a_graph(assets, monkeypatch, shared_ortops_cache):
    from export import exporter
    for name in ("fp.safetensors", "tiny_ternary.safetensors"):
        open_model(assets / name, runtime="onnxruntime")          # exported into the cache
    built = []
    monkeypatch.setattr(exporter, "to_onnx", lambda *a, **k: built.append(a) or pytest.fail("graph built"))
    for name in ("fp.safetensors", "tiny_ternary.safetensors"):
        assert open_model(assets / name, runtime="onnxruntime").runtime == "ONNX Runtime"
    assert built == []


def test_a_damaged_cached_onnx_export_is_written_again_not_passed_over(fp_file):
    from app import backends
    model = quant.load_any(fp_file)
    cached = backends._exported(model, backends._export_path(model, fp_file, True))
    cached.write_bytes(cached.read_bytes()[:500])  # truncated
    backend = open_model(fp_file, runtime="onnxruntime")
    assert backend.runtime == "ONNX Runtime" and backend.note == ""
    assert cached.stat().st_size > 500


def test_a_model_whose_onnx_export_cannot_be_cached_runs_in_torch_saying_why(fp_file, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path / "file" / "cache"))  # no folder can be made there
    backend = open_model(fp_file)
    assert backend.runtime == "torch" and "runs in torch" in backend.note and "Not a directory" in backend.note


def test_a_model_no_onnx_op_set_can_express_runs_in_torch_saying_why_once(fp_file, tmp_path):
    path = tmp_path / "w3.safetensors"
    quant.save_quantized(quant.quantize(quant.load_any(fp_file), quant.recipe("w3")), path)
    backend = open_model(path, runtime="onnxruntime")
    assert backend.runtime == "torch" and backend.note.count("has no ONNX export") == 1


def test_without_bitvit_ops_a_ternary_model_runs_on_standard_onnx_ops(assets, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")   # bitvit's op library cannot be built
    path = assets / "tiny_ternary.safetensors"
    ort = open_model(path, runtime="onnxruntime")
    assert ort.runtime == "ONNX Runtime" and "bitvit ops failed" in ort.note
    x = np.random.default_rng(0).normal(size=(2, 3, S, S)).astype(np.float32)
    np.testing.assert_allclose(ort(x), open_model(path, runtime="torch")(x), atol=1e-3)


def test_without_a_compiler_the_app_learns_it_once_and_exports_its_models_on_standard_ops_only(assets, monkeypatch):
    from export import exporter, ortops
    monkeypatch.setenv("CXX", "no-such-compiler")
    asked, exported = [], []
    monkeypatch.setattr("export.runtime.library_path", lambda: asked.append(1) or ortops.library_path())
    export = exporter.export
    monkeypatch.setattr(exporter, "export", lambda *a, **kw: exported.append(kw["custom_ops"]) or export(*a, **kw))
    for name in ("fp", "tiny_ternary", "tiny_int8", "tiny_ternary"):  # the last: its standard export cached
        backend = open_model(assets / f"{name}.safetensors")
        assert backend.runtime == "ONNX Runtime"
        assert ("bitvit ops failed: no C++ compiler" in backend.note) == (name != "fp")
    assert asked == [1] and exported == [True, False, False]  # the FP model's export holds no bitvit op


def test_a_library_that_builds_but_will_not_load_is_learnt_once_and_models_go_to_standard_ops(assets, monkeypatch,
                                                                                                   tmp_path):
    from export import exporter
    (tmp_path / "libbroken.so").write_bytes(b"not a shared library")
    monkeypatch.setattr("export.runtime.library_path", lambda: tmp_path / "libbroken.so")
    exported = []
    export = exporter.export
    monkeypatch.setattr(exporter, "export", lambda *a, **kw: exported.append(kw["custom_ops"]) or export(*a, **kw))
    for name in ("tiny_ternary", "tiny_int8"):
        backend = open_model(assets / f"{name}.safetensors")
        assert backend.runtime == "ONNX Runtime" and "cannot load bitvit's op library" in backend.note
    assert exported == [False, False]  # no model exported on bitvit's ops only to fail loading


def test_a_failed_build_of_bitvit_ops_is_noted_with_its_reason_not_a_line_ending_in_a_colon(assets, monkeypatch):
    def failing(*args, **kwargs):  # as export.ortops._run says a failed command: a line, then the command's output
        raise ValueError("downloading ONNX Runtime's headers failed (exit 100):\nE: Could not resolve host")
    monkeypatch.setattr("export.runtime.library_path", failing)
    ort = open_model(assets / "tiny_ternary.safetensors", runtime="onnxruntime")
    assert ort.runtime == "ONNX Runtime" and "failed (exit 100): E: Could not resolve host" in ort.note


def test_a_model_quantized_on_the_fly_is_a_real_packed_file_close_to_the_fp_model(fp_file):
    path = quantize_on_the_fly(fp_file, "w8a8")
    assert quant.read_header(path)["storage"]["bits_per_weight"] > 8
    x = torch.randn(4, 3, S, S)
    fp, q = quant.load_any(fp_file), quant.load_any(path)
    assert path.stat().st_size < fp_file.stat().st_size
    torch.testing.assert_close(q(x), fp(x), atol=0.05, rtol=0.05)
    assert quantize_on_the_fly(fp_file, "w8a8") == path   # built once, then taken from the cache


@pytest.mark.parametrize("has_quant_option, advice", [(True, " (one quantized model: --quant FILE)"), (False, "")])
def test_a_model_file_given_as_the_models_folder_is_refused_as_a_file_not_as_missing(fp_file, has_quant_option,
                                                                                     advice):
    with pytest.raises(ValueError) as e:
        make_comparison(fp_file, None, fp_file, runtime="torch", has_quant_option=has_quant_option)
    assert str(e.value) == f"{fp_file} is a file; --assets takes the folder of models to compare with{advice}"


def test_a_model_of_a_long_file_name_is_quantized_on_the_fly_into_a_cache_file_of_a_shorter_one(fp_file):
    long = fp_file.with_name("m" * 240 + ".safetensors")  # 252 bytes: the limit is 255
    fp_file.rename(long)
    path = quantize_on_the_fly(long, "w8a8")
    assert len(os.fsencode(path.name)) <= 255 and path.name.startswith("m" * 100)
    assert quant.read_header(path)["storage"]["bits_per_weight"] > 8
    assert quantize_on_the_fly(long, "w8a8") == path


def test_a_model_quantized_on_the_fly_whose_write_fails_after_start_up_gets_the_reason_on_the_page(fp_file, tmp_path,
                                                                                                   monkeypatch):
    import errno
    (tmp_path / "none").mkdir()
    cmp, labels, _ = make_comparison(fp_file, None, tmp_path / "none", runtime="torch")

    def disk_full(model, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(quant, "save_quantized", disk_full)
    out = Handlers(cmp).live(frame((40, 40, 3)), labels[1], LiveStats())  # w4: built when first chosen
    assert out[5].startswith("⚠") and "No space left on device" in out[5]


def test_a_damaged_cached_model_quantized_on_the_fly_is_built_again_not_left_out(fp_file, tmp_path,
                                                                             shared_ortops_cache):
    cached = quantize_on_the_fly(fp_file, "w8a8")
    cached.write_bytes(cached.read_bytes()[:len(cached.read_bytes()) // 2])  # truncated
    (tmp_path / "models").mkdir()                                            # no packed model: built by the app
    cmp, labels, skipped = make_comparison(fp_file, None, tmp_path / "models")
    open_default(cmp, labels, skipped, explicit=False)
    assert cmp.default.startswith("w8a8") and skipped == []
    assert quant.read_header(cached)["storage"]["bits_per_weight"] > 8


@pytest.mark.parametrize("recipe", ["w4-gptq", "w4a4", "w1.58a8"])
def test_recipes_that_need_calibration_or_training_are_not_built_on_the_fly(fp_file, recipe):
    with pytest.raises(ValueError, match="not a round-to-nearest PTQ recipe"):
        quantize_on_the_fly(fp_file, recipe)


def test_a_packed_model_is_not_quantized_again_on_the_fly(fp_file, tmp_path):
    q = packed(quant.load_any(fp_file), tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match="q.safetensors is already quantized"):
        quantize_on_the_fly(q, "w8a8")


# ----------------------------------------------------------------------------- the app's models

def test_the_menu_lists_every_packed_model_and_starts_on_the_ternary_one(assets):
    cmp, labels, skipped = make_comparison(assets / "fp.safetensors", None, assets, runtime="torch")
    assert len(labels) == 2 and cmp.default.startswith("ternary")
    assert any(s.startswith("notes.safetensors") for s in skipped)


def test_a_packed_model_of_another_architecture_is_labelled_and_not_the_default(assets):
    packed_other_architecture(assets)
    cmp, labels, _ = make_comparison(assets / "fp.safetensors", None, assets, runtime="torch")
    assert sum("other architecture" in label for label in labels) == 1
    assert cmp.default.startswith("ternary weights · int8 activations · tiny_ternary")


def test_with_packed_models_of_other_architectures_only_the_fp_model_is_quantized_on_the_fly(assets):
    for name in ("tiny_ternary", "tiny_int8"):
        (assets / f"{name}.safetensors").unlink()
    packed_other_architecture(assets)
    cmp, labels, _ = make_comparison(assets / "fp.safetensors", None, assets, runtime="torch")
    assert cmp.default.startswith("w8a8 · built on the fly from fp.safetensors")
    assert any(OTHER in label for label in labels)   # still in the menu, labelled


def test_without_a_ternary_model_of_its_own_architecture_the_default_is_another_of_its_own(assets):
    (assets / "tiny_ternary.safetensors").unlink()
    packed_other_architecture(assets)
    cmp, labels, _ = make_comparison(assets / "fp.safetensors", None, assets, runtime="torch")
    assert labels[0].startswith("ternary weights · int8 activations · a_wide_ternary")
    assert cmp.default.startswith("int8 weights · int8 activations · tiny_int8")


def test_a_ternary_model_with_an_int8_head_is_the_ternary_one_started_on(assets, fp_file):
    (assets / "tiny_ternary.safetensors").unlink()
    q = quant.quantize(quant.load_any(fp_file), quant.recipe("w8a8", weight_format="ternary",
                                                              layer_formats=(("head", "int8"),)))
    quant.save_quantized(q, assets / "x_ternary.safetensors")  # sorts after tiny_int8
    cmp, labels, _ = make_comparison(assets / "fp.safetensors", None, assets, runtime="torch")
    assert cmp.default.startswith("ternary+int8 weights · int8 activations · x_ternary")


def test_the_menu_tells_int8_activations_from_weight_only_models_of_the_same_weights(tmp_path, fp_file):
    folder = tmp_path / "models"
    folder.mkdir()
    for recipe in ("w4a8", "w4"):
        quant.save_quantized(quant.quantize(quant.load_any(fp_file), recipe), folder / f"{recipe}.safetensors")
    found, _ = scan(folder)
    assert sorted(m.label.split(" · ")[:3] for m in found) == [
        ["int4+int8 weights", "float activations", "w4.safetensors"],
        ["int4+int8 weights", "int8 activations", "w4a8.safetensors"]]


def test_the_menu_names_a_files_weight_formats_as_its_card_does_the_one_of_most_weights_first(tmp_path, fp_file):
    """A weight-only ternary file with an int8 head read "int8+ternary · float activations" (sorted by name,
    as if int8 were most of it, or its activations), while its card named it by its ternary weights."""
    folder = tmp_path / "models"
    folder.mkdir()
    model = quant.quantize(quant.load_any(fp_file), quant.recipe("w2", weight_format="ternary"))
    quant.save_quantized(model, folder / "t.safetensors")
    (found,), _ = scan(folder)
    assert found.label.startswith("ternary+int8 weights · float activations · t.safetensors")
    assert open_model(folder / "t.safetensors", runtime="torch").weight_format == "ternary+int8"


def mixed_formats(fp_file, path, layer_formats):
    """`fp_file` quantized weight-only to int4, but for the layers `layer_formats` patterns give other formats,
    written to `path`; returns the model."""
    model = quant.quantize(quant.load_any(fp_file), quant.recipe("w4", layer_formats=layer_formats))
    quant.save_quantized(model, path)
    return model


def test_the_menu_orders_a_files_weight_formats_by_the_weights_they_hold_not_their_layers(tmp_path, fp_file):
    # TINY: qkv 32x96, proj 32x32, fc1 32x64, fc2 64x32, head 32x3: int8 has the most layers (4) and the largest
    # sum of their sizes (259 inputs and outputs against ternary's 256), ternary the most weights (6144 to 4192)
    model = mixed_formats(fp_file, tmp_path / "m.safetensors", (
        ("*.qkv", "ternary"), ("*.proj", "int8"), ("head", "int8"), ("blocks.0.mlp.fc2", "int8"),
        ("blocks.1.mlp.fc2", "int2")))
    assert inspect_file(tmp_path / "m.safetensors").weight_format == "ternary+int8+int4+int2"
    assert weight_format(model) == "ternary+int8+int4+int2"


def test_formats_holding_as_many_weights_are_named_first_as_the_export_names_the_model(tmp_path, fp_file):
    """A tie went to the format first in the alphabet (int8), while the export, and so the card, names the model
    by the one of the first layer (ternary)."""
    from export.exporter import model_format
    model = mixed_formats(fp_file, tmp_path / "m.safetensors", (("*.attn.*", "ternary"), ("*.mlp.*", "int8")))
    assert model_format(model) == "ternary"  # 8192 weights each: ternary's qkv and proj, int8's fc1 and fc2
    assert inspect_file(tmp_path / "m.safetensors").weight_format == "ternary+int8+int4"
    assert weight_format(model) == "ternary+int8+int4"


def test_a_packed_file_with_a_layer_entry_missing_its_sizes_is_listed_and_refused_when_opened(tmp_path, fp_file):
    from safetensors import safe_open
    from safetensors.torch import save_file
    folder = tmp_path / "models"
    folder.mkdir()
    mixed_formats(fp_file, tmp_path / "m.safetensors", (("head", "int8"),))
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    header = json.loads(meta["header"])
    header["layers"]["blocks.0.attn.qkv"]["in_features"] = None
    header["layers"]["blocks.0.attn.proj"]["out_features"] = "32"
    save_file(tensors, folder / "m.safetensors", metadata={**meta, "header": json.dumps(header)})
    (found,), skipped = scan(folder)
    assert found.weight_format == "int4+int8" and not skipped
    with pytest.raises(ValueError, match="m.safetensors"):
        open_model(folder / "m.safetensors", runtime="torch")


def test_an_onnx_export_is_listed_by_the_format_it_was_exported_as(tiny_model, tmp_path):
    from export.exporter import export, quantize_for_export
    export(quantize_for_export(tiny_model, "w8a8"), tmp_path / "q.onnx", "w8a8", custom_ops=False)
    assert inspect_file(tmp_path / "q.onnx").label == "w8a8 · q.onnx"


def test_without_a_packed_model_the_app_quantizes_the_fp_model_itself(fp_file, tmp_path):
    (tmp_path / "empty").mkdir()
    cmp, labels, _ = make_comparison(fp_file, None, tmp_path / "empty", runtime="torch")
    assert [label.split(" ")[0] for label in labels] == ["w8a8", "w4"]
    q = cmp.variant(cmp.default)
    assert q.weight_format == "int8" and "on the fly" not in q.name and "quant.quantize" in q.note


def test_an_fp_model_whose_file_name_ends_in_capitals_is_quantized_on_the_fly_too(fp_file, tmp_path):
    (tmp_path / "empty").mkdir()
    upper = fp_file.rename(tmp_path / "FP.SAFETENSORS")
    _, labels, _ = make_comparison(upper, None, tmp_path / "empty", runtime="torch")
    assert [label.split(" ")[0] for label in labels] == ["w8a8", "w4"]


def damage(path):
    """Flip a byte of the file's tensor data: its header still reads, its checksum no longer matches."""
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_default_quantized_model_that_does_not_open_leaves_the_menu_for_the_next(assets):
    damage(assets / "tiny_ternary.safetensors")
    cmp, labels, skipped = make_comparison(assets / "fp.safetensors", None, assets, runtime="torch")
    labels = open_default(cmp, labels, skipped, explicit=False)
    assert labels == [cmp.default] and cmp.default.startswith("int8")
    assert any(s.startswith("ternary weights · int8 activations · tiny_ternary") and "corrupt" in s for s in skipped)
    assert list(cmp.openers) == labels                         # the damaged file is not read again


def test_a_quantized_model_named_with_quant_must_open(assets):
    damage(assets / "tiny_ternary.safetensors")
    cmp, labels, skipped = make_comparison(assets / "fp.safetensors", assets / "tiny_ternary.safetensors", assets,
                                           runtime="torch")
    with pytest.raises(ValueError, match="corrupt"):
        open_default(cmp, labels, skipped, explicit=True)


def test_a_quant_file_named_like_one_in_the_folder_is_the_one_opened_and_both_are_listed(assets, tmp_path):
    elsewhere = tmp_path / "elsewhere" / "tiny_ternary.safetensors"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes((assets / "tiny_ternary.safetensors").read_bytes())
    damage(elsewhere)  # its header reads like the folder's file; opening it fails
    cmp, labels, skipped = make_comparison(assets / "fp.safetensors", elsewhere, assets, runtime="torch")
    assert len([x for x in labels if "tiny_ternary.safetensors" in x]) == 2
    with pytest.raises(ValueError, match="corrupt"):
        open_default(cmp, labels, skipped, explicit=True)


def test_without_fp_the_first_full_precision_file_that_opens_is_taken(assets):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(assets / "fp.safetensors"), "pt") as f:  # a bitvit FP header over foreign tensors
        save_file({"x": torch.zeros(1)}, str(assets / "a_broken_fp.safetensors"), metadata=f.metadata())
    cmp, _, skipped = make_comparison(None, None, assets, runtime="torch")
    assert cmp.fp.name == "fp.safetensors"
    assert any(s.startswith("a_broken_fp.safetensors") for s in skipped)


def test_without_arguments_the_app_compares_the_shipped_reference_with_its_own_ternary_model():
    cmp, labels, skipped = make_comparison(None, None, runtime="torch")
    assert cmp.fp.name == "vit_cifar_small.safetensors" and skipped == []
    assert cmp.default.startswith("ternary") and "vit_cifar_small-w1.58a8.safetensors" in cmp.default
    assert OTHER not in cmp.default and any(OTHER in x for x in labels)


def test_the_page_lists_the_model_files_left_out_and_why(assets, tmp_path):
    from app.ui import build
    cmp, labels, skipped = make_comparison(assets / "fp.safetensors", None, assets, runtime="torch")
    demo = build(cmp, labels, tmp_path, skipped)
    texts = [str(c.get("props", {}).get("value", "")) for c in demo.config["components"]]
    assert any("notes.safetensors" in t for t in texts)
    titles = [c.get("props", {}).get("label") for c in demo.config["components"]]
    assert len(skipped) == 1 and "1 model file left out" in titles  # counted in the singular


def test_the_page_of_a_model_without_class_names_gives_their_number_not_an_empty_list(tmp_path):
    from app.ui import build
    unnamed = quant.models.VisionTransformer(quant.models.ViTConfig(**{**TINY.__dict__, "classes": ()}))  # as DeiT's
    save_model(unnamed, tmp_path / "fp.safetensors")
    q = packed(unnamed, tmp_path / "q.safetensors")
    cmp = Comparison(open_model(tmp_path / "fp.safetensors", runtime="torch"),
                     {"int8": lambda: open_model(q, runtime="torch")})
    texts = [str(c.get("props", {}).get("value", "")) for c in build(cmp, ["int8"], tmp_path).config["components"]]
    assert any("Classes: 3, unnamed (shown by number)." in t for t in texts)


@pytest.mark.parametrize("classes, offered", [(("circle", "square", "star"), False), (TINY.classes, True), ((), True),
                                             (("Airplane", "Bird", "Cat"), True)])
def test_the_drawn_cifar_examples_are_offered_only_to_a_model_naming_one_of_their_subjects_or_none(
        classes, offered, tmp_path):
    from app.ui import build
    model = quant.models.VisionTransformer(quant.models.ViTConfig(**{**TINY.__dict__, "classes": classes}))
    save_model(model, tmp_path / "fp.safetensors")
    q = packed(model, tmp_path / "q.safetensors")
    cmp = Comparison(open_model(tmp_path / "fp.safetensors", runtime="torch"),
                     {"int8": lambda: open_model(q, runtime="torch")})
    types = [c["type"] for c in build(cmp, ["int8"], tmp_path).config["components"]]
    assert ("dataset" in types) == offered


def test_the_pages_drawn_examples_are_removed_when_the_app_exits(handlers, tmp_path, monkeypatch):
    import atexit
    import shutil
    from app.ui import build
    at_exit = []
    monkeypatch.setattr(atexit, "register", lambda fn, *args, **kw: at_exit.append((fn, args, kw)))
    build(handlers.cmp, ["int8"], tmp_path)
    folders = [args[0] for fn, args, _ in at_exit if fn is shutil.rmtree]
    examples = [f for f in folders if f.name.startswith("bitvit-examples-")]
    assert len(examples) == 1 and sorted(p.suffix for p in examples[0].iterdir()) == [".png"] * 5
    for fn, args, kw in at_exit:
        fn(*args, **kw)
    assert not any(f.exists() for f in folders)


def test_the_copies_gradio_makes_of_a_pages_examples_go_to_the_tests_own_folder(handlers, tmp_path,
                                                                                 tmp_path_factory):
    """Not into the machine's <temp>/gradio, where every run of the suite left them."""
    from app.ui import build
    build(handlers.cmp, ["int8"], tmp_path)
    cached = Path(os.environ["GRADIO_TEMP_DIR"])
    assert cached.is_relative_to(tmp_path_factory.getbasetemp()) and len(list(cached.glob("*/*.png"))) == 5


def test_two_visitors_can_stream_their_webcams_at_once(handlers, tmp_path):
    from app.ui import build
    demo = build(handlers.cmp, ["int8"], tmp_path)
    live = next(fn for fn in demo.fns.values() if fn.name == "live")
    assert live.concurrency_limit is None  # a stream holds its worker until its webcam stops


def _stream(demo, session, frames: int, variant: str = "int8") -> Path:
    """`frames` webcam frames through the page's live event as Gradio runs it; the last live view's file."""
    import asyncio
    live = next(fn for fn in demo.fns.values() if fn.name == "live")
    for i in range(frames):
        url = data_url(Image.fromarray(frame((40, 40, 3), seed=i)))
        out = asyncio.run(demo.process_api(block_fn=live, inputs=[{"url": url}, variant, None], state=session))
    return Path(out["data"][0]["path"])


def test_a_long_stream_keeps_only_the_visitors_latest_live_views_on_disk_and_none_in_gradios_cache(
        handlers, tmp_path, monkeypatch):
    """Gradio keeps every image a handler returns in its cache for the server's life: 20 a second a visitor."""
    from gradio.state_holder import SessionState
    from app import ui
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setattr(ui, "LIVE_VIEWS_KEPT", 3, raising=False)
    demo = ui.build(handlers.cmp, ["int8"], tmp_path)
    session = SessionState(demo)  # held, as Gradio holds its visitors' states: the views go with it
    last = _stream(demo, session, 6)
    assert last.is_file() and sorted(p.name for p in last.parent.iterdir()) == ["4.webp", "5.webp", "6.webp"]
    assert not list((tmp_path / "gradio").rglob("*.webp"))


def test_two_visitors_live_views_lie_in_folders_of_their_own(handlers, tmp_path, monkeypatch):
    """In one folder, a visitor's stream would remove the other's views, and one leaving would remove both's."""
    from gradio.state_holder import SessionState
    from app.ui import build
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    demo = build(handlers.cmp, ["int8"], tmp_path)
    first, second = SessionState(demo), SessionState(demo)  # both held, as Gradio holds its visitors' states
    assert _stream(demo, first, 1).parent != _stream(demo, second, 1).parent


def test_a_visitor_whose_state_takes_a_departed_visitors_address_gets_a_folder_of_their_own(handlers, tmp_path,
                                                                                              monkeypatch):
    """CPython often reuses a freed object's address: named from it, the folder would pass to the next visitor."""
    from gradio.state_holder import StateHolder
    from app import ui
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setattr(ui, "id", lambda obj: 1, raising=False)  # every state at one address
    demo = ui.build(handlers.cmp, ["int8"], tmp_path)
    sessions = StateHolder()
    sessions.set_blocks(demo)
    left = _stream(demo, sessions["left"], 1).parent
    sessions.delete_state("left")
    assert _stream(demo, sessions["came"], 1).parent != left


def test_a_visitor_who_leaves_has_their_live_views_removed(handlers, tmp_path, monkeypatch):
    from gradio.state_holder import StateHolder
    from app.ui import build
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    demo = build(handlers.cmp, ["int8"], tmp_path)
    sessions = StateHolder()
    sessions.set_blocks(demo)
    last = _stream(demo, sessions["visitor"], 2)
    assert last.is_file()
    sessions.delete_state("visitor")  # what Gradio does an hour after the visitor's tab closes
    assert not last.parent.exists()


def test_a_visitor_who_picks_another_variant_midstream_keeps_their_live_views(handlers, tmp_path, monkeypatch):
    """Their windows start afresh; their folder, which goes only with their session, stays."""
    from gradio.state_holder import SessionState
    from app.ui import build
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    opener = handlers.cmp.openers["int8"]
    demo = build(Comparison(handlers.cmp.fp, {"int8": opener, "int8 again": opener}), ["int8", "int8 again"],
                 tmp_path)
    session = SessionState(demo)
    _stream(demo, session, 2)
    last = _stream(demo, session, 1, "int8 again")
    assert sorted(p.name for p in last.parent.iterdir()) == ["1.webp", "2.webp", "3.webp"]


def test_a_visitor_evicted_past_the_servers_session_capacity_has_their_live_views_removed(handlers, tmp_path,
                                                                                          monkeypatch):
    """Gradio drops the oldest sessions past `state_session_capacity` without their delete callbacks."""
    from gradio.state_holder import StateHolder
    from app.ui import build
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    demo = build(handlers.cmp, ["int8"], tmp_path)
    sessions = StateHolder()
    sessions.set_blocks(demo)
    sessions.capacity = 1
    first = _stream(demo, sessions["first"], 1).parent
    second = _stream(demo, sessions["second"], 1).parent  # the first session evicted
    assert "first" not in sessions and not first.exists() and second.is_dir()


def test_a_visitor_shown_a_variants_failure_to_open_has_their_live_views_removed_when_they_leave(handlers, tmp_path,
                                                                                                monkeypatch):
    """The error kept for the variant must hold no visitor's frames: the state in them would never go."""
    import asyncio
    from gradio.state_holder import StateHolder
    from app.ui import build

    def damaged():
        raise ValueError("bad.safetensors is damaged")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    demo = build(Comparison(handlers.cmp.fp, {**handlers.cmp.openers, "bad": damaged}), ["int8", "bad"], tmp_path)
    sessions = StateHolder()
    sessions.set_blocks(demo)
    folder = _stream(demo, sessions["visitor"], 1).parent
    live = next(fn for fn in demo.fns.values() if fn.name == "live")
    for _ in range(2):  # the error as first raised, then raised again
        url = data_url(Image.fromarray(frame((40, 40, 3))))
        out = asyncio.run(demo.process_api(block_fn=live, inputs=[{"url": url}, "bad", None],
                                           state=sessions["visitor"]))
        assert out["data"][5] == "⚠ bad.safetensors is damaged"
    sessions.delete_state("visitor")
    assert not folder.exists()


def _uploaded(demo, tmp_path) -> Path:
    """An image uploaded to the page, in Gradio's cache (`GRADIO_TEMP_DIR`: tmp_path / "gradio")."""
    upload = tmp_path / "gradio" / "upload" / "x.png"
    upload.parent.mkdir()
    Image.fromarray(frame((40, 40, 3))).save(upload)
    demo.upload_file_set.add(str(upload))  # as Gradio's upload route records it
    return upload


def _sweep_cache(demo, monkeypatch, after) -> None:
    """Gradio's sweep of its cache (`delete_cache`), run `after` (a timedelta) from now."""
    from datetime import datetime
    from types import SimpleNamespace
    from gradio import route_utils
    later = datetime.now() + after
    monkeypatch.setattr(route_utils, "datetime", SimpleNamespace(now=lambda: later, fromtimestamp=datetime.fromtimestamp))
    route_utils.delete_files_created_by_app(demo, demo.delete_cache[1])


def test_an_uploaded_image_and_its_view_are_removed_from_gradios_cache_after_a_while_not_kept_for_days(
        handlers, tmp_path, monkeypatch):
    """An upload may be 50 MB; a Space serves uploads for days."""
    import asyncio
    from datetime import timedelta
    from gradio.state_holder import SessionState
    from app.ui import build
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    demo = build(handlers.cmp, ["int8"], tmp_path)
    upload = _uploaded(demo, tmp_path)
    classify = next(fn for fn in demo.fns.values() if fn.api_name == "classify")
    out = asyncio.run(demo.process_api(block_fn=classify, inputs=[{"path": str(upload)}, "int8"], state=SessionState(demo)))
    view = Path(out["data"][0]["path"])
    assert view.is_file() and demo.delete_cache is not None
    frequency, age = demo.delete_cache
    _sweep_cache(demo, monkeypatch, timedelta(seconds=age + 1))  # Gradio's scheduled deletion, `age` seconds on
    assert not upload.exists() and not view.exists() and frequency <= age <= 3600


def test_an_upload_is_kept_for_a_visitor_back_from_a_short_break(handlers, tmp_path, monkeypatch):
    """Removed 10 minutes on, a visitor back from a coffee was asked to upload again."""
    from datetime import timedelta
    from app.ui import build
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    demo = build(handlers.cmp, ["int8"], tmp_path)
    upload = _uploaded(demo, tmp_path)
    _sweep_cache(demo, monkeypatch, timedelta(minutes=30))
    assert upload.exists()


def test_an_upload_and_a_variant_change_wait_in_one_queue_so_the_page_ends_on_the_variant_chosen_last(
        handlers, tmp_path):
    """In two queues, an upload waiting behind other visitors' would be answered after the variant change made
    since, showing the variant chosen before it."""
    from app.ui import build
    demo = build(handlers.cmp, ["int8"], tmp_path)
    stills = [fn for fn in demo.fns.values() if fn.name == "still"]
    assert len(stills) == 2 and len({fn.concurrency_id for fn in stills}) == 1


@pytest.mark.parametrize("label", [["a"], {"x": 1}, 12345])
def test_a_variant_that_is_not_a_menu_label_is_refused_clearly(assets, label):
    cmp, _, _ = make_comparison(assets / "fp.safetensors", None, assets, runtime="torch")
    with pytest.raises(ValueError, match="unknown quantized variant"):
        cmp.variant(label)


def test_a_quantized_file_given_as_the_fp_model_is_refused(assets):
    with pytest.raises(ValueError, match="not a full-precision"):
        make_comparison(assets / "tiny_int8.safetensors", None, assets, runtime="torch")


def test_a_full_precision_file_given_as_the_quantized_model_is_refused(assets):
    with pytest.raises(ValueError, match="--quant .* is a full-precision model"):
        make_comparison(assets / "fp.safetensors", assets / "fp.safetensors", assets, runtime="torch")


def test_a_quantized_model_given_for_other_classes_is_refused_not_swapped_for_another(assets, tmp_path):
    other = quant.models.VisionTransformer(quant.models.ViTConfig(**{**TINY.__dict__, "num_classes": 2,
                                                                     "classes": ("a", "b")}))
    path = packed(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="--quant other.safetensors: takes .* not comparable"):
        make_comparison(assets / "fp.safetensors", path, assets, runtime="torch")


def test_a_quantized_model_of_other_unnamed_classes_is_refused_naming_both_counts(tmp_path):
    """ImageNet configs name no classes: a model of 1000 and one of 10 differ by their counts."""
    unnamed = {**TINY.__dict__, "classes": ()}
    fp = tmp_path / "fp.safetensors"
    save_model(quant.models.VisionTransformer(quant.models.ViTConfig(**unnamed)), fp)
    other = quant.models.VisionTransformer(quant.models.ViTConfig(**{**unnamed, "num_classes": 2}))
    path = packed(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=f"takes {S}x{S} images of 2 classes, the FP model {S}x{S} of 3: not compar"):
        make_comparison(fp, path, tmp_path, runtime="torch")


def test_a_quantized_model_of_as_many_classes_with_other_names_is_refused_naming_the_classes(assets, tmp_path):
    names = tuple(f"other{i}" for i in range(TINY.num_classes))
    other = quant.models.VisionTransformer(quant.models.ViTConfig(**{**TINY.__dict__, "classes": names}))
    path = packed(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="takes classes other0, .*, the FP model's .*: not comparable"):
        make_comparison(assets / "fp.safetensors", path, assets, runtime="torch")


def test_a_quantized_model_of_as_many_unnamed_classes_is_refused_saying_they_are_unnamed(assets, tmp_path):
    """A timm head fine-tuned to 3 classes names none of them: no empty list of names beside the FP model's."""
    other = quant.models.VisionTransformer(quant.models.ViTConfig(**{**TINY.__dict__, "classes": ()}))
    path = packed(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="takes 3 unnamed classes, the FP model's classes cat, dog, frog: not compar"):
        make_comparison(assets / "fp.safetensors", path, assets, runtime="torch")


def test_an_fp_model_of_as_many_unnamed_classes_is_said_to_name_none_beside_a_named_quantized_one(assets, tmp_path):
    """The FP model is the timm head fine-tuned to 3 classes: its classes are said unnamed, not an empty list."""
    fp = tmp_path / "fp.safetensors"
    save_model(quant.models.VisionTransformer(quant.models.ViTConfig(**{**TINY.__dict__, "classes": ()})), fp)
    with pytest.raises(ValueError, match="takes classes cat, dog, frog, the FP model's 3 unnamed classes: not compar"):
        make_comparison(fp, assets / "tiny_int8.safetensors", assets, runtime="torch")


def test_an_onnx_fp_model_with_nothing_to_compare_it_with_asks_for_a_quantized_model(tiny_model, tmp_path):
    from export.exporter import export
    onnx_fp = export(tiny_model, tmp_path / "fp.onnx")
    with pytest.raises(ValueError, match="pass --quant MODEL"):
        make_comparison(onnx_fp, None, tmp_path, runtime="torch")


def test_without_fp_a_folder_of_onnx_exports_compares_its_fp_export_with_its_quantized_one(tiny_model, tmp_path):
    from export.exporter import export, quantize_for_export
    folder = tmp_path / "exports"
    folder.mkdir()
    export(tiny_model, folder / "fp32.onnx")
    export(quantize_for_export(tiny_model, "w8a8"), folder / "w8a8.onnx", "w8a8", custom_ops=False)
    cmp, labels, _ = make_comparison(None, None, folder)
    assert cmp.fp.name == "fp32.onnx" and labels == [cmp.default] and "w8a8.onnx" in cmp.default


def test_the_bench_given_an_onnx_fp_model_with_nothing_to_compare_does_not_ask_for_an_option_it_lacks(tiny_model,
                                                                                                   tmp_path):
    from export.exporter import export
    onnx_fp = export(tiny_model, tmp_path / "fp.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="put a quantized bitvit model of it") as e:
        bench_main(["--fp", str(onnx_fp), "--assets", str(tmp_path / "empty"), "--out", str(tmp_path / "b.json")])
    assert "--quant" not in str(e.value)


def test_a_model_whose_config_holds_a_number_too_large_for_a_float_is_refused_in_one_line(tmp_path, capsys):
    from safetensors.torch import save_file
    config = json.dumps({**json.loads(TINY.to_json()), "mlp_ratio": 10 ** 400})
    save_file({"head.weight": torch.zeros(3, 4)}, tmp_path / "big.safetensors",
              metadata={"format": quant.models.FORMAT, "config": config})
    assert run(main, ["--fp", str(tmp_path / "big.safetensors"), "--assets", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mlp_ratio" in err[0]


def test_a_packed_file_whose_header_has_the_wrong_structure_is_refused(assets, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(assets / "tiny_int8.safetensors"), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    header = json.loads(meta["header"])
    header["layers"] = list(header["layers"])
    save_file(tensors, tmp_path / "bad.safetensors", metadata={**meta, "header": json.dumps(header)})
    with pytest.raises(ValueError, match="damaged header"):
        inspect_file(tmp_path / "bad.safetensors")


def test_a_packed_file_whose_header_holds_an_integer_of_more_digits_than_python_reads_is_refused_naming_it(
        assets, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(assets / "tiny_int8.safetensors"), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    header = meta["header"].replace('"storage": {', '"storage": {"n": ' + "9" * 5000 + ", ", 1)
    save_file(tensors, tmp_path / "long.safetensors", metadata={**meta, "header": header})
    with pytest.raises(ValueError, match="long.safetensors has a damaged header"):
        inspect_file(tmp_path / "long.safetensors")


def test_a_port_in_use_is_refused_before_any_model_is_loaded(capsys, monkeypatch):
    import socket

    def no_loading(*args, **kwargs):
        raise AssertionError("models loaded before the port was checked")
    monkeypatch.setattr("app.main.make_comparison", no_loading)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert run(main, ["--host", "127.0.0.1", "--port", str(taken)]) == 2
    assert f"cannot listen on 127.0.0.1:{taken}" in capsys.readouterr().err


def test_the_app_where_the_cache_cannot_be_written_keeps_its_exports_for_the_run_and_runs_in_onnx_runtime(
        assets, tmp_path, monkeypatch, capsys):
    import gradio as gr
    import app.main
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path / "file" / "cache"))  # no folder can be made there (a read-only home)
    monkeypatch.setenv("CXX", "no-such-compiler")  # standard ONNX ops: no build in the test
    made = []
    monkeypatch.setattr(app.main, "make_comparison", lambda *a, **kw: made.append(make_comparison(*a, **kw)) or made[0])
    monkeypatch.setattr(app.main, "check_port_free", lambda host, number: None)
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: None)
    main(["--fp", str(assets / "fp.safetensors"), "--assets", str(assets)])
    cmp = made[0][0]
    assert cmp.fp.runtime == "ONNX Runtime" and cmp.variant(cmp.default).runtime == "ONNX Runtime"
    assert "cannot write the bitvit cache" in capsys.readouterr().err


def test_the_app_says_it_is_opening_the_models_before_the_silent_seconds_of_opening_them(
        assets, monkeypatch, capsys):
    import gradio as gr
    import app.main
    said = []  # what stdout held when the models began to open (exports and a build: a minute on a first start)
    monkeypatch.setattr(app.main, "make_comparison", lambda *a, **kw: said.append(capsys.readouterr().out)
                        or make_comparison(*a, **kw))
    monkeypatch.setattr(app.main, "check_port_free", lambda host, number: None)
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: None)
    monkeypatch.setenv("CXX", "no-such-compiler")  # standard ONNX ops: no build in the test
    main(["--fp", str(assets / "fp.safetensors"), "--assets", str(assets)])
    assert "opening the models" in said[0]


def test_a_bitvit_cache_naming_a_file_gets_a_temporary_cache_removed_at_exit(tmp_path, monkeypatch, capsys):
    import app.main
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path / "file"))  # cache_dir refuses it with ValueError
    at_exit = []
    monkeypatch.setattr(app.main.atexit, "register", lambda fn, *a, **kw: at_exit.append((fn, a, kw)))
    app.main.writable_cache()
    tmp = Path(os.environ["BITVIT_CACHE"])
    assert tmp.is_dir() and "cannot write the bitvit cache" in capsys.readouterr().err
    for fn, a, kw in at_exit:
        fn(*a, **kw)
    assert not tmp.exists()


def test_the_warning_for_a_bitvit_cache_that_cannot_be_written_names_the_folder(tmp_path, monkeypatch, capsys):
    import app.main
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path / "file" / "cache"))  # "Not a directory" alone says not where
    app.main.writable_cache()
    assert f"{tmp_path / 'file' / 'cache' / 'app'}: Not a directory" in capsys.readouterr().err


def _app_cache_folders(*ages_days: float) -> list[Path]:
    """Folders of the app's cache, the current code version's first, then others, each with a file in it and
    last used `ages_days` ago."""
    import time
    from app import backends
    app_cache = Path(os.environ["BITVIT_CACHE"]) / "app"
    folders = [app_cache / backends.code_digest()[:16]] + [app_cache / f"{i:016x}" for i in range(len(ages_days) - 1)]
    for folder, days in zip(folders, ages_days):
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"x")
        os.utime(folder, (time.time() - days * 86400,) * 2)
    return folders


def test_at_start_the_cache_folders_of_code_versions_unused_for_7_days_are_removed_the_current_and_recent_kept():
    import time
    import app.main
    current, old, recent = _app_cache_folders(30, 7.1, 6.9)
    app.main.writable_cache()
    assert current.is_dir() and recent.is_dir() and not old.exists()
    assert time.time() - current.stat().st_mtime < 60  # marked used: kept for 7 days more


def test_at_start_an_old_folder_in_the_app_cache_not_named_as_a_code_version_is_kept():
    import app.main
    _, other = _app_cache_folders(0, 30)
    mine = other.rename(other.parent / "my-exports")  # no folder bitvit made: not its to remove
    app.main.writable_cache()
    assert (mine / "model.onnx").is_file()


def test_at_start_the_files_cached_by_bitvit_before_the_version_folders_are_removed():
    import app.main
    from app import backends
    app_cache = Path(os.environ["BITVIT_CACHE"]) / "app"
    app_cache.mkdir(parents=True)
    for name in ("0123456789abcdef-ternary.onnx", "fp-0123456789abcdef-w8a8.safetensors", "x.onnx.123.tmp"):
        (app_cache / name).write_bytes(b"x")
    app.main.writable_cache()
    assert [p.name for p in app_cache.iterdir()] == [backends.code_digest()[:16]]


def test_cache_files_that_cannot_be_removed_at_start_are_skipped_and_the_app_starts(monkeypatch, capsys):
    import errno
    import app.main
    cache = os.environ["BITVIT_CACHE"]
    current, in_use, old = _app_cache_folders(0, 30, 30)
    (in_use / "in-use.onnx").write_bytes(b"x")
    (current.parent / "in-use.onnx").write_bytes(b"x")  # the layout before version folders
    os.utime(in_use, (0, 0))
    unlink = os.unlink

    def locked(path, *args, **kwargs):  # as Windows refuses a file another process has open
        if os.path.basename(path) == "in-use.onnx":
            raise PermissionError(errno.EACCES, "in use by another process", path)
        return unlink(path, *args, **kwargs)
    monkeypatch.setattr(os, "unlink", locked)
    app.main.writable_cache()
    assert os.environ["BITVIT_CACHE"] == cache and capsys.readouterr().err == ""  # no temporary cache instead
    assert (in_use / "in-use.onnx").is_file() and not (in_use / "model.onnx").exists() and not old.exists()


def test_a_port_outside_1_to_65535_is_an_argument_error(capsys):
    with pytest.raises(SystemExit):
        main(["--port", "99999"])
    assert "expected a port number" in capsys.readouterr().err


def test_a_bad_port_in_gradio_server_port_is_refused_naming_the_variable_not_an_option_never_given(capsys,
                                                                                                   monkeypatch):
    monkeypatch.setenv("GRADIO_SERVER_PORT", "")  # as a deployment's GRADIO_SERVER_PORT=$PORT with PORT unset
    with pytest.raises(SystemExit):
        main([])
    err = capsys.readouterr().err
    assert "$GRADIO_SERVER_PORT" in err and "expected a port number" in err and "argument --port" not in err


def test_a_host_in_gradio_server_name_that_is_no_address_here_is_refused_naming_the_variable(capsys, monkeypatch):
    monkeypatch.setenv("GRADIO_SERVER_NAME", "no-such-host.invalid")
    assert run(main, []) == 2
    assert "$GRADIO_SERVER_NAME" in capsys.readouterr().err


def test_the_readme_short_description_fits_the_60_characters_a_space_allows():
    front = (ASSETS.parent / "README.md").read_text(encoding="utf-8").split("---")[1]
    description = next(line for line in front.splitlines() if line.startswith("short_description:"))
    assert len(description.split(":", 1)[1].strip()) <= 60  # the Hub refuses a push whose card says more


def started_app(assets, tmp=None):
    """`python app/main.py` on `assets`' models, its output going to a pipe (a log, not a terminal), once it has printed
    the address it serves on (within 120 s; `tmp`: its $TMPDIR)."""
    import select
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"CXX": "no-such-compiler"}
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    app = subprocess.Popen([sys.executable, str(ASSETS.parent / "app" / "main.py"), "--fp", str(assets / "fp.safetensors"),
                            "--assets", str(assets), "--host", "127.0.0.1", "--port", str(free)],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        lines = []
        while not any(f"127.0.0.1:{free}" in line for line in lines):
            assert select.select([app.stdout], [], [], 120)[0], f"no address printed within 120 s, only {lines}"
            lines.append(app.stdout.readline().decode())
    except BaseException:
        app.kill()
        app.wait()
        raise
    return app


def test_the_app_prints_its_address_as_it_starts_where_its_output_goes_to_a_log_not_a_terminal(assets, tmp_path):
    app = started_app(assets, tmp_path)  # asserts the address arrives while it serves
    app.kill()
    app.wait()


def test_the_app_stopped_by_sigterm_removes_its_temporary_folders(assets, tmp_path):
    import signal
    (tmp_path / "tmp").mkdir()
    app = started_app(assets, tmp_path / "tmp")
    assert list((tmp_path / "tmp").glob("bitvit-*"))  # the drawn examples
    app.send_signal(signal.SIGTERM)  # as `docker stop`, systemd or a Space's restart stop it
    try:
        app.wait(60)
    finally:
        app.kill()
    assert list((tmp_path / "tmp").glob("bitvit-*")) == []


@pytest.mark.parametrize("where", ["missing", "file"])
def test_a_results_folder_that_is_not_a_folder_is_refused_before_the_app_starts(tmp_path, capsys, where):
    path = tmp_path / "results"
    if where == "file":
        path.write_text("{}")
    assert run(main, ["--results", str(path)]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_a_variant_for_other_classes_is_refused(fp_file, tmp_path):
    other = quant.models.VisionTransformer(quant.models.ViTConfig(**{**TINY.__dict__, "num_classes": 2,
                                                                     "classes": ("a", "b")}))
    path = packed(other, tmp_path / "other.safetensors")
    cmp = Comparison(open_model(fp_file, runtime="torch"), {"other": lambda: open_model(path, runtime="torch")})
    with pytest.raises(ValueError, match="cannot be compared"):
        cmp.variant("other")


def test_the_command_line_says_error_in_one_line_for_a_missing_model(tmp_path, capsys):
    assert run(main, ["--fp", str(tmp_path / "missing.safetensors"), "--assets", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


# ----------------------------------------------------------------------------- handlers

@pytest.mark.parametrize("f", [frame((S, S, 3)), frame((480, 640)), frame((120, 90, 1)), frame((240, 320, 4)),
                               frame((7, 1000, 3)), frame((50, 50, 3), np.float32), frame((60, 80, 3), np.uint16)],
                         ids=["square", "gray", "gray1", "rgba", "strip", "float", "uint16"])
def test_a_webcam_frame_of_any_mode_and_size_gives_both_models_results(handlers, f):
    view, fp_top, fp_card, q_top, q_card, summary, stats = handlers.live(f, None, LiveStats())
    assert view.shape[:2] == (4 * S, 4 * S)
    assert set(fp_top) <= set(TINY.classes) and len(fp_top) == 3 and len(q_top) == 3
    assert abs(sum(fp_top.values()) - 1) < 1e-6
    assert "ms" in fp_card and "ms" in q_card and ("MB" in fp_card or "kB" in fp_card)
    assert "smaller on disk" in summary and stats.frames == 1


def test_a_224_pixel_models_view_is_shown_as_it_is_not_enlarged_to_896_pixels(tmp_path):
    """Enlarged 4x, a 224x224 view would cost the live stream an 896x896 image to encode every frame."""
    big = quant.models.ViTConfig(**{**TINY.__dict__, "img_size": 224, "patch_size": 56, "stem_channels": ()})
    save_model(quant.models.VisionTransformer(big), tmp_path / "fp.safetensors")
    q = packed(quant.load_any(tmp_path / "fp.safetensors"), tmp_path / "q.safetensors")
    h = Handlers(Comparison(open_model(tmp_path / "fp.safetensors", runtime="torch"),
                            {"int8": lambda: open_model(q, runtime="torch")}))
    assert h.live(frame((480, 640, 3)), None, LiveStats())[0].shape == (224, 224, 3)


def test_a_32_pixel_view_is_still_enlarged_4x_and_one_past_256_pixels_is_shown_as_it_is():
    from app.ui import view_scale
    assert [view_scale(s) for s in (32, 64, 224, 384)] == [4, 4, 1, 1]  # 384: not scaled to nothing


def test_the_page_of_a_224_pixel_model_labels_its_view_unenlarged_at_its_own_height(tmp_path):
    from app.ui import build
    big = quant.models.ViTConfig(**{**TINY.__dict__, "img_size": 224, "patch_size": 56, "stem_channels": ()})
    save_model(quant.models.VisionTransformer(big), tmp_path / "fp.safetensors")
    q = packed(quant.load_any(tmp_path / "fp.safetensors"), tmp_path / "q.safetensors")
    cmp = Comparison(open_model(tmp_path / "fp.safetensors", runtime="torch"),
                     {"int8": lambda: open_model(q, runtime="torch")})
    views = [c["props"] for c in build(cmp, ["int8"], tmp_path).config["components"]
             if str(c.get("props", {}).get("label", "")).startswith("what the models see")]
    assert len(views) == 2 and all(v["label"] == "what the models see (224x224)" and v["height"] == 284 for v in views)


def data_url(img: Image.Image, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def test_a_streamed_frame_arrives_as_a_base64_data_url_and_gives_results(handlers):
    out = handlers.live({"path": None, "url": data_url(Image.fromarray(frame((48, 64, 3))))}, None, LiveStats())
    assert out[0].shape[:2] == (4 * S, 4 * S) and out[-1].frames == 1


@pytest.mark.parametrize("url, words", [
    ("data:image/png;base64,!!not base64!!", "base64 data is damaged"),
    ("data:text/plain;base64,aGVsbG8=", "not a base64 image"),
    ("data:image/png;base64,aGVsbG8=", "not an image"),
    (None, "megapixels")], ids=["damaged", "not-image-type", "not-image-data", "too-many-pixels"])
def test_a_streamed_frame_that_is_no_readable_image_of_reasonable_size_gets_a_message(handlers, url, words):
    url = url or data_url(Image.new("1", (10_000, 6_000)), "PNG")  # 60 megapixels in a few kB: refused unread
    out = handlers.live({"path": None, "url": url}, None, LiveStats())
    assert out[5].startswith("⚠") and words in out[5]


def test_none_between_stream_events_changes_nothing(handlers):
    stats = LiveStats()
    out = handlers.live(None, None, stats)
    assert stats.frames == 0 and out[-1] is stats
    assert all(type(o).__name__ != "ndarray" for o in out[:-1])   # gr.skip(): the page keeps its values


def test_a_garbage_frame_gives_a_message_and_the_stream_goes_on(handlers):
    stats = LiveStats()
    out = handlers.live(np.zeros((5, 5, 2), np.uint8), None, stats)
    assert out[5].startswith("⚠") and stats.frames == 0
    assert handlers.live(frame((40, 40, 3)), None, stats)[-1].frames == 1


def test_latency_windows_fill_frame_by_frame_and_restart_with_another_variant(handlers):
    stats = LiveStats()
    for i in range(4):
        stats = handlers.live(frame((40, 40, 3), seed=i), None, stats)[-1]
    assert len(stats.fp.ms) == len(stats.quant.ms) == 4 and stats.fps > 0
    handlers.cmp.openers["again"] = handlers.cmp.openers["int8"]
    stats = handlers.live(frame((40, 40, 3)), "again", stats)[-1]
    assert len(stats.fp.ms) == 1


def test_naming_the_default_variant_after_none_keeps_the_latency_windows(handlers):
    stats = LiveStats()
    for variant in (None, None, "int8", "int8"):   # None is the default variant, "int8" here
        stats = handlers.live(frame((40, 40, 3)), variant, stats)[-1]
    assert len(stats.fp.ms) == len(stats.quant.ms) == 4 and stats.variant == "int8"


def test_a_model_giving_nan_scores_gets_a_message_not_nan_confidences(handlers):
    nan_model = handlers.cmp.fp.run
    handlers.cmp.fp.run = lambda x: nan_model(x) * np.nan
    out = handlers.live(frame((40, 40, 3)), None, LiveStats())
    assert out[5].startswith("⚠") and "NaN" in out[5]


def test_an_uploaded_image_gives_both_models_results(handlers, tmp_path):
    Image.fromarray(frame((100, 150, 4))).save(tmp_path / "x.png")
    view, fp_top, fp_card, q_top, q_card, summary = handlers.still({"path": str(tmp_path / "x.png")}, None)
    assert view.shape[:2] == (4 * S, 4 * S) and len(fp_top) == 3 and "median of" in summary


def test_a_bad_upload_clears_the_results_and_says_why(handlers, tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    out = handlers.still({"path": str(tmp_path / "x.png")}, None)
    assert out[:5] == (None, None, "", None, "") and out[5].startswith("⚠")
    assert handlers.still(None, None)[5].startswith("Upload")


def test_the_drawn_examples_are_pictures_not_blank_squares(tmp_path):
    paths = write_examples(tmp_path)
    assert len(paths) == 5
    for p in paths:
        a = np.asarray(Image.open(p))
        assert a.shape == (SIZE, SIZE, 3) and a.std() > 10


# ----------------------------------------------------------------------------- results

def write_results(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ptq.json").write_text(json.dumps({
        "command": "python -m quant.ptq", "machine": "test", "split": "test",
        "results": [{"recipe": "fp32", "top1": 0.8, "bits_per_weight": 32, "size_bytes": 2_000_000,
                     "latency_ms": {"1": 3.0, "8": 10.0}, "confusion": np.eye(3, dtype=int).tolist()},
                    {"recipe": "w4", "top1": 0.78, "bits_per_weight": 4.4, "size_bytes": 400_000}]}))
    (folder.parent / "qvit.bits.json").write_text(json.dumps({
        "attention": {"blocks.0.attn": {"q": [4, 3], "k": [2, 8]}},
        "layers": {"blocks.0.mlp.fc1": {"weight": 4, "input": 8}}, "bitops": 1.0}))
    (folder / "qat.json").write_text(json.dumps({"runs": {"qvit": {
        "recipe": "qvit", "top1": 0.7, "bits_per_weight": 3.9, "allocation": str(folder.parent / "qvit.bits.json")}}}))
    (folder / "kernels.json").write_text(json.dumps({
        "ops": [{"layer": "qkv", "op": "w4", "ms": 0.1, "batch": 1}],
        "models": [{"variant": "w1.58a8", "ms": 2.5, "batch": 1}, {"variant": "w1.58a8", "ms": 9.0, "batch": 8}]}))
    (folder / "app_bench.json").write_text(json.dumps({"pairs": [{"name": "fp32 + ternary", "fps": 40.0}]}))
    (folder / "robustness.json").write_text(json.dumps({"fp_top1": 0.8, "n": 500, "split": "val", "trials": [
        {"bits": 2, "component": c, "block": b, "head": h, "top1": 0.79, "drop": 1.0, "kl": 0.01}
        for b in range(2) for c, h in [("w_qkv", None), ("a_gelu", None), ("h_q", 0), ("h_q", 1), ("h_attn", 0)]]}))
    (folder / "broken.json").write_text("{")
    return folder


def test_the_results_tab_reads_every_file_and_draws_what_exists(tmp_path):
    res = results.load(write_results(tmp_path / "results"))
    assert {e.name for e in res.having("top1", "bits")} == {"fp32", "w4", "qvit"}
    assert {e.name: e.latency_ms for e in res.having("latency_ms")} == {"fp32": 3.0, "w1.58a8": 2.5}  # batch 1 only,
    assert res.having("fps")[0].fps == 40.0                                                         # no kernels
    assert len(res.having("confusion")) == 1
    assert [e.name for e in res.having("allocation")] == ["qvit bit allocation"]   # read from the path qat.json names
    assert [e.source for e in res.entries].count("robustness") == 1                # its trials are not entries
    assert res.errors and "broken.json" in res.errors[0]
    for fig in (results.accuracy_vs_bits(res), results.latency_bars(res), results.size_bars(res), results.fps_bars(res),
                results.confusion_plot(res.having("confusion")[0]),
                results.allocation_plot(res.having("allocation")[0]),
                results.robustness_plot(res.having("robustness")[0])):
        assert any(ax.has_data() for ax in fig.axes)


def test_malformed_confusion_matrices_allocations_and_robustness_analyses_are_not_drawn(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "bad.json").write_text(json.dumps({"results": [
        {"recipe": "a", "confusion": [[1, float("nan")], [0, 1]]},
        {"recipe": "b", "confusion": [[1, -1], [0, 1]]},
        {"attention": {"blocks.0.attn": {"q": [4, "x"]}}, "layers": {}, "bitops": 1},
        {"attention": {"blocks.0.attn": {"q": [[4], [3]]}}, "layers": {}, "bitops": 1},
        {"attention": {}, "layers": [1, 2], "bitops": 1},
        {"fp_top1": 0.8, "n": 10, "trials": []},
        {"fp_top1": 0.8, "n": 10, "trials": [{"bits": 2, "component": "w_qkv", "block": "0", "drop": 1, "kl": 0.1}]},
        {"fp_top1": 0.8, "n": 10, "trials": [{"bits": 2, "component": "w_qkv", "block": 0, "drop": 1, "kl": None}]}]}))
    (folder / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    res = results.load(folder)
    assert not res.having("confusion") and not res.having("allocation") and not res.having("robustness")
    assert any("deep.json" in e for e in res.errors)


def test_the_results_tabs_accuracy_plot_is_titled_with_the_models_and_split_its_entries_name(tmp_path):
    (tmp_path / "ptq.json").write_text(json.dumps({"results": [
        {"recipe": "w4", "top1": 0.8, "bits_per_weight": 4.0, "checkpoint": "assets/vit_cifar_tiny.safetensors",
         "split": "test"}]}))
    title = results.accuracy_vs_bits(results.load(tmp_path)).axes[0].get_title()
    assert title == "vit_cifar_tiny: top-1 on the test split"


def test_the_results_tabs_log_axes_are_labelled_as_powers_of_ten_not_as_tex_source(tmp_path):
    res = results.load(write_results(tmp_path / "results"))  # (quant.report is loaded: its names are drawn as text)
    fig = results.robustness_plot(res.having("robustness")[0])
    fig.canvas.draw()
    ax = fig.axes[1]                                          # the KL per block, on a log scale
    assert ax.get_yscale() == "log"
    assert all(t.get_window_extent(fig.canvas.get_renderer()).width < 40 for t in ax.get_yticklabels() if t.get_text())


def test_every_results_plot_draws_names_holding_tex_as_text(tmp_path):
    tex = "$\\frac$"                                         # to matplotlib's mathtext, a parse error
    (tmp_path / "r.json").write_text(json.dumps({
        "ptq": [{"recipe": f"w4 {tex}", "top1": 0.5, "bits_per_weight": 4, "latency_ms": 2.0, "size_bytes": 10,
                 "fps": 3.0}],
        "alloc": {"attention": {f"blocks.0.attn{tex}": {"q": [4]}}, "layers": {f"fc{tex}": {"weight": 4}}, "bitops": 1},
        "robust": {"fp_top1": 0.8, "n": 10, "split": tex, "trials": [
            {"bits": 2, "component": "w_qkv", "block": 0, "drop": 1.0, "kl": 0.1}]}}))
    res = results.load(tmp_path)
    for fig in (results.accuracy_vs_bits(res), results.latency_bars(res), results.size_bars(res), results.fps_bars(res),
                results.allocation_plot(res.having("allocation")[0]),
                results.robustness_plot(res.having("robustness")[0])):
        fig.savefig(io.BytesIO(), format="png")


def bar_entries(tmp_path, values):
    (tmp_path / "bench.json").write_text(json.dumps({"results": {
        f"deit_small_patch16_224, random weights: ORT w8a8 (MatMulInteger) {i}": {"latency_ms": v}
        for i, v in enumerate(values)}}))
    return results.load(tmp_path)


def test_latency_bars_spanning_two_decades_or_more_are_drawn_on_a_log_scale(tmp_path):
    assert results.latency_bars(bar_entries(tmp_path, [0.7, 291.7])).axes[0].get_xscale() == "log"
    assert results.latency_bars(bar_entries(tmp_path, [2.0, 20.0])).axes[0].get_xscale() == "linear"


def test_bars_keep_long_names_their_numbers_and_the_axis_label_within_the_figure(tmp_path):
    fig = results.latency_bars(bar_entries(tmp_path, [0.7, 12.3, 291.7]))
    fig.canvas.draw()
    ax, renderer = fig.axes[0], fig.canvas.get_renderer()
    for text in ax.get_yticklabels() + ax.texts + [ax.xaxis.label, ax.title]:
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= fig.bbox.x1, text.get_text()


def test_latency_bars_of_600_entries_reach_the_page_as_a_webp_plot(tmp_path):
    """Gradio sends plots as WebP, at most 16383 pixels a side: 600 bars' figure was taller, and the tab failed."""
    import gradio as gr
    (tmp_path / "r.json").write_text(json.dumps({"r": [{"recipe": f"r{i}", "latency_ms": 1.0 + i} for i in range(600)]}))
    assert gr.Plot().postprocess(results.latency_bars(results.load(tmp_path))).plot.startswith("data:image/webp")


def test_an_allocation_of_470_blocks_and_a_robustness_analysis_of_21_widths_reach_the_page_as_webp_plots(tmp_path):
    import gradio as gr
    (tmp_path / "a.json").write_text(json.dumps({"attention": {f"blocks.{i}.attn": {"q": [4]} for i in range(470)},
                                                 "layers": {}, "bitops": 1}))
    (tmp_path / "r.json").write_text(json.dumps({"fp_top1": 0.8, "n": 10, "trials": [
        {"bits": b, "component": "w_qkv", "block": 0, "drop": 1.0, "kl": 0.1} for b in range(2, 23)]}))
    res = results.load(tmp_path)
    for fig in (results.allocation_plot(res.having("allocation")[0]),
                results.robustness_plot(res.having("robustness")[0])):
        assert gr.Plot().postprocess(fig).plot.startswith("data:image/webp")


def test_a_results_number_too_large_for_a_float_is_left_out_not_a_crash(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"w4": {"top1": 0.5, "bits_per_weight": 4, "size_bytes": 10 ** 400,
                                                        "latency_ms": 10 ** 400, "fps": 10 ** 400}}))
    res = results.load(tmp_path)
    assert len(res.having("top1", "bits")) == 1 and not res.having("size_mb") and not res.having("latency_ms")
    assert results.size_bars(res) is None and "no app frame rates" in results.summary(res)


def test_a_confusion_matrix_holding_an_integer_too_large_for_a_float_is_not_drawn_not_a_crash(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"a": {"top1": 0.5, "confusion": [[10 ** 400, 1], [0, 1]]}}))
    res = results.load(tmp_path)
    assert len(res.entries) == 1 and not res.having("confusion")


def test_a_results_file_with_an_integer_of_more_digits_than_python_reads_is_listed_as_unreadable(tmp_path):
    (tmp_path / "huge.json").write_text('{"w4": {"top1": 0.5, "n": ' + "9" * 5000 + "}}")
    (tmp_path / "ok.json").write_text(json.dumps({"w4": {"top1": 0.5, "bits_per_weight": 4}}))
    res = results.load(tmp_path)
    assert any("huge.json: not readable JSON" in e for e in res.errors) and len(res.having("top1", "bits")) == 1


def test_a_latency_keyed_by_a_superscript_digit_is_no_batch_size_not_a_crash(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"a": {"latency_ms": {"\u00b2": 9.0, "4": 2.0}}}))  # superscript 2
    assert results.load(tmp_path).entries[0].latency_ms == 2.0


def test_a_latency_keyed_by_batch_zero_is_no_batch_size_and_batch_one_is_drawn(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"a": {"latency_ms": {"0": 0.5, "00": 0.4, "1": 2.0}}}))
    assert results.load(tmp_path).entries[0].latency_ms == 2.0


def test_a_latency_keyed_by_more_digits_than_python_reads_is_no_batch_size_not_a_crash(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"a": {"latency_ms": {"9" * 5000: 9.0, "1": 2.0}}}))
    assert results.load(tmp_path).entries[0].latency_ms == 2.0


def test_an_allocation_whose_layer_input_bits_are_not_a_number_is_drawn_with_that_bar_at_zero(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"attention": {}, "bitops": 1, "layers": {
        "blocks.0.attn.qkv": {"weight": 4, "input": "x"}, "blocks.0.mlp.fc1": {"weight": 3, "input": [8]}}}))
    fig = results.allocation_plot(results.load(tmp_path).having("allocation")[0])
    fig.canvas.draw()
    assert [p.get_height() for p in fig.axes[0].patches] == [4, 3, 0, 0]


def test_an_allocation_whose_layer_bits_are_an_integer_beyond_64_bits_is_drawn_not_a_crash(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"attention": {}, "bitops": 1, "layers": {
        "blocks.0.attn.qkv": {"weight": 2 ** 63, "input": 2 ** 64}, "blocks.0.mlp.fc1": {"weight": 3, "input": 8}}}))
    fig = results.allocation_plot(results.load(tmp_path).having("allocation")[0])
    assert any(ax.has_data() for ax in fig.axes)


def test_an_allocation_with_nothing_to_draw_is_not_offered_and_the_tab_says_there_is_none(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"attention": {"blocks.0.attn": {"q": []}}, "layers": {}, "bitops": 1}))
    res = results.load(tmp_path)
    assert not res.having("allocation") and "missing: no Q-ViT bit allocation" in results.summary(res)


def test_an_allocation_path_naming_a_pipe_is_not_followed(tmp_path):
    os.mkfifo(tmp_path / "pipe")  # like /dev/zero or /dev/stdin: reading it would never end
    (tmp_path / "qat.json").write_text(json.dumps({"w4": {"top1": 0.5, "allocation": str(tmp_path / "pipe")}}))
    res = results.load(tmp_path)
    assert len(res.entries) == 1 and not res.having("allocation")


@pytest.mark.parametrize("component,head", [("w_qkv", None), ("h_q", 0)])
def test_a_robustness_analysis_of_weights_alone_or_of_heads_alone_is_drawn(tmp_path, component, head):
    (tmp_path / "r.json").write_text(json.dumps({"fp_top1": 0.8, "n": 10, "trials": [
        {"bits": 2, "component": component, "block": 0, "head": head, "drop": 1.0, "kl": 0.1}]}))
    fig = results.robustness_plot(results.load(tmp_path).having("robustness")[0])
    assert any(ax.has_data() for ax in fig.axes)


@pytest.mark.parametrize("trial", [{"component": "w_qkv"}, {"component": "h_k", "head": None}],
                         ids=["no-head-key", "head-slot-without-head"])
def test_a_robustness_trial_without_a_head_is_drawn_without_one_not_a_crash(tmp_path, trial):
    trials = [{"bits": 2, "component": "h_q", "block": 0, "head": 0, "drop": 1.0, "kl": 0.1},
              {"bits": 2, "block": 0, "drop": 1.0, "kl": 0.1, **trial}]
    (tmp_path / "r.json").write_text(json.dumps({"fp_top1": 0.8, "n": 10, "trials": trials}))
    fig = results.robustness_plot(results.load(tmp_path).having("robustness")[0])
    assert any(ax.has_data() for ax in fig.axes)


def test_a_robustness_analysis_holding_integers_beyond_64_bits_is_drawn_not_a_crash(tmp_path):
    trials = [{"bits": 2, "component": "w_qkv", "block": 0, "drop": 2 ** 63, "kl": 0.1},
              {"bits": 2, "component": "w_qkv", "block": 2 ** 70, "drop": 1.0, "kl": 2 ** 64}]
    (tmp_path / "r.json").write_text(json.dumps({"fp_top1": 0.8, "n": 10, "trials": trials}))
    fig = results.robustness_plot(results.load(tmp_path).having("robustness")[0])
    fig.canvas.draw()
    assert any(ax.has_data() for ax in fig.axes)


def test_without_results_files_the_tab_says_what_is_missing(tmp_path):
    res = results.load(tmp_path / "nothing")
    assert results.accuracy_vs_bits(res) is None
    text = results.summary(res)
    assert "no results files" in text and "confusion" in text


def test_the_bench_refuses_frames_the_app_would_refuse(assets, tmp_path):
    with pytest.raises(ValueError, match="megapixels"):
        bench_main(["--assets", str(assets), "--size", "10000x6000", "--out", str(tmp_path / "b.json")])


@pytest.mark.parametrize("size", ["0x480", "640x0"])
def test_the_bench_refuses_a_frame_size_without_pixels_before_loading_any_model(tmp_path, size):
    with pytest.raises(ValueError, match="--size must be positive"):
        bench_main(["--assets", str(tmp_path / "none"), "--size", size, "--out", str(tmp_path / "b.json")])


def test_the_bench_refuses_to_write_the_shipped_results_from_a_run_with_other_options(tmp_path):
    shipped = ASSETS / "results" / "app_bench.json"
    before = shipped.read_bytes()
    with pytest.raises(ValueError, match="--assets, --frames needs --out FILE"):
        bench_main(["--frames", "3", "--assets", str(tmp_path / "none")])
    assert shipped.read_bytes() == before


def test_the_bench_refuses_a_clip_too_large_to_hold_before_loading_any_model(tmp_path):
    with pytest.raises(ValueError, match="would take .* bytes of memory"):
        bench_main(["--assets", str(tmp_path / "none"), "--frames", "100000000", "--out", str(tmp_path / "b.json")])


def test_the_bench_imports_no_gradio_before_it_times_so_its_help_and_refusals_come_quickly():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", "import sys, app.bench; print('gradio' in sys.modules)"],
                       capture_output=True, text=True, cwd=ASSETS.parent)  # gradio's import: seconds
    assert r.stdout.strip() == "False", r.stderr


def test_a_clip_just_over_the_memory_limit_is_not_said_to_be_as_large_as_the_limit(tmp_path):
    with pytest.raises(ValueError) as e:  # 4,661 frames of 640x480: 4,295,577,600 bytes, 4 GiB and 0.06 %
        bench_main(["--assets", str(tmp_path / "none"), "--frames", "4661", "--out", str(tmp_path / "b.json")])
    assert "4,295,577,600 bytes" in str(e.value) and "GiB" in str(e.value)


def test_the_bench_says_it_is_opening_the_models_before_the_silent_seconds_of_opening_them(
        assets, tmp_path, monkeypatch, capsys):
    import app.bench
    said = []  # stdout when the models began to open (exports and a build: a minute on a first run)
    monkeypatch.setattr(app.bench, "make_comparison", lambda *a, **kw: said.append(capsys.readouterr().out)
                        or make_comparison(*a, **kw))
    bench_main(["--fp", str(assets / "fp.safetensors"), "--assets", str(assets), "--frames", "2",
                "--size", "64x48", "--runtime", "torch", "--out", str(tmp_path / "b.json")])
    assert "opening the models" in said[0]


def test_the_bench_of_one_frame_on_one_cpu_says_both_in_the_singular(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    bench_main(["--fp", str(assets / "fp.safetensors"), "--assets", str(assets), "--frames", "1",
                "--size", "64x48", "--runtime", "torch", "--out", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert "app live handler, 1 frame of 64x48, both models" in out and "; 1 CPU)" in out


def test_the_bench_times_every_pair_through_the_live_handler_and_writes_json(assets, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_main(["--fp", str(assets / "fp.safetensors"), "--assets", str(assets), "--frames", "3",
                "--size", "64x48", "--runtime", "torch", "--out", str(out)])
    data = json.loads(out.read_text())
    assert [p["quant"]["weight_format"] for p in data["pairs"]] == ["ternary", "int8"]   # the default pair first
    assert all(p["fps"] > 0 and p["frames"] == 3 for p in data["pairs"])
    assert {"command", "machine", "date", "split", "wall_time_s"} <= data.keys()
    assert all(p["quant"]["note"] == "" for p in data["pairs"])  # each pair ran as asked, nothing fell back
    assert "frames/s target" in capsys.readouterr().out



def test_the_bench_where_the_cache_cannot_be_written_keeps_its_files_for_the_run_and_runs_in_onnx_runtime(
        fp_file, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path / "file" / "cache"))  # no folder can be made there
    monkeypatch.setenv("CXX", "no-such-compiler")  # standard ONNX ops: no build in the test
    (tmp_path / "none").mkdir()
    out = tmp_path / "bench.json"
    bench_main(["--fp", str(fp_file), "--assets", str(tmp_path / "none"), "--frames", "2", "--size", "64x48",
                "--out", str(out)])  # no packed model: both quantized ones built on the fly
    pairs = json.loads(out.read_text())["pairs"]
    assert [p["quant"]["runtime"] for p in pairs] == ["ONNX Runtime"] * 2
    assert all(p["quant"]["note"].startswith("quant.quantize") for p in pairs), pairs  # no fallback noted
    assert "cannot write the bitvit cache" in capsys.readouterr().err


def test_the_bench_records_no_load_average_where_the_os_has_none(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.delattr(os, "getloadavg")  # Windows
    out = tmp_path / "bench.json"
    bench_main(["--fp", str(assets / "fp.safetensors"), "--assets", str(assets), "--frames", "2",
                "--size", "64x48", "--runtime", "torch", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["load_average_before"] is None and data["load_average_after"] is None
    assert "load average n/a" in capsys.readouterr().out


def test_the_bench_prints_each_size_ratio_from_the_file_sizes_not_from_its_rounded_record(assets, tmp_path, capsys,
                                                                                          monkeypatch):
    import app.bench
    timed = app.bench.bench_pair

    def pair(*args):
        row = timed(*args)
        row["fp"]["file_bytes"], row["quant"]["file_bytes"] = 62_504, 10_000   # 6.2504x smaller: "6.3x"
        row["size_ratio"] = round(62_504 / 10_000, 2)                         # recorded 6.25, which prints "6.2x"
        return row
    monkeypatch.setattr(app.bench, "bench_pair", pair)
    bench_main(["--fp", str(assets / "fp.safetensors"), "--assets", str(assets), "--frames", "2",
                "--size", "64x48", "--runtime", "torch", "--out", str(tmp_path / "bench.json")])
    assert "6.3x" in capsys.readouterr().out

def test_the_bench_leaves_out_a_packed_model_that_does_not_open_as_the_app_does(assets, tmp_path, capsys):
    (assets / "a_ternary.safetensors").write_bytes((assets / "tiny_ternary.safetensors").read_bytes())
    damage(assets / "a_ternary.safetensors")   # sorts first: the default ternary model, were it whole
    damage(assets / "tiny_int8.safetensors")   # not the default
    out = tmp_path / "bench.json"
    bench_main(["--fp", str(assets / "fp.safetensors"), "--assets", str(assets), "--frames", "2",
                "--size", "64x48", "--runtime", "torch", "--out", str(out)])
    assert [p["quant"]["file"] for p in json.loads(out.read_text())["pairs"]] == ["tiny_ternary.safetensors"]
    err = capsys.readouterr().err
    assert "skipped ternary weights · int8 activations · a_ternary" in err and "skipped int8" in err


def test_the_bench_leaves_out_packed_models_of_another_architecture(assets, tmp_path, capsys, shared_ortops_cache):
    packed_other_architecture(assets)
    out = tmp_path / "bench.json"
    bench_main(["--fp", str(assets / "fp.safetensors"), "--assets", str(assets), "--frames", "3",
                "--size", "64x48", "--runtime", "torch", "--out", str(out)])
    assert [p["quant"]["file"] for p in json.loads(out.read_text())["pairs"]] == ["tiny_ternary.safetensors",
                                                                                  "tiny_int8.safetensors"]
    assert "left out ternary weights · int8 activations · a_wide_ternary" in capsys.readouterr().err
    for name in ("tiny_ternary", "tiny_int8"):
        (assets / f"{name}.safetensors").unlink()
    from export.exporter import export
    export_fp = tmp_path / "fp.onnx"   # an FP export, which the app cannot quantize itself
    export(quant.load_any(assets / "fp.safetensors"), export_fp)
    with pytest.raises(ValueError, match="no quantized model of fp.onnx's architecture"):
        bench_main(["--fp", str(export_fp), "--assets", str(assets), "--out", str(out)])


def _handlers_whose_variant_went_away(fp_file, tmp_path) -> Handlers:
    q = packed(quant.load_any(fp_file), tmp_path / "q.safetensors")
    h = Handlers(Comparison(open_model(fp_file, runtime="torch"), {"int8": lambda: open_model(q, runtime="torch")}))
    q.unlink()  # removed from assets/ after the app started, before anyone picked it
    return h


def test_a_variant_whose_file_went_away_gives_a_message_not_a_crash(fp_file, tmp_path):
    h = _handlers_whose_variant_went_away(fp_file, tmp_path)
    out = h.live(frame((40, 40, 3)), "int8", LiveStats())
    assert out[5].startswith("⚠") and "no such model file" in out[5]
    Image.fromarray(frame((40, 40, 3))).save(tmp_path / "x.png")
    assert h.still(str(tmp_path / "x.png"), "int8")[-1].startswith("⚠")


def test_bits_per_weight_of_a_huge_architecture_is_counted_without_allocating_it():
    from app.backends import fp_parameters
    from quant.models import ViTConfig
    from quant.models import VisionTransformer, count_parameters
    assert fp_parameters(TINY) == count_parameters(VisionTransformer(TINY))
    d = 2 ** 20
    huge = ViTConfig(**{**TINY.__dict__, "embed_dim": d, "num_heads": 1})  # ~10^14 bytes if allocated
    blocks = TINY.depth * (4 + 2 * TINY.mlp_ratio) * d * d  # qkv, proj, fc1, fc2: (3 + 1 + 2 mlp_ratio) d^2 a block
    assert fp_parameters(huge) == pytest.approx(blocks, rel=1e-3)


def test_the_bench_stops_with_the_pages_message_when_the_handler_refuses_a_frame(fp_file, tmp_path):
    h = _handlers_whose_variant_went_away(fp_file, tmp_path)  # every frame gets the page's warning
    with pytest.raises(ValueError, match="no such model file"):
        bench_pair(h, "int8", [frame((40, 40, 3))] * 6)


def test_partly_transparent_pixels_are_blended_and_rounded_not_truncated():
    assert to_rgb(np.array([[[10, 10, 10, 16]]], np.uint8)).tolist() == [[[240, 240, 240]]]  # 239.63 -> 240


def test_float_frames_up_to_exactly_one_are_0_to_1_and_rounded_to_the_nearest_level():
    assert to_rgb(np.array([[[0.0, 0.5, 1.0]]], np.float32)).tolist() == [[[0, 128, 255]]]
    assert to_rgb(np.array([[[0.0, 100.6, 255.0]]], np.float64)).tolist() == [[[0, 101, 255]]]


def test_float_frames_just_above_255_are_refused():
    with pytest.raises(ValueError, match="must lie in 0..1 or 0..255"):
        to_rgb(np.full((2, 2, 3), 255.5, np.float32))


def test_uint16_frames_map_65535_levels_proportionally_onto_255():
    a = np.arange(65536, dtype=np.uint16).reshape(256, 256, 1)
    assert (to_rgb(a)[..., :1] == a.astype(np.int64) * 255 // 65535).all()


def test_a_32_bit_integer_pil_image_of_16_bit_values_is_scaled_down():
    img = Image.fromarray(np.full((2, 2), 50_000, np.int32), mode="I")   # as a 16-bit PNG opens
    assert to_rgb(img).tolist() == [[[194] * 3] * 2] * 2


def test_a_photo_is_turned_upright_by_its_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6                                       # "rotate 90 degrees clockwise to view"
    Image.new("RGB", (40, 20), (200, 0, 0)).save(tmp_path / "phone.jpg", exif=exif)
    assert load_image_file(tmp_path / "phone.jpg").shape == (40, 20, 3)


def test_a_palette_image_with_a_transparent_colour_is_composited_over_white(tmp_path):
    img = Image.new("P", (2, 2), 0)
    img.putpalette([0, 0, 0, 255, 0, 0])
    img.save(tmp_path / "t.png", transparency=0)           # palette entry 0 (black) is transparent
    assert (load_image_file(tmp_path / "t.png") == 255).all()


def test_a_file_just_over_the_size_limit_is_not_said_to_be_as_large_as_the_limit(tmp_path):
    from app import frames
    path = tmp_path / "big.png"
    with open(path, "wb") as f:
        f.truncate(frames.MAX_FILE_BYTES + 1)                # sparse: one byte over, 50 MiB on the page
    with pytest.raises(ValueError) as e:
        load_image_file(path)
    assert f"{frames.MAX_FILE_BYTES + 1:,} bytes" in str(e.value) and "MiB" in str(e.value)


def test_a_file_of_exactly_the_size_limit_is_not_refused_for_its_size(tmp_path):
    from app import frames
    path = tmp_path / "big.png"
    with open(path, "wb") as f:
        f.truncate(frames.MAX_FILE_BYTES)                    # sparse zeros: refused as no image, not as too large
    with pytest.raises(ValueError) as e:
        load_image_file(path)
    assert "the app takes images up to" not in str(e.value)


def test_a_streamed_frame_over_the_size_limit_is_refused_before_decoding(monkeypatch):
    from app import frames
    monkeypatch.setattr(frames, "MAX_FILE_BYTES", 1000)
    buf = io.BytesIO()
    Image.fromarray(frame((64, 64, 3))).save(buf, "PNG")    # ~12 kB of noise
    with pytest.raises(ValueError, match="the frame is over"):
        frames.load_data_url("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())


class FakeBackend:
    """A backend that records what it is called with and returns fixed logits."""

    def __init__(self, name, log, logits=(1.0, 2.0, 3.0), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        from types import SimpleNamespace
        self.name, self.log, self.logits = name, log, np.array([logits], np.float32)
        self.config = SimpleNamespace(img_size=S, classes=TINY.classes, num_classes=3, mean=mean, std=std)

    def __call__(self, x):
        self.log.append((self.name, x.copy()))
        return self.logits


def test_the_models_take_turns_to_run_first_each_on_its_own_normalisation():
    from quant.data import to_model_array
    log = []
    fp, q = FakeBackend("fp", log), FakeBackend("q", log, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    cmp = Comparison(fp, {"q": lambda: q})
    cmp.variant("q")
    log.clear()
    view, _, _ = cmp.run(frame((40, 40, 3)), "q", frame_index=0)
    cmp.run(frame((40, 40, 3)), "q", frame_index=1)
    assert [name for name, _ in log] == ["fp", "q", "q", "fp"]
    np.testing.assert_array_equal(log[1][1], to_model_array(view[None], q.config.mean, q.config.std))


def test_the_fp_model_and_a_variant_are_opened_and_warmed_once():
    log, opened = [], []
    fp, q = FakeBackend("fp", log), FakeBackend("q", log)
    cmp = Comparison(fp, {"q": lambda: opened.append(1) or q})
    assert [name for name, _ in log] == ["fp"] and not log[0][1].any()   # the fp model's warm-up call
    for i in range(3):
        cmp.run(frame((40, 40, 3)), None, frame_index=i)                 # None: the default variant
    assert len(opened) == 1 and [name for name, _ in log].count("q") == 4


def test_a_variant_that_fails_to_open_is_not_opened_again_on_every_frame_and_says_the_same_error():
    """Opened again on every frame, holding the lock every visitor's new variant waits on, one bad file made the
    live stream slow for everyone."""
    log, opened = [], []

    def damaged():
        opened.append(1)
        raise ValueError("bad.safetensors is damaged")
    h = Handlers(Comparison(FakeBackend("fp", log), {"q": lambda: FakeBackend("q", log), "bad": damaged}))
    summaries = [h.live(frame((40, 40, 3)), "bad", LiveStats())[5] for _ in range(3)]
    assert len(opened) == 1 and summaries == ["⚠ bad.safetensors is damaged"] * 3


def test_a_variant_that_failed_to_open_is_opened_again_once_its_file_is_replaced(tmp_path):
    import functools
    log, opened = [], []

    def open_file(path):  # as app.main's openers: a functools.partial of the file's path
        opened.append(1)
        if Path(path).read_bytes() == b"damaged":
            raise ValueError(f"{path} is damaged")
        return FakeBackend("q", log)
    path = tmp_path / "q.safetensors"
    path.write_bytes(b"damaged")
    cmp = Comparison(FakeBackend("fp", log), {"q": functools.partial(open_file, path)})
    for _ in range(2):
        with pytest.raises(ValueError, match="is damaged"):
            cmp.variant("q")
    path.write_bytes(b"a good model")
    assert cmp.variant("q").name == "q" and len(opened) == 2


def test_a_visitor_who_waited_while_a_variant_failed_to_open_gets_its_error_without_opening_it_again():
    import threading
    import time
    log, opened, building, release, errors = [], [], threading.Event(), threading.Event(), []

    def damaged():
        opened.append(1)
        building.set()
        release.wait(10)
        raise ValueError("bad.safetensors is damaged")

    def choose():
        try:
            cmp.variant("bad")
        except ValueError as e:
            errors.append(str(e))
    cmp = Comparison(FakeBackend("fp", log), {"q": lambda: FakeBackend("q", log), "bad": damaged})
    visitors = [threading.Thread(target=choose) for _ in range(2)]
    visitors[0].start()
    assert building.wait(5)
    visitors[1].start()
    time.sleep(0.2)  # the second visitor waits on the lock the first holds while opening
    release.set()
    for t in visitors:
        t.join(10)
    assert len(opened) == 1 and errors == ["bad.safetensors is damaged"] * 2


class _SlowVariant:
    """An opener that holds its caller, as a variant built on the fly (or exported and its ops compiled) does at
    first choice: `being_built(cmp)` has another visitor's thread open it for the block's duration."""

    def __init__(self, log):
        import threading
        self.log, self.building, self.release = log, threading.Event(), threading.Event()

    def __call__(self):
        self.building.set()
        self.release.wait(10)
        return FakeBackend("slow", self.log)

    @contextlib.contextmanager
    def being_built(self, cmp):
        import threading
        other = threading.Thread(target=cmp.variant, args=("slow",))
        other.start()
        try:
            assert self.building.wait(5)
            yield
        finally:
            self.release.set()
            other.join()


def test_frames_of_a_variant_that_failed_to_open_do_not_wait_while_another_visitors_variant_is_being_built():
    import threading
    log = []

    def damaged():
        raise ValueError("bad.safetensors is damaged")
    slow = _SlowVariant(log)
    cmp = Comparison(FakeBackend("fp", log), {"q": lambda: FakeBackend("q", log), "bad": damaged, "slow": slow})
    with pytest.raises(ValueError, match="damaged"):
        cmp.variant("bad")
    with slow.being_built(cmp):
        said = threading.Event()
        threading.Thread(target=lambda: pytest.raises(ValueError, cmp.variant, "bad") and said.set(),
                         daemon=True).start()
        assert said.wait(5), "a frame of the failed variant waited for the other variant to be built"


def test_frames_of_an_open_variant_do_not_wait_while_another_visitors_variant_is_being_built():
    import threading
    log = []
    slow = _SlowVariant(log)
    cmp = Comparison(FakeBackend("fp", log), {"q": lambda: FakeBackend("q", log), "slow": slow})
    cmp.variant("q")
    with slow.being_built(cmp):
        done = threading.Event()
        threading.Thread(target=lambda: (cmp.run(frame((40, 40, 3)), "q"), done.set()), daemon=True).start()
        assert done.wait(5), "a frame of the open variant waited for the other variant to be built"


def test_confidences_are_a_softmax_that_survives_large_logits_and_rank_best_first():
    log = []
    cmp = Comparison(FakeBackend("fp", log, logits=(1000.0, 0.0, 999.0)), {"q": lambda: FakeBackend("q", log)})
    _, fp_reading, _ = cmp.run(frame((40, 40, 3)), "q")
    assert np.isfinite(fp_reading.probs).all() and fp_reading.probs.sum() == pytest.approx(1)
    assert list(fp_reading.top(2)) == ["cat", "frog"]


def test_the_frame_rate_counts_intervals_and_restarts_with_another_variant():
    stats = LiveStats()
    stats.stamps.extend([10.0, 11.0, 12.0])
    assert stats.fps == pytest.approx(1.0)                               # 2 intervals in 2 s
    stats.reset("other")
    assert stats.fps is None and len(stats.stamps) == 0


# ----------------------------------------------------------------------------- what the page says

def fake_reading(name, size_bytes, logits, linear_bits=None, config=TINY):
    from app.backends import Backend
    from app.live import Reading, _softmax
    backend = Backend(name, "torch", "int8", config, size_bytes, lambda x: x, linear_bits)
    return Reading(backend, _softmax(np.array(logits, np.float64)), 1.0)


CRANES = quant.models.ViTConfig(**{**TINY.__dict__, "classes": ("crane", "cat", "crane")})  # as ImageNet's two


def test_two_classes_of_one_name_are_shown_apart_in_the_top_classes():
    top = fake_reading("fp", 1000, [3, 1, 2], config=CRANES).top()
    assert top.keys() == {"crane (class 0)", "crane (class 2)", "cat"} and sum(top.values()) == pytest.approx(1)


def test_the_summary_says_two_models_disagree_whose_top_classes_share_a_name():
    from app.ui import summary_markdown
    fp, q = fake_reading("fp", 1000, [3, 1, 2], config=CRANES), fake_reading("q", 1000, [2, 1, 3], config=CRANES)
    assert "top-1 disagree" in summary_markdown(fp, q, 1.0, 1.0, None, "median")


def test_a_models_card_gives_frames_per_second_from_the_median_latency_not_the_last():
    from app.ui import model_markdown
    card = model_markdown(fake_reading("q.safetensors", 50_000, [1, 2, 3]), last=10.0, median=20.0, n=4)
    assert "**10.00 ms** last" in card and "**20.00 ms** median of 4 frames" in card and "up to 50 frames/s" in card


def test_a_models_card_gives_the_linear_layers_bits_when_the_file_says_them():
    from app.ui import model_markdown
    card = model_markdown(fake_reading("q.safetensors", 50_000, [1, 2, 3], linear_bits=1.6), 5.0, None, 10)
    assert "linear layers 1.60" in card and "(median of 10 runs)" in card


@pytest.mark.parametrize("n,text", [(99_999, "100.0 kB"), (100_000, "0.10 MB"), (2_500_000, "2.50 MB")])
def test_sizes_from_100_kb_are_given_in_mb(n, text):
    from app.ui import _mb
    assert _mb(n) == text


@pytest.mark.parametrize("fp_ms,q_ms,words", [(4.0, 2.0, "2.00x faster"), (2.0, 4.0, "0.50x slower")])
def test_the_summary_gives_the_speed_up_and_the_size_ratio_of_the_quantized_model(fp_ms, q_ms, words):
    from app.ui import summary_markdown
    fp, q = fake_reading("fp", 4_000_000, [1, 2, 3]), fake_reading("q", 1_000_000, [1, 2, 3])
    line = summary_markdown(fp, q, fp_ms, q_ms, None, "median")
    assert words in line and "4.0x smaller on disk" in line


def test_the_summary_says_whether_the_two_models_top_classes_agree():
    from app.ui import summary_markdown
    fp = fake_reading("fp", 1000, [1, 2, 3])
    same, other = fake_reading("q", 1000, [0, 1, 5]), fake_reading("q", 1000, [3, 2, 1])
    assert "top-1 agree" in summary_markdown(fp, same, 1.0, 1.0, None, "median")
    assert "top-1 disagree" in summary_markdown(fp, other, 1.0, 1.0, None, "median")


def test_an_upload_that_is_not_a_file_gets_a_message(handlers):
    out = handlers.still({"path": 123}, None)
    assert out[:5] == (None, None, "", None, "") and "not an uploaded file" in out[5]


def test_the_bench_reports_the_speed_up_as_fp_latency_over_quantized_latency():
    from types import SimpleNamespace

    def live(f, variant, stats):  # the page's handler, with the FP model taking 6 ms a frame, the quantized 2 ms
        stats.fp.add(6.0)
        stats.quant.add(2.0)
        stats.tick()
        return (None,) * 5 + ("summary", stats)

    def backend(size_bytes):
        return SimpleNamespace(name="m", runtime="torch", weight_format="int8", size_bytes=size_bytes,
                               bits_per_weight=8.0, linear_bits=None, note="")
    fp, q = backend(3000), backend(1000)
    handlers = SimpleNamespace(live=live, cmp=SimpleNamespace(fp=fp, variant=lambda label: q))
    row = bench_pair(handlers, "q", [frame((8, 8, 3))] * 3)
    assert row["speedup"] == 3.0 and row["size_ratio"] == 3.0
    assert (row["fp_median_ms"], row["quant_median_ms"], row["frames"]) == (6.0, 2.0, 3)


def test_the_benchs_time_outside_the_models_is_each_frames_own_not_a_mean_less_two_medians(monkeypatch):
    from types import SimpleNamespace
    import app.bench
    clock = [0.0]  # the bench's clock, moved by the handler alone: exact times
    monkeypatch.setattr(app.bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    # per frame: the FP model's ms (median 20 above its mean 13.7), the quantized model's (4) and the rest (median 2)
    times = iter([(20.0, 4.0, 2.0), (20.0, 4.0, 2.0), (1.0, 4.0, 30.0)] * 2)

    def live(f, variant, stats):  # the page's handler
        fp, q, other = next(times)
        clock[0] += (fp + q + other) / 1e3
        stats.fp.add(fp)
        stats.quant.add(q)
        stats.tick()
        return (None,) * 5 + ("summary", stats)

    backend = SimpleNamespace(name="m", runtime="torch", weight_format="int8", size_bytes=1000, bits_per_weight=8.0,
                              linear_bits=None, note="")
    handlers = SimpleNamespace(live=live, cmp=SimpleNamespace(fp=backend, variant=lambda label: backend))
    row = bench_pair(handlers, "q", [frame((8, 8, 3))] * 3)  # 3 frames after 3 of warm-up
    assert row["other_ms_per_frame"] == pytest.approx(2.0)  # not the mean per frame less the medians, 5.0


def test_the_results_summary_counts_each_files_entries_and_names_one_with_nothing_to_plot(tmp_path):
    folder = write_results(tmp_path / "results")
    (folder / "empty.json").write_text(json.dumps({"results": []}))
    text = results.summary(results.load(folder))
    assert "- **ptq.json**: 2 entries (command: `python -m quant.ptq`" in text
    assert "- **empty.json**: nothing this tab plots" in text


def test_the_results_summary_counts_one_entry_in_the_singular(tmp_path):
    (tmp_path / "qat.json").write_text(json.dumps({"runs": {"w4": {"top1": 0.5}}}))
    assert "- **qat.json**: 1 entry\n" in results.summary(results.load(tmp_path))


def test_a_confusion_matrix_is_titled_with_its_top_1_accuracy_in_percent(tmp_path):
    entry = results.load(write_results(tmp_path / "results")).having("confusion")[0]
    assert results.confusion_plot(entry).axes[0].get_title().endswith(", top-1 80.00 %")


def test_a_confusion_matrix_is_labelled_with_the_classes_its_own_file_names_not_the_page_models(tmp_path):
    from app.ui import _results_outputs
    (tmp_path / "eval.json").write_text(json.dumps({  # quant.evaluate's JSON, of a data set other than the models'
        "top1": 0.5, "per_class": {"circle": 1.0, "square": 0.0, "star": 0.5}, "confusion": np.eye(3).tolist()}))
    fig = _results_outputs(tmp_path)[6]["value"]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["circle", "square", "star"]


def test_a_confusion_matrix_whose_file_gives_per_class_as_a_list_is_numbered_not_labelled_by_its_values(tmp_path):
    from app.ui import _results_outputs
    (tmp_path / "eval.json").write_text(json.dumps({"top1": 0.5, "per_class": [1.0, 0.0, 0.5],
                                                    "confusion": np.eye(3).tolist()}))
    fig = _results_outputs(tmp_path)[6]["value"]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["0", "1", "2"]


@pytest.mark.parametrize("text", ["0", "65536", "http", "-1"])
def test_a_port_outside_1_to_65535_or_not_a_number_is_refused_by_the_port_type(text):
    import argparse
    from app.main import port
    with pytest.raises(argparse.ArgumentTypeError, match="expected a port number"):
        port(text)


def test_a_bracketed_ipv6_host_is_checked_as_its_address():
    import socket
    from app.main import check_port_free
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        free = s.getsockname()[1]
    check_port_free("[::1]", free)   # no error: the brackets are URL syntax, not part of the address


def _serve_in_process(monkeypatch, demo) -> None:
    """`app.main.main` then serves `demo`, a stand-in page, with no model loaded nor port checked."""
    import app.ui

    class Fp:
        name, runtime = "fp", "torch"
    monkeypatch.setattr("app.main.check_port_free", lambda host, number: None)
    monkeypatch.setattr("app.main.make_comparison", lambda *a, **k: (type("C", (), {"fp": Fp, "default": "q"}), ["q"], []))
    monkeypatch.setattr("app.main.open_default", lambda comparison, labels, skipped, explicit: labels)
    monkeypatch.setattr(app.ui, "build", lambda *a, **k: demo)


def test_an_unbracketed_ipv6_host_reaches_the_server_bracketed(monkeypatch):
    launched = {}

    class Demo:
        examples_dir, is_running = ".", False

        def queue(self, **kwargs):
            return self

        def launch(self, **kwargs):
            launched.update(kwargs)

        def close(self):
            pass

    _serve_in_process(monkeypatch, Demo())
    for host, expected in [("::1", "[::1]"), ("[::1]", "[::1]"), ("127.0.0.1", "127.0.0.1")]:
        assert run(main, ["--host", host]) == 0 and launched["server_name"] == expected


def test_the_app_stopped_by_ctrl_c_while_serving_closes_the_server_and_exits_130_not_0(monkeypatch):
    """gradio's own wait in launch catches Ctrl+C (and SIGTERM, which `run` turns into it) and returns: exit code 0."""
    closed = []

    class Demo:
        examples_dir, is_running = ".", True

        def queue(self, **kwargs):
            return self

        def launch(self, **kwargs):
            assert kwargs["prevent_thread_lock"]  # the app waits itself

        def close(self):
            closed.append(True)

    _serve_in_process(monkeypatch, Demo())
    monkeypatch.setattr("app.main.time.sleep", lambda s: (_ for _ in ()).throw(KeyboardInterrupt))  # Ctrl+C, serving
    assert run(main, []) == 130 and closed


def test_when_the_default_does_not_open_the_next_default_is_of_the_fp_models_architecture(assets):
    packed_other_architecture(assets)  # listed first
    damage(assets / "tiny_ternary.safetensors")
    cmp, labels, skipped = make_comparison(assets / "fp.safetensors", None, assets, runtime="torch")
    open_default(cmp, labels, skipped, explicit=False)
    assert cmp.default.startswith("int8 weights · int8 activations · tiny_int8")


def test_a_still_images_card_gives_images_per_second_from_its_median_latency():
    from app.ui import model_markdown
    card = model_markdown(fake_reading("q.safetensors", 50_000, [1, 2, 3]), 5.0, None, 10)
    assert "latency **5.00 ms** (median of 10 runs) · up to 200 images/s" in card


def test_a_models_card_after_one_frame_says_frame_not_frames():
    from app.ui import model_markdown
    card = model_markdown(fake_reading("q.safetensors", 50_000, [1, 2, 3]), last=4.0, median=4.0, n=1)
    assert "median of 1 frame ·" in card


def test_a_models_card_ends_with_its_backends_note():
    import dataclasses
    from app.ui import model_markdown
    r = fake_reading("q.safetensors", 50_000, [1, 2, 3])
    r = dataclasses.replace(r, backend=dataclasses.replace(r.backend, note="fell back to torch"))
    assert model_markdown(r, 5.0, None, 10).endswith("<br><small>fell back to torch</small>")


def test_the_summary_gives_the_frame_rate_when_there_is_one():
    from app.ui import summary_markdown
    fp, q = fake_reading("fp", 1000, [1, 2, 3]), fake_reading("q", 1000, [1, 2, 3])
    assert "frames/s" not in summary_markdown(fp, q, 3.0, 3.0, None, "median")
    assert summary_markdown(fp, q, 3.0, 3.0, 12.5, "median").endswith("\nprocessed **12.5 frames/s**, both models on "
                                                                       "every frame")


class StubComparison:
    """Both models on a frame, the FP model taking 6 ms and the quantized one 2 ms; records how it was asked to run."""
    default = "q"

    def __init__(self):
        self.calls = []

    def run(self, rgb, label, mirrored=False, frame_index=0, repeats=1):
        import dataclasses
        self.calls.append({"mirrored": mirrored, "frame_index": frame_index, "repeats": repeats})
        fp, q = fake_reading("fp", 4_000_000, [1, 2, 3]), fake_reading("q", 1_000_000, [1, 2, 3])
        return (np.zeros((S, S, 3), np.uint8), dataclasses.replace(fp, latency_ms=6.0),
                dataclasses.replace(q, latency_ms=2.0))


def test_the_live_handler_keeps_each_models_latencies_and_the_frame_rate_in_its_cards_and_summary(monkeypatch):
    import itertools
    from types import SimpleNamespace
    from app import live
    monkeypatch.setattr(live, "time", SimpleNamespace(perf_counter=itertools.count().__next__))   # a frame a second
    h, stats = Handlers(StubComparison()), LiveStats()
    for _ in range(2):
        _, _, fp_card, _, q_card, summary, stats = h.live(frame((8, 8, 3)), None, stats)
    assert list(stats.fp.ms) == [6.0, 6.0] and list(stats.quant.ms) == [2.0, 2.0]
    assert "**6.00 ms** median of 2 frames" in fp_card and "**2.00 ms** median of 2 frames" in q_card
    assert "3.00x faster" in summary and "processed **1.0 frames/s**" in summary


def test_the_live_handler_alternates_which_model_runs_first_and_flips_the_mirrored_webcam_back():
    cmp = StubComparison()
    h, stats = Handlers(cmp), LiveStats()
    for _ in range(3):
        stats = h.live(frame((8, 8, 3)), None, stats)[-1]
    assert [c["frame_index"] for c in cmp.calls] == [0, 1, 2] and all(c["mirrored"] for c in cmp.calls)


def test_an_uploaded_image_given_as_a_path_is_timed_over_ten_runs(tmp_path):
    cmp = StubComparison()
    Image.fromarray(frame((20, 20, 3))).save(tmp_path / "x.png")
    summary = Handlers(cmp).still(tmp_path / "x.png", None)[-1]
    assert [c["repeats"] for c in cmp.calls] == [10] and "(median of 10 runs latency)" in summary


def write_robustness(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / f"{name}.json").write_text(json.dumps({"fp_top1": 0.8, "n": 10, "trials": [
            {"bits": 2, "component": "w_qkv", "block": 0, "head": None, "drop": 1.0, "kl": 0.1}]}))
    return folder


def test_the_results_tab_opens_on_the_first_robustness_analysis_and_hides_what_it_has_nothing_for(tmp_path):
    from app.ui import _results_outputs
    out = _results_outputs(write_robustness(tmp_path / "results", "r1", "r2"))
    assert out[9]["choices"] == ["r1 (r1)", "r2 (r2)"] and out[9]["value"] == "r1 (r1)" and out[9]["visible"]
    assert out[10]["visible"] and out[10]["value"] is not None
    assert not any(out[i]["visible"] for i in (1, 2, 3, 4, 5, 6, 7, 8))


def test_picking_a_robustness_analysis_draws_that_one(tmp_path):
    from app.ui import _pick
    folder = write_robustness(tmp_path / "results", "r1", "r2")
    assert _pick(folder, "robustness", "r2 (r2)", lambda e: e.source)["value"] == "r2"
    assert not _pick(folder, "robustness", "gone (gone)", lambda e: e.source)["visible"]


def test_the_results_tab_draws_its_plots_once_while_the_results_files_stay_as_they_are(handlers, tmp_path,
                                                                                      monkeypatch):
    """Drawn again for every page load (and the menus' plots its load picks), they cost seconds of CPU a visitor."""
    import asyncio
    from gradio.state_holder import SessionState
    from app.ui import build
    folder = write_robustness(tmp_path / "results", "r1")
    demo = build(handlers.cmp, ["int8"], folder)
    load = next(fn for fn in demo.fns.values() if fn.targets and fn.targets[0][1] == "load")
    pick = next(fn for fn in demo.fns.values() if fn.inputs and fn.inputs[0].label == "robustness analysis of")
    reads, read = [], results.load
    monkeypatch.setattr(results, "load", lambda f: reads.append(f) or read(f))

    def visit():  # a page load: the tab's outputs, then the plot of the robustness menu's entry the load picked
        session = SessionState(demo)
        tab = asyncio.run(demo.process_api(block_fn=load, inputs=[], state=session))["data"]
        return tab, asyncio.run(demo.process_api(block_fn=pick, inputs=[tab[9]["value"]], state=session))["data"]
    first = visit()
    assert len(reads) == 2 and visit() == first and len(reads) == 2 and first[1][0]["value"] is not None
    write_robustness(folder, "r1", "r2")
    visit()
    assert len(reads) == 4


def _results_events(handlers, folder):
    """The page over results `folder` and a runner of its Results tab's events: "load", "click" (Reload) or a
    robustness analysis picked by label, each as Gradio runs it for a new visitor; its outputs."""
    import asyncio
    from gradio.state_holder import SessionState
    from app.ui import build
    demo = build(handlers.cmp, ["int8"], folder)
    fns = {fn.targets[0][1]: fn for fn in demo.fns.values() if fn.targets and fn.targets[0][1] in ("load", "click")}
    pick = next(fn for fn in demo.fns.values() if fn.inputs and fn.inputs[0].label == "robustness analysis of")

    def run(event):
        session = SessionState(demo)
        tab = asyncio.run(demo.process_api(block_fn=fns["load"], inputs=[], state=session))["data"]
        if event == "load":
            return tab
        fn, inputs = (fns[event], []) if event == "click" else (pick, [event])
        return asyncio.run(demo.process_api(block_fn=fn, inputs=inputs, state=session))["data"]
    return run


def test_reload_reads_the_results_files_again_though_they_stay_as_they_are(handlers, tmp_path, monkeypatch):
    """Reload is how a visitor has an allocation file a results file links to (not checked for changes) read again."""
    run = _results_events(handlers, write_robustness(tmp_path / "results", "r1"))
    reads, read = [], results.load
    monkeypatch.setattr(results, "load", lambda f: reads.append(f) or read(f))
    run("load")
    run("click")
    assert len(reads) == 2


def test_a_results_file_rewritten_in_place_is_read_again_at_the_next_page_load(handlers, tmp_path, monkeypatch):
    folder = write_robustness(tmp_path / "results", "r1")
    run = _results_events(handlers, folder)
    before = run("load")[10]["value"]
    data = json.loads((folder / "r1.json").read_text())
    data["trials"][0]["drop"] = 0.5  # the same name and size, another plot
    (folder / "r1.json").write_text(json.dumps(data))
    assert run("load")[10]["value"] != before


def test_each_robustness_analysis_picked_on_the_page_is_drawn(handlers, tmp_path):
    folder = write_robustness(tmp_path / "results", "r1", "r2")
    data = json.loads((folder / "r2.json").read_text())
    data["trials"][0]["drop"] = 0.5
    (folder / "r2.json").write_text(json.dumps(data))
    run = _results_events(handlers, folder)
    assert run("r1 (r1)")[0]["value"] != run("r2 (r2)")[0]["value"]



def test_each_results_plot_is_named_in_its_alt_text_not_undefined(handlers, tmp_path):
    """Gradio's page reads a plot's alt text as "<chart> plot visualising provided data": a screen reader's only
    name for the picture."""
    run = _results_events(handlers, write_robustness(tmp_path / "results", "r1"))
    where = "where the bits matter: one component quantized at a time"
    assert run("load")[10]["value"]["chart"] == where and run("r1 (r1)")[0]["value"]["chart"] == where


def test_the_models_view_and_the_uploaded_image_have_alt_text(handlers, tmp_path):
    props = {c["props"].get("elem_id"): c["props"] for c in build_page(handlers, tmp_path).config["components"]}
    for view in ("live-view", "still-view"):
        assert props[view]["alt_text"].startswith("the picture as the models see it: resized and centre-cropped to")
    assert props["still"]["alt_text"] == "the image to classify"


def test_the_drawn_examples_are_named_in_order_in_their_label(handlers, tmp_path):
    """Gradio gives an example's picture no alt text and its button no name."""
    labels = [c["props"].get("label") for c in build_page(handlers, tmp_path).config["components"]
              if c["type"] == "dataset"]
    assert labels == ["drawn examples (not CIFAR images): airplane, automobile, frog, ship, truck"]



def test_the_results_tab_shows_its_plots_before_the_list_of_files_they_were_drawn_from(handlers, tmp_path):
    """The list, a command and machine per file, runs a screen or more long: above the plots, it hid them."""
    components = build_page(handlers, tmp_path).config["components"]
    order = [c["props"].get("label") or c["props"].get("elem_id") for c in components]
    assert order.index("accuracy against bits per weight") < order.index("results-files")

def build_page(handlers, folder):
    from app.ui import build
    return build(handlers.cmp, ["int8"], folder)

def test_two_confusion_matrices_of_one_name_are_told_apart_in_the_menu_and_each_is_drawn_when_picked(tmp_path):
    from app.ui import _pick, _results_outputs
    (tmp_path / "r.json").write_text(json.dumps({"runs": [{"name": "w4", "top1": 0.5, "confusion": [[1, 0], [0, 1]]},
                                                          {"name": "w4", "top1": 0.6, "confusion": [[0, 1], [1, 0]]}]}))
    assert _results_outputs(tmp_path)[5]["choices"] == ["w4 (r)", "w4 (r) #2"]
    assert [_pick(tmp_path, "confusion", label, lambda e: e.top1)["value"] for label in ("w4 (r)", "w4 (r) #2")] == [
        0.5, 0.6]


def test_a_model_without_class_names_gives_its_classes_by_number():
    import dataclasses
    r = fake_reading("q", 1000, [1, 2, 3])
    r = dataclasses.replace(r, backend=dataclasses.replace(r.backend, config=dataclasses.replace(TINY, classes=())))
    assert list(r.top(2)) == ["class 2", "class 1"]


def test_a_meter_keeps_the_last_30_latencies_and_gives_their_median_and_the_latest():
    from app.live import Meter
    m = Meter()
    for ms in range(31):
        m.add(float(ms))
    assert list(m.ms) == [float(x) for x in range(1, 31)] and m.median == 15.5 and m.last == 30.0
    m = Meter()
    for ms in (1.0, 2.0, 10.0):
        m.add(ms)
    assert m.median == 2.0


def _ticked(monkeypatch, stamps: list[float]) -> LiveStats:
    """A LiveStats that saw one frame at each of `stamps` (seconds)."""
    from types import SimpleNamespace
    from app import live
    clock = iter(stamps)
    monkeypatch.setattr(live, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    stats = LiveStats()
    for _ in stamps:
        stats.tick()
    return stats


def test_the_frame_rate_is_over_the_last_30_frames(monkeypatch):
    stats = _ticked(monkeypatch, [10.0 * i for i in range(10)] + [100.0 + i for i in range(30)])  # slow, then 1/s
    assert stats.fps == pytest.approx(1.0) and stats.frames == 40


def test_the_frame_rate_of_a_webcam_stopped_and_started_again_does_not_count_the_pause(monkeypatch):
    stats = _ticked(monkeypatch, [0.05 * i for i in range(30)] + [100.0 + 0.05 * i for i in range(5)])  # 20/s, a pause
    assert stats.fps == pytest.approx(20.0) and stats.frames == 35


def test_the_frame_rate_counts_a_gap_of_under_a_second_though_over_ten_times_the_others(monkeypatch):
    stats = _ticked(monkeypatch, [0.05 * i for i in range(30)] + [2.25 + 0.05 * i for i in range(5)])  # a 0.8 s hiccup
    assert stats.fps == pytest.approx(29 / (2.45 - 0.25))


def test_a_pause_is_told_by_the_windows_usual_gap_not_by_one_slow_frame_in_it(monkeypatch):
    before = [0.05 * i for i in range(15)] + [1.5 + 0.05 * i for i in range(15)]  # 20 frames/s, a 0.8 s hiccup
    stats = _ticked(monkeypatch, before + [7.15 + 0.05 * i for i in range(5)])  # then a 5 s pause
    assert stats.fps == pytest.approx(20.0)


def test_a_comparison_needs_a_quantized_variant_and_a_default_among_them():
    log = []
    with pytest.raises(ValueError, match="no quantized variant"):
        Comparison(FakeBackend("fp", log), {})
    with pytest.raises(ValueError, match="unknown variant 'w9'"):
        Comparison(FakeBackend("fp", log), {"q": lambda: FakeBackend("q", log)}, default="w9")


def test_a_variant_taking_another_image_size_cannot_be_compared():
    log = []
    q = FakeBackend("q", log)
    q.config.img_size = 2 * S
    with pytest.raises(ValueError, match=f"takes {2 * S}x{2 * S} images.*cannot be compared"):
        Comparison(FakeBackend("fp", log), {"q": lambda: q}).variant("q")


def test_repeated_runs_report_the_median_not_the_mean_latency(monkeypatch):
    from types import SimpleNamespace
    from app import live
    log = []
    cmp = Comparison(FakeBackend("fp", log), {"q": lambda: FakeBackend("q", log)})
    cmp.variant("q")
    clock = iter([0, 0.001, 0.010, 0.012, 0.020, 0.029] * 2)             # 1, 2 and 9 ms for each model
    monkeypatch.setattr(live, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    _, fp_reading, q_reading = cmp.run(frame((40, 40, 3)), "q", repeats=3)
    assert fp_reading.latency_ms == pytest.approx(2) and q_reading.latency_ms == pytest.approx(2)


@pytest.mark.parametrize("logits", [(1.0, 2.0), (1.0, 2.0, 3.0, 4.0, 5.0)], ids=["fewer", "more"])
def test_a_variant_giving_other_than_one_score_per_class_is_refused_when_opened(logits):
    cmp = Comparison(FakeBackend("fp", []), {"q": lambda: FakeBackend("q", [], logits=logits)})
    with pytest.raises(ValueError, match=r"q gives scores of shape \(1, \d\) for one image, not \(1, 3\)"):
        cmp.variant("q")


def test_a_single_nan_score_is_refused():
    log = []
    cmp = Comparison(FakeBackend("fp", log), {"q": lambda: FakeBackend("q", log, logits=(1.0, float("nan"), 3.0))})
    with pytest.raises(ValueError, match="q gave NaN or infinite scores"):
        cmp.run(frame((40, 40, 3)), "q")


def test_an_onnx_export_of_a_newer_bitvit_format_is_left_out_of_the_menu_saying_so(tmp_path, tiny_model):
    import onnx
    from export.exporter import export
    path = export(tiny_model, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    next(p for p in proto.metadata_props if p.key == "format").value = "bitvit-onnx/2"
    onnx.save(proto, str(path))
    with pytest.raises(ValueError, match="written by a newer bitvit"):
        inspect_file(path)

