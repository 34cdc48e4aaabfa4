"""Every model config builds only what its forward uses (one DDP step trains: no "parameters that were not used in
producing the loss"), and its dropout runs in training and not in evaluation (a pretrained text encoder included)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from tests.conftest import CONF
from vl.pipeline import build_datamodule, build_model, train

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
#: a data module each model trains on
DATA = {"bert": "lxmert_text", "clip_bert": "vlp", "clip_bert_tiny": "vlp"}
DATA |= {m: "clip_vil_vqa" for m in ("clip_vil", "clip_vil_rn50x4", "clip_vil_tiny")}
#: shrink the full-size configs so a step is cheap (the mechanism is size-independent)
SMALL = {
    "mm_bert": (
        "model.encoder.text_encoder.hidden_size=32",
        "model.encoder.text_encoder.num_heads=2",
        "model.encoder.text_encoder.intermediate_size=64",
        "model.encoder.text_encoder.num_layers=2",
    ),
    "vilbert": (
        "model.encoder.text_encoder.hidden_size=32",
        "model.encoder.text_encoder.num_heads=2",
        "model.encoder.text_encoder.intermediate_size=64",
        "model.encoder.text_encoder.num_layers=2",
        "model.encoder.v_hidden=32",
        "model.encoder.v_num_layers=2",
        "model.encoder.v_intermediate=64",
        "model.encoder.bi_hidden=32",
        "model.encoder.v_heads=2",
        "model.encoder.bi_heads=2",
        "model.encoder.v_biattention_id=[0,1]",
        "model.encoder.t_biattention_id=[0,1]",
    ),
}
#: CLIP-ViL: a tiny backbone and BERT, small images, images decoded in the main process
_SMALL_CLIP_VIL = (
    "model.encoder.backbone.name=null",
    "model.encoder.backbone.layers=[1,1,1,1]",
    "model.encoder.backbone.width=8",
    "model.encoder.text_encoder.hidden_size=32",
    "model.encoder.text_encoder.num_heads=2",
    "model.encoder.text_encoder.intermediate_size=64",
    "model.encoder.text_encoder.num_layers=2",
    "data.transform_options.min_size=64",
    "data.transform_options.max_size=96",
    "data.num_workers=0",
)
SMALL |= {m: _SMALL_CLIP_VIL for m in ("clip_vil", "clip_vil_rn50x4", "clip_vil_tiny")}
#: VG-BERT: a small VGG and BERT, 64-px images decoded in the main process, dropout on
DATA |= {m: "vg_bert_coco" for m in ("vg_bert", "vg_bert_tiny", "vg_bert_tiny_minilm")}
_SMALL_VG_BERT = (
    "model.encoder.vgg_cfg=[4,M,8,M,8,M,16,M,16]",
    "model.encoder.text_encoder.hidden_size=32",
    "model.encoder.text_encoder.num_heads=2",
    "model.encoder.text_encoder.intermediate_size=64",
    "model.encoder.text_encoder.num_layers=2",
    "model.encoder.learnable_layers=2",
    "model.encoder.visual_heads=2",
    "model.encoder.cross_heads=2",
    "model.encoder.dropout_rate=0.1",
    "data.transform_options.size=64",
    "data.transform_options.crop=64",
    "data.num_workers=0",
)
SMALL |= {m: _SMALL_VG_BERT for m in ("vg_bert", "vg_bert_tiny")}
#: the packaged MiniLM sets its own text sizes (6 x 384): only the visual stream is made small
SMALL["vg_bert_tiny_minilm"] = tuple(o for o in _SMALL_VG_BERT if ".text_encoder." not in o and "learnable" not in o)
#: the published VisualBERT at BERT-base size took 21 s for two forward/backward passes here
SMALL["visual_bert"] = SMALL["mm_bert"]


def _overrides(model: str, *extra: str) -> list[str]:
    return [
        "experiment=none",
        f"model={model}",
        f"data={DATA.get(model, 'vqa')}",
        "data.batch_size=4",
        "data.batch_size_per_device=2",
        *SMALL.get(model, ()),
        *extra,
    ]


@pytest.mark.slow  # one ddp_spawn fit per model config (~20 s each on 2 cores)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_trains_one_step_under_ddp(model: str, make_cfg) -> None:
    cfg = make_cfg(
        *_overrides(
            model,
            "hardware=ddp_cpu",
            "data.batch_size=4",
            "trainer.max_steps=2",  # DDP reports unused parameters when the second step starts
            "trainer.limit_val_batches=0",
            "callbacks=none",
            "logger=csv",
            "test=false",
        ),
        tiny=model == "visual_bert",
    )
    train(cfg)  # DDP raises on any parameter that gets no gradient


def _dropouts(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]


@pytest.mark.parametrize("model", MODELS)
def test_dropout_runs_in_training_and_not_in_eval(model: str, make_cfg) -> None:
    """Lightning trains modules in the mode they were built in (it does not call `.train()` at fit start, and restores
    each module's mode after validation), so a built system must be in training mode throughout."""
    # a pretrained text encoder (`from_pretrained` returns eval mode); random-init ones are built in training mode
    extra = ["model.encoder.text_encoder.dropout=0.1", "model.encoder.text_encoder.pretrained=minilm"]
    cfg = make_cfg(*_overrides(model, *extra), tiny=False)
    dm = build_datamodule(cfg)
    system = build_model(cfg, dm)
    frozen = [name for name, m in system.named_modules() if not m.training]
    assert not frozen, f"{len(frozen)} modules built in eval mode, e.g. {frozen[:3]}"
    assert _dropouts(system.encoder), "no active dropout in the encoder"
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    assert not torch.equal(system(batch).pooled, system(batch).pooled), "training forwards equal: dropout off"
    system.eval()
    with torch.no_grad():
        assert torch.equal(system(batch).pooled, system(batch).pooled)


class RecordModes(L.Callback):
    def __init__(self) -> None:
        self.eval_modules: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.eval_modules.append([n for n, m in pl_module.named_modules() if not m.training])


@pytest.mark.slow  # a 2-epoch fit of a pretrained MiniLM (~25 s)
def test_pretrained_text_encoder_trains_in_train_mode_across_validation(make_cfg) -> None:
    """The clip_bert recipe's situation: a pretrained BERT, fit with validation between epochs."""
    cfg = make_cfg(
        *_overrides(
            "clip_bert_tiny", "model.encoder.text_encoder.pretrained=minilm", "model.encoder.text_encoder.dropout=0.1"
        ),
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "callbacks=none",
        "test=false",
    )
    dm = build_datamodule(cfg)
    system = build_model(cfg, dm)
    record = RecordModes()
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[record],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(system, datamodule=dm)
    assert len(record.eval_modules) == 4
    assert all(not names for names in record.eval_modules), record.eval_modules[0][:3]


def test_weight_norm_linear_equals_torch_parametrization_and_pickles() -> None:
    """ViLBERT's weight-normed classifier layers: equal to `parametrizations.weight_norm(dim=None)` (same keys,
    outputs and gradients), and picklable for `ddp_spawn`."""
    import pickle

    from torch.nn.utils.parametrizations import weight_norm

    from vl.heads.vqa import WeightNormLinear

    torch.manual_seed(0)
    ours = WeightNormLinear(7, 5)
    with torch.no_grad():
        ours.parametrizations["weight"].original0.mul_(1.7)
        ours.parametrizations["weight"].original1.add_(torch.randn(5, 7))
    ref = weight_norm(nn.Linear(7, 5), dim=None)
    assert set(ref.state_dict()) == set(ours.state_dict())
    g_key = "parametrizations.weight.original0"  # ours (1,) for FSDP, torch's 0-d: the same number
    ref.load_state_dict({k: v.reshape(()) if k == g_key else v for k, v in ours.state_dict().items()})
    back = WeightNormLinear(7, 5)
    back.load_state_dict(ref.state_dict())  # a 0-d g (torch's, a ViLBERT checkpoint's) loads
    torch.testing.assert_close(back.state_dict()[g_key], ours.state_dict()[g_key])
    x = torch.randn(3, 7)
    a, b = ours(x), ref(x)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    a.square().sum().backward()
    b.square().sum().backward()
    for key, p in ours.named_parameters():
        ref_grad = dict(ref.named_parameters())[key].grad
        torch.testing.assert_close(p.grad, ref_grad.reshape(p.grad.shape), atol=1e-6, rtol=1e-6)
    fresh = WeightNormLinear(7, 5)  # the init: g = |w|, v = w of a default nn.Linear
    g = fresh.parametrizations["weight"].original0
    torch.testing.assert_close(g, fresh.parametrizations["weight"].original1.norm().reshape(1))
    torch.testing.assert_close(pickle.loads(pickle.dumps(ours))(x), a)


def test_unbuilt_parts_of_older_checkpoints_still_load(make_cfg) -> None:
    """visual_bert_tiny (mean pooling) has no pooler now; a state dict that still has one loads."""
    cfg = make_cfg("experiment=none", "model=visual_bert_tiny", "data=vqa", tiny=False)
    system = build_model(cfg, build_datamodule(cfg))
    assert not any(k.startswith("encoder.bert.pooler.") for k in system.state_dict())
    old = dict(system.state_dict())
    old["encoder.bert.pooler.dense.weight"] = torch.zeros(64, 64)
    old["encoder.bert.pooler.dense.bias"] = torch.zeros(64)
    checkpoint = {"state_dict": old}
    system.on_load_checkpoint(checkpoint)
    system.load_state_dict(checkpoint["state_dict"])  # strict, as Lightning loads


# ------------------------------------------------------------------------------------------ activation checkpointing
#: the repeated blocks `vl.models.blocks` finds in each architecture (class names; FSDP's wrap units)
BLOCKS = {
    "bert": {"BertLayer"},
    "clip_bert": {"BertLayer"},
    "clip_bert_tiny": {"BertLayer"},
    "single_stream": {"BertLayer"},
    "visual_bert": {"VisualBertLayer"},
    "visual_bert_tiny": {"BertLayer"},  # the single-stream encoder (conf/model/visual_bert_tiny.yaml)
    "vilbert": {"BertLayer", "CoAttentionLayer"},
    "vilbert_tiny": {"BertLayer", "CoAttentionLayer"},
    "mm_bert": {"BertLayer"},
    "mm_bert_tiny": {"BertLayer"},
    "clip_vil": {"BertLayer", "Bottleneck"},
    "clip_vil_rn50x4": {"BertLayer", "Bottleneck"},
    "clip_vil_tiny": {"BertLayer", "Bottleneck"},
    "vg_bert": {"BertLayer"},  # VGG's conv stack mixes classes (conv, ReLU, pool): no repeated composite block
    "vg_bert_tiny": {"BertLayer"},
    "vg_bert_tiny_minilm": {"BertLayer"},
}


@pytest.mark.parametrize("model", MODELS)
def test_activation_checkpointing_gives_the_same_loss_and_gradients(model: str, make_cfg) -> None:
    """`model.activation_checkpointing=true` recomputes every block in the backward pass: the blocks found are the
    architecture's layers, and with dropout on the loss and every gradient equal the stored-activation run's."""
    from vl.models.blocks import BLOCK_FLAG

    cfg = make_cfg(*_overrides(model, "model.encoder.text_encoder.dropout=0.1"), tiny=model == "visual_bert")
    dm = build_datamodule(cfg)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    runs = []
    for on in (False, True):
        cfg.model.activation_checkpointing = on
        torch.manual_seed(0)
        system = build_model(cfg, dm)
        blocks = {type(m).__name__ for m in system.modules() if getattr(m, BLOCK_FLAG, False)}
        assert blocks == BLOCKS[model], blocks
        torch.manual_seed(1)
        loss = system.shared_step(batch, "train")
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in system.named_parameters() if p.grad is not None}))
    (loss_off, grads_off), (loss_on, grads_on) = runs
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-6)
    assert grads_on.keys() == grads_off.keys() and grads_off
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _fsdp_worker(rank: int, cfg_yaml: str, batch: dict, expected: torch.Tensor, n_blocks: int, port: int) -> None:
    import os

    import torch.distributed as dist
    from omegaconf import OmegaConf
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from vl.models.blocks import fsdp_wrap_policy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = OmegaConf.create(cfg_yaml)
        dm = build_datamodule(cfg)
        torch.manual_seed(0)
        system = build_model(cfg, dm).eval()
        sharded = FSDP(system, auto_wrap_policy=fsdp_wrap_policy(), device_id=torch.device("cpu"))
        units = [m for m in sharded.modules() if isinstance(m, FSDP)]
        assert len(units) == n_blocks + 1, (len(units), n_blocks)  # one unit per block + the root
        with torch.no_grad():
            pooled = sharded(batch).pooled  # FSDP gathers each unit's shards in its forward
        torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # 2 spawned gloo processes
