"""Benchmark the bitvit ops and quantized ViTs against bf16 cuBLAS: `python -m cuda_ops.bench`.

    python -m cuda_ops.bench --out assets/results/cuda_bench.json           # on a GPU: the full run
    python -m cuda_ops.bench --device cpu --out /tmp/cpu_bench.json         # on a CPU: small and quick

Three parts, printed as tables and written to one JSON file (`--out`, with command, device, date, wall time):
1. ceilings, measured in the same run: device-to-device copy bandwidth (bytes read + written), the
   baseline dtype's and int8 matmul rates (torch.mm, torch._int_mm on 8192^3 random operands; 2048^3 on a CPU;
   none by `--quick` on a CPU, whose operands small enough to be quick would time its caches and call overhead).
   On a GPU with a 16-bit baseline the int8 ceiling is twice the 16-bit rate where torch._int_mm
   reaches less (the tensor cores' int8 rate; cuBLASLt's int8 GEMM falls far short of it on Hopper).
2. ops: the time of each packed op against "dense", F.linear in the baseline dtype (bf16 cuBLAS on a GPU, fp32 on a CPU), at the
   linear shapes (qkv, proj, fc1, fc2) of the reference models and ViT-S/B/L, at M = batch x tokens
   (batches 1 and 64 first, the targets' M, so that `--time-limit` cuts the others first);
   achieved TB/s and TOPS (printed in GB/s and GOPS on a CPU), whether the shape is memory- or compute-bound
   on this device, and the fraction of that roofline bound reached (bytes counted as each input read once,
   output written once; none without ceilings).
3. models: weight memory, batch-1 latency (CUDA graph replays on a GPU) and images/s at larger batches
   of the FP model and its w8a8, w4 (int4 groups of 64, int8 head, weight-only), w4a8 (int4, one scale
   per row, int8 activations), w1.58a8 (2-bit codes), w1.58a8-b3 (the same model with base-3 trit planes
   in memory) and w1a8 versions on the bitvit kernels (`to_kernels`); random weights (speed does not
   depend on them).
Then the issue's speed targets, each marked met or missed, by how much.
GPU times are medians from `triton.testing.do_bench`, which clears the L2 cache before every run. A GPU
op's time ("ms", and the speed-ups) is the replay of a CUDA graph of that one call: the kernels' own time,
as a graphed model runs them; "eager_ms" is the same call from Python, dispatch overhead included.
A GPU model's "ms" is a graph replay after the L2 clearing too (a cold cache: the conservative figure,
which the targets judge); "ms_back_to_back" replays it again and again with a synchronize after each, as
a stream of frames runs, where a low-bit model's weights can stay in L2 and the bf16 model's cannot.
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cuda_ops.modules import CUDAGraphModel, KernelLinear, capture_graph, to_kernels
from cuda_ops.ops import A8_OPS, weight_only_linear
from quant.cli import (HelpFormatter, load_average, number_in, output_file, positive_int, provenance, run, write_json,
                       write_png)
from quant.models import CONFIGS, ViTConfig, VisionTransformer
from quant.pack import pack_codes, pack_trit_planes

# ViT-L/16 at 224 px has no bitvit config (no checkpoint is used); its shape is standard.
SHAPES: dict[str, ViTConfig] = {**CONFIGS, "vit_large_patch16_224": ViTConfig(
    img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, num_classes=1000, classes=())}
# "dense": F.linear in the baseline dtype
OPS = ("dense", "int_mm", "w8a8", "w4", "w4a8", "w1.58a8", "w1.58a8-b3", "w1a8")
# end to end: the FP baseline, then the variants the targets judge, then the others (a time limit cuts the last)
VARIANTS = ("fp", "w1.58a8", "w1.58a8-b3", "w1a8", "w8a8", "w4a8", "w4")
TERNARY = ("w1.58a8", "w1.58a8-b3")  # ternary codes 4 a byte, or trit planes 5 a byte
MAX_BATCH = 1024  # four times the targets' largest; ViT-L's fc2 input is then 1.7 GB in bf16
TARGET_BATCHES = (1, 64)  # the op targets' M <= 256 and M = 12,608 (ViT-B/L's 197 tokens a batch)
DEFAULTS = {  # device -> (op models, model-benchmark models, batches)
    "cuda": (["vit_base_patch16_224", "vit_large_patch16_224", "deit_small_patch16_224", "vit_cifar_small",
              "vit_cifar_tiny"],
             ["vit_base_patch16_224", "vit_cifar_small", "deit_small_patch16_224", "vit_cifar_tiny"], [1, 8, 64, 256]),
    "cpu": (["vit_cifar_tiny"], ["vit_cifar_tiny"], [1, 8]),
}


# ----------------------------------------------------------------------------- timing

CPU_TIMING_S = 0.3  # the CPU timer repeats a call for this long (at least 5 times, at most 50); --quick: 0.02


def timed(fn, device: str, host: bool = False) -> float:
    """Median seconds of one call of fn: on a GPU the kernels' time from `do_bench` (its L2 clearing
    hides the host's launch cost), or with `host` the wall time of a call and a synchronize, dispatch
    from Python included."""
    if device == "cuda" and not host:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3
    run = (lambda: (fn(), torch.cuda.synchronize())) if device == "cuda" else fn
    run()
    times, start = [], time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < CPU_TIMING_S and len(times) < 50):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def graphed(fn):
    """fn's GPU work captured once in a CUDA graph: replaying it times the kernels without Python's
    dispatch in between, as a graphed model runs them."""
    fn()  # tunes and compiles first (neither may happen while capturing)
    return capture_graph(fn).replay


def ceilings(device: str, dtype: torch.dtype) -> dict:
    """Copy bandwidth (TB/s, read + write), `dtype` and int8 matmul rates (TFLOP/s, TOP/s) of this device."""
    n = 8192 if device == "cuda" else 2048
    nbytes = (1 << 30) if device == "cuda" else (1 << 28)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_float = timed(lambda: torch.mm(a, b), device)
    qa = torch.randint(-127, 128, (n, n), device=device, dtype=torch.int8)
    qb = torch.randint(-127, 128, (n, n), device=device, dtype=torch.int8)
    t_int8 = timed(lambda: torch._int_mm(qa, qb), device)
    float_rate, int_mm_rate = 2 * n ** 3 / t_float / 1e12, 2 * n ** 3 / t_int8 / 1e12
    int8_rate = int_mm_rate
    if device == "cuda" and dtype in (torch.bfloat16, torch.float16):
        # sm_80/sm_90 tensor cores multiply int8 at twice their 16-bit rate; torch._int_mm is no ceiling
        # there (123 TOP/s on an H200 under torch 2.11, below bitvit's own int8 kernels)
        int8_rate = max(int_mm_rate, 2 * float_rate)
    return {"copy_TBps": 2 * nbytes / t_copy / 1e12, "float_TFLOPs": float_rate, "int8_TOPs": int8_rate,
            "int8_TOPs_int_mm": int_mm_rate, "matmul_n": n, "copy_bytes": nbytes}


# ----------------------------------------------------------------------------- per-op

def layer_shapes(cfg: ViTConfig) -> dict[str, tuple[int, int]]:
    """(N, K) of a block's linear layers."""
    d, h = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    return {"qkv": (3 * d, d), "proj": (d, d), "fc1": (h, d), "fc2": (d, h)}


