"""VG-BERT's contrastive losses under DDP use the negatives of all ranks: 2 CPU processes (gloo), each holding half of a
global batch, give the loss of 1 process holding the whole batch, and DDP's averaged gradient equals that process's
gradient (the all-gather carries the gradient back)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.models.test_vg_bert import _encoder
from vl.heads.vg_bert import GroundingContrastive, TransferRetrieval

B = 6  # global batch


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    mask = torch.ones(B, 9, dtype=torch.long)
    for i in range(B):
        mask[i, 3 + i % 6 :] = 0
    return {
        "pixel_values": torch.randn(B, 3, 64, 64, generator=g),
        "input_ids": torch.randint(1000, 3000, (B, 9), generator=g),
        "attention_mask": mask,
    }


def _loss_and_grad(stage: str, batch: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    enc = _encoder(stage).train()
    torch.manual_seed(1)
    head = GroundingContrastive() if stage == "grounding" else TransferRetrieval(hidden_size=16, dropout=0.0)
    head.train()
    loss = head(enc(batch), batch).loss
    loss.backward()
    param = enc.visual.embedder.weight if stage == "grounding" else head.image_projection_head[0].weight
    return float(loss), param.grad.detach().clone()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    half = B // world
    results = {}
    for stage in ("grounding", "transfer"):
        batch = {k: v[rank * half : (rank + 1) * half] for k, v in _batch().items()}
        loss, grad = _loss_and_grad(stage, batch)
        dist.all_reduce(grad)  # what DDP does: the mean of the ranks' gradients
        results[stage] = (loss, grad / world)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # spawns 2 processes (~10-20 s)
def test_two_process_all_gather_loss_equals_one_process_global_batch(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for stage in ("grounding", "transfer"):
        ref_loss, ref_grad = _loss_and_grad(stage, _batch())
        for rank in (0, 1):
            loss, grad = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)[stage]
            assert loss == pytest.approx(ref_loss, rel=1e-5), (stage, rank)
            assert torch.allclose(grad, ref_grad, atol=1e-5 * float(ref_grad.abs().max()), rtol=1e-4), (stage, rank)
