"""RefCOCO+ referring-expression grounding: REFER refs + COCO instances + detection (and GT-box) region features.

One example per (ref, sentence). Regions are the image's detections; for training (ViLBERT) the GT-box regions of the
image are appended after them, and the combined list is cut from its end to ``max_regions`` (vilbert_beta's
``refer_expression_dataset.py``; ``gt_regions_first=True``: cut detections first, so the GT regions always stay). Each
example's regions carry ``global_feature``, ViLBERT's whole-image token: the mean of all the image's detections (the
seed's reader computes it before any GT region is added or any row cut). Each region's target is its IoU with the ref's GT box, zeroed below ``iou_threshold``
in the training split only (the seed's ``mix_target[mix_target < 0.5] = 0`` under ``split == 'train'``: val / test
targets, so the logged val / test loss, are the raw IoUs); a prediction is correct when the IoU of the arg-max region is > 0.5. IoU follows ViLBERT's pixel-inclusive (+1)
convention unless ``iou_plus_one=False``. Every example also carries the whole image's IoU / target
(``refer_image_iou`` / ``refer_image_target``, box [0, 0, W, H]): ViLBERT scores its whole-image token as a candidate
too (`RegionGrounding`, ``whole_image_candidate``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from torch.utils.data import Dataset

from vl.data.base import VLDataModule
from vl.data.collate import check_text_truncation
from vl.data.features import RegionReader
from vl.data.formats.refcoco import (
    REFER_SPLIT_NAMES,
    Instances,
    box_area,
    box_iou,
    load_instances,
    load_refs,
    refs_of_split,
    split_counts,
)
from vl.data.region_rules import concat_regions, global_feature
from vl.data.samplers import split_key
from vl.errors import ConfigError, DataError

__all__ = ["RefExample", "RefCOCOExpressions", "RefCOCODataModule", "concat_regions"]

#: a prediction is correct when the IoU of the chosen region is above this (ViLBERT uses ``> 0.5``)
CORRECT_IOU = 0.5


class RefExample(NamedTuple):
    """One (ref, sentence): ids, the sentence, the image and the GT box (4,) x1y1x2y2 px."""

    ref_id: int
    sent_id: int
    text: str
    image_id: int
    box: np.ndarray


def whole_image_box(visual: dict[str, Any]) -> np.ndarray:
    """The whole image as an x1y1x2y2 px box [0, 0, W, H] (ViLBERT's global image location)."""
    return np.array([0.0, 0.0, float(visual["image_w"]), float(visual["image_h"])])


class RefCOCOExpressions(Dataset):
    """Examples of one split. ``dataset[key]`` -> ``{"text", "visual" (reader dict, N rows), "refer_targets" float32
    (N,), "refer_ious" float32 (N,), "ref_id", "sent_id", "index", "epoch"}``."""

    def __init__(
        self,
        examples: list[RefExample],
        dets: RegionReader,
        gt: RegionReader | None,
        *,
        iou_threshold: float = 0.5,
        max_regions: int = 36,
        iou_plus_one: bool = True,
        gt_regions_first: bool = False,
        image_sizes: dict[int, tuple[int, int]] | None = None,
        sizes_file: Path | None = None,
    ) -> None:
        """`image_sizes` (image id -> (width, height), the COCO instances' `images`, read from `sizes_file`): each
        image's region records must carry the same `image_w` / `image_h` (`check_size`)."""
        self.examples = examples
        self.image_sizes = image_sizes
        self.sizes_file = sizes_file
        self.gt_regions_first = bool(gt_regions_first)
        self.dets = dets
        self.gt = gt
        self.iou_threshold = float(iou_threshold)
        self.iou_plus_one = bool(iou_plus_one)
        self.max_regions = int(max_regions)
        self.lookup = {(ex.ref_id, ex.sent_id): i for i, ex in enumerate(examples)}

    def __len__(self) -> int:
        return len(self.examples)

    def regions(self, index: int) -> dict[str, Any]:
        """The example's region dict (detections, + GT regions when this split has them), <= max_regions rows, and
        `global_feature` (D,): the mean of all the image's detections (see the module docstring)."""
        image_id = str(self.examples[index].image_id)
        dets = self.check_size(self.dets, self.dets[image_id])
        gt = self.check_size(self.gt, self.gt[image_id]) if self.gt is not None else None
        out = concat_regions(dets, gt, self.max_regions, gt_first=self.gt_regions_first)
        out["global_feature"] = global_feature(dets)
        return out

    def check_size(self, reader: RegionReader, visual: dict[str, Any]) -> dict[str, Any]:
        """`visual` (a region record of `reader`), or a DataError naming both files and the image when its
        `image_w` x `image_h` is not the COCO instances' width x height: the GT box is in the instances' pixels and
        the regions in the record's, so every IoU (targets, accuracy) of the image would be computed across two
        scales (features extracted from a resized image, or another image under that id)."""
        if self.image_sizes is None:
            return visual
        image_id = int(visual["image_id"])
        want = self.image_sizes.get(image_id)
        have = (int(visual["image_w"]), int(visual["image_h"]))
        if want is not None and have != want:
            raise DataError(
                f"{reader.path}: image id {image_id} has image_w x image_h = {have[0]}x{have[1]}, but {self.sizes_file} "
                f"gives that image width x height = {want[0]}x{want[1]}: its region boxes and the referred boxes are in "
                "different pixels (features of a resized image?)"
            )
        return visual

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = split_key(key)
        ex = self.examples[index]
        visual = self.regions(index)
        ious = box_iou(visual["boxes"], ex.box, self.iou_plus_one).astype(np.float32)
        targets = np.where(ious >= self.iou_threshold, ious, 0.0).astype(np.float32)
        image_iou = float(box_iou(whole_image_box(visual)[None], ex.box, self.iou_plus_one)[0])
        return {
            "text": ex.text,
            "visual": visual,
            "refer_targets": targets,
            "refer_ious": ious,
            "refer_image_iou": image_iou,
            "refer_image_target": image_iou if image_iou >= self.iou_threshold else 0.0,
            "ref_id": ex.ref_id,
            "sent_id": ex.sent_id,
            "index": index,
            "epoch": epoch,
        }


class RefCOCODataModule(VLDataModule):
    """`data=refcoco`. Files are relative to `root`; `splits` maps train/val/test to the refs' split names (default
    test -> testA; set `splits={"test": "testB"}` for the other half), selected as REFER's `getRefIds(split=...)`
    does (`refs_of_split`: testA / testB / testC also take the refs of testAB / testBC / testAC, `test` every test
    split; the names are REFER's, `REFER_SPLIT_NAMES`). `gt_features=None` trains on detections only.

    With `root=None` the embedded scene corpus (`vl.data.scenes.corpus`) holds these files."""

    corpus_parts = ("refcoco",)

    label_keys = {
        "refer_targets": ("refer_targets", "regions"),
        "refer_ious": ("refer_ious", "regions"),
        "refer_image_iou": ("refer_image_iou", "float"),
        "refer_image_target": ("refer_image_target", "float"),
        "ref_id": ("ref_id", "long"),
        "sent_id": ("sent_id", "long"),
    }

    prediction_file = "refcoco_predictions.json"  # box per expression, written into the run dir by `test`

    def __init__(
        self,
        *,
        refs: str = "refcoco+/refs(unc).p",
        instances: str = "refcoco+/instances.json",
        features: str = "refcoco+/dets.lmdb",
        gt_features: str | None = "refcoco+/gt.lmdb",
        iou_threshold: float = 0.5,
        iou_plus_one: bool = True,
        sentence_field: str = "raw",
        gt_regions_first: bool = False,
        text_truncation: str = "seed",
        splits: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        """`sentence_field`: the REFER sentence field read as the expression: `raw` (as written by the annotator,
        ViLBERT's `sent['raw']`, default) or `sent` (REFER's lower-cased, punctuation-stripped form).
        `gt_regions_first`: when detections + GT regions exceed `max_regions`, false (default, vilbert_beta's): cut
        the combined list from its end (GT regions first); true (vl's earlier rule): cut detections, so a training
        example always keeps its GT regions and so a positive.
        `text_truncation` (`vl.data.collate.TEXT_TRUNCATION`): "seed" (default, vilbert_beta's reader):
        `[CLS] expression [SEP]` cut to `max_text_len`, so an over-long expression loses its [SEP]; "tokenizer": the
        tokenizer's truncation (cuts the expression's tokens, keeps [SEP])."""
        super().__init__(splits={"test": "testA", **dict(splits or {})}, **kwargs)
        self.text_truncation = check_text_truncation(text_truncation)
        for stage, name in self.splits.items():
            if name not in REFER_SPLIT_NAMES:
                raise ConfigError(
                    f"data.splits.{stage}: '{name}' is not a REFER split name ({', '.join(REFER_SPLIT_NAMES)})"
                )
        if not 0.0 <= float(iou_threshold) <= 1.0:
            raise ConfigError(f"data.iou_threshold={iou_threshold} is not in [0, 1]")
        if sentence_field not in ("raw", "sent"):
            raise ConfigError(f"data.sentence_field: '{sentence_field}' is not one of 'raw', 'sent'")
        self.sentence_field = sentence_field
        self.gt_regions_first = bool(gt_regions_first)
        self.refs_file = refs
        self.instances_file = instances
        self.features_file = features
        self.gt_features_file = gt_features
        self.iou_threshold = float(iou_threshold)
        self.iou_plus_one = bool(iou_plus_one)  # ViLBERT's pixel-inclusive IoU (false: continuous boxes)
        self._embedded_checked = False
        self._refs: list[dict[str, Any]] | None = None
        self._instances: Instances | None = None
        self._dets: RegionReader | None = None
        self._gt: RegionReader | None = None

    # ------------------------------------------------------------------ files
    def required_files(self) -> list[Path]:
        files = [self.path(self.refs_file), self.path(self.instances_file), self.path(self.features_file)]
        if self.gt_features_file is not None:
            files.append(self.path(self.gt_features_file))
        return files

    @property
    def refs(self) -> list[dict[str, Any]]:
        if self._refs is None:
            self._refs = load_refs(self.path(self.refs_file), self.sentence_field)
        return self._refs

    @property
    def instances(self) -> Instances:
        if self._instances is None:
            self._instances = load_instances(self.path(self.instances_file))
        return self._instances

    @property
    def dets(self) -> RegionReader:
        if self._dets is None:
            self._dets = self.open_regions(self.features_file)
        return self._dets

    @property
    def gt(self) -> RegionReader | None:
        if self._gt is None and self.gt_features_file is not None:
            self._gt = self.open_regions(self.gt_features_file)
        return self._gt

    # ------------------------------------------------------------------ datasets
    def build_dataset(self, split: str) -> RefCOCOExpressions:
        """Examples of `split` (file split `splits[split]`); every ref, annotation and image is checked first."""
        self.check_files()
        refs_path = self.path(self.refs_file)
        name = self.splits[split]
        refs = refs_of_split(self.refs, name)
        if not refs:
            raise DataError(
                f"{refs_path}: no refs with split {name!r} (data.splits.{split}); the file has {split_counts(self.refs)}"
            )
        inst = self.instances
        for r in refs:
            aid, image_id = int(r["ann_id"]), int(r["image_id"])
            if aid not in inst.boxes:
                raise DataError(
                    f"{refs_path}: ref_id {r['ref_id']} field 'ann_id' = {aid} is not an annotation id of {inst.path}"
                )
            if inst.ann_image[aid] != image_id:
                raise DataError(
                    f"{refs_path}: ref_id {r['ref_id']} field 'image_id' = {image_id}, but annotation {aid} of "
                    f"{inst.path} is on image {inst.ann_image[aid]}"
                )
        gt = self.gt if split == "train" else None
        readers = [self.dets] + ([gt] if gt is not None else [])
        for image_id in sorted({int(r["image_id"]) for r in refs}):
            for reader in readers:
                if str(image_id) not in reader:
                    ref_id = next(r["ref_id"] for r in refs if int(r["image_id"]) == image_id)
                    raise DataError(
                        f"{reader.path}: no region features for image id {image_id} (field 'image_id' of ref_id "
                        f"{ref_id} in {refs_path})"
                    )
        if gt is not None:
            self._check_dims(gt)
        examples = [
            RefExample(
                int(r["ref_id"]),
                int(s["sent_id"]),
                s[self.sentence_field],
                int(r["image_id"]),
                inst.boxes[int(r["ann_id"])],
            )
            for r in refs
            for s in r["sentences"]
        ]
        if not examples:
            raise DataError(f"{refs_path}: the refs of split {name!r} have no sentences")
        return RefCOCOExpressions(
            examples,
            self.dets,
            gt,
            iou_threshold=self.iou_threshold if split == "train" else 0.0,  # the seed thresholds training targets only
            max_regions=self.max_regions,
            iou_plus_one=self.iou_plus_one,
            gt_regions_first=self.gt_regions_first,
            image_sizes=inst.sizes,
            sizes_file=inst.path,
        )

    def _check_dims(self, gt: RegionReader) -> None:
        d_det, d_gt = self.info["visual_dim"], int(gt[gt.ids()[0]]["features"].shape[1])
        if d_det != d_gt:
            raise DataError(f"{gt.path}: GT region features have dim {d_gt}, detections ({self.dets.path}) {d_det}")

    def dataset(self, split: str) -> RefCOCOExpressions:
        """The dataset of `split`, built on first use."""
        if split not in self.datasets:
            self.datasets[split] = self.build_dataset(split)
        return self.datasets[split]  # type: ignore[return-value]

    @property
    def info(self) -> dict[str, Any]:
        ids = self.dets.ids()
        if not ids:
            raise DataError(f"{self.dets.path}: no images")
        return {"visual_dim": int(self.dets[ids[0]]["features"].shape[1])}

    # ------------------------------------------------------------------ evaluation helpers
    def baselines(self, split: str = "test") -> dict[str, float]:
        """Reference points for `{split}/refer_acc` over the split's examples: a uniformly random region (expected
        accuracy = fraction of regions with IoU > 0.5) and always the largest box."""
        data = self.dataset(split)
        chance, largest, weights = [], [], []
        first: dict[int, int] = {}
        counts: dict[int, int] = {}
        for i, ex in enumerate(data.examples):
            first.setdefault(ex.ref_id, i)
            counts[ex.ref_id] = counts.get(ex.ref_id, 0) + 1
        for ref_id, i in first.items():  # IoUs depend on the ref only: one read per ref, weighted by its sentences
            visual = data.regions(i)
            ious = box_iou(visual["boxes"], data.examples[i].box, data.iou_plus_one)
            correct = ious > CORRECT_IOU
            chance.append(float(correct.mean()) if len(ious) else 0.0)
            largest.append(float(correct[int(np.argmax(box_area(visual["boxes"])))]) if len(ious) else 0.0)
            weights.append(counts[ref_id])
        return {
            f"{split}/refer_acc_chance": float(np.average(chance, weights=weights)),
            f"{split}/refer_acc_largest": float(np.average(largest, weights=weights)),
        }

    def write_predictions(self, predictions: list[dict[str, Any]], path: str | Path, split: str = "test") -> Path:
        """`[{"ref_id", "sent_id", "box": [x1, y1, x2, y2], "iou"}]` (sorted by ids) from `{"ref_id", "sent_id",
        "region"}` dicts, `region` indexing the example's regions of `split` (as `dataset[i]["visual"]`; -1 = the whole
        image, which ViLBERT can choose)."""
        data = self.dataset(split)
        rows = []
        for p in predictions:
            key = (int(p["ref_id"]), int(p["sent_id"]))
            index = data.lookup.get(key)
            if index is None:
                raise ValueError(f"prediction for ref_id {key[0]} sent_id {key[1]}: no such example in split {split!r}")
            visual = data.regions(index)
            boxes = visual["boxes"]
            region = int(p["region"])
            if not -1 <= region < len(boxes):
                raise ValueError(
                    f"prediction for ref_id {key[0]} sent_id {key[1]}: region {region} not in [-1, {len(boxes)})"
                )
            box = whole_image_box(visual) if region == -1 else boxes[region]  # -1: ViLBERT's whole-image token
            iou = float(box_iou(box[None], data.examples[index].box, data.iou_plus_one)[0])
            rows.append({"ref_id": key[0], "sent_id": key[1], "box": [float(v) for v in box], "iou": iou})
        path = Path(path)
        path.write_text(json.dumps(sorted(rows, key=lambda r: (r["ref_id"], r["sent_id"]))))
        return path
