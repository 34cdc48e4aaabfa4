"""CLIP-ViL (`model=clip_vil`, `model=clip_vil_tiny`; spec: clip_vil.md): a trainable CLIP ResNet's C5 grid +
learned x/y position embeddings -> `visn_fc` -> twelve BERT layers over [text ; visual] -> [CLS] pooler without tanh.

Encoder (`ClipVilEncoder`):
  - grid = backbone(pixel_values) (B, C, h, w) (`vl.models.clip_resnet`, attention pool skipped; stride 32);
  - + x-embedding[i] + y-embedding[j] at row i, column j (`pos_num` 25 each, dim C), flattened row-major to
    (B, h*w, C). As the seed's `LinearPositionEmbedding`, which calls the grid's dim 2 (rows) "width": its
    `x_position_embedding` indexes rows and `y_position_embedding` columns, so `pos_x` / `pos_y` hold the same
    tables as the seed's x / y ones;
  - initialisation as the seed's `init_bert_weights`: position embeddings, `visn_fc` and the pooler ~
    N(0, `initializer_range`) (0.02), Linear biases 0; with `text_encoder.pretrained` the pooler, and the system's
    MLM and ITM heads, come from that BERT checkpoint as in the seed (`ClipVilSystem.load_bert_pretraining_heads`);
  - `sub_sampling`: `sub_feat_num` (100) distinct cells drawn per image, in training and, as the seed does
    (it samples whenever `--sub_sampling` is on), in evaluation too; `sub_sampling_in_eval=false`: every cell in
    evaluation. All cells when the grid is smaller (the seed's `np.random.choice` would fail there). Fine-tuning
    configs turn `sub_sampling` off;
  - visual tokens = Dropout(LayerNorm(Linear(C -> H))), no BERT position / type embeddings, no boxes; their
    attention mask is all ones (zero-padded image areas included); text tokens = BERT embeddings;
  - pooled = Linear(H, H) on the first token, no tanh (`pooling: mean` is an option for tiny random-init models).

System (`ClipVilSystem`, the shared `VLSystem` plus):
  - two optimisers fused into one (`FusedOptimizer`, as the seed's): AdamW (eps 1e-6, wd 0.01, no decay on bias /
    LayerNorm; the seed's transformers 3.3.1 `AdamW`, `vl.optimizers.TransformersAdamW`, by default;
    `model.optimizer._target_=torch.optim.AdamW`: torch's, which adds eps after the bias correction and decays
    before the update) for everything but the backbone, linear warmup (`warmup_ratio` 0.025) then linear decay to 0 at
    `decay_epochs` (default: max_epochs; the published stage 1 planned 20 and stopped after 9: the seed's Epoch09,
    its last epoch, starts stage 2); SGD (lr 0.003, momentum 0, wd 4e-4) for the backbone, x0.1 from each epoch
    (0-based) in `visual_optimizer.schedule`. Lightning's gradient clipping (1.0) covers both (one norm over all
    parameters, as the seed's clip over `amp.master_params`); both states are in the checkpoint
    (`{"adamw": ..., "sgd": ...}`);
  - the shared optimiser options these two optimisers do not read (`model.scheduler`, `head_lr`,
    `pretrained_lr_mult`, another `optimizer._target_`, ...) raise a ConfigError naming the option;
  - `init_from` a stage-2 checkpoint into a VQA model also copies the QA head (the seed's `load_lxmert_qa`): its
    hidden layers whole, the rows of the VQA answers whose `convert_ans` form is a pretraining answer, zeros for the
    other rows (`copy_answer_rows`; logged: how many matched).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from vl.batch import EncoderOutput
from vl.errors import ConfigError
from vl.heads.qa import PretrainQA
from vl.models.bert_backbone import build_bert
from vl.models.checkpoints import load_bert_mlm_head, load_bert_parts
from vl.models.clip_resnet import build_clip_resnet, load_clip_visual
from vl.models.optimisation import NO_DECAY
from vl.models.system import VLSystem
from vl.optimizers import FusedOptimizer, TransformersAdamW
from vl.schedules import step_schedule, vl_warmup_linear, warmup_linear

log = logging.getLogger(__name__)

__all__ = ["ClipVilEncoder", "ClipVilSystem", "copy_answer_rows", "PretrainQA"]


class ClipVilEncoder(nn.Module):
    """`forward(batch) -> EncoderOutput(text (B,T,H), visual (B,N,H), pooled (B,H))`; batch keys input_ids,
    attention_mask, token_type_ids (B,T) and pixel_values (B,3,H_img,W_img)."""

    visual_input = "grid"

    def __init__(
        self,
        *,
        data_info: dict[str, Any],
        text_encoder: dict[str, Any] | None = None,
        backbone: dict[str, Any] | None = None,
        backbone_weights: str | None = None,
        freeze_backbone: bool = False,
        use_positional_embedding: bool = True,
        pos_num: int = 25,
        position_axes: str = "seed",
        sub_sampling: bool = False,
        sub_feat_num: int = 100,
        sub_sampling_in_eval: bool = True,
        visual_dropout: float = 0.1,
        pooling: str = "cls",
        padding_rows: bool = True,
    ) -> None:
        """`backbone`: `build_clip_resnet` arguments (`name`: RN50 / RN50x4, or sizes); `backbone_weights`: a local
        OpenAI / open_clip state dict (key report logged); random init otherwise. `freeze_backbone`: no gradients
        and BatchNorm kept in eval mode. `position_axes`: "seed" (default): `pos_x` indexes the grid's rows and `pos_y`
        its columns, the seed's `LinearPositionEmbedding` (which calls the rows "width"), so the tables are its x / y
        ones; "vl": vl's earlier order (`pos_x` columns, `pos_y` rows), the same model from random init with the
        tables' roles exchanged, which `model=clip_vil_tiny` keeps (its learning tests were calibrated with it).
        `padding_rows`: true (default, the seed's LXRT `BertEmbeddings`: `padding_idx=0` on the position and token-type
        tables): row 0 of each gets no gradient, so the [CLS] position and the one token type every CLIP-ViL token
        has keep their loaded (BERT) values, moved only by weight decay; false: vl's earlier, trainable rows."""
        super().__init__()
        if position_axes not in ("seed", "vl"):
            raise ConfigError(f"model.encoder.position_axes: '{position_axes}' is not one of 'seed', 'vl'")
        self.position_axes = position_axes
        if not data_info.get("pixels"):
            raise ConfigError(
                "model: CLIP-ViL reads images (pixel_values), but this data module provides none; use a pixel data module "
                "(data=clip_vil_pretrain, data=clip_vil_vqa)"
            )
        if not sub_sampling and not sub_sampling_in_eval:
            raise ConfigError(
                "model.encoder.sub_sampling_in_eval=false has no effect with model.encoder.sub_sampling=false"
            )
        if pooling not in ("cls", "mean"):
            raise ConfigError(f"model.encoder.pooling: '{pooling}' is not one of 'cls', 'mean'")
        self.backbone = build_clip_resnet(**dict(backbone or {}))
        self.backbone_report = load_clip_visual(self.backbone, backbone_weights) if backbone_weights else None
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:  # built in eval mode: Lightning keeps each module's built mode
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        channels = self.backbone.out_channels
        self.pretrained = (text_encoder or {}).get("pretrained")
        self.bert = build_bert(**{**(text_encoder or {}), "add_pooling_layer": False})
        if padding_rows:  # read by nn.Embedding.forward: F.embedding then gives index 0 no gradient
            self.bert.embeddings.position_embeddings.padding_idx = 0
            self.bert.embeddings.token_type_embeddings.padding_idx = 0
        hidden = self.bert.config.hidden_size
        self.hidden_size = self.pooled_size = self.text_size = self.visual_size = hidden
        self.use_positional_embedding = use_positional_embedding
        self.pos_num = pos_num
        if use_positional_embedding:
            self.pos_x = nn.Embedding(pos_num, channels)
            self.pos_y = nn.Embedding(pos_num, channels)
        self.sub_sampling, self.sub_feat_num, self.sub_sampling_in_eval = (
            sub_sampling,
            sub_feat_num,
            sub_sampling_in_eval,
        )
        self.visual_fc = nn.Linear(channels, hidden)
        self.visual_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.visual_dropout = nn.Dropout(visual_dropout)
        self.pooling = pooling
        if pooling == "cls":
            self.pooler = nn.Linear(hidden, hidden)
        self._init_bert_weights(self.bert.config.initializer_range)

    def _init_bert_weights(self, std: float) -> None:
        """The seed's `init_bert_weights` on the modules it builds beside BERT (x/y position embeddings, `visn_fc`,
        pooler): Linear / Embedding weights ~ N(0, initializer_range), Linear biases 0 (LayerNorm: ones / zeros)."""
        modules = [self.visual_fc] + ([self.pos_x, self.pos_y] if self.use_positional_embedding else [])
        modules += [self.pooler] if self.pooling == "cls" else []
        with torch.no_grad():
            for module in modules:
                module.weight.normal_(mean=0.0, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.zero_()

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def pretrained_parameter_names(self) -> set[str]:
        names = {f"bert.{n}" for n, _ in self.bert.named_parameters()} if self.pretrained else set()
        if self.backbone_report is not None:
            names |= {f"backbone.{n}" for n in self.backbone_report["loaded"]}
        return names

    def train(self, mode: bool = True) -> ClipVilEncoder:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen: BatchNorm statistics stay as loaded
        return self

    def grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> position-embedded grid (B, C, H/32, W/32)."""
        grid = self.backbone(pixel_values, skip_last_layer=True)
        if self.use_positional_embedding:
            h, w = grid.shape[-2:]
            if h > self.pos_num or w > self.pos_num:
                raise ConfigError(
                    f"model.encoder.pos_num={self.pos_num}: the image grid is {h}x{w}; raise pos_num or lower the "
                    "image size"
                )
            if self.position_axes == "seed":  # x indexes the rows (the seed's "width" = size(2)), y the columns
                grid = grid + self.pos_x.weight[:h].T[None, :, :, None] + self.pos_y.weight[:w].T[None, :, None, :]
            else:  # vl's earlier expression, the order of its float sums included
                grid = grid + self.pos_x.weight[:w].T[None, :, None, :] + self.pos_y.weight[:h].T[None, :, :, None]
        return grid

    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        grid = self.grid(pixel_values)
        feats = grid.flatten(2).transpose(1, 2)  # (B, h*w, C), row-major
        n = feats.shape[1]
        if self.sub_sampling and (self.training or self.sub_sampling_in_eval) and n > self.sub_feat_num:
            idx = torch.stack([torch.randperm(n, device=feats.device)[: self.sub_feat_num] for _ in feats])
            feats = feats.gather(1, idx.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        return self.visual_dropout(self.visual_norm(self.visual_fc(feats)))

    def forward(self, batch: dict[str, Any]) -> EncoderOutput:
        input_ids = batch["input_ids"]
        text = self.bert.embeddings(input_ids=input_ids, token_type_ids=batch.get("token_type_ids"))
        visual = self.visual_tokens(batch["pixel_values"]).to(text.dtype)
        states = torch.cat([text, visual], dim=1)
        mask = torch.cat(
            [
                batch["attention_mask"],
                torch.ones(visual.shape[:2], dtype=batch["attention_mask"].dtype, device=text.device),
            ],
            dim=1,
        )
        extended = (1.0 - mask[:, None, None, :].to(states.dtype)) * torch.finfo(states.dtype).min
        for layer in self.bert.encoder.layer:
            out = layer(states, attention_mask=extended)
            states = out[0] if isinstance(out, tuple) else out
        t = input_ids.shape[1]
        if self.pooling == "cls":
            pooled = self.pooler(states[:, 0])  # no tanh (CLIP-ViL)
        else:
            weights = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return EncoderOutput(text=states[:, :t], visual=states[:, t:], pooled=pooled)


def copy_answer_rows(
    source: nn.Sequential,
    source_answers: Sequence[str],
    target: nn.Sequential,
    target_answers: Sequence[str],
    convert: Callable[[str], str] | None = None,
) -> int:
    """Initialise an answer MLP (`target`, rows = `target_answers`) from another (`source`), as the seed's
    `load_lxmert_qa`: every layer but the last is copied whole; a target answer (after `convert`, the seed's
    `convert_ans`) found in `source_answers` gets that row (weight and bias), every other row is set to 0. Returns how
    many rows were copied."""
    with torch.no_grad():
        for src, dst in zip(list(source)[:-1], list(target)[:-1]):
            dst.load_state_dict(src.state_dict())
        index = {a: i for i, a in enumerate(source_answers)}
        keys = [convert(a) if convert is not None else a for a in target_answers]
        pairs = [(index[k], j) for j, k in enumerate(keys) if k in index]
        target[-1].weight.zero_()
        target[-1].bias.zero_()
        if pairs:
            src_rows = torch.tensor([i for i, _ in pairs])
            dst_rows = torch.tensor([j for _, j in pairs])
            target[-1].weight[dst_rows] = source[-1].weight[src_rows].to(target[-1].weight.dtype)
            target[-1].bias[dst_rows] = source[-1].bias[src_rows].to(target[-1].bias.dtype)
    return len(pairs)


#: the seed's AdamW no-decay rule (`no_decay = ['bias', 'LayerNorm.weight']`, matched in its parameter names) in vl's
#: names: BERT's LayerNorms keep their names; its MLM head's `cls.predictions.transform.LayerNorm` is vl's
#: `transform.2`. `visn_fc`'s LayerNorm (vl: `encoder.visual_norm`) and the answer heads' (`classifier.2`) are not
#: named LayerNorm in the seed, so they decay there, and here.
SEED_NO_DECAY = ("bias", "LayerNorm.weight", "objectives.mlm.transform.2.weight")


FROZEN_AT_RANDOM = (
    "model.encoder.freeze_backbone=true without model.encoder.backbone_weights or model.init_from: the frozen CLIP "
    "ResNet stays at its random initialisation (the seed starts from CLIP's weights)"
)
#: `model.optimizer._target_` -> the AdamW of everything but the backbone: the seed's (transformers 3.3.1) or torch's
DEFAULT_ADAMW = "vl.optimizers.TransformersAdamW"  # no `_target_`: the seed's AdamW
ADAMW: dict[str, type[Optimizer]] = {
    "vl.optimizers.TransformersAdamW": TransformersAdamW,
    "torch.optim.AdamW": torch.optim.AdamW,
    "torch.optim.adamw.AdamW": torch.optim.AdamW,
}


class ClipVilSystem(VLSystem):
    """The shared system with CLIP-ViL's two optimisers and the QA -> VQA head initialisation (module docstring)."""

    SYSTEM_NAME = "CLIP-ViL"
    UNREAD_OPTIONS = {
        "scheduler": "its schedules are model.warmup_ratio, model.decay_epochs, model.visual_optimizer.schedule",
        "head_lr": "the heads train at model.optimizer.lr",
        "pretrained_lr_mult": "pretrained and new weights share one lr",
    }

    def __init__(
        self,
        *,
        visual_optimizer: dict[str, Any] | None = None,
        warmup_ratio: float = 0.025,
        decay_epochs: int | None = None,
        qa_answers: str | None = None,
        adamw_rules: str = "seed",
        **kwargs: Any,
    ) -> None:
        """`visual_optimizer`: the backbone's SGD (`lr`, `momentum`, `weight_decay`, `schedule`: epochs of x0.1);
        `model.optimizer` (lr, eps, weight_decay) is the AdamW of the rest. `decay_epochs`: where the AdamW linear
        decay reaches 0 (default max_epochs). `qa_answers`: the stage-2 answer list (all_ans.json) when
        initialising a VQA model from a stage-2 checkpoint (default: the one that checkpoint recorded).
        `adamw_rules`: "seed" (default): the seed's warmup (`warmup_linear`: s / W, W unrounded) and decay groups
        (`SEED_NO_DECAY`); "vl": vl's earlier ones, (s + 1) / int(W) and no decay on every 1-d parameter, which the
        CPU-size recipe keeps (its learning tests were calibrated with them; `model=clip_vil_tiny`)."""
        if adamw_rules not in ("seed", "vl"):
            raise ConfigError(f"model.adamw_rules: '{adamw_rules}' is not one of 'seed', 'vl'")
        self.adamw_rules = adamw_rules
        self.visual_optimizer_cfg = {"lr": 0.003, "momentum": 0.0, "weight_decay": 4e-4, "schedule": []} | dict(
            visual_optimizer or {}
        )
        self.warmup_ratio = warmup_ratio
        self.decay_epochs = decay_epochs
        self.qa_answers = qa_answers
        self.qa_rows_copied: int | None = None
        super().__init__(**kwargs)
        self.check_optimizer_options()
        self.bert_parts_loaded: list[str] = []
        if self.encoder.pretrained and not self.init_from:
            self.load_bert_pretraining_heads(self.encoder.pretrained)
        if self.encoder.freeze_backbone and self.encoder.backbone_report is None and not self.init_from:
            log.warning(FROZEN_AT_RANDOM)

    def _no_decay(self, name: str, param: nn.Parameter) -> bool:
        if self.adamw_rules == "seed":
            return any(nd in name for nd in SEED_NO_DECAY)
        return any(name.endswith(nd) for nd in NO_DECAY) or param.ndim <= 1

    def load_bert_pretraining_heads(self, pretrained: str) -> list[str]:
        """What the seed's `LXRTPretraining.from_pretrained("bert-base-uncased")` takes from BERT beside the body: the
        pooler (`bert.pooler.dense`), the MLM head (`cls.predictions.*`, decoder tied) and the next-sentence head
        `cls.seq_relationship`, which is its ITM head (rows as stored). Those the dir lacks keep their init."""
        parts: dict[str, str] = {}
        if self.encoder.pooling == "cls":
            for prefix in ("bert.pooler.dense.", "pooler.dense."):  # BertForPreTraining / BertModel saves
                parts |= {f"{prefix}weight": "encoder.pooler.weight", f"{prefix}bias": "encoder.pooler.bias"}
        if "itm" in self.objectives:
            parts |= {f"cls.seq_relationship.{k}": f"objectives.itm.classifier.{k}" for k in ("weight", "bias")}
        self.bert_parts_loaded = load_bert_parts(self, pretrained, parts) if parts else []
        if "mlm" in self.objectives:
            self.bert_parts_loaded += sorted(load_bert_mlm_head(self, pretrained))
        return self.bert_parts_loaded

    def check_optimizer_options(self) -> None:
        """The shared system's optimiser options CLIP-ViL's two optimisers do not use fail here, naming the option:
        `model.optimizer._target_` other than one of `ADAMW`, `fused: true`, keys AdamW here does not read, unknown
        `model.visual_optimizer` keys (`model.scheduler` / `head_lr` / `pretrained_lr_mult`: `UNREAD_OPTIONS`)."""
        cfg = dict(self.optimizer_cfg)
        target = cfg.get("_target_", DEFAULT_ADAMW)
        if target not in ADAMW:
            raise ConfigError(
                f"model.optimizer._target_: '{target}' has no effect on CLIP-ViL (AdamW + backbone SGD, the seed's; "
                f"one of {sorted(set(ADAMW))})"
            )
        if cfg.get("fused"):
            raise ConfigError("model.optimizer.fused: true has no effect on CLIP-ViL (torch's default AdamW is used)")
        unused = sorted(set(cfg) - {"_target_", "_partial_", "lr", "eps", "weight_decay", "betas", "fused"})
        if unused:
            raise ConfigError(
                f"model.optimizer.{unused[0]}: has no effect on CLIP-ViL (reads lr, eps, weight_decay, betas)"
            )
        unknown = sorted(set(self.visual_optimizer_cfg) - {"lr", "momentum", "weight_decay", "schedule"})
        if unknown:
            raise ConfigError(
                f"model.visual_optimizer.{unknown[0]}: has no effect (reads lr, momentum, weight_decay, schedule)"
            )

    def configure_optimizers(self) -> Any:
        cfg = dict(self.optimizer_cfg)
        lr = float(cfg.get("lr", 1e-4))
        weight_decay = float(cfg.get("weight_decay", 0.01))
        decay, no_decay, visual = [], [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("encoder.backbone."):
                visual.append(param)
            elif self._no_decay(name, param):
                no_decay.append(param)
            else:
                decay.append(param)
        adamw = ADAMW[cfg.get("_target_", DEFAULT_ADAMW)]
        optimizers: dict[str, Optimizer] = {
            "adamw": adamw(
                [
                    {"params": decay, "weight_decay": weight_decay, "name": "adamw"},
                    {"params": no_decay, "weight_decay": 0.0, "name": "adamw_no_decay"},
                ],
                lr=lr,
                eps=float(cfg.get("eps", 1e-6)),
                betas=tuple(cfg.get("betas", (0.9, 0.999))),
            )
        }
        vcfg = self.visual_optimizer_cfg
        if visual:
            optimizers["sgd"] = torch.optim.SGD(
                [{"params": visual, "name": "backbone_sgd"}],
                lr=float(vcfg["lr"]),
                momentum=float(vcfg["momentum"]),
                weight_decay=float(vcfg["weight_decay"]),
            )
        fused = FusedOptimizer(optimizers)
        total = int(self.trainer.estimated_stepping_batches)
        epochs = max(1, int(self.trainer.max_epochs or 1))
        steps_per_epoch = max(1, total // epochs)
        planned = steps_per_epoch * int(self.decay_epochs) if self.decay_epochs else total
        adam = (warmup_linear if self.adamw_rules == "seed" else vl_warmup_linear)(planned, self.warmup_ratio)
        sgd = step_schedule(steps_per_epoch, vcfg.get("schedule") or [])
        lambdas = [adam, adam] + ([sgd] if visual else [])
        scheduler = LambdaLR(fused, lambdas)
        return {"optimizer": fused, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def load_init_checkpoint(self, path: str) -> None:
        """The shared non-strict load, then (VQA model <- stage-2 checkpoint) the QA head's shared answer rows."""
        super().load_init_checkpoint(path)
        if "vqa" not in self.objectives:
            return
        from vl.checkpoint import load_torch_file
        from vl.data.formats.lxmert_pretrain import convert_ans, load_all_answers, load_ans2label

        ckpt = load_torch_file(path, "model.init_from")
        state = ckpt.get("state_dict", ckpt)
        prefix = "objectives.qa.classifier."
        if not any(k.startswith(prefix) for k in state):
            return
        answers_file = self.qa_answers or (ckpt.get("hyper_parameters", {}).get("data_info", {}) or {}).get(
            "qa_answers_file"
        )
        if not answers_file:
            raise ConfigError(
                f"model.init_from: '{path}' has a QA head but no answer list is known; set model.qa_answers"
            )
        source_answers = load_all_answers(answers_file)
        head = self.objectives["vqa"].classifier
        n_rows = state[f"{prefix}3.weight"].shape[0]
        if n_rows != len(source_answers):
            raise ConfigError(
                f"model.qa_answers: {answers_file} lists {len(source_answers)} answers, the QA head has {n_rows}"
            )
        source = PretrainQA(hidden_size=state[f"{prefix}0.weight"].shape[1], num_answers=n_rows)
        source.load_state_dict(
            {k[len("objectives.qa.") :]: v for k, v in state.items() if k.startswith("objectives.qa.")}
        )
        ans2label = load_ans2label(self.data_info["answers_file"])
        target_answers = [""] * len(ans2label)
        for a, i in ans2label.items():
            target_answers[i] = a
        self.qa_rows_copied = copy_answer_rows(source.classifier, source_answers, head, target_answers, convert_ans)
        log.info(
            "VQA head initialised from the stage-2 QA head: %d of %d answers matched (%d pretraining answers)",
            self.qa_rows_copied,
            len(target_answers),
            len(source_answers),
        )
