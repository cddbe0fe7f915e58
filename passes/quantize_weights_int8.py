"""quantize-weights-int8: weight-only symmetric int8 quantization of linears and embeddings.

Before: every nn.Linear (and the token embedding) holds fp32 weights.
After: each selected module holds int8 weights plus one fp32 scale per output
channel and group (`group_size`, 0 = the whole row); the forward dequantizes
in the graph, so both backends keep 1-byte weights in the artifact and in memory.
A tied lm_head shares the embedding's int8 table instead of keeping a second copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from edgec.architectures import architecture_of
from edgec.errors import BadInputError
from edgec.model import FAMILY_CAUSAL_LM, ModelHandle
from edgec.packing import frozen, set_submodule, unique_weight_bytes
from edgec.pipeline import PassContext, PassResult, options_for_module
from edgec.progress import advance
from edgec.recipe import LayerOverride


class QuantizeWeightsInt8Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="quantize this module (set false in an override to keep fp32)")
    group_size: int = Field(0, ge=0, description="input channels per scale; 0 = one scale per output channel")
    embeddings: bool = Field(True, description="also quantize the token embedding table")


def quantize_rows(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric abs-max int8 per (row, group): returns (int8 [R, C], fp32 scales [R, C // group])."""
    rows, cols = weight.shape
    group = cols if group_size == 0 else group_size
    if cols % group != 0:
        raise BadInputError(f"group_size {group_size} does not divide {cols} input channels; pick a divisor or 0")
    grouped = weight.detach().float().reshape(rows, cols // group, group)
    scale = grouped.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = torch.round(grouped / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(rows, cols), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows, cols = q.shape
    groups = scale.shape[1]
    return (q.reshape(rows, groups, cols // groups).float() * scale[..., None]).reshape(rows, cols)



class Int8Linear(nn.Module):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.qweight = frozen(q)
        self.scale = frozen(scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features = q.shape[1]
        self.out_features = q.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, dequantize_rows(self.qweight, self.scale), self.bias)


class Int8Embedding(nn.Module):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.qweight = frozen(q)
        self.scale = frozen(scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[ids].float()
        scales = self.scale[ids]
        groups = scales.shape[-1]
        shape = rows.shape
        return (rows.reshape(*shape[:-1], groups, shape[-1] // groups) * scales[..., None]).reshape(shape)




class QuantizeWeightsInt8:
    """Weight-only int8 (symmetric, per channel or per group) for linears and embeddings."""

    name: ClassVar[str] = "quantize-weights-int8"
    families: ClassVar[tuple[str, ...]] = (FAMILY_CAUSAL_LM,)
    Options: ClassVar[type[BaseModel]] = QuantizeWeightsInt8Options
    summary: ClassVar[str] = "weight-only int8 quantization (per channel or group) of linears and embeddings"

    def __init__(self, options: BaseModel, overrides: Sequence[LayerOverride]) -> None:
        assert isinstance(options, QuantizeWeightsInt8Options)
        self.options = options
        self.overrides = list(overrides)

    def run(self, model: ModelHandle, ctx: PassContext) -> PassResult:
        root = model.module
        assert root is not None
        if any(isinstance(m, (Int8Linear, Int8Embedding)) for m in root.modules()):
            raise BadInputError(f"{self.name}: the model is already int8-quantized; list the pass once in the recipe")
        before = unique_weight_bytes(root)
        tied = bool(getattr(root.config, "tie_word_embeddings", False))
        layers: list[dict[str, object]] = []
        layout = architecture_of(root).layout
        embed_name = layout.embed
        embed_q: tuple[torch.Tensor, torch.Tensor] | None = None
        embed_group = -1
        if self.options.embeddings:
            opts = options_for_module(self.options, self.overrides, embed_name)
            assert isinstance(opts, QuantizeWeightsInt8Options)
            if opts.enabled:
                embedding = root.get_submodule(embed_name)
                assert isinstance(embedding, nn.Embedding)
                table = Int8Embedding(*quantize_rows(embedding.weight, opts.group_size))
                embed_q = (table.qweight, table.scale)
                embed_group = opts.group_size
                set_submodule(root, embed_name, table)
                layers.append({"module": embed_name, "group_size": opts.group_size, "shape": list(embed_q[0].shape)})
        linears = [(name, m) for name, m in root.named_modules() if isinstance(m, nn.Linear)]
        for done, (name, linear) in enumerate(linears, start=1):
            opts = options_for_module(self.options, self.overrides, name)
            assert isinstance(opts, QuantizeWeightsInt8Options)
            if not opts.enabled:
                continue
            if name == layout.head and tied and embed_q is not None and opts.group_size == embed_group:
                q, scale = embed_q  # same matrix: share the int8 table instead of storing it twice
            else:
                q, scale = quantize_rows(linear.weight, opts.group_size)
            set_submodule(root, name, Int8Linear(q, scale, linear.bias))
            layers.append({"module": name, "group_size": opts.group_size, "shape": list(q.shape)})
            advance(ctx.progress, f"{self.name}: linears", done, len(linears))
        after = unique_weight_bytes(root)
        return PassResult(
            changed=bool(layers),
            record={
                "quantized_modules": len(layers),
                "weight_bytes_before": before,
                "weight_bytes_after": after,
                "modules": layers,
            },
        )
