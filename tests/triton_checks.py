"""The Triton kernels themselves, against float64 references, with poisoned outputs.

Not collected by the plain test run (the file name has no test_ prefix): `test_triton_kernels.py`
runs it in a subprocess under TRITON_INTERPRET=1 (CPU tensors, small shapes), and the GPU machine
runs it natively (`python -m pytest tests/triton_checks.py`, see cuda_ops/gpu_session.sh), where the
larger shapes and every tuning candidate are checked too.
"""
import os

import pytest
import torch

from kernel_reference import (A8_BITS, WEIGHT_ONLY_CASES, gen, make_a8_layer, make_weight_only_layer,
                              quantize_tokens, reference_a8, reference_weight_only, rel_err)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

from cuda_ops import triton_kernels as tk  # noqa: E402  (after the interpreter switch is known)

DEV = "cpu" if INTERPRET else "cuda"
A8_MUL_OFF = {"ternary": (1, 1), "ternary_b3": (1, 1), "binary": (2, 1), "int4": (1, 8), "int8": (1, 128)}
# (M, N, K): none a multiple of the tile sizes; K below, between and above one K tile of each width
SHAPES = [(1, 37, 100), (19, 70, 300)] if INTERPRET else \
    [(1, 37, 100), (19, 70, 300), (197, 2304, 768), (1576, 3072, 768), (333, 1000, 1030), (4100, 384, 1536)]
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def poisoned(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def dev(t):
    return None if t is None else t.to(DEV)


def run_a8(fmt, x, packed, scales, bias, config):
    out = poisoned(x.shape[0], packed.shape[0], dtype=x.dtype)
    mul, off = A8_MUL_OFF[fmt]
    tk.a8_gemm(dev(x), dev(packed), dev(scales).reshape(-1), dev(bias), out, A8_BITS[fmt], mul, off, None, config,
               trits=fmt == "ternary_b3")
    return out


# ----------------------------------------------------------------------------- quantization kernel

@pytest.mark.parametrize("k", [1, 77, 4096, 9000])  # 9000: the two-pass path for rows over 8192
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_quantize_rows_is_bit_exact_and_writes_everything(k, dtype):
    m = 5
    x = (torch.randn(m, k, generator=gen(k)) * 4).to(dtype)
    x[1] = 0
    if k >= 4:
        x[2, :4] = torch.tensor([127.0, 2.5, -2.5, 3.5])  # s = 1 with exact ties when the rest is small
        x[2, 4:] = x[2, 4:].clamp(-100, 100)
    q = torch.full((m, k), -128, dtype=torch.int8, device=DEV)  # -128 is never a valid code
    s = poisoned(m)
    tk.quantize_rows(dev(x), q, s)
    q_ref, s_ref = quantize_tokens(x)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


@pytest.mark.parametrize("k", [77, 9000])  # one pass, two passes
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_quantize_rows_gives_a_row_holding_nan_or_inf_a_nan_scale(k, bad):
    x = torch.randn(3, k, generator=gen(k))
    x[1, k // 2] = bad
    q = torch.full((3, k), -128, dtype=torch.int8, device=DEV)
    s = poisoned(3)
    tk.quantize_rows(dev(x), q, s)
    q_ref, s_ref = quantize_tokens(x)
    assert s.cpu()[1].isnan() and torch.equal(s.cpu()[[0, 2]], s_ref[[0, 2]])
    assert torch.equal(q.cpu()[[0, 2]], q_ref[[0, 2]])
    assert q.cpu()[1, k // 2] == (0 if bad != bad else 127)  # the CPU kernel's codes for such a row


@pytest.mark.parametrize("k", [77, 768, 9000])  # 9000: LayerNorm in torch, then two passes
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.bfloat16])  # a bf16 model's LayerNorm, uncast
def test_quantize_rows_fuses_the_input_layer_norm(k, affine, norm_dtype):
    g = gen(k)
    x = torch.randn(6, k, generator=g) * 3 + 2
    w, b = (torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g)) if affine else (None, None)
    if affine:
        w, b = w.to(norm_dtype), b.to(norm_dtype)
    q = torch.full((6, k), -128, dtype=torch.int8, device=DEV)
    s = poisoned(6)
    tk.quantize_rows(dev(x), q, s, tk.Norm(dev(w), dev(b), 1e-6))
    q_ref, s_ref = quantize_tokens(torch.nn.functional.layer_norm(x.double(), (k,), None if w is None else w.double(),
                                                                  None if b is None else b.double(), 1e-6).float())
    assert (q.cpu().int() - q_ref.int()).abs().max() <= 1  # fp32 LayerNorm vs float64: a code may flip at a tie
    assert (q.cpu() != q_ref).float().mean() < 1e-3
    assert torch.allclose(s.cpu(), s_ref, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- W1.58A8 / W1A8 / W8A8

@pytest.mark.parametrize("fmt", list(A8_BITS))
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("split_k", [1, 3])  # 3: uneven shares of K, an empty one where K has 2 tiles
def test_a8_gemm_matches_float64_reference(fmt, m, n, k, fuse, split_k):
    g = gen(m + n + k)
    packed, scales, bias = make_a8_layer(fmt, n, k, g)
    x = torch.randn(m, k, generator=g)
    cfg = (tk.Config(16, 32, 64, fuse=fuse, split_k=split_k) if INTERPRET
           else tk.Config(64, 128, 128, 4, 3, fuse=fuse, split_k=split_k))
    y = run_a8(fmt, x, packed, scales, bias, cfg)
    assert rel_err(y, reference_a8(x, packed, fmt, scales, bias, k)) < 1e-6


@pytest.mark.parametrize("fmt", list(A8_BITS))
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("path", ["predecode", "swap"])  # codes decoded to an int8 scratch first; y^T = W q^T
def test_a8_gemm_predecoded_or_swapped_matches_float64_reference(fmt, m, n, k, path):
    if path == "predecode" and fmt == "int8":
        pytest.skip("8-bit codes are not decoded first (no such candidate)")
    g = gen(m + n + k + 1)
    packed, scales, bias = make_a8_layer(fmt, n, k, g)
    x = torch.randn(m, k, generator=g)
    tile = (16, 32, 64) if INTERPRET else (64, 128, 128, 4, 3) if path == "predecode" else (16, 64, 128, 4, 4)
    y = run_a8(fmt, x, packed, scales, bias, tk.Config(*tile, **{path: True}))
    assert rel_err(y, reference_a8(x, packed, fmt, scales, bias, k)) < 1e-6


@pytest.mark.parametrize("fmt", list(A8_BITS))
@pytest.mark.parametrize("path", ["plain", "fused", "swapped"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a8_gemm_turns_an_input_row_holding_nan_or_inf_into_a_nan_output_row(fmt, path, bad):
    g = gen(17)
    packed, scales, bias = make_a8_layer(fmt, 37, 100, g)
    x = torch.randn(5, 100, generator=g)
    x[2, 40] = bad
    how = {"fuse": path == "fused", "swap": path == "swapped"}
    cfg = tk.Config(16, 32, 64, **how) if INTERPRET else tk.Config(64, 128, 128, 4, 3, **how)
    y = run_a8(fmt, x, packed, scales, bias, cfg).cpu()
    assert y[2].isnan().all()
    rows = [0, 1, 3, 4]
    assert rel_err(y[rows], reference_a8(x[rows], packed, fmt, scales, bias, 100)) < 1e-6


@pytest.mark.parametrize("path", ["plain", "fused", "swapped"])
def test_a8_gemm_ignores_whatever_trit_planes_hold_past_k(path):
    """Codes past K in the last plane are padding (pack_trit_planes writes 1, a zero weight): the kernels
    mask those columns off rather than rely on it, so padding of +1 weights changes nothing."""
    from quant.pack import pack_trit_planes, trit_plane_bytes
    g = gen(19)
    n, k = 37, 100
    codes = torch.full((n, 5 * trit_plane_bytes(k)), 2, dtype=torch.uint8)  # padding: weight +1
    codes[:, :k] = torch.randint(0, 3, (n, k), generator=g)
    packed, scales = pack_trit_planes(codes), torch.rand(n, 1, generator=g) * 0.1 + 0.01
    x = torch.randn(3, k, generator=g)
    how = {"fuse": path == "fused", "swap": path == "swapped"}
    cfg = tk.Config(16, 32, 64, **how) if INTERPRET else tk.Config(64, 128, 128, 4, 3, **how)
    y = run_a8("ternary_b3", x, packed, scales, None, cfg)
    assert rel_err(y, reference_a8(x, packed, "ternary_b3", scales, None, k)) < 1e-6


@pytest.mark.parametrize("fmt", list(A8_BITS))
def test_a8_gemm_with_input_layer_norm_matches_float64_reference(fmt):
    g = gen(13)
    packed, scales, bias = make_a8_layer(fmt, 70, 300, g)
    x = torch.randn(19, 300, generator=g) * 2 + 1
    w, b = torch.rand(300, generator=g) + 0.5, torch.randn(300, generator=g) * 0.1
    out = poisoned(19, 70)
    mul, off = A8_MUL_OFF[fmt]
    tk.a8_gemm(dev(x), dev(packed), dev(scales).reshape(-1), dev(bias), out, A8_BITS[fmt], mul, off,
               tk.Norm(dev(w), dev(b), 1e-6), tk.Config(16, 32, 64) if INTERPRET else None, trits=fmt == "ternary_b3")
    x_normed = torch.nn.functional.layer_norm(x.double(), (300,), w.double(), b.double(), 1e-6).float()
    assert rel_err(out, reference_a8(x_normed, packed, fmt, scales, bias, 300)) < 1e-4


@pytest.mark.parametrize("fmt", list(A8_BITS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("split_k", [1, 2])  # 2: fp32 partial sums, then one cast into the 16-bit output
def test_a8_gemm_reads_and_writes_16_bit_activations(fmt, dtype, split_k):
    g = gen(11)
    packed, scales, _ = make_a8_layer(fmt, 70, 300, g, bias=False)
    x = torch.randn(19, 300, generator=g).to(dtype)
    cfg = tk.a8_candidates(19)[0]
    y = run_a8(fmt, x, packed, scales, None, tk.Config(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps,
                                                       cfg.num_stages, cfg.fuse, split_k))
    assert y.dtype == dtype
    assert rel_err(y, reference_a8(x, packed, fmt, scales, None, 300)) < 1e-2


@pytest.mark.skipif(INTERPRET, reason="every tuning candidate: on the GPU only")
@pytest.mark.parametrize("fmt", list(A8_BITS))
@pytest.mark.parametrize("m", [1, 197, 1576, 12608])
def test_every_a8_candidate_config_is_correct(fmt, m):
    g = gen(m)
    packed, scales, bias = make_a8_layer(fmt, 1000, 1030, g)
    x = torch.randn(m, 1030, generator=g).bfloat16()
    ref = reference_a8(x, packed, fmt, scales, bias, 1030)
    for cfg in tk.a8_candidates(m):
        try:
            y = run_a8(fmt, x, packed, scales, bias, cfg)
        except Exception as e:  # the tuner skips tilings a device cannot hold; anything else fails
            assert "out of resource" in str(e).lower(), f"{cfg}: {e}"
            continue
        assert rel_err(y, ref) < 1e-2, cfg


# ----------------------------------------------------------------------------- weight-only (W4A16 and kin)

@pytest.mark.parametrize("bits,kind,k,group_size", WEIGHT_ONLY_CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_weight_only_gemm_matches_float64_reference(bits, kind, k, group_size, dtype, tol):
    g = gen(k + group_size)
    packed, scales, zeros, codebook, bias = make_weight_only_layer(kind, bits, 37, k, group_size, g)
    x = torch.randn(19, k, generator=g).to(dtype)
    out = poisoned(19, 37, dtype=dtype)
    cfg = tk.weight_only_candidates(19, group_size, k)[0]
    tk.weight_only_gemm(dev(x), dev(packed), dev(scales), dev(zeros), dev(codebook), dev(bias), bits, group_size,
                        out, cfg)
    ref = reference_weight_only(x, packed, bits, scales, zeros, codebook, bias, group_size, k)
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("bits,kind,k,group_size", WEIGHT_ONLY_CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_weight_only_gemm_with_its_operands_swapped_matches_float64_reference(bits, kind, k, group_size, dtype, tol):
    g = gen(k + group_size + 1)
    packed, scales, zeros, codebook, bias = make_weight_only_layer(kind, bits, 37, k, group_size, g)
    x = torch.randn(19, k, generator=g).to(dtype)
    out = poisoned(19, 37, dtype=dtype)
    cfg = next(c for c in tk.weight_only_candidates(19, group_size, k) if c.swap)  # K tiles fitted to the groups
    tk.weight_only_gemm(dev(x), dev(packed), dev(scales), dev(zeros), dev(codebook), dev(bias), bits, group_size,
                        out, cfg)
    ref = reference_weight_only(x, packed, bits, scales, zeros, codebook, bias, group_size, k)
    assert rel_err(out, ref) < tol


@pytest.mark.skipif(INTERPRET, reason="every tuning candidate: on the GPU only")
@pytest.mark.parametrize("m", [1, 197, 1576, 12608])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, 1030), (2, 64), (8, 1030)])
def test_every_weight_only_candidate_config_is_correct(m, bits, group_size):
    k = 1030
    g = gen(m)
    packed, scales, zeros, codebook, bias = make_weight_only_layer("asym", bits, 1000, k, group_size, g)
    x = torch.randn(m, k, generator=g).bfloat16()
    ref = reference_weight_only(x, packed, bits, scales, zeros, codebook, bias, group_size, k)
    for cfg in tk.weight_only_candidates(m, group_size, k):
        out = poisoned(m, 1000, dtype=torch.bfloat16)
        try:
            tk.weight_only_gemm(dev(x), dev(packed), dev(scales), dev(zeros), None, dev(bias), bits, group_size,
                                out, cfg)
        except Exception as e:
            assert "out of resource" in str(e).lower(), f"{cfg}: {e}"
            continue
        assert rel_err(out, ref) < 1e-2, cfg


@pytest.mark.skipif(INTERPRET, reason="tuning times candidates on the GPU")
def test_the_tuner_remembers_its_pick_per_shape(monkeypatch):
    monkeypatch.setenv("BITVIT_TUNE", "1")  # gpu_session.sh runs the other checks untuned
    g = gen(12)
    packed, scales, bias = make_a8_layer("ternary", 768, 768, g)
    x = torch.randn(197, 768, generator=g).bfloat16().cuda()
    out = torch.empty(197, 768, dtype=torch.bfloat16, device="cuda")
    args = (x, packed.cuda(), scales.reshape(-1).cuda(), bias.cuda(), out, 2, 1, 1)
    tk.a8_gemm(*args)
    key = ("a8", 2, 256, 768, 768, torch.bfloat16, True, False, x.device.index)
    assert key in tk.TUNER.best
    assert rel_err(out, reference_a8(x, packed, "ternary", scales, bias, 768)) < 1e-2
