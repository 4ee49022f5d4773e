"""The post-training CLIs: `quant.ptq` writes packed files that `quant.evaluate` scores,
`quant.ptq_results` fills the results table, `quant.report` plots it."""
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

import quant
from quant import report
from quant.cli import run
from quant.data import load_split, to_model_input
from quant.ptq import calibration_inputs, main as ptq_main, parse_overrides
from quant.ptq_results import main as results_main, table
from quant.report import accuracy_vs_bits, load, main as report_main, markdown
from tests.conftest import write_tree


def test_ptq_cli_writes_a_packed_file_that_evaluate_scores(checkpoint, image_tree, tmp_path, tiny_model):
    out = tmp_path / "tiny.w4-gptq.safetensors"
    subprocess.run([sys.executable, "-m", "quant.ptq", "--checkpoint", str(checkpoint), "--recipe", "w4-gptq",
                    "--calib", str(image_tree), "--calib-size", "6", "--out", str(out)], check=True,
                   capture_output=True)
    assert quant.read_header(out)["recipe"]["name"] == "w4-gptq"
    r = subprocess.run([sys.executable, "-m", "quant.evaluate", "--checkpoint", str(out), "--data", str(image_tree),
                        "--json", str(tmp_path / "r.json")], capture_output=True, text=True, check=True)
    res = json.loads((tmp_path / "r.json").read_text())
    assert r.stdout.strip().splitlines()[-1] == f"top1={res['top1']:.4f}"
    assert res["params"] == sum(p.numel() for p in tiny_model.parameters())  # packed weights counted too
    assert res["size_bytes"] == out.stat().st_size < checkpoint.stat().st_size


def test_ptq_cli_overrides_recipe_fields(checkpoint, tmp_path):
    out = tmp_path / "w4g16.safetensors"
    ptq_main(["--checkpoint", str(checkpoint), "--recipe", "w4", "--set", "group_size=16", "--out", str(out)])
    layers = quant.read_header(out)["layers"]
    assert layers["blocks.0.attn.qkv"]["group_size"] == 16


def test_ptq_cli_float16_stores_the_rest_in_half_the_bytes(checkpoint, tmp_path):
    for name, extra in (("32", []), ("16", ["--float16"])):
        ptq_main(["--checkpoint", str(checkpoint), "--recipe", "w4", "--out", str(tmp_path / f"{name}.safetensors")]
                 + extra)
    assert (tmp_path / "16.safetensors").stat().st_size < (tmp_path / "32.safetensors").stat().st_size
    assert quant.load_any(tmp_path / "16.safetensors").pos_embed.dtype == torch.float32


def test_overrides_read_json_values_and_refuse_a_bare_word():
    assert parse_overrides(["group_size=128", "act_order=true", "softmax=uniform"]) == \
        {"group_size": 128, "act_order": True, "softmax": "uniform"}
    with pytest.raises(ValueError, match="field=value"):
        parse_overrides(["group_size"])


def test_overrides_refuse_an_empty_field_name():
    with pytest.raises(ValueError, match="field=value"):
        parse_overrides(["=128"])


def test_overrides_split_at_the_first_equals_sign():
    assert parse_overrides(["softmax=a=b"]) == {"softmax": "a=b"}


def test_overrides_read_json_lists_as_tuples_nested_ones_too():
    """Recipe fields are frozen dataclasses: their sequences are tuples, lists would not hash or compare equal."""
    assert parse_overrides(['skip=["head", [1, 2]]']) == {"skip": ("head", (1, 2))}


def test_calibration_images_come_from_the_train_split(image_tree, tiny_model):
    x = calibration_inputs(image_tree, 6, tiny_model.config)
    train = load_split(image_tree, "train", image_size=16, limit=6, progress=False)
    assert torch.equal(x, to_model_input(train.images, tiny_model.config.mean, tiny_model.config.std))


def test_calibration_images_of_another_size_are_resized_to_the_models(tmp_path, tiny_model):
    tree = write_tree(tmp_path / "big", per_class=2, size=64)    # the model takes 16 x 16
    assert calibration_inputs(tree, 3, tiny_model.config).shape == (3, 3, 16, 16)


@pytest.mark.parametrize("args, message", [
    (["--recipe", "w1.58a8"], "quantization-aware training recipe"),
    (["--recipe", "w4-gptq"], "give --calib DATA"),
    (["--recipe", "w5"], "unknown recipe"),
    (["--recipe", "w4", "--device", "gpu"], "unknown device 'gpu'"),
])
def test_ptq_cli_bad_requests_are_one_error_line(checkpoint, tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "quant.ptq", "--checkpoint", str(checkpoint), "--out",
                        str(tmp_path / "q.safetensors"), *args], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert message in r.stderr and not (tmp_path / "q.safetensors").exists()


