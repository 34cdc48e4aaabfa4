"""The repeated blocks of an encoder (transformer layers, co-attention layers, ResNet bottlenecks): the units of
activation checkpointing and of FSDP's auto-wrapping, found the same way for every architecture.

An encoder may list them itself (`blocks() -> list[nn.Module]`); otherwise they are the children of every
`nn.ModuleList` / `nn.Sequential` whose children all share one class and are themselves composite modules (a stack of
layers, not `Sequential(Linear, ReLU, Linear)`), outermost first (a block inside a block is not a second unit).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

BLOCK_FLAG = "_vl_block"


def encoder_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's repeated blocks (see the module docstring), in module order."""
    listed = getattr(encoder, "blocks", None)
    if callable(listed):
        return list(listed())
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in encoder.modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList | nn.Sequential):
            children = list(module.children())
            same = bool(children) and len({type(c) for c in children}) == 1
            if same and all(next(c.children(), None) is not None for c in children):  # composite, not a leaf
                found.extend(children)
                inside.update(id(m) for c in children for m in c.modules())
    return found


def mark_blocks(encoder: nn.Module) -> list[nn.Module]:
    """Flag the encoder's blocks (`fsdp_wrap_policy` wraps exactly these); returns them."""
    blocks = encoder_blocks(encoder)
    for block in blocks:
        setattr(block, BLOCK_FLAG, True)
    return blocks


def checkpoint_activations(blocks: list[nn.Module]) -> int:
    """Recompute each block's activations in the backward pass instead of storing them (`torch.utils.checkpoint`,
    non-reentrant, the RNG state preserved so dropout draws the same mask twice): gradients are unchanged, memory for
    activations drops to one block's. Only while training with gradients; evaluation runs the plain forward."""
    for block in blocks:
        if getattr(block, "_vl_checkpointed", False):
            continue
        forward = block.forward

        @functools.wraps(forward)
        def checkpointed(*args: Any, _forward: Any = forward, _block: nn.Module = block, **kwargs: Any) -> Any:
            if _block.training and torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        block.forward = checkpointed  # type: ignore[method-assign]
        block._vl_checkpointed = True  # type: ignore[assignment]
    return len(blocks)


def fsdp_wrap_policy() -> Any:
    """FSDP auto-wrap policy (`hardware=fsdp`): one FSDP unit per block flagged by `mark_blocks` (every
    architecture's transformer / co-attention layers), the rest in the root unit."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    return CustomPolicy(lambda module: bool(getattr(module, BLOCK_FLAG, False)))
