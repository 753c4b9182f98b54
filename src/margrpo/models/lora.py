"""LoRA adapters on a policy's transformer (`algorithm.train: lora`), through peft.

Adapters are injected in place (`peft.inject_adapter_in_model`): the policy stays the same `nn.Module` object with
the same `forward`, so the sampler, replay, the reference copy and DDP see the module they always did; only the
targeted `nn.Linear`s become peft `lora.Linear`s (`base_layer` + `lora_A` / `lora_B`). The trainable parameters
are exactly the adapters' (names containing `.lora_`), so checkpoints hold only them; the exported model folder
has them merged (`merged`), a plain folder that loads without peft.

Why A is re-drawn here: peft initialises `lora_A` from torch's global RNG, and every random number of a run must
come from a generator derived from the seed (a resumed or repeated run must be the same run). B stays zero, so a
fresh adapter leaves the policy's function unchanged (ratio 1 and KL 0 before the first update).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

ADAPTER_NAME = "default"


def lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The peft LoRA layers under `module`, with their names."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]


def is_lora_parameter(name: str) -> bool:
    return ".lora_" in name


def add_lora(policy: nn.Module, rank: int, alpha: float, target_modules: str | list[str],
             generator: torch.Generator) -> list[str]:
    """Inject rank-`rank` adapters (scale alpha / rank, no dropout: RL's replay must see the sampling function)
    into the `target_modules` of `policy` (peft's syntax: a regex full-matched against module names, or a list of
    name suffixes); returns the adapted modules' names. A is drawn like peft's kaiming-uniform, from `generator`."""
    from peft import LoraConfig, inject_adapter_in_model

    if lora_layers(policy):
        raise ValueError("the policy already carries LoRA adapters")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=target_modules)
    inject_adapter_in_model(cfg, policy, adapter_name=ADAPTER_NAME)
    layers = lora_layers(policy)
    if not layers:
        raise ValueError(f"LoRA target_modules={target_modules!r} matches no linear layer of "
                         f"{type(policy).__name__}")
    with torch.no_grad():
        for _, layer in layers:
            a = layer.lora_A[ADAPTER_NAME].weight
            bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
            a.copy_((torch.rand(a.shape, generator=generator, device=generator.device) * 2 - 1) * bound)
            layer.lora_B[ADAPTER_NAME].weight.zero_()
    return [n for n, _ in layers]


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


@contextmanager
def merged(policy: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `policy` has plain `nn.Linear`s holding W + (alpha / r) B A and no peft modules (its
    state dict is the base model's keys), for `save_pretrained`; afterwards the adapters are back, with the base
    weights bit-identical (the original tensors are put back, not W + BA - BA)."""
    layers = lora_layers(policy)
    swapped = []
    try:
        with torch.no_grad():
            for name, layer in layers:
                base = layer.get_base_layer()
                original = base.weight.data
                base.weight.data = original + layer.get_delta_weight(ADAPTER_NAME).to(original.dtype)
                parent, child = _parent(policy, name)
                setattr(parent, child, base)
                swapped.append((parent, child, layer, base, original))
        yield policy
    finally:
        for parent, child, layer, base, original in reversed(swapped):
            base.weight.data = original
            setattr(parent, child, layer)


def merge_and_remove(policy: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights for good and drop the peft modules (a run directory loaded as a
    model: its latest checkpoint's adapters become a plain policy, which a new LoRA run can adapt again)."""
    with torch.no_grad():
        for name, layer in lora_layers(policy):
            base = layer.get_base_layer()
            base.weight.data = base.weight.data + layer.get_delta_weight(ADAPTER_NAME).to(base.weight.dtype)
            parent, child = _parent(policy, name)
            setattr(parent, child, base)
    return policy
