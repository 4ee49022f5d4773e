"""`python -m cuda_ops.parity`: a saved model, quantized and put on the kernels, scores as its reference does."""
import copy
import json
import types

import pytest
import quant
import torch
from cuda_ops import parity


def test_parity_scores_each_recipe_and_file_twice_and_finds_them_in_agreement(tiny_model, image_tree, tmp_path):
    fp = tmp_path / "fp.safetensors"
    quant.models.save_model(tiny_model, fp)
    packed = tmp_path / "w8a8.safetensors"
    quant.save_quantized(quant.quantize(quant.load_any(fp), "w8a8"), packed)
    out = tmp_path / "parity.json"
    assert parity.main(["--model", str(fp), "--recipes", "w4,nf4", "--quantized", str(packed),
                        "--data", str(image_tree), "--split", "test", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [row["model"] for row in r["rows"]] == ["fp.safetensors w4", "fp.safetensors nf4", "w8a8.safetensors"]
    for row in r["rows"]:
        assert row["kernel_layers"] == 4 * 2 + 1 and row["n"] == 18
        assert row["predictions_agree"] == 1.0 and row["logits_rel_err"] < 1e-4
        assert row["top1_kernels"] == row["top1_reference"]
    assert {"command", "date", "machine", "data", "wall_s"} <= set(r)


def test_parity_says_which_model_of_how_many_it_is_scoring_before_each(tiny_model, image_tree, tmp_path, capsys):
    fp = tmp_path / "fp.safetensors"
    quant.models.save_model(tiny_model, fp)
    assert parity.main(["--model", str(fp), "--recipes", "w4,nf4", "--data", str(image_tree)]) == 0
    err = capsys.readouterr().err
    assert "[1/2] fp.safetensors w4: 18 images through the reference forward, then the kernels" in err
    assert "[2/2] fp.safetensors nf4: 18 images" in err


@pytest.mark.parametrize("recipe", ["w4-gptq", "w1.58a8"])
def test_a_recipe_that_needs_calibration_or_training_is_refused(tiny_model, image_tree, tmp_path, recipe):
    quant.models.save_model(tiny_model, tmp_path / "fp.safetensors")
    with pytest.raises(ValueError, match="not a round-to-nearest recipe"):
        parity.main(["--model", str(tmp_path / "fp.safetensors"), "--recipes", recipe, "--data", str(image_tree)])


def test_a_full_precision_file_given_as_quantized_is_refused_before_scoring(tiny_model, image_tree, tmp_path):
    quant.models.save_model(tiny_model, tmp_path / "fp.safetensors")
    with pytest.raises(ValueError, match="fp.safetensors is not a quantized bitvit file"):
        parity.main(["--quantized", str(tmp_path / "fp.safetensors"), "--data", str(image_tree)])


def test_compare_scores_the_reference_and_the_kernels_on_their_own_predictions(monkeypatch):
    class Model(torch.nn.Module):
        config = types.SimpleNamespace(mean=(0.5,) * 3, std=(0.5,) * 3)
    model, on_kernels = Model(), torch.nn.Sequential()
    ref = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0]])  # predicts 0, 1, 2, 1
    out = torch.tensor([[1.0, 0, 0], [0, 1, 0], [2, 0, 0], [0, 1, 0]])  # predicts 0, 1, 0, 1
    monkeypatch.setattr(parity, "to_kernels", lambda m: on_kernels)
    monkeypatch.setattr(parity, "predict", lambda m, *args, **kwargs: out if m is on_kernels else ref)
    data = types.SimpleNamespace(images=None, labels=[0, 1, 2, 0])
    r = parity.compare("m", model, data, "cpu", 2)
    assert (r["model"], r["n"], r["kernel_layers"]) == ("m", 4, 0)
    assert (r["top1_reference"], r["top1_kernels"], r["predictions_agree"]) == (0.75, 0.5, 0.75)
    assert r["logits_rel_err"] == pytest.approx(5 ** 0.5 / 2)  # |out - ref| / |ref|


