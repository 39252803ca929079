"""ramblock.nonzero_pages: the zero-page test of the send path, against a plain full scan."""
from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from livemig.ramblock import nonzero_pages


@given(st.lists(st.tuples(st.integers(0, 511), st.integers(0, 2**64 - 1)), max_size=40),
       st.integers(1, 16))
def test_same_answer_as_a_full_scan(writes, npages):
    pages = np.zeros((npages, 512), dtype=np.uint64)
    for i, (word, value) in enumerate(writes):
        pages[i % npages, word] = value
    idx = np.arange(npages)
    assert np.array_equal(nonzero_pages(pages, idx), pages.max(axis=1) != 0)
    assert np.array_equal(nonzero_pages(pages, idx[::2]), pages[::2].max(axis=1) != 0)
    a = len(writes) % npages  # a contiguous run that starts inside the block
    assert np.array_equal(nonzero_pages(pages, idx[a:]), pages[a:].max(axis=1) != 0)


def test_contiguous_batches_mostly_zero_and_mostly_used():
    """Both ways of reading a contiguous batch: in place (mostly candidates) and gathered (few)."""
    pages = np.zeros((64, 512), dtype=np.uint64)
    pages[5, 511] = 1  # nonzero, but not in its first word
    mostly_zero = nonzero_pages(pages, np.arange(64))
    pages[:, 0] = 1
    pages[[5, 9], 0] = 0
    mostly_used = nonzero_pages(pages, np.arange(64))
    assert np.flatnonzero(mostly_zero).tolist() == [5]
    assert np.flatnonzero(~mostly_used).tolist() == [9]


def test_a_page_nonzero_only_in_its_last_byte_is_nonzero():
    pages = np.zeros((3, 512), dtype=np.uint64)
    pages[1].view(np.uint8)[-1] = 1
    pages[2, 0] = 7
    assert nonzero_pages(pages, np.arange(3)).tolist() == [False, True, True]