def random_codes(n: int, k: int, high: int, device: str) -> torch.Tensor:
    return torch.randint(0, high, (n, k), dtype=torch.uint8, device=device)


def op_call(op: str, n: int, k: int, x: torch.Tensor, bias: torch.Tensor):
    """(fn, weight bytes, rate key, reference) for one op at weight shape (n, k) on activations x (M, k).
    reference(r), for the bitvit ops: the same op on the CPU (its CPU kernel, exact int32 sums for the int8
    ops) on copies of the first r rows and of the weights, to check the device's output against."""
    dev = x.device.type
    if op == "dense":
        w = torch.randn(n, k, device=dev, dtype=x.dtype) * 0.02
        return (lambda: F.linear(x, w, bias)), w.numel() * w.element_size(), "float", None
    if op == "int_mm":  # cuBLASLt's int8 GEMM alone (no quantization, no scaling): the int8 reference
        q = torch.randint(-127, 128, x.shape, dtype=torch.int8, device=dev)
        w = torch.randint(-127, 128, (k, n), dtype=torch.int8, device=dev)
        return (lambda: torch._int_mm(q, w)), n * k, "int8", None
    if op == "w4":  # the w4 recipe's layout: int4 codes, asymmetric, groups of 64
        g = min(64, k)
        packed = pack_codes(random_codes(n, k, 16, "cpu"), 4).to(dev)
        scales = torch.rand(n, -(-k // g), device=dev) * 0.01
        zeros = torch.randint(0, 16, scales.shape, device=dev).float()
        call = lambda x, packed, scales, zeros, bias: weight_only_linear(  # noqa: E731
            x, packed, scales, zeros, None, bias, 4, g, k)
        tensors = (packed, scales, zeros, bias)
        return ((lambda: call(x, *tensors)), packed.numel() + 8 * scales.numel(), "float",
                lambda r: call(x[:r].cpu(), *(t.cpu() for t in tensors)))
    fmt, bits = {"w8a8": ("int8", 8), "w4a8": ("int4", 4), "w1.58a8": ("ternary", 2),
                 "w1.58a8-b3": ("ternary_b3", 2), "w1a8": ("binary", 1)}[op]
    codes = random_codes(n, k, 3 if fmt.startswith("ternary") else 1 << bits, "cpu")
    packed = (pack_trit_planes(codes) if fmt == "ternary_b3" else pack_codes(codes, bits)).to(dev)
    scales = torch.rand(n, 1, device=dev) * 0.01
    return ((lambda: A8_OPS[fmt](x, packed, scales, bias, k)), packed.numel() + 4 * n, "int8",
            lambda r: A8_OPS[fmt](x[:r].cpu(), packed.cpu(), scales.cpu(), bias.cpu(), k))


CHECK_ROWS, CHECK_TOL = 64, 1e-2  # rows checked against the CPU kernel; relative error tolerated (bf16 output)
E2E_TOL = 0.15  # a model's logits against its CPU float32 run: bf16 through ViT-B and its int8 activation
                # codes move them 1-4 % (measured on the CPU kernels); a broken kernel, by ~100 %


def rel_err_vs_cpu(fn, reference, m: int) -> float:
    """Relative (Frobenius) error of the op's first rows against its CPU kernel's output."""
    r = min(m, CHECK_ROWS)
    got, want = fn()[:r].float().cpu(), reference(r).float()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def bench_ops(models, batches, ops, device, dtype, ceil, deadline, progress, skipped: list,
              saved=lambda rows: None) -> list[dict]:
    """Per-op rows; `saved(rows)` after each shape, so a run killed later keeps what it measured. Without
    ceilings (`ceil` None) a row has no bound nor roofline fraction."""
    rows = []
    jobs = [(m, layer, nk, b) for m in models for layer, nk in layer_shapes(SHAPES[m]).items() for b in batches]
    jobs.sort(key=lambda job: job[3] not in TARGET_BATCHES)  # so that a time limit cuts the other batches first
    for model, layer, (n, k), batch in progress(jobs, desc="ops"):
        m = batch * (SHAPES[model].num_patches + 1)
        if time.monotonic() > deadline:
            skipped.append(f"ops {model} {layer} M={m}")
            continue
        x = torch.randn(m, k, device=device, dtype=dtype)
        bias = torch.randn(n, device=device, dtype=dtype)
        base = None
        for op in ops:
            if op == "int_mm" and (device != "cuda" or m <= 16 or n % 8 or k % 8):
                continue
            try:  # one op failing on a device (a tiling, graph capture) must not end the run: the rest is measured
                fn, w_bytes, rate, reference = op_call(op, n, k, x, bias)
                t_eager = timed(fn, device, host=True)  # called from Python, one op at a time (tunes it first)
                err = rel_err_vs_cpu(fn, reference, m) if reference is not None else None
                if device == "cuda":
                    replay = graphed(fn)
                    t = timed(replay, device)
                    with torch.cuda.nvtx.range(f"profile {op} {model} {layer} M={m}"):  # one replay, for a profiler
                        replay()
                else:
                    t = t_eager
            except Exception as e:
                print(f"WARNING: {op} {model} {layer} M={m} failed: {type(e).__name__}: {e}", file=sys.stderr)
                skipped.append(f"ops {model} {layer} M={m} {op}: failed ({type(e).__name__}: {str(e)[:200]})")
                continue
            if err is not None and not err <= CHECK_TOL:
                print(f"WARNING: {op} {model} {layer} M={m}: output off its CPU kernel's by {err:.1e} "
                      f"(relative; tolerated {CHECK_TOL:g}): this row times a wrong result", file=sys.stderr)
            base = t if op == "dense" else base
            nbytes = (x.numel() * x.element_size() + w_bytes + m * n * x.element_size()
                      if op != "int_mm" else m * k + w_bytes + 4 * m * n)
            flops = 2 * m * n * k
            bound = frac = None
            if ceil is not None:
                peak = ceil["int8_TOPs" if rate == "int8" else "float_TFLOPs"] * 1e12
                t_mem, t_ops = nbytes / (ceil["copy_TBps"] * 1e12), flops / peak
                bound, frac = "memory" if t_mem > t_ops else "compute", max(t_mem, t_ops) / t
            rows.append({"model": model, "layer": layer, "N": n, "K": k, "batch": batch, "M": m, "op": op,
                         "ms": t * 1e3, "eager_ms": t_eager * 1e3, "speedup_vs_dense": base / t if base else None,
                         "rel_err_vs_cpu": err,
                         "bytes": nbytes,
                         "TBps": nbytes / t / 1e12, "TOPS": flops / t / 1e12,
                         "bound": bound, "roofline_frac": frac})
            del fn
        saved(rows)
    if skipped:
        print(f"skipped {len(skipped)} measurements of {len(jobs)} op shapes (time limit or failure: "
              f"'skipped' in the results)", file=sys.stderr)
    return rows


# ----------------------------------------------------------------------------- end to end

def build(model_name: str, variant: str) -> nn.Module:
    """A random-weight ViT in one of VARIANTS, its quantized layers on the bitvit kernels (CPU, fp32)."""
    import quant
    from quant.bitlinear import freeze
    torch.manual_seed(0)
    model = VisionTransformer(SHAPES[model_name]).eval()
    if variant == "fp":
        return model
    model = quant.quantize(model, "w1.58a8" if variant in TERNARY else variant)
    if variant in (*TERNARY, "w1a8"):  # QAT recipes: the training-time BitLinear layers, frozen as trained
        model = freeze(model)
    return to_kernels(model, ternary_layout="base3" if variant == "w1.58a8-b3" else "2bit").eval()


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """Bytes of all persistent parameters and buffers, and of the linear layers' weights alone."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    linear = 0
    for m in model.modules():
        if isinstance(m, KernelLinear):
            linear += sum(t.numel() * t.element_size() for t in (m.packed, m.scales, m.zeros) if t is not None)
        elif isinstance(m, nn.Linear):
            linear += m.weight.numel() * m.weight.element_size()
    return total, linear


def bench_models(models, batches, variants, device, dtype, deadline, progress, skipped: list,
                 saved=lambda rows: None) -> list[dict]:
    """End-to-end rows (variants: "fp" first, the baseline); `saved(rows)` after each variant."""
    rows = []
    for name in models:
        cfg = SHAPES[name]
        base, fp_bytes = {}, None  # the fp variant's time per batch, (all, linear) weight bytes
        for variant in variants:
            if time.monotonic() > deadline:
                print(f"time limit: skipped {name} {variant}", file=sys.stderr)
                skipped.append(f"model {name} {variant}")
                continue
            try:  # a variant failing on a device must not end the run
                model = build(name, variant)  # on the CPU, float32: its logits for one image are the reference
                x1 = torch.randn(1, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
                with torch.no_grad():
                    ref = model(x1)
                    model = model.to(device=device, dtype=dtype)
                    out = model(x1.to(device, dtype)).float().cpu()
                err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
            except Exception as e:
                print(f"WARNING: {name} {variant} failed: {type(e).__name__}: {e}", file=sys.stderr)
                skipped.append(f"model {name} {variant}: failed ({type(e).__name__}: {str(e)[:200]})")
                continue
            if not err <= E2E_TOL:
                print(f"WARNING: {name} {variant}: logits off the CPU float32 model's by {err:.1e} (relative; "
                      f"tolerated {E2E_TOL:g}): its rows time a wrong model", file=sys.stderr)
            total, linear = weight_bytes(model)
            if variant == "fp":
                fp_bytes = total, linear
            for batch in progress(batches, desc=f"{name} {variant}", leave=False):
                x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device, dtype=dtype)
                try:
                    if device == "cuda":
                        replay = CUDAGraphModel(model, x)
                        t = timed(lambda: replay(x), device)  # L2 cleared before each replay
                        t_warm = timed(lambda: replay(x), device, host=True)  # back to back, as frames stream
                        del replay
                    else:
                        with torch.no_grad():
                            t = t_warm = timed(lambda: model(x), device)  # a CPU run is timed back to back
                except Exception as e:
                    print(f"WARNING: {name} {variant} batch {batch} failed: {type(e).__name__}: {e}", file=sys.stderr)
                    skipped.append(f"model {name} {variant} batch {batch}: failed ({type(e).__name__}: "
                                   f"{str(e)[:200]})")
                    continue
                if variant == "fp":
                    base[batch] = t
                rows.append({"model": name, "variant": variant, "dtype": str(dtype).replace("torch.", ""),
                             "batch": batch, "ms": t * 1e3, "ms_back_to_back": t_warm * 1e3, "images_per_s": batch / t,
                             "speedup_vs_fp": base[batch] / t if batch in base else None, "weight_MB": total / 1e6,
                             "logits_rel_err_vs_cpu_fp32": err,
                             "linear_weight_MB": linear / 1e6, "cuda_graph": device == "cuda",
                             # weight memory relative to the FP model of the same dtype
                             "memory_ratio_vs_fp": fp_bytes[0] / total if fp_bytes else None,
                             "linear_memory_ratio_vs_fp": fp_bytes[1] / linear if fp_bytes else None})
            model = None  # freed before the next variant is built (a `del` here reads as undefined to pyflakes)
            if device == "cuda":
                torch.cuda.empty_cache()
            saved(rows)
    return rows


# ----------------------------------------------------------------------------- targets

def check_targets(ops: list[dict], models: list[dict], base: str = "bf16") -> list[dict]:
    """The issue's H100 targets (against bf16; `base` names this run's baseline dtype), each with the
    measured value and met / missed."""
    out = []

    def add(what, value, goal, higher_better=True):
        if value is None:
            return
        met = value >= goal if higher_better else value <= goal
        out.append({"target": what, "measured": value, "goal": goal, "met": met})

    big = ("vit_base_patch16_224", "vit_large_patch16_224")
    for op in (*TERNARY, "w1a8"):
        # rows measured without the dense baseline (--ops without "dense") have no speed-up to compare
        speedups = [r for r in ops if r["op"] == op and r["model"] in big and r["speedup_vs_dense"] is not None]
        small_m = [r["speedup_vs_dense"] for r in speedups if r["M"] <= 256]
        add(f"{op} >= 1.5x {base} on ViT-B/L shapes at M <= 256 (worst layer)", min(small_m, default=None), 1.5)
        at_12608 = [r["speedup_vs_dense"] for r in speedups if r["M"] == 12608]
        add(f"{op} no slower than {base} at M = 12608 (worst layer)", min(at_12608, default=None), 1.0)
        mem = [r["roofline_frac"] for r in ops if r["op"] == op and r["model"] in big and r["bound"] == "memory"]
        add(f"{op} >= 70% of the memory bound where memory-bound (worst)", min(mem, default=None), 0.7)
    for name in sorted({r["model"] for r in models}):
        get = {(r["variant"], r["batch"]): r for r in models if r["model"] == name}
        for t in TERNARY:
            if (t, 1) in get and ("fp", 1) in get:
                add(f"{name}: {t} batch-1 latency / {base}", get[(t, 1)]["ms"] / get[("fp", 1)]["ms"],
                    1.0, higher_better=False)
                if get[(t, 1)]["cuda_graph"]:  # the same, replays back to back: a low-bit model's weights stay in L2
                    add(f"{name}: {t} batch-1 latency / {base}, back to back", get[(t, 1)]["ms_back_to_back"]
                        / get[("fp", 1)]["ms_back_to_back"], 1.0, higher_better=False)
                add(f"{name}: weight memory {base} / {t} (whole model)", get[(t, 1)]["memory_ratio_vs_fp"], 8.0)
                add(f"{name}: weight memory {base} / {t} (linear weights)", get[(t, 1)]["linear_memory_ratio_vs_fp"],
                    8.0)
            if (t, 256) in get and ("fp", 256) in get:
                add(f"{name}: {t} images/s at batch 256 / {base}", get[(t, 256)]["speedup_vs_fp"], 1.3)
    return out


# ----------------------------------------------------------------------------- printing

def printed_units(device: str) -> tuple[float, str]:
    """The factor and prefix rates (kept in T: TB/s, TOPS) are printed with: a CPU's in G, as in T they round
    to 0.00."""
    return (1, "T") if device == "cuda" else (1e3, "G")


def print_ops(rows: list[dict], device: str) -> None:
    if not rows:  # --models "": no per-op part
        return
    scale, p = printed_units(device)
    print(f"\n{'model':<24}{'layer':<6}{'N x K':>12}{'M':>7}  {'op':<11}{'us':>9}{'eager':>9}{'x dense':>8}"
          f"{p + 'B/s':>7}{p + 'OPS':>8}  bound    roofline")
    for r in rows:
        sp = f"{r['speedup_vs_dense']:.2f}" if r["speedup_vs_dense"] else "-"
        frac = f"{100 * r['roofline_frac']:>5.0f}%" if r["roofline_frac"] is not None else f"{'-':>5}"
        print(f"{r['model']:<24}{r['layer']:<6}{r['N']:>6}x{r['K']:<5}{r['M']:>7}  {r['op']:<11}"
              f"{r['ms'] * 1e3:>9.1f}{r['eager_ms'] * 1e3:>9.1f}{sp:>8}"
              f"{r['TBps'] * scale:>7.2f}{r['TOPS'] * scale:>8.1f}  "
              f"{r['bound'] or '-':<8} {frac}")


def print_models(rows: list[dict]) -> None:
    if not rows:  # --e2e-models "": no end-to-end part
        return
    print(f"\n{'model':<24}{'variant':<11}{'batch':>6}{'ms':>10}{'b2b ms':>10}{'img/s':>10}{'x fp':>7}"
          f"{'weights MB':>12}{'fp/this':>9}{'linear fp/this':>16}")
    for r in rows:
        f = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        print(f"{r['model']:<24}{r['variant']:<11}{r['batch']:>6}{r['ms']:>10.3f}{r['ms_back_to_back']:>10.3f}"
              f"{r['images_per_s']:>10.0f}"
              f"{f(r['speedup_vs_fp']):>7}{r['weight_MB']:>12.2f}{f(r['memory_ratio_vs_fp']):>9}"
              f"{f(r['linear_memory_ratio_vs_fp']):>16}")


def print_targets(rows: list[dict], device: str) -> None:
    print("\ntargets (cuda_ops/README.md)"
          + ("" if device == "cuda" else " (set for the H100 in bf16; here informational)"))
    for r in rows:
        verdict = "met" if r["met"] else f"MISSED (goal {r['goal']})"
        print(f"  {r['target']:<72} {r['measured']:>7.2f}  {verdict}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Speed-up over the baseline against M, one panel per model (geometric mean over its 4 layers), under `title`
    (the device and the baseline). Speed-ups and the Ms measured are written as numbers ("0.5", "197"), not as
    powers of ten."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation, NullFormatter

    class Plain(LogFormatterSciNotation):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.6), squeeze=False)
    for ax, name in zip(axes[0], models):
        for op in dict.fromkeys(r["op"] for r in rows if r["op"] != "dense"):
            pts = {}
            for r in rows:
                if r["model"] == name and r["op"] == op and r["speedup_vs_dense"]:
                    pts.setdefault(r["M"], []).append(math.log(r["speedup_vs_dense"]))
            ms = sorted(pts)
            ax.plot(ms, [math.exp(sum(pts[m]) / len(pts[m])) for m in ms], marker="o", label=op)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(xscale="log", yscale="log", title=name, xlabel="M = batch x tokens", ylabel="speed-up over dense")
        ax.set_xticks(sorted({r["M"] for r in rows if r["model"] == name}))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(Plain())  # the ticks matplotlib labels, as "0.4", not "4 x 10^-1"
        ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False))
        ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * 72 / 6)), fontsize=10)  # ~6 pt a character at 10 pt
    fig.tight_layout()
    write_png(path, fig, dpi=120)


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cuda_ops.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to time (default: cuda when available)")
    p.add_argument("--models", help="comma-separated configs for the per-op part (default: per device)")
    p.add_argument("--e2e-models", help="comma-separated configs for the end-to-end part ('' to skip it)")
    p.add_argument("--batches", help="comma-separated batch sizes (default: 1,8,64,256 on a GPU, 1,8 on a CPU)")
    p.add_argument("--ops", help=f"comma-separated ops among {','.join(OPS)} (default: all; int_mm on a GPU only)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"end-to-end variants among {','.join(VARIANTS)}")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="baseline and activation dtype (default: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--quick", action="store_true", help="shorter CPU timings and, on a CPU, no ceilings (smoke tests)")
    p.add_argument("--time-limit", default=math.inf,  # "inf", the default, too: no limit; 0 would measure nothing
                   type=lambda text: (math.inf if text.strip().lower() in ("inf", "infinity")
                                      else number_in(0, lo_open=True)(text)),
                   help="seconds: stop adding rows after this long, the per-op part after 60%% of it so the "
                        "end-to-end part gets its share (the JSON lists what was skipped; default: inf, no limit)")
    p.add_argument("--out", type=Path, help="write the results JSON here")
    p.add_argument("--plot", type=Path, help="write a speed-up plot (PNG) here")
    args = p.parse_args(argv)
    if args.out:
        output_file(args.out, ".json")
    if args.plot:
        output_file(args.plot, ".png")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here (use --device cpu)")
    split = lambda s: list(dict.fromkeys(v for v in s.split(",") if v))  # noqa: E731  (duplicates once)
    op_models, e2e_models, batches = DEFAULTS[args.device]
    op_models = split(args.models) if args.models is not None else op_models
    e2e_models = split(args.e2e_models) if args.e2e_models is not None else e2e_models
    if args.batches is not None:
        try:
            batches = list(dict.fromkeys(positive_int(b) for b in split(args.batches)))  # "1, 1" or "8,08": once
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"--batches: {e}") from None
    ops = split(args.ops) if args.ops is not None else [o for o in OPS if args.device == "cuda" or o != "int_mm"]
    variants = split(args.variants)
    if max(batches, default=0) > MAX_BATCH:
        raise ValueError(f"--batches: at most {MAX_BATCH} images a batch (the targets' largest is 256), "
                         f"got {max(batches)}")
    for flag, names in (("--batches", batches), ("--ops", ops), ("--variants", variants)):
        if not names:
            raise ValueError(f"{flag} names nothing to measure")
    if not op_models and not e2e_models:
        raise ValueError("--models and --e2e-models name no model: nothing to measure")
    for name in op_models + e2e_models:
        if name not in SHAPES:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(SHAPES)}")
    for op in ops:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    if args.device == "cpu" and "int_mm" in ops:
        raise ValueError("--ops int_mm times cuBLASLt's int8 GEMM, which runs on --device cuda only")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    if args.plot and not op_models:
        raise ValueError("--plot draws the per-op part, which --models '' skips: name models there, or leave --plot out")
    if args.plot and "dense" not in ops:  # (found only after the per-op part, it ended the run there)
        raise ValueError("--plot draws each op's speed-up over dense: add dense to --ops, or leave --plot out")
    if "dense" in ops:
        ops = ["dense"] + [o for o in ops if o != "dense"]
    if "fp" in variants:
        variants = ["fp"] + [v for v in variants if v != "fp"]
    if args.quick:
        global CPU_TIMING_S
        CPU_TIMING_S = 0.02
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if args.device == "cuda" else torch.float32
    dtype_name = str(dtype).replace("torch.", "")
    from tqdm import tqdm
    start = time.monotonic()
    deadline = start + args.time_limit
    ops_deadline = start + (0.6 if e2e_models else 1.0) * args.time_limit
    progress = lambda it, **kw: tqdm(it, file=sys.stderr, **kw)  # noqa: E731
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or "cpu")
    result = {**provenance("cuda_ops.bench", argv), "device": device_name,
              "cpu_threads": torch.get_num_threads(), "dtype": dtype_name,
              "data": "random weights and inputs (no data split: speed does not depend on the values)",
              "baseline": f"dense = F.linear in {dtype_name}" + (" (cuBLAS)" if args.device == "cuda" else ""),
              "load_average_1_5_15min": load_average(), "skipped": [],
              "complete": False}  # until the last save: a run killed midway leaves a partial file
    if args.device == "cuda":
        import triton
        result["triton"] = triton.__version__

    def save(**parts):
        result.update(parts)
        result["wall_s"] = time.monotonic() - start
        result["load_average_at_end"] = load_average()  # CPU timings are noise on a busy machine
        if args.out:
            write_json(args.out, result)  # whole or not at all, should a timeout kill the run here

    ceil = result["ceilings"] = None if args.quick and args.device == "cpu" else ceilings(args.device, dtype)
    if ceil is None:
        print(f"{device_name}: no ceilings measured (--quick on a CPU), so no roofline")
    else:
        k, p = printed_units(args.device)
        print(f"{device_name}: copy {ceil['copy_TBps'] * k:.2f} {p}B/s, {dtype_name} matmul "
              f"{ceil['float_TFLOPs'] * k:.1f} {p}FLOP/s, int8 matmul {ceil['int8_TOPs'] * k:.1f} {p}OP/s "
              f"(torch._int_mm {ceil['int8_TOPs_int_mm'] * k:.1f})")
    save()
    result["ops"] = bench_ops(op_models, batches, ops, args.device, dtype, ceil, ops_deadline, progress,
                              result["skipped"], saved=lambda rows: save(ops=rows))
    print_ops(result["ops"], args.device)
    if args.plot and result["ops"]:  # drawn now: the plot shows the per-op part, which a later timeout keeps
        plot(result["ops"], args.plot, f"{device_name}: each op's speed-up over {result['baseline']}, "
                                       f"geometric mean over the layers")
    elif args.plot:  # every op shape skipped (time limit) or failed
        print(f"WARNING: no op was measured, so no plot was written to {args.plot}", file=sys.stderr)
    result["models"] = bench_models(e2e_models, batches, variants, args.device, dtype, deadline, progress,
                                    result["skipped"], saved=lambda rows: save(models=rows))
    if args.device == "cuda":
        from cuda_ops.triton_kernels import TUNER
        result["tuned"] = TUNER.report()
    result["targets"] = check_targets(result["ops"], result["models"], dtype_name)
    save(complete=True)
    print_models(result["models"])
    print_targets(result["targets"], args.device)
    print(f"\nwall time {result['wall_s']:.0f} s" + (f"; results in {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
