"""`python -m export.bench`: one run times every variant, scores them, and writes a complete results file."""
import copy
import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import quant
from export import bench as export_bench
from export.bench import VARIANTS, Variant, main
from quant.cli import run
from quant.models import VisionTransformer
from tests.conftest import write_tree


pytestmark = pytest.mark.usefixtures("shared_ortops_cache")


def bench(fp_file, tmp_path, *extra):
    out = tmp_path / "res" / "bench.json"
    code = run(main, ["--checkpoint", str(fp_file), "--no-vit-s", "--batches", "1", "3", "--out", str(out), *extra])
    return code, out


def test_one_run_times_sizes_and_scores_every_variant(fp_file, image_tar, tmp_path, capsys):
    code, out = bench(fp_file, tmp_path, "--data", str(image_tar), "--split", "test")
    assert code == 0
    res = json.loads(out.read_text())
    assert {"command", "machine", "date", "split", "wall_s", "threads", "runs"} <= set(res)
    assert res["split"] == "test split of data.tar.gz" and res["runs"] == 30 and res["threads"] == 2
    rows = res["results"]["reference"]["variants"]
    assert list(rows) == list(VARIANTS)
    for name, r in rows.items():
        assert set(r["latency_ms"]) == {"1", "3"} and all(ms > 0 for ms in r["latency_ms"].values())
        assert r["top1"] == r["torch_top1"] or r["prediction_agreement"] >= 0.9, name
    assert rows["ORT fp32"]["prediction_agreement"] == 1.0
    assert rows["bitvit ternary op"]["size_bytes"] < rows["bitvit int8 op"]["size_bytes"] < rows["ORT fp32"]["size_bytes"]
    assert rows["bitvit ternary op"]["weights"] == "round to nearest"
    targets = res["results"]["reference"]["targets"]
    assert targets["ternary speed-up over ORT fp32"]["goal"] == 2.0
    assert all(isinstance(t["met"], bool) for t in targets.values())
    assert out.with_suffix(".png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "| bitvit binary op |" in printed and "b3 ms" in printed and "ternary speed-up over ORT fp32" in printed


def test_trained_quantized_files_replace_round_to_nearest_for_their_format(fp_file, tiny_model, tmp_path):
    quant.save_quantized(quant.quantize(tiny_model, "w8a8"), tmp_path / "w8a8.safetensors")
    code, out = bench(fp_file, tmp_path, "--quantized", str(tmp_path / "w8a8.safetensors"))
    assert code == 0
    rows = json.loads(out.read_text())["results"]["reference"]["variants"]
    assert rows["ORT w8a8 (MatMulInteger)"]["weights"] == rows["bitvit int8 op"]["weights"] == "trained: w8a8.safetensors"
    assert rows["bitvit ternary op"]["weights"] == "round to nearest"
    assert "top1" not in rows["bitvit int8 op"]  # no --data, no accuracy


def test_a_quantized_files_graph_on_bitvits_ops_is_built_once_checked_then_timed(fp_file, tiny_model, tmp_path,
                                                                                  monkeypatch):
    from export import exporter
    built, to_onnx = [], exporter.to_onnx

    def counted(model, fmt="fp32", custom_ops=True):
        built.append((fmt, custom_ops))
        return to_onnx(model, fmt, custom_ops)
    monkeypatch.setattr(exporter, "to_onnx", counted)
    monkeypatch.setattr(export_bench, "to_onnx", counted)
    quant.save_quantized(quant.quantize(tiny_model, "w8a8"), tmp_path / "w8a8.safetensors")
    assert bench(fp_file, tmp_path, "--quantized", str(tmp_path / "w8a8.safetensors"))[0] == 0
    assert built.count(("w8a8", True)) == 1 and built.count(("w8a8", False)) == 1  # (MatMulInteger: its own graph)


def test_two_quantized_files_of_one_format_are_refused_not_one_silently_dropped(fp_file, tiny_model, tmp_path, capsys):
    for name in ("a.safetensors", "b.safetensors"):
        quant.save_quantized(quant.quantize(copy.deepcopy(tiny_model), "w8a8"), tmp_path / name)
    assert bench(fp_file, tmp_path, "--quantized", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))[0] == 2
    assert "a.safetensors both hold w8a8 weights; give one file per format" in capsys.readouterr().err


def test_a_w4a8_file_with_grouped_scales_is_refused_not_timed_on_matmulnbits_as_the_int4_op(
        fp_file, tiny_model, tmp_path, capsys):
    quant.save_quantized(quant.quantize(tiny_model, quant.recipe("w4a8", group_size=16)), tmp_path / "g.safetensors")
    assert bench(fp_file, tmp_path, "--quantized", str(tmp_path / "g.safetensors"))[0] == 2
    assert "g.safetensors: its w4a8 layers do not all run on bitvit's op" in capsys.readouterr().err


