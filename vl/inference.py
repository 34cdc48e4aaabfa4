"""One-call inference on a trained checkpoint: `from vl import load`, and `python evaluate.py mode=predict`.

`load("<run dir | checkpoint>")` rebuilds the system from the checkpoint alone (the resolved config, tokenizer and
answer vocabulary every vl checkpoint stores; `.hydra/config.yaml` is the fallback for older files), loads the weights
strictly, and returns a `Predictor`:

    model = load("outputs/vqa_finetune/runs/<time>")           # best.ckpt (else last.ckpt) of that run
    model.match(image, text)                 # ITM probability that the text describes the image
    model.answer(image, question, k=5)       # [(answer, score)]: VQA sigmoid scores, best first
    model.rank(text, images)                 # [(position in images, score)], best first
    model.fill_mask("a [MASK] circle", image)  # per [MASK]: [(token, probability)], best first

`image` is a feature id in the run's feature file, a feature array ((N, D) regions or a (D,) CLIP vector) or a reader
dict (`features`, `boxes_norm`). Every call takes one item or lists (then it returns a list), is batched internally
(`batch_size`) and runs without gradients, on CPU or GPU (`device`).

`mode=predict` reads a JSONL of queries (`image` or `image_id`, `text`), runs Lightning's `predict_step` (so DDP
prediction works: every rank writes its rows, rank 0 merges them by query) and writes `predictions.jsonl`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from vl.build import load_run_config, model_from_checkpoint, stage_config
from vl.checkpoint import architecture_of, read_checkpoint, run_record
from vl.config import instantiate_node, trainer_config
from vl.errors import ConfigError, DataError

__all__ = ["Predictor", "load", "read_queries", "QueryDataset", "QueryCollator", "rows_from_outputs", "predict"]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run dir's `checkpoints/best.ckpt` (else `last.ckpt`)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        raise ConfigError(f"load: '{path}' is a directory without checkpoints/best.ckpt or checkpoints/last.ckpt")
    return path


class QueryCollator:
    """The data module's inference collator + `mlm_query` (B, T): where the text holds the tokenizer's [MASK]."""

    def __init__(self, base: Any, mask_token_id: int) -> None:
        self.base, self.mask_token_id = base, mask_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(examples)
        batch["mlm_query"] = batch["input_ids"] == self.mask_token_id
        return batch


class QueryDataset(Dataset):
    """(image, text) pairs as examples of the run's data module (`visual_example` turns the image into its fields)."""

    def __init__(self, dm: Any, images: Sequence[Any], texts: Sequence[str]) -> None:
        self.dm, self.images, self.texts = dm, list(images), list(texts)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"text": self.texts[i], "index": i, **self.dm.visual_example(self.images[i])}


