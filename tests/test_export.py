"""ONNX export: every format runs in ONNX Runtime and agrees with the torch model it came from."""
import copy
import json
import os
import re
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from export import runtime
from export.__main__ import main
from export.exporter import (FORMATS, OPS, STANDARD_FORMATS, export, model_format, quantize_for_export, to_onnx,
                             write_onnx)
from quant.cli import run
from quant.data import to_model_input
from quant.models import save_model
from quant.qlinear import QuantLinear
from quant.quantizers import WEIGHT_FORMATS

# (format, custom ops) -> max |logit difference| allowed, relative to the largest logit. Formats with
# int8 activations may round a few values differently after float reordering: a small tolerance.
CASES = {("fp32", True): 1e-5, ("fp16", True): 2e-2, ("w8a8", True): 5e-2, ("w8a8", False): 5e-2,
         ("w4a8", True): 5e-2, ("w4a8", False): 5e-2, ("int4", True): 1e-5,
         ("ternary", True): 5e-2, ("binary", True): 5e-2, ("ternary", False): 5e-2, ("binary", False): 5e-2}


pytestmark = pytest.mark.usefixtures("shared_ortops_cache")


def images(n, size=16, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt,custom", list(CASES))
def test_every_format_agrees_with_its_torch_model(tiny_model, tmp_path, fmt, custom):
    model = quantize_for_export(tiny_model, fmt)
    session = runtime.load(export(model, tmp_path / "m.onnx", fmt, custom), threads=2)
    x = images(16)
    with torch.no_grad():
        ref = model(x).numpy()
    out = session(x.numpy())
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 15 / 16
    assert np.abs(out - ref).max() <= CASES[fmt, custom] * np.abs(ref).max()
    assert session.uses_custom_ops == (custom and fmt in ("w8a8", "w4a8", "ternary", "binary"))


def every_linear_in(model, fmt: str, act_format: str):
    """A copy of `model` with every nn.Linear round-to-nearest `fmt`, one scale a row."""
    model = copy.deepcopy(model)
    for name in [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]:
        model.set_submodule(name, QuantLinear.from_linear(model.get_submodule(name), fmt, None, False, act_format))
    return model


def test_every_weight_format_bitvits_ops_run_also_exports_in_standard_ops():
    assert set(OPS) <= set(STANDARD_FORMATS) <= set(WEIGHT_FORMATS)  # the app falls back to them without the library


@pytest.mark.parametrize("fmt", STANDARD_FORMATS)
@pytest.mark.parametrize("act_format", ["none", "int8_token"])
def test_every_weight_format_standard_ops_export_agrees_with_its_torch_model(tiny_model, tmp_path, fmt, act_format):
    model = every_linear_in(tiny_model, fmt, act_format)
    session = runtime.load(export(model, tmp_path / "m.onnx", model_format(model), custom_ops=False), threads=2)
    x = images(8)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(session(x.numpy()) - ref).max() <= 5e-2 * np.abs(ref).max()


def test_a_weight_format_without_an_export_is_refused_naming_those_with_one(tiny_model):
    with pytest.raises(ValueError, match=r"weight format 'nf4' has no ONNX export \(the weight formats that export: "
                                         r"ternary, binary, int2, int4, int8\)"):
        to_onnx(every_linear_in(tiny_model, "nf4", "none"), "nf4", custom_ops=False)


def test_the_batch_is_dynamic(tiny_model, tmp_path):
    model = quantize_for_export(tiny_model, "ternary")
    session = runtime.load(export(model, tmp_path / "m.onnx", "ternary"))
    x = images(5)
    batched = session(x.numpy())
    assert batched.shape == (5, 3)
    np.testing.assert_allclose(session(x[2:3].numpy())[0], batched[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt,bits", [("ternary", 2), ("binary", 1), ("int4", 4)])
def test_quantized_weights_are_stored_packed_and_never_as_floats(tiny_model, fmt, bits):
    model = quantize_for_export(tiny_model, fmt)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in to_onnx(model, fmt).graph.initializer}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    packed = sum(a.nbytes for n, a in inits.items() if n.endswith(".packed"))
    assert packed <= sum(m.in_features * m.out_features for m in layers.values()) * bits / 8 * 1.1  # row padding
    for name, m in layers.items():
        floats = [a.size for n, a in inits.items() if n.startswith(name + ".") and a.dtype == np.float32]
        assert max(floats) < m.in_features * m.out_features  # scales and bias, no float weight copy


def test_integer_formats_use_integer_kernels(tiny_model):
    ops = lambda fmt, custom=True: {n.op_type for n in to_onnx(quantize_for_export(tiny_model, fmt), fmt, custom).graph.node}
    assert "Int8Linear" in ops("w8a8") and "MatMulInteger" in ops("w8a8", False)
    assert "Int4Linear" in ops("w4a8") and "MatMulNBits" in ops("w4a8", False)
    assert "MatMulNBits" in ops("int4")
    assert {"TernaryLinear"} <= ops("ternary") and "MatMulNBits" not in ops("ternary")
    assert "BinaryLinear" in ops("binary") and "BinaryLinear" not in ops("binary", False)


@pytest.mark.parametrize("fmt", ["w8a8", "w4a8", "ternary", "binary"])
def test_bitvits_op_nodes_record_their_layers_in_features(tiny_model, fmt):
    model = quantize_for_export(tiny_model, fmt)
    nodes = [n for n in to_onnx(model, fmt).graph.node if n.domain == "bitvit"]
    want = [m.in_features for m in model.modules() if isinstance(m, QuantLinear)]
    assert [helper.get_node_attr_value(n, "in_features") for n in nodes] == want


def test_a_bitnet_export_counts_the_parameters_of_its_layers_own_layernorms(tiny_model, tmp_path):
    from quant import bitlinear
    model = bitlinear.freeze(bitlinear.prepare(copy.deepcopy(tiny_model), "ternary")).eval()
    norms = sum(p.numel() for m in model.modules() if getattr(m, "input_norm", None) is not None
                for p in m.input_norm.parameters())
    export(model, tmp_path / "m.onnx", "ternary")
    assert norms > 0
    assert runtime.load(tmp_path / "m.onnx").weight_count == sum(p.numel() for p in tiny_model.parameters()) + norms


@pytest.mark.parametrize("fmt", ["ternary", "binary"])
@pytest.mark.parametrize("custom", [True, False])
def test_a_bitnet_models_layernorms_and_gelu_export_and_agree_with_torch(tiny_model, tmp_path, fmt, custom):
    from quant import bitlinear
    model = bitlinear.prepare(copy.deepcopy(tiny_model), fmt)
    bitlinear.init_input_norms(model, images(4))                 # LayerNorms that are not the identity
    model = bitlinear.freeze(model).eval()
    for blk in model.blocks:                                     # the block's LayerNorms apart from the layers' own
        blk.norm1.eps = blk.norm2.eps = 1e-3
    proto = to_onnx(model, fmt, custom)
    count = lambda op: sum(n.op_type == op for n in proto.graph.node)
    packed = [n for n in proto.graph.node if n.domain == "bitvit"]
    blocks = len(model.blocks)
    fp_gelus = sum(n.op_type == "Gelu" for n in to_onnx(tiny_model).graph.node)   # the stem's and one a block
    if custom:
        # bitvit's op runs the block's LayerNorm, the layer's own one and fc1's GELU around its matmul:
        # what stays is the final norm, and the conv stem's GELUs
        assert (len(packed), count("LayerNormalization"), count("Gelu")) == (4 * blocks, 1, fp_gelus - blocks)
        block_eps = model.blocks[0].norm1.eps
        (eps,) = {m.input_norm.eps for m in model.modules() if getattr(m, "input_norm", None) is not None}
        d, hidden = model.config.embed_dim, model.blocks[0].mlp.fc2.in_features
        want = {"qkv": {"epsilon": block_eps, "epsilon2": eps, "in_features": d},
                "proj": {"epsilon": eps, "in_features": d},
                "fc1": {"epsilon": block_eps, "epsilon2": eps, "activation": b"gelu", "in_features": d},
                "fc2": {"epsilon": eps, "in_features": hidden}}
        for n in packed:
            layer = want[n.input[1].split(".")[-2]]
            assert len(n.input) == 4 + 2 * sum(k.startswith("eps") for k in layer)
            assert {a.name: helper.get_attribute_value(a) for a in n.attribute} == pytest.approx(layer)
    else:
        assert (len(packed), count("LayerNormalization"), count("Gelu")) == (0, 6 * blocks + 1, fp_gelus)
    onnx.save(proto, tmp_path / "m.onnx")
    x = images(16, seed=1)
    with torch.no_grad():
        ref = model(x).numpy()
    out = runtime.load(tmp_path / "m.onnx")(x.numpy())
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 15 / 16
    assert np.abs(out - ref).max() <= 5e-2 * np.abs(ref).max()


def test_a_float_model_is_not_written_as_a_quantized_format(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="quantize it first"):
        export(tiny_model, tmp_path / "m.onnx", "ternary")
    with pytest.raises(ValueError, match="unknown format"):
        to_onnx(tiny_model, "int5")


def test_an_export_that_fails_while_writing_leaves_no_half_written_file(tiny_model, tmp_path, monkeypatch):
    (tmp_path / "m.onnx").write_bytes(b"an older export")

    def save_half(proto, path, **kw):
        with open(path, "wb") as f:
            f.write(proto.SerializeToString()[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save", save_half)
    with pytest.raises(OSError):
        export(tiny_model, tmp_path / "m.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert (tmp_path / "m.onnx").read_bytes() == b"an older export"


def test_a_graph_onnxs_checker_rejects_is_refused_and_not_written(tiny_model, tmp_path):
    proto = to_onnx(tiny_model, "fp32")
    proto.graph.node[0].op_type = "NoSuchOp"  # no file ONNX Runtime would load
    with pytest.raises(onnx.checker.ValidationError, match="No Op registered for NoSuchOp"):
        write_onnx(proto, tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


def test_the_graph_builder_refuses_a_format_the_model_is_not_in(tiny_model):
    with pytest.raises(ValueError, match="quantize it first"):
        to_onnx(tiny_model, "ternary")
    with pytest.raises(ValueError, match="holds w8a8 weights, so it exports as w8a8, not fp16"):
        to_onnx(quantize_for_export(tiny_model, "w8a8"), "fp16")


@pytest.mark.parametrize("fmt", ["fp32", "w8a8"])
def test_a_model_on_the_meta_device_is_refused_rather_than_crashing_midway(tiny_model, tmp_path, fmt):
    model = (quantize_for_export(tiny_model, fmt) if fmt != "fp32" else tiny_model).to("meta")
    with pytest.raises(ValueError, match="is on the meta device, without values: load its weights before exporting"):
        export(model, tmp_path / "m.onnx", fmt)
    assert not (tmp_path / "m.onnx").exists()


def test_rounding_a_model_on_the_meta_device_for_export_is_refused_naming_a_tensor_without_values(tiny_model):
    with pytest.raises(ValueError, match="is on the meta device, without values: load its weights before quantizing"):
        quantize_for_export(tiny_model.to("meta"), "w8a8")


def test_exporting_leaves_a_model_in_training_mode_as_it_was(tiny_model, tmp_path):
    tiny_model.train()
    export(tiny_model, tmp_path / "m.onnx")
    tiny_model.blocks[0].mlp.act = torch.nn.GELU(approximate="tanh")
    with pytest.raises(ValueError, match="only exact GELU"):
        to_onnx(tiny_model)
    assert all(m.training for m in tiny_model.modules())


@pytest.mark.parametrize("act_format, fmt, custom", [("int8_token", "w8a8", True), ("int8_token", "w8a8", False),
                                                     ("none", "int8", True)])
def test_int8_weights_with_zero_points_are_refused_not_exported_without_them(tiny_model, tmp_path, act_format,
                                                                             fmt, custom):
    import quant
    model = quant.quantize(copy.deepcopy(tiny_model), quant.recipe("w8a8", asymmetric=True, act_format=act_format))
    with pytest.raises(ValueError, match="blocks.0.attn.qkv: int8 weights with zero points have no ONNX Runtime"):
        export(model, tmp_path / "m.onnx", fmt, custom)


def test_the_session_knows_the_preprocessing_the_model_expects(tiny_model, tmp_path):
    session = runtime.load(export(tiny_model, tmp_path / "m.onnx"))
    cfg = tiny_model.config
    assert (session.classes, session.image_size, session.format) == (cfg.classes, 16, "fp32")
    imgs = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_allclose(session.preprocess(imgs), to_model_input(imgs, cfg.mean, cfg.std).numpy(), atol=1e-6)
    with torch.no_grad():
        ref = tiny_model(to_model_input(imgs, cfg.mean, cfg.std)).numpy()
    np.testing.assert_allclose(session.predict(imgs), ref, atol=1e-4)
    assert session.preprocess(np.zeros((40, 30, 3), np.uint8)).shape == (1, 3, 16, 16)  # resized


def test_sessions_let_their_worker_threads_sleep_between_calls_unless_asked_to_spin(tiny_model, tmp_path):
    path = export(tiny_model, tmp_path / "m.onnx")
    for kwargs, want in (({}, "0"), ({"spinning": True}, "1")):
        options = runtime.load(path, **kwargs).session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == want


def test_input_of_the_wrong_shape_or_type_is_refused(tiny_model, tmp_path):
    session = runtime.load(export(tiny_model, tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match=r"expected float32 input \(B, 3, 16, 16\)"):
        session(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="uint8 RGB"):
        session.preprocess(np.zeros((16, 16), np.uint8))


@pytest.mark.parametrize("x", [torch.zeros(1, 3, 16, 16, dtype=torch.bfloat16),
                               torch.zeros(1, 3, 16, 16).requires_grad_()], ids=["bfloat16", "requires-grad"])
def test_a_torch_tensor_numpy_cannot_read_is_refused_as_input_of_the_wrong_type(tiny_model, tmp_path, x):
    session = runtime.load(export(tiny_model, tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match=r"expected float32 input \(B, 3, 16, 16\) .* got a Tensor NumPy cannot read"):
        session(x)


def test_missing_corrupt_and_foreign_files_are_refused(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError):
        runtime.load(tmp_path / "none.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="not a readable ONNX model|not a bitvit ONNX export"):
        runtime.load(tmp_path / "junk.onnx")
    foreign = helper.make_model(helper.make_graph([], "g", [], []), ir_version=10)
    onnx.save(foreign, tmp_path / "foreign.onnx")
    with pytest.raises(ValueError, match="not a bitvit ONNX export"):
        runtime.load(tmp_path / "foreign.onnx")
    broken = to_onnx(tiny_model)
    broken.graph.node[3].input[0] = "no_such_tensor"
    onnx.save(broken, tmp_path / "broken.onnx")
    with pytest.raises(ValueError, match="ONNX Runtime cannot load"):
        runtime.load(tmp_path / "broken.onnx")


def test_onnx_runtimes_refusal_reads_as_one_line_without_its_cpp_source_location(tiny_model, tmp_path):
    newer = to_onnx(tiny_model)
    newer.ir_version = 99  # as written by an onnx newer than this onnxruntime
    onnx.save(newer, tmp_path / "newer.onnx")
    with pytest.raises(ValueError, match="ONNX Runtime cannot load .*IR version") as e:
        runtime.load(tmp_path / "newer.onnx")
    assert "onnxruntime_src" not in str(e.value) and "\n" not in str(e.value)


def test_onnx_runtimes_refusal_of_a_graph_without_its_output_reads_without_its_cpp_source_location(tiny_model,
                                                                                                  tmp_path):
    headless = to_onnx(tiny_model)
    del headless.graph.node[-1]  # the node writing "logits": ORT names a function with its return type ("void ...")
    onnx.save(headless, tmp_path / "headless.onnx")
    with pytest.raises(ValueError, match="ONNX Runtime cannot load .*logits") as e:
        runtime.load(tmp_path / "headless.onnx")
    assert "onnxruntime_src" not in str(e.value)


def test_onnx_runtimes_refusals_lose_a_signature_with_a_return_type_and_a_bare_source_location(tiny_model, tmp_path):
    unreleased = to_onnx(tiny_model)
    next(o for o in unreleased.opset_import if o.domain == "").version = 99  # "void onnxruntime::...(...)"
    cut = to_onnx(tiny_model)
    cut.graph.initializer[0].raw_data = cut.graph.initializer[0].raw_data[:4]  # "tensorprotoutils.cc:N Fn"
    for name, proto, says in (("unreleased", unreleased, "Opset 99"), ("cut", cut, "raw_data size")):
        onnx.save(proto, tmp_path / f"{name}.onnx")
        with pytest.raises(ValueError, match=says) as e:
            runtime.load(tmp_path / f"{name}.onnx")
        assert not re.search(r"onnxruntime_src|onnxruntime::|\.cc:\d", str(e.value)), str(e.value)


def test_onnx_runtimes_refusal_of_a_matmulnbits_scale_count_loses_its_lambdas_source_location(tiny_model, tmp_path):
    proto = to_onnx(quantize_for_export(tiny_model, "int4"), "int4")
    scales = next(t for t in proto.graph.initializer if t.name.endswith(".scales"))  # "matmul_nbits.cc:N operator()"
    scales.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scales)[:-1].copy(), scales.name))
    onnx.save(proto, tmp_path / "short.onnx")
    with pytest.raises(ValueError, match="MatMulNBits PrePack: scales initializer shape") as e:
        runtime.load(tmp_path / "short.onnx")
    assert not re.search(r"\.cc:\d|operator\(\)", str(e.value)), str(e.value)

def test_a_file_importing_a_later_version_of_bitvits_ops_is_refused_not_run_as_version_1(tiny_model, tmp_path):
    proto = to_onnx(quantize_for_export(tiny_model, "ternary"), "ternary")
    next(o for o in proto.opset_import if o.domain == "bitvit").version = 2  # ONNX Runtime runs it as version 1
    onnx.save(proto, tmp_path / "v.onnx")
    with pytest.raises(ValueError, match="imports version 2 of bitvit's ops; .* implements version 1"):
        runtime.load(tmp_path / "v.onnx")


def test_a_graph_that_disagrees_with_its_metadata_is_refused_when_loaded(tiny_model, tmp_path):
    resized = to_onnx(tiny_model)
    resized.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 64
    onnx.save(resized, tmp_path / "resized.onnx")
    foreign = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])], "g",
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in "ab"],
        [helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [1])]), ir_version=10,
        opset_imports=[helper.make_opsetid("", 17)])
    foreign.metadata_props.extend(to_onnx(tiny_model).metadata_props)  # a foreign graph, bitvit's label
    onnx.save(foreign, tmp_path / "foreign.onnx")
    lies = (("embed_dim", 1 << 20), ("depth", 40), ("mlp_ratio", 8.0), ("stem_channels", [64, 64]))
    for key, value in lies:  # the app counts parameters from the metadata
        lying = to_onnx(tiny_model)
        meta = next(p for p in lying.metadata_props if p.key == "bitvit.config")
        meta.value = json.dumps({**json.loads(meta.value), key: value})
        onnx.save(lying, tmp_path / f"{key}.onnx")
    for name in ("resized.onnx", "foreign.onnx", *(f"{key}.onnx" for key, _ in lies)):
        with pytest.raises(ValueError, match="does not match its bitvit metadata"):
            runtime.load(tmp_path / name)


