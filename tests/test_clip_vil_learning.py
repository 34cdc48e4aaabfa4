"""CLIP-ViL learns from pixels on the embedded corpus, at the tiny size (backbone trained end to end), through the
configs users run: stage 1 ITM above chance; VQA above the computed question-type prior; the backbone's weights
change (and stay put when frozen); stage 2 -> VQA copies the shared answer rows; resume restores both optimisers;
bf16 autocast on CPU; the published configs compose."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from vl.build import build_datamodule, build_model
from vl.pipeline import train

TINY = ("data.corpus.num_images=150", "trainer.max_epochs=1", "data.num_workers=0")


def _backbone(system) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in system.encoder.backbone.state_dict().items() if "num_batches" not in k}


@pytest.mark.parametrize(
    ("experiment", "model", "channels"),
    [("clip_vil_pretrain", "clip_vil", 2048), ("clip_vil_vqa", "clip_vil_rn50x4", 2560)],
)
def test_published_configs_compose(make_cfg, experiment, model, channels) -> None:
    cfg = make_cfg(f"experiment={experiment}", f"model={model}", tiny=False)
    assert cfg.model.encoder.backbone.name in ("RN50", "RN50x4")
    assert cfg.data.transform_options.min_size == 384 and cfg.data.transform_options.max_size == 640
    assert cfg.model.visual_optimizer.lr in (0.003, 1e-3) and cfg.model.visual_optimizer.momentum == 0.0
    assert cfg.model.encoder.text_encoder.num_layers == 12 and cfg.trainer.gradient_clip_val == 1.0
    if experiment == "clip_vil_pretrain":
        assert cfg.model.encoder.sub_sampling and cfg.model.encoder.sub_feat_num == 100
        assert list(cfg.data.objectives) == ["mlm", "itm"] and cfg.data.max_text_len == 20
    qa = make_cfg("experiment=clip_vil_pretrain_qa", tiny=False)
    assert list(qa.data.objectives) == ["mlm", "itm", "qa"] and qa.model.optimizer.lr == 5e-5


@pytest.mark.parametrize("experiment", ["clip_vil_pretrain", "clip_vil_pretrain_qa"])
def test_published_pretraining_scores_mlm_on_every_pair(make_cfg, experiment) -> None:
    """The seed masks every sentence and scores every masked word, matched or not (its `convert_example_to_features`
    never looks at `is_matched` for the LM labels); only QA is restricted to matched pairs."""
    assert make_cfg(f"experiment={experiment}", tiny=False).model.heads.mlm.on_mismatched_pairs is True
    cfg = make_cfg("experiment=clip_vil_pretrain_tiny", *TINY, "data.batch_size=16", "data.batch_size_per_device=16")
    assert cfg.model.heads.mlm.on_mismatched_pairs is True
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    system = build_model(cfg, dm).eval()
    torch.manual_seed(0)
    batch = next(b for b in dm.train_dataloader() if ((b["mlm_labels"] != -100).any(1) & (b["itm_labels"] == 0)).any())
    with torch.no_grad():
        out = system(batch)
        head = system.objectives["mlm"]
        loss = head(out, batch).loss
        # by hand: cross-entropy over every masked position of every pair, mismatched ones included
        logits = head.logits(out.text)  # (B, T, V)
        labels = batch["mlm_labels"]
        logp = logits.log_softmax(-1)
        masked = labels != -100
        want = -logp[masked].gather(1, labels[masked][:, None]).mean()
        matched_only = masked & (batch["itm_labels"] == 1)[:, None]
        not_want = -logp[matched_only].gather(1, labels[matched_only][:, None]).mean()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert not torch.isclose(loss, not_want)


@pytest.mark.slow  # tiny fits from pixels (~1-2 min on 2 busy cores)
def test_tiny_vqa_trains_the_backbone_end_to_end_and_freezing_is_an_option(make_cfg) -> None:
    cfg = make_cfg("experiment=clip_vil_vqa_tiny", *TINY, "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                   "trainer.limit_test_batches=1")  # fmt: skip
    dm = build_datamodule(cfg)
    system = build_model(cfg, dm)
    before = _backbone(system)
    import lightning as L

    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
    )  # fmt: skip
    trainer.fit(system, datamodule=dm)
    after = _backbone(system)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    cfg.model.encoder.freeze_backbone = True
    frozen = build_model(cfg, dm)
    before = _backbone(frozen)
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(frozen, datamodule=dm)
    after = _backbone(frozen)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics


@pytest.mark.slow  # tiny fits from pixels (~1-2 min on 2 busy cores)
def test_stage2_to_vqa_copies_the_shared_answer_rows_and_resume_restores_both_optimisers(make_cfg, tmp_path) -> None:
    limits = ("trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1")
    stage2 = make_cfg("experiment=clip_vil_pretrain_qa_tiny", "pretrain=null", *TINY, *limits, name="stage2")
    metrics, _ = train(stage2)
    ckpt = Path(stage2.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert set(state["optimizer_states"][0]) == {"adamw", "sgd"}
    vqa = make_cfg("experiment=clip_vil_vqa_tiny", *TINY, *limits, f"model.init_from={ckpt}", name="vqa")
    dm = build_datamodule(vqa)
    system = build_model(vqa, dm, init_from=str(ckpt))
    answers = dm.label2ans
    assert system.qa_rows_copied == len(answers) - 1  # all but "maybe", which the pretraining list lacks
    from vl.data.formats.lxmert_pretrain import convert_ans, load_all_answers

    pre = load_all_answers(dm.path("lxmert/all_ans.json"))
    w = state["state_dict"]["objectives.qa.classifier.3.weight"]
    head = system.objectives["vqa"].classifier[3].weight
    for j, a in enumerate(answers):
        if convert_ans(a) in pre:
            assert torch.equal(head[j], w[pre.index(convert_ans(a))])
        else:  # the seed zeroes the rows of answers the pretraining list lacks
            assert not head[j].any()
    # resume: Lightning hands the checkpoint's optimizer state to the fused optimizer exactly
    resumed = make_cfg("experiment=clip_vil_pretrain_qa_tiny", "pretrain=null", *TINY, *limits, "trainer.max_epochs=2",
                       f"ckpt_path={ckpt}", name="resumed")  # fmt: skip
    import lightning as L

    captured = {}

    class Capture(L.Callback):
        def on_train_start(self, trainer, pl_module):
            captured["state"] = copy.deepcopy(trainer.optimizers[0].state_dict())  # before any step

    dm = build_datamodule(resumed)
    model = build_model(resumed, dm)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[Capture()])  # fmt: skip
    trainer.fit(model, datamodule=dm, ckpt_path=str(ckpt))
    saved = state["optimizer_states"][0]
    for name in ("adamw", "sgd"):
        for k, st in saved[name]["state"].items():
            for key, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(captured["state"][name]["state"][k][key]))


@pytest.mark.slow  # tiny fits from pixels (~1-2 min on 2 busy cores)
def test_bf16_autocast_on_cpu(make_cfg) -> None:
    cfg = make_cfg("experiment=clip_vil_vqa_tiny", *TINY, "trainer.precision=bf16-mixed",
                   "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1")  # fmt: skip
    metrics, _ = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["test/vqa_acc"]))


@pytest.mark.slow  # a tiny fit from pixels (~30 s on 2 busy cores)
def test_skipped_images_are_counted_as_a_metric(make_cfg) -> None:
    """`data.on_bad_image=skip`: a corrupt training image is skipped, and the epoch's count is logged as
    `train/images_skipped` (summed over batches and ranks; 0 where nothing was skipped): every time the epoch's
    batches hold one of its questions (the seed's grouped batches may repeat a leftover example or leave it for the
    next epoch, so the count is taken from the epoch's sampler order)."""
    from vl.data.formats.lxmert_pretrain import image_path
    from vl.data.images import AspectGroupedSampler

    cfg = make_cfg("experiment=clip_vil_vqa_tiny", "data.corpus.num_images=60", "trainer.max_epochs=1",
                   "data.num_workers=0", "data.on_bad_image=skip", "trainer.limit_val_batches=1",
                   "trainer.limit_test_batches=1", "logger=csv")  # fmt: skip
    dm = build_datamodule(cfg)
    dm.setup("fit")
    questions = dm.datasets["train"].questions
    sampler = AspectGroupedSampler(dm.datasets["train"], num_replicas=1, rank=0, shuffle=True, seed=cfg.seed,
                                   groups=dm.groups("train"), batch_size=dm.batch_size_per_device)  # fmt: skip
    sampler.set_epoch(0)
    seen = [questions[i]["img_id"] for _, i in sampler]
    bad = dm.root / image_path(seen[0])
    expected = seen.count(seen[0])
    good = bad.read_bytes()
    try:
        bad.write_bytes(good[: len(good) // 3])  # truncated JPEG
        metrics, _ = train(cfg)
    finally:
        bad.write_bytes(good)
    assert metrics["train/images_skipped"] == expected and expected >= 1, metrics
    assert metrics["val/images_skipped"] == 0 and metrics["test/images_skipped"] == 0, metrics


# ------------------------------------------------------------------------------------------------ learning
CORPUS = "data.corpus.num_images=600"


@pytest.mark.slow  # ~3-5 min on 2 cores: two 4-epoch runs of a tiny CLIP-ViL from pixels
def test_vqa_from_pixels_beats_the_question_type_prior(make_cfg) -> None:
    """Random-init backbone: SGD lr 0.5 for it, as the stage-1 test below (the recipe's 0.003 is meant for a pretrained
    CLIP ResNet). Measured 2026-12-04 after the seed's preprocessing and init were adopted (4 epochs, test accuracy vs
    the question-type prior 0.41): backbone lr 0.003 -> 0.406 (6 epochs: 0.418), 0.05 -> 0.417, 0.5 -> 0.435.
    2026-12-05 (2 torch threads): seed 12345 0.432, seed 1 0.473 (6 epochs, seed 12345: 0.435; backbone lr 1.0:
    0.416). One seed's margin is thin, so the test asserts the mean of two seeds (0.453) 2 points above the prior.
    With batches that never mix canvases (the seed's leftover rule, val / test by orientation): 0.460 / 0.476."""
    accs, prior = [], None
    for seed in (12345, 1):
        cfg = make_cfg("experiment=clip_vil_vqa_tiny", CORPUS, "trainer.max_epochs=4", "model.visual_optimizer.lr=0.5",
                       f"seed={seed}", name=f"seed{seed}")  # fmt: skip
        metrics, _ = train(cfg)
        print({k: round(float(v), 4) for k, v in metrics.items() if k.startswith("test/")})
        accs.append(float(metrics["test/vqa_acc"]))
        prior = float(metrics["test/vqa_acc_prior"])
    assert sum(accs) / len(accs) > prior + 0.02, (accs, prior)


@pytest.mark.slow  # 4 min 51 s on 2 busy cores with OMP_NUM_THREADS=1 (4000-image corpus written, 1500 steps)
def test_stage1_itm_from_pixels_is_above_chance(make_cfg) -> None:
    """Stage-1 ITM (50 % other-image sentences) above chance from pixels, random init, at a calibrated tiny setting.

    Calibration (measured 2026-12-03, batch 32): ITM from a random-init backbone needs the backbone to learn. With the
    published backbone SGD lr 0.003 (meant for a pretrained CLIP ResNet; clipped jointly to norm 1) val ITM stays at
    chance: 0.52-0.54 after 450 steps on the default 600-image corpus (MLM 0.24 -> 0.70), and 0.48-0.52 through 1200
    steps (test 0.513) even on 4000 one-shape caption-only scenes. With backbone SGD lr 0.5 on those scenes it is at
    chance to step 800, then val 0.64 at 900 and 0.61 at 1200 (test 0.58 after 4 epochs); one AdamW for everything
    reaches 0.77. Hence: 4000 images (fewer than ~1000 are memorised: train 0.94, val 0.5), captions only (half the
    default sentences are VQA questions, which an image rarely contradicts; 11.5 % of their negatives repeat one of
    the image's own sentences, as in the seed), one shape per scene, backbone SGD lr 0.5, 5 epochs (1500 steps).
    Measured with this test: val ITM 0.52 (step 600), 0.67 (900), 0.77 (1200), 0.78 (1500); test ITM 0.782. Again on
    2026-12-05 after CLIP-ViL adopted the seed's preprocessing, init and MLM on every pair (2 torch threads): 0.671. On
    2026-12-06 with the seed's batching (one canvas per val / test batch, leftovers completed with repeats): 0.631."""
    cfg = make_cfg(
        "experiment=clip_vil_pretrain_tiny", "data.corpus.num_images=4000", "data.corpus.questions_per_image=0",
        "data.corpus.max_shapes=1", "model.visual_optimizer.lr=0.5", "trainer.max_epochs=5",
        "callbacks.early_stopping=null",
    )  # fmt: skip
    metrics, _ = train(cfg)
    print({k: round(float(v), 4) for k, v in metrics.items() if k.startswith("test/")})
    assert metrics["test/itm_acc"] > 0.56, metrics  # chance 0.5; 1200 test pairs: 4 standard deviations


# Pretraining corpus for the chain: the embedded corpus with another seed (scene i depends only on the seed and i, so
# the same seed with more images would repeat every VQA val / test scene, most of them as pretraining train images).
STAGE1 = ("pretrain.data.corpus.seed=1", "pretrain.data.corpus.num_images=4000",
          "pretrain.data.corpus.questions_per_image=0", "pretrain.data.corpus.max_shapes=1",
          "+pretrain.model.visual_optimizer.lr=0.5", "pretrain.trainer.max_epochs=5")  # fmt: skip
STAGE2 = ("data.corpus.seed=1", "data.corpus.num_images=600", "trainer.max_epochs=2")
VQA_SEEDS = (12345, 1, 2)


def _pixel_hashes(root: Path, img_ids: set[str] | None = None) -> set[str]:
    """sha1 of the decoded RGB pixels of the corpus's PNG copies (`img_ids`, or all of them)."""
    import hashlib

    import numpy as np
    from PIL import Image

    paths = sorted((root / "png").glob("*.png")) if img_ids is None else [root / "png" / f"{i}.png" for i in img_ids]
    assert paths, root
    return {hashlib.sha1(np.asarray(Image.open(p).convert("RGB")).tobytes()).hexdigest() for p in paths}


def _image_root(data_dir: str, corpus) -> Path:
    from vl.data.scenes import SceneSettings, ensure_corpus
    from vl.data.scenes.writers.images import ensure_image_corpus

    settings = SceneSettings(**corpus)
    return ensure_image_corpus(ensure_corpus(Path(data_dir), settings), settings)


@pytest.fixture
def two_torch_threads():
    """The measured numbers below are for 2 torch threads (CI's 2 cores): stage 1 (1500 steps at backbone lr 0.5) does
    not give the same weights at another thread count (float reduction order), and whether its ITM leaves chance
    moves with it (1 thread, 2026-12-05: it stays at chance)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow  # 4 min 41 s on 2 cores: stage 1 (1500 steps) + stage 2 + 6 tiny VQA fits
def test_clip_vil_pretraining_beats_random_init_on_vqa(make_cfg, two_torch_threads) -> None:
    """Stage 1 (MLM + ITM) -> stage 2 (+ QA) -> VQA against VQA from random init: the same VQA data (the standard tiny
    corpus, `CORPUS`), config and seeds (three); pretraining on a separate corpus (another seed) that holds none of the
    VQA val / test pictures (checked on the decoded pixels), so it never sees them or their questions.

    Stage 1 is the calibrated ITM setting of `test_stage1_itm_from_pixels_is_above_chance` (4000 one-shape
    caption-only scenes, backbone SGD lr 0.5, 5 epochs); stage 2 adds QA on 600 default scenes (questions included)
    of the pretraining seed, 2 epochs, the tiny config's optimisers. VQA: `clip_vil_vqa_tiny`, 2 epochs.
    Measured with this test (2026-12-05, after CLIP-ViL adopted the seed's preprocessing, init and MLM on every pair;
    2 torch threads): stage-1 test ITM 0.706; stage 2 test ITM 0.603, QA 0.265; VQA test soft accuracy pretrained
    0.477 / 0.428 / 0.449 (mean 0.451) vs random init 0.433 / 0.419 / 0.437 (mean 0.430): +2.2 points, every seed
    ahead (+4.4 / +0.9 / +1.2; question-type prior 0.410). The same test with 1 torch thread: stage 1's ITM stayed at
    chance (test 0.521) and pretraining gave +0.2 (0.415 / 0.446 / 0.434): without a grounded backbone stage 1 buys
    nothing, so the thread count is pinned. Before those changes (2026-12-04, 1 thread) the gap was +5.9 (stage-1 ITM
    0.718; stage 1 alone +2.9, stage 2 alone +0.7). With stage 1 at the published backbone lr 0.003 on the VQA corpus
    ITM stays at chance and pretraining lost 1.2 points. The test asserts the pretrained mean ahead by more than
    1 point and every seed ahead. Those numbers were measured with best.ckpt hand-offs and vl's earlier batching
    (mixed leftover and val / test batches, orientation groups); the stages now hand on last.ckpt, as the seed.
    Measured with both (2026-12-06, 2 threads): stage-1 test ITM 0.774; stage 2 ITM 0.625, QA 0.386; VQA pretrained
    0.498 / 0.471 / 0.496 vs random 0.431 / 0.432 / 0.419: +6.1 points, every seed ahead."""
    stage = make_cfg("experiment=clip_vil_pretrain_qa_tiny", *STAGE1, *STAGE2, "callbacks.early_stopping=null",
                     name="pretrain")  # fmt: skip
    pre_metrics, _ = train(stage)
    ckpt = Path(stage.paths.output_dir) / "checkpoints" / "last.ckpt"  # the seed's hand-off: the last epoch
    results: dict[str, list[float]] = {"pretrained": [], "random": []}
    for seed in VQA_SEEDS:
        for name, extra in (("pretrained", [f"model.init_from={ckpt}"]), ("random", [])):
            cfg = make_cfg("experiment=clip_vil_vqa_tiny", CORPUS, "trainer.max_epochs=2", f"seed={seed}", *extra,
                           name=f"{name}-{seed}")  # fmt: skip
            metrics, _ = train(cfg)
            results[name].append(round(float(metrics["test/vqa_acc"]), 4))
    # no leak: no pretraining picture (either stage, any split) is a VQA val / test picture
    from vl.data.formats.lxmert_pretrain import load_vqa_json

    vqa_root = _image_root(cfg.paths.data_dir, cfg.data.corpus)
    held_out = {q["img_id"] for split in ("minival", "test") for q in load_vqa_json(vqa_root / "vqa" / f"{split}.json")}
    seen = _pixel_hashes(_image_root(cfg.paths.data_dir, stage.pretrain.data.corpus)) | _pixel_hashes(
        _image_root(cfg.paths.data_dir, stage.data.corpus)
    )
    assert not seen & _pixel_hashes(vqa_root, held_out)
    gap = sum(results["pretrained"]) / len(VQA_SEEDS) - sum(results["random"]) / len(VQA_SEEDS)
    print({"stage1": {k: round(float(v), 4) for k, v in pre_metrics.items() if k.startswith("pretrain:test/")},
           "stage2": {k: round(float(v), 4) for k, v in pre_metrics.items() if k.startswith("test/")},
           **results, "mean_gap": round(gap, 4), "prior": round(float(metrics["test/vqa_acc_prior"]), 4)})  # fmt: skip
    assert gap > 0.01, results
    assert all(p > r for p, r in zip(results["pretrained"], results["random"])), results
