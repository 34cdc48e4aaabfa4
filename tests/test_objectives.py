"""Objectives and metrics against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vl.data.region_batch import mask_regions
from vl.errors import ConfigError
from vl.eval.retrieval import chunked_ranks
from vl.heads import (
    EncoderOutput,
    MaskedRegionClassification,
    MultipleChoice,
    RegionGrounding,
    VCRMultipleChoice,
)
from vl.metrics import RetrievalRecall, VQAAccuracy


def test_masked_region_kl_equals_hand_computation() -> None:
    torch.manual_seed(0)
    head = MaskedRegionClassification(hidden_size=8, num_classes=5)
    visual = torch.randn(2, 4, 8)  # global token + 3 regions
    out = EncoderOutput(text=torch.zeros(2, 3, 8), visual=visual, pooled=torch.zeros(2, 8), visual_prefix=1)
    target = torch.softmax(torch.randn(2, 3, 5), -1)
    masked = torch.tensor([[True, False, True], [False, False, True]])
    result = head(out, {"region_mask_labels": masked, "region_cls_prob": target})
    logits = head.head(visual[:, 1:])  # global token dropped
    expected = 0.0
    for b, r in masked.nonzero().tolist():
        p, q = target[b, r], torch.log_softmax(logits[b, r], -1).detach()
        expected += float((p * (p.log() - q)).sum())
    assert torch.isclose(result.loss, torch.tensor(expected / 3), atol=1e-6)
    assert result.target.tolist() == [
        int(target[0, 0].argmax()),
        int(target[0, 2].argmax()),
        int(target[1, 2].argmax()),
    ]


def test_region_masking_rates_and_padding() -> None:
    from vl.data.draws import example_keys

    feats = torch.ones(400, 10, 3)
    vmask = torch.ones(400, 10, dtype=torch.long)
    vmask[:, 8:] = 0
    masked, chosen = mask_regions(feats, vmask, keys=example_keys(7, [0] * 400, range(400)))
    assert not chosen[:, 8:].any()  # padding is never chosen
    assert abs(chosen[:, :8].float().mean().item() - 0.15) < 0.02
    zeroed = (masked.abs().sum(-1) == 0) & chosen
    assert abs(zeroed.sum().item() / chosen.sum().item() - 0.9) < 0.05
    assert (masked[~chosen] == 1).all()


def test_vqa_accuracy_is_the_soft_score_of_the_argmax() -> None:
    metric = VQAAccuracy()
    scores = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.6, 0.9], [0.3, 0.0, 0.0]])
    logits = torch.tensor([[5.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 2.0]])
    metric.update(logits, scores)
    assert torch.isclose(metric.compute(), torch.tensor((1.0 + 0.6 + 0.0) / 3))


@pytest.mark.parametrize("loss_scale", [None, 500])
def test_vqa_loss_is_the_seeds_bce_times_answers_or_loss_scale(loss_scale) -> None:
    """CLIP-ViL's `src/tasks/vqa.py`: BCEWithLogits (mean over batch x answers) x loss_scale when it is set, else x
    the number of answers; computed here in numpy."""
    from vl.heads.vqa import VQAClassification

    torch.manual_seed(0)
    head = VQAClassification(hidden_size=8, num_answers=11, loss_scale=loss_scale)
    pooled, target = torch.randn(5, 8), torch.rand(5, 11) * (torch.rand(5, 11) < 0.3)
    out = EncoderOutput(text=torch.zeros(5, 1, 8), visual=None, pooled=pooled)
    loss = head(out, {"vqa_targets": target}).loss
    x = head.classifier(pooled).detach().double().numpy()
    y = target.double().numpy()
    bce = (np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))).mean()
    assert loss.item() == pytest.approx(bce * (loss_scale or 11), rel=1e-5)
    with pytest.raises(ConfigError, match="loss_scale"):
        VQAClassification(hidden_size=8, num_answers=11, loss_scale=0)


def test_chunked_ranks_match_brute_force_numpy() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(37, 23))
    gold = rng.integers(0, 23, size=37).tolist()

    def block(texts: list[int], images: list[int]) -> torch.Tensor:
        return torch.from_numpy(scores[np.ix_(texts, images)])

    ranks = chunked_ranks(block, 37, 23, gold, text_chunk=5, image_chunk=7)
    brute = 1 + (scores > scores[np.arange(37), gold][:, None]).sum(1)
    assert (ranks == brute).all()
    metric = RetrievalRecall()
    metric.update(torch.from_numpy(ranks))
    got = metric.compute()
    for k in (1, 5, 10):
        assert abs(float(got[f"recall@{k}"]) - float((brute <= k).mean())) < 1e-6
    assert float(got["median_rank"]) == float(np.floor(np.median(brute - 1) + 1))  # ViLBERT's eval_retrieval.py
    assert abs(float(got["mean_rank"]) - brute.mean()) < 1e-5


def test_seed_alignment_head_converts_to_vl_itm_convention() -> None:
    from vl.heads import ImageTextMatching, itm_head_from_seed, itm_labels_from_seed

    torch.manual_seed(0)
    seed_w, seed_b = torch.randn(2, 6), torch.randn(2)
    pooled = torch.randn(5, 6)
    seed_aligned_prob = torch.softmax(pooled @ seed_w.T + seed_b, -1)[:, 0]  # seed: 0 = aligned
    head = ImageTextMatching(hidden_size=6)
    w, b = itm_head_from_seed(seed_w, seed_b)
    head.classifier.weight.data.copy_(w)
    head.classifier.bias.data.copy_(b)
    vl_aligned_prob = torch.softmax(head.classifier(pooled), -1)[:, 1]  # vl: 1 = aligned
    assert torch.allclose(seed_aligned_prob, vl_aligned_prob)
    assert itm_labels_from_seed(torch.tensor([0, 1, 0])).tolist() == [1, 0, 1]


def test_shortlist_rerank_equals_exhaustive_when_k_is_n() -> None:
    from vl.eval.retrieval import shortlist_ranks

    rng = np.random.default_rng(1)
    scores = rng.normal(size=(29, 17))
    cheap = rng.normal(size=(29, 17))
    gold = rng.integers(0, 17, size=29).tolist()

    def block(texts: list[int], images: list[int]) -> torch.Tensor:
        return torch.from_numpy(scores[np.ix_(texts, images)])

    exhaustive = chunked_ranks(block, 29, 17, gold, text_chunk=4, image_chunk=6)
    assert (shortlist_ranks(block, cheap, gold, k=17) == exhaustive).all()
    short = shortlist_ranks(block, cheap, gold, k=5)
    in_list = np.array([g in np.argsort(-cheap[t], kind="stable")[:5] for t, g in enumerate(gold)])
    assert (short[~in_list] == 6).all() and (short[in_list] <= exhaustive[in_list]).all()


def _pooled_rows(n: int, hidden: int = 6) -> EncoderOutput:
    return EncoderOutput(text=torch.zeros(n, 2, hidden), visual=None, pooled=torch.randn(n, hidden))


def test_vcr_accuracies_match_numpy() -> None:
    """Q->A, QA->R and joint Q->AR from the 2 x 4-way blocks, with unlabelled entries (-1) skipped."""
    torch.manual_seed(1)
    head = VCRMultipleChoice(hidden_size=6)
    labels = torch.randint(0, 4, (40, 2))
    labels[3, 1] = -1  # rationale unknown: counts for Q->A only
    labels[7, 0] = -1
    batch = {"mc_labels": labels}
    out = _pooled_rows(40 * 8)
    result = head(out, batch)
    metrics = torch.nn.ModuleDict(head.make_metrics())
    head.update_metrics(metrics, result)
    logits = head.score(out.pooled).view(40, 2, 4).detach().numpy()
    pred, lab = logits.argmax(-1), labels.numpy()
    qa_keep, qar_keep = lab[:, 0] >= 0, lab[:, 1] >= 0
    both = qa_keep & qar_keep
    expected = {
        "vcr_qa_acc": (pred[qa_keep, 0] == lab[qa_keep, 0]).mean(),
        "vcr_qar_acc": (pred[qar_keep, 1] == lab[qar_keep, 1]).mean(),
        "vcr_q2ar_acc": ((pred[both] == lab[both]).all(1)).mean(),
    }
    for name, value in expected.items():
        assert abs(float(metrics[name].compute()) - value) < 1e-6, name
    # loss: mean cross-entropy over the labelled blocks
    flat = torch.as_tensor(logits).view(-1, 4)
    keep = labels.flatten() >= 0
    ce = torch.nn.functional.cross_entropy(flat[keep], labels.flatten()[keep])
    assert torch.isclose(result.loss, ce, atol=1e-6)


def test_retrieval_multiple_choice_loss_is_4way_ce() -> None:
    torch.manual_seed(2)
    head = MultipleChoice(hidden_size=6)
    out = _pooled_rows(5 * 4)
    labels = torch.zeros(5, 1, dtype=torch.long)  # the true pair is choice 0
    result = head(out, {"mc_labels": labels})
    scores = head.score(out.pooled).view(5, 4)
    expected = -torch.log_softmax(scores, -1)[:, 0].mean()
    assert torch.isclose(result.loss, expected, atol=1e-6)


def test_region_grounding_loss_and_accuracy_match_hand_computation() -> None:
    """BCE vs IoU targets averaged over B x R and scaled by R, padded regions excluded from the arg-max;
    accuracy = IoU of the arg-max region > 0.5."""
    torch.manual_seed(3)
    head = RegionGrounding(hidden_size=6).eval()  # no dropout before vision_logit in eval mode
    b, r = 6, 5
    visual = torch.randn(b, r + 1, 6)  # a global token first, as ViLBERT returns
    out = EncoderOutput(text=torch.zeros(b, 2, 6), visual=visual, pooled=torch.zeros(b, 6), visual_prefix=1)
    ious = torch.rand(b, r)
    mask = torch.ones(b, r, dtype=torch.long)
    mask[:, 4] = 0  # a padded region: never the arg-max, even with a huge raw logit
    ious[:, 4] = 1.0
    targets = torch.where(ious < 0.5, torch.zeros_like(ious), ious) * mask
    with torch.no_grad():
        head.vision_logit.bias.fill_(0.0)
    result = head(out, {"refer_targets": targets, "refer_ious": ious, "visual_mask": mask})
    raw = head.vision_logit(visual[:, 1:]).squeeze(-1).detach().numpy()
    raw[:, 4] = -1e4
    t = targets.numpy()
    bce = np.maximum(raw, 0) - raw * t + np.log1p(np.exp(-np.abs(raw)))
    assert abs(float(result.loss.detach()) - bce.mean() * r) < 1e-5
    metrics = torch.nn.ModuleDict(head.make_metrics())
    head.update_metrics(metrics, result)
    best = ious.numpy()[np.arange(b), raw.argmax(1)]
    assert raw.argmax(1).max() < 4
    assert abs(float(metrics["refer_acc"].compute()) - (best > 0.5).mean()) < 1e-6


def test_region_grounding_whole_image_token_is_a_candidate_as_in_vilbert() -> None:
    """vilbert-multi-task scores every vision position, the global (whole-image) token too: its target is the IoU of
    [0, 0, W, H] with the referred box. Loss = BCE mean over B x (1 + R) x (1 + R); the arg-max may be the whole image
    (prediction region -1)."""
    torch.manual_seed(4)
    head = RegionGrounding(hidden_size=6).eval()  # no dropout before vision_logit in eval mode
    b, r = 5, 4
    visual = torch.randn(b, r + 1, 6)
    out = EncoderOutput(text=torch.zeros(b, 2, 6), visual=visual, pooled=torch.zeros(b, 6), visual_prefix=1)
    ious = torch.rand(b, r) * 0.6
    image_iou = torch.tensor([0.9, 0.1, 0.7, 0.2, 0.55])
    mask = torch.ones(b, r, dtype=torch.long)
    targets = torch.where(ious < 0.5, torch.zeros_like(ious), ious)
    image_target = torch.where(image_iou < 0.5, torch.zeros_like(image_iou), image_iou)
    with torch.no_grad():
        head.vision_logit.bias.fill_(0.0)
        head.vision_logit.weight.copy_(visual[0, 0] / visual[0, 0].norm() * 5)  # example 0 prefers the whole image
    batch = {
        "refer_targets": targets,
        "refer_ious": ious,
        "visual_mask": mask,
        "refer_image_target": image_target,
        "refer_image_iou": image_iou,
        "ref_id": torch.arange(b),
        "sent_id": torch.arange(b),
    }
    result = head(out, batch)
    raw = (visual.numpy() @ head.vision_logit.weight.detach().numpy().T)[..., 0]  # (B, 1 + R), bias 0
    t = np.concatenate([image_target.numpy()[:, None], targets.numpy()], 1)
    bce = np.maximum(raw, 0) - raw * t + np.log1p(np.exp(-np.abs(raw)))
    assert abs(float(result.loss.detach()) - bce.mean() * (r + 1)) < 1e-5
    metrics = torch.nn.ModuleDict(head.make_metrics())
    head.update_metrics(metrics, result)
    all_ious = np.concatenate([image_iou.numpy()[:, None], ious.numpy()], 1)
    best = all_ious[np.arange(b), raw.argmax(1)]
    assert abs(float(metrics["refer_acc"].compute()) - (best > 0.5).mean()) < 1e-6
    preds = head.predictions(result, batch)
    assert [p["region"] for p in preds] == (raw.argmax(1) - 1).tolist() and preds[0]["region"] == -1
    # the option off: regions only (the earlier behaviour)
    head.whole_image_candidate = False
    assert head(out, batch).logits.shape == (b, r)


def test_vcr_five_block_layout_scores_the_gold_answer_block() -> None:
    """Test-split layout (Q->A + QA->R under each answer): metrics equal the 2-block ones built from the gold block."""
    torch.manual_seed(4)
    head = VCRMultipleChoice(hidden_size=6)
    answer, rationale = torch.randint(0, 4, (30,)), torch.randint(0, 4, (30,))
    five = torch.full((30, 5), -1)
    five[:, 0] = answer
    five[torch.arange(30), 1 + answer] = rationale
    out = _pooled_rows(30 * 20)
    result = head(out, {"mc_labels": five})
    metrics = torch.nn.ModuleDict(head.make_metrics())
    head.update_metrics(metrics, result)
    pred = head.score(out.pooled).view(30, 5, 4).argmax(-1)
    qa = pred[:, 0] == answer
    qar = pred[torch.arange(30), 1 + answer] == rationale
    assert torch.isclose(metrics["vcr_qa_acc"].compute(), qa.float().mean())
    assert torch.isclose(metrics["vcr_qar_acc"].compute(), qar.float().mean())
    assert torch.isclose(metrics["vcr_q2ar_acc"].compute(), (qa & qar).float().mean())
    rows = head.predictions(result, {"annot_id": [f"test-{i}" for i in range(30)]})
    assert len(rows[0]["rationale_probs"]) == 4 and len(rows[0]["rationale_probs"][0]) == 4
    # the leaderboard file, read back with csv: vilbert-multi-task `script/VCR_submission.py`'s columns, each block of
    # 4 a softmax of that block's vil_logits (computed here in numpy)
    import csv
    import tempfile
    from pathlib import Path

    from vl.data.formats.vcr import write_vcr_submission

    z = head.score(out.pooled).detach().double().view(30, 5, 4).numpy()
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_vcr_submission(rows, Path(tmp) / "vcr_submission.csv")
        with open(path, newline="") as f:
            table = list(csv.DictReader(f))
    groups = ["answer"] + [f"rationale_conditioned_on_a{i}" for i in range(4)]
    assert list(table[0]) == ["annot_id"] + [f"{g}_{j}" for g in groups for j in range(4)]
    for i, line in enumerate(table):
        assert line["annot_id"] == f"test-{i}"
        got = np.array([[float(line[f"{g}_{j}"]) for j in range(4)] for g in groups])
        np.testing.assert_allclose(got, probs[i], rtol=0, atol=1e-6)


def test_a_second_head_with_a_taken_name_is_refused() -> None:
    """Head names are the registry keys `data.objectives` picks by: a plugin head reusing one (here 'vqa') must not
    silently replace the built-in."""
    from vl.heads import HEADS, Objective

    before = HEADS["vqa"]
    with pytest.raises(TypeError, match=r"objective name 'vqa' .* already taken by vl\.heads\.vqa\.VQAClassification"):

        class AnotherVQA(Objective):  # noqa: F841 - defining it is the test
            name = "vqa"

    assert HEADS["vqa"] is before


def _every_head(hidden: int = 48):
    """Every registered head built at `hidden` with a small context (the ViLBERT VQA head both ways)."""
    from torch import nn

    from vl.heads import HEADS, HeadContext

    info = {"num_answers": 40, "num_region_classes": 30, "visual_dim": 24, "num_object_classes": 20,
            "num_relations": 5, "mlt_outputs": 50, "num_mlt_words": 50}  # fmt: skip
    ctx = HeadContext(hidden, hidden, hidden, word_embeddings=nn.Embedding(100, hidden), data_info=info)
    heads = {}
    for name, cls in sorted(HEADS.items()):
        try:
            heads[name] = cls.build(ctx)
        except Exception:  # noqa: BLE001 - a head whose context this small test does not give (listed below)
            continue
    heads["vqa_simple"] = HEADS["vqa"].build(ctx, classifier="simple")
    return ctx, heads


def test_heads_are_initialised_as_the_seeds_bert_init() -> None:
    """`Objective.bert_init` (VLSystem's default `head_init_std` 0.02) against what the seeds' `init_bert_weights` /
    HF `_init_weights` leave in a head: each Linear weight drawn N(0, 0.02) (sample mean and std within 5 standard
    errors), biases 0, LayerNorms 1 / 0; a weight-normed Linear (ViLBERT's SimpleClassifier) keeps g and v (the seed's
    normal draw lands on a recomputed attribute) with its bias zeroed; the tied word embeddings are not touched."""
    from torch import nn

    from vl.heads.vqa import WeightNormLinear

    torch.manual_seed(0)
    ctx, heads = _every_head()
    assert {"itm", "mlm", "vqa", "vqa_simple", "mrc", "mvrc", "itm_bce"} <= set(heads), sorted(heads)
    embeddings = ctx.word_embeddings.weight.detach().clone()
    for name, head in heads.items():
        norms = [m for m in head.modules() if isinstance(m, WeightNormLinear)]
        kept = [[p.detach().clone() for p in m.parametrizations.parameters()] for m in norms]
        head.bert_init(0.02)
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        for m in linears:
            w = m.weight.detach().double().flatten()
            n = w.numel()
            assert abs(w.std().item() / 0.02 - 1) < 5 * (2 * n) ** -0.5 + 1e-3, name
            assert abs(w.mean().item()) < 5 * 0.02 / n**0.5, name
            assert m.bias is None or not m.bias.any(), name
        for m in head.modules():
            if isinstance(m, nn.LayerNorm):
                assert bool((m.weight == 1).all()) and not m.bias.any(), name
        for m, params in zip(norms, kept):
            assert not m.bias.any(), name
            assert all(torch.equal(a, b) for a, b in zip(m.parametrizations.parameters(), params)), name
        assert (len(norms) == 2) == (name == "vqa_simple"), name
    torch.testing.assert_close(ctx.word_embeddings.weight, embeddings, rtol=0, atol=0)


def test_head_init_options_and_each_systems_seed_default() -> None:
    """`model.head_init`: "seed" (default) is BERT's N(0, 0.02) for every system but VG-BERT, whose seed heads keep
    PyTorch's init; "torch" leaves each layer's PyTorch init (non-zero biases); anything else is a ConfigError."""
    import inspect

    from vl.errors import ConfigError
    from vl.models.system import VLSystem
    from vl.models.vg_bert import VGBertSystem

    assert inspect.signature(VLSystem.__init__).parameters["head_init"].default == "seed"
    assert VLSystem.SEED_HEAD_INIT == "bert" and VGBertSystem.SEED_HEAD_INIT == "torch"
    torch.manual_seed(0)
    _, heads = _every_head()
    assert heads["itm"].classifier.bias.abs().sum() > 0  # nn.Linear's default init, untouched until bert_init

    def system(head_init: str) -> VLSystem:
        torch.manual_seed(0)
        return VLSystem(
            encoder=_TinyEncoder(),
            objectives=["itm"],
            data_info={},
            optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
            head_init=head_init,
        )

    assert not system("seed").objectives["itm"].classifier.bias.any()
    from vl.models.system import initializer_range

    assert initializer_range(_TinyEncoder()) == 0.02  # no config: BERT's
    from vl.models.bert_backbone import build_bert

    wide = build_bert(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, initializer_range=0.1)
    assert initializer_range(torch.nn.Sequential(wide)) == 0.1  # a tiny config's own range
    assert not system("bert").objectives["itm"].classifier.bias.any()
    assert system("torch").objectives["itm"].classifier.bias.abs().sum() > 0
    with pytest.raises(ConfigError, match="model.head_init: 'xavier'"):
        system("xavier")


class _TinyEncoder(torch.nn.Module):
    """The least an encoder offers the shared system (sizes, word embeddings, what it sees)."""

    pooled_size = text_size = visual_size = 8
    visual_input = "regions"

    def __init__(self) -> None:
        super().__init__()
        self.word_embeddings = torch.nn.Embedding(10, 8)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("threshold", [None, 0.0])
def test_mm_bert_itm_accuracy_is_the_seeds_raw_logit_over_a_half(threshold) -> None:
    """VL-BERT `common/metrics/retrieval_metrics.py` `RelationshipAccuracy`: `((logits > 0.5) == label)` on the raw
    logit (default); `logit_threshold=0`: sigmoid > 0.5. The loss is BCE either way."""
    from vl.heads.mm_bert import BinaryImageTextMatching

    torch.manual_seed(0)
    head = BinaryImageTextMatching(hidden_size=8, **({} if threshold is None else {"logit_threshold": threshold}))
    pooled = torch.randn(400, 8) * 2
    labels = (torch.rand(400) < 0.5).float()
    out = EncoderOutput(text=torch.zeros(400, 1, 8), visual=None, pooled=pooled)
    result = head(out, {"itm_labels": labels})
    z = head.classifier(pooled).squeeze(-1).detach().numpy()
    cut = 0.5 if threshold is None else threshold
    metrics = nn.ModuleDict(head.make_metrics())
    head.update_metrics(metrics, result)
    seed = float(((z > cut).astype(np.float32) == labels.numpy()).mean())
    assert float(metrics["itm_bce_acc"].compute()) == pytest.approx(seed, abs=1e-7)
    assert ((z > 0) != (z > 0.5)).any()  # the two rules disagree on some rows of this draw
    y = labels.numpy().astype(np.float64)
    bce = (np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))).mean()
    assert result.loss.item() == pytest.approx(bce, rel=1e-5)


def test_vqa_accuracy_and_accuracy_match_numpy_on_random_inputs() -> None:
    """`VQAAccuracy`: mean over questions of the soft score of the arg-max answer (the seed's
    `compute_score_with_logits`); `Accuracy`: correct / counted, entries labelled `ignore_index` not counted."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(57, 13)).astype(np.float32)
    scores = (rng.choice([0.0, 0.3, 0.6, 0.9, 1.0], size=(57, 13)) * (rng.random((57, 13)) < 0.2)).astype(np.float32)
    metric = VQAAccuracy()
    for part in np.array_split(np.arange(57), 4):  # several updates, as batches
        metric.update(torch.from_numpy(logits[part]), torch.from_numpy(scores[part]))
    want = scores[np.arange(57), logits.argmax(1)].mean()
    assert float(metric.compute()) == pytest.approx(float(want), abs=1e-6)
    from vl.metrics import Accuracy

    preds, target = rng.integers(0, 4, size=200), rng.integers(0, 4, size=200)
    target[rng.random(200) < 0.3] = -100
    acc = Accuracy()
    acc.update(torch.from_numpy(preds), torch.from_numpy(target))
    keep = target != -100
    assert float(acc.compute()) == pytest.approx(float((preds[keep] == target[keep]).mean()), abs=1e-6)


def test_masked_region_feature_regression_is_the_seeds_masked_mean() -> None:
    """vilbert_beta `vilbert.py` (`predict_feature`): sum(MSE(pred, target) * mask) / max(#masked x D, 1) over the
    regions after the global token; 0 when nothing is masked."""
    from vl.heads.regions import MaskedRegionFeatureRegression

    torch.manual_seed(0)
    b, r, h, d = 3, 5, 8, 6
    head = MaskedRegionFeatureRegression(hidden_size=h, feature_dim=d)
    visual = torch.randn(b, 1 + r, h)
    out = EncoderOutput(text=torch.zeros(b, 2, h), visual=visual, pooled=torch.zeros(b, h), visual_prefix=1)
    mask = torch.rand(b, r) < 0.4
    target = torch.randn(b, r, d)
    loss = head(out, {"region_mask_labels": mask.long(), "region_feat_targets": target}).loss
    pred = head.head(visual[:, 1:]).detach().numpy()
    sq = (pred - target.numpy()) ** 2 * mask.numpy()[..., None]
    want = sq.sum() / max(int(mask.sum()) * d, 1)
    assert loss.item() == pytest.approx(float(want), rel=1e-5)
    none = head(out, {"region_mask_labels": torch.zeros(b, r, dtype=torch.long), "region_feat_targets": target})
    assert none.loss.item() == 0.0


def test_pretrain_qa_is_the_seeds_cross_entropy_over_labelled_matched_pairs() -> None:
    """CLIP-ViL `lxrt/modeling.py`: CE(ignore_index=-1) of `logit_fc` over rows whose answer is not -1; the seed's
    `lxmert_data.py` sets -1 for unlabelled rows and mismatched pairs (here: `itm_labels` 0). Accuracy over the same
    rows. vl: 0 for a batch with no such row (the seed's CE would be NaN there)."""
    from vl.heads.qa import PretrainQA

    torch.manual_seed(0)
    head = PretrainQA(hidden_size=8, num_answers=7)
    pooled = torch.randn(40, 8)
    labels = torch.randint(0, 7, (40,))
    labels[torch.rand(40) < 0.3] = -1
    itm = (torch.rand(40) < 0.7).long()
    out = EncoderOutput(text=torch.zeros(40, 1, 8), visual=None, pooled=pooled)
    result = head(out, {"qa_labels": labels, "itm_labels": itm})
    seed_ans = torch.where(itm == 1, labels, torch.full_like(labels, -1)).numpy()  # the data side's -1 rule
    logp = _log_softmax(head.classifier(pooled).detach().double().numpy())
    rows = np.flatnonzero(seed_ans >= 0)
    assert result.loss.item() == pytest.approx(float(-logp[rows, seed_ans[rows]].mean()), rel=1e-5)
    metrics = nn.ModuleDict(head.make_metrics())
    head.update_metrics(metrics, result)
    want = float((logp[rows].argmax(1) == seed_ans[rows]).mean())
    assert float(metrics["qa_acc"].compute()) == pytest.approx(want, abs=1e-7)
    none = head(out, {"qa_labels": torch.full((40,), -1), "itm_labels": itm})
    assert none.loss.item() == 0.0


def test_mask_tokens_draws_bert_masking_rates() -> None:
    """BERT / the seeds' `random_word`: each non-special token chosen with p 0.15; of those 80 % [MASK], 10 % a random
    vocabulary token, 10 % kept; labels are the original ids where chosen, -100 elsewhere; special tokens never chosen,
    unchosen tokens untouched. Rates within 5 standard errors on 40 000 tokens, drawn per row from its key."""
    from vl.data.collate import mask_tokens
    from vl.data.draws import example_keys

    g = torch.Generator().manual_seed(0)
    vocab, mask_id = 5000, 3
    ids = torch.randint(10, vocab, (400, 100), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    special[::7, 50:] = True  # padding-like tails
    keys = example_keys(7, [0] * 400, range(400))
    out, labels = mask_tokens(ids, special, mask_token_id=mask_id, vocab_size=vocab, keys=keys)
    random = out[(labels != -100) & (out != mask_id) & (out != ids)]  # random tokens cover the vocabulary
    assert int(random.min()) < vocab // 20 and int(random.max()) > vocab - vocab // 20
    chosen = labels != -100
    assert not chosen[special].any() and torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(out[~chosen], ids[~chosen])

    def within(count: int, n: int, p: float) -> bool:
        return abs(count / n - p) <= 5 * (p * (1 - p) / n) ** 0.5

    n_free, n_chosen = int((~special).sum()), int(chosen.sum())
    assert within(n_chosen, n_free, 0.15)
    masked = int((out[chosen] == mask_id).sum())
    kept = int((out[chosen] == ids[chosen]).sum())
    assert within(masked, n_chosen, 0.8)
    assert within(kept, n_chosen, 0.1 + 0.1 / vocab)  # kept, or a random draw of the same id
    assert within(n_chosen - masked - kept, n_chosen, 0.1 * (1 - 1 / vocab))


def test_itm_ranking_score_orders_as_the_aligned_probability_without_saturating() -> None:
    """`aligned_logit` (the ITM pair scorer) orders pairs as softmax(logits)[:, 1] in exact arithmetic (float64
    here), also where the float32 probability is exactly 1.0 for several of them (a tie the rank counts against the
    gold)."""
    from vl.models.retrieval_eval import aligned_logit

    rng = np.random.default_rng(0)
    logits = np.stack([rng.normal(size=200) * 3, rng.normal(size=200) * 3 + rng.choice([0, 25], size=200)], 1)
    score = aligned_logit(torch.from_numpy(logits.astype(np.float32))).numpy()
    z = logits.astype(np.float64)
    p64 = 1.0 / (1.0 + np.exp(-(z[:, 1] - z[:, 0])))  # softmax(.)[:, 1] of two logits, in float64
    p32 = torch.from_numpy(logits.astype(np.float32)).softmax(-1)[:, 1].numpy()
    assert (p32 == 1.0).sum() > 20  # saturated: ties in float32
    assert (np.argsort(-score, kind="stable") == np.argsort(-(z[:, 1] - z[:, 0]), kind="stable")).all()
    order = np.argsort(-score, kind="stable")
    assert (np.diff(p64[order]) <= 1e-12).all()  # descending in the exact probability too