def test_a_file_whose_metadata_names_fewer_classes_than_its_head_on_bitvits_op_scores_is_refused(tiny_model,
                                                                                                  tmp_path):
    # ONNX Runtime infers no shape through bitvit's op: the graph output's declared width was believed
    lying = to_onnx(quantize_for_export(tiny_model, "w8a8"), "w8a8")
    meta = next(p for p in lying.metadata_props if p.key == "bitvit.config")
    meta.value = json.dumps({**json.loads(meta.value), "num_classes": 2, "classes": ["cat", "dog"]})
    lying.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 2
    onnx.save(lying, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"does not match its bitvit metadata: head.bias \[3\], the metadata says \[2\]"):
        runtime.load(tmp_path / "m.onnx")


@pytest.mark.parametrize("dtype, kind", [(onnx.TensorProto.FLOAT16, "float16"), (onnx.TensorProto.DOUBLE, "double")])
def test_a_graph_taking_other_than_float32_images_is_refused_when_loaded_not_at_its_first_call(tiny_model, tmp_path,
                                                                                               dtype, kind):
    proto = to_onnx(tiny_model)
    for node in proto.graph.node:  # a converter's float16 (or double) input, cast to float inside
        node.input[:] = ["image32" if name == "image" else name for name in node.input]
    proto.graph.node.insert(0, helper.make_node("Cast", ["image"], ["image32"], to=onnx.TensorProto.FLOAT))
    proto.graph.input[0].type.tensor_type.elem_type = dtype
    onnx.save(proto, tmp_path / "half.onnx")
    with pytest.raises(ValueError, match=rf"half.onnx's graph takes {kind} images; bitvit feeds float32"):
        runtime.load(tmp_path / "half.onnx")


