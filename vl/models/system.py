"""The shared LightningModule: an injected encoder + the data's heads; losses, metrics, logging, optimisation
(`Optimisation`) and checkpoint loading, written once.

The encoder is any `nn.Module` (built from its own `_target_` node, `model.encoder`, or passed in built) with
  - `forward(batch) -> EncoderOutput` (text, visual, pooled states; `vl.batch`);
  - `word_embeddings` (nn.Embedding: the tied MLM decoder);
  - `pooled_size`, `text_size`, `visual_size` (ints: the sizes of `EncoderOutput.pooled` / `.text` / `.visual`);
  - `visual_input`: what it sees of the image with this data: "regions", "global" (one embedding) or None;
  - optionally `pretrained_parameter_names()`: names (relative to the encoder) of parameters that came from
    pretrained weights (they train at lr x `pretrained_lr_mult`).
An encoder built from config receives `data_info` (corpus facts, e.g. `visual_dim`) as a keyword argument.
A subclass exists only for what is truly special about a system (e.g. CLIP-BERT's loaders of released weights).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MeanMetric

from vl.batch import EncoderOutput
from vl.config import instantiate_node
from vl.errors import ConfigError
from vl.heads import HeadContext, build_heads
from vl.models.blocks import checkpoint_activations, mark_blocks
from vl.models.optimisation import Optimisation
from vl.models.reliable import ReliableTraining
from vl.models.retrieval_eval import RetrievalEvaluation
from vl.models.step_logging import StepLogging
from vl.pretrained import as_one_element, log_key_report

log = logging.getLogger(__name__)

STAGES = ("train", "val", "test")
HEAD_INITS = ("seed", "bert", "torch")
#: BERT's config.initializer_range: the std of the seeds' head init unless the encoder's config has its own
BERT_INITIALIZER_RANGE = 0.02


def initializer_range(encoder: nn.Module) -> float:
    """The std the seeds' `init_bert_weights` / HF `_init_weights` draw from: the encoder's `initializer_range`, else
    that of the first (HF) config inside it (a tiny config's 0.1 included), else BERT's 0.02."""
    own = getattr(encoder, "initializer_range", None)
    if isinstance(own, (int, float)):
        return float(own)
    for module in encoder.modules():
        value = getattr(getattr(module, "config", None), "initializer_range", None)
        if isinstance(value, (int, float)):
            return float(value)
    return BERT_INITIALIZER_RANGE


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


class VLSystem(StepLogging, RetrievalEvaluation, ReliableTraining, Optimisation):
    """Sums weighted objective losses, updates per-stage torchmetrics, logs `stage/name`."""

    #: the shared optimiser options (`scheduler`, `head_lr`, `pretrained_lr_mult`) a subclass's own optimisers do not
    #: read, each with what the subclass uses instead: set to anything but its default, one is a ConfigError naming
    #: it (`model.head_lr=1.0 has no effect on <SYSTEM_NAME> (...); remove it`), raised before the encoder is built
    UNREAD_OPTIONS: dict[str, str] = {}
    SYSTEM_NAME = "this system"
    #: the head init of this system's seed, what `head_init: seed` means: "bert" (N(0, 0.02)) or "torch"
    SEED_HEAD_INIT = "bert"

    def __init__(
        self,
        *,
        encoder: nn.Module | dict[str, Any],
        objectives: list[str],
        data_info: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        loss_weights: dict[str, float] | None = None,
        init_from: str | None = None,
        init_from_any_architecture: bool = False,
        pretrained_lr_mult: float = 1.0,
        heads: dict[str, dict[str, Any]] | None = None,
        head_lr: float | None = None,
        head_init: str = "seed",
        activation_checkpointing: bool = False,
    ) -> None:
        """`encoder`: a built encoder or its config node (`_target_` + arguments; gets `data_info`). `objectives`:
        the data's objective names (one head each; `heads[name]`: that head's options). `optimizer` / `scheduler`:
        `_partial_` configs. `init_from`: an earlier run's checkpoint to start from (non-strict, key report
        logged); a checkpoint of another architecture is refused unless `init_from_any_architecture`. `pretrained_lr_mult`: lr factor of pretrained encoder weights; `head_lr`: lr of the heads.
        `head_init`: how the heads start. "bert": Linear weights ~ N(0, initializer_range), biases 0, LayerNorms
        1 / 0 (`Objective.bert_init`: the seeds' `init_bert_weights` / HF `_init_weights` / VL-BERT's `init_weights`
        over the whole model, with the encoder's config's `initializer_range`: 0.02 for BERT, 0.1 in the tiny
        configs); "torch": PyTorch's default init of each layer (vl before 2026-12-05); "seed" (default): what this
        system's seed does (`SEED_HEAD_INIT`: "bert", VG-BERT "torch").
        `activation_checkpointing`: recompute the encoder's blocks (`vl.models.blocks`) in the backward pass
        instead of storing their activations (same gradients, less memory, ~1/3 more compute)."""
        super().__init__()
        # the pipeline logs the resolved run config (flat) itself: the loggers get no second copy of the model's
        self.save_hyperparameters(ignore=["encoder"] if isinstance(encoder, nn.Module) else None, logger=False)
        if not objectives:
            raise ConfigError("data.objectives: at least one objective is needed")
        self.objective_names = list(objectives)
        self.data_info = dict(data_info)
        self.optimizer_cfg = _plain(optimizer)
        self.scheduler_cfg = _plain(scheduler)
        self.loss_weights = dict(loss_weights or {})
        self.init_from = init_from
        self.init_from_any_architecture = init_from_any_architecture
        self.pretrained_lr_mult = pretrained_lr_mult
        self.head_options = dict(heads or {})
        self.head_lr = head_lr
        self._refuse_unread_options()
        if head_init not in HEAD_INITS:
            raise ConfigError(f"model.head_init: '{head_init}' is not one of {HEAD_INITS}")
        self.predictions: list[dict[str, Any]] = []
        # what makes a checkpoint self-contained (set by the pipeline before fitting; written by on_save_checkpoint)
        self.run_record: dict[str, Any] | None = None
        self.encoder = (
            encoder if isinstance(encoder, nn.Module) else instantiate_node(_plain(encoder), data_info=data_info)
        )
        blocks = mark_blocks(self.encoder)  # FSDP's wrap units (hardware=fsdp) and the checkpointing units
        if activation_checkpointing:
            log.info("activation checkpointing: %d encoder blocks", checkpoint_activations(blocks))
        ctx = HeadContext(
            pooled_size=int(self.encoder.pooled_size),
            text_size=int(self.encoder.text_size),
            visual_size=int(self.encoder.visual_size),
            word_embeddings=self.encoder.word_embeddings,
            data_info=self.data_info,
        )
        # a head the encoder cannot serve fails here, before any compute
        self.objectives = build_heads(
            self.objective_names,
            ctx,
            visual_input=self.encoder.visual_input,
            system=type(self.encoder).__name__,
            head_options=self.head_options,
        )
        if (self.SEED_HEAD_INIT if head_init == "seed" else head_init) == "bert":
            std = initializer_range(self.encoder)
            for head in self.objectives.values():
                head.bert_init(std)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_": nn.ModuleDict(  # "train" would clash with nn.Module.train
                    {name: nn.ModuleDict(head.make_metrics()) for name, head in self.objectives.items()}
                )
                for stage in STAGES
            }
        )
        # val/test losses as weighted means with float states: Lightning's own epoch mean of a logged tensor divides
        # an integer batch-size sum by the world size, which truncates when ranks hold uneven example counts
        self.loss_means = nn.ModuleDict(
            {
                f"{stage}_": nn.ModuleDict({name: MeanMetric() for name in [*self.objectives, "total"]})
                for stage in ("val", "test")
            }
        )
        self.init_retrieval()
        self.initial_weights()  # a system's own weight sources first: `init_from`'s keys overwrite them
        if self.init_from:
            self.load_init_checkpoint(self.init_from)

    def initial_weights(self) -> None:
        """Load the weights a system builds from (e.g. MM-BERT's hybrid init from M-BERT / VL-BERT files) into the
        built model, before `init_from`: the earlier run's checkpoint then overwrites every key it holds and the keys it
        lacks keep these weights (the seeds' order: build-time pretrained language model, then the partial checkpoint).
        Default: nothing."""

    def _refuse_unread_options(self) -> None:
        """`UNREAD_OPTIONS` set away from their defaults fail, naming the option and what is read instead."""
        values = {
            "scheduler": self.scheduler_cfg or None,
            "head_lr": self.head_lr,
            "pretrained_lr_mult": None if float(self.pretrained_lr_mult) == 1.0 else self.pretrained_lr_mult,
        }
        for name, instead in self.UNREAD_OPTIONS.items():
            if values[name] is not None:
                raise ConfigError(
                    f"model.{name}={values[name]!r} has no effect on {self.SYSTEM_NAME} ({instead}); remove it"
                )

    # ------------------------------------------------------------------ forward

    def forward(self, batch: dict[str, Any]) -> EncoderOutput:
        return self.encoder(batch)

    def shared_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        if "images_skipped" in batch:  # pixel data with `on_bad_image=skip`: the epoch's count, summed over ranks
            skipped = torch.as_tensor(float(batch["images_skipped"]), device=self.device)
            self.log(
                f"{stage}/images_skipped",
                skipped,
                reduce_fx="sum",
                on_step=False,
                on_epoch=True,
                sync_dist=True,
                batch_size=1,
            )
        if stage != "train" and self._stage_gallery(stage) is not None:  # retrieval queries: rank the gallery
            return self.retrieval_step(batch, stage)
        out = self(batch)
        total = 0.0
        bs = batch["index"].shape[0]  # examples (multiple-choice batches have more rows)
        scored = False
        for name, head in self.objectives.items():
            if any(key not in batch for key in head.requires):
                if stage == "test":  # unlabelled test rows (no published answers): the submission file's rows only
                    self.predictions.extend(head.unlabelled_predictions(out, batch))
                continue
            scored = True
            result = head(out, batch)
            term = self.loss_weights.get(name, 1.0) * result.loss
            total = total + term
            if stage == "train":
                self._terms[name] = term.detach()
            head.update_metrics(self.metrics[f"{stage}_"][name], result)
            self._log_loss(stage, name, result.loss, bs)
            if stage != "train":  # training metrics are logged once per epoch (`on_train_epoch_end`)
                for metric_name, metric in self.metrics[f"{stage}_"][name].items():
                    self.log(f"{stage}/{metric_name}", metric, batch_size=bs, prog_bar=True)
            if stage == "test":
                self.predictions.extend(head.predictions(result, batch))
        if scored or stage == "train":  # a val/test batch no head could score has no loss (not a logged 0)
            self._log_loss(stage, "total", total, bs)
        return total

    def _log_loss(self, stage: str, name: str, loss: torch.Tensor, batch_size: int) -> None:
        """`<stage>/<name>_loss` (`<stage>/loss` for the total): per step in training, an exact example-weighted
        epoch mean over all ranks in val/test."""
        key = f"{stage}/loss" if name == "total" else f"{stage}/{name}_loss"
        if stage == "train":
            if name == "total":
                self.log_train_loss(loss, batch_size=batch_size)
            else:
                self.log_step_value(key, loss, batch_size=batch_size)
            return
        mean = self.loss_means[f"{stage}_"][name]
        mean.update(torch.as_tensor(loss, device=self.device).detach().float(), batch_size)
        self.log(key, mean, batch_size=batch_size, prog_bar=name == "total")

    def _log_train_metrics(self) -> None:
        """Each head's training metrics over the epoch (torchmetrics, updated every step), logged once at the epoch's
        end and reset. One process only: under DDP a head may see no batch on some rank, and torchmetrics' state sync
        then hangs (an empty list state joins no gather), so there the metrics are only reset (val/test metrics are
        the synchronised ones)."""
        metrics = [(key, metric) for name in self.objectives for key, metric in self.metrics["train_"][name].items()]
        single = self._trainer is None or self.trainer.world_size == 1
        for key, metric in metrics:
            if single and metric.update_count > 0:
                self.log(f"train/{key}", metric.compute(), sync_dist=False)
            metric.reset()

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self._terms = {}
        total = self.shared_step(batch, "train")
        self._pending_terms.append((self.current_epoch, batch_idx, self._terms))
        return total

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self._log_train_metrics()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if isinstance(checkpoint.get("state_dict"), dict):  # parts this configuration does not build
            self.drop_unbuilt(checkpoint["state_dict"])
        super().on_load_checkpoint(checkpoint)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Records the architecture, so a checkpoint given to another model fails naming both (`vl.checkpoint`),
        and the run record (`RUN_KEY`: resolved config, tokenizer, answer vocabulary), so the file alone is enough to
        evaluate and predict. `init_from` / `state_dict_path` are cleared in the saved hyper-parameters: their weights
        are in the state dict already, and `load_from_checkpoint` must not re-read a file that may have moved. Then
        the reliability checks (`ReliableTraining.on_save_checkpoint`: no non-finite weights, partial gradients)."""
        from vl.checkpoint import ARCH_KEY, RUN_KEY, architecture_name

        checkpoint[ARCH_KEY] = architecture_name(self)
        if self.run_record is not None:
            checkpoint[RUN_KEY] = self.run_record
        hparams = checkpoint.get("hyper_parameters")
        for key in ("init_from", "state_dict_path"):  # weights loaded once, at the start: never re-read
            if isinstance(hparams, dict) and hparams.get(key):
                hparams[key] = None
        super().on_save_checkpoint(checkpoint)

    # ------------------------------------------------------------------ validation / test
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch, "val")

    def on_test_epoch_start(self) -> None:
        self.predictions = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        """Write the task's submission file into the run dir (rank 0, after gathering from all ranks)."""
        self._log_retrieval("test")
        self._gallery.pop("test", None)
        preds = self.gathered_predictions()
        dm = self._datamodule()
        if preds and self.trainer.is_global_zero and dm is not None:
            path = dm.write_predictions(preds, Path(self.trainer.default_root_dir) / dm.prediction_file)
            if path is not None:
                log.info("test predictions: %s", path)

    # ------------------------------------------------------------------ inference (`vl.load`, `mode=predict`)
    @torch.no_grad()
    def infer(self, batch: dict[str, Any], top_k: int = 5) -> dict[str, torch.Tensor]:
        """What each head says about unlabelled (text, image) rows: `itm` (B,) aligned probability; `retrieval` (B,)
        the fine-tuned match score; `vqa` (B, A) per-answer sigmoid scores and `vqa_logits` (B, A) their logits (to rank
        by: past a logit of ~17 the float32 sigmoid is exactly 1.0, so the scores tie); `mlm_ids` / `mlm_scores`
        (M, top_k) for the M positions flagged in `batch["mlm_query"]` (B, T) (softmax over the vocabulary), with
        `mlm_rows` (M,)."""
        out = self(batch)
        result: dict[str, torch.Tensor] = {"index": batch["index"]}
        if "itm" in self.objectives:
            result["itm"] = self.objectives["itm"].classifier(out.pooled).softmax(-1)[:, 1]
        if "retrieval" in self.objectives:
            result["retrieval"] = self.objectives["retrieval"].score(out.pooled)
        if "vqa" in self.objectives:
            logits = self.objectives["vqa"].classifier(out.pooled)
            result.update(vqa=logits.sigmoid(), vqa_logits=logits)
        query = batch.get("mlm_query")
        if "mlm" in self.objectives and query is not None and bool(query.any()):
            probs = self.objectives["mlm"].logits(out.text[query]).softmax(-1)
            scores, ids = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
            result.update(mlm_ids=ids, mlm_scores=scores, mlm_rows=query.nonzero()[:, 0])
        return result

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return {k: v.detach().cpu() for k, v in self.infer(batch, top_k=int(getattr(self, "predict_top_k", 5))).items()}

    @staticmethod
    def from_all_ranks(items: list[Any]) -> list[Any]:
        """Every rank's `items`, rank 0's first (`all_gather_object`); `items` itself in a single process."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            everything: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everything, items)
            return [item for part in everything for item in part]
        return items

    def gathered_predictions(self) -> list[dict[str, Any]]:
        """Predictions from all ranks, de-duplicated by their `key`."""
        return list({p["key"]: p for p in self.from_all_ranks(self.predictions)}.values())

    def _datamodule(self) -> Any:
        """The trainer's `VLDataModule`, or None (a model run on bare dataloaders)."""
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    # ------------------------------------------------------------------ loading
    def unbuilt_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of parts this configuration does not build because its forward would not use them
        (e.g. BERT's pooler under mean pooling: the encoder's `unbuilt_prefixes()`); checkpoints written before they
        were dropped still load."""
        encoder = getattr(self.encoder, "unbuilt_prefixes", None)
        return tuple(f"encoder.{p}" for p in encoder()) if encoder else ()

    def drop_unbuilt(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Remove (in place) the `unbuilt_prefixes` keys this model does not have."""
        prefixes = self.unbuilt_prefixes()
        if prefixes:
            own = self.state_dict()
            for key in [k for k in state_dict if k.startswith(prefixes) and k not in own]:
                del state_dict[key]
        return state_dict

    def load_init_checkpoint(self, path: str) -> None:
        """Initialise from an earlier run's checkpoint (e.g. pretraining -> fine-tuning), non-strict and loud."""
        from vl.checkpoint import architecture_name, architecture_of, load_torch_file

        state = load_torch_file(path, "model.init_from")  # weights_only: a file that would run code is refused
        if isinstance(state, dict) and "state_dict" in state and not self.init_from_any_architecture:
            held, own = architecture_of(state), architecture_name(self)
            if held not in ("unknown", own):
                raise ConfigError(
                    f"model.init_from: '{path}' holds a {held} checkpoint, but this model is a {own} (most weights "
                    "would not match); set model.init_from_any_architecture=true to load the matching keys anyway"
                )
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConfigError(f"model.init_from: '{path}' holds no state dict of tensors (a {type(state).__name__})")
        state = self.drop_unbuilt(dict(state))
        own = self.state_dict()
        state = {k: as_one_element(v, own[k]) if k in own else v for k, v in state.items()}
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
        result = self.load_state_dict(usable, strict=False)
        unexpected = sorted(set(state) - set(own)) + [f"{k} (shape mismatch)" for k in skipped]
        missing, unexpected = self._report_head_changes(path, state, list(result.missing_keys), unexpected)
        log_key_report(f"init from {path}", missing, unexpected)

    def _report_head_changes(
        self, path: str, state: dict[str, Any], missing: list[str], unexpected: list[str]
    ) -> tuple[list[str], list[str]]:
        """Split off what a stage change means by design (pretraining -> fine-tuning): the keys of heads this model
        has and the checkpoint has none of (initialised fresh) and of the checkpoint's heads this model does not have
        (not used), each summarised in one INFO line by head name. Returns the other missing / unexpected keys, which
        `log_key_report` warns about (an encoder key, or a head both sides have whose tensors differ)."""

        def head(key: str) -> str | None:
            parts = key.split(".")
            return parts[1] if len(parts) > 2 and parts[0] == "objectives" else None

        own_heads = set(self.objectives.keys())
        held_heads = {h for h in map(head, state) if h is not None}
        new, unused = sorted(own_heads - held_heads), sorted(held_heads - own_heads)
        fresh = [k for k in missing if head(k) in new]
        dropped = [k for k in unexpected if head(k) in unused and not k.endswith("(shape mismatch)")]
        if fresh:
            log.info(
                "init from %s: heads new here, initialised fresh: %s (%d tensors)", path, ", ".join(new), len(fresh)
            )
        if dropped:
            log.info("init from %s: the checkpoint's heads not used here: %s (%d tensors)", path, ", ".join(unused),
                     len(dropped))  # fmt: skip
        fresh_set, dropped_set = set(fresh), set(dropped)
        return [k for k in missing if k not in fresh_set], [k for k in unexpected if k not in dropped_set]
