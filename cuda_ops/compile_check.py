"""Compile the Triton kernels for a GPU architecture without a GPU, and report what the compiler made of
them: `python -m cuda_ops.compile_check [--arch 90] [--kernels a8,weight_only,quantize]`.

Triton ships ptxas, so every tiling the tuner may pick can be compiled here to a cubin (sm_90 = H100 and H200),
and its resources read off before any device time is spent: registers per thread, spilled stack bytes,
shared memory per program, whether the loop's loads are software-pipelined (async copies into shared
memory), which matrix instructions were emitted (wgmma on Hopper) and where wgmma reads its first
operand from (registers or shared memory). Spills and a missing pipeline
are the first suspects when a kernel is slow; shared memory over the device's limit is a tiling the
tuner will skip ("out of resource"). Pointers and sizes are assumed 16-divisible, as Triton specializes
them at run time for ViT shapes.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from cuda_ops import triton_kernels as tk
from cuda_ops.ops import A8_FORMATS
from quant.cli import HelpFormatter, output_file, positive_int, provenance, run, write_json

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024}  # bytes of shared memory a program may use


def _compile(fn, signature: dict, constexprs: dict, divisible: list[str], arch: int, num_warps: int,
             num_stages: int):
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    names = fn.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True})


def _resources(cubin: bytes) -> dict:
    """REG, STACK, SHARED of the cubin's one function, from cuobjdump -res-usage (shipped with triton)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED):(\d+)", text)}


def _report(kernel, what: str, cfg, compiled, arch: int, seconds: float) -> dict:
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    res = _resources(compiled.asm["cubin"])
    shared = max(res.get("shared", 0), compiled.metadata.shared)
    mma = sorted(set(re.findall(r"\b(wgmma\.mma_async\.\S+?|mma\.sync\.\S+?)[\s;]", ptx)))
    # wgmma's first operand: a register list ({%r1, ...}) or a shared-memory descriptor (%rd...)
    a_operands = re.findall(r"wgmma\.mma_async\S*\s+\{[^}]*\},\s*(\S)", ptx)
    wgmma_a = None if not a_operands else "registers" if all(a == "{" for a in a_operands) else "shared"
    return {"kernel": kernel, "variant": what, "config": cfg, "regs": res.get("reg"), "spill_stack": res.get("stack"),
            "shared": shared, "fits": shared <= SMEM_LIMIT[arch],
            "pipelined_loads": ttgir.count("async_copy_global_to_local"), "mma": mma, "wgmma_a": wgmma_a,
            "compile_s": seconds}


def check(job: tuple, arch: int = 90) -> dict:
    """Compile one (kernel, variant, config, signature, constexprs, divisible args) job and report on it."""
    fn, what, cfg, sig, const, div = job
    t0 = time.perf_counter()
    try:
        compiled = _compile(fn, sig, const, div, arch, cfg.num_warps, cfg.num_stages)
    except Exception as e:  # a tiling the compiler refuses is a finding, not a crash
        return {"kernel": fn.__name__, "variant": what, "config": cfg, "error": str(e).splitlines()[0]}
    return _report(fn.__name__, what, cfg, compiled, arch, time.perf_counter() - t0)


def _mma_name(instr: str) -> str:
    """The instruction, its tile and the type of its A operand, the second type named (the first is the
    accumulator's): 'wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8' -> 'wgmma m64n128k32 s8',
    'mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32' -> 'mma m16n8k32 s8'."""
    parts = instr.split(".")
    shape = next((t for t in parts if re.fullmatch(r"m\d+n\d+k\d+", t)), "?")
    types = [t for t in parts if re.fullmatch(r"[suf]\d+|bf16|tf32|e[45]m[23]", t)]
    return f"{parts[0]} {shape} {types[1] if len(types) > 1 else '?'}"