def test_a_graph_whose_attention_splits_another_number_of_heads_than_its_metadata_is_refused(tiny_model, tmp_path):
    proto = to_onnx(tiny_model)
    mha = next(n for n in proto.graph.node if n.op_type == "MultiHeadAttention")
    next(a for a in mha.attribute if a.name == "num_heads").i = 1   # a divisor of the width: it would run
    onnx.save(proto, tmp_path / "heads.onnx")
    with pytest.raises(ValueError, match=r"attention with \[1\] heads, the metadata says 2"):
        runtime.load(tmp_path / "heads.onnx")


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "ternary"])
def test_a_file_with_a_non_finite_weight_or_scale_is_refused_when_loaded(tiny_model, tmp_path, fmt):
    proto = to_onnx(quantize_for_export(tiny_model, fmt), fmt)
    kind, dtype = (onnx.TensorProto.FLOAT16, np.float16) if fmt == "fp16" else (onnx.TensorProto.FLOAT, np.float32)
    t = next(t for t in proto.graph.initializer if t.data_type == kind and "blocks.0" in t.name)
    t.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(t).shape, np.nan, dtype), t.name))
    onnx.save(proto, tmp_path / "nan.onnx")
    with pytest.raises(ValueError, match=f"nan.onnx: weight '{t.name}' holds NaN"):
        runtime.load(tmp_path / "nan.onnx")


