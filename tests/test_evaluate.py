"""`python -m quant.evaluate`: its report, its last line, and one clear error for bad input."""
import json
import re
import subprocess
import sys

import pytest

from quant.data import load_split
from quant.evaluate import evaluate
from quant.models import save_model


@pytest.fixture
def checkpoint(tmp_path, tiny_model):
    path = tmp_path / "tiny.safetensors"
    save_model(tiny_model, path)
    return path


def test_evaluate_counts_correct_predictions(tiny_model, image_tree):
    data = load_split(image_tree, "test", image_size=16, progress=False)
    res = evaluate(tiny_model, data)
    confusion = res["confusion"]
    assert sum(map(sum, confusion)) == len(data)
    assert res["top1"] == pytest.approx(sum(confusion[i][i] for i in range(3)) / len(data))


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


@pytest.mark.parametrize("make_bad, message", [
    (lambda p: p / "absent.safetensors", "no such model file"),
    (lambda p: (p / "junk.safetensors").write_bytes(b"\x00" * 64) and p / "junk.safetensors",
     "not a readable safetensors file"),
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
