"""`python -m cuda_ops.bench` on the CPU, at the smallest settings: tables, a complete JSON, clear refusals."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import TINY
from cuda_ops import bench


def test_the_cpu_benchmark_writes_every_part_of_its_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--quick", "--batches", "1", "--ops", "w1.58a8,dense,w4",
                       "--variants", "w1.58a8,fp", "--out", str(out), "--plot", str(tmp_path / "b.png")]) == 0
    r = json.loads(out.read_text())
    assert {"command", "date", "device", "machine", "data", "wall_s", "ceilings", "skipped"} <= set(r)
    assert r["complete"] is True
    assert len(r["ops"]) == 4 * 3  # 4 layers x 3 ops, the dense baseline first
    assert [row["op"] for row in r["ops"][:3]] == ["dense", "w1.58a8", "w4"]
    assert all(row["ms"] > 0 and row["speedup_vs_dense"] > 0 for row in r["ops"])
    assert {row["op"]: row["rel_err_vs_cpu"] for row in r["ops"][:3]} == {"dense": None, "w1.58a8": 0.0, "w4": 0.0}
    fp, ternary = r["models"]
    assert (fp["variant"], ternary["variant"]) == ("fp", "w1.58a8")
    assert ternary["linear_memory_ratio_vs_fp"] > 10  # 2-bit codes + a scale per row against fp32 weights
    assert fp["logits_rel_err_vs_cpu_fp32"] == ternary["logits_rel_err_vs_cpu_fp32"] == 0.0  # the same float32 CPU run
    assert any("weight memory" in t["target"] for t in r["targets"])
    assert (tmp_path / "b.png").stat().st_size > 0
    assert "w1.58a8" in capsys.readouterr().out


def test_a_quick_cpu_run_measures_no_ceilings_and_prints_no_roofline(tmp_path, capsys):
    out = tmp_path / "bench.json"  # its 256^3 matmuls and 8 MB copies timed cache and overhead: rooflines of 4000 %
    assert bench.main(["--device", "cpu", "--quick", "--batches", "1", "--ops", "dense", "--e2e-models", "",
                       "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["ceilings"] is None and all(row["bound"] is row["roofline_frac"] is None for row in r["ops"])
    printed = capsys.readouterr().out
    assert "TFLOP/s" not in printed and "%" not in printed and "compute" not in printed


def test_a_cpu_run_prints_its_op_rates_in_gb_per_s_and_gops_not_as_zero_tb_per_s(tmp_path, capsys):
    out = tmp_path / "bench.json"  # a CPU's few GB/s and GOPS printed as 0.00 TB/s and 0.0 TOPS
    assert bench.main(["--device", "cpu", "--quick", "--batches", "1", "--ops", "dense", "--e2e-models", "",
                       "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["ops"]
    printed = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(printed) if line.endswith("bound    roofline"))
    assert "GB/s" in printed[at] and "GOPS" in printed[at] and "TB/s" not in printed[at]
    for row, line in zip(rows, printed[at + 1:at + 1 + len(rows)]):  # the JSON keeps TB/s and TOPS
        assert line.split()[-4:-2] == [f"{row['TBps'] * 1e3:.2f}", f"{row['TOPS'] * 1e3:.1f}"]


def test_a_gpu_run_prints_its_op_rates_in_tb_per_s_and_tops(capsys):
    bench.print_ops([{"model": "vit_base_patch16_224", "layer": "fc1", "N": 3072, "K": 768, "M": 197, "op": "w1a8",
                      "ms": 0.01, "eager_ms": 0.02, "speedup_vs_dense": 2.0, "TBps": 1.234, "TOPS": 56.78,
                      "bound": "memory", "roofline_frac": 0.5}], "cuda")
    header, line = capsys.readouterr().out.strip().splitlines()
    assert "TB/s" in header and "TOPS" in header
    assert line.split()[-4:-1] == ["1.23", "56.8", "memory"]


def test_the_load_average_is_recorded_as_null_where_the_os_has_none(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "getloadavg")  # Windows
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--quick", "--batches", "1", "--ops", "dense", "--models", "",
                       "--variants", "fp", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["load_average_1_5_15min"] is None and r["load_average_at_end"] is None


def test_an_op_whose_output_is_off_its_cpu_kernels_is_flagged_in_its_row_and_on_stderr(monkeypatch, capsys):
    real = bench.op_call

    def off_by_a_tenth(op, n, k, x, bias):  # a device kernel 10 % off what the CPU kernel computes
        fn, w_bytes, rate, reference = real(op, n, k, x, bias)
        return (lambda: fn() * 1.1), w_bytes, rate, reference
    monkeypatch.setattr(bench, "op_call", off_by_a_tenth)
    rows = bench.bench_ops(["vit_cifar_tiny"], [1], ["w1a8"], "cpu", bench.torch.float32,
                           {"copy_TBps": 1.0, "int8_TOPs": 1.0, "float_TFLOPs": 1.0}, float("inf"),
                           lambda jobs, desc: jobs, [])
    assert all(abs(row["rel_err_vs_cpu"] - 0.1) < 1e-3 for row in rows)
    assert "this row times a wrong result" in capsys.readouterr().err


def test_an_op_that_fails_is_listed_as_skipped_and_the_other_ops_are_still_measured(monkeypatch, capsys):
    real = bench.op_call

    def w1a8_fails(op, n, k, x, bias):  # e.g. a tiling the device cannot launch
        if op == "w1a8":
            raise RuntimeError("out of resource: shared memory")
        return real(op, n, k, x, bias)
    monkeypatch.setattr(bench, "op_call", w1a8_fails)
    skipped = []
    rows = bench.bench_ops(["vit_cifar_tiny"], [1], ["dense", "w1a8", "w1.58a8"], "cpu", bench.torch.float32,
                           {"copy_TBps": 1.0, "int8_TOPs": 1.0, "float_TFLOPs": 1.0}, float("inf"),
                           lambda jobs, desc: jobs, skipped)
    assert [r["op"] for r in rows] == ["dense", "w1.58a8"] * 4
    assert len(skipped) == 4 and all("w1a8: failed (RuntimeError: out of resource" in s for s in skipped)
    assert "w1a8 vit_cifar_tiny" in capsys.readouterr().err


def test_a_model_variant_that_fails_is_listed_as_skipped_and_the_others_are_still_timed(monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "tiny", TINY)  # (vit_cifar_tiny's ternary forwards on the CPU ops: seconds)
    real = bench.build

    def w1a8_fails(name, variant):
        if variant == "w1a8":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(name, variant)
    monkeypatch.setattr(bench, "build", w1a8_fails)
    skipped = []
    rows = bench.bench_models(["tiny"], [1], ["fp", "w1a8", "w1.58a8"], "cpu", bench.torch.float32,
                              float("inf"), lambda items, desc, leave: items, skipped)
    assert [r["variant"] for r in rows] == ["fp", "w1.58a8"]
    assert skipped == ["model tiny w1a8: failed (RuntimeError: CUDA error: an illegal memory access "
                       "was encountered)"]


def test_op_shapes_at_the_targets_batches_come_first_so_a_time_limit_cuts_the_others():
    order = []
    bench.bench_ops(["vit_base_patch16_224", "vit_cifar_tiny"], [1, 8, 64, 256], ["dense"], "cpu",
                    bench.torch.float32, {}, float("inf"), lambda jobs, desc: order.extend(jobs) or [], [])
    batches = [batch for _, _, _, batch in order]
    assert batches == [1, 64] * 8 + [8, 256] * 8  # 2 models x 4 layers, each in its own order
    assert [model for model, *_ in order[:8]] == ["vit_base_patch16_224"] * 8


def test_end_to_end_variants_the_targets_judge_run_right_after_the_fp_baseline():
    assert bench.VARIANTS[:4] == ("fp", *bench.TERNARY, "w1a8")


def test_a_model_whose_logits_are_off_its_cpu_float32_runs_is_flagged_in_its_rows_and_on_stderr(monkeypatch, capsys):
    real = bench.build

    def broken_after_the_move(name, variant):  # a model whose device copy computes something else
        model = real(name, variant)
        real_to = model.to
        def to(*args, **kwargs):
            moved = real_to(*args, **kwargs)
            moved.head.bias.data += 10.0
            return moved
        model.to = to
        return model
    monkeypatch.setattr(bench, "build", broken_after_the_move)
    rows = bench.bench_models(["vit_cifar_tiny"], [1], ["w1a8"], "cpu", bench.torch.float32, float("inf"),
                              lambda items, desc, leave: items, [])
    assert rows[0]["logits_rel_err_vs_cpu_fp32"] > 1
    assert "its rows time a wrong model" in capsys.readouterr().err


def test_a_benchmark_killed_midway_leaves_the_rows_it_measured_in_its_json(tmp_path, monkeypatch):
    out, real_build = tmp_path / "bench.json", bench.build

    def build_then_die(name, variant):
        if variant != "fp":
            raise KeyboardInterrupt  # the call's time ran out during the end-to-end part
        return real_build(name, variant)
    monkeypatch.setattr(bench, "build", build_then_die)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--device", "cpu", "--quick", "--batches", "1", "--ops", "dense,w1a8", "--variants", "fp,w1a8",
                    "--out", str(out), "--plot", str(tmp_path / "bench.png")])
    r = json.loads(out.read_text())
    assert len(r["ops"]) == 4 * 2 and [row["variant"] for row in r["models"]] == ["fp"]
    assert r["complete"] is False
    assert (tmp_path / "bench.png").stat().st_size > 0   # the per-op plot, drawn before the end-to-end part


@pytest.mark.parametrize("args,match", [(["--ops", "w5"], "unknown op 'w5'"),
                                        (["--models", "vit_huge"], "unknown model 'vit_huge'"),
                                        (["--variants", "w7"], "unknown variant 'w7'"),
                                        (["--batches", ","], "--batches names nothing"),
                                        (["--ops", ""], "--ops names nothing"),
                                        (["--models", ",,", "--e2e-models", ","], "nothing to measure"),
                                        (["--batches", "1,99999999999999999999"], "at most 1024 images a batch")])
def test_unknown_names_and_impossible_batches_are_refused_before_any_timing(args, match):
    with pytest.raises(ValueError, match=match):
        bench.main(["--device", "cpu", *args])


def test_the_gpu_only_int_mm_op_is_refused_on_the_cpu_before_any_timing():
    with pytest.raises(ValueError, match="--ops int_mm .* runs on --device cuda only"):
        bench.main(["--device", "cpu", "--ops", "dense,int_mm"])


def test_a_plot_of_speed_ups_without_the_dense_baseline_is_refused_before_any_timing(tmp_path):
    with pytest.raises(ValueError, match="add dense to --ops"):
        bench.main(["--device", "cpu", "--ops", "w8a8", "--plot", str(tmp_path / "b.png")])


def test_a_plot_without_the_per_op_part_is_refused_before_any_timing(tmp_path):
    """`--models ''` times no op, so there is nothing to plot: refused, not a run that writes no PNG."""
    with pytest.raises(ValueError, match="--plot draws the per-op part"):
        bench.main(["--device", "cpu", "--models", "", "--e2e-models", "vit_cifar_tiny", "--plot", str(tmp_path / "b.png")])
    assert not (tmp_path / "b.png").exists()


_TWO_OPS = [{"model": "vit_cifar_tiny", "op": op, "M": 65, "speedup_vs_dense": s}
            for op, s in [("dense", 1), ("w1a8", 2)]]


def test_the_speed_up_plot_leaves_no_figure_open(tmp_path):
    import matplotlib.pyplot as plt
    open_before = plt.get_fignums()
    bench.plot(_TWO_OPS, tmp_path / "b.png", "cpu")
    assert (tmp_path / "b.png").stat().st_size > 0 and plt.get_fignums() == open_before


def speed_up_figure(monkeypatch, rows, title="cpu"):
    figs = []
    monkeypatch.setattr(bench, "write_png", lambda path, fig, dpi: figs.append(fig))
    bench.plot(rows, "b.png", title)
    figs[0].canvas.draw()
    return figs[0]


def test_the_speed_up_plot_writes_speed_ups_and_ms_as_numbers_not_powers_of_ten(monkeypatch):
    rows = [{"model": "vit_cifar_tiny", "op": op, "M": m, "speedup_vs_dense": s}
            for m in (197, 12608) for op, s in [("dense", 1), ("w1a8", 0.3 if m == 197 else 0.45)]]
    ax = speed_up_figure(monkeypatch, rows).axes[0]
    ys = [t.get_text() for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True) if t.get_text()]
    xs = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert "0.3" in ys and "1" in ys and xs == ["197", "12608"]


def test_the_speed_up_plot_names_the_device_and_baseline_within_the_figure(monkeypatch):
    title = "NVIDIA H200: each op's speed-up over dense = F.linear in bfloat16 (cuBLAS), geometric mean over the layers"
    fig = speed_up_figure(monkeypatch, _TWO_OPS, title)
    box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
    assert " ".join(fig._suptitle.get_text().split()) == title
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1


def test_targets_skip_op_rows_measured_without_the_dense_baseline():
    """`--ops w1.58a8,w1a8` (no "dense") leaves speedup_vs_dense None: the speed-up targets are not judged,
    the roofline target still is."""
    rows = [{"model": "vit_base_patch16_224", "layer": layer, "op": op, "M": m, "speedup_vs_dense": None,
             "bound": "memory", "roofline_frac": 0.5}
            for op in ("w1.58a8", "w1a8") for layer in ("qkv", "fc1") for m in (197, 12608)]
    targets = bench.check_targets(rows, [])
    assert {t["target"].split(" ")[0] for t in targets} == {"w1.58a8", "w1a8"}
    assert all("memory bound" in t["target"] for t in targets)


def test_graphed_models_are_also_judged_back_to_back_where_weights_can_stay_in_l2():
    """A GPU run's batch-1 target is judged on the L2-cleared replay and, beside it, on back-to-back
    replays; a CPU run (no graphs, timed back to back already) gets the one target."""
    def rows(graphed):
        return [{"model": "vit_base_patch16_224", "variant": v, "batch": 1, "ms": ms, "ms_back_to_back": b2b,
                 "cuda_graph": graphed, "memory_ratio_vs_fp": 1.0, "linear_memory_ratio_vs_fp": 1.0}
                for v, ms, b2b in (("fp", 2.0, 1.9), ("w1.58a8", 2.2, 0.95))]
    latency = lambda targets: {t["target"]: t["measured"] for t in targets if "latency" in t["target"]}  # noqa: E731
    assert latency(bench.check_targets([], rows(graphed=True))) == {
        "vit_base_patch16_224: w1.58a8 batch-1 latency / bf16": 1.1,
        "vit_base_patch16_224: w1.58a8 batch-1 latency / bf16, back to back": 0.5}
    assert list(latency(bench.check_targets([], rows(graphed=False)))) == [
        "vit_base_patch16_224: w1.58a8 batch-1 latency / bf16"]


def test_the_op_shapes_are_the_vit_s_b_l_blocks_at_m_of_batch_times_197_tokens():
    shapes = {name: bench.layer_shapes(bench.SHAPES[name])
              for name in ("deit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224")}
    assert shapes == {
        "deit_small_patch16_224": {"qkv": (1152, 384), "proj": (384, 384), "fc1": (1536, 384), "fc2": (384, 1536)},
        "vit_base_patch16_224": {"qkv": (2304, 768), "proj": (768, 768), "fc1": (3072, 768), "fc2": (768, 3072)},
        "vit_large_patch16_224": {"qkv": (3072, 1024), "proj": (1024, 1024), "fc1": (4096, 1024),
                                  "fc2": (1024, 4096)}}
    op_models, _, batches = bench.DEFAULTS["cuda"]
    assert set(shapes) <= set(op_models) and batches == [1, 8, 64, 256]
    assert {bench.SHAPES[name].num_patches + 1 for name in shapes} == {197}


def _synthetic_op_rows(monkeypatch, models, batches, ops, seconds, ceil, layers=("qkv",)):
    """bench_ops' rows with each op's time set to seconds[op] (no clock read)."""
    real, op_of = bench.op_call, {}

    def tagged(op, n, k, x, bias):
        fn, w_bytes, rate, reference = real(op, n, k, x, bias)
        op_of[fn] = op
        return fn, w_bytes, rate, reference
    monkeypatch.setattr(bench, "op_call", tagged)
    monkeypatch.setattr(bench, "timed", lambda fn, device, host=False: seconds[op_of[fn]])
    return bench.bench_ops(models, batches, ops, "cpu", bench.torch.float32, ceil, float("inf"),
                           lambda jobs, desc: [job for job in jobs if job[1] in layers], [])


def test_op_rows_use_m_of_batch_times_tokens(monkeypatch):
    rows = _synthetic_op_rows(monkeypatch, ["vit_base_patch16_224"], [1, 8], ["dense"], {"dense": 1e-3},
                              {"copy_TBps": 1.0, "int8_TOPs": 1.0, "float_TFLOPs": 1.0}, layers=("proj",))
    assert [(row["batch"], row["M"]) for row in rows] == [(1, 197), (8, 1576)]


def test_op_rows_derive_bytes_rates_roofline_and_speed_up_from_the_measured_time(monkeypatch):
    # 1 GB/s copies, 10 GFLOP/s float and 100 GOP/s int8: dense is compute-bound, the 1-bit op memory-bound
    ceil = {"copy_TBps": 1e-3, "float_TFLOPs": 1e-2, "int8_TOPs": 1e-1}
    dense, w1a8 = _synthetic_op_rows(monkeypatch, ["vit_cifar_tiny"], [2], ["dense", "w1a8"],
                                     {"dense": 4e-3, "w1a8": 1e-3}, ceil)
    m, n, k = 2 * 65, 384, 128  # the qkv layer of vit_cifar_tiny (64 patches + the class token)
    flops = 2 * m * n * k
    dense_bytes = 4 * m * k + 4 * n * k + 4 * m * n  # x, the fp32 weights and y, each once
    w1a8_bytes = 4 * m * k + (n * k // 8 + 4 * n) + 4 * m * n  # 1-bit codes and a float32 scale a row
    assert (dense["M"], dense["bytes"], w1a8["bytes"]) == (m, dense_bytes, w1a8_bytes)
    assert (dense["ms"], w1a8["ms"], w1a8["eager_ms"]) == (4.0, 1.0, 1.0)
    assert dense["speedup_vs_dense"] == 1.0 and w1a8["speedup_vs_dense"] == 4.0
    assert w1a8["TBps"] == pytest.approx(w1a8_bytes / 1e-3 / 1e12)
    assert w1a8["TOPS"] == pytest.approx(flops / 1e-3 / 1e12)
    assert (dense["bound"], w1a8["bound"]) == ("compute", "memory")
    assert dense["roofline_frac"] == pytest.approx(flops / 1e10 / 4e-3)
    assert w1a8["roofline_frac"] == pytest.approx(w1a8_bytes / 1e9 / 1e-3)


def test_each_ops_weight_bytes_count_its_codes_and_float32_scales():
    n, k, x, bias = 8, 640, bench.torch.randn(2, 640), bench.torch.randn(8)  # 640: trit planes take 128 bytes
    got = {op: bench.op_call(op, n, k, x, bias)[1:3] for op in bench.OPS if op != "int_mm"}
    assert got == {"dense": (n * k * 4, "float"),
                   "w8a8": (n * k + 4 * n, "int8"), "w4a8": (n * k // 2 + 4 * n, "int8"),
                   "w1.58a8": (n * k // 4 + 4 * n, "int8"), "w1.58a8-b3": (n * 128 + 4 * n, "int8"),
                   "w1a8": (n * k // 8 + 4 * n, "int8"),
                   "w4": (n * k // 2 + 8 * n * (k // 64), "float")}  # a float32 scale and zero per group of 64


def test_the_ceilings_count_a_copy_as_bytes_read_and_written(monkeypatch):
    monkeypatch.setattr(bench, "timed", lambda fn, device, host=False: 1e-3)
    ceil = bench.ceilings("cpu", bench.torch.float32)
    assert ceil == {"copy_TBps": 2 * 2 ** 28 / 1e-3 / 1e12, "float_TFLOPs": 2 * 2048 ** 3 / 1e-3 / 1e12,
                    "int8_TOPs": 2 * 2048 ** 3 / 1e-3 / 1e12, "int8_TOPs_int_mm": 2 * 2048 ** 3 / 1e-3 / 1e12,
                    "matmul_n": 2048, "copy_bytes": 2 ** 28}


def test_weight_bytes_count_codes_scales_and_zero_points_of_kernel_layers_and_float_weights():
    from cuda_ops import KernelLinear
    from quant.qlinear import QuantLinear
    layer = KernelLinear(QuantLinear.from_linear(bench.nn.Linear(64, 8), "int4", 32, True))
    codes, groups, bias = 8 * 32, 4 * 8 * 2, 4 * 8  # 4-bit codes, a float32 scale and zero per group of 32
    assert bench.weight_bytes(layer) == (codes + 2 * groups + bias, codes + 2 * groups)
    assert bench.weight_bytes(bench.nn.Sequential(bench.nn.Linear(4, 2))) == (4 * (8 + 2), 4 * 8)


def test_model_rows_derive_throughput_speed_up_and_memory_ratios_against_the_fp_model(monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "tiny", TINY)  # (vit_cifar_tiny's ternary forwards on the CPU ops: seconds)
    real, current = bench.build, []

    def build(name, variant):
        current.append(variant)
        return real(name, variant)
    monkeypatch.setattr(bench, "build", build)
    monkeypatch.setattr(bench, "timed", lambda fn, device, host=False: {"fp": 4e-3, "w1a8": 1e-3}[current[-1]])
    rows = bench.bench_models(["tiny"], [1, 2], ["fp", "w1a8"], "cpu", bench.torch.float32, float("inf"),
                              lambda items, desc, leave: items, [])
    fp_bytes = bench.weight_bytes(real("tiny", "fp"))
    w1a8_bytes = bench.weight_bytes(real("tiny", "w1a8"))
    assert [(r["variant"], r["batch"], r["ms"], r["images_per_s"], r["speedup_vs_fp"]) for r in rows] == [
        ("fp", 1, 4.0, 250.0, 1.0), ("fp", 2, 4.0, 500.0, 1.0), ("w1a8", 1, 1.0, 1000.0, 4.0),
        ("w1a8", 2, 1.0, 2000.0, 4.0)]
    assert rows[2]["weight_MB"] == w1a8_bytes[0] / 1e6 and rows[2]["linear_weight_MB"] == w1a8_bytes[1] / 1e6
    assert rows[2]["memory_ratio_vs_fp"] == fp_bytes[0] / w1a8_bytes[0] > 1
    assert rows[2]["linear_memory_ratio_vs_fp"] == fp_bytes[1] / w1a8_bytes[1]


def _targets(targets):
    return {t["target"]: (t["measured"], t["goal"], t["met"]) for t in targets}


def test_op_targets_judge_the_worst_vit_b_l_layer_at_small_m_and_at_m_12608_against_their_goals():
    def row(model, m, speedup, bound="compute", frac=0.5):
        return {"model": model, "op": "w1a8", "M": m, "speedup_vs_dense": speedup, "bound": bound,
                "roofline_frac": frac}
    rows = [row("vit_base_patch16_224", 197, 1.5), row("vit_large_patch16_224", 197, 2.0),
            row("vit_base_patch16_224", 1576, 0.5),  # neither M <= 256 nor M = 12608: judged by no target
            row("vit_base_patch16_224", 12608, 0.9, "memory", 0.8),
            row("vit_cifar_tiny", 65, 0.1, "memory", 0.1)]  # not a ViT-B/L shape: judged by no target
    assert _targets(bench.check_targets(rows, [])) == {
        "w1a8 >= 1.5x bf16 on ViT-B/L shapes at M <= 256 (worst layer)": (1.5, 1.5, True),
        "w1a8 no slower than bf16 at M = 12608 (worst layer)": (0.9, 1.0, False),
        "w1a8 >= 70% of the memory bound where memory-bound (worst)": (0.8, 0.7, True)}


def test_model_targets_judge_latency_lower_and_memory_and_throughput_higher_than_their_goals():
    def row(variant, batch, ms, speedup=None, memory=None, linear=None):
        return {"model": "vit_base_patch16_224", "variant": variant, "batch": batch, "ms": ms, "cuda_graph": False,
                "speedup_vs_fp": speedup, "memory_ratio_vs_fp": memory, "linear_memory_ratio_vs_fp": linear}
    rows = [row("fp", 1, 2.0), row("w1.58a8", 1, 1.0, memory=7.5, linear=12.0),
            row("fp", 256, 100.0), row("w1.58a8", 256, 80.0, speedup=1.25)]
    name = "vit_base_patch16_224: "
    assert _targets(bench.check_targets([], rows, "float16")) == {
        name + "w1.58a8 batch-1 latency / float16": (0.5, 1.0, True),
        name + "weight memory float16 / w1.58a8 (whole model)": (7.5, 8.0, False),
        name + "weight memory float16 / w1.58a8 (linear weights)": (12.0, 8.0, True),
        name + "w1.58a8 images/s at batch 256 / float16": (1.25, 1.3, False)}


@pytest.fixture
def stubbed_main(monkeypatch):
    """bench.main with its measuring parts replaced: what they are given, and a clock standing at 100 s."""
    seen = {}

    def ops(models, batches, ops, device, dtype, ceil, deadline, *rest, **kw):
        seen.update(ops_deadline=deadline, batches=batches)
        return []

    def models(models, batches, variants, device, dtype, deadline, *rest, **kw):
        seen["models_deadline"] = deadline
        return [{"model": "vit_cifar_tiny", "variant": v, "batch": 1, "ms": 1.0, "ms_back_to_back": 1.0,
                 "images_per_s": 1e3, "cuda_graph": False, "speedup_vs_fp": None, "weight_MB": 1.0,
                 "memory_ratio_vs_fp": 9.0, "linear_memory_ratio_vs_fp": 9.0} for v in ("fp", "w1.58a8")]
    monkeypatch.setattr(bench, "ceilings", lambda device, dtype: {
        "copy_TBps": 1.0, "float_TFLOPs": 1.0, "int8_TOPs": 1.0, "int8_TOPs_int_mm": 1.0})
    monkeypatch.setattr(bench, "bench_ops", ops)
    monkeypatch.setattr(bench, "bench_models", models)
    monkeypatch.setattr(bench, "time", type("Clock", (), {"monotonic": staticmethod(lambda: 100.0)}))
    return seen


def test_the_per_op_part_gets_60_percent_of_the_time_limit_unless_there_is_no_end_to_end_part(stubbed_main):
    bench.main(["--device", "cpu", "--time-limit", "10"])
    assert (stubbed_main["ops_deadline"], stubbed_main["models_deadline"]) == (106.0, 110.0)
    bench.main(["--device", "cpu", "--time-limit", "10", "--e2e-models", ""])
    assert stubbed_main["ops_deadline"] == 110.0


def test_a_time_limit_of_inf_the_default_is_accepted_as_no_limit(stubbed_main):
    assert bench.main(["--device", "cpu", "--time-limit", "inf"]) == 0
    assert stubbed_main["ops_deadline"] == stubbed_main["models_deadline"] == float("inf")


def test_a_zero_time_limit_is_an_argument_error_not_a_bench_that_measures_nothing(stubbed_main, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--time-limit", "0"])
    assert "--time-limit: expected a number > 0" in capsys.readouterr().err


def test_a_quick_cuda_run_still_measures_its_ceilings(stubbed_main, tmp_path, monkeypatch):
    import sys
    from types import SimpleNamespace
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)  # a GPU, as far as main asks
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda: "a GPU")
    monkeypatch.setitem(sys.modules, "triton", SimpleNamespace(__version__="0"))
    monkeypatch.setitem(sys.modules, "cuda_ops.triton_kernels", SimpleNamespace(TUNER=SimpleNamespace(report=dict)))
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cuda", "--quick", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["ceilings"]["copy_TBps"] == 1.0  # only a CPU's quick run goes without


def test_the_results_file_names_the_baseline_dtype_in_its_fields_and_targets(stubbed_main, tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--dtype", "float16", "--out", str(out)])
    r = json.loads(out.read_text())
    assert (r["dtype"], r["baseline"], r["complete"]) == ("float16", "dense = F.linear in float16", True)
    assert "vit_cifar_tiny: weight memory float16 / w1.58a8 (whole model)" in {t["target"] for t in r["targets"]}


def test_batches_of_up_to_1024_images_are_accepted(stubbed_main):
    assert bench.main(["--device", "cpu", "--batches", "1024"]) == 0
    assert stubbed_main["batches"] == [1024]


def test_a_batch_size_written_twice_in_two_ways_is_measured_once(stubbed_main):
    assert bench.main(["--device", "cpu", "--batches", "1, 8,1,08"]) == 0
    assert stubbed_main["batches"] == [1, 8]


def test_a_plot_of_a_run_that_measured_no_op_says_it_was_not_written(stubbed_main, tmp_path, capsys):
    plot = tmp_path / "speedup.png"
    assert bench.main(["--device", "cpu", "--plot", str(plot)]) == 0  # the stub measures no op, as a time limit may
    assert not plot.exists() and f"no plot was written to {plot}" in capsys.readouterr().err


@pytest.mark.skipif(bench.torch.cuda.is_available(), reason="the refusal is for a machine without a CUDA device")
@pytest.mark.parametrize("stage", ["bench", "parity"])
def test_the_gpu_session_script_refuses_at_once_without_a_cuda_device(tmp_path, stage):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DATA": str(tmp_path / "no-data")}
    r = subprocess.run(["bash", "cuda_ops/gpu_session.sh", stage], cwd=Path(__file__).parents[1], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "error: torch sees no CUDA device" in r.stderr, r.stdout + r.stderr
    assert "warm:" not in r.stdout and "exit code" not in r.stdout  # nothing was warmed or run


def test_a_cpu_run_prints_its_ceilings_in_giga_units_and_a_cuda_run_in_tera(stubbed_main, monkeypatch, capsys):
    import sys
    from types import SimpleNamespace
    bench.main(["--device", "cpu"])
    assert "copy 1000.00 GB/s, float32 matmul 1000.0 GFLOP/s, int8 matmul 1000.0 GOP/s" in capsys.readouterr().out
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda: "a GPU")
    monkeypatch.setitem(sys.modules, "triton", SimpleNamespace(__version__="0"))
    monkeypatch.setitem(sys.modules, "cuda_ops.triton_kernels", SimpleNamespace(TUNER=SimpleNamespace(report=dict)))
    bench.main(["--device", "cuda"])
    assert "copy 1.00 TB/s, bfloat16 matmul 1.0 TFLOP/s, int8 matmul 1.0 TOP/s" in capsys.readouterr().out


def test_a_cpu_run_prints_its_int_mm_ceiling_in_giga_units_too(stubbed_main, capsys):
    bench.main(["--device", "cpu"])
    assert "int8 matmul 1000.0 GOP/s (torch._int_mm 1000.0)" in capsys.readouterr().out
