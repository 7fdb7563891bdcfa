"""sensitune.io: the integer widths of stored flat indices."""
import pytest
import torch

from sensitune.io import index_bits, index_dtype


def _bits_by_search(numel: int) -> int:
    """The smallest b >= 1 with 2**b >= numel: every index 0..numel-1 fits in b bits."""
    b = 1
    while 2**b < numel:
        b += 1
    return b


@pytest.mark.parametrize("numel", [1, 2, 3, 4, 5, 255, 256, 257, 2**31, 2**31 + 1, 2**48, 2**48 + 1, 2**49 + 1,
                                   2**53 + 1, 2**62 + 1])
def test_index_bits_is_exact_for_every_size(numel):
    assert index_bits(numel) == _bits_by_search(numel)  # a float log2 says 49 for 2**49 + 1


@pytest.mark.parametrize("numel,dtype", [(1, torch.uint8), (256, torch.uint8), (257, torch.int16),
                                         (2**15 + 1, torch.int32), (2**31, torch.int32), (2**31 + 1, torch.int64)])
def test_index_dtype_holds_the_largest_index(numel, dtype):
    assert index_dtype(numel) == dtype


@pytest.mark.parametrize("fn", [index_bits, index_dtype])
def test_an_empty_tensor_has_no_index_width(fn):
    with pytest.raises(ValueError, match="numel must be >= 1"):
        fn(0)
