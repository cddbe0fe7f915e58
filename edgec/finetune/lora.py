"""LoRA adapters on a model's linears, switched on window by window.

A `LoraLinear` wraps a frozen base module (nn.Linear, or a packed one from a pass):
y = base(x) + (alpha / rank) * x @ A^T @ B^T, A [rank, in] random, B [out, rank] zero, so
a fresh adapter changes nothing. A and B are Parameters, not nn.Linear, so passes that
look for linears see only the base.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgec.errors import BadInputError
from edgec.packing import PackedLinear, set_submodule


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        in_features, out_features = int(base.in_features), int(base.out_features)
        self.in_features, self.out_features = in_features, out_features
        self.lora_a = nn.Parameter(torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + torch.matmul(torch.matmul(x, self.lora_a.t()), self.lora_b.t()) * self.scale

    def delta(self) -> torch.Tensor:
        """The adapter as a weight update [out, in]."""
        return (self.lora_b @ self.lora_a).detach() * self.scale


def linear_names(layer: nn.Module) -> list[str]:
    """The layer's projections an adapter goes on: every linear, dense or packed."""
    return [name for name, module in layer.named_modules() if isinstance(module, (nn.Linear, PackedLinear))]


def add_adapters(layer: nn.Module, rank: int, alpha: float, generator: torch.Generator) -> dict[str, LoraLinear]:
    """Wrap every linear of `layer` (in place); returns them by name within the layer."""
    added: dict[str, LoraLinear] = {}
    for name in linear_names(layer):
        base = layer.get_submodule(name)
        smallest = min(int(base.in_features), int(base.out_features))
        if rank > smallest:
            raise BadInputError(f"LoRA rank {rank} is larger than {name} ({base.in_features} -> {base.out_features}); "
                                f"use a rank of at most {smallest}")
        wrapped = LoraLinear(base, rank, alpha, generator)
        set_submodule(layer, name, wrapped)
        added[name] = wrapped
    return added


def adapters_of(layer: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, LoraLinear)}
