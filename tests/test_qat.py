"""Quantization-aware training: a few steps lower the distillation loss; the CLI trains, packs, scores and records."""
import copy
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import quant
from quant import bitlinear, qvit
from quant.cli import file_sha256, run
from quant.data import load_split
from quant.models import VisionTransformer, save_model
from quant.qat import (FeatureDistill, _known_teacher_top1, init_student, main, prepare_student,
                       read_init, read_results, record_result, train_stages)
from quant.recipes import BitNet
from quant.train import TrainConfig, read_log
from tests.conftest import TINY, write_tar, write_tree


def distill_steps(student, teacher, x, steps=15, lr=3e-3):
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    target = F.log_softmax(teacher(x), -1).detach()
    losses = []
    for _ in range(steps):
        loss = F.kl_div(F.log_softmax(student(x), -1), target, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("fmt", ["ternary", "binary"])
def test_a_few_bitnet_qat_steps_lower_the_distillation_loss(tiny_model, fmt):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 16, 16)
    student = bitlinear.prepare(copy.deepcopy(tiny_model), fmt).train()
    losses = distill_steps(student, tiny_model, x)
    assert losses[-1] < 0.5 * losses[0]


def test_a_few_qvit_steps_lower_the_loss_with_the_budget_penalty(tiny_model):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 16, 16)
    student = qvit.prepare(copy.deepcopy(tiny_model), budget_bits=3)
    qvit.calibrate(student, x)
    qvit.measure_macs(student, x[:1])
    penalty = qvit.BitOpsPenalty(student, 3)
    target = F.log_softmax(tiny_model(x), -1).detach()
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        loss = F.kl_div(F.log_softmax(student(x), -1), target, log_target=True, reduction="batchmean")
        loss = loss + penalty(student)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def ready_student(model, name, x):
    """A copy of `model` prepared for QAT with recipe `name` and initialised on inputs x, as quant.qat does."""
    student = quant.quantize(copy.deepcopy(model), name)
    if isinstance(quant.recipe(name), BitNet):
        bitlinear.init_input_norms(student, x)
    else:
        qvit.calibrate(student, x)
        qvit.measure_macs(student, x[:1])
    return student


@pytest.mark.parametrize("name", ["w1.58a8", "w1a8", "qvit"])
def test_qat_students_trace_into_one_graph_for_torch_compile(tiny_model, name):
    """quant.train compiles the student on CUDA: a graph break would split it at every quantizer."""
    x = torch.randn(4, 3, 16, 16)
    student = ready_student(tiny_model, name, x)
    explained = torch._dynamo.explain(student.train())(x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


@pytest.mark.parametrize("name", ["w1.58a8", "w1a8", "qvit"])
def test_qat_training_steps_make_no_tensor_on_the_default_device(tiny_model, name):
    """On a GPU, a tensor made on torch's default device (the host) beside the student's fails or syncs.
    With the student on the CPU and meta as the default device, the same mistake fails here."""
    x = torch.randn(4, 3, 16, 16)
    student = ready_student(tiny_model, name, x)
    penalty = qvit.BitOpsPenalty(student, 3) if name == "qvit" else (lambda m: 0.0)
    target = torch.softmax(torch.randn(4, tiny_model.config.num_classes), 1)
    with torch.device("meta"):
        loss = -(target * F.log_softmax(student.train()(x), 1)).sum(1).mean() + penalty(student)
        loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


@pytest.fixture
def teacher_file(tiny_model, tmp_path):
    path = tmp_path / "fp.safetensors"
    save_model(tiny_model, path)
    return path


def test_cli_trains_packs_scores_and_records_a_ternary_model(teacher_file, image_tar, tmp_path):
    out, results = tmp_path / "t.safetensors", tmp_path / "qat.json"
    args = ["--teacher", str(teacher_file), "--recipe", "w1.58a8", "--data", str(image_tar), "--out", str(out),
            "--epochs", "1", "--batch-size", "8", "--eval-split", "test", "--results", str(results)]
    assert run(main, args) == 0
    model = quant.load_quantized(out)
    assert {m.weight_format for m in model.modules() if isinstance(m, quant.QuantLinear)} == {"ternary"}
    entry = json.loads(results.read_text())["runs"]["w1.58a8"]
    assert 0 <= entry["top1"] <= 1 and entry["split"] == "test" and entry["bits_per_weight"] < 2.1
    assert {"command", "machine", "date", "wall_time_s", "epochs", "size_bytes"} <= set(entry)
    assert entry["drop_points"] == round(100 * (entry["teacher_top1"] - entry["top1"]), 4)  # no float noise
    assert run(main, args) == 0   # a rerun resumes from the finished stages and writes the same model
    assert json.loads(results.read_text())["runs"]["w1.58a8"]["top1"] == entry["top1"]


def test_a_run_out_of_time_writes_no_model_and_the_same_command_without_the_limit_finishes(
        teacher_file, image_tar, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    args = ["--teacher", str(teacher_file), "--recipe", "w1.58a8", "--data", str(image_tar), "--out", str(out),
            "--epochs", "1", "--batch-size", "8"]
    assert run(main, args + ["--time-limit", "1e-9"]) == 0   # no time for an epoch
    assert "stopped by --time-limit" in capsys.readouterr().out and not out.exists()
    assert run(main, args) == 0
    assert quant.load_quantized(out)


def test_a_time_limit_shorter_than_the_students_calibration_still_trains(teacher_file, image_tar, tmp_path,
                                                                          monkeypatch):
    """Calibration, redone by every run, is not charged to the limit: charged, a limit shorter than it stopped
    every rerun before its first epoch."""
    clock = [0.0]
    monkeypatch.setattr("quant.qat.time", SimpleNamespace(time=lambda: clock[0]))
    init = bitlinear.init_input_norms

    def an_hour_of_calibrating(model, x):
        clock[0] += 3600
        init(model, x)
    monkeypatch.setattr(bitlinear, "init_input_norms", an_hour_of_calibrating)
    out = tmp_path / "t.safetensors"
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "w1.58a8", "--data", str(image_tar),
                      "--out", str(out), "--epochs", "1", "--batch-size", "8", "--time-limit", "600"]) == 0
    assert quant.load_quantized(out)


