"""`vl.optimizers.TransformersAdamW` (the AdamW of CLIP-ViL's and MM-BERT's seeds) against their update written out by
hand here, and the recipes that use it."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import vl.optimizers
from vl.optimizers import TransformersAdamW

CONF = Path(__file__).resolve().parents[1] / "conf"


def seed_adamw_step(params, state, *, lr, wd, b1=0.9, b2=0.999, eps=1e-6, correct_bias=True) -> None:
    """VL-BERT `common/nlp/bert/optimization.py` `AdamW.step` (= transformers 3.3.1 `AdamW.step`), one group: per
    parameter with a gradient, step += 1; m, v updated; denom = sqrt(v) + eps; step size lr (x sqrt(1 - b2^t) /
    (1 - b1^t) with correct_bias); p -= step size * m / denom; then p += -lr * wd * p."""
    for p in params:
        if p.grad is None:
            continue
        st = state.setdefault(id(p), {})
        if not st:
            st["step"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
        st["step"] += 1
        g = p.grad
        st["m"].mul_(b1).add_(g, alpha=1.0 - b1)
        st["v"].mul_(b2).addcmul_(g, g, value=1.0 - b2)
        denom = st["v"].sqrt().add_(eps)
        size = lr
        if correct_bias:
            size = size * math.sqrt(1.0 - b2 ** st["step"]) / (1.0 - b1 ** st["step"])
        p.data.addcdiv_(st["m"], denom, value=-size)
        if wd > 0.0:
            p.data.add_(p.data, alpha=-lr * wd)


def run_both(dtype, *, correct_bias=True, steps=25, lr_of=lambda s: 1e-3 * min(1.0, s / 5), kept=None):
    """(vl's parameters, the seed's) after `steps` steps of two groups (decayed / not), small gradients (where eps
    matters), a parameter skipping every third step (its step count falls behind the others'), the lr of a
    scheduler (0 at the first step, as the seed's linear warmup)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(30, 20), (20,), (7, 3, 5), (1,)]
    start = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    mine = [torch.nn.Parameter(x.clone()) for x in start]
    ref = [torch.nn.Parameter(x.clone()) for x in start]
    wd = [0.01, 0.0] if kept is None else [(1.0 - kept) / 1e-3, 0.0]
    opt = TransformersAdamW(
        [{"params": [mine[0], mine[2]], "weight_decay": wd[0]}, {"params": [mine[1], mine[3]], "weight_decay": wd[1]}],
        correct_bias=correct_bias,
    )
    state: dict = {}
    for s in range(steps):
        for i, shape in enumerate(shapes):
            grad = (
                None
                if (i == 2 and s % 3 == 1)
                else (torch.randn(shape, generator=g, dtype=torch.float64) * 1e-5).to(dtype)
            )
            mine[i].grad = None if grad is None else grad.clone()
            ref[i].grad = None if grad is None else grad.clone()
        for group in opt.param_groups:
            group["lr"] = lr_of(s)
        opt.step()
        seed_adamw_step([ref[0], ref[2]], state, lr=lr_of(s), wd=wd[0], correct_bias=correct_bias)
        seed_adamw_step([ref[1], ref[3]], state, lr=lr_of(s), wd=wd[1], correct_bias=correct_bias)
    assert opt.state[mine[2]]["step"] == steps - len(range(1, steps, 3)) and opt.state[mine[0]]["step"] == steps
    return mine, ref


@pytest.mark.parametrize("correct_bias", [True, False])
def test_transformers_adamw_is_the_seeds_update_float64(correct_bias: bool) -> None:
    mine, ref = run_both(torch.float64, correct_bias=correct_bias)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_transformers_adamw_is_the_seeds_update_float32() -> None:
    """In float32 (the fused kernel's own rounding): as close to the float64 seed as the seed's float32 code is."""
    mine, ref = run_both(torch.float32)
    _, exact = run_both(torch.float64)
    for a, b, c in zip(mine, ref, exact):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert (
            float((a.detach().double() - c.detach()).abs().max())
            <= 2 * float((b.detach().double() - c.detach()).abs().max()) + 1e-7
        )


def test_the_foreach_path_is_the_seeds_update_too(monkeypatch) -> None:
    """Devices without torch's fused kernel (and lr x wd = 1, where the fused arguments do not exist) take the
    `torch._foreach_*` path."""
    monkeypatch.setattr(vl.optimizers, "FUSED_DEVICES", ())
    mine, ref = run_both(torch.float64)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    monkeypatch.undo()
    mine, ref = run_both(torch.float64, kept=0.0, lr_of=lambda s: 1e-3)  # lr x wd = 1: the seed zeroes the weights
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert float(mine[0].detach().abs().max()) == 0.0


def test_torch_adamw_is_another_function() -> None:
    """The test above can tell the two apart: torch's AdamW on the same steps (eps after the bias correction, decay
    before the update) ends elsewhere."""
    _, ref = run_both(torch.float64)
    g = torch.Generator().manual_seed(0)
    shapes = [(30, 20), (20,), (7, 3, 5), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
    opt = torch.optim.AdamW(
        [
            {"params": [params[0], params[2]], "weight_decay": 0.01},
            {"params": [params[1], params[3]], "weight_decay": 0},
        ],
        eps=1e-6,
    )
    for s in range(25):
        for i, shape in enumerate(shapes):
            grad = None if (i == 2 and s % 3 == 1) else torch.randn(shape, generator=g, dtype=torch.float64) * 1e-5
            params[i].grad = grad
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, s / 5)
        opt.step()
    assert max(float((a - b).abs().max()) for a, b in zip(params, ref)) > 1e-5


def test_transformers_adamw_resumes_exactly_from_a_weights_only_state_dict() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    twin = torch.nn.Linear(6, 3)
    twin.load_state_dict(model.state_dict())
    opt, other = TransformersAdamW(model.parameters(), lr=1e-2, weight_decay=0.1), None
    data = [torch.randn(4, 6) for _ in range(8)]
    for k, x in enumerate(data):
        if k == 4:  # save, rebuild the twin's optimiser from the file, go on
            for p, q in zip(twin.parameters(), model.parameters()):
                p.data.copy_(q.data)
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            other = TransformersAdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
            other.load_state_dict(torch.load(buffer, weights_only=True))
        for m, o in ((model, opt), (twin, other)):
            if o is None:
                continue
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_transformers_adamw_refuses_bad_options_and_sparse_gradients() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    for bad in ({"lr": -1.0}, {"betas": (1.0, 0.999)}, {"eps": -1.0}, {"weight_decay": -0.1}):
        with pytest.raises(ValueError, match="TransformersAdamW: invalid"):
            TransformersAdamW([p], **bad)
    emb = torch.nn.Embedding(5, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        TransformersAdamW(emb.parameters()).step()


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize(
    "experiment",
    [
        "clip_vil_pretrain",
        "clip_vil_pretrain_qa",
        "clip_vil_vqa",
        "clip_vil_pretrain_rn50x4",
        "clip_vil_pretrain_qa_rn50x4",
        "clip_vil_vqa_rn50x4",
        "mm_bert_pretrain",
        "mm_bert_mt",
        "mm_bert_retrieval",
        "mm_bert_mlt",
    ],
)
def test_clip_vil_and_mm_bert_recipes_use_the_seeds_adamw(experiment: str) -> None:
    opt = _compose([f"experiment={experiment}"]).model.optimizer
    assert opt._target_ == "vl.optimizers.TransformersAdamW" and opt.eps == 1e-6
    assert opt.get("betas") in (None, [0.9, 0.999]) and opt.get("correct_bias") in (None, True)


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=clip_vil_vqa_tiny"],
        ["experiment=mm_bert_pretrain_tiny"],
        ["experiment=compare", "model=mm_bert_tiny"],
    ],
)
def test_tiny_cpu_recipes_and_the_comparison_keep_torch_adamw(overrides: list[str]) -> None:
    """The CPU-size recipes' learning tests were calibrated with torch's AdamW; `experiment=compare` holds one optimiser
    for every architecture."""
    assert _compose(overrides).model.optimizer._target_ == "torch.optim.AdamW"


def test_clip_vil_builds_the_seeds_adamw_beside_the_backbone_sgd() -> None:
    from tests.models.test_clip_vil import configured, tiny_system

    opt = {"_target_": "vl.optimizers.TransformersAdamW", "_partial_": True, "lr": 1e-3, "weight_decay": 0.01}
    fused, _ = configured(tiny_system(optimizer=opt | {"eps": 1e-6}))
    adamw = fused.optimizers["adamw"]
    assert isinstance(adamw, TransformersAdamW) and adamw.defaults["eps"] == 1e-6
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.01, 0.0]
    assert isinstance(fused.optimizers["sgd"], torch.optim.SGD)
