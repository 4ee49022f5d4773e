"""Bit-level packing of integer weight codes: the layout every bitvit file, kernel and exporter shares.

A quantized weight matrix (out_features, in_features) is stored as unsigned integer *codes*, one
per weight, in [0, 2**bits). What a code means is the quantizer's business (ternary: code = w + 1
for w in {-1, 0, +1}; binary: code 1 = +1, code 0 = -1; signed b-bit: code = q + 2**(b-1); NF4:
an index into the NF4 code book).

Layout (`pack_codes`): each row (the last dimension, usually one output channel's in_features
weights) is packed on its own into a little-endian bit stream: code j occupies stream bits
[j*bits, (j+1)*bits), and stream bit i is bit (i % 8) of byte i // 8. A row is padded with zero
bits to whole bytes, so row r starts at byte r * ceil(K * bits / 8). For bits in {1, 2, 4, 8} this
is the plain "first element in the lowest bits" byte layout (2 bits: 4 codes per byte, code j at
bits 2j..2j+1).

`pack_base3` stores ternary codes at 1.6 bits per weight: 5 codes c0..c4 per byte as
c0 + 3*c1 + 9*c2 + 27*c3 + 81*c4 (at most 242), rows padded with code 0 to a multiple of 5.

`pack_trit_planes` is the base-3 layout the GPU kernels read (1.6 bits per weight in memory, plus the
row padding): a row of K ternary codes becomes KC = `trit_plane_bytes(K)` bytes (ceil(K / 5) rounded up
to a multiple of 16, so each plane starts 16-byte aligned), and byte j holds the five codes at
k = j + c * KC for c = 0..4 ("planes" c, each a contiguous run of K). A kernel that loads bytes
[j0, j0 + B) therefore gets five contiguous K ranges, each a plain activation tile. A byte stores
v = sum_c t_c * 3**(4 - c) in fixed point, q = ceil(v * 256 / 243), so that code c is one multiply,
mask and shift away: t_c = (((q * 3**c) mod 256) * 3) >> 8 (exact for all 243 values of v).
Padding codes are 1 (weight 0).
"""
from __future__ import annotations

import torch


def packed_row_bytes(k: int, bits: int) -> int:
    """Bytes one packed row of `k` codes takes."""
    return (k * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., K), each < 2**bits -> uint8 (..., ceil(K * bits / 8))."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"a code is {int(codes.max())}, too large for {bits} bits")
    *lead, k = codes.shape
    n = packed_row_bytes(k, bits)
    if bits == 8:
        return codes.clone()
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(*lead, k * bits)  # (..., K*bits) of 0/1
    stream = torch.nn.functional.pad(stream, (0, n * 8 - k * bits))
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32))
    return (stream.reshape(*lead, n, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 (..., ceil(K * bits / 8)) -> uint8 codes (..., K)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if packed.dtype != torch.uint8 or packed.shape[-1] != packed_row_bytes(k, bits):
        raise ValueError(f"packed rows must be uint8 of {packed_row_bytes(k, bits)} bytes for {k} "
                         f"{bits}-bit codes, got {packed.dtype} of {packed.shape[-1]}")
    *lead, n = packed.shape
    if bits == 8:
        return packed.clone()
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(*lead, n * 8)[..., :k * bits]
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32))
    return (stream.reshape(*lead, k, bits).to(torch.int32) * weights).sum(-1).to(torch.uint8)


_POW3 = (1, 3, 9, 27, 81)


def _check_ternary_codes(codes: torch.Tensor) -> None:
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    if codes.numel() and int(codes.max()) > 2:
        raise ValueError(f"a ternary code is {int(codes.max())}; codes must be 0, 1 or 2")


def pack_base3(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes (..., K) in {0, 1, 2} -> uint8 (..., ceil(K / 5)), 5 codes per byte."""
    _check_ternary_codes(codes)
    *lead, k = codes.shape
    n = (k + 4) // 5
    padded = torch.nn.functional.pad(codes, (0, n * 5 - k)).reshape(*lead, n, 5).to(torch.int32)
    return (padded * torch.tensor(_POW3, dtype=torch.int32, device=codes.device)).sum(-1).to(torch.uint8)


def unpack_base3(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_base3`: uint8 (..., ceil(K / 5)) -> ternary codes (..., K)."""
    if packed.dtype != torch.uint8 or packed.shape[-1] != (k + 4) // 5:
        raise ValueError(f"base-3 rows must be uint8 of {(k + 4) // 5} bytes for {k} codes, "
                         f"got {packed.dtype} of {packed.shape[-1]}")
    if packed.numel() and int(packed.max()) > 242:
        raise ValueError(f"byte value {int(packed.max())} is not 5 base-3 digits (max 242)")
    *lead, n = packed.shape
    digits = (packed.to(torch.int32).unsqueeze(-1)
              // torch.tensor(_POW3, dtype=torch.int32, device=packed.device)) % 3
    return digits.reshape(*lead, n * 5)[..., :k].to(torch.uint8)


TRIT_PLANE_ALIGN = 16


def trit_plane_bytes(k: int) -> int:
    """Bytes one `pack_trit_planes` row of `k` ternary codes takes: ceil(k / 5) rounded up to 16."""
    return -(-((k + 4) // 5) // TRIT_PLANE_ALIGN) * TRIT_PLANE_ALIGN


def pack_trit_planes(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes (..., K) in {0, 1, 2} -> uint8 (..., trit_plane_bytes(K)), the GPU base-3 layout."""
    _check_ternary_codes(codes)
    *lead, k = codes.shape
    kc = trit_plane_bytes(k)
    planes = torch.nn.functional.pad(codes, (0, 5 * kc - k), value=1).reshape(*lead, 5, kc).to(torch.int32)
    pow3 = torch.tensor(_POW3[::-1], dtype=torch.int32, device=codes.device)  # plane c: 3**(4 - c)
    v = (planes * pow3[:, None]).sum(-2)  # (..., KC) in [0, 242]
    return ((v * 256 + 242) // 243).to(torch.uint8)


def unpack_trit_planes(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_trit_planes`: uint8 (..., trit_plane_bytes(K)) -> ternary codes (..., K)."""
    kc = trit_plane_bytes(k)
    if packed.dtype != torch.uint8 or packed.shape[-1] != kc:
        raise ValueError(f"trit-plane rows must be uint8 of {kc} bytes for {k} codes, "
                         f"got {packed.dtype} of {packed.shape[-1]}")
    pow3 = torch.tensor(_POW3, dtype=torch.int32, device=packed.device)  # plane c: 3**c
    t = ((packed.to(torch.int32).unsqueeze(-2) * pow3[:, None]) & 255) * 3 >> 8  # (..., 5, KC)
    return t.reshape(*packed.shape[:-1], 5 * kc)[..., :k].to(torch.uint8)