def test_a_run_folder_another_run_is_training_in_is_refused(teacher_file, image_tar, tmp_path, capsys):
    from quant.cli import run_lock
    out = tmp_path / "t.safetensors"
    args = ["--teacher", str(teacher_file), "--recipe", "w1.58a8", "--data", str(image_tar), "--out", str(out),
            "--epochs", "1", "--batch-size", "8"]
    with run_lock(tmp_path / "t.safetensors.run"):  # as the other run holds it
        assert run(main, args) == 2
    assert "t.safetensors.run is the run folder of another run still going" in capsys.readouterr().err
    assert list((tmp_path / "t.safetensors.run").iterdir()) == [] and not out.exists()


def test_cli_under_torchrun_is_refused_with_one_clear_line(teacher_file, image_tar, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # each process: one was refused the run lock, the other waited for it
    out = tmp_path / "t.safetensors"
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "w1.58a8", "--data", str(image_tar),
                      "--out", str(out), "--epochs", "1", "--batch-size", "8"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "error: this command runs in one process: start it with python, not torchrun (quant.train is the one that trains in several)"
    assert not out.exists() and not (tmp_path / "t.safetensors.run").exists()


def three_bit_run(teacher_file, data, recipe: str, out, *more: str) -> list[str]:
    """quant.qat's arguments for a small Q-ViT-layer run (qvit or lsq) at 3 bits."""
    return ["--teacher", str(teacher_file), "--recipe", recipe, "--set", "budget_bits=3", "--data", str(data),
            "--out", str(out), "--batch-size", "8", "--calib-size", "8", *more]


def test_cli_qvit_searches_then_fine_tunes_and_writes_the_bit_allocation(teacher_file, image_tar, tmp_path):
    out = tmp_path / "q.safetensors"
    assert run(main, three_bit_run(teacher_file, image_tar, "qvit", out, "--epochs", "2")) == 0
    alloc = json.loads((tmp_path / "q.safetensors.bits.json").read_text())
    assert alloc["budget_bits"] == 3 and alloc["bitops_ratio"] <= 1 + 1e-9
    assert (tmp_path / "q.safetensors.bits.png").exists()
    assert (tmp_path / "q.safetensors.run" / "search" / "log.jsonl").exists()
    assert (tmp_path / "q.safetensors.run" / "finetune" / "log.jsonl").exists()
    quant.load_quantized(out)


def test_a_qvit_run_stopped_after_its_search_resumes_to_the_model_of_an_unbroken_run(teacher_file, image_tar,
                                                                                    tmp_path, monkeypatch):
    """The search's last gradients of the widths, fixed since, do not count in the fine-tuning's gradient
    clipping of the unbroken run (a resumed run has none)."""
    def args(out):  # a feature weight whose gradients the clipping scales down
        return three_bit_run(teacher_file, image_tar, "qvit", out, "--epochs", "2", "--feature-weight", "100")
    assert run(main, args(tmp_path / "a.safetensors")) == 0
    real_fix_bits = qvit.fix_bits

    def stop(*a, **k):  # Ctrl-C as the search ends
        raise KeyboardInterrupt
    monkeypatch.setattr(qvit, "fix_bits", stop)
    with pytest.raises(KeyboardInterrupt):
        main(args(tmp_path / "b.safetensors"))
    monkeypatch.setattr(qvit, "fix_bits", real_fix_bits)
    assert run(main, args(tmp_path / "b.safetensors")) == 0
    a, b = (load_file(tmp_path / f"{n}.safetensors") for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_lsq_trains_every_width_at_the_budget_without_a_search_stage(teacher_file, image_tar, tmp_path):
    out = tmp_path / "l.safetensors"
    assert run(main, three_bit_run(teacher_file, image_tar, "lsq", out, "--epochs", "2")) == 0
    alloc = json.loads((tmp_path / "l.safetensors.bits.json").read_text())
    widths = {n: (layer["weight"], layer["input"]) for n, layer in alloc["layers"].items()}
    assert widths.pop("head") == (8, 8) and set(widths.values()) <= {(3, 3), (3, None)}
    assert {b for head in alloc["attention"].values() for slot, bits in head.items() if slot != "macs"
            for b in bits} == {3}
    assert not (tmp_path / "l.safetensors.run" / "search").exists()
    assert len(read_log(tmp_path / "l.safetensors.run" / "finetune" / "log.jsonl")) == 2
    quant.load_quantized(out)


def test_a_qvit_run_too_short_to_search_still_fixes_its_widths_within_the_budget(teacher_file, image_tar, tmp_path):
    out = tmp_path / "q.safetensors"   # 0.4 of one epoch: no search epochs
    assert run(main, three_bit_run(teacher_file, image_tar, "qvit", out, "--epochs", "1", "--search-ratio", "0.4")) == 0
    alloc = json.loads((tmp_path / "q.safetensors.bits.json").read_text())
    assert alloc["bitops_ratio"] <= 1 + 1e-9


def test_cli_time_budget_is_shared_by_the_qvit_stages_in_proportion_to_their_epochs(teacher_file, image_tar,
                                                                                      tmp_path):
    out = tmp_path / "q.safetensors"
    assert run(main, three_bit_run(teacher_file, image_tar, "qvit", out, "--epochs", "4", "--search-ratio", "0.25",
                                   "--time-budget", "40")) == 0
    budgets = {stage: json.loads(torch.load(tmp_path / "q.safetensors.run" / stage / "last.pt",
                                            weights_only=True)["config"])["time_budget"]
               for stage in ("search", "finetune")}
    assert budgets == {"search": 10.0, "finetune": 30.0}


def test_cli_refuses_a_post_training_recipe_with_one_clear_line(teacher_file, image_tar, tmp_path, capsys):
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "w4", "--data", str(image_tar),
                      "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "post-training recipe" in capsys.readouterr().err


@pytest.mark.parametrize("recipe, option", [("w1a8", "--search-ratio"), ("w1.58a8", "--bitops-weight"),
                                            ("lsq", "--bitops-weight"), ("lsq", "--search-ratio")])
def test_a_qvit_search_option_with_a_recipe_that_searches_no_widths_is_refused_not_ignored(
        teacher_file, image_tar, tmp_path, capsys, recipe, option):
    assert run(main, ["--teacher", str(teacher_file), "--recipe", recipe, "--data", str(image_tar),
                      "--out", str(tmp_path / "x.safetensors"), option, "0.5"]) == 2
    assert f"error: {option} " in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


def test_a_run_folder_of_another_recipe_is_refused_not_resumed(teacher_file, image_tar, tmp_path, capsys):
    """A ternary and a binary student hold the same tensors: the binary run must not take the ternary one's state."""
    args = ["--teacher", str(teacher_file), "--data", str(image_tar), "--epochs", "1", "--batch-size", "8",
            "--val-limit", "6", "--run-dir", str(tmp_path / "run")]
    assert run(main, args + ["--recipe", "w1.58a8", "--out", str(tmp_path / "t.safetensors")]) == 0
    capsys.readouterr()
    assert run(main, args + ["--recipe", "w1a8", "--out", str(tmp_path / "b.safetensors")]) == 2
    assert "quantization recipe" in capsys.readouterr().err and not (tmp_path / "b.safetensors").exists()


@pytest.mark.parametrize("recipe, option", [("w1a8", "--feature-weight"), ("qvit", "--bitops-weight")])
def test_a_rerun_with_another_extra_loss_weight_is_refused_not_resumed(teacher_file, image_tar, tmp_path, capsys,
                                                                        recipe, option):
    args = ["--teacher", str(teacher_file), "--recipe", recipe, "--data", str(image_tar), "--out",
            str(tmp_path / "m.safetensors"), "--epochs", "2", "--batch-size", "8", "--calib-size", "8"]
    assert run(main, args) == 0
    capsys.readouterr()
    assert run(main, args + [option, "0.5"]) == 2
    assert "another config (extra_loss" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", '{"runs": [1]}'])
def test_a_results_file_it_cannot_record_into_is_refused_before_training(teacher_file, image_tar, tmp_path, capsys,
                                                                         content):
    (tmp_path / "results.json").write_text(content)
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "w1.58a8", "--data", str(image_tar),
                      "--out", str(tmp_path / "x.safetensors"), "--eval-split", "test",
                      "--results", str(tmp_path / "results.json")]) == 2
    err = capsys.readouterr().err
    assert "results.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors.run").exists()


