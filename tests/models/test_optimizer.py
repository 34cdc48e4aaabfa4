"""The default optimiser: torch's fused AdamW kernel where the device has it, with the same steps as the default
(for-loop) implementation."""

from __future__ import annotations

import copy

import pytest
import torch

from vl.pipeline import build_datamodule, build_model


def _losses(model, batches, fused: bool | None) -> tuple[list[float], torch.optim.Optimizer]:
    model.optimizer_cfg = {**model.optimizer_cfg, "fused": fused}
    model.scheduler_cfg = None
    optimizer = model.configure_optimizers()
    losses = []
    for batch in batches:
        loss = model.shared_step(batch, "train")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, optimizer


def test_fused_adamw_is_the_default_and_steps_like_the_for_loop(make_cfg) -> None:
    cfg = make_cfg("trainer.max_epochs=1")
    dm = build_datamodule(cfg)
    dm.setup("fit")
    batches = [b for _, b in zip(range(6), dm.train_dataloader())]
    torch.manual_seed(0)
    model = build_model(cfg, dm)
    model.trainer = None
    model.eval()  # no dropout: both runs see the same function
    twin = copy.deepcopy(model)
    fused, opt_fused = _losses(model, batches, None)  # the default: fused where supported
    plain, opt_plain = _losses(twin, batches, False)
    assert opt_fused.defaults["fused"] is True and not opt_plain.defaults.get("fused")
    assert fused == pytest.approx(plain, abs=1e-5)  # stated tolerance: float32 reassociation in the kernel
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        if name.endswith("attention.self.key.bias"):
            continue  # softmax ignores a key bias: its gradient is float noise, which Adam scales up to lr-size steps
        assert torch.allclose(a, b, atol=1e-5), name
    assert plain[-1] < plain[0]  # the steps did something


def test_fused_is_left_out_for_other_optimisers_and_kept_when_set() -> None:
    from vl.optimizers import build_optimizer

    groups = [{"params": [torch.nn.Parameter(torch.ones(3))]}]
    rms = build_optimizer({"_target_": "torch.optim.RMSprop", "_partial_": True, "lr": 0.1, "fused": None}, groups)
    assert isinstance(rms, torch.optim.RMSprop)
    sgd = build_optimizer({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}, groups)
    assert not sgd.defaults.get("fused")  # SGD has a fused kernel, but it is only used when asked for
    adam = build_optimizer({"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.1, "fused": False}, groups)
    assert adam.defaults["fused"] is False
