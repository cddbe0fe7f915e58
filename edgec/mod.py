"""Mixture-of-Depths token routing for DiT blocks (DiffRatio-MoD, published as DiffCR).

Each block gets a router, Linear(hidden, 1, no bias) + sigmoid: a score per token. With a
capacity k < N the block runs on the k best-scored tokens only: top-k, indices sorted
back to spatial order, gather, the block (attention among the kept tokens, the MLP branch
multiplied by the token's score so that the router learns), scatter back into a copy of
the input; skipped tokens pass through unchanged. k = N is the plain block, router unused.

Capacities come from ratios in 10% bins. Training learns one ratio per (layer, timestep
region), runs a block at the two bins around its ratio and mixes the outputs by distance
(so the loss reaches the ratio); inference snaps to the nearest bin, and a compiled
region graph has every capacity as a static integer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

BINS = 10  # ratio bins every 10%
MIN_RATIO = 0.1


def capacity(ratio: float, tokens: int) -> int:
    """Tokens a block keeps at `ratio`: min(N, ceil(ratio N)), at least one."""
    return max(1, min(tokens, math.ceil(round(ratio * tokens, 6))))


def snap(ratio: float) -> float:
    """The nearest 10% bin in [0.1, 1]."""
    return min(BINS, max(1, round(ratio * BINS))) / BINS


def bins_around(ratio: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """The bins below and above a ratio (clamped to [0.1, 1]) and the weight of the upper
    one, a differentiable function of the ratio: lower + w (upper - lower) = ratio."""
    r = ratio.clamp(MIN_RATIO, 1.0)
    tenth = min(BINS, math.floor(round(float(r.detach()) * BINS, 6)))
    lower, upper = tenth / BINS, min(BINS, tenth + 1) / BINS
    if upper == lower:  # at 1: the plain block, weight 1 on it
        return lower, upper, r * 0 + 1
    return lower, upper, (r - lower) / (upper - lower)


def block_forward(block: nn.Module, hidden: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor,
                  mlp_scale: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' BasicTransformerBlock with adaLN-zero (a DiT block), with the MLP branch
    optionally multiplied per token by `mlp_scale` [B, N]."""
    normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden, timestep, class_labels, hidden_dtype=hidden.dtype)
    hidden = gate_msa.unsqueeze(1) * block.attn1(normed) + hidden
    normed = block.norm3(hidden) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    mlp = gate_mlp.unsqueeze(1) * block.ff(normed)
    if mlp_scale is not None:
        mlp = mlp * mlp_scale.unsqueeze(-1)
    return hidden + mlp


class RoutedBlock(nn.Module):
    """A DiT block with a router. `capacity` (tokens kept, None = all) is what a compiled
    region graph runs; `ratio`, a tensor set by the trainer, makes the block interpolate
    between the two bins around it."""

    def __init__(self, block: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.block = block
        self.router = nn.Linear(hidden_size, 1, bias=False)
        nn.init.zeros_(self.router.weight)  # score 0.5 everywhere: no token preferred before training
        self.capacity: int | None = None
        self.ratio: torch.Tensor | None = None

    @property
    def norm1(self) -> nn.Module:
        """The DiT's output layer reads the first block's conditioning embedding here."""
        return self.block.norm1

    def choose(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Router scores [B, N] and the k kept token indices [B, k] in spatial order."""
        scores = torch.sigmoid(self.router(hidden)).squeeze(-1)
        return scores, torch.topk(scores, k, dim=1, sorted=True).indices.sort(dim=1).values

    def routed(self, hidden: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor, k: int) -> torch.Tensor:
        tokens = hidden.shape[1]
        if k >= tokens:
            return block_forward(self.block, hidden, timestep, class_labels)
        scores, kept = self.choose(hidden, k)
        index = kept.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        chosen = torch.gather(hidden, 1, index)
        updated = block_forward(self.block, chosen, timestep, class_labels, torch.gather(scores, 1, kept))
        return hidden.scatter(1, index, updated)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                timestep: torch.Tensor | None = None, cross_attention_kwargs: dict | None = None,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        assert timestep is not None and class_labels is not None
        tokens = hidden_states.shape[1]
        if self.ratio is None:
            return self.routed(hidden_states, timestep, class_labels, tokens if self.capacity is None else self.capacity)
        lower, upper, weight = bins_around(self.ratio)
        high = self.routed(hidden_states, timestep, class_labels, capacity(upper, tokens))
        if upper == lower:
            return high
        low = self.routed(hidden_states, timestep, class_labels, capacity(lower, tokens))
        return low + weight * (high - low)


def add_routers(transformer: nn.Module) -> list[RoutedBlock]:
    """Wrap every block of a DiTTransformer2DModel (in place); returns the routed blocks."""
    hidden = int(transformer.config.num_attention_heads) * int(transformer.config.attention_head_dim)
    blocks = transformer.transformer_blocks
    for i, block in enumerate(blocks):
        if not isinstance(block, RoutedBlock):
            blocks[i] = RoutedBlock(block, hidden)
    return list(blocks)


def set_capacities(blocks: list[RoutedBlock], capacities: list[int] | None) -> None:
    """Static capacities for a region graph (None: every block plain)."""
    for i, block in enumerate(blocks):
        block.ratio = None
        block.capacity = None if capacities is None else capacities[i]
