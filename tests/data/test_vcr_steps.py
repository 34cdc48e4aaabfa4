"""`data.vcr_steps=separate`: VCR Q->A and QA->R trained as the seed trains them (vilbert_beta `train_tasks.py
--tasks 1-2`), checked against an independent transcription of the seed's loop: which block each optimizer step
trains, the examples and text lengths of its batch, the optimizer steps per epoch and the warmup; accumulation / DDP
layouts; exact mid-epoch resume."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import read_losses
from vl.data.samplers import AlternatingStepSampler, EpochShuffleSampler, step_micro_batches
from vl.data.scenes import SceneSettings, generate_scenes
from vl.data.scenes.writers.vcr import write_vcr_corpus
from vl.data.vcr import VCRDataModule
from vl.errors import ConfigError
from vl.heads.base import EncoderOutput
from vl.heads.choice import VCRMultipleChoice
from vl.pipeline import train
from vl.schedules import warmup_constant_step_decay


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vcr_steps")
    settings = SceneSettings(num_images=60)
    write_vcr_corpus(root, generate_scenes(settings), settings)
    return root


# ------------------------------------------------------------------------- the seed's loop, transcribed independently
def seed_epoch(n: int, batch_size: int, orders: dict[str, list[int]]) -> list[tuple[str, list[int]]]:
    """One epoch of vilbert_beta `train_tasks.py` with `--tasks 1-2`, one process, gradient_accumulation_steps 1:
    the (task, question indices) of every optimizer step. `orders`: each task's RandomSampler permutation this epoch
    (the seed draws them from the global RNG; the caller passes the ones under test).

    LoadDatasets: task_num_iters[task] = len(DataLoader(batch_size, no drop_last)) = ceil(n / batch_size);
    main loop: for step in range(max(task_num_iters)): for task_id in task_ids: ForwardModelsTrain (the next batch of
    that task's loader, a fresh iterator when task_count % len == 0), loss.backward(), optimizer.step()."""
    num_iters = {task: math.ceil(n / batch_size) for task in orders}
    count = dict.fromkeys(orders, 0)
    steps = []
    for _step in range(max(num_iters.values())):
        for task in ("TASK1", "TASK2"):  # VCR_Q-A, VCR_QA-R, in the order `--tasks 1-2` lists them
            i = count[task] % num_iters[task]
            count[task] += 1
            steps.append((task, orders[task][i * batch_size : (i + 1) * batch_size]))
    return steps


def seed_lr_factors(iters_per_epoch: int, epochs: int, warmup: float = 0.1, decay=(12, 16)) -> list[float]:
    """lr / base lr of every optimizer step in the seed: BertAdam(warmup=0.1, t_total=num_train_optimization_steps =
    max(task_num_iters) x epochs, schedule warmup_constant) reads get_lr(state['step']) before incrementing it, once
    per optimizer.step() (two per iteration), and LambdaLR x0.1 per reached decay epoch, stepped after each epoch."""
    t_total = iters_per_epoch * epochs
    factors, step = [], 0
    for epoch in range(epochs):
        decayed = 0.1 ** sum(epoch >= m for m in decay)
        for _ in range(iters_per_epoch):
            for _task in ("TASK1", "TASK2"):
                progress = step / t_total
                factors.append(decayed * (progress / warmup if progress < warmup else 1.0))
                step += 1
    return factors


TASK_BLOCK = {"TASK1": 0, "TASK2": 1}


def _loader_steps(loader) -> list[tuple[int, list[int], dict]]:
    return [(int(b["vcr_block"][0]), b["index"].tolist(), b) for b in loader]


# ------------------------------------------------------------------------------------------------ fast checks
def test_training_steps_follow_the_seeds_loop(root: Path) -> None:
    dm = VCRDataModule(root=str(root), batch_size=4, max_text_len=40, qa_text_len=12)
    loader = dm.train_dataloader()
    questions = dm.datasets["train"]
    n = len(questions)
    assert n % 4  # the last batch of each task is smaller, as the seed's (no drop_last)
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        orders = loader.sampler.block_orders(epoch)
        got = _loader_steps(loader)
        want = seed_epoch(n, 4, {"TASK1": orders[0], "TASK2": orders[1]})
        assert [(block, idx) for block, idx, _ in got] == [(TASK_BLOCK[t], idx) for t, idx in want]
        assert len(loader) == len(got) == 2 * math.ceil(n / 4)  # optimizer steps per epoch (accumulation 1)
        # two shuffles of every question, block 0's being EpochShuffleSampler's order (joint mode's)
        assert sorted(orders[0]) == sorted(orders[1]) == list(range(n)) and orders[0] != orders[1]
        # the loader's seed is global_seed(): PL_GLOBAL_SEED when an earlier test in the process set it
        plain = EpochShuffleSampler(questions, num_replicas=1, rank=0, seed=loader.sampler.seed)
        plain.set_epoch(epoch)
        assert [i for _, i in plain] == orders[0]
        for block, idx, batch in got:
            assert batch["mc_labels"].shape == (len(idx), 1) and batch["input_ids"].shape[0] == 4 * len(idx)
            rows = [questions[(epoch, i)] for i in idx]
            full = dm.collator("train")
            full.max_text_len = 12 if block == 0 else 40
            both = full(rows)  # the 2-block rows, cut to this block's text length
            keep = torch.tensor([8 * e + 4 * block + c for e in range(len(idx)) for c in range(4)])
            width = batch["input_ids"].shape[1]
            assert torch.equal(batch["input_ids"], both["input_ids"][keep][:, :width])
            assert batch["mc_labels"][:, 0].tolist() == [r["mc_labels"][block] for r in rows]
            assert width == 12 if block == 0 else 12 < width <= 40  # Q->A rows are cut at qa_text_len
    assert orders != AlternatingStepSampler(questions, num_replicas=1, rank=0, seed=0, micro_batch=4).block_orders(0)


def test_one_block_examples(root: Path) -> None:
    dm = VCRDataModule(root=str(root))
    dm.setup("fit")
    questions = dm.datasets["train"]
    rec = questions.records[3]
    both = questions[(2, 3)]
    for block in (0, 1):
        ex = questions.block_example(2, 3, block)
        assert ex["choices"] == both["choices"][4 * block : 4 * block + 4]
        assert ex["mc_labels"] == [rec["answer_label"] if block == 0 else rec["rationale_label"]]
        assert ex["vcr_block"] == block and ex["epoch"] == 2 and ex["index"] == 3 and ex["annot_id"] == rec["annot_id"]


def test_warmup_counts_the_seeds_iterations() -> None:
    """vl's schedule with `steps_per_iteration=2` (what the system passes under vcr_steps=separate) equals the seed's
    lr step for step: its t_total counts iterations, its BertAdam optimizer steps (two per iteration)."""
    iters, epochs = 7, 20
    total = 2 * iters * epochs
    param = torch.nn.Parameter(torch.zeros(1))
    sched = warmup_constant_step_decay(
        torch.optim.SGD([param], lr=1.0),
        total_steps=total,
        steps_per_epoch=2 * iters,
        warmup_ratio=0.1,
        decay_epochs=[12, 16],
        bert_adam=True,
        steps_per_iteration=2,
    )
    got = [sched.lr_lambdas[0](s) for s in range(total)]
    want = seed_lr_factors(iters, epochs)
    assert got == pytest.approx(want, abs=1e-12)
    assert sum(0 < f < 1 for f in want[: 2 * iters * 12]) == int(0.1 * iters * epochs) - 1  # warmup: 14 steps, not 28


def test_accumulation_and_ranks_keep_each_step_one_block(root: Path) -> None:
    """2 processes x micro-batch 2 x accumulation 2: every accumulation window is one block, and the ranks' shares of
    step s together are the seed's batch s (global batch 8) of that block's order (padded as DistributedSampler)."""
    dm = VCRDataModule(root=str(root))
    dm.setup("fit")
    questions = dm.datasets["train"]
    n = len(questions)
    samplers = [
        AlternatingStepSampler(questions, num_replicas=2, rank=r, seed=5, micro_batch=2, accumulation=2) for r in (0, 1)
    ]
    for s in samplers:
        s.set_epoch(3)
    keys = [list(s) for s in samplers]
    assert len(keys[0]) == len(keys[1]) == len(samplers[0]) == 2 * 2 * len(samplers[0].steps)
    generator = torch.Generator().manual_seed(5 + 3)
    padded = []
    for _ in range(2):
        order = torch.randperm(n, generator=generator).tolist()
        padded.append((order + order)[: 2 * math.ceil(n / 2)])
    taken = [0, 0]
    for w in range(0, len(keys[0]), 2):
        windows = [k[w : w + 2] for k in keys]
        blocks = {key[1] for window in windows for key in window}
        assert blocks == {(w // 2) % 2}, w  # Q->A, QA->R, Q->A, ...
        block = blocks.pop()
        step = sorted(i for window in windows for key in window for i in key[2])
        size = len(step)
        assert step == sorted(padded[block][taken[block] : taken[block] + size])
        taken[block] += size
    assert taken == [len(padded[0]), len(padded[1])]


def test_step_micro_batches() -> None:
    assert step_micro_batches(10, 4, 1) == [[4], [4], [2]]
    assert step_micro_batches(21, 2, 2) == [[2, 2]] * 4 + [[3, 2]]  # 1 left over < 2 micro-batches: joined
    assert step_micro_batches(22, 2, 2) == [[2, 2]] * 5 + [[1, 1]]
    assert step_micro_batches(18, 2, 4) == [[2, 2, 2, 2], [3, 3, 2, 2]]  # 2 left over < 4 micro-batches: joined
    assert step_micro_batches(4, 16, 4) == [[1, 1, 1, 1]]
    with pytest.raises(ValueError, match="3 examples cannot fill the 4 micro-batches"):
        step_micro_batches(3, 16, 4)


def test_bad_settings_fail_in_one_line(root: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data.vcr_steps='both': choose 'separate' \(the seed's\) or 'joint'$"):
        VCRDataModule(root=str(root), vcr_steps="both")
    with pytest.raises(ConfigError, match=r"^data.qa_text_len=2:"):
        VCRDataModule(root=str(root), qa_text_len=2)
    dm = VCRDataModule(root=str(root), batch_size=4096, batch_size_per_device=1)
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0, accumulate_grad_batches=4096, current_epoch=0)
    with pytest.raises(ConfigError, match=r"^data.vcr_steps=separate: \d+ training questions over 1 process.*"):
        dm.train_dataloader()
    dm = VCRDataModule(root=str(root), batch_size=4)
    dm.trainer = SimpleNamespace(
        world_size=1, global_rank=0, accumulate_grad_batches=1, current_epoch=0, overfit_batches=2
    )
    with pytest.raises(
        ConfigError, match=r"^trainer.overfit_batches=2 with data.vcr_steps=separate: .*vcr_steps=joint"
    ):
        dm.train_dataloader()


def test_loader_position_resumes_only_into_the_same_layout(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The separate-steps loader's saved position (micro-batches of one epoch) restores mid-epoch into the same layout
    and restarts the epoch, with a warning, in a joint-steps loader or under another accumulation."""
    dm = VCRDataModule(root=str(root), batch_size=4)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 5, "batch_size": 4, "num_replicas": 1, "accumulation": 1, "blocks": 2}
    rest = [b["index"].tolist() for b in it]

    again = VCRDataModule(root=str(root), batch_size=4).train_dataloader()
    again.sampler.set_epoch(1)
    again.load_state_dict(state)
    assert [b["index"].tolist() for b in again] == rest
    accumulating = VCRDataModule(root=str(root), batch_size=8, batch_size_per_device=4)
    accumulating.trainer = SimpleNamespace(world_size=1, global_rank=0, accumulate_grad_batches=2, current_epoch=1)
    for other in (
        VCRDataModule(root=str(root), batch_size=4, vcr_steps="joint").train_dataloader(),
        accumulating.train_dataloader(),
    ):
        other.sampler.set_epoch(1)
        with caplog.at_level("WARNING"):
            other.load_state_dict(state)
        assert "epoch 1 restarts at its first batch" in caplog.text and other._resume is None
        caplog.clear()


@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluation_reads_q_to_a_rows_at_qa_text_len(root: Path, split: str) -> None:
    """As vilbert_beta evaluates each task at its own length (TASK1 Q->A 60, TASK2 QA->R 80): under `separate` with
    `qa_text_len`, every Q->A row of a val / test batch is the tokenizer's call on (question, answer) alone at
    `qa_text_len`, every QA->R row at `max_text_len` (here 8 and 40, so Q->A rows are cut); `joint` reads all at
    `max_text_len`."""
    from vl.data.formats.vcr import NUM_CHOICES

    for steps, qa_len in (("separate", 8), ("joint", None)):
        dm = VCRDataModule(root=str(root), batch_size=4, max_text_len=40, qa_text_len=qa_len, vcr_steps=steps)
        dm.setup("fit" if split == "val" else "test")
        data = dm.datasets[split]
        batch = next(iter(dm.val_dataloader() if split == "val" else dm.test_dataloader()))
        tok = dm.tokenizer
        rows_per_example = data.num_blocks * NUM_CHOICES
        cut = 0
        for b, index in enumerate(batch["index"].tolist()):
            for c, choice in enumerate(data[index]["choices"]):
                length = qa_len if (c < NUM_CHOICES and qa_len) else 40
                alone = tok(choice["text"], choice["text_b"], truncation=True, max_length=length)["input_ids"]
                row = batch["input_ids"][b * rows_per_example + c]
                assert row[: len(alone)].tolist() == alone and (row[len(alone) :] == tok.pad_token_id).all()
                cut += c < NUM_CHOICES and len(tok(choice["text"], choice["text_b"])["input_ids"]) > 8
        assert cut > 0 or steps == "joint"  # some Q->A rows are longer than 12 tokens: the cut is exercised


def test_joint_keeps_both_blocks_per_item(root: Path) -> None:
    dm = VCRDataModule(root=str(root), batch_size=4, vcr_steps="joint")
    loader = dm.train_dataloader()
    assert dm.steps_per_iteration == 1 and len(loader) == math.ceil(len(dm.datasets["train"]) / 4)
    batch = next(iter(loader))
    assert batch["mc_labels"].shape == (4, 2) and "vcr_block" not in batch


def test_head_trains_the_present_block_and_counts_it_alone() -> None:
    torch.manual_seed(0)
    head = VCRMultipleChoice(hidden_size=8)
    pooled = torch.randn(3 * 4, 8)
    batch = {"mc_labels": torch.tensor([[1], [3], [0]]), "vcr_block": torch.tensor([0, 1, 1])}
    result = head(EncoderOutput(text=None, visual=None, pooled=pooled), batch)
    logits = head.score(pooled).view(3, 4)
    assert result.loss.item() == pytest.approx(float(F.cross_entropy(logits, torch.tensor([1, 3, 0]))))
    assert result.target.tolist() == [[1, -1], [-1, 3], [-1, 0]]
    assert torch.equal(result.logits[0, 0], logits[0]) and torch.equal(result.logits[1, 1], logits[1])
    metrics = torch.nn.ModuleDict(head.make_metrics())
    head.update_metrics(metrics, result)
    assert int(metrics["vcr_qa_acc"].total) == 1 and int(metrics["vcr_qar_acc"].total) == 2
    assert int(metrics["vcr_q2ar_acc"].total) == 0


# ------------------------------------------------------------------------------------------------------ fits
RESUME = (
    "experiment=vcr_finetune",
    "trainer.deterministic=true",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=7",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "test=false",
    "data.batch_size=8",
    "data.batch_size_per_device=4",  # accumulation 2: micro-batches 0-1 Q->A, 2-3 QA->R, 4-5 Q->A, 6 QA->R
    "data.qa_text_len=16",
    "+model.scheduler.bert_adam=true",
    "model.scheduler.warmup_ratio=0.5",  # W = 0.5 x 8 steps / 2 per iteration = 2: lr x 0, 0.5, then 1
    "+callbacks.record._target_=tests.conftest.RecordLosses",
)


def _resume_runs(make_cfg, tmp_path: Path, *extra: str) -> tuple[Path, dict]:
    """An uninterrupted run, a run killed before epoch 1 micro-batch 5 (checkpoint after every optimizer step, so
    after micro-batch 3) and its resumption from last.ckpt -> (the straight run's dir, the recorded losses by run)."""
    straight = make_cfg(*RESUME, *extra, f"+callbacks.record.path={tmp_path}/straight", name="straight")
    train(straight)
    first = make_cfg(
        *RESUME,
        *extra,
        "+callbacks.last_checkpoint.every_n_train_steps=1",
        f"+callbacks.record.path={tmp_path}/first",
        "+callbacks.kill._target_=tests.conftest.InterruptAt",
        "+callbacks.kill.epoch=1",
        "+callbacks.kill.batch=5",
        name="first",
    )
    with pytest.raises(Exception, match="interrupted before epoch 1 batch 5"):
        train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    resumed = make_cfg(
        *RESUME, *extra, f"+callbacks.record.path={tmp_path}/resumed", f"ckpt_path={last}", name="resumed"
    )
    train(resumed)
    return Path(straight.paths.output_dir), {name: tmp_path / name for name in ("straight", "first", "resumed")}


def _assert_exact(paths: dict, rank: int = 0, tol: float = 0.0) -> None:
    """Every micro-batch loss of the killed and the resumed run equals the uninterrupted run's, each resumed
    micro-batch saw the same examples, and the final weights are equal."""
    runs = {name: read_losses(path, rank) for name, path in paths.items()}
    assert len(runs["straight"]) == 14 and sorted(runs["resumed"]) == [(1, b) for b in range(4, 7)]
    for key, loss in {**runs["first"], **runs["resumed"]}.items():
        assert loss == pytest.approx(runs["straight"][key], abs=tol, rel=tol), key
    ids = {name: _recorded_ids(paths[name], rank) for name in ("straight", "resumed")}
    assert all(ids["straight"][key] == value for key, value in ids["resumed"].items())
    a = torch.load(f"{paths['straight']}.weights.pt", weights_only=True)
    b = torch.load(f"{paths['resumed']}.weights.pt", weights_only=True)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=tol, rtol=tol)


def test_mid_epoch_resume_is_exact(make_cfg, tmp_path: Path) -> None:
    """Bit-exact on CPU, one process (accumulation 2)."""
    straight, paths = _resume_runs(make_cfg, tmp_path)
    _assert_exact(paths)
    # the system hands the schedule the datamodule's 2 steps per iteration: 8 steps (ceil(7 / 2) x 2 epochs) are 4
    # seed iterations, the warmup 0.5 x 4 = 2 steps (1 step per iteration would make it 4: 0, 0.25, 0.5, 0.75)
    lrs = _lrs(straight / "csv" / "metrics.csv")
    peak = max(lrs)
    assert [lr / peak for lr in lrs] == pytest.approx([0.0, 0.5] + [1.0] * 6)


@pytest.mark.slow  # DDP spawns
def test_mid_epoch_resume_under_ddp(make_cfg, tmp_path: Path) -> None:
    """2 spawned CPU processes x micro-batch 2, accumulation 2: every rank's micro-batch losses and the final weights
    match the uninterrupted DDP run within 1e-6 (gloo all-reduce; the ranks' step layout is checked above, in
    `test_accumulation_and_ranks_keep_each_step_one_block`)."""
    ddp = ("hardware=ddp_cpu", "data.batch_size=8", "data.batch_size_per_device=2")
    _, paths = _resume_runs(make_cfg, tmp_path, *ddp)
    for rank in (0, 1):
        _assert_exact(paths, rank=rank, tol=1e-6)


def _recorded_ids(path: Path, rank: int = 0) -> dict[tuple[int, int], str]:
    lines = Path(f"{path}.rank{rank}").read_text().splitlines()
    return {(int(e), int(b)): ids for e, b, _, ids in (line.split() for line in lines)}


def _lrs(path: Path) -> list[float]:
    """The logged lr of the first param group at each optimizer step (LearningRateMonitor may log a step twice)."""
    rows = list(csv.DictReader(path.open()))
    column = next(c for c in rows[0] if c.startswith("lr-"))
    by_step = {int(r["step"]): float(r[column]) for r in rows if r.get(column)}
    return [by_step[s] for s in sorted(by_step)]
