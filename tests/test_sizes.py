"""`python -m quant.sizes`: packed files against the float32 file, per model and recipe."""
import json

import pytest

from quant.sizes import main


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


@pytest.mark.parametrize("args", [["--recipes", "qvit"], ["--recipes", "w5"], ["--models", "resnet50"],
                                  ["--models", ","]])
def test_sizes_refuses_what_it_cannot_measure(args):
    with pytest.raises(ValueError, match="must name at least one of"):
        main(args)
