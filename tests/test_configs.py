"""Every config file composes; schemas reject unknown keys and wrong types at compose time."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from tests.conftest import CONF

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(group, f.stem) for group in GROUPS for f in sorted((CONF / group).glob("*.yaml"))]


def _resolve_all(cfg) -> None:
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.to_container(plain, resolve=True)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group: str, option: str, make_cfg) -> None:
    if group == "task":  # evaluation tasks are a group of the evaluate config
        cfg = make_cfg("ckpt_path=x.ckpt", f"task={option}", config_name="evaluate", tiny=False)
        _resolve_all(cfg)
        assert (cfg.task.get("_target_") or "test").endswith(option)
        return
    cfg = make_cfg(f"{group}={option}")
    _resolve_all(cfg)
    assert cfg.data._target_ and cfg.model._target_


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_primary_configs_compose(name: str, make_cfg) -> None:
    overrides = ("ckpt_path=x.ckpt",) if name == "evaluate" else ()
    cfg = make_cfg(*overrides, config_name=name, tiny=False)
    _resolve_all(cfg)


def test_hydra_group_is_applied(make_cfg) -> None:
    cfg = make_cfg()
    assert "/runs/" in cfg.hydra.run.dir and "/multiruns/" in cfg.hydra.sweep.dir


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.encoder.text_encoder.hiden_size=3", "hiden_size"),
        ("data.batch_sise=3", "batch_sise"),
        ("trainer.max_epoch=3", "max_epoch"),
        ("model.encoder.text_encoder.hidden_size=abc", "model.encoder.text_encoder.hidden_size"),
        ("data.num_workers=many", "data.num_workers"),
        ("trainer.max_steps=1.5", "trainer.max_steps"),
    ],
)
def test_schema_rejects_bad_keys_and_types(override: str, needle: str, make_cfg) -> None:
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as err:
        make_cfg(override)
    text = str(err.value) + str(err.value.__cause__ or "")
    assert needle in text


@pytest.mark.parametrize("model", ["visual_bert_tiny", "vilbert_tiny", "visual_bert"])
def test_optional_mappings_take_keys_from_the_command_line(model: str, make_cfg) -> None:
    """`loss_weights` / `heads` default to None in the constructors; in the config they are empty mappings, so a key
    can be added from the command line (a None node cannot take one)."""
    cfg = make_cfg(f"model={model}", "+model.loss_weights.itm=2", "+model.heads.itm.dropout=0.5")
    assert cfg.model.loss_weights == {"itm": 2.0} and cfg.model.heads.itm == {"dropout": 0.5}


def test_unknown_model_name_lists_options(make_cfg) -> None:
    with pytest.raises(Exception) as err:
        make_cfg("model=vilbrt")
    assert "model/vilbrt" in str(err.value) and "visual_bert" in str(err.value)


@pytest.mark.parametrize(
    ("override", "needle"),
    [("task.shortlist_kk=3", "shortlist_kk"), ("task.shortlist_k=many", "task.shortlist_k")],
)
def test_task_options_are_checked_at_compose_time(override: str, needle: str, make_cfg) -> None:
    cfg = make_cfg("ckpt_path=x.ckpt", "task=zero_shot_retrieval", "task.shortlist_k=20", config_name="evaluate")
    assert cfg.task.shortlist_k == 20 and cfg.task.text_chunk == 16  # the default of the task function
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as err:
        make_cfg("ckpt_path=x.ckpt", "task=zero_shot_retrieval", override, config_name="evaluate")
    assert needle in str(err.value) + str(err.value.__cause__ or "")


def test_evaluate_takes_another_corpus_only_from_a_data_config(make_cfg) -> None:
    """`evaluate.py data=<corpus>` replaces the run's data (`vl.pipeline.evaluation_data`, keeping its tokenizer and
    objectives); a hardware preset's data keys alone (ddp_cpu's, bf16's) do not (they made a data node without a
    `_target_`, which once replaced the run's corpus)."""
    from omegaconf import OmegaConf

    from vl.pipeline import evaluation_data

    preset = make_cfg("ckpt_path=x.ckpt", "hardware=ddp_cpu", config_name="evaluate")
    assert not (preset.get("data") or {}).get("_target_")
    chosen = make_cfg("ckpt_path=x.ckpt", "data=retrieval", "data.max_images=5", config_name="evaluate")
    assert chosen.data._target_ == "vl.data.retrieval.RetrievalDataModule"
    run = OmegaConf.create({"tokenizer": "run-vocab", "objectives": ["mlm", "itm"], "max_regions": 3})
    data = evaluation_data(chosen.data, run)
    assert data.tokenizer == "run-vocab" and list(data.objectives) == ["mlm", "itm"] and data.max_images == 5