def read_queries(path: str | Path) -> list[dict[str, Any]]:
    """JSONL queries `{"image" | "image_id": ..., "text": str}`; a bad line fails naming file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    queries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise DataError(f"{path}:{n}: a query needs a non-empty 'text'")
        if "image" not in row and "image_id" not in row:
            raise DataError(f"{path}:{n}: a query needs 'image' (or 'image_id'): a feature id of the run's data")
        queries.append(row)
    if not queries:
        raise DataError(f"{path}: no queries")
    return queries


def rows_from_outputs(
    outputs: list[dict[str, torch.Tensor]], answers: list[str] | None, tokenizer: Any, k: int
) -> dict[int, dict[str, Any]]:
    """predict_step outputs -> {query index: {"match": p, "score": s, "answers": [(a, s)], "fill_mask": [...]}}."""
    rows: dict[int, dict[str, Any]] = {}
    for out in outputs:
        index = out["index"].tolist()
        for i, q in enumerate(index):
            row = rows.setdefault(int(q), {})
            if "itm" in out:
                row["match"] = float(out["itm"][i])
            if "retrieval" in out:
                row["score"] = float(out["retrieval"][i])
            if "vqa" in out:
                # ranked by logit (sigmoids of logits over ~17 are all 1.0 in float32), reported as sigmoid scores
                ranking = out.get("vqa_logits", out["vqa"])[i]
                ids = ranking.topk(min(k, ranking.shape[-1])).indices
                names = answers or [str(j) for j in range(ranking.shape[-1])]
                row["answers"] = [(names[j], float(out["vqa"][i][j])) for j in ids.tolist()]
        if "mlm_ids" in out:
            for r, ids, scores in zip(out["mlm_rows"].tolist(), out["mlm_ids"].tolist(), out["mlm_scores"].tolist()):
                tokens = tokenizer.convert_ids_to_tokens(ids)
                rows[int(index[r])].setdefault("fill_mask", []).append(list(zip(tokens, scores)))
    return rows


class Predictor:
    """A trained system ready for single calls (see the module docstring). Built by `load`."""

    def __init__(self, model: L.LightningModule, dm: Any, answers: list[str] | None, *, batch_size: int = 32) -> None:
        self.model, self.dm, self.answers_vocab, self.batch_size = model.eval(), dm, answers, batch_size
        self.collate = QueryCollator(dm.inference_collator(), dm.tokenizer.mask_token_id)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _run(self, images: Sequence[Any], texts: Sequence[str], k: int = 5) -> list[dict[str, Any]]:
        loader = DataLoader(QueryDataset(self.dm, images, texts), batch_size=self.batch_size, collate_fn=self.collate)
        outputs = []
        for batch in loader:
            batch = {key: v.to(self.device) if torch.is_tensor(v) else v for key, v in batch.items()}
            outputs.append({key: v.cpu() for key, v in self.model.infer(batch, top_k=k).items()})
        rows = rows_from_outputs(outputs, self.answers_vocab, self.dm.tokenizer, k)
        return [rows[i] for i in range(len(texts))]

    def _need(self, head: str, what: str) -> None:
        if head not in self.model.objectives:
            heads = ", ".join(self.model.objectives)
            raise ConfigError(f"{what} needs a model with a '{head}' head; this checkpoint has: {heads}")

    @staticmethod
    def _pairs(image: Any, text: Any) -> tuple[list[Any], list[str], bool]:
        if isinstance(text, str):
            return [image], [text], False
        texts = list(text)
        images = list(image) if isinstance(image, (list, tuple)) else [image] * len(texts)
        if len(images) != len(texts):
            raise ConfigError(f"{len(images)} images for {len(texts)} texts: pass one image, or one per text")
        return images, texts, True

    def match(self, image: Any, text: str | Sequence[str]) -> float | list[float]:
        """The ITM head's probability that `text` describes `image` (1 = aligned)."""
        self._need("itm", "match")
        images, texts, many = self._pairs(image, text)
        values = [row["match"] for row in self._run(images, texts)]
        return values if many else values[0]

    def answer(self, image: Any, question: str | Sequence[str], k: int = 5) -> Any:
        """The top `k` answers with their sigmoid scores, best first (a list of those for a list of questions)."""
        self._need("vqa", "answer")
        images, texts, many = self._pairs(image, question)
        values = [row["answers"] for row in self._run(images, texts, k=k)]
        return values if many else values[0]

    def rank(self, text: str, images: Sequence[Any]) -> list[tuple[int, float]]:
        """Every image scored against `text` (the retrieval head, else ITM's aligned probability), best first, as
        (position in `images`, score)."""
        key = "score" if "retrieval" in self.model.objectives else "match"
        if key == "match":
            self._need("itm", "rank")
        rows = self._run(list(images), [text] * len(images))
        return sorted(((i, row[key]) for i, row in enumerate(rows)), key=lambda p: -p[1])

    def fill_mask(self, text: str | Sequence[str], image: Any = None, k: int = 5) -> Any:
        """Per [MASK] in `text`: the top `k` (token, probability), best first."""
        self._need("mlm", "fill_mask")
        images, texts, many = self._pairs(image, text)
        rows = self._run(images, texts, k=k)
        for text_i, row in zip(texts, rows):
            if "fill_mask" not in row:
                raise ConfigError(f"fill_mask: no {self.dm.tokenizer.mask_token} in {text_i!r}")
        values = [row["fill_mask"] for row in rows]
        return values if many else values[0]


