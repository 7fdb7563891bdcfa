"""Bit-packing throughput: sensitune's vectorised pack/unpack vs a plain Python byte loop.

Both sides run in the same process on the same random codes. The count defaults to the number
of weights of Bi-LoRA r=32 on ViT-B/16 (q and v of 12 blocks: 48 matrices of 32·768), i.e. one
task's worth of codes. Throughput is MB of *codes* (one uint8 per code, 1 MB = 10^6 B) per
second. The Python loop gets its best case: codes as a Python list, output a bytearray.
"vectorised" is the public pack_bits/unpack_bits (numpy on CPU); "torch ops" is the path used
for tensors on other devices, timed here on CPU for comparison. 8 bits is a plain copy.

    .venv/bin/python benchmarks/bench_packing.py [--count N] [--repeats R]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from sensitune.tuners import packing
from sensitune.tuners.packing import pack_bits, unpack_bits


def loop_pack(codes: list[int], bits: int) -> bytearray:
    per = 8 // bits
    out = bytearray((len(codes) * bits + 7) // 8)
    for i in range(len(out)):
        byte = 0
        for j in range(per):
            k = i * per + j
            if k < len(codes):
                byte |= codes[k] << (bits * j)
        out[i] = byte
    return out


def loop_unpack(packed: bytearray, bits: int, count: int) -> list[int]:
    per, mask = 8 // bits, (1 << bits) - 1
    codes = []
    for byte in packed:
        for j in range(per):
            codes.append((byte >> (bits * j)) & mask)
    return codes[:count]


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=48 * 32 * 768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-repeats", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    mb = args.count / 1e6
    print(f"# {args.count} codes, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print("| bits | packed bytes | pack vectorised MB/s | pack torch ops MB/s | pack Python loop MB/s "
          "| pack speed-up vs loop | unpack vectorised MB/s | unpack torch ops MB/s | unpack Python loop MB/s "
          "| unpack speed-up vs loop |")
    print("|---" * 10 + "|")
    for bits in (1, 2, 4, 8):
        codes = torch.randint(0, 2**bits, (args.count,), dtype=torch.uint8)
        as_list = codes.tolist()
        packed = pack_bits(codes, bits)
        loop_packed = loop_pack(as_list, bits)
        assert bytes(loop_packed) == packed.numpy().tobytes(), "loop and vectorised layouts differ"
        assert loop_unpack(loop_packed, bits, args.count) == as_list
        assert torch.equal(unpack_bits(packed, bits, args.count), codes)
        t_pack = best_of(lambda: pack_bits(codes, bits), args.repeats)
        t_unpack = best_of(lambda: unpack_bits(packed, bits, args.count), args.repeats)
        padded = torch.cat([codes, codes.new_zeros((-args.count) % (8 // bits))])
        t_tpack = best_of(lambda: packing._pack_torch(padded, bits), args.repeats) if bits < 8 else t_pack
        t_tunpack = best_of(lambda: packing._unpack_torch(packed, bits, args.count), args.repeats) if bits < 8 else t_unpack
        t_lpack = best_of(lambda: loop_pack(as_list, bits), args.loop_repeats)
        t_lunpack = best_of(lambda: loop_unpack(loop_packed, bits, args.count), args.loop_repeats)
        print(f"| {bits} | {packed.numel():,} | {mb / t_pack:,.0f} | {mb / t_tpack:,.0f} | {mb / t_lpack:,.1f} "
              f"| {t_lpack / t_pack:,.0f}× | {mb / t_unpack:,.0f} | {mb / t_tunpack:,.0f} | {mb / t_lunpack:,.1f} "
              f"| {t_lunpack / t_unpack:,.0f}× |")
    np_codes = np.random.default_rng(0).integers(0, 2, args.count).astype(np.uint8)
    t_np = best_of(lambda: np.packbits(np_codes, bitorder="little"), args.repeats)
    t_ours = best_of(lambda: pack_bits(torch.from_numpy(np_codes), 1), args.repeats)
    print(f"\n1-bit pack, numpy.packbits for scale: {mb / t_np:,.0f} MB/s (ours {mb / t_ours:,.0f} MB/s)")


if __name__ == "__main__":
    main()
