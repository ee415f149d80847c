"""kernels/common.py's bookkeeping against plain torch."""

import torch

from kernels.common import _sort_entries


def test_bucket_counts_equal_bincount():
    """The buckets' counts and first positions come from a binary search over the sorted keys; they equal
    torch.bincount's, empty buckets and the left-out key (``n_buckets``) included."""
    g = torch.Generator().manual_seed(0)
    for n_buckets, n in ((1, 5), (7, 100), (1000, 300), (50, 0)):
        key = torch.randint(0, n_buckets + 1, (n,), generator=g)
        sorted_key, order, counts, first = _sort_entries(key, n_buckets)
        want = torch.bincount(key, minlength=n_buckets + 1)[:n_buckets]
        assert torch.equal(counts, want) and torch.equal(first, torch.cumsum(want, 0) - want)
        assert torch.equal(sorted_key, key[order]) and torch.equal(sorted_key, key.sort().values)