def test_a_zero_temperature_is_an_argument_error(teacher_file, image_tar, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--teacher", str(teacher_file), "--recipe", "w1.58a8", "--data", str(image_tar),
              "--out", str(tmp_path / "x.safetensors"), "--temperature", "0"])
    assert "--temperature: expected a number > 0" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["qvit", "lsq"])  # a bit-width search, and fixed widths: both write it
def test_an_out_name_leaving_no_room_for_the_bit_allocation_beside_it_is_refused_before_training(
        teacher_file, image_tar, tmp_path, capsys, recipe):
    out = tmp_path / ("m" * 234 + ".safetensors")  # 246 bytes, and 256 with .bits.json
    assert run(main, ["--teacher", str(teacher_file), "--recipe", recipe, "--data", str(image_tar),
                      "--out", str(out), "--epochs", "1", "--batch-size", "8"]) == 2
    err = capsys.readouterr().err
    assert ".bits.json: a file name of 256 bytes" in err and "give a shorter --out name" in err
    assert not any(tmp_path.glob("*.run"))


def test_an_out_name_leaving_no_room_for_the_default_run_folder_is_refused_naming_run_dir(teacher_file, image_tar,
                                                                                          tmp_path, capsys):
    out = tmp_path / ("m" * 240 + ".safetensors")  # 252 bytes, and 256 with .run
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "w1a8", "--data", str(image_tar),
                      "--out", str(out)]) == 2
    assert "give --run-dir PATH" in capsys.readouterr().err


def test_a_zero_time_limit_is_an_argument_error_not_a_run_that_trains_nothing(teacher_file, image_tar, tmp_path,
                                                                               capsys):
    with pytest.raises(SystemExit):
        main(["--teacher", str(teacher_file), "--recipe", "w1.58a8", "--data", str(image_tar),
              "--out", str(tmp_path / "x.safetensors"), "--time-limit", "0"])
    assert "--time-limit: expected a number > 0" in capsys.readouterr().err


def test_feature_distillation_without_logit_distillation_is_refused_before_training(teacher_file, image_tar,
                                                                                    tmp_path, capsys):
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "w1a8", "--data", str(image_tar),
                      "--out", str(tmp_path / "x.safetensors"), "--distill", "none", "--feature-weight", "1"]) == 2
    assert "--feature-weight" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors.run").exists()


@pytest.mark.parametrize("distill, option, value", [("hard", "--temperature", "2"), ("none", "--temperature", "2"),
                                                    ("none", "--distill-weight", "0.5")])
