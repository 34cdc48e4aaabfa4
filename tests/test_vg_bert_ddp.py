"""VG-BERT's contrastive losses under DDP use the negatives of all ranks: 2 CPU processes (gloo), each holding half of a
global batch, give the loss of 1 process holding the whole batch, and DDP's averaged gradient equals that process's
gradient (the all-gather carries the gradient back). The stage-3 loss too: its pair term takes the negatives of every
rank (unequal pair counts per rank), its object / relation terms are per example (the mean of the ranks' losses is
the whole batch's)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.models.test_vg_bert import _encoder
from vl.heads.vg_bert import GroundingContrastive, RelationalGrounding, TransferRetrieval

B = 6  # global batch
STAGES = ("grounding", "transfer", "relational")


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    mask = torch.ones(B, 9, dtype=torch.long)
    for i in range(B):
        mask[i, 3 + i % 6 :] = 0
    n, length = 4, 5
    token_mask = torch.zeros(B, n, length, dtype=torch.long)
    token_mask[..., :3] = 1
    relations = torch.zeros(B, n, n, dtype=torch.long)
    # 3 pairs in the first half (rank 0), 1 in the second (rank 1); classes shared across the halves
    relations[0, 0, 1], relations[1, 2, 3], relations[2, 1, 0], relations[4, 3, 1] = 1, 2, 2, 1
    return {
        "pixel_values": torch.randn(B, 3, 64, 64, generator=g),
        "input_ids": torch.randint(1000, 3000, (B, 9), generator=g),
        "attention_mask": mask,
        "object_ids": torch.randint(1000, 3000, (B, n, length), generator=g) * token_mask,
        "object_token_mask": token_mask,
        "object_mask": torch.ones(B, n, dtype=torch.long),
        "object_target": torch.randint(0, 5, (B, n), generator=g),
        "relation_target": relations,
    }


def _head(stage: str) -> torch.nn.Module:
    if stage == "grounding":
        return GroundingContrastive()
    if stage == "transfer":
        return TransferRetrieval(hidden_size=16, dropout=0.0)
    return RelationalGrounding(hidden_size=16, num_relations=3, num_object_classes=5, subspace_dim=4, dropout=0.0,
                               classifier_dropout=0.0)  # fmt: skip


def _loss_and_grad(stage: str, batch: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    enc = _encoder(stage).train()
    torch.manual_seed(1)
    head = _head(stage).train()
    loss = head(enc(batch), batch).loss
    loss.backward()
    if stage == "grounding":
        params = [enc.visual.embedder.weight]
    elif stage == "transfer":
        params = [head.image_projection_head[0].weight]
    else:
        params = [enc.visual.embedder.weight, head.relational_matrix, head.object_transform.weight]
    return float(loss.detach()), torch.cat([p.grad.detach().flatten() for p in params])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    half = B // world
    results = {}
    for stage in STAGES:
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
    for stage in STAGES:
        ref_loss, ref_grad = _loss_and_grad(stage, _batch())
        losses = []
        for rank in (0, 1):
            loss, grad = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)[stage]
            losses.append(loss)
            if stage != "relational":  # every rank computes the global loss
                assert loss == pytest.approx(ref_loss, rel=1e-5), (stage, rank)
            assert torch.allclose(grad, ref_grad, atol=1e-5 * float(ref_grad.abs().max()), rtol=1e-4), (stage, rank)
        assert sum(losses) / 2 == pytest.approx(ref_loss, rel=1e-5), stage
