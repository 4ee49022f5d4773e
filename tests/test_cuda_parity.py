"""`python -m cuda_ops.parity`: a saved model, quantized and put on the kernels, scores as its reference does."""
import json

import pytest
import quant
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


@pytest.mark.parametrize("recipe", ["w4-gptq", "w1.58a8"])
def test_a_recipe_that_needs_calibration_or_training_is_refused(tiny_model, image_tree, tmp_path, recipe):
    quant.models.save_model(tiny_model, tmp_path / "fp.safetensors")
    with pytest.raises(ValueError, match="not a round-to-nearest recipe"):
        parity.main(["--model", str(tmp_path / "fp.safetensors"), "--recipes", recipe, "--data", str(image_tree)])


def test_a_full_precision_file_given_as_quantized_is_refused_before_scoring(tiny_model, image_tree, tmp_path):
    quant.models.save_model(tiny_model, tmp_path / "fp.safetensors")
    with pytest.raises(ValueError, match="fp.safetensors is not a quantized bitvit file"):
        parity.main(["--quantized", str(tmp_path / "fp.safetensors"), "--data", str(image_tree)])