def test_unknown_task_lists_options(make_cfg) -> None:
    with pytest.raises(Exception) as err:
        make_cfg("ckpt_path=x.ckpt", "task=zero_shot", config_name="evaluate")
    assert "task/zero_shot" in str(err.value) and "zero_shot_retrieval" in str(err.value)


#: vilbert_beta vlbert_tasks.yml / train_tasks.py (spec: vilbert.md, fine-tuning table): batch, lr, text length. The
#: lr is the README command's `--learning_rate` (tasks 0: 4e-5, 1-2: 2e-5, 3: 4e-5, 4: 4e-5); the yml's per-task `lr`
#: only scales each task's loss by lr / min(lr), 1 with one task (retrieval's yml says 2e-5, its command 4e-5)
PUBLISHED_VILBERT = {
    "vilbert_vqa": ("vqa", 256, 4e-5, 16, 1e-4),
    "vilbert_vcr": ("vcr", 64, 2e-5, 80, None),
    "vilbert_refcoco": ("refer", 256, 4e-5, 20, None),
    "vilbert_retrieval": ("retrieval", 64, 4e-5, 30, None),
}


@pytest.mark.parametrize("experiment", sorted(PUBLISHED_VILBERT))
def test_published_vilbert_recipes(experiment: str, make_cfg) -> None:
    objective, batch, lr, text_len, head_lr = PUBLISHED_VILBERT[experiment]
    cfg = make_cfg(f"experiment={experiment}", tiny=False)
    assert cfg.model._target_ == "vl.models.vilbert.VilbertSystem" and cfg.model.encoder.text_encoder.num_layers == 12
    assert list(cfg.data.objectives) == [objective]
    assert (cfg.data.batch_size, cfg.model.optimizer.lr, cfg.data.max_text_len) == (batch, lr, text_len)
    assert cfg.model.head_lr == head_lr
    assert cfg.trainer.max_epochs == 20
    assert list(cfg.model.scheduler.decay_epochs) == [12, 16] and cfg.model.scheduler.gamma == 0.1
    assert cfg.model.scheduler.warmup_ratio == 0.1
    # every task's max_region_num is 100 rows, the global token included (the seed's reader prepends it)
    assert cfg.data.max_regions + 1 == 100
    if objective == "vcr":  # TASK1 / TASK2: two tasks, one optimizer step each in turn, text 60 (Q->A) / 80 (QA->R)
        assert (cfg.data.vcr_steps, cfg.data.qa_text_len) == ("separate", 60)


#: phaedonmit/VL-BERT cfgs (GPUS: one id each): TRAIN.BATCH_IMAGES, NETWORK.VLBERT.with_pooler; the seed's lr is
#: TRAIN.LR (1e-6) x GPUs x BATCH_IMAGES, vl's lr_per_example x batch per device x devices (1) x accumulation (1)
PUBLISHED_MM_BERT = {
    "mm_bert_pretrain": (8, False),  # cfgs/pretrain/base_prec_16x16G_fp16_pretrained_LR6.yaml ([8, 8] with the aux)
    "mm_bert_retrieval": (16, True),  # cfgs/retrieval/base_prec_16x16G_fp16_downstream_retrieval_*_LR6*.yaml
    "mm_bert_mlt": (16, True),  # cfgs/MLT/base_prec_16x16G_fp16_MLT_LR6_startLR6.yaml
    "mm_bert_mt": (8, False),  # cfgs/MT/base_prec_16x16G_fp16_MT_LR6.yaml
}


@pytest.mark.parametrize("experiment", sorted(PUBLISHED_MM_BERT))
def test_published_mm_bert_batches_and_poolers(experiment: str, make_cfg) -> None:
    batch, with_pooler = PUBLISHED_MM_BERT[experiment]
    cfg = make_cfg(f"experiment={experiment}", tiny=False)
    assert (cfg.data.batch_size, cfg.data.batch_size_per_device) == (batch, batch)
    assert cfg.model.encoder.with_pooler is with_pooler
    assert cfg.model.lr_per_example == 1e-6 and cfg.trainer.devices == 1
    assert cfg.trainer.get("accumulate_grad_batches", 1) == 1
    assert (cfg.trainer.max_epochs, cfg.trainer.gradient_clip_val) == (20, 10.0)


@pytest.mark.parametrize("task", ["vqa", "vcr", "refcoco", "retrieval"])
def test_cpu_finetune_recipes_do_not_claim_to_be_published(task: str) -> None:
    text = (CONF / "experiment" / f"{task}_finetune.yaml").read_text()
    assert "NOT the published settings" in text and f"experiment=vilbert_{task}" in text


