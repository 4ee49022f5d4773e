"""Robustness analysis: one component quantized at a time, every component counted, the model left intact."""
import copy
import json
import re

import pytest
import torch

from quant.models import save_model
from quant.quantizers import fake_quant_uniform
from quant.robustness import (HeadQuant, _activations, _trials, _wrap_attention, analyse, calibrated, figure, main,
                              summary)
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


def test_the_fp_models_passes_before_the_first_trial_show_a_bar_of_the_calibration_batch_and_every_chunk(
        tiny_model, capsys):
    analyse(tiny_model, inputs(300, 0), torch.arange(300) % 3, inputs(8, 1), bits=(2,))  # chunks of 250: 2
    err = capsys.readouterr().err
    assert re.search(r"FP model: +0%\|[^|]*\| 0/3 ", err)  # drawn when it starts
    assert re.search(r"robustness: +100%\|[^|]*\| 26/26 ", err.replace("\r", "\n"))


def test_fewer_bits_hurt_more(tiny_model):
    res = analyse(tiny_model, inputs(12, 0), torch.arange(12) % 3, inputs(8, 1), bits=(2, 8), progress=False)
    kl = {b: sum(t["kl"] for t in res["trials"] if t["bits"] == b) for b in (2, 8)}
    assert kl[2] > 10 * kl[8]


def test_analysis_leaves_the_model_computing_what_it_did(tiny_model):
    x = inputs(4, 2)
    before = tiny_model(x)
    analyse(tiny_model, inputs(6, 0), torch.arange(6) % 3, inputs(8, 1), bits=(2,), progress=False)
    assert torch.allclose(tiny_model(x), before, atol=1e-5)


def test_a_model_with_infinite_logits_is_refused_not_analysed_into_nan(tiny_model):
    with torch.no_grad():
        tiny_model.blocks[1].mlp.fc2.weight.mul_(1e30)
    with pytest.raises(ValueError, match="NaN or infinite logits for 6 of 6 images"):
        analyse(tiny_model, inputs(6, 0), torch.arange(6) % 3, inputs(8, 1), bits=(2,), progress=False)


def test_cli_writes_results_and_plot(tiny_model, image_tar, tmp_path):
    ckpt, out = tmp_path / "fp.safetensors", tmp_path / "rob.json"
    save_model(tiny_model, ckpt)
    assert run(main, ["--checkpoint", str(ckpt), "--data", str(image_tar), "--out", str(out), "--split", "test",
                      "--bits", "3", "--calib-size", "6"]) == 0
    res = json.loads(out.read_text())
    assert res["split"] == "test" and {"command", "machine", "date", "wall_time_s"} <= set(res)
    assert out.with_suffix(".png").stat().st_size > 1000


def test_cli_takes_eight_bits_and_records_how_many_calibration_images_it_had(tiny_model, image_tar, tmp_path):
    ckpt, out = tmp_path / "fp.safetensors", tmp_path / "rob.json"
    save_model(tiny_model, ckpt)
    assert run(main, ["--checkpoint", str(ckpt), "--data", str(image_tar), "--out", str(out), "--split", "test",
                      "--bits", "8", "--calib-size", "1000"]) == 0
    res = json.loads(out.read_text())
    assert res["bits"] == [8] and res["n"] == 18                                      # 3 classes x 6 test images
    assert res["calib_size"] == 15                                  # all the training images the val split left


def test_cli_analyses_a_width_given_twice_once(tiny_model, image_tar, tmp_path):
    ckpt, out = tmp_path / "fp.safetensors", tmp_path / "rob.json"
    save_model(tiny_model, ckpt)
    assert run(main, ["--checkpoint", str(ckpt), "--data", str(image_tar), "--out", str(out), "--split", "test",
                      "--bits", "3", "3", "--calib-size", "6"]) == 0
    res = json.loads(out.read_text())
    assert res["bits"] == [3] and len(res["trials"]) == 2 * 5 + 2 * 2 * 4  # TINY's components, each tried once


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


def test_cli_refuses_data_of_other_classes_before_any_image_is_decoded(tiny_model, tmp_path, capsys, no_decoding):
    ckpt = tmp_path / "fp.safetensors"
    save_model(tiny_model, ckpt)
    other = write_tree(tmp_path / "other", classes=("a", "b", "c"))
    assert run(main, ["--checkpoint", str(ckpt), "--data", str(other), "--out", str(tmp_path / "r.json"),
                      "--split", "test"]) == 2
    assert "are not the model's" in capsys.readouterr().err


