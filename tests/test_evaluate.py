"""`python -m quant.evaluate`: its report, its last line, ONNX exports scored like torch models, and one
clear error for bad input."""
import functools
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from quant.data import ImageSet, load_split
from quant.evaluate import evaluate
from export.exporter import export
from quant.models import count_parameters


def test_evaluate_counts_correct_predictions(tiny_model, image_tree):
    data = load_split(image_tree, "test", image_size=16, progress=False)  # 6 images a class, its colour the class
    tiny_model.forward = lambda x: x.mean((2, 3))[:, [0, 2, 1]]  # reads the colour, but calls class 1 "2" and 2 "1"
    res = evaluate(tiny_model, data)
    assert res["confusion"] == [[6, 0, 0], [0, 0, 6], [0, 6, 0]]
    assert res["top1"] == pytest.approx(1 / 3)
    assert res["per_class"] == {"cat": 1.0, "dog": 0.0, "frog": 0.0}


def test_evaluate_scores_a_set_of_some_of_the_models_classes_by_their_names(tiny_model, image_tree):
    import shutil
    shutil.rmtree(image_tree / "test" / "dog")  # cat and frog: the folders' labels 0 and 1, the model's 0 and 2
    tiny_model.forward = lambda x: x.mean((2, 3))  # reads the colour: always right
    res = evaluate(tiny_model, load_split(image_tree, "test", image_size=16, progress=False))
    assert res["top1"] == 1.0 and res["confusion"] == [[6, 0, 0], [0, 0, 0], [0, 0, 6]]
    assert res["per_class"] == {"cat": 1.0, "dog": None, "frog": 1.0}


def test_per_class_accuracy_keeps_a_name_given_to_two_classes_apart_by_their_indices(tiny_model, image_tree):
    import dataclasses
    tiny_model.config = dataclasses.replace(tiny_model.config, classes=("crane", "dog", "crane"))
    data = load_split(image_tree, "test", image_size=16, progress=False)
    data = ImageSet(data.images, data.labels, tiny_model.config.classes)
    tiny_model.forward = lambda x: x.mean((2, 3))  # reads the colour: right about every image
    assert evaluate(tiny_model, data)["per_class"] == {"crane (class 0)": 1.0, "dog": 1.0, "crane (class 2)": 1.0}


def test_per_class_accuracy_of_unnamed_classes_is_keyed_by_their_numbers(tiny_model, image_tree):
    data = load_split(image_tree, "test", image_size=16, progress=False)
    tiny_model.forward = lambda x: x.mean((2, 3))
    assert list(evaluate(tiny_model, ImageSet(data.images, data.labels, ()))["per_class"]) == [
        "class 0", "class 1", "class 2"]