def test_a_distillation_option_its_distill_mode_does_without_is_refused_not_ignored(teacher_file, image_tar, tmp_path,
                                                                                   capsys, distill, option, value):
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "w1a8", "--data", str(image_tar),
                      "--out", str(tmp_path / "x.safetensors"), "--distill", distill, option, value]) == 2
    assert f"error: {option} " in capsys.readouterr().err and not (tmp_path / "x.safetensors.run").exists()


def test_data_of_other_classes_is_refused_before_training(teacher_file, tmp_path, capsys):
    other = write_tree(tmp_path / "other", classes=("a", "b", "c"))
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "w1a8", "--data", str(other),
                      "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "are not the model's" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors.run").exists()


def test_an_archive_of_other_classes_is_refused_before_any_image_is_decoded(teacher_file, tmp_path, capsys,
                                                                            no_decoding):
    other = write_tar(write_tree(tmp_path / "other", classes=("a", "b", "c")), tmp_path / "other.tar.gz")
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "w1a8", "--data", str(other),
                      "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "are not the model's" in capsys.readouterr().err


def test_a_val_folder_of_other_classes_is_refused_before_training(teacher_file, tmp_path, capsys):
    tree = write_tree(tmp_path / "tree")
    write_tree(tree, splits=("val",), classes=("cat", "dog", "horse"))
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "w1a8", "--data", str(tree),
                      "--out", str(tmp_path / "x.safetensors"), "--epochs", "1", "--batch-size", "8"]) == 2
    assert "are not the model's" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors.run").exists()


def test_an_eval_split_the_data_lacks_is_refused_before_training(teacher_file, tmp_path, capsys):
    tree = write_tree(tmp_path / "tree", splits=("train",))
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "w1a8", "--data", str(tree),
                      "--out", str(tmp_path / "x.safetensors"), "--epochs", "1", "--batch-size", "8",
                      "--eval-split", "test"]) == 2
    assert "no test/ folder" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors.run").exists()


def test_the_gpu_profile_names_results_after_the_teacher_and_hands_them_back(teacher_file, image_tree, tmp_path):
    env = {**os.environ, "PROFILE": "gpu", "TEACHER": str(teacher_file), "DATA": str(image_tree),
           "ONLY": "w1.58a8 qvit-w3", "EPOCHS": "2", "BATCH": "8", "TIME_BUDGET": "2", "VAL_LIMIT": "6",
           "RUNS": str(tmp_path / "runs"), "ASSETS": str(tmp_path / "assets"),
           "RESULTS": str(tmp_path / "results" / "qat.json"), "OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", "quant/run_qat_all.sh"], cwd=Path(__file__).parents[1], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "all QAT runs done" in r.stdout, r.stdout + r.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["fp-qvit-w3.safetensors", "fp-w1.58a8.safetensors",
                                                    "qat-qvit-w3.bits.json", "qat.json"]
    runs = json.loads((tmp_path / "out" / "qat.json").read_text())["runs"]
    assert set(runs) == {"w1.58a8", "qvit-w3"}
    assert all(run["float16"] for run in runs.values())  # the GPU profile packs the float rest in float16


def test_the_gpu_profile_skips_runs_that_would_outlast_the_calls_deadline(teacher_file, image_tree, tmp_path):
    env = {**os.environ, "PROFILE": "gpu", "TEACHER": str(teacher_file), "DATA": str(image_tree),
           "ONLY": "w1.58a8", "TIME_BUDGET": "100", "DEADLINE": "120", "RUNS": str(tmp_path / "runs"),
           "ASSETS": str(tmp_path / "assets"), "OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", "quant/run_qat_all.sh"], cwd=Path(__file__).parents[1], env=env,
                       capture_output=True, text=True, timeout=60)
    assert "w1.58a8: skipped, it would not end within DEADLINE=120 s" in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("var", ["TIME_BUDGET", "DEADLINE"])