def a8_jobs(ms: list[int]):
    sig = {"x_ptr": "*bf16", "q_ptr": "*i8", "sx_ptr": "*fp32", "w_ptr": "*u8", "sw_ptr": "*fp32", "b_ptr": "*bf16",
           "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "KB": "i32", "stride_xm": "i32",
           "stride_qm": "i32", "stride_ym": "i32"}
    div = ["x_ptr", "q_ptr", "sx_ptr", "w_ptr", "sw_ptr", "b_ptr", "y_ptr", "N", "K", "KB", "stride_xm",
           "stride_qm", "stride_ym"]
    # the swapped kernel reads quantized activations only: the same arguments, less x's
    swap_sig = {a: t for a, t in sig.items() if a not in ("x_ptr", "stride_xm")}
    swap_div = [a for a in div if a in swap_sig]
    seen = set()
    for fmt, (bits, mul, off) in A8_FORMATS.items():
        for m in ms:
            for c in tk.a8_candidates(m):
                if c.swap:  # the swapped kernel: y^T = W q^T
                    if (fmt, c) not in seen:
                        seen.add((fmt, c))
                        const = dict(BITS=bits, MUL=mul, OFF=off, TRITS=fmt == "ternary_b3", HAS_BIAS=True,
                                     BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_KP=c.block_k * bits // 8, GROUP_N=8)
                        yield tk._a8_gemm_swap_kernel, f"{fmt} swapped", c, swap_sig, const, swap_div
                    continue
                if c.predecode:  # then the GEMM reads int8 weights, the same kernel for every format
                    if bits == 8 or ("int8 decoded", c) in seen:
                        continue
                    seen.add(("int8 decoded", c))
                    const = dict(BITS=8, MUL=1, OFF=0, TRITS=False, FUSE_QUANT=False, HAS_BIAS=True,
                                 BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_KP=c.block_k, GROUP_M=8, SPLIT_K=1)
                    yield tk._a8_gemm_kernel, "int8 decoded", c, {**sig, "w_ptr": "*i8"}, const, div
                    continue
                if (fmt, c) in seen:
                    continue
                seen.add((fmt, c))
                const = dict(BITS=bits, MUL=mul, OFF=off, TRITS=fmt == "ternary_b3", FUSE_QUANT=c.fuse, HAS_BIAS=True,
                             BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_KP=c.block_k * bits // 8, GROUP_M=8,
                             SPLIT_K=c.split_k)
                yield tk._a8_gemm_kernel, fmt, c, sig, const, div


def decode_jobs():
    """The predecode candidates' first pass (codes -> int8), one per packed format."""
    sig = {"w_ptr": "*u8", "d_ptr": "*i8", "N": "i32", "K": "i32", "KB": "i32"}
    for fmt, (bits, mul, off) in A8_FORMATS.items():
        if bits < 8:
            const = dict(BITS=bits, MUL=mul, OFF=off, TRITS=fmt == "ternary_b3", BLOCK_N=32, BLOCK_K=128)
            yield tk._decode_weights_kernel, f"decode {fmt}", tk.Config(0, 32, 128, 4, 3), sig, const, \
                ["w_ptr", "d_ptr", "N", "K", "KB"]


def weight_only_jobs(ms: list[int]):
    sig = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*fp32", "z_ptr": "*fp32", "lut_ptr": "*fp32",
           "b_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "KB": "i32", "G": "i32",
           "group_size": "i32", "stride_xm": "i32", "stride_ym": "i32"}
    div = ["x_ptr", "w_ptr", "s_ptr", "z_ptr", "lut_ptr", "b_ptr", "y_ptr", "N", "K", "KB", "group_size",
           "stride_xm", "stride_ym"]
    seen = set()
    for name, bits, zeros, lut in [("int4 asym g64", 4, True, False), ("nf4 g64", 4, False, True),
                                   ("int8 sym", 8, False, False), ("int2 asym g64", 2, True, False)]:
        for m in ms:
            for c in tk.weight_only_candidates(m, 64 if bits < 8 else 768, 768):
                if (name, c) in seen:
                    continue
                seen.add((name, c))
                const = dict(BITS=bits, HAS_ZEROS=zeros, HAS_LUT=lut, HAS_BIAS=True, DOT_DTYPE=tk.tl.bfloat16,
                             BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_KP=c.block_k * bits // 8,
                             **{"GROUP_N" if c.swap else "GROUP_M": 8})
                if c.swap:
                    yield tk._weight_only_gemm_swap_kernel, f"{name} swapped", c, sig, const, div
                else:
                    yield tk._weight_only_gemm_kernel, name, c, sig, const, div


