"""LoRA adapters on a model's linears, switched on window by window.

A `LoraLinear` wraps a frozen base module (nn.Linear, or a packed one from a pass):
y = base(x) + (alpha / rank) * x @ A^T @ B^T, A [rank, in] random, B [out, rank] zero, so
a fresh adapter changes nothing. A and B are Parameters, not nn.Linear, so passes that
look for linears see only the base.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
        wrapped = LoraLinear(layer.get_submodule(name), rank, alpha, generator)
        set_submodule(layer, name, wrapped)
        added[name] = wrapped
    return added


def adapters_of(layer: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, LoraLinear)}


# A tuned compressed model keeps its adapters beside the weights (edgec.finetune).
ADAPTERS_CONFIG = "adapters.json"
ADAPTERS_WEIGHTS = "adapters.safetensors"
# ... and what the recipe's passes made, in the pass cache's format (edgec.pass_cache).
PASSES_DIR = "passes"


def save_adapters(model: nn.Module, out: Path) -> None:
    from safetensors.torch import save_file

    adapters = {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}
    first = next(iter(adapters.values()))
    config = {"rank": int(first.lora_a.shape[0]), "scale": first.scale, "modules": sorted(adapters)}
    (out / ADAPTERS_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    tensors = {f"{name}.{part}": getattr(m, part).detach().contiguous() for name, m in adapters.items() for part in ("lora_a", "lora_b")}
    save_file(tensors, str(out / ADAPTERS_WEIGHTS))


def load_adapters(model: nn.Module, path: Path) -> int:
    """Wrap the modules named in `path`/adapters.json with their stored adapters; returns how many."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    source = path / ADAPTERS_CONFIG
    try:
        config = json.loads(source.read_text())
        tensors = load_file(str(path / ADAPTERS_WEIGHTS))
        rank, scale, names = int(config["rank"]), float(config["scale"]), list(config["modules"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise BadInputError(f"{source}: unreadable adapters ({exc}); re-run `edgec finetune`") from None
    generator = torch.Generator().manual_seed(0)
    for name in names:
        try:
            base = model.get_submodule(name)
            wrapped = LoraLinear(base, rank, scale * rank, generator)
            with torch.no_grad():
                wrapped.lora_a.copy_(tensors[f"{name}.lora_a"])
                wrapped.lora_b.copy_(tensors[f"{name}.lora_b"])
        except (AttributeError, KeyError, RuntimeError) as exc:
            raise BadInputError(f"{source}: adapter {name} does not fit this model ({str(exc).splitlines()[0]})") from None
        wrapped.requires_grad_(False)
        set_submodule(model, name, wrapped)
    return len(names)


@contextmanager
def unwrapped(model: nn.Module) -> Iterator[None]:
    """The model without its adapters for the block (their base modules in place)."""
    adapters = {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}
    for name, adapter in adapters.items():
        set_submodule(model, name, adapter.base)
    try:
        yield
    finally:
        for name, adapter in adapters.items():
            set_submodule(model, name, adapter)
