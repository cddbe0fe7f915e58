"""Width: which KV groups and MLP channels a subnet keeps, FLAP-style.

Importance is measured once on the full model over calibration data, at the inputs of
each layer's output projections (o_proj, down_proj): channel j scores
Var(x_j) x ||W[:, j]||^2. A KV group (one KV head and the query heads it serves: GQA is
pruned by group) scores the mean of its query heads' channels. Scores are z-scored per
layer and kind, then ranked globally, and a width ratio removes the longest prefix of
that ranking whose parameters fit (1 - ratio) of the prunable parameters: one global
threshold, and the masks of a smaller ratio contain those of a larger one. A group counts
its q, k, v and o parameters, a channel its rows and column in the MLP. The best group
and channel of every layer are never removed.

What is removed is compensated: its mean input times its weight columns becomes a bias
of the output projection, so the layer's mean output over the calibration data is kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from edgec.architectures import Architecture
from edgec.errors import UnsupportedError
from edgec.lm import CausalLMEntries


@dataclass
class WidthStats:
    """Per layer: z-scores of KV groups and MLP channels, and the mean inputs of o_proj and
    the MLP's output projection (their compensation)."""

    group_z: list[torch.Tensor]
    channel_z: list[torch.Tensor]
    o_mean: list[torch.Tensor]
    mlp_mean: list[torch.Tensor]

    def save(self, path: Path) -> None:
        """Written beside `path` and renamed over it: whole or not at all."""
        tensors = {}
        for name in ("group_z", "channel_z", "o_mean", "mlp_mean"):
            for layer, tensor in enumerate(getattr(self, name)):
                tensors[f"{name}.{layer}"] = tensor.contiguous()
        partial = path.with_name(f".{path.name}.partial")
        save_file(tensors, str(partial))
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path, num_layers: int) -> WidthStats:
        tensors = load_file(str(path))
        return cls(*([tensors[f"{name}.{layer}"] for layer in range(num_layers)]
                     for name in ("group_z", "channel_z", "o_mean", "mlp_mean")))


@dataclass(frozen=True)
class LayerWidth:
    """What one layer keeps: KV groups and MLP channels (sorted indices)."""

    groups: tuple[int, ...]
    channels: tuple[int, ...]


def width_prunable(arch: Architecture) -> bool:
    return arch.layout.qkv is None and arch.layout.mlp_in is not None


def check_width_layout(arch: Architecture) -> None:
    if not width_prunable(arch):
        raise UnsupportedError(f"{arch.name}: width subnets slice separate q/k/v and MLP projections, which this "
                               "architecture fuses; use depth only (--subnet depth=N)")


@dataclass
class LayerModules:
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    mlp_in: list[nn.Linear]
    mlp_out: nn.Linear


def layer_modules(layer: nn.Module, arch: Architecture) -> LayerModules:
    """The projections width pruning slices (check_width_layout first)."""
    layout = arch.layout
    attn = getattr(layer, layout.attention)
    mlp = getattr(layer, layout.mlp)
    assert layout.mlp_in is not None
    return LayerModules(getattr(attn, layout.q), getattr(attn, layout.k), getattr(attn, layout.v), getattr(attn, layout.o),
                        [getattr(mlp, name) for name in layout.mlp_in], getattr(mlp, layout.mlp_out))


def _zscore(scores: torch.Tensor) -> torch.Tensor:
    spread = scores.std() if scores.numel() > 1 else torch.tensor(0.0, dtype=scores.dtype)
    centred = scores - scores.mean()
    return centred / spread if spread > 0 else centred


