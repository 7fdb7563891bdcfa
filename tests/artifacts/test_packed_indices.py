"""Format 3: sparse indices bit-packed at ceil(log2 numel) bits — layout, edges, tampering, bytes."""
from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from sensitune.artifacts import DeltaError, load_delta, read_delta, save_delta
from sensitune.artifacts.delta import quantised_params
from sensitune.artifacts.format import META_FILE, TENSORS_FILE
from sensitune.io import index_bits
from sensitune.planning import make_plan
from sensitune.tuners import apply_plan
from sensitune.tuners.packing import _UINT_CHUNK, pack_bits, pack_uints, unpack_uints

from .helpers import images, tuned_vit, vit


def _stream(values: list[int], bits: int) -> bytes:
    """The documented layout, built with Python integers: value j at bits [j·bits, (j+1)·bits)."""
    total = sum(v << (j * bits) for j, v in enumerate(values))
    return total.to_bytes(math.ceil(len(values) * bits / 8), "little")


@pytest.mark.parametrize("bits", range(1, 64))
def test_pack_uints_is_the_little_endian_bit_stream(bits):
    g = torch.Generator().manual_seed(bits)
    top = 2 ** bits - 1
    for count in (1, 7, 8, 9, 61):
        values = [0, top] + [int(v) for v in torch.randint(0, 2 ** min(bits, 62), (count,), generator=g)]
        values = [v % (top + 1) for v in values][:count]
        packed = pack_uints(torch.tensor(values, dtype=torch.int64), bits)
        assert packed.dtype == torch.uint8 and bytes(packed.tolist()) == _stream(values, bits), count
        assert unpack_uints(packed, bits, count).tolist() == values


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_uints_gives_the_low_bit_codes_layout(bits):
    codes = torch.randint(0, 2 ** bits, (1003,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pack_uints(codes, bits), pack_bits(codes, bits))


@pytest.mark.parametrize("bits", [3, 21, 37])
def test_round_trip_across_chunks(bits):
    count = 2 * _UINT_CHUNK + 5
    values = torch.randint(0, 2 ** bits, (count,), generator=torch.Generator().manual_seed(bits))
    packed = pack_uints(values, bits)
    assert packed.numel() == math.ceil(count * bits / 8)
    assert torch.equal(unpack_uints(packed, bits, count), values)


NUMELS = [1, 2] + [n for k in range(1, 41) for n in (2 ** k, 2 ** k + 1)]


@pytest.mark.parametrize("numel", NUMELS)
def test_indices_at_the_edges_of_every_width(numel):
    """numel = 1, 2, 2**k, 2**k+1: the width is the bits of numel-1 (at least 1), and the last index fits."""
    bits = index_bits(numel)
    assert bits == max(1, (numel - 1).bit_length())
    idx = torch.tensor(sorted({0, numel - 1, numel // 2, max(0, numel - 2)}), dtype=torch.int64)
    assert torch.equal(unpack_uints(pack_uints(idx, bits), bits, idx.numel()), idx)
    if numel > 1 and (numel & (numel - 1)) == 0:  # 2**k entries: no spare bit pattern
        assert index_bits(numel + 1) == bits + 1


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_uints(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_uints(torch.tensor([-1]), 3)
    for bits in (0, 64, True):
        with pytest.raises(ValueError, match="1 to 63"):
            pack_uints(torch.tensor([0]), bits)
    with pytest.raises(TypeError):
        pack_uints(torch.tensor([1.0]), 3)
    packed = pack_uints(torch.tensor([5, 6, 7]), 3)  # 9 bits: 2 bytes
    with pytest.raises(ValueError, match="need 2 packed bytes, got 1"):
        unpack_uints(packed[:1], 3, 3)
    with pytest.raises(ValueError, match="need 2 packed bytes, got 3"):
        unpack_uints(torch.cat([packed, torch.zeros(1, dtype=torch.uint8)]), 3, 3)
    with pytest.raises(ValueError, match="padding bits"):
        unpack_uints(packed | torch.tensor([0, 0x80], dtype=torch.uint8), 3, 3)


# ----------------------------------------------------------------------------- in a delta
@pytest.fixture
def saved(tmp_path):
    return save_delta(tuned_vit("spt"), tmp_path / "d")


def _sparse_units(folder):
    """(unit, target, numel, nnz, byte offset, bytes) of each sparse unit in the packed group, in plan order."""
    out, offset = [], 0
    for i, u in enumerate(read_delta(folder).plan.units):
        if u.indices is not None:
            size = math.ceil(u.indices.numel() * index_bits(u.numel) / 8)
            out.append((i, u.target, u.numel, u.indices.numel(), offset, size))
            offset += size
    return out


def _edit_group(folder, fn):
    t = load_file(str(folder / TENSORS_FILE))
    t["sparse_indices.uint8"] = fn(t["sparse_indices.uint8"].clone())
    save_file(t, str(folder / TENSORS_FILE))


def test_the_group_holds_exactly_the_packed_indices(saved):
    raw = load_file(str(saved / TENSORS_FILE))
    assert json.loads((saved / META_FILE).read_text())["format_version"] == 3
    assert not [k for k in raw if k.startswith("sparse_indices.") and k != "sparse_indices.uint8"]
    plan = read_delta(saved).plan
    want = torch.cat([pack_uints(plan.units[i].indices, index_bits(n)) for i, _, n, _, _, _ in _sparse_units(saved)])
    assert torch.equal(raw["sparse_indices.uint8"], want)


@pytest.mark.parametrize("change", [-1, 1])
def test_a_truncated_or_padded_packed_group_is_refused(saved, change):
    _edit_group(saved, lambda g: g[:-1] if change < 0 else torch.cat([g, torch.zeros(1, dtype=torch.uint8)]))
    with pytest.raises(DeltaError, match=r"'sparse_indices\.uint8' holds \[\d+\] values, the plan needs"):
        read_delta(saved)


@pytest.mark.parametrize("target", ["pos_embed", "blocks.1.mlp.fc1.weight"])
def test_a_tampered_index_past_numel_is_refused(saved, target):
    i, _, numel, nnz, offset, size = next(s for s in _sparse_units(saved) if s[1] == target)
    bits = index_bits(numel)
    assert 2 ** bits > numel  # the width has room for a value past the end: the reader must check

    def bad(group):
        idx = unpack_uints(group[offset:offset + size], bits, nnz)
        idx[-1] = numel
        group[offset:offset + size] = pack_uints(idx, bits)
        return group
    _edit_group(saved, bad)
    with pytest.raises(DeltaError, match=rf"sparse unit {i} \({target}\): packed index {numel} is out of range"):
        read_delta(saved)


def test_nonzero_padding_bits_are_refused(saved):
    i, target, numel, nnz, offset, size = next(s for s in _sparse_units(saved) if s[1] == "pos_embed")
    used = nnz * index_bits(numel) % 8
    assert used  # 3 indices of 10 bits: 2 spare bits in the last byte

    def bad(group):
        group[offset + size - 1] |= 0x80
        return group
    _edit_group(saved, bad)
    with pytest.raises(DeltaError, match=rf"sparse unit {i} \({target}\).*padding bits"):
        read_delta(saved)


def test_formats_2_and_3_read_back_the_same_delta(tmp_path):
    model = tuned_vit("spt")
    a = read_delta(save_delta(model, tmp_path / "v2", format_version=2))
    b = read_delta(save_delta(model, tmp_path / "v3"))
    assert (a.meta["format_version"], b.meta["format_version"]) == (2, 3)
    assert a.tensors.keys() == b.tensors.keys() and a.meta["tensors"] == b.meta["tensors"]
    for k in a.tensors:
        assert a.tensors[k].dtype == b.tensors[k].dtype and torch.equal(a.tensors[k], b.tensors[k]), k
    with torch.no_grad():
        assert torch.equal(load_delta(vit(0), a)(images()), load_delta(vit(0), b)(images()))
    with pytest.raises(ValueError, match="format_version=1"):
        save_delta(model, tmp_path / "v1", format_version=1)


@pytest.mark.parametrize("method,budget", [("gps", None), ("topk-sparse", "2%")])
def test_sparse_bytes_on_disk_are_the_minimum_plus_header_and_json(method, budget, tmp_path):
    """The safetensors payload is the tensors' minimum (values + index bits) up to one byte per unit."""
    model = vit(0)
    g = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    plan = make_plan(model, scores, method, budget=budget, **({"K": 1} if method == "gps" else {}))
    apply_plan(model, plan)
    folder = save_delta(model, tmp_path / "d")
    sparse = [u for u in plan.units if u.indices is not None]
    assert sparse and not quantised_params(plan)
    index_minimum = math.ceil(sum(u.indices.numel() * index_bits(u.numel) for u in sparse) / 8)
    minimum = 4 * plan.num_trainable(include_head=True) + index_minimum  # every value float32
    st = read_delta(folder).storage
    assert st["minimum_bytes"] == minimum
    file = folder / TENSORS_FILE
    header = 8 + struct.unpack("<Q", file.read_bytes()[:8])[0]  # safetensors: u64 length + JSON header
    payload = file.stat().st_size - header
    assert 0 <= payload - minimum < len(sparse), (payload, minimum)
    assert st["on_disk_bytes"] == payload + header + (folder / META_FILE).stat().st_size
    assert st["on_disk_bytes"] - minimum < len(sparse) + 1024 + 4096


def test_a_negative_count_is_refused():
    with pytest.raises(ValueError, match="count must be >= 0"):
        unpack_uints(torch.zeros(0, dtype=torch.uint8), 5, -1)
