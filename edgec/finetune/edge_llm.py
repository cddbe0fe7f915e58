"""Edge-LLM adaptive layer tuning: exits every `stride` layers, LoRA in one window at a time.

Before: a causal LM (Hugging Face directory or zoo model).
After: the same model with its LoRA adapters merged into the weights, plus exit heads
(edgec.exits) after layers stride-1, 2*stride-1, ..., L-1 that vote when compiled.

Training walks the exits shallow to deep. At the exit after layer e, only the adapters
of the window below it (layers e-stride+1..e) and that exit's head train; the forward
runs layers 0..e only (it stops at the exit: no later layer runs), and the layers
below the window run without autograd, so backpropagation spans one window and keeps
one window's activations. The loss is next-token cross-entropy at that exit. The
reference code runs every layer forward and forgets to save the exit heads; both are
avoided here (METHODS.md, "Adaptive layer tuning and voting").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from edgec.architectures import architecture_of
from edgec.errors import BadInputError
from edgec.exits import ExitConfig, ExitHeads, attach, exit_layers
from edgec.finetune.lora import LoraLinear, add_adapters, linear_names
from edgec.lm import CausalLMEntries


class EdgeLlmOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stride: int = Field(2, ge=1, description="layers per window: an exit after every `stride` layers (and the last)")
    rank: int = Field(8, ge=1, description="LoRA rank (of the window's adapters and of each exit head's adapter)")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha: adapters scale by alpha / rank")


@dataclass(frozen=True)
class Stage:
    """One exit and the layers whose adapters train for it."""

    exit_layer: int
    window: tuple[int, ...]


def stages(num_layers: int, stride: int) -> list[Stage]:
    layers = exit_layers(num_layers, stride)
    return [Stage(exit_layer, tuple(range(start + 1, exit_layer + 1))) for start, exit_layer in zip([-1, *layers], layers)]


def check_options(model: nn.Module, options: EdgeLlmOptions) -> None:
    """Refuse, before any work, what cannot train: a stride beyond the layers, a rank wider than a layer."""
    num_layers = int(model.config.num_hidden_layers)
    exit_layers(num_layers, options.stride)
    hidden = int(model.config.hidden_size)
    if options.rank > hidden:
        raise BadInputError(f"edge-llm rank {options.rank} is larger than the model's hidden size {hidden}; use at most {hidden}")
    layer = model.get_submodule(architecture_of(model).layout.layers)[0]
    widths = [(name, int(m.in_features), int(m.out_features)) for name, m in ((n, layer.get_submodule(n)) for n in linear_names(layer))]
    narrow = min(widths, key=lambda w: min(w[1], w[2]), default=None)
    if narrow is not None and options.rank > min(narrow[1], narrow[2]):
        raise BadInputError(f"edge-llm rank {options.rank} is larger than {narrow[0]} ({narrow[1]} -> {narrow[2]}); "
                            f"use a rank of at most {min(narrow[1], narrow[2])}")


class EdgeLlmTuner:
    """A model prepared for adaptive layer tuning: adapters on every layer, exit heads."""

    def __init__(self, model: nn.Module, options: EdgeLlmOptions, seed: int) -> None:
        check_options(model, options)
        self.model = model
        self.options = options
        generator = torch.Generator().manual_seed(seed)
        num_layers = int(model.config.num_hidden_layers)
        self.stages = stages(num_layers, options.stride)
        self.heads: ExitHeads = attach(model, ExitConfig([s.exit_layer for s in self.stages], options.stride, options.rank, options.alpha))
        self.entries = CausalLMEntries(model)
        self.adapters: list[dict[str, LoraLinear]] = [add_adapters(layer, options.rank, options.alpha, generator)
                                                      for layer in self.entries.layers]
        model.requires_grad_(False)  # nothing trains until a stage is chosen

    def trainable(self, stage: Stage | None) -> dict[str, nn.Parameter]:
        """The parameters that train at `stage`, by a stable name (checkpoints use it);
        None: vanilla LoRA tuning, every layer's adapters at once."""
        found: dict[str, nn.Parameter] = {}
        for layer in range(len(self.adapters)) if stage is None else stage.window:
            for name, adapter in self.adapters[layer].items():
                found[f"layer.{layer}.{name}.lora_a"] = adapter.lora_a
                found[f"layer.{layer}.{name}.lora_b"] = adapter.lora_b
        head = self.heads.heads[str(stage.exit_layer)] if stage is not None and str(stage.exit_layer) in self.heads.heads else None
        if head is not None:
            found[f"exit.{stage.exit_layer}.down"] = head.down
            found[f"exit.{stage.exit_layer}.up"] = head.up
        return found

    def _every_stage(self) -> dict[str, nn.Parameter]:
        return {name: p for stage in self.stages for name, p in self.trainable(stage).items()}

    def every_trained(self) -> dict[str, torch.Tensor]:
        """Every tensor tuning changes (all stages): what a checkpoint stores."""
        return {name: p.detach() for name, p in self._every_stage().items()}

    def load_trained(self, tensors: dict[str, torch.Tensor]) -> None:
        current = self._every_stage()
        if set(tensors) != set(current):
            raise BadInputError("the checkpoint's tensors do not match this tuning's adapters and exits; delete it or fix the settings")
        with torch.no_grad():
            for name, tensor in tensors.items():
                current[name].copy_(tensor)

    def set_trainable(self, stage: Stage | None) -> list[nn.Parameter]:
        """Only `stage`'s parameters (None: vanilla's) train; returns them."""
        chosen = self.trainable(stage)
        self.model.requires_grad_(False)
        for parameter in chosen.values():
            parameter.requires_grad_(True)
        return list(chosen.values())

    def loss(self, stage: Stage | None, batch: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy at the stage's exit; layers below its window run without
        autograd. None: vanilla's, every layer with autograd and the loss at the last."""
        if stage is None:
            logits = self.entries.exit_forward(batch, len(self.entries.layers) - 1, frozen_below=0)
        else:
            logits = self.entries.exit_forward(batch, stage.exit_layer, frozen_below=stage.window[0])
        return next_token_loss(logits, batch)

    def merged_deltas(self) -> dict[str, torch.Tensor]:
        """Each adapted linear's weight update [out, in], by its module name in the model."""
        prefix = self.entries.arch.layout.layers
        return {f"{prefix}.{index}.{name}": adapter.delta() for index, adapters in enumerate(self.adapters)
                for name, adapter in adapters.items()}

    def describe(self) -> str:
        per_stage = [sum(p.numel() for p in self.trainable(s).values()) for s in self.stages]
        return f"{len(self.stages)} exits, {max(per_stage):,} parameters train per window (rank {self.options.rank})"


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def record_of(tuner: EdgeLlmTuner) -> dict[str, Any]:
    return {
        "method": "edge-llm",
        "stride": tuner.options.stride,
        "rank": tuner.options.rank,
        "alpha": tuner.options.alpha,
        "exits": [s.exit_layer for s in tuner.stages],
        "windows": [list(s.window) for s in tuner.stages],
    }