def quantize_jobs():
    sig = {"x_ptr": "*bf16", "lw_ptr": "*bf16", "lb_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "M": "i32",
           "K": "i32", "stride_xm": "i32", "stride_qm": "i32", "eps": "fp32"}
    div = ["x_ptr", "lw_ptr", "lb_ptr", "q_ptr", "s_ptr", "K", "stride_xm", "stride_qm"]
    for k in (768, 1024, 3072, 4096):
        for ln in (False, True):
            block_k = triton.next_power_of_2(k)
            block_m = max(1, min(16, 4096 // block_k))
            const = dict(HAS_LN=ln, LN_W=ln, LN_B=ln, BLOCK_M=block_m, BLOCK_K=block_k, ONE_PASS=True)
            cfg = tk.Config(block_m, 0, block_k, 4 if block_m * block_k <= 4096 else 8, 1)
            yield tk._quantize_rows_kernel, f"K={k}{' +LayerNorm' if ln else ''}", cfg, sig, const, div


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cuda_ops.compile_check", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--arch", type=int, choices=sorted(SMEM_LIMIT), default=90,
                   help="compute capability x 10 (90: H100/H200, 80: A100, 89: L4/RTX 40)")
    p.add_argument("--kernels", default="a8,weight_only,quantize", help="comma-separated: a8,weight_only,quantize")
    p.add_argument("--m", default="197,1576,12608", help="M values whose tuning candidates are compiled")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    args = p.parse_args(argv)
    if args.out:
        output_file(args.out, ".json")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("unset TRITON_INTERPRET: the interpreter compiles nothing")
    kernels = [k for k in args.kernels.split(",") if k]
    if not kernels:
        raise ValueError("--kernels names no kernel; known: a8, weight_only, quantize")
    unknown = set(kernels) - {"a8", "weight_only", "quantize"}
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; known: a8, weight_only, quantize")
    try:
        ms = [positive_int(v) for v in args.m.split(",") if v]
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"--m: {e}") from None
    if not ms:
        raise ValueError("--m names no M value")
    jobs = []
    jobs += list(a8_jobs(ms)) + list(decode_jobs()) if "a8" in kernels else []
    jobs += list(weight_only_jobs(ms)) if "weight_only" in kernels else []
    jobs += list(quantize_jobs()) if "quantize" in kernels else []
    rows, start = [], time.monotonic()
    print(f"triton {triton.__version__}, sm_{args.arch}: {len(jobs)} kernels")
    print(f"{'kernel':<18}{'variant':<22}{'BM':>4}{'BN':>5}{'BK':>5}{'w':>3}{'st':>3}{'fuse':>5}{'sk':>3}{'regs':>6}"
          f"{'spill':>7}{'smem KB':>9}{'async':>6}  mma")
    for job in jobs:
        fn, what, cfg = job[:3]
        r = check(job, args.arch)
        rows.append(r)
        if "error" in r:
            print(f"{fn.__name__[1:18]:<18}{what:<22} {cfg}: ERROR {r['error'][:80]}")
            continue
        print(f"{fn.__name__[1:18]:<18}{what:<22}{cfg.block_m:>4}{cfg.block_n:>5}{cfg.block_k:>5}{cfg.num_warps:>3}"
              f"{cfg.num_stages:>3}{'y' if cfg.fuse else '':>5}{cfg.split_k:>3}{r['regs']:>6}{r['spill_stack']:>7}"
              f"{r['shared'] / 1024:>9.1f}{r['pipelined_loads']:>6}  {','.join(_mma_name(m) for m in r['mma'])}"
              + (" (A in registers)" if r["wgmma_a"] == "registers" else "")
              + ("" if r["fits"] else "  OVER SHARED-MEMORY LIMIT"))
    spilled = [r for r in rows if r.get("spill_stack")]
    print(f"\n{len(rows)} kernels; {len(spilled)} spill registers; "
          f"{sum('error' in r for r in rows)} failed to compile; {sum(not r.get('fits', True) for r in rows)} over "
          f"the shared-memory limit")
    if args.out:
        for r in rows:
            r["config"] = vars(r["config"])
        write_json(args.out, {
            **provenance("cuda_ops.compile_check", argv), "compiler": "triton's ptxas (no GPU needed)",
            "data": "none (compiler output)", "wall_s": time.monotonic() - start, "triton": triton.__version__,
            "arch": args.arch, "kernels": rows}, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