def test_the_gpu_profile_refuses_a_time_in_fractions_of_a_second_instead_of_reporting_all_done(teacher_file,
                                                                                               tmp_path, var):
    env = {**os.environ, "PROFILE": "gpu", "TEACHER": str(teacher_file), "DATA": str(tmp_path / "data"),
           "ONLY": "w1a8", "RUNS": str(tmp_path / "runs"), "ASSETS": str(tmp_path / "assets"), var: "75.5"}
    r = subprocess.run(["bash", "quant/run_qat_all.sh"], cwd=Path(__file__).parents[1], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"{var} must be whole seconds" in r.stderr, r.stdout + r.stderr
    assert "all QAT runs done" not in r.stdout


@pytest.mark.parametrize("var, value, message", [("DATA", "no-such-data", "data .*no-such-data not found"),
                                                 ("EPOCHS", "two", "EPOCHS must be a whole number"),
                                                 ("LR", "fast", "LR must be a number")])
def test_the_qat_script_refuses_a_bad_setting_before_the_first_run(teacher_file, tmp_path, var, value, message):
    env = {**os.environ, "TEACHER": str(teacher_file), "DATA": str(tmp_path), "RUNS": str(tmp_path / "runs"),
           "RESULTS": str(tmp_path / "qat.json"), var: str(tmp_path / value) if var == "DATA" else value}
    r = subprocess.run(["bash", "quant/run_qat_all.sh"], cwd=Path(__file__).parents[1], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and re.search(message, r.stderr), r.stdout + r.stderr
    assert not (tmp_path / "runs").exists()


def test_the_qat_script_refuses_a_run_it_does_not_know(teacher_file, tmp_path):
    env = {**os.environ, "TEACHER": str(teacher_file), "DATA": str(tmp_path), "ONLY": "lsq-w5",
           "RUNS": str(tmp_path / "runs"), "RESULTS": str(tmp_path / "qat.json")}
    r = subprocess.run(["bash", "quant/run_qat_all.sh"], cwd=Path(__file__).parents[1], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown run lsq-w5 (runs:" in r.stderr, r.stdout + r.stderr


def test_a_failed_run_does_not_hand_back_the_model_already_at_its_output_path(teacher_file, tmp_path):
    (tmp_path / "assets").mkdir()
    shipped = tmp_path / "assets" / "fp-w1.58a8.safetensors"   # the shipped ternary model of this teacher
    shipped.write_bytes(b"an older model")
    (tmp_path / "empty-data").mkdir()  # the run fails on it: no class folders
    env = {**os.environ, "PROFILE": "gpu", "TEACHER": str(teacher_file), "DATA": str(tmp_path / "empty-data"),
           "ONLY": "w1.58a8", "RUNS": str(tmp_path / "runs"), "ASSETS": str(tmp_path / "assets"),
           "OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", "quant/run_qat_all.sh"], cwd=Path(__file__).parents[1], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "w1.58a8: not finished" in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "out" / shipped.name).exists()


def test_a_run_ended_by_its_time_budget_records_the_epochs_it_trained(teacher_file, image_tar, tmp_path):
    results = tmp_path / "qat.json"
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "w1a8", "--data", str(image_tar),
                      "--out", str(tmp_path / "b.safetensors"), "--epochs", "50", "--batch-size", "8",
                      "--time-budget", "0.01", "--eval-split", "test", "--results", str(results)]) == 0
    entry = json.loads(results.read_text())["runs"]["w1a8"]
    log = (tmp_path / "b.safetensors.run" / "finetune" / "log.jsonl").read_text().splitlines()
    assert entry["epochs"] == len(log) < entry["max_epochs"] == 50


def test_save_every_scores_val_only_every_n_epochs_and_after_the_last(teacher_file, image_tar, tmp_path):
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "w1a8", "--data", str(image_tar),
                      "--out", str(tmp_path / "b.safetensors"), "--epochs", "3", "--batch-size", "8",
                      "--save-every", "2"]) == 0
    log = [json.loads(line) for line in (tmp_path / "b.safetensors.run" / "finetune" / "log.jsonl").read_text()
           .splitlines()]
    assert ["val_top1" in r for r in log] == [False, True, True]


def test_a_warm_restart_at_learning_rate_zero_writes_the_earlier_runs_model(teacher_file, image_tar, tmp_path):
    common = ["--teacher", str(teacher_file), "--recipe", "w1a8", "--data", str(image_tar), "--epochs", "1",
              "--batch-size", "8"]
    first, again = tmp_path / "first.safetensors", tmp_path / "again.safetensors"
    assert run(main, common + ["--out", str(first)]) == 0
    state = tmp_path / "first.safetensors.run" / "finetune" / "last.pt"
    assert run(main, common + ["--out", str(again), "--init", str(state), "--lr", "0", "--calib-size", "3"]) == 0
    a, b = quant.load_quantized(first).state_dict(), quant.load_quantized(again).state_dict()
    assert a.keys() == b.keys()
    moved = {k for k in a if not torch.equal(a[k], b[k])}   # BatchNorm statistics still move in training mode
    assert all("running_" in k for k in moved)


def test_a_warm_restart_into_the_run_folder_it_starts_from_is_refused_not_resumed(teacher_file, image_tar, tmp_path,
                                                                                  capsys):
    """Resuming that folder's finished state would train nothing and write the earlier model again."""
    args = ["--teacher", str(teacher_file), "--recipe", "w1a8", "--data", str(image_tar), "--epochs", "1",
            "--batch-size", "8", "--out", str(tmp_path / "m.safetensors")]
    assert run(main, args) == 0
    capsys.readouterr()
    state = tmp_path / "m.safetensors.run" / "finetune" / "last.pt"
    assert run(main, args + ["--init", str(state)]) == 2
    assert "another config (init" in capsys.readouterr().err


def test_a_warm_restart_from_a_run_of_the_other_bitnet_recipe_is_refused(teacher_file, image_tar, tmp_path, capsys):
    """A binary and a ternary student hold the same tensors: only the recipe the state records tells them apart."""
    common = ["--teacher", str(teacher_file), "--data", str(image_tar), "--epochs", "1", "--batch-size", "8"]
    assert run(main, common + ["--recipe", "w1a8", "--out", str(tmp_path / "b.safetensors")]) == 0
    capsys.readouterr()
    state = tmp_path / "b.safetensors.run" / "finetune" / "last.pt"
    assert run(main, common + ["--recipe", "w1.58a8", "--out", str(tmp_path / "t.safetensors"), "--init",
                               str(state)]) == 2
    assert "another recipe (name 'w1a8'" in capsys.readouterr().err
    assert not (tmp_path / "t.safetensors.run").exists()


@pytest.mark.parametrize("kind", ["missing", "not a torch file", "no model weights", "another student"])
def test_a_warm_restart_from_a_bad_state_is_refused_before_training(teacher_file, image_tar, tmp_path, capsys, kind):
    state = tmp_path / "last.pt"
    if kind == "not a torch file":
        state.write_bytes(b"not a resume state")
    elif kind == "no model weights":
        torch.save({"epoch": 1}, state)
    elif kind == "another student":
        torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(2, 2)}}, state)
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "w1.58a8", "--data", str(image_tar),
                      "--out", str(tmp_path / "x.safetensors"), "--init", str(state)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]   # after the data's progress bar, for another student
    assert err.startswith("error: ") and "last.pt" in err
    assert not (tmp_path / "x.safetensors.run").exists()


def test_a_warm_restart_of_a_qvit_recipe_is_refused(teacher_file, image_tar, tmp_path, capsys):
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "qvit", "--data", str(image_tar),
                      "--out", str(tmp_path / "x.safetensors"), "--init", str(tmp_path / "last.pt")]) == 2
    assert "--init warm-restarts the BitNet recipes" in capsys.readouterr().err


