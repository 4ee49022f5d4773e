"""Bit packing: every width round-trips, on any row length, in the documented byte layout."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.pack import pack_base3, pack_codes, packed_row_bytes, unpack_base3, unpack_codes


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
