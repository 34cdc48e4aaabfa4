"""The divergence guard's gradient check (`vl.models.reliable`): large embedding tables checked by their looked-up rows
give the same verdict as reading the whole gradient, and fall back to the whole gradient whenever that shortcut is not
proven (a tied decoder, a backward pass the guard did not see, a gradient present before the window). The check itself
(`all_finite`) is "every value is finite" (`torch.isfinite`) and leaves the values as they were; half-precision
gradients and large finite gradients (whose norm would overflow) do not stop a run."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from vl.errors import TrainingDiverged
from vl.models.reliable import LOOKUP_ROWS_MIN, LookupRows, ReliableTraining, all_finite

VOCAB, DIM = 4096, 32  # 131k values: above LOOKUP_ROWS_MIN


def _table() -> nn.Embedding:
    torch.manual_seed(0)
    emb = nn.Embedding(VOCAB, DIM)
    assert emb.weight.numel() >= LOOKUP_ROWS_MIN
    return emb


def _rows_verdict(rows: LookupRows, weight: nn.Parameter) -> bool | None:
    """Finite by the looked-up rows (None: the table is not checked by rows this window)."""
    checked = rows.checked_rows().get(id(weight))
    if checked is None:
        return None
    return all(bool(torch.isfinite(r).all()) for r in checked)


def test_lookup_rows_hold_every_nonzero_gradient_value_and_match_the_full_check_under_injected_faults() -> None:
    emb = _table()
    rows = LookupRows([emb.weight])
    gen = torch.Generator().manual_seed(1)
    for trial in range(40):
        emb.weight.grad = None
        rows.reset()
        ids = torch.randint(0, 50 if trial % 2 else VOCAB, (6, 9), generator=gen)  # few distinct ids: repeats
        out = emb(ids)
        fault = trial % 4  # 0 none, 1 NaN, 2 inf, 3 finite values whose sum over repeated ids overflows
        if fault:
            b, t = int(torch.randint(0, 6, (1,), generator=gen)), int(torch.randint(0, 9, (1,), generator=gen))

            def inject(grad: torch.Tensor, b: int = b, t: int = t, fault: int = fault) -> torch.Tensor:
                grad = grad.clone()
                if fault == 3:
                    grad[:, :, 0] = 3e38  # finite; repeated ids sum past float32's max
                else:
                    grad[b, t, int(torch.randint(0, DIM, (1,), generator=gen))] = (
                        float("nan") if fault == 1 else float("inf")
                    )
                return grad

            out.register_hook(inject)
        loss = (out * torch.randn(out.shape, generator=gen)).sum()
        rows.note_backward(loss)
        loss.backward()
        grad = emb.weight.grad
        untouched = torch.ones(VOCAB, dtype=torch.bool)
        untouched[ids.unique()] = False
        assert not grad[untouched].any()  # the premise: every other row is exactly zero
        full = bool(torch.isfinite(grad).all())
        assert _rows_verdict(rows, emb.weight) == full, trial
        if fault:
            assert not full, trial
    rows.remove()


def test_a_tied_decoder_makes_the_table_checked_in_full() -> None:
    emb = _table()
    rows = LookupRows([emb.weight])
    ids = torch.randint(0, VOCAB, (4, 5))
    h = emb(ids)
    logits = F.linear(h, emb.weight)  # the MLM decoder tied to the word embeddings (vl.heads.mlm)
    loss = logits.logsumexp(-1).sum()
    rows.note_backward(loss)
    loss.backward()
    assert _rows_verdict(rows, emb.weight) is None
    rows.remove()


def test_a_backward_pass_the_guard_did_not_see_makes_the_table_checked_in_full() -> None:
    emb = _table()
    rows = LookupRows([emb.weight])
    ids = torch.randint(0, VOCAB, (4, 5))
    seen = emb(ids).sum()
    rows.note_backward(seen)
    seen.backward()
    emb(torch.randint(0, VOCAB, (4, 5))).sum().backward()  # e.g. an auxiliary loss's own backward
    assert _rows_verdict(rows, emb.weight) is None
    rows.remove()


def test_a_gradient_present_before_the_window_makes_the_table_checked_in_full() -> None:
    emb = _table()
    rows = LookupRows([emb.weight])
    emb.weight.grad = torch.zeros_like(emb.weight)
    emb.weight.grad[VOCAB - 1, 0] = float("nan")  # e.g. restored from a checkpoint, in a row no lookup reads
    loss = emb(torch.zeros(3, 2, dtype=torch.long)).sum()
    rows.note_backward(loss)
    loss.backward()
    assert _rows_verdict(rows, emb.weight) is None
    rows.remove()


def test_an_accumulation_window_checks_the_rows_of_every_micro_batch() -> None:
    emb = _table()
    rows = LookupRows([emb.weight])
    first, second = torch.tensor([[1, 2]]), torch.tensor([[3, 4]])
    loss = emb(first).sum()
    rows.note_backward(loss)
    loss.backward()
    out = emb(second)
    out.register_hook(lambda g: torch.full_like(g, float("nan")))
    loss = out.sum()
    rows.note_backward(loss)
    loss.backward()
    checked = rows.checked_rows()[id(emb.weight)]
    assert len(checked) == 2 and bool(torch.isfinite(checked[0]).all()) and not bool(torch.isfinite(checked[1]).all())
    rows.remove()


class _Toy(ReliableTraining):
    """A word-embedding table (looked up), a linear layer and an optional fault in the lookup's upstream gradient."""

    def __init__(self, *, nan_at_batch: int | None = None, scale: float = 1.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.out = nn.Linear(DIM, 1)
        self.nan_at_batch, self.scale = nan_at_batch, scale

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        h = self.emb(batch)
        if batch_idx == self.nan_at_batch:
            h.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("nan")))
        loss = self.out(h).float().mean() * self.scale
        self._terms = {"toy": loss.detach()}
        self._pending_terms.append((self.current_epoch, batch_idx, self._terms))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.randint(0, VOCAB, (32, 7)), batch_size=4)