def load(
    path: str | Path, *, architecture: str | None = None, device: str | torch.device | None = None, batch_size: int = 32
) -> Predictor:
    """A `Predictor` from a run dir or a checkpoint file (see the module docstring). `architecture`: the encoder
    class expected (e.g. "VilbertEncoder"); a checkpoint of another one is refused in one line, as is one written by
    a vl whose checkpoint format this one does not read."""
    ckpt_path = resolve_checkpoint(path)
    ckpt = read_checkpoint(ckpt_path, "load")
    record = run_record(ckpt, ckpt_path, "load")
    held = architecture_of(ckpt)
    if architecture is not None and held != architecture:
        raise ConfigError(f"load: '{ckpt_path}' holds a {held} checkpoint, not the {architecture} asked for")
    run_cfg, _ = load_run_config(ckpt_path, ckpt)
    if record is None and run_cfg.get("pretrain") and ckpt_path.parent.parent.name == "pretrain":
        run_cfg = stage_config(run_cfg, run_cfg.pretrain, ckpt_path.parent.parent)  # a file without a run record
    dm = instantiate_node(run_cfg.data)
    if record is not None and record.get("tokenizer"):
        dm.tokenizer_name = record["tokenizer"]
    answers = record.get("answers") if record is not None else dm.answer_vocabulary()
    model = model_from_checkpoint(run_cfg, ckpt, ckpt_path)
    del ckpt
    if device is not None:
        model = model.to(device)
    return Predictor(model, dm, answers, batch_size=batch_size)


class _RowWriter(L.pytorch.callbacks.BasePredictionWriter):
    """Each rank writes its predict_step outputs to `<dir>/predict.rank<r>.pt` (merged by rank 0 afterwards)."""

    def __init__(self, out_dir: Path) -> None:
        super().__init__(write_interval="epoch")
        self.out_dir = out_dir

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: Any, predictions: Any, batch_indices: Any) -> None:
        flat = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        torch.save(list(flat), self.out_dir / f"predict.rank{trainer.global_rank}.pt")


def predict(
    cfg: DictConfig, run_cfg: DictConfig, ckpt: dict[str, Any], output_dir: Path, record: dict[str, Any] | None
) -> Path:
    """`evaluate.py mode=predict +input=<queries.jsonl>`: every query through Lightning's `predict_step`; writes
    `<output_dir>/predictions.jsonl` (the query, plus `match` / `score` / `answers` / `fill_mask` by the heads)."""
    if not cfg.get("input"):
        raise ConfigError('mode=predict needs +input=<queries.jsonl> (lines of {"image": <feature id>, "text": ...})')
    queries = read_queries(cfg.input)
    k = int(cfg.get("top_k", 5))
    dm = instantiate_node(run_cfg.data)
    if record is not None and record.get("tokenizer"):
        dm.tokenizer_name = record["tokenizer"]
    answers = record.get("answers") if record is not None else dm.answer_vocabulary()
    model = model_from_checkpoint(run_cfg, ckpt, cfg.ckpt_path)
    model.predict_top_k = k
    for q in queries:  # every image id is checked before compute is spent
        dm.visual_example(q.get("image", q.get("image_id")))
    dataset = QueryDataset(dm, [q.get("image", q.get("image_id")) for q in queries], [q["text"] for q in queries])
    loader = DataLoader(
        dataset,
        batch_size=dm.batch_size_per_device,
        collate_fn=QueryCollator(dm.inference_collator(), dm.tokenizer.mask_token_id),
    )
    trainer: L.Trainer = instantiate(
        trainer_config(run_cfg.trainer), logger=False, callbacks=[_RowWriter(output_dir)], enable_checkpointing=False
    )
    trainer.predict(model, dataloaders=loader, return_predictions=False)
    path = output_dir / "predictions.jsonl"
    # under a launched DDP (torchrun, SLURM) every rank returns here: all parts written before rank 0 merges them,
    # and no rank leaves before the merge (`ddp_spawn` returns in the launching process only: the barriers are no-ops)
    trainer.strategy.barrier("predict-parts-written")
    if trainer.is_global_zero:
        parts = sorted(output_dir.glob("predict.rank*.pt"))
        outputs = [out for part in parts for out in torch.load(part, weights_only=True)]
        rows = rows_from_outputs(outputs, answers, dm.tokenizer, k)
        with path.open("w") as f:
            for i, q in enumerate(queries):
                f.write(json.dumps({**q, **rows[i]}) + "\n")
        for part in parts:
            part.unlink()
    trainer.strategy.barrier("predictions-merged")
    return path
