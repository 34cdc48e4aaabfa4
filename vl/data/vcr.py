"""VCR fine-tuning: Q->A and QA->R as 4-way multiple choice over one image's regions (ViLBERT TASK1 / TASK2).

Training (`data.vcr_steps`): ``separate`` (default, the seed vilbert_beta's `train_tasks.py --tasks 1-2`) alternates
one optimizer step of Q->A and one of QA->R, each block with its own shuffle of the training questions
(`AlternatingStepSampler`), Q->A rows truncated to `data.qa_text_len`; ``joint`` (vl's earlier behaviour) trains both
blocks of every question in the same step. Validation and test always score both blocks per question (under
``separate`` the Q->A rows at `data.qa_text_len`, as the seed evaluates each task at its own length).

Files (``vl.data.formats.vcr``): ``vcr/{split}.jsonl``, the names table, per-image metadata under ``vcr/vcr1images`` and
region features keyed by ``str(image_int_id(img_id))``. With ``root=None`` the VCR files are added to the embedded scene
corpus on first use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vl.data.base import VLDataModule
from vl.data.collate import Collator, check_text_truncation
from vl.data.features import RegionReader
from vl.data.formats.vcr import (
    NUM_CHOICES,
    PERSON_NAMES,
    PERSON_NAMES_PER,
    image_int_id,
    load_metadata,
    load_names_table,
    load_vcr_jsonl,
    record_texts,
    write_vcr_submission,
)
from vl.data.region_rules import check_global_token, concat_regions
from vl.data.samplers import AlternatingStepSampler, ResumableDataLoader, global_seed, split_key
from vl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MC_BLOCKS = ["vcr_qa", "vcr_qar"]
#: `data.vcr_steps`: how training steps cover the two blocks (see the module docstring)
VCR_STEPS = ("separate", "joint")
#: between the question and the answer in a QA->R row (the tokenizer reads it as the special token, as upstream)
QA_SEP = "[SEP]"


class VCRQuestions(Dataset):
    """One example per VCR question; ``__getitem__(key)`` (an index or (epoch, index)) ->

    ``{"choices": [{"text", "text_b"}, ...], "visual": region dict (the same image for every row), "mc_labels",
    "annot_id": str, "example_id": int (position in the split file), "index", "epoch"}``.

    - labelled (``has_labels``): 8 rows, block-major: 4 Q->A rows (text = question, text_b = answer i), then 4 QA->R
      rows (text = question + " [SEP] " + gold answer, text_b = rationale i: ``[CLS] q [SEP] a [SEP] r [SEP]``,
      segment 0 up to the second [SEP], as vilbert-multi-task's ``_load_annotationsQA_R``); ``mc_labels = [answer_label,
      rationale_label]`` (a labelled record has both labels: ``load_vcr_jsonl`` refuses one without the other).
    - unlabelled (the real test split), or ``all_rationales`` (the test split of labelled data, so that its
      submission file is complete too): 4 + 16 rows: Q->A, then QA->R conditioned on answer 0, 1, 2, 3 in turn (the
      leaderboard wants all four); ``mc_labels = [-1] * 5``, or when labelled ``[answer_label] + [rationale_label if
      a == answer_label else -1 for a in 0..3]`` (metrics read the block conditioned on the gold answer).

    Person detections are named from ``names`` (``vcr_format.person_names``, fixed per annot_id; ``person_names``:
    drawn independently per person as the seed, or "distinct"; ``person_names_per`` "task": the Q->A rows and the
    QA->R rows by separate draws, as the seed's two task datasets, or "record": one naming for both)."""

    def __init__(
        self,
        records: list[dict[str, Any]],
        regions: RegionReader,
        names: list[str],
        has_labels: bool,
        all_rationales: bool = False,
    ) -> None:
        self.records = records
        self.regions = regions
        self.names = names
        self.has_labels = has_labels
        self.all_rationales = all_rationales or not has_labels
        self.gt: RegionReader | None = None  # GT-box regions merged after the detections (see `VCRDataModule`)
        self.max_regions = 10**9
        self.qa_text_len: int | None = None  # the Q->A rows' own text length (`data.qa_text_len`), None: the collator's
        self.person_names = "independent"  # `data.person_names` (`vcr_format.PERSON_NAMES`)
        self.person_names_per = "task"  # `data.person_names_per` (`vcr_format.PERSON_NAMES_PER`)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_blocks(self) -> int:
        """Blocks of 4 choices per example: 5 with every answer's QA->R block, else 2."""
        return 1 + NUM_CHOICES if self.all_rationales else 2

    def visual(self, rec: dict[str, Any]) -> dict[str, Any]:
        """The record's region dict: its detections, then (with `gt`) the GT-box regions, at most `max_regions` rows,
        the GT regions kept first (vilbert_beta's VCR loader). When the readers give `global_feature` (the data
        module's `global_token="all"`), ViLBERT's global token is the seed's merge of the two files' global features
        (`vcr_dataset.py`: each weighted by its file's box count + 1, the global row included), before any cut."""
        image_id = str(image_int_id(rec["img_id"]))
        if self.gt is None:
            return self.regions[image_id]
        dets, gt = self.regions[image_id], self.gt[image_id]
        out = concat_regions(dets, gt, self.max_regions)
        if dets.get("global_feature") is not None and gt.get("global_feature") is not None:
            n_det, n_gt = int(dets["features"].shape[0]) + 1, int(gt["features"].shape[0]) + 1
            out["global_feature"] = (dets["global_feature"] * n_det + gt["global_feature"] * n_gt) / (n_det + n_gt)
        else:
            out.pop("global_feature", None)
        return out

    def block_example(self, epoch: int, index: int, block: int) -> dict[str, Any]:
        """Training with `data.vcr_steps=separate`: block `block` of question `index` alone (0: the 4 Q->A rows,
        1: the 4 QA->R rows given the gold answer, as in the 2-block layout), ``mc_labels = [its label]``,
        ``vcr_block = block``, the other keys as ``__getitem__``'s."""
        if not self.has_labels or self.all_rationales:
            raise DataError("VCR one-block examples are for labelled training data")
        example = self[(epoch, index)]
        example["choices"] = example["choices"][block * NUM_CHOICES : (block + 1) * NUM_CHOICES]
        example["mc_labels"] = [example["mc_labels"][block]]
        example["vcr_block"] = block
        return example

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = split_key(key)
        rec = self.records[index]
        if self.person_names_per == "task":  # the Q->A rows and the QA->R rows named by separate draws, as the
            qa = record_texts(rec, self.names, self.person_names, task="Q-A")  # seed's two task datasets
            qar = record_texts(rec, self.names, self.person_names, task="QA-R")
        else:
            qa = qar = record_texts(rec, self.names, self.person_names)
        qa_len = {} if self.qa_text_len is None else {"max_text_len": self.qa_text_len}
        choices = [{"text": qa["question"], "text_b": a, **qa_len} for a in qa["answers"]]
        question, answers, rationales = qar["question"], qar["answers"], qar["rationales"]
        gold = int(rec["answer_label"]) if self.has_labels else -1
        rationale = int(rec["rationale_label"]) if self.has_labels else -1
        if self.all_rationales:
            for a in answers:
                choices += [{"text": f"{question} {QA_SEP} {a}", "text_b": r} for r in rationales]
            labels = [gold] + [rationale if a == gold else -1 for a in range(NUM_CHOICES)]
        else:
            choices += [{"text": f"{question} {QA_SEP} {answers[gold]}", "text_b": r} for r in rationales]
            labels = [gold, rationale]
        return {
            "choices": choices,
            "visual": self.visual(rec),
            "mc_labels": labels,
            "annot_id": str(rec["annot_id"]),
            "example_id": index,
            "index": index,
            "epoch": epoch,
        }


class VCRBlockBatches(Dataset):
    """The training split under `data.vcr_steps=separate`: key ``(epoch, block, indices)`` (one micro-batch of
    `AlternatingStepSampler`) -> that block's examples of those questions (``VCRQuestions.block_example``)."""

    def __init__(self, questions: VCRQuestions) -> None:
        self.questions = questions

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, key: tuple[int, int, tuple[int, ...]]) -> list[dict[str, Any]]:
        epoch, block, indices = key
        return [self.questions.block_example(epoch, index, block) for index in indices]


