"""`python -m quant.sizes`: packed files against the float32 file, per model and recipe."""
import json

import pytest

import quant
from quant.models import VisionTransformer
from quant.sizes import main, packed_model, table
from tests.conftest import TINY


def test_sizes_table_shows_ternary_files_smaller_and_float16_rest_smaller_still(tmp_path, capsys):
    out = tmp_path / "sizes.json"
    main(["--models", "vit_cifar_tiny", "--recipes", "w4,w1.58a8", "--json", str(out)])
    rows = {r["recipe"]: r for r in json.loads(out.read_text())["rows"]}
    fp32 = rows["w4"]["fp32_bytes"]
    assert fp32 > rows["w4"]["file_bytes"] > rows["w1.58a8"]["file_bytes"] > rows["w1.58a8"]["file_bytes_float16"]
    assert rows["w1.58a8"]["linear_bits"] < 1.7
    assert rows["w1.58a8"]["file_bytes"] - rows["w1.58a8"]["file_bytes_float16"] > 0.4 * (
        rows["w1.58a8"]["file_bytes"] - rows["w1.58a8"]["linear_bytes"])  # the float rest about halves
    assert "| vit_cifar_tiny | 871,466 | w1.58a8 |" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [(["--recipes", "qvit"], "--recipes names qvit, not one of: "),
                                           (["--recipes", "w5"], "--recipes names w5, not one of: "),
                                           (["--models", "resnet50"], "--models names resnet50, not one of: "),
                                           (["--models", ","], "--models must name at least one of: ")])
def test_sizes_refuses_what_it_cannot_measure(args, message):
    with pytest.raises(ValueError, match=message):
        main(args)


def test_sizes_names_the_unknown_model_beside_a_known_one():
    with pytest.raises(ValueError, match="--models names bogus, not one of: vit_cifar_tiny, "):
        main(["--models", "vit_cifar_tiny,bogus"])


def test_sizes_measures_each_named_model_and_recipe_once(tmp_path):
    out = tmp_path / "sizes.json"
    main(["--models", "vit_cifar_tiny,,vit_cifar_tiny,", "--recipes", "w8a8,w8a8,", "--json", str(out)])
    assert [(r["model"], r["recipe"]) for r in json.loads(out.read_text())["rows"]] == [("vit_cifar_tiny", "w8a8")]


def test_sizes_takes_spaced_lists_like_the_other_commands_and_commas_as_recorded(monkeypatch):
    measured = []
    monkeypatch.setattr("quant.sizes.measure", lambda name, recipes, tmp: measured.append((name, recipes)) or [])
    main(["--models", "vit_cifar_tiny", "vit_cifar_small", "--recipes", "w8a8", "w4"])
    main(["--models", "vit_cifar_tiny,vit_cifar_small", "--recipes", "w8a8,w4"])
    assert measured == [("vit_cifar_tiny", ["w8a8", "w4"]), ("vit_cifar_small", ["w8a8", "w4"])] * 2


def test_sizes_writes_its_table_to_out_as_to_json_its_first_name(tmp_path, monkeypatch):
    row = {"model": "m", "parameters": 1000, "recipe": "w4", "linear_bits": 4.5, "fp32_bytes": 8_000_000,
           "file_bytes": 2_000_000, "file_bytes_float16": 1_000_000}
    monkeypatch.setattr("quant.sizes.measure", lambda name, recipes, tmp: [row])
    for option in ("--out", "--json"):
        main(["--models", "vit_cifar_tiny", "--recipes", "w4", option, str(tmp_path / f"{option[2:]}.json")])
        assert json.loads((tmp_path / f"{option[2:]}.json").read_text())["rows"] == [row]


def test_sizes_refuses_an_out_not_named_json_before_measuring(tmp_path, monkeypatch):
    monkeypatch.setattr("quant.sizes.measure", lambda name, recipes, tmp: pytest.fail("measured"))
    with pytest.raises(ValueError, match=r"r\.txt: give a \.json file name to write"):
        main(["--models", "vit_cifar_tiny", "--recipes", "w4", "--out", str(tmp_path / "r.txt")])


def test_sizes_table_divides_the_float32_file_by_each_packed_file():
    row = {"model": "m", "parameters": 1000, "recipe": "w4", "linear_bits": 4.5, "fp32_bytes": 8_000_000,
           "file_bytes": 2_000_000, "file_bytes_float16": 1_000_000}
    assert table([row]).splitlines()[2] == "| m | 1,000 | w4 | 4.500 | 8.00 | 2.000 | 4.0x | 1.000 | 8.0x |"


def test_a_recipe_that_calibrates_is_measured_on_random_calibration_inputs(monkeypatch):
    monkeypatch.setattr("quant.models.create_model", lambda name: VisionTransformer(TINY))  # W4A4 in seconds
    model = packed_model("tiny", "w4a4")
    assert any(isinstance(m, quant.QuantLinear) for m in model.modules())


def test_sizes_linear_bits_are_the_packed_linear_bytes_per_quantized_weight(tmp_path):
    out = tmp_path / "sizes.json"
    main(["--models", "vit_cifar_tiny", "--recipes", "w8a8", "--json", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    layers = [m for m in packed_model("vit_cifar_tiny", "w8a8").modules() if isinstance(m, quant.QuantLinear)]
    weights = sum(m.in_features * m.out_features for m in layers)
    assert 8 < row["linear_bits"] == pytest.approx(8 * row["linear_bytes"] / weights, abs=1e-4)
