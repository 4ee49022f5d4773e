"""The Triton kernels compile for the H100 (sm_90) here, without a GPU, into what a fast kernel needs."""
import json
import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the interpreter compiles nothing", allow_module_level=True)

from cuda_ops import compile_check  # noqa: E402
from cuda_ops.triton_kernels import a8_candidates  # noqa: E402


def test_the_ternary_gemm_compiles_for_sm90_to_pipelined_wgmma_without_spills():
    cfg = next(c for c in a8_candidates(197) if not c.fuse and c.block_m == 64)
    job = next(j for j in compile_check.a8_jobs([197]) if j[1] == "ternary" and j[2] == cfg)
    r = compile_check.check(job, arch=90)
    assert "error" not in r, r.get("error")
    assert r["spill_stack"] == 0 and r["fits"]
    assert r["pipelined_loads"] > 0  # the K loop's loads are async copies into shared memory
    assert any(m.startswith("wgmma.mma_async") and m.endswith(".s8.s8") for m in r["mma"])  # int8 tensor cores


@pytest.mark.parametrize("jobs,variant,mma", [
    (compile_check.a8_jobs, "ternary swapped", "wgmma.mma_async.sync.aligned.m64n16k32.s32.s8.s8"),
    (compile_check.weight_only_jobs, "int4 asym g64 swapped", "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16")])
def test_the_swapped_gemms_feed_wgmma_their_decoded_weights_from_registers(jobs, variant, mma):
    job = next(j for j in jobs([16]) if j[1] == variant and j[2].block_m == 16)
    r = compile_check.check(job, arch=90)
    assert "error" not in r, r.get("error")
    assert r["spill_stack"] == 0 and r["fits"]
    assert r["mma"] == [mma]  # 16 rows of x: wgmma's N
    assert r["wgmma_a"] == "registers"


@pytest.mark.parametrize("args, match", [(["--kernels", ","], "--kernels names no kernel"),
                                         (["--kernels", "a9"], "unknown kernels"), (["--m", ","], "--m names no M")])
def test_a_check_of_nothing_or_of_unknown_kernels_is_refused(args, match):
    with pytest.raises(ValueError, match=match):
        compile_check.main(args)


class _Compiled:
    """What triton.compile returns, as far as the report reads it."""

    def __init__(self, ptx="", ttgir="", shared=0):
        self.asm = {"ptx": ptx, "ttgir": ttgir, "cubin": b""}
        self.metadata = type("Metadata", (), {"shared": shared})


def _report(monkeypatch, compiled, cubin_shared=0):
    monkeypatch.setattr(compile_check, "_resources", lambda cubin: {"reg": 96, "stack": 0, "shared": cubin_shared})
    return compile_check._report("k", "v", None, compiled, 90, 0.0)


def test_a_tiling_fits_while_its_larger_shared_memory_figure_is_within_the_devices_limit(monkeypatch):
    limit = compile_check.SMEM_LIMIT[90]
    assert _report(monkeypatch, _Compiled(shared=limit), cubin_shared=1024)["shared"] == limit
    assert _report(monkeypatch, _Compiled(shared=limit), cubin_shared=1024)["fits"]
    assert not _report(monkeypatch, _Compiled(shared=1024), cubin_shared=limit + 1)["fits"]


def test_the_report_counts_pipelined_loads_and_says_where_wgmma_reads_its_first_operand(monkeypatch):
    registers = "wgmma.mma_async.sync.aligned.m64n16k32.s32.s8.s8 {%r1, %r2}, {%r3, %r4}, %rd5, p, 1, 1;\n"
    shared = "wgmma.mma_async.sync.aligned.m64n16k32.s32.s8.s8 {%r1, %r2}, %rd4, %rd5, p, 1, 1;\n"
    ttgir = "ttg.async_copy_global_to_local\nttg.async_copy_global_to_local\n"
    r = _report(monkeypatch, _Compiled(registers + shared, ttgir))
    assert r["mma"] == ["wgmma.mma_async.sync.aligned.m64n16k32.s32.s8.s8"]
    assert (r["pipelined_loads"], r["wgmma_a"], r["regs"], r["spill_stack"]) == (2, "shared", 96, 0)
    assert _report(monkeypatch, _Compiled(registers))["wgmma_a"] == "registers"
    assert _report(monkeypatch, _Compiled("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%r1};"))["wgmma_a"] is None


def test_mma_instructions_are_named_by_family_shape_and_operand_type():
    assert compile_check._mma_name("wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8") == "wgmma m64n128k32 s8"
    assert compile_check._mma_name("wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16") == "wgmma m64n16k16 bf16"
    assert compile_check._mma_name("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32") == "mma m16n8k32 s8"


def test_a_tiling_the_compiler_refuses_is_reported_with_the_first_line_of_its_error(monkeypatch):
    def refuse(*args):
        raise RuntimeError("out of resource: shared memory\nRequired: 300000")
    monkeypatch.setattr(compile_check, "_compile", refuse)
    job = next(compile_check.quantize_jobs())
    r = compile_check.check(job)
    assert r == {"kernel": "_quantize_rows_kernel", "variant": "K=768", "config": job[2],
                 "error": "out of resource: shared memory"}


def test_the_jobs_cover_each_packed_formats_decoding_and_trit_planes_only_for_ternary_b3():
    assert [job[1] for job in compile_check.decode_jobs()] == [
        "decode ternary", "decode ternary_b3", "decode binary", "decode int4"]
    for job in [*compile_check.a8_jobs([197, 16]), *compile_check.decode_jobs()]:
        assert job[4]["TRITS"] == ("ternary_b3" in job[1]), job[1]


def test_quantize_jobs_run_4096_element_tiles_on_4_warps():
    cfgs = [job[2] for job in compile_check.quantize_jobs()]
    assert len(cfgs) == 8 and all(c.block_m * c.block_k == 4096 and c.num_warps == 4 for c in cfgs)


def test_int8_weight_only_jobs_are_one_group_a_row_and_take_k_tiles_beyond_64():
    assert max(job[2].block_k for job in compile_check.weight_only_jobs([1576]) if job[1] == "int8 sym") > 64


def test_the_interpreter_or_an_m_below_1_is_refused(monkeypatch):
    monkeypatch.setattr(compile_check, "check", lambda job, arch: pytest.fail("compiled a kernel"))
    with pytest.raises(ValueError, match="--m: "):
        compile_check.main(["--m", "0"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="unset TRITON_INTERPRET"):
        compile_check.main([])


def test_the_json_report_lists_each_kernel_with_its_config_and_the_summary_counts_failures(monkeypatch, tmp_path,
                                                                                        capsys):
    def fake_check(job, arch):
        fn, what, cfg = job[:3]
        row = {"kernel": fn.__name__, "variant": what, "config": cfg}
        if what == "K=768":
            return {**row, "error": "refused"}
        return {**row, "regs": 32, "spill_stack": 8 * (what == "K=1024"), "shared": 0, "fits": what != "K=4096",
                "pipelined_loads": 0, "mma": [], "wgmma_a": None}
    monkeypatch.setattr(compile_check, "check", fake_check)
    out = tmp_path / "check.json"
    assert compile_check.main(["--kernels", "quantize", "--arch", "80", "--out", str(out)]) == 0
    summary = "8 kernels; 1 spill registers; 1 failed to compile; 1 over the shared-memory limit"
    assert summary in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["arch"] == 80 and len(r["kernels"]) == 8
    assert r["kernels"][0]["config"]["block_k"] == 1024 and r["kernels"][0]["error"] == "refused"
