"""Training metrics under DDP: `VLSystem._log_train_metrics` on two real gloo processes sums every rank's states (the
epoch's accuracy over all processes' examples, checked against the counts computed here), also when one rank never
updated a metric (no hang: every rank computes every metric), and does not log a metric no rank updated."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# per rank: (predictions, targets) of head "a" (rank 1 sees none of its batches) and head "b"
HEAD_A = {0: ([1, 2, 3, 0], [1, 2, 0, 0]), 1: None}
HEAD_B = {0: ([0, 1], [0, 0]), 1: ([1, 1, 1], [1, 1, 0])}


class _Strategy:
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:  # Lightning's DDPStrategy rule
        flag = torch.tensor(int(decision))
        dist.all_reduce(flag)
        return bool(flag == dist.get_world_size()) if all else bool(flag)


def _rank(rank: int, port: int, out: str) -> None:
    from vl.metrics import Accuracy
    from vl.models.system import VLSystem

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        metrics = {"a": {"a_acc": Accuracy()}, "b": {"b_acc": Accuracy()}, "c": {"c_acc": Accuracy()}}  # c: no rank
        for head, data in (("a", HEAD_A[rank]), ("b", HEAD_B[rank])):
            if data is not None:
                metrics[head][f"{head}_acc"].update(torch.tensor(data[0]), torch.tensor(data[1]))
        logged: dict[str, float] = {}
        trainer = SimpleNamespace(world_size=2, strategy=_Strategy())
        system = SimpleNamespace(
            objectives={"a": None, "b": None, "c": None},
            metrics={"train_": metrics},
            _trainer=trainer,
            trainer=trainer,
            log=lambda key, value, **kw: logged.__setitem__(key, float(value)),
        )
        VLSystem._log_train_metrics(system)
        reset = all(m.update_count == 0 for head in metrics.values() for m in head.values())
        Path(out, f"{rank}.json").write_text(json.dumps({"logged": logged, "reset": reset}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # a two-process spawn
def test_train_metrics_are_summed_over_ranks_and_a_rank_without_updates_joins(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2, join=True)

    def accuracy(per_rank: dict) -> float:
        pairs = [(p, t) for data in per_rank.values() if data for p, t in zip(*data)]
        return sum(p == t for p, t in pairs) / len(pairs)

    want = {"train/a_acc": accuracy(HEAD_A), "train/b_acc": accuracy(HEAD_B)}  # 3/4 and 3/5: no rank's own value
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["reset"] and got["logged"].keys() == want.keys(), rank
        assert all(abs(got["logged"][k] - v) < 1e-6 for k, v in want.items()), (rank, got)
