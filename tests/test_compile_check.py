"""The Triton kernels compile for the H100 (sm_90) here, without a GPU, into what a fast kernel needs."""
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