def measure_width(entries: CausalLMEntries, batches: list[torch.Tensor]) -> WidthStats:
    """Importance and mean inputs from the full model on calibration batches."""
    arch = entries.arch
    check_width_layout(arch)
    sums: dict[tuple[str, int], list[torch.Tensor]] = {}
    handles = []

    def recorder(kind: str, layer: int):  # type: ignore[no-untyped-def]
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
            acc = sums.setdefault((kind, layer), [torch.zeros(x.shape[1], dtype=torch.float64)] * 2 + [torch.zeros(())])
            sums[(kind, layer)] = [acc[0] + x.sum(0), acc[1] + (x * x).sum(0), acc[2] + x.shape[0]]

        return record

    for index, layer in enumerate(entries.layers):
        modules = layer_modules(layer, arch)
        handles.append(modules.o.register_forward_pre_hook(recorder("o", index)))
        handles.append(modules.mlp_out.register_forward_pre_hook(recorder("mlp", index)))
    try:
        with torch.no_grad():
            for batch in batches:
                entries.logits_through(batch, list(range(arch.num_layers)))
    finally:
        for handle in handles:
            handle.remove()
    stats = WidthStats([], [], [], [])
    for index, layer in enumerate(entries.layers):
        modules = layer_modules(layer, arch)
        scores = {}
        for kind, linear in (("o", modules.o), ("mlp", modules.mlp_out)):
            total, squares, count = sums[(kind, index)]
            mean = total / count
            variance = (squares / count - mean * mean).clamp_min(0)
            scores[kind] = variance * linear.weight.detach().double().pow(2).sum(0)
            (stats.o_mean if kind == "o" else stats.mlp_mean).append(mean.float())
        per_group = arch.head_dim * arch.layer_heads[index] // arch.layer_kv_heads[index]
        stats.group_z.append(_zscore(scores["o"].reshape(arch.layer_kv_heads[index], per_group).mean(1)).float())
        stats.channel_z.append(_zscore(scores["mlp"]).float())
    return stats


def group_parameters(arch: Architecture, hidden: int, layer: int) -> int:
    """q, o (the group's query heads) and k, v (its KV head) weights."""
    per_group = arch.layer_heads[layer] // arch.layer_kv_heads[layer]
    return hidden * arch.head_dim * (2 * per_group + 2)


def channel_parameters(arch: Architecture, hidden: int) -> int:
    assert arch.layout.mlp_in is not None
    return hidden * (len(arch.layout.mlp_in) + 1)


def width_masks(stats: WidthStats, arch: Architecture, hidden: int, layers: list[int], ratio: float) -> dict[int, LayerWidth]:
    """What each of `layers` keeps at `ratio` of their attention and MLP parameters."""
    units: list[tuple[float, int, int, int, int]] = []  # (z, layer, kind 0 group / 1 channel, index, parameters)
    total = 0
    for layer in layers:
        for kind, scores, size in ((0, stats.group_z[layer], group_parameters(arch, hidden, layer)),
                                   (1, stats.channel_z[layer], channel_parameters(arch, hidden))):
            total += size * scores.numel()
            best = int(torch.argmax(scores))
            units += [(float(z), layer, kind, i, size) for i, z in enumerate(scores.tolist()) if i != best]
    budget = (1 - ratio) * total
    removed: set[tuple[int, int, int]] = set()
    spent = 0
    for z, layer, kind, index, size in sorted(units):
        if spent + size > budget:
            break
        spent += size
        removed.add((layer, kind, index))
    return {
        layer: LayerWidth(
            tuple(i for i in range(stats.group_z[layer].numel()) if (layer, 0, i) not in removed),
            tuple(i for i in range(stats.channel_z[layer].numel()) if (layer, 1, i) not in removed),
        )
        for layer in layers
    }


def kept_channels(width: LayerWidth, arch: Architecture, layer: int) -> torch.Tensor:
    """o_proj input channels (query heads x head_dim) of the kept groups."""
    per_group = arch.head_dim * arch.layer_heads[layer] // arch.layer_kv_heads[layer]
    return torch.cat([torch.arange(g * per_group, (g + 1) * per_group) for g in width.groups])


def compensation(weight: torch.Tensor, mean: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The removed inputs' mean contribution, W[:, removed] @ mean[removed]."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool)
    removed[kept] = False
    return weight.detach()[:, removed].double() @ mean[removed].double()


@contextmanager
def masked(entries: CausalLMEntries, stats: WidthStats, widths: dict[int, LayerWidth]) -> Iterator[None]:
    """The full model computing a width subnet: removed inputs of the output projections
    replaced by their calibration means (what the extracted subnet's bias stands for)."""
    arch = entries.arch
    handles = []

    def replacer(keep: torch.Tensor, mean: torch.Tensor):  # type: ignore[no-untyped-def]
        def replace(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x = inputs[0]
            return (torch.where(keep, x, mean.to(x.dtype)), *inputs[1:])

        return replace

    try:
        for layer, width in widths.items():
            modules = layer_modules(entries.layers[layer], arch)
            for linear, kept, mean in ((modules.o, kept_channels(width, arch, layer), stats.o_mean[layer]),
                                       (modules.mlp_out, torch.tensor(width.channels, dtype=torch.int64), stats.mlp_mean[layer])):
                keep = torch.zeros(mean.numel(), dtype=torch.bool)
                keep[kept] = True
                handles.append(linear.register_forward_pre_hook(replacer(keep, mean)))
        yield
    finally:
        for handle in handles:
            handle.remove()