def test_a_file_without_its_model_config_is_refused(tiny_model, tmp_path):
    model = to_onnx(tiny_model)
    kept = [p for p in model.metadata_props if p.key != "bitvit.config"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="no readable bitvit.config"):
        runtime.load(tmp_path / "m.onnx")


@pytest.mark.parametrize("count", ["-5", "0", "1_000", "many", "9" * 5000])
def test_a_parameter_count_in_the_metadata_that_is_not_a_positive_count_is_refused(tiny_model, tmp_path, count):
    model = to_onnx(tiny_model)
    next(p for p in model.metadata_props if p.key == "bitvit.parameters").value = count
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=f"bitvit.parameters metadata is not a count: '{count}'"):
        runtime.load(tmp_path / "m.onnx")


def test_empty_batches_empty_images_and_non_finite_inputs_are_refused(tiny_model, tmp_path):
    session = runtime.load(export(tiny_model, tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match="B >= 1"):
        session(np.zeros((0, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        session(np.full((1, 3, 16, 16), np.nan, np.float32))
    for empty in (np.zeros((0, 0, 3), np.uint8), np.zeros((0, 20, 20, 3), np.uint8)):
        with pytest.raises(ValueError, match="at least one image"):
            session.predict(empty)


def test_a_graph_that_fails_when_run_gives_one_message(tiny_model, tmp_path):
    proto = to_onnx(quantize_for_export(tiny_model, "ternary"), "ternary")
    packed = next(t for t in proto.graph.initializer if t.name.endswith(".packed"))
    packed.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(packed)[:, :-1].copy(), packed.name))
    onnx.save(proto, tmp_path / "cut.onnx")
    session = runtime.load(tmp_path / "cut.onnx")   # loads: the op checks its weights' size when it runs
    with pytest.raises(ValueError, match="ONNX Runtime could not run"):
        session(np.zeros((1, 3, 16, 16), np.float32))


def test_a_model_whose_finite_weights_overflow_to_nan_logits_is_refused_not_scored(tiny_model, tmp_path):
    proto = to_onnx(quantize_for_export(tiny_model, "ternary"), "ternary")
    scales = next(t for t in proto.graph.initializer if t.name.endswith(".scales"))
    scales.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scales) * np.float32(1e30), scales.name))
    onnx.save(proto, tmp_path / "loud.onnx")
    session = runtime.load(tmp_path / "loud.onnx")  # finite, so it loads
    with pytest.raises(ValueError, match="gives NaN or infinite logits for finite images"):
        session(np.zeros((1, 3, 16, 16), np.float32))