def test_ptq_cli_asks_for_calibration_data_for_w4a4_too(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="recipe w4a4 calibrates: give --calib DATA"):
        ptq_main(["--checkpoint", str(checkpoint), "--recipe", "w4a4", "--out", str(tmp_path / "q.safetensors")])


def test_ptq_cli_notes_that_a_round_to_nearest_recipe_ignores_calib(checkpoint, tmp_path, capsys):
    ptq_main(["--checkpoint", str(checkpoint), "--recipe", "w4", "--calib", str(tmp_path / "none"),
              "--out", str(tmp_path / "q.safetensors")])  # the data is not read: a missing folder is no error
    assert capsys.readouterr().err == "note: recipe w4 rounds to nearest and calibrates on nothing: --calib is ignored\n"


def test_ptq_cli_notes_that_a_round_to_nearest_recipe_ignores_calib_size_too(checkpoint, tmp_path, capsys):
    ptq_main(["--checkpoint", str(checkpoint), "--recipe", "w4", "--calib-size", "64",
              "--out", str(tmp_path / "q.safetensors")])
    assert capsys.readouterr().err == "note: recipe w4 rounds to nearest and calibrates on nothing: --calib-size is ignored\n"


def test_ptq_cli_notes_nothing_of_calib_for_a_recipe_that_calibrates_on_it(checkpoint, image_tree, tmp_path, capsys):
    ptq_main(["--checkpoint", str(checkpoint), "--recipe", "w4-gptq", "--calib", str(image_tree), "--calib-size", "5",
              "--out", str(tmp_path / "q.safetensors")])
    assert "note:" not in capsys.readouterr().err


def test_ptq_cli_refuses_to_write_over_its_checkpoint(checkpoint):
    before = checkpoint.read_bytes()
    with pytest.raises(ValueError, match="also this command's input"):
        ptq_main(["--checkpoint", str(checkpoint), "--recipe", "w4", "--out", str(checkpoint)])
    assert checkpoint.read_bytes() == before


