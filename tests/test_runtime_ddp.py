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


def make_model(keep: str | None = None, graphs: bool = False) -> nn.Module:
    torch.manual_seed(0)

    def residual():  # no batch norm: per-process batch statistics would differ from the full batch
        # (a random layer keeps a segment eager under cuda_graphs)
        return nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.Identity() if graphs else nn.Dropout(0.0),
                             nn.Conv2d(2, 2, 1))

    segment = ReversibleSegment([ReversibleCoupling(residual(), residual(), keep=keep) for _ in range(3)],
                                exit_activation=nn.ReLU(), cuda_graphs=graphs)
    return nn.Sequential(nn.Conv2d(3, 4, 1), segment, nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 5, 5, dtype=torch.float64, generator=g), torch.randint(3, (8,), generator=g)


def _worker(rank: int, port: int, out_dir: str, keep: str | None, graphs: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        backend = None
        if graphs:  # replayed graphs on the CPU (conftest's backend): the second step replays
            from conftest import FakeGraphBackend
            from revconvert.runtime import _graphs

            backend = _graphs.BACKENDS["cpu"] = FakeGraphBackend()
        model = nn.parallel.DistributedDataParallel(make_model(keep, graphs))
        x, target = batch()
        shard = slice(rank * 4, rank * 4 + 4)
        for _ in range(2 if graphs else 1):
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[shard]), target[shard]).backward()
        replays = 0 if backend is None else backend.replays
        torch.save([replays, *(p.grad for p in model.module.parameters())], os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize(("keep", "graphs"), [(None, False), ("spatial-convs", False), (None, True)])
def test_ddp_gloo_averaged_gradients_equal_full_batch(tmp_path, keep, graphs):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), keep, graphs), nprocs=WORLD, join=True)
    model = make_model(keep)
    x, target = batch()
    nn.functional.cross_entropy(model(x), target).backward()
    for rank in range(WORLD):
        replays, *grads = torch.load(tmp_path / f"{rank}.pt")
        assert replays == (4 if graphs else 0)  # with graphs: both steps replayed (forward, backward)
        for g, p in zip(grads, model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)