def test_a_quantized_file_alone_is_checked_without_a_model(tiny_model, image_tree, tmp_path):
    packed = tmp_path / "w8a8.safetensors"
    quant.save_quantized(quant.quantize(tiny_model, "w8a8"), packed)
    out = tmp_path / "parity.json"
    assert parity.main(["--quantized", str(packed), "--data", str(image_tree), "--out", str(out)]) == 0
    assert [row["model"] for row in json.loads(out.read_text())["rows"]] == ["w8a8.safetensors"]


def test_a_recipe_or_file_named_twice_is_checked_once(tiny_model, image_tree, tmp_path):
    quant.models.save_model(tiny_model, tmp_path / "fp.safetensors")
    packed = tmp_path / "w8a8.safetensors"
    quant.save_quantized(quant.quantize(tiny_model, "w8a8"), packed)
    out = tmp_path / "parity.json"
    assert parity.main(["--model", str(tmp_path / "fp.safetensors"), "--recipes", "w4,w4,", "--quantized",
                        f"{packed},{packed}", "--data", str(image_tree), "--out", str(out)]) == 0
    assert [row["model"] for row in json.loads(out.read_text())["rows"]] == ["fp.safetensors w4", "w8a8.safetensors"]


def test_files_of_two_input_sizes_are_each_scored_on_the_split_at_their_size(tiny_model, image_tree, tmp_path):
    import dataclasses
    from conftest import TINY
    big = quant.models.VisionTransformer(dataclasses.replace(TINY, img_size=32)).eval()
    files = [tmp_path / "16.safetensors", tmp_path / "32.safetensors"]
    for model, path in zip((tiny_model, big), files):
        quant.save_quantized(quant.quantize(model, "w8a8"), path)
    out = tmp_path / "parity.json"
    assert parity.main(["--quantized", ",".join(map(str, files)), "--data", str(image_tree), "--out", str(out)]) == 0
    assert [row["n"] for row in json.loads(out.read_text())["rows"]] == [18, 18]


def test_recipes_without_a_model_to_quantize_are_refused_not_left_unused(tiny_model, image_tree, tmp_path):
    packed = tmp_path / "w8a8.safetensors"
    quant.save_quantized(quant.quantize(tiny_model, "w8a8"), packed)
    with pytest.raises(ValueError, match="--recipes quantizes the --model file: give --model too"):
        parity.main(["--quantized", str(packed), "--recipes", "w4", "--data", str(image_tree)])


def test_a_check_of_nothing_is_refused(image_tree):
    with pytest.raises(ValueError, match="nothing to check"):
        parity.main(["--data", str(image_tree)])


def test_every_quantized_file_is_checked_before_the_data_is_read(tiny_model, tmp_path):
    quant.models.save_model(tiny_model, tmp_path / "fp.safetensors")
    quant.save_quantized(quant.quantize(tiny_model, "w8a8"), tmp_path / "w8a8.safetensors")
    files = f"{tmp_path / 'w8a8.safetensors'},{tmp_path / 'fp.safetensors'}"
    with pytest.raises(ValueError, match="fp.safetensors is not a quantized bitvit file"):
        parity.main(["--quantized", files, "--data", str(tmp_path / "no-such-data")])


def test_data_of_other_classes_than_the_model_is_refused_before_scoring_or_decoding(tiny_model, tmp_path,
                                                                                    no_decoding):
    from conftest import write_tree
    packed = tmp_path / "w8a8.safetensors"
    quant.save_quantized(quant.quantize(tiny_model, "w8a8"), packed)
    other = write_tree(tmp_path / "other", classes=("ant", "bee", "cow"), per_class=2)
    with pytest.raises(ValueError, match="the data's classes .* are not w8a8.safetensors's"):
        parity.main(["--quantized", str(packed), "--data", str(other)])


