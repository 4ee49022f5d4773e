"""`python -m cuda_ops.bench` on the CPU, at the smallest settings: tables, a complete JSON, clear refusals."""
import json

import pytest

from cuda_ops import bench


def test_the_cpu_benchmark_writes_every_part_of_its_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--quick", "--batches", "1", "--ops", "w1.58a8,dense,w4",
                       "--variants", "w1.58a8,fp", "--out", str(out), "--plot", str(tmp_path / "b.png")]) == 0
    r = json.loads(out.read_text())
    assert {"command", "date", "device", "machine", "data", "wall_s", "ceilings", "skipped"} <= set(r)
    assert r["complete"] is True
    assert r["ceilings"]["copy_TBps"] > 0 and r["ceilings"]["int8_TOPs"] > 0
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
        bench.main(["--device", "cpu", "--quick", "--batches", "1", "--ops", "dense", "--variants", "fp,w1a8",
                    "--out", str(out)])
    r = json.loads(out.read_text())
    assert len(r["ops"]) == 4 and [row["variant"] for row in r["models"]] == ["fp"]
    assert r["complete"] is False


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


def test_targets_skip_op_rows_measured_without_the_dense_baseline():
    """`--ops w1.58a8,w1a8` (no "dense") leaves speedup_vs_dense None: the speed-up targets are not judged,
    the roofline target still is (min() over None values crashed the run before its complete save)."""
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
