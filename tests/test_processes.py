"""hf_kd.processes in one process: without a process group it is one process of one; ``close_process_group``
destroys a group that is up (so gloo's threads do not outlive a launched script) and is a no-op without one."""

from __future__ import annotations

import torch
import torch.distributed as dist

from hf_kd.processes import close_process_group, gather_rows, rank_and_count


def test_one_process_without_a_group():
    assert not dist.is_initialized()
    assert rank_and_count() == (0, 1)
    rows = torch.arange(6.0).reshape(3, 2)
    assert gather_rows(rows) is rows
    close_process_group()  # nothing to close: no error
    assert not dist.is_initialized()


def test_close_process_group_destroys_the_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert rank_and_count() == (0, 1)
        torch.testing.assert_close(gather_rows(torch.ones(2, 3)), torch.ones(2, 3))
    finally:
        close_process_group()
    assert not dist.is_initialized()