def _fit(model: L.LightningModule, **kwargs) -> L.Trainer:
    kwargs.setdefault("max_steps", 6)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(model)
    return trainer


def test_a_nan_reaching_the_word_embeddings_through_a_lookup_stops_the_run_naming_the_table() -> None:
    torch.manual_seed(0)
    model = _Toy(nan_at_batch=3)
    with pytest.raises(
        TrainingDiverged, match=r"optimizer step 4: non-finite gradient in 1 parameter\(s\) \(e\.g\. emb"
    ):
        _fit(model)
    assert model._lookups is not None and id(model.emb.weight) in model._lookups.tables  # checked by rows


def test_with_gradient_accumulation_a_nan_from_the_windows_first_micro_batch_stops_the_run(monkeypatch) -> None:
    """Micro-batches 4 and 5 make optimizer step 3; the NaN reaches rows of micro-batch 4 only, and the table is
    checked by the rows of both micro-batches."""
    checked: list[int] = []
    original = LookupRows.checked_rows

    def record(self: LookupRows) -> dict:
        out = original(self)
        checked.extend(len(v) for v in out.values())
        return out

    monkeypatch.setattr(LookupRows, "checked_rows", record)
    torch.manual_seed(0)
    model = _Toy(nan_at_batch=4)
    with pytest.raises(
        TrainingDiverged, match=r"optimizer step 3: non-finite gradient in 1 parameter\(s\) \(e\.g\. emb"
    ):
        _fit(model, accumulate_grad_batches=2)
    assert checked == [2, 2, 2], checked  # steps 1-3, each by the rows of its two micro-batches


def test_all_finite_is_isfinite_over_every_value_and_changes_none() -> None:
    """Random lists of mixed dtypes and shapes (0-dim, empty, non-contiguous, sparse), with NaN / +inf / -inf injected at
    random places or not, against `torch.isfinite` per tensor; every tensor keeps its exact bits (the check runs in
    place at scale 1); values near each dtype's largest finite value are finite."""
    gen = torch.Generator().manual_seed(0)
    flags: dict = {}
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    for trial in range(200):
        tensors = []
        for _ in range(int(torch.randint(1, 6, (1,), generator=gen))):
            dtype = dtypes[int(torch.randint(0, 4, (1,), generator=gen))]
            shape = [(), (0,), (7,), (3, 5)][int(torch.randint(0, 4, (1,), generator=gen))]
            t = (torch.randn(shape, generator=gen) * 10).to(dtype)
            if t.numel() and trial % 5 == 0:
                t.view(-1)[0] = torch.finfo(dtype).max  # finite, whose square overflows
            if t.numel() and torch.rand((), generator=gen) < 0.15:
                bad = (float("nan"), float("inf"), float("-inf"))[int(torch.randint(0, 3, (1,), generator=gen))]
                t.view(-1)[int(torch.randint(0, t.numel(), (1,), generator=gen))] = bad
            if t.dim() == 2 and trial % 3 == 0:
                t = t.t()  # non-contiguous
            tensors.append(t)
        if trial % 7 == 0:
            values = torch.randn(3, generator=gen)
            if trial % 2:
                values[1] = float("nan")
            tensors.append(torch.sparse_coo_tensor(torch.tensor([[0, 2, 5]]), values, (8,)))
        expected = all(bool(torch.isfinite(t.coalesce().values() if t.is_sparse else t).all()) for t in tensors)
        before = [t.clone() for t in tensors]
        assert all_finite(tensors, flags) is expected, trial
        bits = {
            torch.float32: torch.int32,
            torch.float64: torch.int64,
            torch.float16: torch.int16,
            torch.bfloat16: torch.int16,
        }
        for a, b in zip(tensors, before):
            a, b = (a.to_dense(), b.to_dense()) if a.is_sparse else (a, b)
            assert torch.equal(a.view(bits[a.dtype]), b.view(bits[b.dtype])), trial
    assert all_finite([], flags) is True


def test_large_finite_gradients_do_not_stop_the_run() -> None:
    """A float32 gradient of ~1e25 (its square, 1e50, overflows float32) is finite: the run goes on."""
    torch.manual_seed(0)
    model = _Toy(scale=1e25)
    trainer = _fit(model, max_steps=1)
    assert trainer.global_step == 1
    assert torch.isfinite(model.out.weight).all()


def test_finite_half_precision_gradients_whose_norm_exceeds_fp16_do_not_stop_the_run() -> None:
    """fp16 weights without a GradScaler: gradients of ~1e5 in norm (over fp16's 65504) are finite values."""
    torch.manual_seed(0)
    model = _Toy(scale=3e4)
    trainer = _fit(model, precision="16-true", max_steps=2)
    assert trainer.global_step == 2
    assert model.emb.weight.dtype == torch.float16 and torch.isfinite(model.emb.weight).all()