def test_cli_scores_a_tree_of_some_of_the_models_classes_by_their_names(tiny_model, image_tree, tmp_path):
    import shutil
    from quant.data import load_split
    from quant.evaluate import evaluate
    ckpt, out = tmp_path / "fp.safetensors", tmp_path / "rob.json"
    save_model(tiny_model, ckpt)
    shutil.rmtree(image_tree / "test" / "cat")  # photos of a dog and a frog, scored by a cat/dog/frog model
    assert run(main, ["--checkpoint", str(ckpt), "--data", str(image_tree), "--out", str(out), "--split", "test",
                      "--bits", "8", "--calib-size", "6"]) == 0
    want = evaluate(tiny_model, load_split(image_tree, "test", image_size=16, progress=False))
    assert json.loads(out.read_text())["fp_top1"] == want["top1"] and want["n"] == 12


def test_every_head_of_every_block_is_tried_once_per_slot(tiny_model):
    res = analyse(tiny_model, inputs(6, 0), torch.arange(6) % 3, inputs(8, 1), bits=(2,), progress=False)
    tried = sorted((t["component"], t["block"], t["head"]) for t in res["trials"] if t["component"].startswith("h_"))
    assert tried == sorted((f"h_{s}", b, h) for s in ("q", "k", "v", "attn") for b in range(2) for h in range(2))


def test_a_weight_trial_scores_the_whole_model_with_that_one_weight_rounded(tiny_model):
    x, y = inputs(12, 0), torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1, 1, 0, 2])
    tiny_model.head.weight.data *= 30       # confident logits: a KL far above rounding noise, asymmetric in its sides
    rounded = copy.deepcopy(tiny_model)
    fc2 = rounded.blocks[1].mlp.fc2
    fc2.weight.data = fake_quant_uniform(fc2.weight.data, 2)
    with torch.no_grad():
        fp, q = tiny_model(x), rounded(x)
    res = analyse(tiny_model, x, y, inputs(8, 1), bits=(2,), progress=False)
    trial = next(t for t in res["trials"] if t["component"] == "w_fc2" and t["block"] == 1)
    assert res["fp_top1"] == pytest.approx((fp.argmax(1) == y).float().mean().item())
    assert trial["top1"] == pytest.approx((q.argmax(1) == y).float().mean().item())
    kl = (fp.softmax(-1) * (fp.log_softmax(-1) - q.log_softmax(-1))).sum(-1).mean()   # KL(FP || quantized), per image
    assert trial["kl"] == pytest.approx(kl.item(), rel=1e-4)


def test_the_drop_is_fp_top1_minus_the_trials_top1_in_points(tiny_model):
    res = analyse(tiny_model, inputs(12, 0), torch.arange(12) % 3, inputs(8, 1), bits=(2,), progress=False)
    assert any(t["top1"] != res["fp_top1"] for t in res["trials"])
    for t in res["trials"]:
        assert t["drop"] == pytest.approx(100 * (res["fp_top1"] - t["top1"]))


def test_a_head_quantizer_rounds_that_head_alone_to_the_grid_of_its_width():
    x = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    out = HeadQuant(1, calibrated(x[:, 1:2], 2, signed=True, offset=False))(x)
    assert torch.equal(out[:, 0], x[:, 0]) and torch.equal(out[:, 2], x[:, 2])
    assert out[:, 1].unique().numel() <= 4 and not torch.equal(out[:, 1], x[:, 1])


def test_each_heads_quantizer_is_fit_to_that_head_signed_for_q_k_v_and_unsigned_for_attention_scores(tiny_model):
    _wrap_attention(tiny_model)
    acts = _activations(tiny_model, inputs(8, 1))
    for kind, block, head, ctx in _trials(tiny_model, acts, 2):
        if head is not None:
            slot = kind[2:]
            with ctx:
                q = getattr(tiny_model.blocks[block].attn, f"{slot}_quant").quantizer
            fit = calibrated(acts[block][slot][:, head:head + 1], 2, signed=slot != "attn", offset=False)
            assert q.signed == (slot != "attn") and torch.equal(q.scale, fit.scale), (kind, block, head)


@torch.no_grad()
def test_the_post_gelu_activation_is_quantized_unsigned_with_a_zero_point_fit_to_it(tiny_model):
    _wrap_attention(tiny_model)
    calib = inputs(8, 1)
    acts = _activations(tiny_model, calib)
    for kind, block, _, ctx in _trials(tiny_model, acts, 2):
        if kind == "a_gelu":
            seen = []
            with ctx:
                hook = tiny_model.blocks[block].mlp.fc2.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
                tiny_model(calib)
                hook.remove()
            gelu = acts[block]["gelu"]
            assert torch.allclose(seen[0], calibrated(gelu, 2, signed=False, offset=True)(gelu)), block


def test_progress_is_shown_only_when_asked_for_counting_every_trial(tiny_model, capsys):
    analyse(copy.deepcopy(tiny_model), inputs(6, 0), torch.arange(6) % 3, inputs(8, 1), bits=(2,), progress=False)
    assert "robustness" not in capsys.readouterr().err
    analyse(tiny_model, inputs(6, 0), torch.arange(6) % 3, inputs(8, 1), bits=(2,), progress=True)
    assert "26/26" in capsys.readouterr().err           # 2 blocks x (4 weights + GELU) + 4 slots x 2 blocks x 2 heads