def test_cli_reports_and_ends_with_top1(checkpoint, image_tree, tmp_path):
    out = subprocess.run([sys.executable, "-m", "quant.evaluate", "--checkpoint", str(checkpoint),
                          "--data", str(image_tree), "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, check=True).stdout
    assert re.fullmatch(r"top1=0\.\d{4}", out.strip().splitlines()[-1])
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res["per_class"]) == {"cat", "dog", "frog"}
    assert res["params"] > 0 and res["size_bytes"] == checkpoint.stat().st_size
    assert res["latency_ms_batch1_cpu"] > 0
    assert res["command"].startswith("python -m quant.evaluate --checkpoint") and res["machine"] and res["date"]
    assert (tmp_path / "r.confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "parameters" in out and "MB on disk" in out


def test_cli_on_one_thread_and_one_image_says_so_in_the_singular(checkpoint, image_tree, capsys):
    from quant.evaluate import main
    threads = torch.get_num_threads()
    try:
        main(["--checkpoint", str(checkpoint), "--data", str(image_tree), "--threads", "1", "--limit", "1"])
    finally:  # the rest of the session on the threads it had
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert " (1 thread)\n" in out and "test split: 1 image\n" in out


def test_the_confusion_plot_is_titled_with_how_many_images_of_the_split_were_scored(checkpoint, image_tree, tmp_path,
                                                                                    monkeypatch):
    from quant import evaluate
    titles = []
    monkeypatch.setattr(evaluate, "plot_confusion", lambda cm, classes, path, title: titles.append(title))
    evaluate.main(["--checkpoint", str(checkpoint), "--data", str(image_tree), "--limit", "2",
                   "--json", str(tmp_path / "r.json")])
    assert titles[0].startswith(f"{checkpoint.name} on 2 test images (top-1 ")


def test_a_default_confusion_name_past_the_file_name_limit_is_refused_before_scoring_naming_the_option(
        tiny_model, image_tree, tmp_path, capsys, monkeypatch):
    from quant.cli import run
    from quant.evaluate import main
    from quant.models import save_model
    checkpoint = tmp_path / ("m" * 232 + ".safetensors")  # 244 bytes, and 258 with .confusion.png
    save_model(tiny_model, checkpoint)
    monkeypatch.setattr("quant.evaluate.evaluate", lambda *a, **k: pytest.fail("scored before the refusal"))
    assert run(main, ["--checkpoint", str(checkpoint), "--data", str(image_tree)]) == 2
    err = capsys.readouterr().err
    assert "confusion.png: a file name of 258 bytes" in err and "give --confusion PATH, or a shorter checkpoint" in err


def test_cli_refuses_data_of_other_classes_before_any_image_is_decoded(checkpoint, tmp_path, capsys, no_decoding):
    from quant.cli import run
    from quant.evaluate import main
    from tests.conftest import write_tree
    other = write_tree(tmp_path / "other", classes=("a", "b", "c"))
    assert run(main, ["--checkpoint", str(checkpoint), "--data", str(other)]) == 2
    assert "are not the model's" in capsys.readouterr().err


def test_cli_scores_a_tree_of_some_of_the_models_classes_by_their_names(checkpoint, image_tree, tmp_path):
    import shutil
    shutil.rmtree(image_tree / "test" / "cat")  # photos of a dog and a frog, scored by a cat/dog/frog model
    out = subprocess.run([sys.executable, "-m", "quant.evaluate", "--checkpoint", str(checkpoint),
                          "--data", str(image_tree), "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, check=True).stdout
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["n"] == 12 and res["per_class"]["cat"] is None and res["confusion"][0] == [0, 0, 0]
    assert sum(map(sum, res["confusion"][1:])) == 12 and re.search(r"cat +no images", out)


def test_cli_json_records_the_device_that_scored(checkpoint, image_tree, tmp_path):
    subprocess.run([sys.executable, "-m", "quant.evaluate", "--checkpoint", str(checkpoint), "--data", str(image_tree),
                    "--json", str(tmp_path / "r.json")], capture_output=True, text=True, check=True)
    assert json.loads((tmp_path / "r.json").read_text())["device"] == "cpu"  # no GPU here


def test_a_model_giving_nan_logits_is_refused_not_scored_as_class_zero(tiny_model, image_tree):
    with torch.no_grad():
        tiny_model.head.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="gives NaN or infinite logits for .* images"):
        evaluate(tiny_model, load_split(image_tree, "test", image_size=16, progress=False))


def test_cli_scores_an_onnx_export_in_onnx_runtime_as_its_torch_model_scores(tiny_model, image_tree, tmp_path):
    onnx_path = export(tiny_model, tmp_path / "tiny.onnx", "fp32")
    out = subprocess.run([sys.executable, "-m", "quant.evaluate", "--checkpoint", str(onnx_path),
                          "--data", str(image_tree), "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, check=True).stdout
    res = json.loads((tmp_path / "r.json").read_text())
    torch_res = evaluate(tiny_model, load_split(image_tree, "test", image_size=16, progress=False))
    assert res["runtime"] == "onnxruntime" and "in onnxruntime" in out
    assert res["top1"] == torch_res["top1"] and res["confusion"] == torch_res["confusion"]
    assert res["params"] == count_parameters(tiny_model) and res["size_bytes"] == onnx_path.stat().st_size
    assert res["latency_ms_batch1_cpu"] > 0


@pytest.mark.parametrize("make_bad, message", [
    (lambda p: p / "absent.safetensors", "no such model file"),
    (lambda p: (p / "junk.safetensors").write_bytes(b"\x00" * 64) and p / "junk.safetensors",
     "not a readable safetensors file"),
    (lambda p: (p / "junk.onnx").write_bytes(b"\x07garbage" * 8) and p / "junk.onnx", "not a readable ONNX model"),
    (lambda p: p / "absent.onnx", "no such ONNX file"),
    (lambda p: (p / "JUNK.ONNX").write_bytes(b"\x07garbage" * 8) and p / "JUNK.ONNX", "not a readable ONNX model"),
    (lambda p: torch.save({k: 0 for k in ("model", "optimizer", "rng", "epoch", "trained_seconds", "config")},
                          p / "last.pt") or p / "last.pt", "resume state"),   # quant.train's last.pt
])
def test_cli_bad_checkpoint_is_one_error_line(tmp_path, image_tree, make_bad, message):
    r = subprocess.run([sys.executable, "-m", "quant.evaluate", "--checkpoint", str(make_bad(tmp_path)),
                        "--data", str(image_tree)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_wrong_data_path_is_one_error_line(checkpoint, tmp_path):
    r = subprocess.run([sys.executable, "-m", "quant.evaluate", "--checkpoint", str(checkpoint),
                        "--data", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert r.returncode == 2 and "data path does not exist" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_under_torchrun_is_refused_with_one_clear_line(checkpoint, image_tree, tmp_path):
    r = subprocess.run([sys.executable, "-m", "quant.evaluate", "--checkpoint", str(checkpoint), "--data", str(image_tree),
                        "--json", str(tmp_path / "r.json")], capture_output=True, text=True,
                       env={**os.environ, "WORLD_SIZE": "2"})  # each process scored and wrote the same files
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: this command runs in one process: start it with python, not torchrun (quant.train is the one that trains in several)"]
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "r.confusion.png").exists()


def test_cli_says_it_is_timing_latency_before_the_silent_forward_passes_of_it(checkpoint, image_tree, tmp_path,
                                                                              monkeypatch, capsys):
    import quant.evaluate
    from quant.cli import run
    said = []  # stderr when the timing began (33 batch-1 forwards after the bar has gone: many seconds for ViT-B)
    monkeypatch.setattr(quant.evaluate, "latency_ms", lambda *a: said.append(capsys.readouterr().err) or 1.0)
    assert run(quant.evaluate.main, ["--checkpoint", str(checkpoint), "--data", str(image_tree),
                                     "--json", str(tmp_path / "r.json")]) == 0
    assert "timing batch-1 latency on the CPU" in said[0]


def test_cli_writes_its_results_to_out_the_plot_beside_them(checkpoint, image_tree, tmp_path, monkeypatch):
    import quant.evaluate
    from quant.cli import run
    monkeypatch.setattr(quant.evaluate, "latency_ms", lambda *a: 1.0)
    out = tmp_path / "r.json"  # (--json, its first name, as the other tests give it)
    assert run(quant.evaluate.main, ["--checkpoint", str(checkpoint), "--data", str(image_tree), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["confusion_png"] == str(tmp_path / "r.confusion.png")
    assert (tmp_path / "r.confusion.png").is_file()


def test_cli_refuses_an_out_not_named_json_before_reading_model_or_data(tmp_path, capsys):
    import quant.evaluate
    from quant.cli import run
    assert run(quant.evaluate.main, ["--checkpoint", str(tmp_path / "none.safetensors"), "--data",
                                     str(tmp_path / "none"), "--out", str(tmp_path / "r.txt")]) != 0
    assert "r.txt: give a .json file name to write" in capsys.readouterr().err


def test_the_scoring_bar_counts_images_not_batches(tiny_model, image_tree, capsys):
    data = load_split(image_tree, "test", image_size=16, progress=False)  # 18 images
    tiny_model.forward = lambda x: x.mean((2, 3))
    evaluate(tiny_model, data, batch_size=4, progress=True)
    assert "| 0/18 [00:00<?, ?img/s]" in capsys.readouterr().err  # not 0/5 batches


def test_the_scoring_bar_advances_by_each_batchs_images(tiny_model, image_tree, capsys, monkeypatch):
    import tqdm
    monkeypatch.setattr(tqdm, "tqdm", functools.partial(tqdm.tqdm, mininterval=0))  # every update drawn
    data = load_split(image_tree, "test", image_size=16, progress=False)  # 18 images
    tiny_model.forward = lambda x: x.mean((2, 3))
    evaluate(tiny_model, data, batch_size=4, progress=True)
    assert "| 8/18 [" in capsys.readouterr().err  # two batches of 4, not 2 ticks


def test_cli_checks_the_default_confusion_plots_path_before_scoring(checkpoint, image_tree, tmp_path):
    (tmp_path / "r.confusion.png").mkdir()  # where the plot beside --json r.json would go
    r = subprocess.run([sys.executable, "-m", "quant.evaluate", "--checkpoint", str(checkpoint),
                        "--data", str(image_tree), "--json", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert r.returncode == 2 and "r.confusion.png is a folder; give a file name" in r.stderr
    assert "evaluating" not in r.stderr


def test_confusion_rows_are_the_true_classes_and_per_class_accuracy_is_their_recall(tiny_model, image_tree):
    data = load_split(image_tree, "test", image_size=16, progress=False)
    tiny_model.forward = lambda x: torch.tensor([[1.0, 0.0, 0.0]]).expand(len(x), 3)  # calls everything "cat"
    res = evaluate(tiny_model, data)
    assert res["confusion"] == [[6, 0, 0], [6, 0, 0], [6, 0, 0]]
    assert res["per_class"] == {"cat": 1.0, "dog": 0.0, "frog": 0.0}


def test_a_class_without_images_in_the_scored_set_has_no_accuracy_rather_than_zero(tiny_model, image_tree):
    data = load_split(image_tree, "test", image_size=16, progress=False)
    keep = data.labels != 2
    res = evaluate(tiny_model, type(data)(data.images[keep], data.labels[keep], data.classes))
    assert res["per_class"]["frog"] is None and res["per_class"]["cat"] is not None


def test_predict_puts_a_module_in_eval_mode(tiny_model):
    import numpy as np
    from quant.evaluate import predict
    tiny_model.train()
    predict(tiny_model, np.zeros((2, 16, 16, 3), np.uint8), (0.5,) * 3, (0.5,) * 3)
    assert not tiny_model.training


def test_the_confusion_figure_shades_each_true_class_row_by_its_fractions():
    import matplotlib
    matplotlib.use("Agg")
    from quant.evaluate import confusion_figure
    fig = confusion_figure([[1, 3], [0, 4]], ["a", "b"], "t")
    assert fig.axes[0].images[0].get_array().tolist() == [[0.25, 0.75], [0.0, 1.0]]


def test_the_confusion_figures_colour_bar_says_what_its_0_to_1_measures():
    import matplotlib
    matplotlib.use("Agg")
    from quant.evaluate import confusion_figure
    fig = confusion_figure([[1, 3], [0, 4]], ["a", "b"], "t")
    assert fig.axes[1].get_ylabel() == "fraction of the true class's images"  # the bar beside the matrix


def test_a_confusion_matrix_of_fractions_is_shaded_by_row_and_its_fractions_written_in():
    """A matrix normalised over all cells (another tool's) was shaded unscaled and written in as zeros."""
    import matplotlib
    matplotlib.use("Agg")
    from quant.evaluate import confusion_figure
    fig = confusion_figure([[0.1, 0.3], [0.0, 0.6]], ["a", "b"], "t")
    assert fig.axes[0].images[0].get_array().ravel().tolist() == pytest.approx([0.25, 0.75, 0.0, 1.0])
    assert [t.get_text() for t in fig.axes[0].texts] == ["0.1", "0.3", "0", "0.6"]


def test_a_confusion_figure_of_1000_classes_numbers_its_axes_instead_of_naming_every_class():
    """1000 tick names per axis ran together into black bands (and took seconds to lay out)."""
    import matplotlib
    import numpy as np
    matplotlib.use("Agg")
    from quant.evaluate import confusion_figure
    fig = confusion_figure(np.eye(1000, dtype=int), [f"n{i:08d}" for i in range(1000)], "t")  # ImageNet's wnids
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert 0 < len(ticks) <= 20 and not any(t.startswith("n") for t in ticks)


def test_a_confusion_figure_of_1000_classes_numbers_its_y_axis_too():
    import matplotlib
    import numpy as np
    matplotlib.use("Agg")
    from quant.evaluate import confusion_figure
    fig = confusion_figure(np.eye(1000, dtype=int), [f"n{i:08d}" for i in range(1000)], "t")
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert 0 < len(ticks) <= 20 and not any(t.startswith("n") for t in ticks)


def test_a_confusion_figure_of_50_classes_still_names_them():
    import matplotlib
    import numpy as np
    matplotlib.use("Agg")
    from quant.evaluate import confusion_figure
    fig = confusion_figure(np.eye(50, dtype=int), [f"c{i}" for i in range(50)], "t")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [f"c{i}" for i in range(50)]


def test_an_interrupted_confusion_plot_leaves_the_old_one_whole(tmp_path, savefig_killed_midway):
    from quant.evaluate import plot_confusion
    path = tmp_path / "c.png"
    path.write_bytes(b"old plot")
    with pytest.raises(KeyboardInterrupt):
        plot_confusion([[1, 0], [0, 1]], ["a", "b"], path, "t")
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"] and path.read_bytes() == b"old plot"


def test_predict_scores_every_image_across_batches():
    import numpy as np
    from quant.evaluate import predict
    images = np.arange(5, dtype=np.uint8)[:, None, None, None].repeat(16, 1).repeat(16, 2).repeat(3, 3)
    logits = predict(lambda x: x.mean((2, 3)), images, (0.0,) * 3, (1 / 255,) * 3, batch_size=2)
    assert logits[:, 0].round().tolist() == [0, 1, 2, 3, 4]


def test_a_dollar_in_a_class_or_file_name_is_drawn_as_text_not_parsed_as_tex(tmp_path):
    """A checkpoint named `a$^$b.safetensors` ended the run in a TeX parse error after it was scored."""
    from quant.evaluate import plot_confusion
    plot_confusion([[1, 0], [0, 1]], ["$5 bill", "$^$"], tmp_path / "c.png", "a$^$b.safetensors on test")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