def test_a_pipe_is_refused_as_not_a_regular_file_not_as_missing(tmp_path):
    os.mkfifo(tmp_path / "pipe.onnx")
    with pytest.raises(ValueError, match="pipe.onnx is not a regular file; give an ONNX file"):
        runtime.load(tmp_path / "pipe.onnx")


def test_a_folder_an_empty_file_and_an_impossible_thread_count_are_refused_by_name(tiny_model, tmp_path):
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(ValueError, match="is a folder, not an ONNX file"):
        runtime.load(tmp_path / "dir.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty, not an ONNX model"):
        runtime.load(tmp_path / "empty.onnx")
    with pytest.raises(ValueError, match="threads must be an integer"):
        runtime.load(export(tiny_model, tmp_path / "m.onnx"), threads=2**40)


def test_a_numpy_thread_count_is_taken_and_a_spinning_flag_that_is_not_a_bool_is_refused(tiny_model, tmp_path):
    path = export(tiny_model, tmp_path / "m.onnx")
    assert runtime.load(path, threads=np.int64(1)).session.get_session_options().intra_op_num_threads == 1
    for spinning in ("false", "no", 0, None):
        with pytest.raises(ValueError, match=f"spinning must be True or False, got {spinning!r}"):
            runtime.load(path, spinning=spinning)

def test_a_quantized_model_is_exported_only_as_the_format_it_holds(tiny_model, tmp_path):
    ternary = quantize_for_export(tiny_model, "ternary")
    with pytest.raises(ValueError, match="holds ternary weights, so it exports as ternary, not w8a8 \\(re-quantize"):
        export(ternary, tmp_path / "m.onnx", "w8a8")


def test_a_quantized_model_of_a_format_without_export_asked_for_another_says_it_has_none(tiny_model, tmp_path):
    import quant
    with pytest.raises(ValueError, match="weight format 'int3' has no ONNX export"):  # not "it exports as int3"
        export(quant.quantize(tiny_model, "w3"), tmp_path / "m.onnx", "int4")


def test_a_model_still_in_quantization_aware_training_is_refused_until_packed(tiny_model, tmp_path):
    import quant
    with pytest.raises(ValueError, match="quantization-aware training layers: pack them first"):
        export(quant.quantize(tiny_model, "w1.58a8"), tmp_path / "m.onnx", "fp32")


def test_quantize_for_export_refuses_a_model_in_quantization_aware_training_rather_than_round_its_latent_weights(
        tiny_model):
    import quant
    with pytest.raises(ValueError, match="quantization-aware training layers: pack them first"):
        quantize_for_export(quant.quantize(tiny_model, "w1.58a8"), "ternary")  # BitLinear is an nn.Linear


def test_quantize_for_export_refuses_a_model_in_lsq_training_too(tiny_model):
    import quant
    with pytest.raises(ValueError, match="quantization-aware training layers: pack them first"):
        quantize_for_export(quant.quantize(tiny_model, "lsq"), "w8a8")  # Q-ViT's LSQLinear, an nn.Linear too


def test_a_model_on_bitvits_kernels_is_refused_naming_the_quantlinear_model_to_export(tiny_model, tmp_path):
    import quant
    from cuda_ops import to_kernels
    model = to_kernels(quant.quantize(tiny_model, "w4a8"))  # its layers count as no format: "fp32" was let through
    with pytest.raises(ValueError, match="runs on bitvit's kernels .* export the QuantLinear model it was made from"):
        export(model, tmp_path / "m.onnx", "fp32")


def test_a_half_precision_model_is_refused_in_favour_of_the_fp16_format(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="export the float32 model"):
        export(copy.deepcopy(tiny_model).half(), tmp_path / "m.onnx", "fp16")


@pytest.mark.parametrize("custom_ops", ["False", 0, None])
def test_a_custom_ops_flag_that_is_not_a_bool_is_refused_rather_than_read_as_true_or_false(tiny_model, tmp_path,
                                                                                          custom_ops):
    with pytest.raises(ValueError, match="custom_ops must be True or False"):
        export(quantize_for_export(tiny_model, "ternary"), tmp_path / "m.onnx", "ternary", custom_ops)
    assert not (tmp_path / "m.onnx").exists()


