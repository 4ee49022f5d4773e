"""Float64 dequantize-then-matmul references for the cuda_ops kernels, written from the layer contract
(not from the kernels): codes are unpacked with `quant.pack.unpack_codes`, the generic bit-stream
unpacker (trit planes by base-3 division, `unpack_trit_planes_by_division`), and every product is taken
in float64."""
import torch

from quant.pack import pack_codes, pack_trit_planes, unpack_codes

# bits a code of each A8 format; ternary_b3: trit planes, launched as 2-bit
A8_BITS = {"ternary": 2, "ternary_b3": 2, "binary": 1, "int4": 4, "int8": 8}
# weight-only layers checked on the CPU and Triton kernels: (bits, kind, in_features, group_size)
WEIGHT_ONLY_CASES = [(4, "sym", 300, 300), (4, "asym", 300, 64), (4, "lut", 256, 32), (2, "asym", 300, 64),
                     (2, "sym", 200, 200), (8, "sym", 100, 100), (8, "asym", 300, 16)]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unpack_trit_planes_by_division(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Codes of trit-plane rows, from the layout's definition: byte j of a KC-byte row stores
    q = ceil(v * 256 / 243), v = sum_c t_c 3**(4 - c) for the codes t_c at k = j + c * KC, so
    v = floor(q * 243 / 256) and t_c is digit 4 - c of v."""
    v = packed.long() * 243 // 256  # (N, KC)
    digits = torch.stack([(v // 3 ** (4 - c)) % 3 for c in range(5)], dim=1)  # (N, 5, KC)
    return digits.reshape(packed.shape[0], -1)[:, :k].to(torch.uint8)


def unpack_a8(packed: torch.Tensor, fmt: str, k: int) -> torch.Tensor:
    if fmt == "ternary_b3":
        return unpack_trit_planes_by_division(packed.cpu(), k)
    return unpack_codes(packed.cpu(), A8_BITS[fmt], k)


def random_codes(n: int, k: int, fmt: str, gen: torch.Generator) -> torch.Tensor:
    """uint8 codes (n, k) of a weight format ("ternary", "binary", "int8", "int4", "int2")."""
    high = {"ternary": 3, "ternary_b3": 3, "binary": 2, "int8": 256, "int4": 16, "int2": 4}[fmt]
    return torch.randint(0, high, (n, k), generator=gen).to(torch.uint8)


def code_values(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """Contract code meaning: ternary w + 1, binary 1 -> +1 / 0 -> -1, signed 4-bit q + 8, signed 8-bit
    q + 128."""
    c = codes.double()
    return {"ternary": c - 1, "ternary_b3": c - 1, "binary": 2 * c - 1, "int4": c - 8, "int8": c - 128}[fmt]


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract's per-token int8 quantization: s = max|x| / 127, q = clamp(round(x / s), -127, 127)."""
    xf = x.float()
    s = xf.abs().amax(-1) / 127
    q = torch.round(xf / torch.where(s > 0, s, torch.ones_like(s))[..., None]).clamp(-127, 127)
    return q.to(torch.int8), s


def reference_a8(x, packed, fmt, scales, bias, k) -> torch.Tensor:
    """float64 y = s_x * (q_x @ (value(code) * scale)^T) + bias, from the packed bytes."""
    w = code_values(unpack_a8(packed, fmt, k), fmt) * scales.cpu().double().reshape(-1, 1)
    q, s = quantize_tokens(x.cpu())
    y = s.double()[..., None] * (q.double() @ w.t())
    return y + bias.cpu().double() if bias is not None else y


def reference_weight_only(x, packed, bits, scales, zeros, codebook, bias, group_size, k) -> torch.Tensor:
    """float64 y = x @ W^T + bias, W[o, k] = (value(code) - zero) * scale of k's group."""
    codes = unpack_codes(packed.cpu(), bits, k).long()
    v = codebook.cpu().double()[codes] if codebook is not None else codes.double()
    group = torch.arange(k) // group_size
    if zeros is not None:
        v = v - zeros.cpu().double()[:, group]
    elif codebook is None:
        v = v - 2 ** (bits - 1)
    w = v * scales.cpu().double()[:, group]
    y = x.cpu().double() @ w.t()
    return y + bias.cpu().double() if bias is not None else y


def make_a8_layer(fmt: str, n: int, k: int, gen: torch.Generator, bias: bool = True):
    """Random (packed, scales, bias) of an A8 layer in the pack.py layout (trit planes for ternary_b3)."""
    codes = random_codes(n, k, fmt, gen)
    packed = pack_trit_planes(codes) if fmt == "ternary_b3" else pack_codes(codes, A8_BITS[fmt])
    scales = torch.rand(n, 1, generator=gen) * 0.1 + 0.01
    b = torch.randn(n, generator=gen) if bias else None
    return packed, scales, b


def make_weight_only_layer(kind: str, bits: int, n: int, k: int, group_size: int, gen: torch.Generator,
                           bias: bool = True):
    """Random (packed, scales, zeros, codebook, bias) of a weight-only layer: kind "sym", "asym" or
    "lut" (a code book, as NF4)."""
    g = -(-k // group_size)
    packed = pack_codes(random_codes(n, k, f"int{bits}", gen), bits)
    scales = torch.rand(n, g, generator=gen) * 0.02 + 0.005
    zeros = torch.randint(0, 1 << bits, (n, g), generator=gen).float() if kind == "asym" else None
    codebook = torch.sort(torch.rand(1 << bits, generator=gen) * 2 - 1).values if kind == "lut" else None
    b = torch.randn(n, generator=gen) if bias else None
    return packed, scales, zeros, codebook, b


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref||, on the CPU in float64 wherever the two live; NaN-propagating (an unwritten
    NaN-poisoned output never passes)."""
    ref = ref.cpu().double()
    return ((y.cpu().double() - ref).norm() / ref.norm()).item()