def test_fsdp_wrap_policy_shards_one_unit_per_block_and_keeps_the_output(make_cfg) -> None:
    """`hardware=fsdp`'s policy (`vl.models.blocks.fsdp_wrap_policy`) under torch FSDP on 2 CPU processes (gloo):
    one FSDP unit per ViLBERT block (text, vision and co-attention layers) and the same output as the unsharded model.
    (Lightning's FSDPStrategy itself refuses a CPU accelerator: the preset runs on GPUs.)"""
    import socket

    import torch.multiprocessing as mp
    from omegaconf import OmegaConf

    from vl.models.blocks import BLOCK_FLAG

    cfg = make_cfg(*_overrides("vilbert_tiny"))
    dm = build_datamodule(cfg)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    torch.manual_seed(0)
    system = build_model(cfg, dm).eval()
    with torch.no_grad():
        expected = system(batch).pooled
    n_blocks = sum(1 for m in system.modules() if getattr(m, BLOCK_FLAG, False))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    mp.spawn(_fsdp_worker, args=(cfg_yaml, batch, expected, n_blocks, port), nprocs=2)


def test_a_checkpoint_with_a_0d_weight_norm_gain_initialises_the_vqa_head(make_cfg, tmp_path) -> None:
    """Checkpoints written before the gain became 1-d (FSDP) hold it 0-d: `model.init_from` loads it, not skips it."""
    cfg = make_cfg(*_overrides("vilbert_tiny", "++model.heads.vqa.classifier=simple"))
    dm = build_datamodule(cfg)
    old = build_model(cfg, dm)
    g_keys = [k for k in old.state_dict() if k.endswith("parametrizations.weight.original0")]
    assert g_keys
    state = {k: (v.reshape(()) * 1.5 if k in g_keys else v) for k, v in old.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "old.ckpt")
    new = build_model(cfg, dm, init_from=str(tmp_path / "old.ckpt"))
    for k in g_keys:
        torch.testing.assert_close(new.state_dict()[k], state[k].reshape(1))
