"""Triton kernels behind the bitvit ops, and the launchers that pick their tile shapes.

The kernels:
- `quantize_rows`: per-token int8 quantization in one pass (each row is read once, held in registers
  when K <= 8192, and written as int8 plus one fp32 scale): s = max|x| / 127, q = clamp(rne(x / s)),
  optionally of LayerNorm(x) (BitNet's input norm), fused so the normalized rows never reach memory.
- `a8_gemm`: y = s_x * s_w * (q_x @ W^T) (+ bias) for packed 1-, 2-, 4- or 8-bit integer weights, or base-3
  ternary trit planes, and int8 activations, int32 accumulation with `tl.dot` on int8 tiles. With `fuse=True` the activation
  quantization runs inside the GEMM (a row-absmax pre-pass over the program's rows, then quantizing
  each tile in registers), which saves the int8 round trip and a launch; otherwise `quantize_rows`
  runs first. The tuner times both.
  A tuning candidate may instead decode the layer's codes once into int8 (`_decode_weights_kernel`, a
  transient (N, K) scratch) and run the GEMM on int8 weights: the decode is then done once per call
  rather than once per row block and K step. For M <= 256, candidates of `_a8_gemm_swap_kernel` compute
  y^T = W q^T instead: the decoded weight tile becomes wgmma's first operand, which it reads from
  registers (the second operand always comes from shared memory, so unswapped, every decoded tile is
  stored there first), and the rows of x become wgmma's N dimension, 16 wide at the narrowest (unswapped,
  16- and 32-row tiles compile to mma.sync).
- `weight_only_gemm`: weight-only 2-, 4- or 8-bit group-quantized weights (symmetric, asymmetric, or a
  code book such as NF4) against bf16/fp16 (or fp32) activations, fp32 accumulation; for M <= 256 also
  swapped (`_weight_only_gemm_swap_kernel`, the dequantized tile wgmma's register operand).

Packed weights arrive in `quant/pack.py`'s layout: (N, KB) uint8, KB = ceil(K * bits / 8), row n holds
output channel n's K codes, code k in byte k // per_byte at bit (k % per_byte) * bits
(per_byte = 8 // bits). A program loads a (BLOCK_KP, BLOCK_N) tile of packed bytes (contiguous along
K), shifts out the per_byte code planes in registers and interleaves them back into K order (join,
permute, reshape) as a (BLOCK_K, BLOCK_N) int8 tile, which meets the plainly loaded (BLOCK_M, BLOCK_K)
activation tile in one `tl.dot` -- so weights are never expanded in global memory, every load is
contiguous, and the activation loads stay direct dot operands that Triton pipelines (async copies).
`python -m cuda_ops.compile_check` compiles every tiling for sm_90 without a GPU and reports registers,
spills, shared memory, pipelining and the MMA instructions (wgmma int8 for BLOCK_M >= 64).

Ternary weights can also arrive as trit planes (`quant.pack.pack_trit_planes`: KC bytes a row, byte j
holding the codes of k = j + c * KC, c = 0..4, in fixed point). A program then steps over BLOCK_KP bytes
at a time; each of the five planes decodes with a multiply, a mask and a shift into a (BLOCK_KP, BLOCK_N)
int8 tile and meets its own contiguous activation tile (columns c * KC + j0 + [0, BLOCK_KP)) in one
`tl.dot`: 1.6 bits a weight read from memory instead of 2, for a little more integer work per byte (the
swapped kernel likewise, on (BLOCK_N, BLOCK_KP) tiles).

Tile shapes come from a small per-shape tuner (first call per (kernel, M bucket, N, K, ...) times the
candidates' CUDA-graph replays with `triton.testing.do_bench`; set BITVIT_TUNE=0 to use the first candidate, the default
while a CUDA graph is being captured and under TRITON_INTERPRET=1; BITVIT_TUNE=compile launches every
candidate once per key, untimed, and uses the first: it fills Triton's compile cache for a later tuning run).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _round_half_even(v):
    """Round fp32 to the nearest integer, ties to even (torch.round), exactly; |v| < 2**22."""
    f = tl.floor(v)
    d = v - f  # exact
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _quantize_tile(x, div):
    """fp32 tile / per-row divisor (nonzero) -> int8 codes in [-127, 127]; a NaN value's code is 0 (its row's
    scale is NaN), as on the CPU."""
    v = _round_half_even(tl.math.div_rn(x, div))
    return tl.where(v != v, 0.0, tl.minimum(tl.maximum(v, -127.0), 127.0)).to(tl.int8)


@triton.jit
def _row_absmax(x):
    """max |x| of each row of an fp32 tile, NaN where the row holds a NaN (as torch's amax) or an infinity.
    tl.max drops NaN, which would give such a row a finite scale and finite garbage out instead of NaN, so
    a sum of the row's NaNs (0 without any) is added; an infinite max would make its own code inf / inf,
    NaN, clamped to -127, so it becomes NaN too: the row's scale is NaN and so are its outputs."""
    a = tl.max(tl.abs(x), axis=1) + tl.sum(tl.where(x != x, x, 0.0), axis=1)
    return tl.where(a == float("inf"), float("nan"), a)


@triton.jit
def _layer_norm_rows(x, offs_k, K, eps, lw_ptr, lb_ptr, LN_W: tl.constexpr, LN_B: tl.constexpr):
    """LayerNorm of fp32 rows x (BLOCK_M, BLOCK_K) held whole in registers (columns >= K are zero and stay 0)."""
    k_ok = (offs_k < K)[None, :]
    mean = tl.sum(x, axis=1) / K
    d = tl.where(k_ok, x - mean[:, None], 0.0)
    y = d * tl.rsqrt(tl.sum(d * d, axis=1) / K + eps)[:, None]
    if LN_W:
        y = y * tl.load(lw_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)[None, :]
    if LN_B:
        y = y + tl.load(lb_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n), GROUP_M row blocks at a time so weight tiles are reused from L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


@triton.jit
def _unpack_codes(p, BITS: tl.constexpr, BLOCK_KP: tl.constexpr, BLOCK_N: tl.constexpr):
    """Packed bytes p (BLOCK_KP, BLOCK_N) -> uint8 codes (BLOCK_KP * 8 // BITS, BLOCK_N) in K order:
    row per_byte * kp + j is code plane j of byte kp. The planes are shifted out in registers and
    interleaved along K with join + permute + reshape, so the tile feeds a single tl.dot."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if BITS == 8:
        return p
    elif BITS == 4:
        t = tl.join(p & MASK, p >> 4)  # [kp, n, j]
        return tl.reshape(tl.permute(t, (0, 2, 1)), (BLOCK_KP * 2, BLOCK_N))
    elif BITS == 2:
        e = tl.join(p & MASK, (p >> 4) & MASK)  # planes 0, 2
        o = tl.join((p >> 2) & MASK, p >> 6)  # planes 1, 3
        t = tl.join(e, o)  # [kp, n, a, b]: plane 2a + b
        return tl.reshape(tl.permute(t, (0, 2, 3, 1)), (BLOCK_KP * 4, BLOCK_N))
    else:
        tl.static_assert(BITS == 1)
        e = tl.join(tl.join(p & 1, (p >> 4) & 1), tl.join((p >> 2) & 1, (p >> 6) & 1))  # planes 0,4 / 2,6
        o = tl.join(tl.join((p >> 1) & 1, (p >> 5) & 1), tl.join((p >> 3) & 1, p >> 7))  # planes 1,5 / 3,7
        t = tl.join(e, o)  # [kp, n, a, b, c]: plane 4a + 2b + c
        return tl.reshape(tl.permute(t, (0, 2, 3, 4, 1)), (BLOCK_KP * 8, BLOCK_N))


@triton.jit
def _unpack_rows(p, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr):
    """Packed bytes p (BLOCK_N, BLOCK_KP) in the rows' own layout -> uint8 codes (BLOCK_N, BLOCK_KP * 8 // BITS)
    in K order. The code planes joined along new trailing axes are already in K order (code per_byte * kp + j
    is plane j of byte kp), so a reshape interleaves them, with no permute (the swapped kernels' operand)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if BITS == 8:
        c = p
    elif BITS == 4:
        c = tl.reshape(tl.join(p & MASK, p >> 4), (BLOCK_N, BLOCK_KP * 2))
    elif BITS == 2:
        t = tl.join(tl.join(p & MASK, (p >> 4) & MASK), tl.join((p >> 2) & MASK, p >> 6))  # [n, kp, a, b]: 2a + b
        c = tl.reshape(t, (BLOCK_N, BLOCK_KP * 4))
    else:
        tl.static_assert(BITS == 1)
        e = tl.join(tl.join(p & 1, (p >> 4) & 1), tl.join((p >> 2) & 1, (p >> 6) & 1))
        o = tl.join(tl.join((p >> 1) & 1, (p >> 5) & 1), tl.join((p >> 3) & 1, p >> 7))
        t = tl.join(e, o)  # [n, kp, a, b, c]: plane 4a + 2b + c
        c = tl.reshape(t, (BLOCK_N, BLOCK_KP * 8))
    return c


@triton.jit
def _int_weights(c, BITS: tl.constexpr, MUL: tl.constexpr, OFF: tl.constexpr):
    """int8 weight values, code * MUL - OFF, of a tile of uint8 codes (`_unpack_codes` or `_unpack_rows`;
    8-bit codes go through int16, where code - 128 cannot wrap)."""
    if BITS == 8:
        w = (c.to(tl.int16) - OFF).to(tl.int8)
    else:
        w = c.to(tl.int8) * MUL - OFF
    return w


@triton.jit
def _trit_plane(p, C: tl.constexpr):
    """int8 weights {-1, 0, 1} of plane C of fixed-point base-3 bytes p: t = ((p * 3**C) mod 256) * 3 >> 8."""
    t = (((p.to(tl.int32) * (3 ** C)) & 255) * 3) >> 8
    return (t - 1).to(tl.int8)


@triton.jit
def _float_weights(c, BITS: tl.constexpr, lut_ptr, z, s, HAS_LUT: tl.constexpr, HAS_ZEROS: tl.constexpr,
                   DTYPE: tl.constexpr):
    """Dequantized weights in DTYPE of a tile of codes c: (lut[code] or code, minus zero or the symmetric
    offset 2**(BITS-1)) * s, with z and s this K tile's group's, shaped to broadcast along c's K axis."""
    if HAS_LUT:
        v = tl.load(lut_ptr + c)
    else:
        v = c.to(tl.float32)
    if HAS_ZEROS:
        v = v - z
    elif not HAS_LUT:
        v = v - (1 << (BITS - 1))
    return (v * s).to(DTYPE)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _quantize_rows_kernel(x_ptr, lw_ptr, lb_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, eps,
                          HAS_LN: tl.constexpr, LN_W: tl.constexpr, LN_B: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    q_rows = q_ptr + offs_m[:, None].to(tl.int64) * stride_qm
    if ONE_PASS:  # the whole row fits in registers: read x once
        mask = m_ok[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_rows + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_LN:  # the layer's input LayerNorm, fused: still one read of x
            x = _layer_norm_rows(x, offs_k, K, eps, lw_ptr, lb_ptr, LN_W, LN_B)
        s = tl.math.div_rn(_row_absmax(x), 127.0)
        q = _quantize_tile(x, tl.where(s > 0, s, 1.0)[:, None])
        tl.store(q_rows + offs_k[None, :], q, mask=mask)
    else:  # rows over 8192: two passes (the launcher applies a LayerNorm beforehand)
        amax = tl.zeros((BLOCK_M,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = m_ok[:, None] & (k0 + offs_k < K)[None, :]
            x = tl.load(x_rows + k0 + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, _row_absmax(x), propagate_nan=tl.PropagateNan.ALL)
        s = tl.math.div_rn(amax, 127.0)
        div = tl.where(s > 0, s, 1.0)[:, None]
        for k0 in range(0, K, BLOCK_K):
            mask = m_ok[:, None] & (k0 + offs_k < K)[None, :]
            x = tl.load(x_rows + k0 + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(q_rows + k0 + offs_k[None, :], _quantize_tile(x, div), mask=mask)
    tl.store(s_ptr + offs_m, s, mask=m_ok)


@triton.jit
def _decode_weights_kernel(w_ptr, d_ptr, N, K, KB, BITS: tl.constexpr, MUL: tl.constexpr, OFF: tl.constexpr,
                           TRITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed codes (N, KB) -> int8 weight values (N, K), code * MUL - OFF (trit planes: code k is plane
    k // KB of byte k % KB, value t - 1)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    rows = w_ptr + offs_n[:, None].to(tl.int64) * KB
    if TRITS:
        c = offs_k // KB
        p = tl.load(rows + (offs_k % KB)[None, :], mask=mask, other=0).to(tl.int32)
        pow3 = tl.where(c == 0, 1, tl.where(c == 1, 3, tl.where(c == 2, 9, tl.where(c == 3, 27, 81))))
        v = ((((p * pow3[None, :]) & 255) * 3) >> 8) - 1
    else:
        PER: tl.constexpr = 8 // BITS
        p = tl.load(rows + (offs_k // PER)[None, :], mask=mask, other=0).to(tl.int32)
        v = ((p >> ((offs_k % PER) * BITS)[None, :]) & ((1 << BITS) - 1)) * MUL - OFF
    tl.store(d_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], v.to(tl.int8), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _a8_gemm_kernel(x_ptr, q_ptr, sx_ptr, w_ptr, sw_ptr, b_ptr, y_ptr,
                    M, N, K, KB, stride_xm, stride_qm, stride_ym,
                    BITS: tl.constexpr, MUL: tl.constexpr, OFF: tl.constexpr, TRITS: tl.constexpr,
                    FUSE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr,
                    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr):
    """Program (tile, split): the split's share of the K tiles (of the KB bytes of trit planes when
    TRITS); with SPLIT_K > 1, y is a zeroed fp32 buffer that the splits add their scaled partial sums
    into (the first split adds the bias)."""
    PER: tl.constexpr = 4 if TRITS else 8 // BITS  # K tile: codes a pre-pass step reads (a power of 2)
    BLOCK_K: tl.constexpr = BLOCK_KP * PER
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kp = tl.arange(0, BLOCK_KP)
    m_ok = offs_m < M
    n_ok = offs_n < N
    w_rows = w_ptr + offs_n[None, :].to(tl.int64) * KB  # (1, BLOCK_N)
    if FUSE_QUANT:  # per-token scales of this program's rows, from a pre-pass over x
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
        amax = tl.zeros((BLOCK_M,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = m_ok[:, None] & (k0 + offs_k < K)[None, :]
            x = tl.load(x_rows + k0 + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, _row_absmax(x), propagate_nan=tl.PropagateNan.ALL)
        sx = tl.math.div_rn(amax, 127.0)
        div = tl.where(sx > 0, sx, 1.0)[:, None]
    else:
        q_rows = q_ptr + offs_m[:, None].to(tl.int64) * stride_qm
        sx = tl.load(sx_ptr + offs_m, mask=m_ok, other=0.0)
    STEP: tl.constexpr = BLOCK_KP if TRITS else BLOCK_K  # a main-loop step: bytes of planes, or codes
    K_LOOP = KB if TRITS else K
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K_LOOP
    else:
        per_split = tl.cdiv(tl.cdiv(K_LOOP, STEP), SPLIT_K) * STEP
        k_lo = tl.program_id(1) * per_split
        k_hi = tl.minimum(K_LOOP, k_lo + per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(k_lo, k_hi, STEP):
        if TRITS:  # bytes [k0, k0 + BLOCK_KP) of every plane: five dots of BLOCK_KP codes
            kp = k0 + offs_kp
            p = tl.load(w_rows + kp[:, None], mask=(kp < KB)[:, None] & n_ok[None, :], other=0)
            for c in tl.static_range(5):
                kc = c * KB + kp  # (BLOCK_KP,) input columns of plane c
                mask = m_ok[:, None] & ((kp < KB) & (kc < K))[None, :]
                if FUSE_QUANT:
                    x = tl.load(x_rows + kc[None, :], mask=mask, other=0.0).to(tl.float32)
                    a = _quantize_tile(x, div)
                else:
                    a = tl.load(q_rows + kc[None, :], mask=mask, other=0)
                acc = tl.dot(a, _trit_plane(p, c), acc, out_dtype=tl.int32)
        else:
            mask = m_ok[:, None] & (k0 + offs_k < K)[None, :]
            if FUSE_QUANT:
                x = tl.load(x_rows + k0 + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
                a = _quantize_tile(x, div)
            else:
                a = tl.load(q_rows + k0 + offs_k[None, :], mask=mask, other=0)
            kp = k0 // PER + offs_kp
            p = tl.load(w_rows + kp[:, None], mask=(kp < KB)[:, None] & n_ok[None, :], other=0)
            acc = tl.dot(a, _int_weights(_unpack_codes(p, BITS, BLOCK_KP, BLOCK_N), BITS, MUL, OFF), acc,
                         out_dtype=tl.int32)
    sw = tl.load(sw_ptr + offs_n, mask=n_ok, other=0.0)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        y += tl.where(tl.program_id(1) == 0, b, 0.0)[None, :]  # once, from the first split
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:
        tl.atomic_add(y_ptrs, y, mask=m_ok[:, None] & n_ok[None, :], sem="relaxed")


@triton.jit(do_not_specialize=["M"])
def _a8_gemm_swap_kernel(q_ptr, sx_ptr, w_ptr, sw_ptr, b_ptr, y_ptr, M, N, K, KB, stride_qm, stride_ym,
                         BITS: tl.constexpr, MUL: tl.constexpr, OFF: tl.constexpr, TRITS: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_KP: tl.constexpr, GROUP_N: tl.constexpr):
    """The A8 GEMM with its operands swapped, y^T = W q^T, for few rows: the decoded weight tile
    (BLOCK_N, BLOCK_K) is the dot's first operand, which wgmma can read from registers (the unswapped
    kernel's decoded tile is the second operand, which wgmma reads from shared memory), and the rows
    are the dot's N dimension, which may be as small as 16 (where the unswapped kernel's 16- and 32-row
    tiles fall back to mma.sync). Activations are quantized beforehand (q int8 (M, K), sx (M,)). With
    TRITS, each step reads BLOCK_KP bytes of trit planes and makes five dots, one per plane, as the
    unswapped kernel does."""
    PER: tl.constexpr = 8 // BITS
    BLOCK_K: tl.constexpr = BLOCK_KP * PER
    pid_n, pid_m = _tile_ids(N, M, BLOCK_N, BLOCK_M, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kp = tl.arange(0, BLOCK_KP)
    n_ok = offs_n < N
    m_ok = offs_m < M
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * KB  # (BLOCK_N, 1)
    q_cols = q_ptr + offs_m[None, :].to(tl.int64) * stride_qm  # (1, BLOCK_M): K-major, as int8 wgmma wants
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    STEP: tl.constexpr = BLOCK_KP if TRITS else BLOCK_K  # a step: bytes of trit planes, or codes
    for k0 in range(0, KB if TRITS else K, STEP):
        if TRITS:
            kp = k0 + offs_kp
            p = tl.load(w_rows + kp[None, :], mask=n_ok[:, None] & (kp < KB)[None, :], other=0)
            for c in tl.static_range(5):
                kc = c * KB + kp  # (BLOCK_KP,) input columns of plane c
                a = tl.load(q_cols + kc[:, None], mask=((kp < KB) & (kc < K))[:, None] & m_ok[None, :], other=0)
                acc = tl.dot(_trit_plane(p, c), a, acc, out_dtype=tl.int32)
        else:
            kp = k0 // PER + offs_kp
            p = tl.load(w_rows + kp[None, :], mask=n_ok[:, None] & (kp < KB)[None, :], other=0)
            a = tl.load(q_cols + (k0 + offs_k)[:, None], mask=(k0 + offs_k < K)[:, None] & m_ok[None, :], other=0)
            acc = tl.dot(_int_weights(_unpack_rows(p, BITS, BLOCK_N, BLOCK_KP), BITS, MUL, OFF), a, acc,
                         out_dtype=tl.int32)
    sw = tl.load(sw_ptr + offs_n, mask=n_ok, other=0.0)
    sx = tl.load(sx_ptr + offs_m, mask=m_ok, other=0.0)
    y = acc.to(tl.float32) * sw[:, None] * sx[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None], y.to(y_ptr.dtype.element_ty),
             mask=n_ok[:, None] & m_ok[None, :])


@triton.jit(do_not_specialize=["M"])
def _weight_only_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, b_ptr, y_ptr,
                             M, N, K, KB, G, group_size, stride_xm, stride_ym,
                             BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_LUT: tl.constexpr,
                             HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr, GROUP_M: tl.constexpr):
    PER: tl.constexpr = 8 // BITS
    BLOCK_K: tl.constexpr = BLOCK_KP * PER
    PRECISION: tl.constexpr = "ieee" if DOT_DTYPE == tl.float32 else "tf32"  # fp32 stays fp32
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kp = tl.arange(0, BLOCK_KP)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[None, :].to(tl.int64) * KB
    g_rows = offs_n.to(tl.int64) * G
    z = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # a K tile never straddles two groups (the launcher sees to it)
        x = tl.load(x_rows + k0 + offs_k[None, :], mask=m_ok[:, None] & (k0 + offs_k < K)[None, :], other=0.0)
        kp = k0 // PER + offs_kp
        p = tl.load(w_rows + kp[:, None], mask=(kp < KB)[:, None] & n_ok[None, :], other=0)
        g = k0 // group_size
        s = tl.load(s_ptr + g_rows + g, mask=n_ok, other=0.0)
        if HAS_ZEROS:
            z = tl.load(z_ptr + g_rows + g, mask=n_ok, other=0.0)
        w = _float_weights(_unpack_codes(p, BITS, BLOCK_KP, BLOCK_N), BITS, lut_ptr, z[None, :], s[None, :],
                           HAS_LUT, HAS_ZEROS, DOT_DTYPE)
        acc = tl.dot(x.to(DOT_DTYPE), w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["M"])
def _weight_only_gemm_swap_kernel(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, b_ptr, y_ptr,
                                  M, N, K, KB, G, group_size, stride_xm, stride_ym,
                                  BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_LUT: tl.constexpr,
                                  HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                                  BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr, GROUP_N: tl.constexpr):
    """The weight-only GEMM swapped, y^T = W x^T, for few rows (as `_a8_gemm_swap_kernel`): the
    dequantized weight tile (BLOCK_N, BLOCK_K) is the dot's first operand, in registers."""
    PER: tl.constexpr = 8 // BITS
    BLOCK_K: tl.constexpr = BLOCK_KP * PER
    PRECISION: tl.constexpr = "ieee" if DOT_DTYPE == tl.float32 else "tf32"
    pid_n, pid_m = _tile_ids(N, M, BLOCK_N, BLOCK_M, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kp = tl.arange(0, BLOCK_KP)
    n_ok = offs_n < N
    m_ok = offs_m < M
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * KB  # (BLOCK_N, 1)
    x_cols = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm  # (1, BLOCK_M)
    g_rows = offs_n.to(tl.int64) * G
    z = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # a K tile never straddles two groups (the launcher sees to it)
        x = tl.load(x_cols + (k0 + offs_k)[:, None], mask=(k0 + offs_k < K)[:, None] & m_ok[None, :], other=0.0)
        kp = k0 // PER + offs_kp
        p = tl.load(w_rows + kp[None, :], mask=n_ok[:, None] & (kp < KB)[None, :], other=0)
        g = k0 // group_size
        s = tl.load(s_ptr + g_rows + g, mask=n_ok, other=0.0)
        if HAS_ZEROS:
            z = tl.load(z_ptr + g_rows + g, mask=n_ok, other=0.0)
        w = _float_weights(_unpack_rows(p, BITS, BLOCK_N, BLOCK_KP), BITS, lut_ptr, z[:, None], s[:, None],
                           HAS_LUT, HAS_ZEROS, DOT_DTYPE)
        acc = tl.dot(w, x.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=n_ok[:, None] & m_ok[None, :])


# ----------------------------------------------------------------------------- tile configs and tuning

class Norm(NamedTuple):
    """A LayerNorm applied to the activations before they are quantized (weight and bias may be None)."""
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


@dataclass(frozen=True)
class Config:
    """One GEMM tiling: BLOCK_K codes of K per step (BLOCK_K * bits / 8 packed bytes per weight row)."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    fuse: bool = False  # a8 only: quantize activations inside the GEMM
    split_k: int = 1  # a8 only: programs per output tile, each summing a share of K (atomically, in fp32)
    predecode: bool = False  # a8 only: decode the layer's codes into an int8 (N, K) scratch, then a plain int8 GEMM
    swap: bool = False  # y^T = W x^T (the *_swap_kernel GEMMs): decoded weights in registers, for few rows


def _bucket(m: int) -> int:
    return 16 if m <= 16 else 1 << (m - 1).bit_length()


# (block_m, block_n, block_k, num_warps, num_stages): int8 dots over K tiles of 128 or 256 codes (32 or
# 64 bytes of ternary codes a row), bf16/fp16 dots over 64 or 128
_A8_TILES = [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 256, 4, 4), (32, 128, 128, 4, 4),
             (64, 64, 256, 4, 4), (64, 128, 128, 4, 4), (64, 256, 128, 8, 3), (128, 128, 128, 8, 3),
             (128, 256, 128, 8, 3), (128, 128, 256, 8, 3)]
_FLOAT_TILES = [(bm, bn, bk // 2, w, s) for bm, bn, bk, w, s in _A8_TILES]
# the swapped A8 GEMM's tilings (block_m: rows of x, wgmma's N; block_n: output channels, wgmma's M)
_SWAP_TILES = [(16, 64, 128, 4, 4), (16, 128, 256, 4, 3), (32, 128, 128, 4, 4), (64, 128, 128, 4, 3)]
_SWAP_FLOAT_TILES = [(bm, bn, bk // 2, w, s) for bm, bn, bk, w, s in _SWAP_TILES]
_INTERPRET_TILE = (16, 32, 64, 4, 1)  # small and quick under TRITON_INTERPRET=1


def _tiles(m: int, tiles: list[tuple]) -> list[tuple]:
    """GEMM tilings worth timing for M rows, the likeliest first."""
    if INTERPRET:
        return [_INTERPRET_TILE]
    b = _bucket(m)
    tiles = [t for t in tiles if min(b // 8, 64) <= t[0] <= b]
    return sorted(tiles, key=lambda t: abs(t[0] - min(b, 64)))


def a8_candidates(m: int) -> list[Config]:
    """Configs for the A8 GEMM at M rows (the first is the untuned default)."""
    tiles = _tiles(m, _A8_TILES)
    out = [Config(*t) for t in tiles]
    if m <= 1024:  # fused quantization repeats the row scan per column block: only for few rows
        # and only tiles whose fp32 activation tile and accumulator fit in registers (sm_90 compiles of
        # the others spill: python -m cuda_ops.compile_check)
        fits = [t for t in tiles if t[2] <= 128 and t[0] * t[1] <= 128 * 128]
        # few rows make few output tiles: split K too, so that more programs share the weight reads
        narrow = [t for t in fits if t[1] <= 128][:2]
        split = [Config(*t, fuse=f, split_k=s) for s in (2, 4) for f in (True, False) for t in narrow]
        out = [Config(*t, fuse=True) for t in fits] + out + split
    # decoding the codes in the main loop costs integer work per weight that wgmma's int8 rate outruns; a
    # separate decode pass into int8 (N x K bytes, the layer's alone, in torch's caching allocator) then
    # a plain int8 GEMM may win, most likely at many rows (tried for bits < 8 only)
    out += [Config(*t, predecode=True) for t in tiles]
    if m <= 256:  # few rows: wgmma as narrow as 16 rows, the decoded weights its register operand
        out += [Config(*t, swap=True) for t in _SWAP_TILES if t[0] <= _bucket(m)]
    return out


def weight_only_candidates(m: int, group_size: int, k: int) -> list[Config]:
    """Configs for the weight-only GEMM; a K tile must lie inside one group, so it is halved until it
    divides the group (the op guarantees group_size % (16 * 8 // bits) == 0 whenever group_size < K:
    a tile of at least 16 bytes of codes fits)."""
    tiles = [(t, False) for t in _tiles(m, _FLOAT_TILES)]
    if m <= 256:  # few rows: the swapped kernel too
        tiles += [(t, True) for t in _SWAP_FLOAT_TILES if t[0] <= _bucket(m)]
    out = []
    for (bm, bn, bk, warps, stages), swap in tiles:
        while group_size < k and group_size % bk:
            bk //= 2
        if Config(bm, bn, bk, warps, stages, swap=swap) not in out:
            out.append(Config(bm, bn, bk, warps, stages, swap=swap))
    return out


def replay_ms(fn) -> float:
    """Median ms of fn's kernels replayed from a CUDA graph (the time a graphed model sees), L2 cleared
    before each replay. Eager launches are timed where capturing fails. Timed eagerly, the host's launch
    cost decides at few rows: on an H200 the picks for ViT-B at M = 197 time 45-61 us that way, against
    22-46 us replayed, so eager picks there are noise (measured 2026-12-04)."""
    from cuda_ops.modules import capture_graph
    bench = lambda f: triton.testing.do_bench(f, warmup=5, rep=20, return_mode="median")  # noqa: E731
    try:
        replay = capture_graph(fn).replay
    except RuntimeError:
        torch.cuda.synchronize()
        return bench(fn)
    return bench(replay)


class Tuner:
    """Remembers the fastest config per key; times candidates (CUDA-graph replays) on first sight of a key."""

    def __init__(self):
        self.best: dict[tuple, Config] = {}
        self.timings: dict[tuple, dict[Config, float]] = {}
        self.compiled: set[tuple] = set()  # keys BITVIT_TUNE=compile has launched every candidate of

    def pick(self, key: tuple, candidates: list[Config], launch) -> Config:
        if key in self.best:
            return self.best[key]
        mode = os.environ.get("BITVIT_TUNE", "1")
        if INTERPRET or len(candidates) == 1 or mode == "0" or torch.cuda.is_current_stream_capturing():
            return candidates[0]
        if mode == "compile":  # compile each tiling once (one the device cannot hold is skipped), time none
            if key not in self.compiled:
                for cfg in candidates:
                    try:
                        launch(cfg)
                    except Exception:
                        pass
                self.compiled.add(key)
            return candidates[0]
        times, first_error = {}, None
        for cfg in candidates:
            try:
                launch(cfg)  # compiles; a tiling that does not fit this device (shared memory) fails here
                times[cfg] = replay_ms(lambda: launch(cfg))
            except Exception as e:
                first_error = first_error or e
        if not times:
            raise first_error
        self.best[key] = min(times, key=times.get)
        self.timings[key] = times
        return self.best[key]

    def report(self) -> list[dict]:
        """The chosen config and its time for every key tuned so far (for benchmark records)."""
        return [{"key": list(map(str, k)), "config": asdict(c), "ms": self.timings[k][c],
                 "candidates": len(self.timings[k])} for k, c in self.best.items()]


TUNER = Tuner()


# ----------------------------------------------------------------------------- launchers

ONE_PASS_MAX_K = 8192  # rows up to this length are quantized from registers, in one read


def quantize_rows(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, norm: Norm | None = None) -> None:
    """x (M, K) float, unit stride along K -> q (M, K) int8 and s (M,) float32, written in place;
    with `norm`, of LayerNorm(x) (fused for K <= ONE_PASS_MAX_K)."""
    m, k = x.shape
    if m == 0:
        return
    one_pass = k <= ONE_PASS_MAX_K
    if norm is not None and not one_pass:
        f32 = lambda t: None if t is None else t.float()  # noqa: E731
        x = torch.nn.functional.layer_norm(x.float(), (k,), f32(norm.weight), f32(norm.bias), norm.eps)
        norm = None
    block_k = triton.next_power_of_2(k) if one_pass else 4096
    block_m = max(1, min(16, 4096 // block_k))
    lw, lb = (norm.weight, norm.bias) if norm is not None else (None, None)
    _quantize_rows_kernel[(triton.cdiv(m, block_m),)](
        x, x if lw is None else lw, x if lb is None else lb, q, s, m, k, x.stride(0), q.stride(0),
        norm.eps if norm else 0.0, HAS_LN=norm is not None, LN_W=lw is not None, LN_B=lb is not None,
        BLOCK_M=block_m, BLOCK_K=block_k, ONE_PASS=one_pass, num_warps=4 if block_m * block_k <= 4096 else 8)


def a8_gemm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
            out: torch.Tensor, bits: int, mul: int, off: int, norm: Norm | None = None,
            config: Config | None = None, trits: bool = False) -> None:
    """out (M, N) = s_x * scales * (quantize(x) @ codes^T * mul - off) (+ bias), codes packed at `bits`
    (with `trits`, ternary trit planes: value = code - 1); with `norm`, of quantize(LayerNorm(x)), the
    LayerNorm fused into the quantization kernel.

    x (M, K) float with unit stride along K; packed (N, ceil(K * bits / 8)) uint8, or (N,
    trit_plane_bytes(K)) with `trits` (and bits=2: a config's block_k then counts codes of a 2-bit
    layout, block_k / 4 bytes a step, 5 * block_k / 4 codes); scales (N,) float32.
    """
    if norm is not None and config is not None and config.fuse:
        raise ValueError("a layer with an input LayerNorm quantizes in quantize_rows, not inside the GEMM")
    m, k = x.shape
    n, kb = packed.shape
    if trits and bits != 2:
        raise ValueError(f"trit planes are stepped through as 2-bit byte tiles: bits must be 2, got {bits}")
    if m == 0:
        return
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    sx = torch.empty((m,), dtype=torch.float32, device=x.device)

    def launch(cfg: Config):
        if cfg.swap:
            quantize_rows(x, q, sx, norm)
            _a8_gemm_swap_kernel[(triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m),)](
                q, sx, packed, scales, bias if bias is not None else sx, out, m, n, k, kb, q.stride(0),
                out.stride(0), BITS=bits, MUL=mul, OFF=off, TRITS=trits, HAS_BIAS=bias is not None,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_KP=cfg.block_k * bits // 8, GROUP_N=8,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            return
        w, w_bytes, w_bits, w_mul, w_off, w_trits = packed, kb, bits, mul, off, trits
        if cfg.predecode:
            w = torch.empty((n, k), dtype=torch.int8, device=x.device)
            _decode_weights_kernel[(triton.cdiv(n, 32), triton.cdiv(k, 128))](
                packed, w, n, k, kb, BITS=bits, MUL=mul, OFF=off, TRITS=trits, BLOCK_N=32, BLOCK_K=128)
            w_bytes, w_bits, w_mul, w_off, w_trits = k, 8, 1, 0, False
        if not cfg.fuse:
            quantize_rows(x, q, sx, norm)
        y = out
        if cfg.split_k > 1:  # the splits add into zeroed fp32
            y = out if out.dtype == torch.float32 and out.stride(1) == 1 else torch.empty(
                (m, n), dtype=torch.float32, device=out.device)
            y.zero_()
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
        _a8_gemm_kernel[grid](
            x, q, sx, w, scales, bias if bias is not None else sx, y,
            m, n, k, w_bytes, x.stride(0), q.stride(0), y.stride(0),
            BITS=w_bits, MUL=w_mul, OFF=w_off, TRITS=w_trits, FUSE_QUANT=cfg.fuse, HAS_BIAS=bias is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_KP=cfg.block_k * w_bits // 8, GROUP_M=8,
            SPLIT_K=cfg.split_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if y is not out:
            out.copy_(y)

    if config is None:
        key = ("a8", "trits" if trits else bits, _bucket(m), n, k, x.dtype, bias is not None, norm is not None,
               x.device.index)
        candidates = [c for c in a8_candidates(m) if not (norm and c.fuse) and not (bits == 8 and c.predecode)]
        config = TUNER.pick(key, candidates, launch)
    launch(config)


def _dot_dtype(dtype: torch.dtype):
    """The dot operands' type: the activations' own, except that the interpreter (triton 3.9) multiplies
    bf16 operands as raw bits, so there bf16 tiles are widened to fp32 (same products, exact)."""
    if dtype == torch.float16:
        return tl.float16
    return tl.bfloat16 if dtype == torch.bfloat16 and not INTERPRET else tl.float32


def weight_only_gemm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     codebook: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int,
                     out: torch.Tensor, config: Config | None = None) -> None:
    """out (M, N) = x @ W^T (+ bias) with W[n, k] = (value(code) - zero) * scale of k's group, codes
    packed at `bits` in {2, 4, 8}.

    value(code) = codebook[code] if a code book is given, else code; without zeros the symmetric
    offset 2**(bits-1) is subtracted instead (code = q + 2**(bits-1)). scales, zeros: (N, G) float32.
    """
    m, k = x.shape
    n, kb = packed.shape
    if m == 0:
        return
    if config is not None and group_size < k and group_size % config.block_k:
        raise ValueError(f"config {config} splits groups of {group_size}")

    def launch(cfg: Config):
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
        kernel = _weight_only_gemm_swap_kernel if cfg.swap else _weight_only_gemm_kernel
        group = "GROUP_N" if cfg.swap else "GROUP_M"  # row blocks (swapped: column blocks) sharing L2
        kernel[grid](
            x, packed, scales, zeros if zeros is not None else scales,
            codebook if codebook is not None else scales, bias if bias is not None else scales, out,
            m, n, k, kb, scales.shape[1], group_size, x.stride(0), out.stride(0),
            BITS=bits, HAS_ZEROS=zeros is not None, HAS_LUT=codebook is not None, HAS_BIAS=bias is not None,
            DOT_DTYPE=_dot_dtype(x.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_KP=cfg.block_k * bits // 8, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **{group: 8})

    if config is None:
        key = ("weight_only", bits, _bucket(m), n, k, group_size, x.dtype, zeros is not None,
               codebook is not None, bias is not None, x.device.index)
        config = TUNER.pick(key, weight_only_candidates(m, group_size, k), launch)
    launch(config)
