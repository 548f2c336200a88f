"""DistributedDataParallel over a model with a ReversibleSegment: gradients reach DDP's reducer."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from revconvert.runtime import ReversibleCoupling, ReversibleSegment

WORLD = 2


def make_model(keep: str | None = None) -> nn.Module:
    torch.manual_seed(0)

    def residual():  # no batch norm: per-process batch statistics would differ from the full batch
        return nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.Dropout(0.0), nn.Conv2d(2, 2, 1))

    segment = ReversibleSegment([ReversibleCoupling(residual(), residual(), keep=keep) for _ in range(3)],
                                exit_activation=nn.ReLU())
    return nn.Sequential(nn.Conv2d(3, 4, 1), segment, nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 5, 5, dtype=torch.float64, generator=g), torch.randint(3, (8,), generator=g)


def _worker(rank: int, port: int, out_dir: str, keep: str | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(make_model(keep))
        x, target = batch()
        shard = slice(rank * 4, rank * 4 + 4)
        nn.functional.cross_entropy(model(x[shard]), target[shard]).backward()
        torch.save([p.grad for p in model.module.parameters()], os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("keep", [None, "spatial-convs"])
def test_ddp_gloo_averaged_gradients_equal_full_batch(tmp_path, keep):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), keep), nprocs=WORLD, join=True)
    model = make_model(keep)
    x, target = batch()
    nn.functional.cross_entropy(model(x), target).backward()
    for rank in range(WORLD):
        grads = torch.load(tmp_path / f"{rank}.pt")
        for g, p in zip(grads, model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)