# ---------------------------------------------------------------------------------------------------- schema cache
#: the seed's published pretraining commands (CLIP-ViL-Pretrain readme; spec: clip_vil.md): backbone, global batch
#: (8 GPUs x accumulation 2), per-GPU batch, AdamW lr, backbone SGD x0.1 epochs, epochs run, epochs the AdamW decay
#: is planned for (stage 1: `--epochs 20`, stopped after Epoch09), objectives, aspect_ratio_group_factor
PUBLISHED_CLIP_VIL = {
    "clip_vil_pretrain": ("RN50", 512, 32, 1e-4, [12, 17], 9, 20, ["mlm", "itm"], 5),
    "clip_vil_pretrain_qa": ("RN50", 512, 32, 5e-5, [4, 8], 11, None, ["mlm", "itm", "qa"], 5),
    "clip_vil_pretrain_rn50x4": ("RN50x4", 480, 30, 5e-5, [12, 17], 9, 20, ["mlm", "itm"], 5),
    "clip_vil_pretrain_qa_rn50x4": ("RN50x4", 480, 30, 2.75e-5, [4, 9], 11, None, ["mlm", "itm", "qa"], 5),
}


@pytest.mark.parametrize("experiment", sorted(PUBLISHED_CLIP_VIL))
def test_published_clip_vil_pretraining_recipes(experiment: str, make_cfg) -> None:
    backbone, batch, per_gpu, lr, schedule, epochs, planned, objectives, k = PUBLISHED_CLIP_VIL[experiment]
    cfg = make_cfg(f"experiment={experiment}", tiny=False)
    assert cfg.model.encoder.backbone.name == backbone
    assert (cfg.data.batch_size, cfg.data.batch_size_per_device) == (batch, per_gpu) and batch == per_gpu * 8 * 2
    assert cfg.model.optimizer.lr == lr and list(cfg.model.visual_optimizer.schedule) == schedule
    assert (cfg.trainer.max_epochs, cfg.model.decay_epochs) == (epochs, planned)
    assert list(cfg.data.objectives) == objectives and cfg.data.aspect_ratio_group_factor == k
    assert cfg.model.visual_optimizer.lr == 0.003 and cfg.model.encoder.sub_feat_num == 100
    assert cfg.model.warmup_ratio == 0.025 and cfg.trainer.gradient_clip_val == 1.0


@pytest.mark.parametrize("experiment", [*sorted(PUBLISHED_CLIP_VIL), "clip_vil_vqa", "clip_vil_vqa_rn50x4"])
@pytest.mark.parametrize("hardware", ["ddp", "multi_node"])
def test_clip_vil_recipes_keep_batchnorm_per_device(experiment: str, hardware: str, make_cfg) -> None:
    """The seed trains the CLIP ResNet under apex DDP without SyncBatchNorm (statistics per GPU); vl's multi-device
    presets sync BatchNorm, which the CLIP-ViL recipes turn off again whatever hardware is chosen."""
    assert make_cfg(f"hardware={hardware}", tiny=False).trainer.sync_batchnorm is True  # the presets' own choice
    assert make_cfg(f"experiment={experiment}", f"hardware={hardware}", tiny=False).trainer.sync_batchnorm is False


def test_the_published_clip_vil_vqa_command_is_rn50x4(make_cfg) -> None:
    """The seed's readme gives one VQA command, on RN50x4 from its RN50x4 stage 2: batch 256, lr 5e-5, warmup 0.05,
    backbone SGD 1e-3 x0.1 at epoch 2, 5 epochs, loss scale 500; `clip_vil_vqa` is the same recipe on RN50."""
    published = make_cfg("experiment=clip_vil_vqa_rn50x4", tiny=False)
    rn50 = make_cfg("experiment=clip_vil_vqa", tiny=False)
    assert published.model.encoder.backbone.name == "RN50x4" and rn50.model.encoder.backbone.name == "RN50"
    for cfg in (published, rn50):
        assert (cfg.data.batch_size, cfg.model.optimizer.lr, cfg.model.warmup_ratio) == (256, 5e-5, 0.05)
        assert cfg.model.visual_optimizer.lr == 1e-3 and list(cfg.model.visual_optimizer.schedule) == [2]
        assert cfg.trainer.max_epochs == 5 and cfg.model.heads.vqa.loss_scale == 500