def test_the_feature_loss_is_its_weight_times_the_mse_of_the_final_normalised_tokens(tiny_model):
    student = copy.deepcopy(tiny_model)
    with torch.no_grad():
        student.norm.weight.mul_(2)
    feats = []
    for m in (student, tiny_model):
        m.norm.register_forward_hook(lambda mod, inp, out: feats.append(out))
    loss = FeatureDistill(student, tiny_model, 0.25)
    x = torch.randn(2, 3, 16, 16)
    student(x), tiny_model(x)
    expected = 0.25 * F.mse_loss(feats[0], feats[1]).item()
    assert expected > 0 and loss(student).item() == pytest.approx(expected)


def fake_fit(calls, widen_bits=False):
    """A stand-in for quant.train.fit: records each stage's epochs, extra loss and whether the student's widths
    still learn, writes one log record per epoch, and (widen_bits) ends the searching stage at the widest widths."""
    def fit(student, train, val, cfg, out_dir, extra_loss=None, **kwargs):
        learning = any(q.learn_bits for q in qvit.quantizers(student).values())
        calls.append((Path(out_dir).name, cfg.epochs, extra_loss(student) if extra_loss else None, learning))
        if widen_bits and Path(out_dir).name == "search":
            for q in qvit.quantizers(student).values():
                q.set_bits(q.b_max)
        Path(out_dir).mkdir(parents=True)
        Path(out_dir, "log.jsonl").write_text("".join(json.dumps({"epoch": e, "seconds": 1.0}) + "\n"
                                                      for e in range(cfg.epochs)))
        return student, True
    return fit