class BlockCollator:
    """Collates a one-block micro-batch (`vcr_steps=separate`), refusing one that mixes blocks; the Q->A rows carry
    their own text length (`data.qa_text_len`, see `VCRQuestions`), so one collator serves both blocks."""

    def __init__(self, collator: Collator) -> None:
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        blocks = {int(ex["vcr_block"]) for ex in examples}
        if len(blocks) != 1:
            raise ValueError(f"VCR micro-batch mixes blocks {sorted(blocks)}")
        return self.collator(examples)


def _expected_longest(choices: list[list[Any]], label: int) -> float:
    """Accuracy of picking the choice with the most tokens (ties broken at random, in expectation)."""
    lengths = np.asarray([len(c) for c in choices])
    best = np.flatnonzero(lengths == lengths.max())
    return float(label in best) / len(best)


class VCRDataModule(VLDataModule):
    """`data=vcr`. Files are relative to `root` with `{split}` filled from `splits`; ``images_dir`` (per-image metadata
    JSON, see ``metadata``) may be None when absent. ``gt_features``: region features at the ground-truth boxes of
    the metadata (vilbert-multi-task's ``VCR_gt_resnet101_faster_rcnn_genome.lmdb``), merged after the detections in
    every split as upstream; null (default): detections only. Every example is two blocks of 4 choices (``mc_blocks``,
    see ``VCRQuestions``). ``vcr_steps``: ``separate`` (default, the seed's) trains the blocks as two tasks, one
    optimizer step of Q->A then one of QA->R, each block with its own per-epoch shuffle (``AlternatingStepSampler``),
    2 x ceil(questions / batch_size) optimizer steps per epoch; ``joint`` (vl's earlier behaviour): both blocks of every
    question in the same step (ceil(questions / batch_size) steps). ``qa_text_len``: under ``separate``, the Q->A rows'
    text length in every split (the seed: 60, its TASK1 length, in training and evaluation; QA->R rows use
    ``max_text_len``, the seed's 80); null: ``max_text_len``. ``global_token`` (``vl.data.region_rules.GLOBAL_TOKEN``): "all"
    (default, the seed's): ViLBERT's global image token from all the image's detections (and GT boxes: see
    ``VCRQuestions.visual``), before the ``max_regions`` cut; "kept": the mean of the kept rows (vl's earlier). The
    seed's warmup counts iterations of its task loop, one step per block: ``steps_per_iteration`` (2 under
    ``separate``) tells the schedule (``vl.schedules``). ``person_names`` (``vcr_format.PERSON_NAMES``): "independent"
    (default, the seed's ``generate_random_name``): each person detection's name drawn from the whole names table, so
    two persons may share one; "distinct" (vl's earlier rule): no repeats within a record. Either is seeded by the
    annot_id (the seed's unseeded draw was fixed by its dataset cache). ``person_names_per``
    (``vcr_format.PERSON_NAMES_PER``): "task" (default, the seed's: its Q->A and QA->R task datasets each name a
    record's persons with their own draw, so the two blocks of a question may call a person differently; seeded by
    annot_id and task) or "record" (vl's earlier rule: one naming for both blocks). ``text_truncation``
    (``vl.data.collate.TEXT_TRUNCATION``): "seed" (default, the seed's ``_truncate_seq_pair``: one word piece at a
    time from the longer text, from the choice when they are as long, and the question cut in place, so a later
    choice of the same block sees the question as an earlier one cut it: ``Collator.seed_pairs``); "tokenizer": the
    tokenizer's longest-first truncation of each row alone."""

    corpus_parts = ("vcr",)

    label_keys = {
        "annot_id": ("annot_id", "str"),
        "example_id": ("example_id", "long"),
        "vcr_block": ("vcr_block", "long"),  # one-block training examples (`vcr_steps=separate`): 0 Q->A, 1 QA->R
    }

    prediction_file = "vcr_submission.csv"  # VCR leaderboard CSV, written into the run dir by `test`

    def __init__(
        self,
        *,
        jsonl: str = "vcr/{split}.jsonl",
        images_dir: str | None = "vcr/vcr1images",
        names_table: str = "vcr/unisex_names_table.csv",
        features: str = "vcr/regions.lmdb",
        gt_features: str | None = None,
        vcr_steps: str = "separate",
        qa_text_len: int | None = None,
        global_token: str = "all",
        person_names: str = "independent",
        person_names_per: str = "task",
        text_truncation: str = "seed",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.global_token = check_global_token(global_token)
        self.text_truncation = check_text_truncation(text_truncation)
        if person_names not in PERSON_NAMES:
            raise ConfigError(f"data.person_names: '{person_names}' is not one of {PERSON_NAMES}")
        self.person_names = person_names
        if person_names_per not in PERSON_NAMES_PER:
            raise ConfigError(f"data.person_names_per: '{person_names_per}' is not one of {PERSON_NAMES_PER}")
        self.person_names_per = person_names_per
        if vcr_steps not in VCR_STEPS:
            raise ConfigError(f"data.vcr_steps={vcr_steps!r}: choose 'separate' (the seed's) or 'joint'")
        if qa_text_len is not None and (isinstance(qa_text_len, bool) or int(qa_text_len) < 3):
            raise ConfigError(f"data.qa_text_len={qa_text_len!r}: a text length of at least 3 tokens, or null")
        if qa_text_len is not None and vcr_steps == "joint":
            log.warning(
                "data.qa_text_len=%s is unused with data.vcr_steps=joint (one text length: max_text_len)", qa_text_len
            )
        self.vcr_steps = vcr_steps
        self.qa_text_len = None if qa_text_len is None else int(qa_text_len)
        self.jsonl_file = jsonl
        self.images_dir = images_dir
        self.names_file = names_table
        self.features_file = features
        self.gt_features_file = gt_features
        self._gt: RegionReader | None = None
        self._names: list[str] | None = None

    # ------------------------------------------------------------------ files
    def required_files(self) -> list[Path]:
        files = [self.path(self.jsonl_file, split) for split in ("train", "val", "test")]
        files += [self.path(self.names_file), self.path(self.features_file)]
        if self.gt_features_file is not None:
            files.append(self.path(self.gt_features_file))
        if self.images_dir is not None:
            files.append(self.path(self.images_dir))
        return files

    @property
    def names(self) -> list[str]:
        """The person names table (column 1 of ``names_table``)."""
        if self._names is None:
            self._names = load_names_table(self.path(self.names_file))
        return self._names

    def metadata(self, split: str, index: int) -> dict[str, Any]:
        """Metadata of example ``index`` of ``split`` (``vcr_format.load_metadata``: names, boxes, width, height)."""
        if self.images_dir is None:
            raise DataError("data.images_dir is null: no VCR image metadata to read")
        self.setup({"train": "fit", "val": "validate"}.get(split, "test"))
        rec = self.datasets[split].records[index]
        if "metadata_fn" not in rec:
            raise DataError(f"{self.path(self.jsonl_file, split)}: record {rec['annot_id']!r} has no 'metadata_fn'")
        return load_metadata(self.path(self.images_dir) / rec["metadata_fn"])

    # ------------------------------------------------------------------ datasets
    def build_dataset(self, split: str) -> VCRQuestions:
        path = self.path(self.jsonl_file, split)
        records = load_vcr_jsonl(path)
        labelled = ["answer_label" in r for r in records]
        if any(labelled) and not all(labelled):
            odd = records[labelled.index(not labelled[0])]
            raise DataError(
                f"{path}: field 'answer_label' is present in some records and absent in others (e.g. annot_id "
                f"{odd['annot_id']!r}); a split is either labelled or not"
            )
        names = self.names
        regions = self.regions
        for img_id in dict.fromkeys(r["img_id"] for r in records):
            if str(image_int_id(img_id)) not in regions:
                raise DataError(
                    f"{regions.path}: no region features for image id {image_int_id(img_id)} "
                    f"(field 'img_id' {img_id!r} in {path})"
                )
        gt = None
        if self.gt_features_file is not None:
            if self._gt is None:
                self._gt = self.open_regions(self.gt_features_file)
            gt = self._gt
            for img_id in dict.fromkeys(r["img_id"] for r in records):
                if str(image_int_id(img_id)) not in gt:
                    raise DataError(
                        f"{gt.path}: no GT-box region features for image id {image_int_id(img_id)} "
                        f"(field 'img_id' {img_id!r} in {path})"
                    )
        # the test split scores QA->R under every answer, so that its leaderboard CSV is complete (2.5x the rows)
        data = VCRQuestions(
            records, regions, names, has_labels=bool(records) and all(labelled), all_rationales=split == "test"
        )
        data.gt, data.max_regions, data.person_names = gt, self.max_regions, self.person_names
        data.person_names_per = self.person_names_per
        if self.vcr_steps == "separate" and self.qa_text_len is not None:  # Q->A rows at the seed's TASK1 length,
            data.qa_text_len = self.qa_text_len  # in every split (vilbert_beta evaluates each task at its own length)
        return data

    # ------------------------------------------------------------------ training steps
    @property
    def steps_per_iteration(self) -> int:
        """Optimizer steps per iteration of the seed's task loop: 2 (Q->A, QA->R) under ``vcr_steps=separate``."""
        return 2 if self.vcr_steps == "separate" else 1

    def block_collator(self) -> BlockCollator:
        """The training collator of one-block micro-batches: Q->A rows at ``qa_text_len``, QA->R at ``max_text_len``."""
        return BlockCollator(self.collator("train"))

    def loader(self, split: str) -> DataLoader:
        if split != "train" or self.vcr_steps != "separate":
            return super().loader(split)
        if self.streaming:
            raise ConfigError("data.streaming: VCR with data.vcr_steps=separate reads the training split from files")
        self.setup("fit")
        trainer = self.trainer
        if trainer is not None and getattr(trainer, "overfit_batches", 0):
            raise ConfigError(
                f"trainer.overfit_batches={trainer.overfit_batches} with data.vcr_steps=separate: Lightning would swap "
                "the step sampler for a sequential one (each item a question, not a step's block); add "
                "data.vcr_steps=joint to overfit VCR"
            )
        world = trainer.world_size if trainer else 1
        accumulation = int(getattr(trainer, "accumulate_grad_batches", 1) or 1) if trainer else 1
        questions = self.datasets["train"]
        try:
            sampler = AlternatingStepSampler(
                questions,
                num_replicas=world,
                rank=trainer.global_rank if trainer else 0,
                seed=global_seed(),
                micro_batch=self.batch_size_per_device,
                accumulation=accumulation,
                shuffle=self.shuffle,
            )
        except ValueError as err:
            raise ConfigError(
                f"data.vcr_steps=separate: {len(questions)} training questions over {world} process(es): {err} "
                f"(data.batch_size={self.batch_size} / data.batch_size_per_device={self.batch_size_per_device})"
            ) from None
        sampler.set_epoch(trainer.current_epoch if trainer else 0)
        return ResumableDataLoader(
            VCRBlockBatches(questions),
            batch_size=None,  # the sampler's keys are micro-batches
            sampler=sampler,
            generator=torch.Generator().manual_seed(global_seed()),
            num_workers=self.num_workers,
            collate_fn=self.loader_collate(self.block_collator()),
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    @property
    def info(self) -> dict[str, Any]:
        first = self.regions[self.regions.ids()[0]]
        return {"visual_dim": int(first["features"].shape[1]), "num_choices": NUM_CHOICES, "mc_blocks": MC_BLOCKS}

    def baselines(self, split: str = "test") -> dict[str, float]:
        """Reference points: chance (1/4 per block, 1/16 for Q->AR) and, when the split is labelled, a text-only
        prior that picks the choice with the most tokens (expected accuracy under random tie-breaking)."""
        out = {
            f"{split}/vcr_qa_acc_chance": 1.0 / NUM_CHOICES,
            f"{split}/vcr_qar_acc_chance": 1.0 / NUM_CHOICES,
            f"{split}/vcr_q2ar_acc_chance": 1.0 / NUM_CHOICES**2,
        }
        self.setup({"train": "fit", "val": "validate"}.get(split, "test"))
        data = self.datasets[split]
        labelled = [r for r in data.records if "rationale_label" in r] if data.has_labels else []
        if labelled:
            qa = np.asarray([_expected_longest(r["answer_choices"], r["answer_label"]) for r in labelled])
            qar = np.asarray([_expected_longest(r["rationale_choices"], r["rationale_label"]) for r in labelled])
            out[f"{split}/vcr_qa_acc_longest"] = float(qa.mean())
            out[f"{split}/vcr_qar_acc_longest"] = float(qar.mean())
            out[f"{split}/vcr_q2ar_acc_longest"] = float((qa * qar).mean())
        return out

    def write_predictions(self, predictions: list[dict[str, Any]], path: Path) -> Path:
        """VCR leaderboard CSV (``vcr_format.write_vcr_submission``): ``annot_id, answer_0..3,
        rationale_conditioned_on_a0_0 .. a3_3`` probabilities, from predictions ``{"annot_id", "answer_probs": [4],
        "rationale_probs": [4][4]}`` (the test split always has the 5-block layout)."""
        return write_vcr_submission(predictions, path)