def test_clip_vil_stages_hand_on_their_last_checkpoint(make_cfg, tmp_path) -> None:
    """The seed hands on each pretraining stage's last epoch (Epoch09, Epoch11): the chained tiny experiment's
    `pretrain.hand_off` is `last`; `hand_off` picks last.ckpt (nothing when the stage saved nothing), and a missing
    last.ckpt callback or an unknown choice is one line before anything runs."""
    from vl.config import check_config
    from vl.errors import ConfigError
    from vl.pipeline import check_hand_off, hand_off

    cfg = make_cfg("experiment=clip_vil_pretrain_qa_tiny")
    assert cfg.pretrain.hand_off == "last" and cfg.callbacks.last_checkpoint.filename == "last"
    check_config(cfg)
    check_hand_off(cfg)
    assert make_cfg("experiment=pretrain_vqa").pretrain.get("hand_off", "best") == "best"  # the default run: best
    stage = tmp_path / "pretrain"
    (stage / "checkpoints").mkdir(parents=True)
    best = str(stage / "checkpoints" / "best.ckpt")
    assert hand_off(cfg.pretrain, stage, None) is None  # fast_dev_run: nothing saved, nothing handed on
    with pytest.raises(ConfigError, match=r"^pretrain\.hand_off=last: .*last\.ckpt was not written"):
        hand_off(cfg.pretrain, stage, best)
    (stage / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert hand_off(cfg.pretrain, stage, best) == str(stage / "checkpoints" / "last.ckpt")
    assert hand_off(OmegaConf.create({"hand_off": "best"}), stage, best) == best
    with pytest.raises(ConfigError, match=r"^pretrain\.hand_off=last: no callback writes last\.ckpt"):
        check_hand_off(make_cfg("experiment=clip_vil_pretrain_qa_tiny", "callbacks=none"))
    with pytest.raises(ConfigError, match=r"^pretrain\.hand_off=latest: must be one of best, last"):
        check_config(make_cfg("experiment=clip_vil_pretrain_qa_tiny", "pretrain.hand_off=latest"))


def test_the_cached_schemas_are_the_generated_ones() -> None:
    """`vl.compose` rebuilds each schema from JSON: same fields, types and defaults as the one generated from the
    signatures (compared as OmegaConf sees them: values, and the type every node validates against)."""
    import dataclasses

    from vl.compose import generated_schemas, schema_from_spec, schema_spec

    def typed(cls: type) -> list:
        cfg = OmegaConf.structured(cls)

        def walk(node, prefix=""):
            for key in node:
                child = node._get_node(key)
                kind = getattr(child, "_metadata", None)
                ref = getattr(kind, "ref_type", None)
                ref = ref.__name__ if dataclasses.is_dataclass(ref) else ref  # rebuilt nested schemas: new classes
                yield f"{prefix}{key}", ref, getattr(kind, "optional", None)
                if OmegaConf.is_dict(child):
                    yield from walk(child, f"{prefix}{key}.")

        return list(walk(cfg)) + [OmegaConf.to_yaml(cfg)]

    schemas = generated_schemas()
    assert {g for g, _ in schemas} == {"schema/model", "schema/data", "schema/trainer", "schema/task"}
    for (group, name), cls in schemas.items():
        rebuilt = schema_from_spec(schema_spec(cls))
        assert typed(rebuilt) == typed(cls), f"{group}/{name}"


def test_compose_needs_no_torch_once_the_cache_is_warm(tmp_path) -> None:
    """`train.py --cfg job` (and `--help`) compose from the cached schemas: torch and Lightning are never imported."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    from vl.compose import register

    env = {**os.environ, "VL_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    os.environ["VL_CACHE_DIR"] = str(tmp_path)
    try:
        assert register() == "generated" and register() == "cache"
    finally:
        del os.environ["VL_CACHE_DIR"]
    code = (
        "import runpy, sys\n"
        "sys.argv = ['train.py', '--cfg', 'job', 'model=vilbert_tiny', 'data=vcr']\n"
        "runpy.run_path('train.py', run_name='__main__')\n"
        "print('IMPORTED', sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "IMPORTED []" in out.stdout, out.stdout[-500:]
    assert "VilbertEncoder" in out.stdout  # the composed config, from the cached vilbert schema


def test_help_lists_every_option_with_a_description() -> None:
    """`train.py --help` (its template calls `vl.config.option_table`) names every option of every user-facing group
    with its file's one-line description; each config file starts with one."""
    from vl.config import option_table

    table = option_table(CONF)
    for group, option in OPTIONS:
        if group == "hydra":
            continue
        line = next((x for x in table.splitlines() if x.split()[:1] == [option] and x.startswith("  ")), None)
        assert line is not None, f"{group}={option} missing from --help"
        assert len(line.split(None, 1)) == 2, f"conf/{group}/{option}.yaml has no description comment"
    assert "schema" not in [x.rstrip(":") for x in table.splitlines() if not x.startswith(" ")]


@pytest.mark.parametrize("model", ["visual_bert_tiny", "vilbert_tiny", "mm_bert_tiny"])
def test_compare_recipe_is_the_same_schedule_for_every_region_encoder(model: str, make_cfg) -> None:
    """`experiment=compare` composes with every region encoder (mm_bert_tiny's `warmup_steps: null` included) and
    gives each the same lr curve: warmup over 10 % of the steps, constant, x0.1 from epoch 4 and again from 5."""
    import torch
    from hydra.utils import instantiate

    cfg = make_cfg("experiment=compare", f"model={model}")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = instantiate(cfg.model.scheduler)(optimizer, total_steps=60, steps_per_epoch=10)
    lrs = []
    for _ in range(60):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    want = [min(1.0, (s + 1) / 6) * (1.0 if s < 40 else 0.1 if s < 50 else 0.01) for s in range(60)]
    assert lrs == pytest.approx(want, rel=1e-9)


MM_BERT_TASKS = ["pretrain", "retrieval", "mlt", "mt"]


@pytest.mark.parametrize("task", MM_BERT_TASKS)
def test_mm_bert_flip_is_the_seeds_and_off_on_the_embedded_corpus(task: str, make_cfg) -> None:
    """`data.flip_prob`: 0.5 in every published MM-BERT experiment (the seed's TRAIN.FLIP_PROB), 0 in the tiny ones
    (the embedded corpus's captions say left / right)."""
    assert make_cfg(f"experiment=mm_bert_{task}", tiny=False).data.flip_prob == 0.5
    assert make_cfg(f"experiment=mm_bert_{task}_tiny").data.flip_prob == 0.0


def test_mm_bert_pretraining_is_task_a_as_published(make_cfg) -> None:
    """The seed's cited config (`base_prec_16x16G_fp16_pretrained_LR6`) is Task A + the aux corpus; B and C are its
    separate, chained configs. The tiny experiment mixes A, B and C (Task A alone learns too little on CPU)."""
    from vl.data.multi30k import Multi30kDataModule

    cfg = make_cfg("experiment=mm_bert_pretrain", tiny=False)
    assert list(cfg.data.pretrain_tasks) == ["A"] and cfg.data.aux_text
    assert list(make_cfg("experiment=mm_bert_pretrain_tiny").data.pretrain_tasks) == ["A", "B", "C"]
    assert list(make_cfg("experiment=mm_bert_pretrain_tiny", "data=wmt_text").data.pretrain_tasks) == ["C"]
    assert list(make_cfg("experiment=mm_bert_pretrain_tiny", "data=aux_text").data.pretrain_tasks) == []
    assert list(make_cfg("experiment=mm_bert_pretrain", "data=multi30k_mixed", tiny=False).data.pretrain_tasks) == [
        "A",
        "B",
        "C",
    ]
    assert Multi30kDataModule().pretrain_tasks == ["A"]  # the code default too


def test_the_global_batch_is_split_over_the_devices_or_refused_in_one_line(caplog) -> None:
    """`accumulation`: batch_size / (per device x world). A one-device config run on 2 processes (per device 32 of
    32, `hardware=ddp_cpu`) keeps the recipe's global batch: 16 per device, said in one line; a global batch the
    devices cannot share equally is refused naming the three numbers."""
    from types import SimpleNamespace

    from vl.errors import ConfigError
    from vl.preflight import accumulation

    dm = SimpleNamespace(batch_size=32, batch_size_per_device=32)
    with caplog.at_level("INFO", logger="vl.preflight"):
        assert accumulation(None, dm, 2) == 1
    assert dm.batch_size_per_device == 16
    assert "data.batch_size_per_device=32 x 2 devices exceeds data.batch_size=32: 16 per device" in caplog.text
    dm = SimpleNamespace(batch_size=64, batch_size_per_device=8)
    assert accumulation(None, dm, 2) == 4 and dm.batch_size_per_device == 8
    dm = SimpleNamespace(batch_size=32, batch_size_per_device=32)
    assert accumulation(None, dm, 1) == 1 and dm.batch_size_per_device == 32
    for batch, per_device, world in ((30, 30, 4), (32, 12, 2)):
        with pytest.raises(ConfigError, match=rf"^data\.batch_size={batch} is not divisible by batch_size_per_device"):
            accumulation(None, SimpleNamespace(batch_size=batch, batch_size_per_device=per_device), world)