def trial(bits, component, block, head=None, drop=0.0, kl=0.0):
    return {"bits": bits, "component": component, "block": block, "head": head, "top1": 0.5, "drop": drop, "kl": kl}


def test_the_summary_gives_the_mean_drop_of_each_component_kind_per_width():
    lines = summary({"fp_top1": 0.9, "n": 10, "trials": [
        trial(2, "w_qkv", 0, drop=1.0), trial(2, "w_qkv", 1, drop=5.0), trial(2, "w_qkv", 2, drop=0.0),
        trial(2, "a_gelu", 0, drop=-2.0), trial(4, "w_qkv", 0, drop=0.5), trial(4, "a_gelu", 0)]})
    assert lines[:2] == ["2-bit mean drop (points): a_gelu -2.00, w_qkv +2.00",
                         "4-bit mean drop (points): a_gelu +0.00, w_qkv +0.50"]


def test_the_summary_names_the_five_components_with_the_largest_kl_largest_first():
    kls = [0.1, 0.7, 0.3, 0.9, 0.5, 0.2, 0.6]
    last = summary({"fp_top1": 0.9, "n": 10, "trials": [trial(2, "h_q", 1, h, kl=k) for h, k in enumerate(kls)]})[-1]
    assert last.startswith("largest logit KL from the FP model: h_q block 1 head 3 2-bit (KL 0.900, +0.0 pts)")
    assert re.findall(r"head (\d)", last) == ["3", "1", "6", "4", "2"]


def figure_of(bits=(2, 4)):
    trials = [trial(b, f"w_{w}", blk, kl=0.1 * b) for b in bits for blk in range(2)
              for w in ("qkv", "proj", "fc1", "fc2")]
    trials += [trial(b, "a_gelu", blk, kl=0.1) for b in bits for blk in range(2)]
    trials += [trial(b, f"h_{s}", blk, h, drop=1.0, kl=0.2) for b in bits for s in ("q", "k", "v", "attn")
               for blk in range(2) for h in range(2)]
    return figure({"fp_top1": 0.9, "n": 40, "split": "val", "trials": trials})


def test_the_figure_draws_every_weight_and_the_post_gelu_activation_per_block():
    labels = [t.get_text() for t in figure_of().axes[0].get_legend().get_texts()]
    assert labels == ["weight qkv", "weight proj", "weight fc1", "weight fc2", "post-GELU act"]


def test_the_figures_heat_maps_show_the_kl_then_the_drop_per_head_at_the_lowest_width():
    fig = figure_of(bits=(2, 4))                                           # 4 columns: 2 widths x (drop, KL)
    assert fig.axes[4].get_title() == "Q, 2-bit: logit KL per head"
    assert fig.axes[8].get_title() == "Q, 2-bit: top-1 drop per head"
    assert fig.axes[7].get_title() == "attention scores, 2-bit: logit KL per head"


def test_the_heat_maps_colour_bars_give_their_units():
    fig = figure_of(bits=(2, 4))
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"] == ["nats"] * 4 + ["points"] * 4


def test_a_heat_maps_numbers_are_white_on_its_dark_cells_when_some_drops_are_negative():
    trials = [trial(2, "h_q", 0, h, drop=d) for h, d in enumerate((0.0, -5.0))]  # a better top-1 and no change
    texts = {t.get_text(): t.get_color() for t in figure({"fp_top1": 0.9, "n": 20, "trials": trials}).axes[8].texts}
    assert texts == {"0.0": "black", "-5.0": "white"}  # 0 the pale middle of the scale, -5 its dark end


def test_the_drop_heat_maps_scale_is_centred_on_no_change():
    trials = [trial(2, "h_q", 0, h, drop=d) for h, d in enumerate((0.2, -1.0))]
    image = figure({"fp_top1": 0.9, "n": 20, "trials": trials}).axes[8].images[0]
    assert image.norm(0.0) == pytest.approx(0.5) and image.norm.vmin == -image.norm.vmax


def test_a_heat_maps_small_kl_is_written_in_its_largest_values_power_of_ten_named_by_the_colour_bar():
    trials = [trial(2, "h_q", 0, h, kl=k) for h, k in enumerate((0.00042, 0.0123, 0.0))]
    fig = figure({"fp_top1": 0.9, "n": 20, "trials": trials})
    assert [t.get_text() for t in fig.axes[4].texts] == ["0.042", "1.2", "0"]
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"][0] == "1e-2 nats"


def test_the_figure_is_titled_with_the_fp_top1_and_how_many_images_of_which_split():
    assert figure_of().get_suptitle() == "Quantizing one component at a time (FP top-1 0.9000, 40 val images)"