@pytest.mark.parametrize("runs", ["10", "99999999999999999999"])
def test_runs_outside_30_to_10000_are_refused(fp_file, tmp_path, capsys, runs):
    assert bench(fp_file, tmp_path, "--runs", runs)[0] == 2
    assert "--runs must lie in 30..10000" in capsys.readouterr().err


def test_a_quantized_reference_checkpoint_is_refused(tiny_model, tmp_path, capsys):
    quant.save_quantized(quant.quantize(tiny_model, "w8a8"), tmp_path / "q.safetensors")
    assert bench(tmp_path / "q.safetensors", tmp_path)[0] == 2
    assert "takes the full-precision one" in capsys.readouterr().err


def test_a_cnn_teacher_as_the_reference_checkpoint_is_refused_before_any_export(tmp_path, capsys, monkeypatch):
    from quant.teacher import create_teacher, save_teacher

    def no_export(*args, **kwargs):
        raise AssertionError("exported before the reference checkpoint was checked")
    monkeypatch.setattr("export.bench.build_variants", no_export)
    save_teacher(create_teacher("resnet_cifar_half", widths=(4, 4, 4, 4)), tmp_path / "teacher.safetensors")
    assert bench(tmp_path / "teacher.safetensors", tmp_path)[0] == 2
    assert "teacher.safetensors holds a ResNetTeacher, not a bitvit ViT" in capsys.readouterr().err


def test_a_quantized_file_of_another_architecture_is_refused(fp_file, tiny_model, tmp_path, capsys):
    other = quant.quantize(VisionTransformer(dataclasses.replace(tiny_model.config, depth=1)).eval(), "w8a8")
    quant.save_quantized(other, tmp_path / "other.safetensors")
    assert bench(fp_file, tmp_path, "--quantized", str(tmp_path / "other.safetensors"))[0] == 2
    assert "its architecture, classes or input normalisation differ" in capsys.readouterr().err


def test_a_quantized_file_with_no_onnx_export_is_refused_naming_it_before_any_export(fp_file, tiny_model, tmp_path,
                                                                                    capsys, monkeypatch):
    def no_export(*args, **kwargs):
        raise AssertionError("exported before the quantized file was checked")
    monkeypatch.setattr("export.bench.build_variants", no_export)
    torch.manual_seed(0)  # W4A4 holds int4 weights, but its quantized attention has no ONNX export
    quant.save_quantized(quant.quantize(tiny_model, "w4a4", calib=torch.randn(8, 3, 16, 16)), tmp_path / "w4a4.safetensors")
    assert bench(fp_file, tmp_path, "--quantized", str(tmp_path / "w4a4.safetensors"))[0] == 2
    err = capsys.readouterr().err
    assert "w4a4.safetensors has no ONNX export" in err and "QuantAttention" in err


def test_a_quantized_file_whose_layers_miss_bitvits_op_is_refused_not_timed_as_it(fp_file, tiny_model, tmp_path,
                                                                                  capsys):
    # asymmetric int4 weights export as MatMulNBits: the "bitvit int4 op" row would time that
    quant.save_quantized(quant.quantize(tiny_model, quant.recipe("w4a8", asymmetric=True)), tmp_path / "w4a8.safetensors")
    assert bench(fp_file, tmp_path, "--quantized", str(tmp_path / "w4a8.safetensors"))[0] == 2
    err = capsys.readouterr().err
    assert "w4a8.safetensors: its w4a8 layers do not all run on bitvit's op" in err and "standard ops" in err


def test_data_of_other_classes_is_refused_before_any_timing_or_decoding(fp_file, tmp_path, capsys, monkeypatch,
                                                                         no_decoding):
    def no_timing(*args):
        raise AssertionError("timed before the data was checked")
    monkeypatch.setattr("export.bench.time_variants", no_timing)
    other = write_tree(tmp_path / "other", classes=("a", "b", "c"))
    assert bench(fp_file, tmp_path, "--data", str(other))[0] == 2
    assert "are not the model's" in capsys.readouterr().err


def test_a_tree_of_some_of_the_models_classes_is_scored_by_their_names(fp_file, tiny_model, image_tree, tmp_path):
    import shutil
    from quant.data import load_split
    from quant.evaluate import evaluate
    shutil.rmtree(image_tree / "test" / "cat")  # photos of a dog and a frog, scored by a cat/dog/frog model
    code, out = bench(fp_file, tmp_path, "--data", str(image_tree), "--split", "test")
    assert code == 0
    want = evaluate(tiny_model, load_split(image_tree, "test", image_size=16, progress=False))["top1"]
    assert json.loads(out.read_text())["results"]["reference"]["variants"]["ORT fp32"]["torch_top1"] == want