def test_a_numpy_bool_custom_ops_flag_is_taken_as_the_bool_it_is(tiny_model, tmp_path):
    export(quantize_for_export(tiny_model, "ternary"), tmp_path / "m.onnx", "ternary", np.bool_(False))
    assert not any(n.domain == "bitvit" for n in onnx.load(tmp_path / "m.onnx").graph.node)


def test_an_unknown_format_to_quantize_for_is_refused_by_name(tiny_model):
    with pytest.raises(ValueError, match="unknown format 'ternery'"):
        quantize_for_export(tiny_model, "ternery")


def test_predict_takes_a_list_of_images_of_different_sizes(tiny_model, tmp_path):
    session = runtime.load(export(tiny_model, tmp_path / "m.onnx"))
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (16, 16, 3), np.uint8), rng.integers(0, 256, (40, 30, 3), np.uint8)
    np.testing.assert_allclose(session.predict([a, b]), np.concatenate([session.predict(a), session.predict(b)]),
                               rtol=1e-5, atol=1e-5)


def test_the_cli_refuses_a_folder_as_output_before_exporting(tiny_model, tmp_path, capsys):
    save_model(tiny_model, tmp_path / "fp.safetensors")
    assert run(main, ["--checkpoint", str(tmp_path / "fp.safetensors"), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.onnx"))


def test_the_cli_exports_and_checks_against_torch(tiny_model, tmp_path, capsys):
    save_model(tiny_model, tmp_path / "fp.safetensors")
    assert run(main, ["--checkpoint", str(tmp_path / "fp.safetensors"), "--out", str(tmp_path / "t.onnx"),
                      "--format", "ternary"]) == 0
    captured = capsys.readouterr()
    assert "ternary" in captured.out and "custom ops: bitvit" in captured.out and "top-1 agreement" in captured.out
    assert runtime.load(tmp_path / "t.onnx").format == "ternary"
    assert "without training loses much of its accuracy" in captured.err  # rounded, not trained: said so


def test_the_cli_says_it_is_checking_before_the_silent_torch_forward_of_the_check(tiny_model, tmp_path, monkeypatch,
                                                                                capsys):
    from export import __main__ as cli
    said = []  # stdout when the check began (ViT-B's torch forward on 8 images: a minute)
    monkeypatch.setattr(cli, "load", lambda *a, **kw: said.append(capsys.readouterr().out) or runtime.load(*a, **kw))
    save_model(tiny_model, tmp_path / "fp.safetensors")
    assert run(main, ["--checkpoint", str(tmp_path / "fp.safetensors"), "--out", str(tmp_path / "t.onnx"),
                      "--format", "w8a8"]) == 0
    assert f"checking {tmp_path / 't.onnx'} against torch on 8 random images" in said[0]
    assert "rounding" in said[0]


@pytest.mark.parametrize("fmt, said_before", [("w8a8", "rounding {} to w8a8...\n"), ("fp32", "")])
def test_the_cli_says_it_is_rounding_before_the_silent_rounding_and_not_for_an_fp32_export(
        tiny_model, tmp_path, monkeypatch, capsys, fmt, said_before):
    from export import __main__ as cli
    said = []  # stdout when the rounding began (ViT-B's 86 M weights: half a minute); fp32 rounds nothing
    real = cli.quantize_for_export
    monkeypatch.setattr(cli, "quantize_for_export", lambda *a: said.append(capsys.readouterr().out) or real(*a))
    save_model(tiny_model, tmp_path / "fp.safetensors")
    assert run(main, ["--checkpoint", str(tmp_path / "fp.safetensors"), "--out", str(tmp_path / "t.onnx"),
                      "--format", fmt, "--standard-ops"]) == 0
    assert said == [said_before.format(tmp_path / "fp.safetensors")]
    assert "rounding" not in capsys.readouterr().out


def test_the_cli_looks_up_bitvits_op_library_once(tiny_model, tmp_path, monkeypatch):
    from export import ortops
    asked = []  # each lookup runs g++ --version and hashes the source and headers
    lookup = lambda: asked.append(1) or ortops.library_path()  # noqa: E731
    monkeypatch.setattr("export.__main__.library_path", lookup)
    monkeypatch.setattr(runtime, "library_path", lookup)
    save_model(tiny_model, tmp_path / "fp.safetensors")
    assert run(main, ["--checkpoint", str(tmp_path / "fp.safetensors"), "--out", str(tmp_path / "t.onnx"),
                      "--format", "w8a8"]) == 0
    assert asked == [1]


@pytest.mark.parametrize("env, why", [("CXX", "no C++ compiler"), ("BITVIT_ORTOPS_CACHE", "Not a directory")])
def test_the_cli_where_bitvit_ops_cannot_be_built_writes_the_export_and_says_it_is_unchecked(
        tiny_model, tmp_path, monkeypatch, capsys, env, why):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("BITVIT_ORTOPS_CACHE", str(tmp_path / "empty"))  # no library built earlier to load
    monkeypatch.setenv(env, {"CXX": "no-such-compiler", "BITVIT_ORTOPS_CACHE": str(tmp_path / "file" / "c")}[env])
    save_model(tiny_model, tmp_path / "fp.safetensors")
    assert run(main, ["--checkpoint", str(tmp_path / "fp.safetensors"), "--out", str(tmp_path / "t.onnx"),
                      "--format", "w8a8"]) == 0
    err = capsys.readouterr().err
    assert "t.onnx: w8a8" in err and "not checked against torch" in err and why in err
    assert runtime.read_onnx(tmp_path / "t.onnx").graph.node


def test_the_cli_on_windows_advises_standard_ops_once(tiny_model, tmp_path, monkeypatch, capsys):
    from export import __main__ as cli, ortops

    def library_path_on_windows():  # only there: torch imports lazily what Linux's sys.platform finds
        with monkeypatch.context() as m:
            m.setattr(sys, "platform", "win32")
            return ortops.library_path()  # refused, naming --standard-ops itself
    monkeypatch.setattr(cli, "library_path", library_path_on_windows)
    save_model(tiny_model, tmp_path / "fp.safetensors")
    assert run(main, ["--checkpoint", str(tmp_path / "fp.safetensors"), "--out", str(tmp_path / "t.onnx"),
                      "--format", "ternary"]) == 0
    err = capsys.readouterr().err
    assert "not on Windows" in err and err.count("--standard-ops") == 1


def test_the_cli_offline_without_onnx_runtimes_headers_writes_the_export_and_says_it_is_unchecked(
        tiny_model, tmp_path, monkeypatch, capsys):
    from export import ortops

    def offline(dest):
        raise ValueError("downloading ONNX Runtime's headers (Debian trixie libonnxruntime-dev) failed (exit 100):\n"
                         "E: Failed to fetch")
    monkeypatch.setattr(ortops, "_fetch_headers", offline)
    monkeypatch.setenv("BITVIT_ORTOPS_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("ORT_INCLUDE_DIR", raising=False)
    save_model(tiny_model, tmp_path / "fp.safetensors")
    assert run(main, ["--checkpoint", str(tmp_path / "fp.safetensors"), "--out", str(tmp_path / "t.onnx"),
                      "--format", "ternary"]) == 0
    err = capsys.readouterr().err
    assert "t.onnx: ternary" in err and "not checked against torch" in err and "Failed to fetch" in err


def test_the_cli_reports_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    assert run(main, ["--checkpoint", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert capsys.readouterr().err.startswith("error: no such model file")


def test_formats_listed_are_all_tested():
    assert {f for f, _ in CASES} == set(FORMATS)


@pytest.mark.parametrize("name", ["w4", "w8a8", "w4a8"])
def test_a_quant_core_model_exports_as_the_format_most_of_its_weights_hold(tiny_model, tmp_path, name):
    import quant
    model = quant.quantize(tiny_model, name)                    # w4 keeps the head at int8
    quant.save_quantized(model, tmp_path / "q.safetensors")
    assert run(main, ["--checkpoint", str(tmp_path / "q.safetensors"), "--out", str(tmp_path / "q.onnx")]) == 0
    session = runtime.load(tmp_path / "q.onnx")
    assert session.format == {"w4": "int4", "w8a8": "w8a8", "w4a8": "w4a8"}[name]
    x = images(8)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(session(x.numpy()) - ref).max() <= 5e-2 * np.abs(ref).max()


def test_a_quantized_checkpoint_is_not_exported_as_another_format(tiny_model, tmp_path, capsys):
    import quant
    quant.save_quantized(quant.quantize(tiny_model, "w4"), tmp_path / "q.safetensors")
    assert run(main, ["--checkpoint", str(tmp_path / "q.safetensors"), "--out", str(tmp_path / "q.onnx"),
                      "--format", "ternary"]) == 2
    assert "holds int4 weights, so it exports as int4, not ternary" in capsys.readouterr().err


def test_a_quantized_checkpoint_asked_for_a_float_format_is_told_to_export_its_fp_model(tiny_model, tmp_path, capsys):
    import quant
    quant.save_quantized(quant.quantize(tiny_model, "w8a8"), tmp_path / "q.safetensors")
    assert run(main, ["--checkpoint", str(tmp_path / "q.safetensors"), "--out", str(tmp_path / "q.onnx"),
                      "--format", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "not fp16 (export its full-precision model as fp16)" in err and "re-quantize" not in err


def test_a_quantized_checkpoint_of_a_format_without_export_asked_for_another_says_it_has_none(
        tiny_model, tmp_path, capsys):
    import quant
    quant.save_quantized(quant.quantize(tiny_model, "w3"), tmp_path / "q.safetensors")
    assert run(main, ["--checkpoint", str(tmp_path / "q.safetensors"), "--out", str(tmp_path / "q.onnx"),
                      "--format", "int4"]) == 2
    assert "weight format 'int3' has no ONNX export" in capsys.readouterr().err  # not "it exports as int3"


@pytest.mark.parametrize("k", [64, 40])
@pytest.mark.parametrize("fmt", ["ternary", "binary", "w8a8", "w4a8", "int4", "w4a8-g32"])
@pytest.mark.parametrize("custom", [True, False])
def test_one_exported_layer_computes_its_torch_forward_on_off_centre_tokens_and_an_all_zero_one(fmt, custom, k):
    # in a ViT, LayerNorms feed qkv/fc1/head zero-mean tokens, which hide a constant offset in the weight codes;
    # an all-zero token has per-token scale 0, its output the bias (not 0 / 0)
    import onnxruntime as ort
    from export.exporter import RECIPES, _Graph, _linear
    from export.ortops import library_path
    torch.manual_seed(0)
    recipe = RECIPES[fmt] if fmt in RECIPES else dict(RECIPES["w4a8"], group_size=32)  # scales bitvit's op cannot take
    layer = QuantLinear.from_linear(torch.nn.Linear(k, 8), **recipe)
    g = _Graph()
    g.op("Identity", [_linear(g, "x", layer, "l", custom)], out="y")
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, k])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 8])], g.inits)
    proto = helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("bitvit", 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(library_path()))
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(1)) + 1.0
    x[3] = 0
    out = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        ["y"], {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = layer(x).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("fmt", ["w8a8", "ternary"])
def test_the_standard_ops_round_activations_halfway_between_two_codes_to_the_even_one(fmt):
    import onnxruntime as ort
    from export.exporter import RECIPES, _Graph, _linear
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(8, 4), **RECIPES[fmt])
    g = _Graph()
    g.op("Identity", [_linear(g, "x", layer, "l", False)], out="y")
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], g.inits)
    proto = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 20),
                                                                   helper.make_opsetid("com.microsoft", 1)])
    x = torch.tensor([[127.0, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5, 0.0]])     # token scale 1: six ties
    out = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["y"], {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = layer(x).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("fmt", ["ternary", "binary"])
@pytest.mark.parametrize("custom", [True, False])
def test_ternary_and_binary_weights_with_a_scale_per_group_export_every_groups_scale(tiny_model, tmp_path, fmt,
                                                                                    custom):
    model = copy.deepcopy(tiny_model)
    fc1 = model.blocks[0].mlp.fc1                                                        # 32 -> 64: two groups of 16
    codes = torch.randint(0, 3 if fmt == "ternary" else 2, (64, 32), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    scales = torch.tensor([[0.02, 0.5]]).expand(64, 2)
    model.blocks[0].mlp.fc1 = QuantLinear.from_codes(codes, scales, None, fc1.bias, fmt, 16, "int8_token")
    session = runtime.load(export(model, tmp_path / "m.onnx", fmt, custom))
    x = images(4)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(session(x.numpy()), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_the_stems_batchnorm_is_folded_with_its_running_statistics_and_eps(tiny_model, tmp_path):
    model = copy.deepcopy(tiny_model)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    g = torch.Generator().manual_seed(0)
    bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
    bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    bn.eps = 0.1                                     # the default 1e-5 would leave no trace against variances ~1
    session = runtime.load(export(model, tmp_path / "m.onnx"))
    x = images(4)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(session(x.numpy()), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_an_fp16_export_says_fp16_in_its_metadata(tiny_model, tmp_path):
    assert runtime.load(export(tiny_model, tmp_path / "m.onnx", "fp16")).format == "fp16"


def test_an_fp16_export_of_weights_beyond_float16s_range_is_refused_not_written_as_inf(tiny_model, tmp_path):
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[0, 0] = 1e5
    with pytest.raises(ValueError, match=r"blocks.0.mlp.fc1.weight holds values beyond float16's range"):
        export(model, tmp_path / "m.onnx", "fp16")
    assert not (tmp_path / "m.onnx").exists()


def test_a_constant_node_holding_nan_is_refused_when_loaded(tiny_model, tmp_path):
    proto = to_onnx(tiny_model)
    t = next(t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and "blocks.0" in t.name)
    nan = numpy_helper.from_array(np.full(numpy_helper.to_array(t).shape, np.nan, np.float32), t.name)
    proto.graph.initializer.remove(t)
    proto.graph.node.insert(0, helper.make_node("Constant", [], [t.name], value=nan))   # the weight as a node
    onnx.save(proto, tmp_path / "c.onnx")
    with pytest.raises(ValueError, match=f"weight '{t.name}' holds NaN"):
        runtime.load(tmp_path / "c.onnx")


def test_an_onnx_file_over_2_gib_is_refused_by_its_size_unread(tmp_path):
    big = tmp_path / "big.onnx"
    with open(big, "wb") as f:
        f.truncate(2 ** 31 + 1)                 # sparse: nothing to read, and nothing should be
    with pytest.raises(ValueError, match="over the 2 GiB an ONNX model file can hold"):
        runtime.load(big)


def test_an_onnx_file_keeping_its_weights_in_external_files_is_refused(tiny_model, tmp_path):
    proto = to_onnx(tiny_model)
    onnx.save(proto, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=0)
    with pytest.raises(ValueError, match="keeps tensors in external files"):
        runtime.load(tmp_path / "m.onnx")


def test_an_onnx_file_keeping_a_constant_nodes_value_in_an_external_file_is_refused_before_it_is_read(tiny_model,
                                                                                                       tmp_path):
    """ONNX Runtime reads a Constant's external data from the working folder, whatever folder the model is in."""
    proto = to_onnx(tiny_model)
    t = next(t for t in proto.graph.initializer if t.name == "pos_embed")
    proto.graph.initializer.remove(t)
    t.data_location, t.raw_data = onnx.TensorProto.EXTERNAL, b""
    t.external_data.add(key="location", value="secret.bin")
    proto.graph.node.insert(0, helper.make_node("Constant", [], [t.name], value=t))
    onnx.save(proto, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"m.onnx keeps tensors in external files \(its "
                                         r"model.graph.node\[0\].attribute\[0\].t's data\)"):
        runtime.load(tmp_path / "m.onnx")


def test_an_unused_weight_whose_data_does_not_fill_its_dims_is_refused_naming_the_file_and_weight(tiny_model,
                                                                                                   tmp_path):
    proto = to_onnx(tiny_model)
    junk = numpy_helper.from_array(np.zeros(4, np.float32), "junk")
    junk.dims[:] = [100_000, 100_000]  # 4 values stored; ONNX Runtime drops the unused weight unread
    proto.graph.initializer.append(junk)
    onnx.save(proto, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"m.onnx: weight 'junk' is damaged \(cannot reshape array of size 4"):
        runtime.load(tmp_path / "m.onnx")


def test_onnx_runtimes_error_quoting_a_node_of_a_huge_name_is_cut_short(tiny_model, tmp_path):
    proto = to_onnx(tiny_model)
    proto.graph.node[0].name, proto.graph.node[0].op_type = "n" * 100_000, "NoSuchOp"
    onnx.save(proto, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"ONNX Runtime cannot load .*m.onnx: .*n \.\.\.$") as e:
        runtime.load(tmp_path / "m.onnx")
    assert len(str(e.value)) < 1200


def test_a_file_whose_damaged_name_is_not_utf8_is_refused_by_name_without_onnx_runtimes_banner(tiny_model, tmp_path,
                                                                                                capfd):
    data = to_onnx(tiny_model).SerializeToString()
    name = b"blocks.1.mlp.fc1.bias"
    assert data.index(name) < data.rindex(name)  # the first is the Add node's input, the last the initializer
    (tmp_path / "bad.onnx").write_bytes(data.replace(name, b"blocks.1.mlp\xd4fc1.bias", 1))  # one flipped byte
    with pytest.raises(ValueError, match=r"bad.onnx is damaged: its model.graph.node\[\d+\].input holds "
                                         r"b'blocks.1.mlp\\xd4fc1.bias', which is not UTF-8 text"):
        runtime.load(tmp_path / "bad.onnx")
    assert capfd.readouterr().out == ""  # not ONNX Runtime's "EP Error ... Falling back" banner
