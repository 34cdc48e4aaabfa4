"""VG-BERT's objectives (spec: vg_bert.md): the stage-2 cross-modal contrastive loss, the stage-3 relational
grounding losses and the transfer-retrieval pooled contrastive loss, as plain functions (tested against independent
computations) and as heads on `VGBertEncoder`'s outputs. Registered when `vl.models.vg_bert` is imported.

- `similarity_matrix`: S[i, j] = mean over the first nwords_j tokens t of caption j (nwords counts [CLS] and [SEP]) of
  max over the patches p of image i of <v_ip, w_jt> (raw dot products).
- `cross_modal_contrastive_loss`: L_I2L = mean_i -log softmax_j(S[i, :] / sigma)[i], L_L2I = mean_i
  -log softmax_j(S[:, i] / sigma)[i]; loss = L_I2L + L_L2I (sigma 0.1).
- `pooled_contrastive_loss` (transfer): the same on cosine similarities of pooled vectors.
- `relation_contrastive_loss` (stage 3, temperature T = 1): for every true pair (b, i, j) with class c > 0
  * pair term: -log softmax over [r_c(b, i, j)] + [r_c(b', i', j') for every non-null pair of the **whole batch**
    whose class is not c], all / T;
  * relation term: -log softmax_k(r_k(b, i, j) / T)[c];
  each summed over the pairs and divided by B.
- object classification: CE of Linear(768,256)-ReLU-Dropout-Linear(256,56) on the cross-attended object states,
  summed over the counted objects and divided by B. Counted objects (`object_loss_mask`): "class_nonzero" (default,
  the seed's `object_target > 0`: class 0 is also the padding value) or "objects" (every real object).

Under DDP the stage-2 and transfer losses use the negatives of **all ranks**: the embeddings are gathered with
`torch.distributed.nn.functional.all_gather` (the gradient flows back to the rank that made them), and every rank
computes the loss of the global batch. DDP then averages identical-loss gradients: each rank's parameters get
(world size x dL/dx_own) through the gather's backward, averaged over ranks = dL/dtheta of the global-batch loss.
The stage-3 pair term's negatives ("every non-null pair of the whole batch") are gathered the same way
(`gather_pairs_with_grad`: each true pair's row of scores r_k / T and its class), so every rank computes the pair term
of the global batch divided by the global B; the object and relation terms are per example / per pair and stay local
(DDP's mean of the ranks' sums / B_rank is the global sum / B when the ranks hold equal batches). Validation batches
are not gathered (ranks may hold unequal batches); retrieval recall is computed over the whole split by the system
(`VGBertSystem`). `gather: false` on a head keeps each rank's own negatives (a deliberate difference).

The batch of these losses is the batch of one optimiser step: gradient accumulation (data.batch_size_per_device x
devices < data.batch_size) would compute each softmax over a micro-batch; `VGBertSystem` refuses it unless
`model.micro_batch_negatives=true`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from vl.errors import ConfigError
from vl.heads.base import EncoderOutput, HeadContext, Objective, ObjectiveResult
from vl.metrics import Accuracy

__all__ = [
    "SIMILARITY_BLOCK",
    "similarity_matrix",
    "cross_modal_contrastive_loss",
    "pooled_contrastive_loss",
    "relation_contrastive_loss",
    "relation_pair_rows",
    "pair_term_sum",
    "relation_scores",
    "gather_with_grad",
    "gather_pairs_with_grad",
    "GroundingContrastive",
    "RelationalGrounding",
    "TransferRetrieval",
]


# ------------------------------------------------------------------------------------------------ functions
#: at most this many patch x word dot products are held at once by `similarity_matrix` (256 MiB in float32)
SIMILARITY_BLOCK = 1 << 26


def similarity_matrix(
    patches: torch.Tensor, words: torch.Tensor, nwords: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """patches (B, P, H), words (N, T, H), nwords (N,) -> S (B, N) (module docstring); images in chunks of `chunk`
    (None: as many as keep the chunk's (chunk, N, P, T) dot products within `SIMILARITY_BLOCK` values, so a
    whole-split ranking of 5 000 images x 5 000 captions holds ~256 MiB, not a fixed 64 images' ~8 GB)."""
    t = words.shape[1]
    if chunk is None:
        chunk = max(1, SIMILARITY_BLOCK // max(1, words.shape[0] * patches.shape[1] * t))
    valid = (torch.arange(t, device=words.device)[None, :] < nwords.clamp(min=1)[:, None]).to(words.dtype)  # (N, T)
    rows = []
    for start in range(0, patches.shape[0], chunk):
        dots = torch.einsum("iph,jth->ijpt", patches[start : start + chunk], words)  # (b, N, P, T)
        best = dots.max(dim=2).values  # (b, N, T)
        rows.append((best * valid[None]).sum(-1) / nwords.clamp(min=1).to(words.dtype)[None])
    return torch.cat(rows)


def _two_way_ce(sim: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.arange(sim.shape[0], device=sim.device)
    return F.cross_entropy(sim / sigma, target), F.cross_entropy(sim.T / sigma, target)


def cross_modal_contrastive_loss(
    patches: torch.Tensor, words: torch.Tensor, nwords: torch.Tensor, sigma: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_I2L, L_L2I) of the stage-2 loss (module docstring); image i and caption i are the positives."""
    return _two_way_ce(similarity_matrix(patches, words, nwords), sigma)


def pooled_contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, sigma: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_I2L, L_L2I) on cosine similarities of pooled image (B, D) and text (B, D) vectors (the seed's
    `finetune_pooled_contrastive_loss`)."""
    return _two_way_ce(F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T, sigma)


def relation_scores(objects: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """objects (B, N, d), matrices (K, d, d) -> r (B, K, N, N) with r_k(i, j) = o_i^T M_k o_j."""
    return torch.einsum("bid,kde,bje->bkij", objects, matrices, objects)


def relation_pair_rows(
    scores: torch.Tensor, target: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (B, K, N, N), target (B, N, N) long (0 = no relation) -> (rows (P, K): r_k(b, i, j) / T at every true
    pair (b, i, j), classes (P,)): all that the pair and relation terms read."""
    b, k = scores.shape[:2]
    flat = scores.reshape(b, k, -1) / temperature  # (B, K, M)
    tgt = target.reshape(b, -1)  # (B, M)
    bi, mi = (tgt > 0).nonzero(as_tuple=True)
    return flat[bi, :, mi], tgt[bi, mi]


def pair_term_sum(
    rows: torch.Tensor,
    classes: torch.Tensor,
    negative_rows: torch.Tensor | None = None,
    negative_classes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over the pairs p of `rows` of -log softmax over [rows[p, c_p]] + [negative_rows[q, c_p] for every q whose
    class is not c_p] (the negatives default to `rows` themselves: the pairs of one batch). Vectorised per class."""
    if negative_rows is None or negative_classes is None:
        negative_rows, negative_classes = rows, classes
    positive = rows.gather(1, classes[:, None]).squeeze(1)  # (P,)
    neg_lse = torch.full_like(positive, float("-inf"))
    for c in classes.unique().tolist():
        negatives = negative_rows[negative_classes != c, c]
        if negatives.numel():
            neg_lse = torch.where(classes == c, torch.logsumexp(negatives, dim=0), neg_lse)
    return (torch.logaddexp(positive, neg_lse) - positive).sum()


def relation_contrastive_loss(
    scores: torch.Tensor, target: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (B, K, N, N), target (B, N, N) long (0 = no relation) -> (pair term, relation term), each summed over
    the true pairs and divided by B (module docstring). Vectorised per class; equal to the seed's per-pair loop."""
    b = scores.shape[0]
    rows, classes = relation_pair_rows(scores, target, temperature)
    if not rows.shape[0]:
        zero = scores.sum() * 0.0
        return zero, zero
    return pair_term_sum(rows, classes) / b, F.cross_entropy(rows, classes, reduction="sum") / b


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (B, ...) from every rank along dim 0, differentiably (torch.distributed.nn); `x` itself when
    not distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_pairs_with_grad(
    rows: torch.Tensor, classes: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(rows (P, K), classes (P,), B) of this rank -> those of every rank (rows differentiably; ranks hold unequal
    pair counts: padded to the largest with class 0, then dropped) and the global B; unchanged when not
    distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows, classes, batch_size
    from torch.distributed.nn.functional import all_gather

    world = dist.get_world_size()
    counts = torch.tensor([rows.shape[0], batch_size], device=rows.device, dtype=torch.long)
    everyone = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(everyone, counts)
    most = max(int(c[0]) for c in everyone)
    padded_rows = F.pad(rows, (0, 0, 0, most - rows.shape[0]))
    padded_classes = F.pad(classes, (0, most - classes.shape[0]))  # 0 = no relation: dropped below
    all_classes = [torch.zeros_like(padded_classes) for _ in range(world)]
    dist.all_gather(all_classes, padded_classes.contiguous())
    all_rows = torch.cat(all_gather(padded_rows.contiguous()), dim=0)
    all_cls = torch.cat(all_classes, dim=0)
    keep = all_cls > 0
    return all_rows[keep], all_cls[keep], sum(int(c[1]) for c in everyone)


def _topk_hits(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == target[:, None]).any(-1).long()


# ------------------------------------------------------------------------------------------------ heads
class GroundingContrastive(Objective):
    """Stage 2: `cross_modal_contrastive_loss` of the projected patches (`out.visual` (B, P, H)) and words (`out.text`
    (B, T, H); nwords = the attention mask's sum). Metric `vg_contrastive_acc`: in-batch image->text top-1."""

    name = "vg_contrastive"
    needs = ("image", "text")
    requires = ("attention_mask",)

    def __init__(self, *, sigma: float = 0.1, gather: bool = True) -> None:
        super().__init__()
        self.sigma, self.gather = sigma, gather

    @classmethod
    def build(cls, ctx: HeadContext, **options: Any) -> GroundingContrastive:
        return cls(**options)

    def embeddings(self, out: EncoderOutput, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image (B, P, H), text (B, T, H), nwords (B,)): what the retrieval metric stores."""
        return out.visual, out.text, batch["attention_mask"].sum(1)

    def forward(self, out: EncoderOutput, batch: dict[str, Any]) -> ObjectiveResult:
        patches, words, nwords = self.embeddings(out, batch)
        if self.gather and self.training:
            patches, words, nwords = gather_with_grad(patches), gather_with_grad(words), gather_with_grad(nwords)
        sim = similarity_matrix(patches, words, nwords)
        i2l, l2i = _two_way_ce(sim, self.sigma)
        return ObjectiveResult(i2l + l2i, sim, torch.arange(sim.shape[0], device=sim.device))

    @staticmethod
    def score(images: tuple[torch.Tensor, ...], texts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """images ((N, P, H),), texts ((M, T, H), (M,)) -> (N, M) similarity."""
        return similarity_matrix(images[0], texts[0], texts[1])

    def make_metrics(self) -> dict[str, Metric]:
        return {f"{self.name}_acc": Accuracy()}


class TransferRetrieval(Objective):
    """Transfer retrieval: 2-layer projection heads on the cross-attention keys of the patches (`out.visual`) and
    queries of the words (`out.text`) - Linear-ReLU-Dropout-Linear per position (the seed's Conv1x1 pair on the image
    side is the same map) - mean-pooled (image: over the cells; language: over all T positions as the seed's
    `torch.mean(language_metric, 1)`, or over the real tokens with `language_pool: tokens`), then
    `pooled_contrastive_loss` (sigma 0.1). Only these heads train in `experiment=vg_bert_transfer_retrieval`."""

    name = "vg_transfer"
    needs = ("image", "text")
    requires = ("attention_mask",)

    def __init__(
        self,
        *,
        hidden_size: int,
        metric_dim: int | None = None,
        sigma: float = 0.1,
        dropout: float = 0.5,
        language_pool: str = "all",
        gather: bool = True,
    ) -> None:
        super().__init__()
        if language_pool not in ("all", "tokens"):
            raise ConfigError(f"model.heads.vg_transfer.language_pool: '{language_pool}' is not 'all' or 'tokens'")
        metric_dim = metric_dim or hidden_size
        self.image_projection_head = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.ReLU(True), nn.Dropout(dropout), nn.Linear(hidden_size, metric_dim)
        )
        self.language_projection_head = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.ReLU(True), nn.Dropout(dropout), nn.Linear(hidden_size, metric_dim)
        )
        self.sigma, self.language_pool, self.gather = sigma, language_pool, gather

    @classmethod
    def build(cls, ctx: HeadContext, **options: Any) -> TransferRetrieval:
        return cls(hidden_size=ctx.visual_size, **options)

    def embeddings(self, out: EncoderOutput, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled image (B, D), pooled text (B, D))."""
        image = self.image_projection_head(out.visual).mean(1)
        words = self.language_projection_head(out.text)
        if self.language_pool == "all":
            text = words.mean(1)
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(words.dtype)
            text = (words * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return image, text

    def forward(self, out: EncoderOutput, batch: dict[str, Any]) -> ObjectiveResult:
        image, text = self.embeddings(out, batch)
        if self.gather and self.training:
            image, text = gather_with_grad(image), gather_with_grad(text)
        sim = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
        i2l, l2i = _two_way_ce(sim, self.sigma)
        return ObjectiveResult(i2l + l2i, sim, torch.arange(sim.shape[0], device=sim.device))

    @staticmethod
    def score(images: tuple[torch.Tensor, ...], texts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.normalize(images[0], dim=-1) @ F.normalize(texts[0], dim=-1).T

    def make_metrics(self) -> dict[str, Metric]:
        return {f"{self.name}_acc": Accuracy()}


class RelationalGrounding(Objective):
    """Stage 3 on the cross-attended object states (`out.text` (B, N, H)): `object_transform` Linear(H, d=32),
    `relational_matrix` (K=115, d, d) xavier-initialised, each matrix L2-normalised flattened then dropped out,
    scores r_k(i, j) = o_i^T M_k o_j; object classifier Linear(H,256)-ReLU-Dropout-Linear(256,C=56). Loss = object CE
    + pair term + relation term (module docstring; T = `temperature`, 1). Metrics, as the seed's `traintest.py`
    reports them: `rel_acc` / `rel_acc5` / `rel_acc10` (relation top-1 / 5 / 10 over the non-null pairs; `rel_acc` is
    the stage's monitor), `obj_acc1` / `obj_acc5` / `obj_acc10` (over the counted objects)."""

    name = "vg_relational"
    needs = ("image", "text")
    requires = ("relation_target", "object_target")

    def __init__(
        self,
        *,
        hidden_size: int,
        num_relations: int = 115,
        num_object_classes: int = 56,
        subspace_dim: int = 32,
        dropout: float = 0.1,
        classifier_dropout: float = 0.1,
        temperature: float = 1.0,
        object_loss_mask: str = "class_nonzero",
        gather: bool = True,
    ) -> None:
        """`gather`: under DDP, the pair term's negatives come from every rank (the whole batch, as the spec);
        false: from this rank's examples only."""
        super().__init__()
        if object_loss_mask not in ("class_nonzero", "objects"):
            raise ConfigError(
                f"model.heads.vg_relational.object_loss_mask: '{object_loss_mask}' is not 'class_nonzero' or 'objects'"
            )
        self.object_transform = nn.Linear(hidden_size, subspace_dim)
        self.relational_matrix = nn.Parameter(torch.zeros(num_relations, subspace_dim, subspace_dim))
        nn.init.xavier_uniform_(self.relational_matrix)
        self.dropout = nn.Dropout(dropout)
        self.object_classifier = nn.Sequential(
            nn.Linear(hidden_size, 256),
            nn.ReLU(True),
            nn.Dropout(classifier_dropout),
            nn.Linear(256, num_object_classes),
        )
        self.num_relations, self.num_object_classes = num_relations, num_object_classes
        self.temperature, self.object_loss_mask, self.gather = temperature, object_loss_mask, gather

    @classmethod
    def build(cls, ctx: HeadContext, **options: Any) -> RelationalGrounding:
        info = ctx.data_info
        defaults = {k: int(info[k]) for k in ("num_relations", "num_object_classes") if k in info}
        return cls(hidden_size=ctx.text_size, **{**defaults, **options})

    def normalized_matrices(self) -> torch.Tensor:
        k, d, _ = self.relational_matrix.shape
        return self.dropout(F.normalize(self.relational_matrix.reshape(k, -1), p=2, dim=1).reshape(k, d, d))

    def outputs(self, out: EncoderOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(relation scores (B, K, N, N), object logits (B, N, C))."""
        objects = out.text
        return relation_scores(self.object_transform(objects), self.normalized_matrices()), self.object_classifier(
            objects
        )

    def forward(self, out: EncoderOutput, batch: dict[str, Any]) -> ObjectiveResult:
        scores, obj_logits = self.outputs(out)
        relations, classes = batch["relation_target"], batch["object_target"]
        b = classes.shape[0]
        counted = classes > 0 if self.object_loss_mask == "class_nonzero" else batch["object_mask"].bool()
        obj_loss = F.cross_entropy(obj_logits[counted], classes[counted], reduction="sum") / b
        rows, rel_classes = relation_pair_rows(scores, relations, self.temperature)
        relation = F.cross_entropy(rows, rel_classes, reduction="sum") / b if rows.shape[0] else scores.sum() * 0.0
        all_rows, all_classes, global_b = rows, rel_classes, b
        if self.gather and self.training:  # the negatives of the whole batch: every rank's pairs
            all_rows, all_classes, global_b = gather_pairs_with_grad(rows, rel_classes, b)
        pair = pair_term_sum(all_rows, all_classes) / global_b if all_rows.shape[0] else scores.sum() * 0.0
        self.last_parts = {"object": obj_loss.detach(), "pair": pair.detach(), "relation": relation.detach()}
        self.last_objects = (obj_logits[counted].detach(), classes[counted])  # for the object top-k metrics
        valid = relations > 0
        rel_logits = scores.permute(0, 2, 3, 1)[valid]  # (P, K): the true pairs' scores over the relations
        return ObjectiveResult(obj_loss + pair + relation, rel_logits, relations[valid])

    def make_metrics(self) -> dict[str, Metric]:
        names = ("rel_acc", "rel_acc5", "rel_acc10", "obj_acc1", "obj_acc5", "obj_acc10")
        return {name: Accuracy() for name in names}

    def update_metrics(self, metrics: nn.ModuleDict, result: ObjectiveResult) -> None:
        if result.target.numel():
            metrics["rel_acc"].update(result.logits.argmax(-1), result.target)
            for k in (5, 10):
                hits = _topk_hits(result.logits, result.target, min(k, result.logits.shape[-1]))
                metrics[f"rel_acc{k}"].update(hits, torch.ones_like(hits))
        obj_logits, obj_target = self.last_objects
        if obj_target.numel():
            for k in (1, 5, 10):
                hits = _topk_hits(obj_logits, obj_target, k)
                metrics[f"obj_acc{k}"].update(hits, torch.ones_like(hits))