def test_a_quantized_file_trained_with_another_drop_path_rate_is_the_same_model(fp_file, tiny_model, tmp_path):
    trained = VisionTransformer(dataclasses.replace(tiny_model.config, drop_path_rate=0.1)).eval()
    quant.save_quantized(quant.quantize(trained, "w8a8"), tmp_path / "w8a8.safetensors")
    code, out = bench(fp_file, tmp_path, "--quantized", str(tmp_path / "w8a8.safetensors"))
    assert code == 0
    assert json.loads(out.read_text())["results"]["reference"]["variants"]["bitvit int8 op"]["weights"] == \
        "trained: w8a8.safetensors"


@pytest.mark.parametrize("round_robin", [True, False])
def test_variants_are_timed_round_robin_or_one_after_another(round_robin):
    calls = []
    variants = {name: Variant(lambda x, name=name: calls.append(name), None, 0, "") for name in "ab"}
    ms = export_bench.time_variants(variants, img_size=4, batch=1, runs=3, round_robin=round_robin)
    assert set(ms) == {"a", "b"}
    # 3 warm-up calls, then per run an untimed and a timed call
    assert calls == (["a"] * 3 + ["b"] * 3 + ["a", "a", "b", "b"] * 3 if round_robin else ["a"] * 9 + ["b"] * 9)


def test_spinning_threads_are_asked_for_and_recorded(fp_file, tmp_path, monkeypatch):
    asked = []
    load = export_bench.load
    monkeypatch.setattr(export_bench, "load", lambda path, threads, spinning: asked.append(spinning) or
                        load(path, threads, spinning))
    code, out = bench(fp_file, tmp_path, "--spinning")
    assert code == 0 and asked and all(asked)
    assert json.loads(out.read_text())["ort_spinning"] is True


