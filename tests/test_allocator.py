"""Where freed tensor memory goes: straight back to the system under a set budget, kept for reuse
(until the slack's trim) under the default one."""

import subprocess
import sys

import pytest
import torch

from surgeon import allocator

pytestmark = pytest.mark.skipif(allocator._libc is None, reason="glibc's allocator only")

BLOCK = 64 * 2**20


def _freed_block_still_resident() -> int:
    """RSS after a BLOCK-sized tensor is written and freed, over RSS before it was allocated."""
    before = allocator._rss()
    block = torch.ones(BLOCK // 4)
    del block
    return allocator._rss() - before


@pytest.fixture
def restore_budget():
    yield
    allocator.fit_to_budget(allocator.SLACK_BYTES * 4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS from /proc")
def test_a_set_budget_returns_freed_blocks_and_the_default_keeps_them_until_a_trim(restore_budget):
    allocator.fit_to_budget(2**30, bounded=True)
    assert _freed_block_still_resident() < BLOCK // 8

    allocator.fit_to_budget(2**30, bounded=False)
    allocator.release_free_memory(force=True)
    assert _freed_block_still_resident() > BLOCK // 2  # in the heap, for the next layer's tensors
    before = allocator._rss()
    allocator.release_free_memory(force=True)
    assert before - allocator._rss() > BLOCK // 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS from /proc")
def test_importing_surgeon_leaves_the_processs_allocator_alone():
    """glibc raises its mmap threshold to the size of a mapped block freed: a smaller block then comes
    from the heap and stays resident when freed. Had the import fixed the threshold, it would not."""
    code = ("import torch, surgeon, surgeon.cli, surgeon.api, surgeon.allocator as a\n"
            "x = torch.ones(20 * 2**18); del x\n"
            "before = a._rss(); y = torch.ones(16 * 2**18); del y\n"
            "print(a._rss() - before)")
    resident = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert resident > 8 * 2**20
