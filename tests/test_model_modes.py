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
DATA |= {m: "vg_bert_coco" for m in ("vg_bert", "vg_bert_tiny")}
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
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7)
    a, b = ours(x), ref(x)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    a.square().sum().backward()
    b.square().sum().backward()
    for key, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[key].grad, atol=1e-6, rtol=1e-6)
    fresh = WeightNormLinear(7, 5)  # the init: g = |w|, v = w of a default nn.Linear
    g = fresh.parametrizations["weight"].original0
    torch.testing.assert_close(g, fresh.parametrizations["weight"].original1.norm())
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