def test_qvit_searches_under_penalty_and_features_then_fine_tunes_fixed_widths_on_features_alone(
        tiny_model, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("quant.train.fit", fake_fit(calls))
    student = quant.quantize(copy.deepcopy(tiny_model), "qvit")
    qvit.calibrate(student, torch.randn(2, 3, 16, 16))
    qvit.measure_macs(student, torch.randn(1, 3, 16, 16))
    _, done, logs = train_stages(student, tiny_model, quant.recipe("qvit"), [0] * 6, None, TrainConfig(epochs=3),
                                 tmp_path, 2, penalty=lambda m: 1.0, features=lambda m: 10.0)
    assert done and calls == [("search", 2, 11.0, True), ("finetune", 1, 10.0, False)]
    assert len(logs) == 3  # every epoch of both stages


def test_the_searched_widths_are_brought_within_the_budget_before_fine_tuning(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr("quant.train.fit", fake_fit([], widen_bits=True))
    r = quant.recipe("qvit", budget_bits=3)
    student = quant.quantize(copy.deepcopy(tiny_model), "qvit")
    qvit.calibrate(student, torch.randn(2, 3, 16, 16))
    qvit.measure_macs(student, torch.randn(1, 3, 16, 16))
    train_stages(student, tiny_model, r, [0] * 6, None, TrainConfig(epochs=2), tmp_path, 1)
    assert qvit.bitops(student) <= qvit.bitops(student, uniform_bits=3)


def test_an_earlier_runs_search_log_is_not_counted_by_a_run_without_a_searching_stage(tiny_model, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setattr("quant.train.fit", fake_fit([]))
    (tmp_path / "search").mkdir()  # left by a qvit run in the same folder
    (tmp_path / "search" / "log.jsonl").write_text(json.dumps({"epoch": 1, "seconds": 1.0}) + "\n")
    student = quant.quantize(copy.deepcopy(tiny_model), "lsq")
    _, done, logs = train_stages(student, tiny_model, quant.recipe("lsq"), [0] * 6, None, TrainConfig(epochs=2),
                                 tmp_path, 0)
    assert done and len(logs) == 2


def test_a_stage_of_one_epoch_on_one_image_is_announced_in_the_singular(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("quant.train.fit", fake_fit([]))
    student = quant.quantize(copy.deepcopy(tiny_model), "lsq")
    train_stages(student, tiny_model, quant.recipe("lsq"), [0], None, TrainConfig(epochs=1), tmp_path, 0)
    assert "finetune stage: 1 epoch of 1 image\n" in capsys.readouterr().out


def stages_of_a_minute(monkeypatch, tiny_model, calls, finished=()):
    """A qvit student whose stages (their time limits recorded in `calls`) each take a minute of quant.qat's
    clock, logging an epoch, or (those named in `finished`, trained by an earlier run) logging nothing."""
    clock = [0.0]

    def a_minute(student, train, val, cfg, out_dir, time_limit=None, **kwargs):
        calls.append((Path(out_dir).name, time_limit))
        clock[0] += 60
        if Path(out_dir).name not in finished:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps({"epoch": 1, "seconds": 60.0}) + "\n")
        return student, True
    monkeypatch.setattr("quant.qat.time", SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr("quant.train.fit", a_minute)
    student = quant.quantize(copy.deepcopy(tiny_model), "qvit")
    qvit.calibrate(student, torch.randn(2, 3, 16, 16))
    qvit.measure_macs(student, torch.randn(1, 3, 16, 16))
    return student


def test_the_time_limit_is_shared_by_the_stages_fine_tuning_getting_what_the_search_left(tiny_model, tmp_path,
                                                                                         monkeypatch):
    calls = []
    student = stages_of_a_minute(monkeypatch, tiny_model, calls)
    _, done, _ = train_stages(student, tiny_model, quant.recipe("qvit"), [0] * 6, None, TrainConfig(epochs=2),
                              tmp_path, 1, time_limit=100)
    assert done and calls == [("search", 100), ("finetune", 40)]


def test_a_search_that_spends_the_time_limit_leaves_the_fine_tuning_unstarted(tiny_model, tmp_path, monkeypatch):
    calls = []
    student = stages_of_a_minute(monkeypatch, tiny_model, calls)
    _, done, _ = train_stages(student, tiny_model, quant.recipe("qvit"), [0] * 6, None, TrainConfig(epochs=2),
                              tmp_path, 1, time_limit=60)
    assert not done and calls == [("search", 60)]


def test_reloading_a_stage_an_earlier_run_finished_is_not_charged_to_the_time_limit(tiny_model, tmp_path,
                                                                                    monkeypatch):
    """Charged, a limit shorter than the reload stopped every rerun before the fine-tuning, which never began."""
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "log.jsonl").write_text(json.dumps({"epoch": 1, "seconds": 60.0}) + "\n")
    calls = []
    student = stages_of_a_minute(monkeypatch, tiny_model, calls, finished=("search",))
    _, done, _ = train_stages(student, tiny_model, quant.recipe("qvit"), [0] * 6, None, TrainConfig(epochs=2),
                              tmp_path, 1, time_limit=30)
    assert done and calls == [("search", 30), ("finetune", 30)]


def test_the_student_is_initialised_on_calib_size_training_images(tiny_model, image_tree, monkeypatch):
    seen = []
    init = bitlinear.init_input_norms
    monkeypatch.setattr(bitlinear, "init_input_norms", lambda model, x: seen.append(len(x)) or init(model, x))
    train = load_split(image_tree, "train", 16)
    prepare_student(tiny_model, quant.recipe("w1.58a8"), train, 5, 0, torch.device("cpu"))
    assert seen == [5]


def test_the_qvit_penalty_takes_the_bitops_weight(tiny_model, image_tree):
    train = load_split(image_tree, "train", 16)
    _, penalty = prepare_student(tiny_model, quant.recipe("qvit"), train, 1, 0, torch.device("cpu"), 0.25)
    assert penalty.eta == 0.25


def test_recording_a_run_keeps_the_other_runs(tmp_path):
    path = tmp_path / "qat.json"
    record_result(path, "a", {"top1": 0.5})
    record_result(path, "b", {"top1": 0.6})
    record_result(path, "a", {"top1": 0.7})
    assert read_results(path)["runs"] == {"a": {"top1": 0.7}, "b": {"top1": 0.6}}


def test_a_results_file_whose_runs_are_not_objects_is_refused(tmp_path):
    (tmp_path / "qat.json").write_text('{"runs": {"w1a8": 0.5}}')
    with pytest.raises(ValueError, match="not a quant.qat results file"):
        read_results(tmp_path / "qat.json")


def test_a_results_file_of_another_stage_is_refused_not_recorded_into(tmp_path):
    """A QAT run recorded into ptq.json was dropped when quant.ptq_results next rewrote it."""
    (tmp_path / "ptq.json").write_text('{"results": [{"recipe": "w4", "top1": 0.7}]}')
    with pytest.raises(ValueError, match="ptq.json is not a quant.qat results file"):
        record_result(tmp_path / "ptq.json", "w1a8", {"top1": 0.6})
    assert json.loads((tmp_path / "ptq.json").read_text()) == {"results": [{"recipe": "w4", "top1": 0.7}]}


def test_a_results_file_holding_an_integer_of_more_digits_than_python_reads_is_refused_naming_it(tmp_path):
    (tmp_path / "qat.json").write_text('{"runs": {"w1a8": {"n": ' + "9" * 5000 + "}}}")
    with pytest.raises(ValueError, match="qat.json is not a readable results JSON"):
        read_results(tmp_path / "qat.json")


def _recorded_teacher(path) -> dict:
    """What quant.qat records of its teacher."""
    return {"teacher": str(path), "teacher_bytes": path.stat().st_size,
            "teacher_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


@pytest.mark.parametrize("change, known", [({}, 0.75), ({"teacher_sha256": "0" * 64}, None), ({"split": "val"}, None),
                                           ({"n": 17}, None), ({"teacher_top1": "0.75"}, None)])
def test_the_teachers_score_is_reused_only_for_the_same_file_split_and_images(teacher_file, tmp_path, change, known):
    entry = {**_recorded_teacher(teacher_file), "split": "test", "n": 18, "teacher_top1": 0.75}
    record_result(tmp_path / "qat.json", "earlier", {**entry, **change})
    assert _known_teacher_top1(str(tmp_path / "qat.json"), file_sha256(teacher_file), "test", 18) == known


def test_the_teachers_score_is_not_reused_for_another_teacher_at_the_same_path_and_of_the_same_size(teacher_file,
                                                                                                     tmp_path):
    # a teacher trained again into the same file, or the same relative path typed in another working directory
    record_result(tmp_path / "qat.json", "earlier", {**_recorded_teacher(teacher_file), "split": "test", "n": 18,
                                                     "teacher_top1": 0.75})
    size = teacher_file.stat().st_size
    torch.manual_seed(1)
    save_model(VisionTransformer(TINY), teacher_file)
    assert teacher_file.stat().st_size == size
    assert _known_teacher_top1(str(tmp_path / "qat.json"), file_sha256(teacher_file), "test", 18) is None


def test_the_teachers_score_is_not_reused_for_a_teacher_differing_past_its_first_megabyte(tmp_path):
    teacher = tmp_path / "fp.safetensors"  # (the file is hashed, not read as a model)
    teacher.write_bytes(bytes(3 << 20))
    record_result(tmp_path / "qat.json", "earlier", {**_recorded_teacher(teacher), "split": "test", "n": 18,
                                                     "teacher_top1": 0.75})
    assert _known_teacher_top1(str(tmp_path / "qat.json"), file_sha256(teacher), "test", 18) == 0.75
    teacher.write_bytes(bytes((3 << 20) - 1) + b"\x01")
    assert _known_teacher_top1(str(tmp_path / "qat.json"), file_sha256(teacher), "test", 18) is None


def test_a_warm_restart_from_a_missing_state_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such resume state"):
        read_init(tmp_path / "last.pt")


def test_a_warm_restart_from_a_state_without_model_weights_is_refused(tmp_path):
    state = dict.fromkeys(("optimizer", "rng", "epoch", "trained_seconds", "config"), 0)
    torch.save({**state, "model": [torch.zeros(2)]}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="is not a bitvit resume state"):
        read_init(tmp_path / "last.pt")


def test_a_warm_restart_from_weights_missing_a_tensor_is_refused(tiny_model):
    student = quant.quantize(copy.deepcopy(tiny_model), "w1.58a8")
    weights = dict(student.state_dict())
    weights.pop("head.weight")
    with pytest.raises(ValueError, match="last.pt holds the weights of another student"):
        init_student(student, weights, "last.pt")


def test_results_without_an_eval_split_are_refused(teacher_file, image_tar, tmp_path, capsys):
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "w1a8", "--data", str(image_tar),
                      "--out", str(tmp_path / "x.safetensors"), "--results", str(tmp_path / "qat.json")]) == 2
    assert "--results needs --eval-split" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, needs", [("--eval-limit", "10", "--eval-split"), ("--name", "mine", "--results")])
def test_a_flag_its_companion_is_missing_for_is_refused_not_ignored(teacher_file, image_tar, tmp_path, capsys,
                                                                    flag, value, needs):
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "w1a8", "--data", str(image_tar),
                      "--out", str(tmp_path / "x.safetensors"), flag, value]) == 2
    assert f"{flag} needs {needs}" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors.run").exists()