def test_a_variants_latency_is_the_median_of_its_timed_calls_in_milliseconds(monkeypatch):
    ticks = iter([0.0, 0.001, 0.0, 0.002, 0.0, 0.009])                  # timed calls of 1, 2 and 9 ms
    monkeypatch.setattr(export_bench, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    variants = {"a": Variant(lambda x: None, None, 0, "")}
    ms = export_bench.time_variants(variants, img_size=4, batch=1, runs=3, round_robin=True)
    assert ms == {"a": pytest.approx(2.0)}


def test_the_targets_are_speed_ups_at_batch_1_and_the_ternary_files_fraction_of_ort_fp32():
    ms = {"ORT fp32": 8.0, "ORT dynamic int8": 5.0, "bitvit ternary op": 4.0, "bitvit binary op": 2.0}
    rows = {name: {"latency_ms": {"1": t, "8": 1.0}, "size_bytes": 1200} for name, t in ms.items()}
    rows["bitvit ternary op"]["size_bytes"] = 50
    targets = export_bench.targets(rows)
    assert {k: (t["value"], t["goal"], t["met"]) for k, t in targets.items()} == {
        "ternary speed-up over ORT fp32": (2.0, 2.0, True),
        "ternary speed-up over ORT dynamic int8": (1.25, 1.0, True),
        "ternary speed-up over ORT dynamic int8 (stretch)": (1.25, 1.3, False),
        "ternary file size, fraction of ORT fp32 (at most)": (0.0417, 0.0833, True),
        "binary speed-up over ternary": (2.0, 1.0, True)}


def test_the_table_gives_size_latency_speed_up_over_ort_fp32_and_the_ort_then_torch_top1(capsys):
    rows = {"ORT fp32": {"size_bytes": 4_000_000, "latency_ms": {"1": 8.0}},
            "bitvit ternary op": {"size_bytes": 500_000, "latency_ms": {"1": 2.0}, "top1": 0.8, "torch_top1": 0.85}}
    export_bench.print_table("reference", rows, [1])
    out = capsys.readouterr().out
    assert "| ORT fp32 | 4.00 | 8.00 | 1.00x | - |" in out
    assert "| bitvit ternary op | 0.50 | 2.00 | 4.00x | 0.8000 / 0.8500 |" in out


def test_accuracy_scores_each_variant_in_its_runtime_and_its_torch_model_and_how_often_they_agree():
    data = SimpleNamespace(images=np.zeros((4, 4, 4, 3), np.uint8), labels=np.array([0, 0, 0, 1]))
    runtime = lambda x: np.eye(3, dtype=np.float32)[[0] * len(x)]        # noqa: E731  says class 0 each time
    model = lambda x: torch.eye(3)[[1, 1, 0, 1]]                          # noqa: E731  right on the last two
    res = export_bench.accuracy({"v": Variant(runtime, model, 0, "")}, data, (0.5,) * 3, (0.5,) * 3)
    assert res == {"v": {"top1": 0.75, "torch_top1": 0.5, "prediction_agreement": 0.25}}


def test_accuracy_shows_a_bar_of_the_images_within_each_variant(capsys):
    data = SimpleNamespace(images=np.zeros((300, 4, 4, 3), np.uint8), labels=np.zeros(300, int))
    export_bench.accuracy({"v": Variant(lambda x: np.eye(3, dtype=np.float32)[[0] * len(x)],
                                        lambda x: torch.eye(3)[[0] * len(x)], 0, "")}, data, (0.5,) * 3, (0.5,) * 3)
    assert "0/300 [" in capsys.readouterr().err  # a bar of the images, not just of the variants


def test_batches_without_batch_1_are_refused(fp_file, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert run(main, ["--checkpoint", str(fp_file), "--no-vit-s", "--batches", "8", "--out", str(out)]) == 2
    assert "--batches must include 1" in capsys.readouterr().err


def test_quantized_variants_say_they_are_rounded_and_the_fp_variants_full_precision(tiny_model, tmp_path):
    variants = export_bench.build_variants(tiny_model, {}, tmp_path, threads=1, spinning=False)
    weights = {name: v.weights for name, v in variants.items()}
    assert weights["torch fp32"] == weights["ORT fp32"] == "full precision"
    assert weights["ORT dynamic int8"].startswith("onnxruntime.quantization.quantize_dynamic")
    assert {weights[n] for n in VARIANTS[3:]} == {"round to nearest"}


@pytest.fixture
def measured(monkeypatch):
    """The bench with no export, every variant of 1 kB taking fixed times: what main makes of the measurements."""
    ms = {**{name: 4.0 for name in VARIANTS}, "ORT fp32": 8.0, "bitvit ternary op": 2.0, "bitvit binary op": 3.0}
    monkeypatch.setattr(export_bench, "build_variants", lambda model, quantized, workdir, threads, spinning:
                        {name: Variant(None, model, 1000, "w") for name in VARIANTS})
    monkeypatch.setattr(export_bench, "time_variants", lambda variants, img_size, batch, runs, round_robin: dict(ms))
    monkeypatch.setattr(export_bench, "accuracy", lambda variants, data, mean, std:
                        {name: {"top1": 0.5, "torch_top1": 0.5, "prediction_agreement": 1.0} for name in variants})


def test_a_batch_given_twice_is_timed_and_tabled_once(fp_file, tmp_path, capsys, measured):
    code, out = bench(fp_file, tmp_path, "--batches", "1", "1")
    assert code == 0 and json.loads(out.read_text())["batches"] == [1]
    assert capsys.readouterr().out.count("b1 ms") == 1


@pytest.mark.parametrize("limit, scored", [("6", 6), ("100", 18)])
def test_the_split_records_how_many_images_were_scored(fp_file, image_tar, tmp_path, measured, limit, scored):
    code, out = bench(fp_file, tmp_path, "--data", str(image_tar), "--limit", limit)  # the split holds 18
    assert code == 0
    assert json.loads(out.read_text())["split"] == f"test split of data.tar.gz, {scored} images balanced over classes"


def test_each_target_is_printed_as_met_or_missed(fp_file, tmp_path, capsys, measured):
    assert bench(fp_file, tmp_path)[0] == 0
    printed = capsys.readouterr().out
    assert "  met    ternary speed-up over ORT fp32: 4.000 (goal 2.000)" in printed
    assert "  MISSED binary speed-up over ternary: 0.667 (goal 1.000)" in printed


def test_the_load_average_is_recorded_as_null_where_the_os_has_none(fp_file, tmp_path, measured, monkeypatch):
    monkeypatch.delattr("os.getloadavg")  # Windows
    code, out = bench(fp_file, tmp_path)
    res = json.loads(out.read_text())
    assert code == 0 and res["load_average_before"] is None and res["load_average_after"] is None


def test_a_limit_dry_run_without_out_is_refused_not_written_over_the_shipped_results(fp_file, capsys):
    assert run(main, ["--checkpoint", str(fp_file), "--no-vit-s", "--limit", "5"]) == 2
    assert "a --limit dry run needs --out FILE" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--split", "val"), ("--limit", "5")])
def test_a_split_or_limit_without_data_to_score_is_refused_not_ignored(fp_file, tmp_path, capsys, measured, flag,
                                                                      value):
    assert bench(fp_file, tmp_path, flag, value)[0] == 2
    assert f"{flag} picks the images of --data that top-1 is scored on: give --data too" in capsys.readouterr().err
