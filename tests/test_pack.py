"""Bit packing: every width round-trips, on any row length, in the documented byte layout."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.pack import (pack_base3, pack_codes, pack_trit_planes, packed_row_bytes, trit_plane_bytes, unpack_base3,
                        unpack_codes, unpack_trit_planes)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 4), k=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_codes_round_trip_at_every_width(bits, rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, k), generator=g).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (rows, packed_row_bytes(k, bits))
    assert torch.equal(unpack_codes(packed, bits, k), codes)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 4), k=st.integers(1, 60), seed=st.integers(0, 2**16))
def test_base3_round_trips_at_1_6_bits(rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 3, (rows, k), generator=g).to(torch.uint8)
    packed = pack_base3(codes)
    assert packed.shape == (rows, (k + 4) // 5)
    assert torch.equal(unpack_base3(packed, k), codes)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 4), k=st.integers(1, 400), seed=st.integers(0, 2**16))
def test_trit_planes_round_trip_in_16_byte_aligned_rows(rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 3, (rows, k), generator=g).to(torch.uint8)
    packed = pack_trit_planes(codes)
    assert packed.shape == (rows, trit_plane_bytes(k)) and trit_plane_bytes(k) % 16 == 0
    assert trit_plane_bytes(k) < (k + 4) // 5 + 16
    assert torch.equal(unpack_trit_planes(packed, k), codes)


def test_trit_plane_byte_j_holds_the_codes_at_j_plus_c_times_the_row_bytes():
    k = 200  # 40 bytes of trits, 48 with the alignment: plane c starts at k = 48 c
    codes = torch.ones(1, k, dtype=torch.uint8)
    codes[0, 3], codes[0, 3 + 48], codes[0, 3 + 4 * 48] = 2, 0, 2  # byte 3, planes 0, 1 and 4
    q = pack_trit_planes(codes)[0, 3].item()
    v = 2 * 81 + 0 * 27 + 1 * 9 + 1 * 3 + 2  # plane c is digit 4 - c
    assert q == -(-v * 256 // 243)


def test_every_byte_value_decodes_to_its_five_trits():
    import itertools
    codes = torch.tensor(list(itertools.product(range(3), repeat=5)), dtype=torch.uint8)  # (243, 5): all digit sets
    wide = torch.ones(243, 80, dtype=torch.uint8)  # trit_plane_bytes(80) = 16: plane c at k = 16 c
    wide[:, ::16] = codes
    assert torch.equal(unpack_trit_planes(pack_trit_planes(wide), 80), wide)


def test_base3_byte_is_c0_plus_3_c1_up_to_81_c4_with_rows_padded_by_code_0():
    codes = torch.tensor([[2, 1, 0, 2, 1, 1, 2]], dtype=torch.uint8)
    assert pack_base3(codes).tolist() == [[2 + 3 * 1 + 9 * 0 + 27 * 2 + 81 * 1, 1 + 3 * 2]]


def test_two_bit_layout_puts_the_first_code_in_the_lowest_bits():
    codes = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    assert pack_codes(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4, 3]]


def test_three_bit_codes_stream_across_byte_boundaries():
    codes = torch.tensor([[0b101, 0b011, 0b110]], dtype=torch.uint8)  # stream 101 110 011 (LSB first)
    assert pack_codes(codes, 3).tolist() == [[0b10_011_101, 0b1]]


def test_code_too_large_for_its_width_is_refused():
    with pytest.raises(ValueError, match="too large for 2 bits"):
        pack_codes(torch.tensor([[4]], dtype=torch.uint8), 2)


def test_wrong_packed_row_length_is_refused():
    with pytest.raises(ValueError, match="2 bytes"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.uint8), 2, 5)


def test_base3_byte_out_of_range_is_refused():
    with pytest.raises(ValueError, match="max 242"):
        unpack_base3(torch.tensor([[250]], dtype=torch.uint8), 5)


def test_a_ternary_code_above_two_is_refused():
    for pack in (pack_base3, pack_trit_planes):
        with pytest.raises(ValueError, match="codes must be 0, 1 or 2"):
            pack(torch.tensor([[1, 3]], dtype=torch.uint8))


def test_trit_plane_padding_codes_are_one_so_padded_weights_are_zero():
    k = 7                                                   # trit_plane_bytes(7) = 16 bytes: 80 slots, 73 padding
    packed = pack_trit_planes(torch.zeros(1, k, dtype=torch.uint8))
    assert (unpack_trit_planes(packed, 80)[0, k:] == 1).all()
