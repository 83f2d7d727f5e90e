"""Sequence-parallel scan over 2 gloo processes == one process scanning the whole sequence (whole or in time chunks per rank)."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minconv_dist.ops.scan import scan
from minconv_dist.ops.scan.sequence_parallel import sequence_parallel_scan
from tests.spawned import leave

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(T, with_h0):
    gen = torch.Generator().manual_seed(T)
    a = torch.rand(2, T, 3, 4, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    b = torch.randn(2, T, 3, 4, generator=gen, dtype=torch.float64)
    h0 = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64) if with_h0 else None
    w = torch.randn(2, T, 3, 4, generator=gen, dtype=torch.float64)
    return a, b, h0, w


def _loss(h, last, w):
    return (h * w).sum() + last.square().sum()


def _worker(rank, port, cases):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        for T, splits, with_h0, method, chunk_size in cases:
            a, b, h0, w = _problem(T, with_h0)
            leaves = [t.requires_grad_() for t in (a, b, h0) if t is not None]
            h_ref, last_ref = scan(a, b, h0, method="sequential")
            g_ref = torch.autograd.grad(_loss(h_ref, last_ref, w), leaves)

            lo, hi = sum(splits[:rank]), sum(splits[: rank + 1])
            mine = [t[:, lo:hi].detach().clone().requires_grad_() for t in (a, b)]
            mine_h0 = None if h0 is None else h0.detach().clone().requires_grad_()
            h, last = sequence_parallel_scan(*mine, mine_h0, method=method, chunk_size=chunk_size)
            # the global loss: every rank's part of (h * w); the final state only on the last rank
            loss = (h * w[:, lo:hi]).sum() + (last.square().sum() if rank == WORLD - 1 else 0)
            # h0 is rank 0's alone: the other ranks do not use it and get no gradient for it
            grads = torch.autograd.grad(loss, [*mine, *([] if mine_h0 is None else [mine_h0])], allow_unused=True)

            torch.testing.assert_close(h, h_ref[:, lo:hi], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(grads[0], g_ref[0][:, lo:hi], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(grads[1], g_ref[1][:, lo:hi], rtol=1e-10, atol=1e-12)
            if mine_h0 is not None:
                assert (grads[2] is None) == (rank > 0)
                total = torch.zeros_like(mine_h0) if grads[2] is None else grads[2].clone()
                dist.all_reduce(total)
                torch.testing.assert_close(total, g_ref[2], rtol=1e-10, atol=1e-12)
    finally:
        dist.destroy_process_group()
    leave()


@pytest.mark.timeout(120)
def test_sequence_parallel_equals_single_process():
    cases = [
        (16, (8, 8), True, "sequential", None),
        (13, (6, 7), False, "doubling", None),
        (9, (1, 8), True, "doubling", None),
        (2, (1, 1), True, "sequential", None),
        (16, (7, 9), True, "doubling", 3),  # in time chunks within each rank
        (9, (1, 8), False, "sequential", 2),
    ]
    mp.spawn(_worker, args=(_free_port(), cases), nprocs=WORLD, join=True)