def test_a_recorded_run_is_named_by_name_and_records_its_teacher_and_float16(teacher_file, image_tar, tmp_path):
    results = tmp_path / "qat.json"
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "w1a8", "--data", str(image_tar),
                      "--out", str(tmp_path / "b.safetensors"), "--epochs", "1", "--batch-size", "8", "--float16",
                      "--eval-split", "test", "--results", str(results), "--name", "mine"]) == 0
    entry = read_results(results)["runs"]["mine"]
    assert (entry["name"], entry["recipe"], entry["float16"]) == ("mine", "w1a8", True)
    assert {k: entry[k] for k in ("teacher", "teacher_bytes", "teacher_sha256")} == _recorded_teacher(teacher_file)


def test_a_run_records_the_teacher_it_loaded_not_one_written_to_its_path_while_it_trained(teacher_file, image_tar,
                                                                                          tmp_path, monkeypatch):
    loaded = _recorded_teacher(teacher_file)

    def train_stages_meanwhile_retraining_the_teacher(*args):
        torch.manual_seed(1)
        save_model(VisionTransformer(TINY), teacher_file)  # the same size, other weights
        return train_stages(*args)

    monkeypatch.setattr("quant.qat.train_stages", train_stages_meanwhile_retraining_the_teacher)
    results = tmp_path / "qat.json"
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "w1a8", "--data", str(image_tar),
                      "--out", str(tmp_path / "b.safetensors"), "--epochs", "1", "--batch-size", "8",
                      "--eval-split", "test", "--results", str(results), "--name", "mine"]) == 0
    assert _recorded_teacher(teacher_file) != loaded
    entry = read_results(results)["runs"]["mine"]
    assert {k: entry[k] for k in ("teacher", "teacher_bytes", "teacher_sha256")} == loaded


def test_a_run_reuses_the_teachers_score_recorded_for_the_same_teacher_and_images(teacher_file, image_tar, tmp_path):
    results = tmp_path / "qat.json"
    record_result(results, "earlier", {**_recorded_teacher(teacher_file), "split": "test", "n": 18,
                                       "teacher_top1": 0.123})  # no real score of 18 images
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "w1a8", "--data", str(image_tar),
                      "--out", str(tmp_path / "b.safetensors"), "--epochs", "1", "--batch-size", "8",
                      "--eval-split", "test", "--results", str(results)]) == 0
    entry = read_results(results)["runs"]["w1a8"]
    assert entry["teacher_top1"] == 0.123 and entry["drop_points"] == round(100 * (0.123 - entry["top1"]), 4)


def test_the_searching_stage_takes_the_search_ratio_of_the_epochs_rounded_to_nearest(teacher_file, image_tar,
                                                                                     tmp_path, monkeypatch):
    search = []
    monkeypatch.setattr("quant.qat.prepare_student", lambda teacher, *args: (teacher, None))  # no calibration
    monkeypatch.setattr("quant.qat.train_stages", lambda student, teacher, r, train, val, cfg, run_dir, search_epochs,
                        *args: search.append(search_epochs) or (student, False, []))
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "qvit", "--data", str(image_tar), "--out",
                      str(tmp_path / "q.safetensors"), "--epochs", "3", "--search-ratio", "0.6"]) == 0
    assert search == [2]  # 1.8 epochs


@pytest.mark.parametrize("epochs, searching", [(3, 2), (5, 3), (7, 4)])
def test_half_a_search_epoch_rounds_up_whatever_the_epochs(teacher_file, image_tar, tmp_path, monkeypatch, epochs,
                                                          searching):
    """Python's round takes halves to even: 5 epochs searched 2 of them, 7 searched 4."""
    search = []
    monkeypatch.setattr("quant.qat.prepare_student", lambda teacher, *args: (teacher, None))  # no calibration
    monkeypatch.setattr("quant.qat.train_stages", lambda student, teacher, r, train, val, cfg, run_dir, search_epochs,
                        *args: search.append(search_epochs) or (student, False, []))
    assert run(main, ["--teacher", str(teacher_file), "--recipe", "qvit", "--data", str(image_tar), "--out",
                      str(tmp_path / "q.safetensors"), "--epochs", str(epochs)]) == 0
    assert search == [searching]
