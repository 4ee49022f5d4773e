"""Robustness analysis: one component quantized at a time, every component counted, the model left intact."""
import json

import torch

from quant.models import save_model
from quant.robustness import analyse, main
from quant.cli import run
from tests.conftest import write_tree


def inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g)


def test_every_block_weight_activation_and_head_is_tried_at_every_width(tiny_model):
    res = analyse(tiny_model, inputs(12, 0), torch.arange(12) % 3, inputs(8, 1), bits=(2, 8), progress=False)
    per_bits = 2 * 5 + 2 * 2 * 4                     # TINY: 2 blocks x (4 weights + GELU), 2 x 2 heads x 4 slots
    assert len(res["trials"]) == 2 * per_bits
    kinds = {t["component"] for t in res["trials"]}
    assert kinds == {"w_qkv", "w_proj", "w_fc1", "w_fc2", "a_gelu", "h_q", "h_k", "h_v", "h_attn"}


def test_fewer_bits_hurt_more(tiny_model):
    res = analyse(tiny_model, inputs(12, 0), torch.arange(12) % 3, inputs(8, 1), bits=(2, 8), progress=False)
    kl = {b: sum(t["kl"] for t in res["trials"] if t["bits"] == b) for b in (2, 8)}
    assert kl[2] > 10 * kl[8]


def test_analysis_leaves_the_model_computing_what_it_did(tiny_model):
    x = inputs(4, 2)
    before = tiny_model(x)
    analyse(tiny_model, inputs(6, 0), torch.arange(6) % 3, inputs(8, 1), bits=(2,), progress=False)
    assert torch.allclose(tiny_model(x), before, atol=1e-5)


def test_cli_writes_results_and_plot(tiny_model, image_tar, tmp_path):
    ckpt, out = tmp_path / "fp.safetensors", tmp_path / "rob.json"
    save_model(tiny_model, ckpt)
    assert run(main, ["--checkpoint", str(ckpt), "--data", str(image_tar), "--out", str(out), "--split", "test",
                      "--bits", "3", "--calib-size", "6"]) == 0
    res = json.loads(out.read_text())
    assert res["split"] == "test" and {"command", "machine", "date", "wall_time_s"} <= set(res)
    assert out.with_suffix(".png").stat().st_size > 1000


def test_cli_refuses_widths_outside_two_to_eight(tiny_model, image_tar, tmp_path, capsys):
    ckpt = tmp_path / "fp.safetensors"
    save_model(tiny_model, ckpt)
    assert run(main, ["--checkpoint", str(ckpt), "--data", str(image_tar), "--out", str(tmp_path / "r.json"),
                      "--bits", "1"]) == 2
    assert "--bits" in capsys.readouterr().err


def test_cli_refuses_an_out_path_the_plot_would_overwrite(tiny_model, image_tar, tmp_path, capsys):
    ckpt = tmp_path / "fp.safetensors"
    save_model(tiny_model, ckpt)
    assert run(main, ["--checkpoint", str(ckpt), "--data", str(image_tar), "--out", str(tmp_path / "r.png")]) == 2
    assert "give a .json file name" in capsys.readouterr().err


def test_cli_refuses_a_plot_path_that_is_a_folder_before_any_trial(tiny_model, image_tar, tmp_path, capsys):
    ckpt = tmp_path / "fp.safetensors"
    save_model(tiny_model, ckpt)
    (tmp_path / "r.png").mkdir()
    assert run(main, ["--checkpoint", str(ckpt), "--data", str(image_tar), "--out", str(tmp_path / "r.json")]) == 2
    assert "r.png is a folder" in capsys.readouterr().err


def test_cli_refuses_data_of_other_classes(tiny_model, tmp_path, capsys):
    ckpt = tmp_path / "fp.safetensors"
    save_model(tiny_model, ckpt)
    other = write_tree(tmp_path / "other", classes=("a", "b", "c"))
    assert run(main, ["--checkpoint", str(ckpt), "--data", str(other), "--out", str(tmp_path / "r.json"),
                      "--split", "test"]) == 2
    assert "are not the model's" in capsys.readouterr().err