def test_ptq_cli_under_torchrun_is_refused_with_one_clear_line(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # each process quantized and wrote the same file
    out = tmp_path / "q.safetensors"
    assert run(ptq_main, ["--checkpoint", str(checkpoint), "--recipe", "w4", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: this command runs in one process: start it with python, not torchrun (quant.train is the one that trains in several)"]
    assert not out.exists()


def test_ptq_cli_says_it_is_quantizing_before_the_silent_rounding(checkpoint, tmp_path, capsys, monkeypatch):
    said = []  # stdout when quantize began (round to nearest draws no bar)
    real = quant.quantize
    monkeypatch.setattr(quant, "quantize", lambda *a, **kw: said.append(capsys.readouterr().out) or real(*a, **kw))
    ptq_main(["--checkpoint", str(checkpoint), "--recipe", "w4", "--out", str(tmp_path / "q.safetensors")])
    assert said == [f"quantizing {checkpoint} with w4...\n"]


def test_ptq_cli_names_the_fields_set_beside_the_recipe_it_quantizes_with(checkpoint, tmp_path, capsys):
    ptq_main(["--checkpoint", str(checkpoint), "--recipe", "w2", "--set", "weight_format=ternary",
              "--out", str(tmp_path / "q.safetensors")])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"quantizing {checkpoint} with w2 (weight_format=ternary)..."
    assert out[1].startswith("w2 (weight_format=ternary): quantized in ")


def test_ptq_cli_calibrates_on_calib_size_images(checkpoint, image_tree, tmp_path, capsys):
    ptq_main(["--checkpoint", str(checkpoint), "--recipe", "w4-gptq", "--calib", str(image_tree), "--calib-size", "5",
              "--out", str(tmp_path / "q.safetensors")])  # the tree has 18 training images
    assert "with 5 calibration images" in capsys.readouterr().out


def test_ptq_cli_calibrates_on_a_tree_of_one_training_image_per_class(checkpoint, tmp_path, capsys):
    """Calibration holds out no validation images: a tree too small to spare one per class still calibrates."""
    tree = write_tree(tmp_path / "one", per_class=1)
    ptq_main(["--checkpoint", str(checkpoint), "--recipe", "w4-gptq", "--calib", str(tree),
              "--out", str(tmp_path / "q.safetensors")])
    assert "with 3 calibration images" in capsys.readouterr().out


def test_ptq_cli_prints_how_many_times_smaller_the_packed_file_is(checkpoint, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    ptq_main(["--checkpoint", str(checkpoint), "--recipe", "w4", "--out", str(out)])
    ratio = checkpoint.stat().st_size / out.stat().st_size
    assert ratio > 1 and f"({ratio:.1f}x smaller than the" in capsys.readouterr().out


def test_results_table_scores_each_recipe_from_its_file_and_merges_reruns(checkpoint, image_tree, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("BITVIT_COMMIT", "17dd810")
    out, models = tmp_path / "results" / "ptq.json", tmp_path / "models"
    common = ["--checkpoint", str(checkpoint), "--data", str(image_tree), "--out", str(out), "--models",
              str(models), "--calib-size", "6"]
    results_main([*common, "--recipes", "w8a8", "w2-gptq"])
    results_main([*common, "--recipes", "w4"])
    entries = {e["recipe"]: e for e in json.loads(out.read_text())["results"]}
    assert set(entries) == {"fp32", "w8a8", "w2-gptq", "w4"}
    for name in ("w8a8", "w2-gptq", "w4"):
        e = entries[name]
        assert e["size_bytes"] == (models / f"tiny.{name}.safetensors").stat().st_size
        assert e["drop"] == pytest.approx(entries["fp32"]["top1"] - e["top1"], abs=1e-4)
        assert e["split"] == "test" and e["n"] == 18 and e["wall_s"] >= e["quantize_s"]
        assert e["command"].startswith("python -m quant.ptq") and e["machine"] and e["date"]
        assert e["commit"] == "17dd810"
    assert entries["w2-gptq"]["bits_per_weight"] < entries["w4"]["bits_per_weight"] < entries["w8a8"]["bits_per_weight"]


def results_entry(recipe, checkpoint, top1=0.5, drop=0.1):
    return {"recipe": recipe, "checkpoint": str(checkpoint), "top1": top1, "drop": drop, "bits_per_weight": 4.5,
            "size_bytes": 2_000_000, "quantize_s": 3.0}


def test_results_table_rerun_replaces_its_own_entries_and_keeps_the_others_in_order(checkpoint, image_tree, tmp_path):
    out = tmp_path / "r.json"
    other = {**results_entry("w4", "other.safetensors"), "split": "val", "n": 99}  # another file's split: its own
    out.write_text(json.dumps({"results": [other, results_entry("w4", checkpoint, top1=0.123)]}))
    results_main(["--checkpoint", str(checkpoint), "--data", str(image_tree), "--out", str(out), "--models",
                  str(tmp_path / "models"), "--recipes", "w4", "--limit", "3", "--calib-size", "6"])
    entries = json.loads(out.read_text())["results"]
    assert [(e["checkpoint"], e["recipe"]) for e in entries] == [
        ("other.safetensors", "w4"), (str(checkpoint), "fp32"), (str(checkpoint), "w4")]
    assert entries[2]["top1"] != 0.123 and entries[2]["n"] == 3


def test_results_table_keeps_the_entries_another_sweep_writes_into_the_file_meanwhile(checkpoint, image_tree, tmp_path,
                                                                                     monkeypatch):
    import quant.ptq_results
    out, real_score = tmp_path / "r.json", quant.ptq_results.score

    def score_beside_another_sweep(path, data, device):
        if not out.exists():  # the other sweep, of another model, records its first result meanwhile
            out.write_text(json.dumps({"results": [results_entry("w4", "other.safetensors")]}))
        return real_score(path, data, device)
    monkeypatch.setattr(quant.ptq_results, "score", score_beside_another_sweep)
    results_main(["--checkpoint", str(checkpoint), "--data", str(image_tree), "--out", str(out), "--models",
                  str(tmp_path / "models"), "--recipes", "w4", "--limit", "3", "--calib-size", "6"])
    assert [(e["checkpoint"], e["recipe"]) for e in json.loads(out.read_text())["results"]] == [
        ("other.safetensors", "w4"), (str(checkpoint), "fp32"), (str(checkpoint), "w4")]


def test_results_table_rerun_replaces_the_entry_of_the_same_file_given_by_another_path(checkpoint, image_tree,
                                                                                       tmp_path):
    out, sub = tmp_path / "r.json", checkpoint.parent / "sub"
    sub.mkdir()
    out.write_text(json.dumps({"results": [results_entry("w4", os.path.relpath(checkpoint), top1=0.123)]}))
    results_main(["--checkpoint", str(sub / ".." / checkpoint.name), "--data", str(image_tree),
                  "--out", str(out), "--models", str(tmp_path / "models"), "--recipes", "w4", "--limit", "3",
                  "--calib-size", "6"])
    assert [e["recipe"] for e in json.loads(out.read_text())["results"]] == ["fp32", "w4"]


@pytest.mark.parametrize("split, n", [("test", 18), ("val", 3)])
def test_results_table_refuses_a_file_holding_the_checkpoints_scores_on_another_split_or_count(checkpoint, image_tree,
                                                                                              tmp_path, split, n):
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"results": [{**results_entry("w4", checkpoint), "split": split, "n": n}]}))
    with pytest.raises(ValueError, match=f"holds tiny.safetensors's w4 scored on {n} {split} images, not 3 test images"):
        results_main(["--checkpoint", str(checkpoint), "--data", str(image_tree), "--out", str(out), "--models",
                      str(tmp_path / "models"), "--recipes", "w8a8", "--limit", "3", "--calib-size", "6"])
    assert len(json.loads(out.read_text())["results"]) == 1


def test_results_table_refuses_a_checkpoint_whose_quantized_files_names_pass_the_limit_before_scoring(
        tiny_model, image_tree, tmp_path, monkeypatch):
    import quant.ptq_results
    from quant.models import save_model
    checkpoint = tmp_path / ("m" * 240 + ".safetensors")  # 252 bytes, and 257 as m...m.w8a8.safetensors
    save_model(tiny_model, checkpoint)
    monkeypatch.setattr(quant.ptq_results, "score", lambda *a: pytest.fail("scored before the refusal"))
    with pytest.raises(ValueError, match="w8a8.safetensors: a file name of 257 bytes.*give the checkpoint a shorter"):
        results_main(["--checkpoint", str(checkpoint), "--data", str(image_tree), "--out", str(tmp_path / "r.json"),
                      "--models", str(tmp_path / "models"), "--recipes", "w8a8"])


def test_results_table_refuses_data_of_other_classes_before_any_image_is_decoded(checkpoint, tmp_path, no_decoding):
    other = write_tree(tmp_path / "other", classes=("a", "b", "c"))
    with pytest.raises(ValueError, match="are not the model's"):
        results_main(["--checkpoint", str(checkpoint), "--data", str(other), "--out", str(tmp_path / "r.json"),
                      "--models", str(tmp_path / "models"), "--recipes", "w8a8"])


def test_results_full_precision_entry_counts_32_bits_per_linear_weight(checkpoint, image_tree, tmp_path, tiny_model):
    out = tmp_path / "r.json"
    results_main(["--checkpoint", str(checkpoint), "--data", str(image_tree), "--out", str(out), "--models",
                  str(tmp_path / "models"), "--recipes", "w8a8", "--limit", "3", "--calib-size", "6"])
    fp = json.loads(out.read_text())["results"][0]
    linear = sum(m.weight.numel() for m in tiny_model.modules() if isinstance(m, torch.nn.Linear))
    assert (fp["recipe"], fp["bits_per_weight"], fp["linear_weights"], fp["drop"]) == ("fp32", 32.0, linear, 0.0)
    assert fp["size_bytes"] == checkpoint.stat().st_size


def test_results_table_runs_a_recipe_named_twice_once(checkpoint, image_tree, tmp_path, capsys):
    results_main(["--checkpoint", str(checkpoint), "--data", str(image_tree), "--out", str(tmp_path / "r.json"),
                  "--models", str(tmp_path / "models"), "--recipes", "w8a8", "w8a8", "--limit", "3",
                  "--calib-size", "6"])
    assert capsys.readouterr().out.count("w8a8: top1=") == 1


def test_a_limit_dry_run_of_the_results_table_without_out_is_refused(checkpoint, image_tree, capsys):
    assert run(results_main, ["--checkpoint", str(checkpoint), "--data", str(image_tree), "--limit", "3"]) == 2
    assert "a --limit dry run needs --out FILE" in capsys.readouterr().err


def test_results_entries_record_the_calibration_size(checkpoint, image_tree, tmp_path):
    out = tmp_path / "r.json"
    results_main(["--checkpoint", str(checkpoint), "--data", str(image_tree), "--out", str(out), "--models",
                  str(tmp_path / "models"), "--recipes", "w4-gptq", "--limit", "3", "--calib-size", "5"])
    assert json.loads(out.read_text())["results"][1]["calib"] == "5 train-split images"  # of 18 in the tree


def test_results_commands_rerun_as_shell_lines_with_a_data_path_holding_braces_and_a_space(checkpoint, tmp_path):
    data = write_tree(tmp_path / "my data{x}")
    out = tmp_path / "r.json"
    results_main(["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), "--models",
                  str(tmp_path / "models"), "--recipes", "w4", "--limit", "3"])
    fp, w4 = json.loads(out.read_text())["results"]
    model = str(tmp_path / "models" / "tiny.w4.safetensors")
    assert shlex.split(fp["command"]) == ["python", "-m", "quant.evaluate", "--checkpoint", str(checkpoint),
                                          "--data", str(data), "--split", "test", "--limit", "3"]
    assert shlex.split(w4["command"]) == [
        "python", "-m", "quant.ptq", "--checkpoint", str(checkpoint), "--recipe", "w4", "--calib", str(data),
        "--calib-size", "256", "--out", model, "&&", "python", "-m", "quant.evaluate", "--checkpoint", model,
        "--data", str(data), "--split", "test", "--limit", "3"]


def test_results_markdown_table_lists_one_checkpoints_entries_with_signed_drops_in_points():
    entries = [results_entry("w4", "a.safetensors", top1=0.8, drop=0.05),
               results_entry("w2", "b.safetensors"), results_entry("w3", "a.safetensors", top1=0.9, drop=-0.01)]
    assert table(entries, "a.safetensors").splitlines()[2:] == [
        "| w4 | 0.8000 | +5.00 | 4.500 | 2.000 | 3 |", "| w3 | 0.9000 | -1.00 | 4.500 | 2.000 | 3 |"]
    assert len(table(entries).splitlines()) == 2 + 3


def test_results_markdown_table_lists_the_entries_of_the_same_file_given_by_another_path():
    entries = [results_entry("w4", "a.safetensors"), results_entry("w2", "sub/../b.safetensors")]
    assert [row.split()[1] for row in table(entries, os.path.abspath("a.safetensors")).splitlines()[2:]] == ["w4"]


def test_results_table_refuses_a_qat_recipe_before_scoring_anything(checkpoint, image_tree, tmp_path):
    with pytest.raises(ValueError, match="w1.58a8 is a quantization-aware training recipe"):
        results_main(["--checkpoint", str(checkpoint), "--data", str(image_tree), "--out", str(tmp_path / "r.json"),
                      "--recipes", "w1.58a8"])
    assert not (tmp_path / "r.json").exists()


def test_results_table_refuses_a_results_file_of_another_shape(checkpoint, image_tree, tmp_path):
    (tmp_path / "r.json").write_text('{"results": [1, 2]}')
    with pytest.raises(ValueError, match="not a results file of quant.ptq_results"):
        results_main(["--checkpoint", str(checkpoint), "--data", str(image_tree), "--out", str(tmp_path / "r.json"),
                      "--recipes", "w4"])


def test_results_table_names_a_results_file_holding_an_integer_of_more_digits_than_python_reads(checkpoint,
                                                                                                image_tree, tmp_path):
    (tmp_path / "r.json").write_text('{"results": [{"n": ' + "9" * 5000 + "}]}")
    with pytest.raises(ValueError, match="r.json is not a results file of quant.ptq_results"):
        results_main(["--checkpoint", str(checkpoint), "--data", str(image_tree), "--out", str(tmp_path / "r.json"),
                      "--recipes", "w4"])


def test_results_table_refuses_a_models_folder_that_is_a_file_before_scoring_anything(checkpoint, image_tree,
                                                                                      tmp_path):
    (tmp_path / "models").write_text("x")
    with pytest.raises(ValueError, match="models is a file, not a run folder"):
        results_main(["--checkpoint", str(checkpoint), "--data", str(image_tree), "--out", str(tmp_path / "r.json"),
                      "--recipes", "w4", "--models", str(tmp_path / "models")])


def test_report_collects_entries_at_any_depth_and_draws_the_plot(tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "ptq.json").write_text(json.dumps({"results": [
        {"recipe": "fp32", "top1": 0.9, "bits_per_weight": 32.0}, {"recipe": "w4", "top1": 0.89, "bits_per_weight": 4.4}]}))
    (folder / "qat.json").write_text(json.dumps({"runs": {"w1.58a8": {"top1": 0.88, "bits_per_weight": 1.7}}}))
    (folder / "bench.json").write_text(json.dumps({"latency_ms": 3.0}))
    assert [(e.source, e.name) for e in load(folder).having("top1", "bits")] == [
        ("ptq", "fp32"), ("ptq", "w4"), ("qat", "w1.58a8")]
    report_main(["--results", str(folder), "--out", str(tmp_path / "plot.png")])
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert "| qat | w1.58a8 | 0.8800 | 1.700 |" in capsys.readouterr().out


def test_report_interrupted_while_plotting_leaves_the_old_plot_whole(tmp_path, savefig_killed_midway):
    (tmp_path / "ptq.json").write_text(json.dumps({"results": [{"recipe": "w4", "top1": 0.89, "bits_per_weight": 4.4}]}))
    (tmp_path / "p.png").write_bytes(b"old plot")
    with pytest.raises(KeyboardInterrupt):
        report_main(["--results", str(tmp_path), "--out", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").read_bytes() == b"old plot" and not list(tmp_path.glob("*.tmp"))


def test_report_takes_a_models_time_but_not_a_layers_kernel_or_a_tuner_pick(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "cuda_bench.json").write_text(json.dumps({
        "models": [{"variant": "w1.58a8", "batch": 1, "ms": 1.4}, {"variant": "w1.58a8", "batch": 64, "ms": 11.5}],
        "ops": [{"op": "w1.58a8", "layer": "fc1", "ms": 0.05}],
        "tuned": [{"key": ["a8", "2", "256"], "config": {"block_m": 32}, "ms": 0.05, "candidates": 20}]}))
    assert [(e.name, e.latency_ms) for e in load(folder).having("latency_ms")] == [("w1.58a8", 1.4)]


def test_report_leaves_out_impossible_scores_and_unreadable_files(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "ptq.json").write_text(json.dumps({"results": [
        {"recipe": "ok", "top1": 0.9, "bits_per_weight": 4.0}, {"recipe": "nan", "top1": float("nan"), "bits_per_weight": 4},
        {"recipe": "bool", "top1": True, "bits_per_weight": 4}, {"recipe": "big", "top1": 5, "bits_per_weight": 4},
        {"recipe": "neg", "top1": 0.5, "bits_per_weight": -3}, {"recipe": "vast", "top1": 0.5, "bits_per_weight": 1e308}]}))
    (folder / "latin1.json").write_bytes(b'{"top1": 0.5, "bits_per_weight": 4, "name": "\xff"}')
    res = load(folder)
    assert [e.name for e in res.having("top1", "bits")] == ["ok"]
    assert res.errors and "latin1.json" in res.errors[0]


def test_report_leaves_out_latencies_sizes_and_frame_rates_of_zero_or_below(tmp_path):
    """No measurement gives them: the Results tab drew them as bars to the left of zero."""
    folder = results_folder(tmp_path, bench={"results": [
        {"recipe": "ok", "latency_ms": 2.0, "size_bytes": 1000, "fps": 30.0},
        {"recipe": "neg", "latency_ms": -3.0, "size_bytes": -1000, "fps": -1.0},
        {"recipe": "zero", "latency_ms": {"1": 0, "8": 4.0}, "size_bytes": 0, "fps": 0},
        {"recipe": "neg-ms", "ms": -1.0, "batch": 1}]})
    res = load(folder)
    assert [[e.name for e in res.having(p)] for p in ("latency_ms", "size_mb", "fps")] == [["ok"]] * 3


def test_report_lists_a_pipe_or_folder_named_json_as_not_a_file_without_reading_it(tmp_path):
    folder = results_folder(tmp_path, ptq={"results": [{"recipe": "ok", "top1": 0.9, "bits_per_weight": 4.0}]})
    os.mkfifo(folder / "pipe.json")  # reading it would wait for a writer for ever
    (folder / "dir.json").mkdir()
    res = load(folder)
    assert [e.name for e in res.having("top1", "bits")] == ["ok"]
    assert sorted(res.errors) == ["dir.json: not a file", "pipe.json: not a file"]


def test_report_draws_names_with_dollar_signs_and_nul_bytes_as_text(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "ptq.json").write_text(json.dumps({"results": [
        {"recipe": "w4 $\\frac$", "top1": 0.9, "bits_per_weight": 4.0},  # TeX to matplotlib's mathtext
        {"recipe": "qvit", "top1": 0.8, "bits_per_weight": 3.0, "allocation": "a\u0000b"}]}))
    report_main(["--results", str(folder), "--out", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_report_draws_a_file_name_not_in_utf8_and_lists_a_file_holding_a_lone_surrogate_as_unreadable(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    entry = {"top1": 0.9, "bits_per_weight": 4.0}
    (folder / os.fsdecode(b"r\xe9sultats.json")).write_text(json.dumps({"w4": entry}))  # a Latin-1 file name
    (folder / "bad.json").write_text(json.dumps({"w\ud800": entry}))  # json.dumps writes it as \ud800
    report_main(["--results", str(folder), "--out", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    res = load(folder)
    assert [e.label for e in res.entries] == ["w4 (r\ufffdsultats)"] and res.errors == ["bad.json: not readable JSON "
                                                                                        "(UnicodeEncodeError)"]


def test_report_without_entries_says_what_to_run(tmp_path):
    with pytest.raises(ValueError, match="quant.ptq_results"):
        report_main(["--results", str(tmp_path), "--out", str(tmp_path / "p.png")])


def test_report_given_a_results_file_for_its_folder_names_the_folder_to_give(tmp_path):
    (tmp_path / "ptq.json").write_text("{}")
    with pytest.raises(ValueError, match=f"is a file; --results takes the folder .*{tmp_path.name}"):
        report_main(["--results", str(tmp_path / "ptq.json"), "--out", str(tmp_path / "p.png")])


def results_folder(tmp_path, **files):
    folder = tmp_path / "results"
    folder.mkdir(exist_ok=True)
    for stem, data in files.items():
        (folder / f"{stem}.json").write_text(json.dumps(data))
    return folder


def test_report_takes_a_score_of_zero_but_not_zero_bits_per_weight(tmp_path):
    folder = results_folder(tmp_path, ptq={"results": [{"recipe": "dead", "top1": 0, "bits_per_weight": 2},
                                                       {"recipe": "nothing", "top1": 0.5, "bits_per_weight": 0}]})
    assert [(e.name, e.top1) for e in load(folder).having("top1", "bits")] == [("dead", 0.0)]


def test_report_takes_a_square_confusion_matrix_of_two_classes_or_more(tmp_path):
    folder = results_folder(tmp_path, ptq={"results": [{"recipe": "one", "confusion": [[5]]},
                                                       {"recipe": "two", "confusion": [[5, 1], [0, 4]]}]})
    assert [e.name for e in load(folder).having("confusion")] == ["two"]


def test_report_gives_sizes_in_bytes_as_megabytes(tmp_path):
    folder = results_folder(tmp_path, ptq={"results": [{"recipe": "w4", "size_bytes": 2_500_000}]})
    assert load(folder).entries[0].size_mb == 2.5


def test_report_names_an_unnamed_list_item_by_its_path_and_a_named_dict_by_its_key(tmp_path):
    folder = results_folder(tmp_path, ptq={"results": [{"recipe": "w4", "top1": 0.8}, {"top1": 0.7}],
                                           "runs": {"w8": {"top1": 0.9}}})
    assert [e.name for e in load(folder).entries] == ["w4", "results / 1", "w8"]


def test_report_names_a_robustness_analysis_by_the_checkpoints_stem(tmp_path):
    folder = results_folder(tmp_path, robustness={"checkpoint": "runs/vit_tiny.safetensors", "fp_top1": 0.8, "n": 4,
                                                  "trials": [{"bits": 2, "component": "w_qkv", "block": 0,
                                                              "head": None, "drop": 1.0, "kl": 0.1}]})
    assert [e.label for e in load(folder).having("robustness")] == ["vit_tiny (robustness)"]


def test_report_finds_a_bit_allocation_by_its_file_name_in_the_results_folder(tmp_path):
    folder = results_folder(tmp_path, qat={"recipe": "qvit", "top1": 0.7, "allocation": "gone/elsewhere/q.bits.json"})
    (folder / "q.bits.json").write_text(json.dumps({"attention": {"blocks.0.attn": {"q": [4, 3]}}, "layers": {},
                                                    "bitops": 1.0}))
    assert "qvit bit allocation" in [e.name for e in load(folder).having("allocation")]


def test_report_leaves_out_a_linked_bit_allocation_holding_a_lone_surrogate(tmp_path):
    folder = results_folder(tmp_path, qat={"recipe": "qvit", "top1": 0.7, "allocation": str(tmp_path / "q.bits.json")})
    (tmp_path / "q.bits.json").write_text(json.dumps({"attention": {}, "bitops": 1.0, "layers": {
        "blocks.0.attn.qkv\ud800": {"weight": 4, "input": 8}}}))  # a layer name no plot can draw
    assert load(folder).having("allocation") == []


def test_report_leaves_out_a_linked_bit_allocation_nested_deeper_than_python_reads(tmp_path):
    folder = results_folder(tmp_path, qat={"recipe": "qvit", "top1": 0.7, "allocation": str(tmp_path / "q.bits.json")})
    (tmp_path / "q.bits.json").write_text("[" * 100_000 + "]" * 100_000)
    res = load(folder)
    assert [e.name for e in res.entries] == ["qvit"] and res.errors == []


def test_report_keeps_each_files_context(tmp_path):
    folder = results_folder(tmp_path, ptq={"command": "python -m quant.ptq", "machine": "m", "date": "d",
                                           "split": "val", "wall_time_s": 3.0, "results": [], "other": 1})
    assert load(folder).files["ptq"] == {"command": "python -m quant.ptq", "machine": "m", "date": "d", "split": "val",
                                         "wall_time_s": 3.0}


def test_report_table_lists_each_files_entries_from_the_most_bits_down_with_their_size(tmp_path):
    folder = results_folder(tmp_path, ptq={"results": [
        {"recipe": "w2", "top1": 0.5, "bits_per_weight": 2.0},
        {"recipe": "fp32", "top1": 0.9, "bits_per_weight": 32.0, "size_bytes": 1_234_000},
        {"recipe": "w4", "top1": 0.8, "bits_per_weight": 4.0}]})
    assert markdown(load(folder).having("top1", "bits")).splitlines()[2:] == [
        "| ptq | fp32 | 0.9000 | 32.000 | 1.234 |", "| ptq | w4 | 0.8000 | 4.000 |  |",
        "| ptq | w2 | 0.5000 | 2.000 |  |"]


def test_report_table_keeps_a_name_holding_a_bar_or_a_line_break_in_its_cell(tmp_path):
    folder = results_folder(tmp_path, qat={"runs": {"w4|lsq\nrun 2": {"top1": 0.8, "bits_per_weight": 4.0}}})
    assert markdown(load(folder).having("top1", "bits")).splitlines()[2:] == ["| qat | w4\\|lsq run 2 | 0.8000 | 4.000 |  |"]


def test_report_plots_models_of_16_bits_and_more_as_lines_and_the_rest_as_points_in_percent(tmp_path):
    folder = results_folder(tmp_path, ptq={"results": [{"recipe": "fp16", "top1": 0.9, "bits_per_weight": 16},
                                                       {"recipe": "w4", "top1": 0.85, "bits_per_weight": 4.0}]})
    ax = accuracy_vs_bits(load(folder)).axes[0]
    assert [line.get_ydata()[0] for line in ax.get_lines()] == [pytest.approx(90.0)]
    assert ax.collections[0].get_offsets().tolist() == [[4.0, pytest.approx(85.0)]]


def test_report_names_the_rightmost_point_on_its_left_where_its_name_would_run_past_the_plot(tmp_path):
    long_name = {"recipe": "w8a8-" + "x" * 40, "top1": 0.9, "bits_per_weight": 8.0}
    short_name = {"recipe": "w2", "top1": 0.5, "bits_per_weight": 2.0}
    folder = results_folder(tmp_path, ptq={"results": [short_name, long_name]})
    fig = accuracy_vs_bits(load(folder))
    fig.canvas.draw()
    ax, renderer = fig.axes[0], fig.canvas.get_renderer()
    assert all(t.get_window_extent(renderer).x1 <= ax.bbox.x1 for t in ax.texts)


def test_report_draws_a_line_from_a_name_lifted_off_another_to_its_point(tmp_path):
    folder = results_folder(tmp_path, ptq={"results": [{"recipe": "w4", "top1": 0.8, "bits_per_weight": 4.0},
                                                       {"recipe": "w4-gptq", "top1": 0.8, "bits_per_weight": 4.0}]})
    texts = accuracy_vs_bits(load(folder)).axes[0].texts
    assert [(t.get_text(), t.arrow_patch is not None) for t in texts] == [("w4", False), ("w4-gptq", True)]


def test_report_numbers_the_bits_axis_at_the_outermost_points_when_they_lie_between_its_usual_ticks(tmp_path):
    folder = results_folder(tmp_path, ptq={"results": [{"recipe": "w4", "top1": 0.5, "bits_per_weight": 4.27},
                                                       {"recipe": "w4a8", "top1": 0.6, "bits_per_weight": 4.02}]})
    ax = accuracy_vs_bits(load(folder)).axes[0]
    lo, hi = ax.get_xlim()
    assert [t.get_text() for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi] == ["4.02", "4.27"]


def test_report_gives_each_of_up_to_twenty_results_files_a_colour_of_its_own():
    assert len(set(report.colors([f"f{i}" for i in range(20)]).values())) == 20
    assert report.colors(["a", "b"]) == {"a": report.plt.get_cmap("tab10")(0), "b": report.plt.get_cmap("tab10")(1)}


def test_report_titles_the_plot_with_the_models_and_the_split_and_says_which_files_it_skipped(tmp_path, capsys,
                                                                                            monkeypatch):
    titles = []
    monkeypatch.setattr(report, "write_png", lambda path, fig, dpi: titles.append(fig.axes[0].get_title()))
    folder = results_folder(tmp_path, ptq={"results": [
        {"recipe": "w4", "top1": 0.8, "bits_per_weight": 4.0, "checkpoint": "runs/tiny.safetensors", "split": "val"}]})
    (folder / "broken.json").write_text("{")
    report_main(["--results", str(folder), "--out", str(tmp_path / "p.png")])
    assert titles == ["tiny: top-1 on the val split"]
    assert "skipping broken.json: not readable JSON" in capsys.readouterr().out


def test_results_table_refuses_an_entry_missing_a_column_before_scoring_anything(checkpoint, image_tree, tmp_path):
    """An entry the final table cannot print (here no 'drop') is refused up front, not as a KeyError after the sweep."""
    (tmp_path / "r.json").write_text(json.dumps({"results": [{"recipe": "w8a8", "checkpoint": str(checkpoint),
                                                              "top1": 0.5}]}))
    with pytest.raises(ValueError, match="not a results file of quant.ptq_results.*'drop'"):
        results_main(["--checkpoint", str(checkpoint), "--data", str(image_tree), "--out", str(tmp_path / "r.json"),
                      "--recipes", "w4"])


def test_report_names_each_models_entries_after_the_model_where_a_benchmark_runs_the_same_variants_on_several(
        tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "bench.json").write_text(json.dumps({
        "models": [{"model": "tiny", "variant": "fp", "batch": 1, "ms": 2.0},
                   {"model": "vit_b", "variant": "fp", "batch": 1, "ms": 60.0}],
        "results": {"reference": {"model": "tiny.safetensors", "variants": {"torch fp32": {"latency_ms": 2.2}}}}}))
    assert [(e.name, e.latency_ms) for e in load(folder).having("latency_ms")] == [
        ("tiny: fp", 2.0), ("vit_b: fp", 60.0), ("tiny.safetensors: torch fp32", 2.2)]