def test_a_later_file_of_other_classes_is_refused_before_the_first_is_scored(tiny_model, image_tree, tmp_path,
                                                                           monkeypatch):
    import dataclasses
    from conftest import TINY
    quant.save_quantized(quant.quantize(tiny_model, "w8a8"), tmp_path / "a.safetensors")
    four = quant.models.VisionTransformer(dataclasses.replace(TINY, num_classes=4, classes=()))
    quant.save_quantized(quant.quantize(four, "w8a8"), tmp_path / "b.safetensors")
    monkeypatch.setattr(parity, "compare", lambda *a: pytest.fail("scored before the refusal"))
    with pytest.raises(ValueError, match="the data's 3 classes are not b.safetensors's 4"):
        parity.main(["--quantized", f"{tmp_path / 'a.safetensors'},{tmp_path / 'b.safetensors'}",
                     "--data", str(image_tree)])


def test_a_run_ended_midway_leaves_its_rows_in_a_file_marked_incomplete(tiny_model, image_tree, tmp_path,
                                                                         monkeypatch):
    quant.models.save_model(tiny_model, tmp_path / "fp.safetensors")
    out, compare = tmp_path / "parity.json", parity.compare
    args = ["--model", str(tmp_path / "fp.safetensors"), "--recipes", "w4,nf4", "--data", str(image_tree),
            "--out", str(out)]
    assert parity.main(args) == 0 and json.loads(out.read_text())["complete"] is True
    def killed_at_nf4(name, *a):
        if name.endswith("nf4"):
            raise KeyboardInterrupt
        return compare(name, *a)
    monkeypatch.setattr(parity, "compare", killed_at_nf4)
    with pytest.raises(KeyboardInterrupt):
        parity.main(args)
    r = json.loads(out.read_text())
    assert [row["model"] for row in r["rows"]] == ["fp.safetensors w4"] and r["complete"] is False


def test_a_model_with_no_layer_the_kernels_run_is_refused_before_any_model_is_scored(tiny_model, image_tree, tmp_path,
                                                                                     monkeypatch):
    good, bad = tmp_path / "w4.safetensors", tmp_path / "w3.safetensors"
    quant.save_quantized(quant.quantize(copy.deepcopy(tiny_model), "w4"), good)
    quant.save_quantized(quant.quantize(tiny_model, quant.recipe("w3", layer_formats=())), bad)
    monkeypatch.setattr(parity, "compare", lambda *a: pytest.fail("scored a model before the refusal"))
    with pytest.raises(ValueError, match="w3.safetensors has no layer bitvit's kernels run"):
        parity.main(["--quantized", f"{good},{bad}", "--data", str(image_tree)])


def test_a_scored_model_is_let_go_before_the_next_is_scored(tiny_model, image_tree, tmp_path, monkeypatch):
    """`compare` moves a model to the GPU: kept, every model scored would stay there to the end."""
    import gc
    import weakref
    files = [tmp_path / f"w4-{i}.safetensors" for i in range(2)]
    for f in files:
        quant.save_quantized(quant.quantize(copy.deepcopy(tiny_model), "w4"), f)
    scored = []

    def compare(name, model, *args):
        gc.collect()
        assert all(ref() is None for ref in scored), "a model scored before is still held"
        scored.append(weakref.ref(model))
        return {"model": name, **{k: 0.0 for k in ("kernel_layers", "top1_reference", "top1_kernels",
                                                   "predictions_agree", "logits_rel_err")}}
    monkeypatch.setattr(parity, "compare", compare)
    assert parity.main(["--quantized", ",".join(map(str, files)), "--data", str(image_tree)]) == 0
    assert len(scored) == 2


def test_a_model_with_no_layer_the_kernels_run_is_refused_not_found_in_agreement(tiny_model, image_tree, tmp_path):
    packed = tmp_path / "w3.safetensors"  # int3 weights, the head's too: to_kernels converts none of its layers
    quant.save_quantized(quant.quantize(tiny_model, quant.recipe("w3", layer_formats=())), packed)
    with pytest.raises(ValueError, match="w3.safetensors has no layer bitvit's kernels run"):  # printed 0 layers
        parity.main(["--quantized", str(packed), "--data", str(image_tree)])               # and full agreement
