"""Every shape of a search in one artifact (`compile --subnet all`), sharing one copy of
the weights.

Width masks nest: within a layer, units leave in ascending order of importance whatever
the shape (edgec.subnet.width). So each layer's KV groups and MLP channels are permuted
once, most important first, and then every shape keeps a prefix of them: its linears
are slices `W[:rows]` / `W[:, :cols]` of the same tensors, and only its compensation
biases (one vector per output projection) are its own. Each shape is a view of the
permuted model (its modules copied, its parameters shared) that the entries follow like
any model; the backends store equal tensors once.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from edgec.architectures import architecture_of
from edgec.subnet import Shape
from edgec.subnet.search import SubnetSearch
from edgec.subnet.width import LayerWidth, WidthStats, compensation, layer_modules


class SlicedLinear(nn.Module):
    """The first `rows` outputs or the first `cols` inputs of a shared linear, plus a bias
    of its own (the compensation of the inputs it leaves out)."""

    def __init__(self, base: nn.Linear, rows: int | None, cols: int | None, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = base.weight  # shared, not copied
        self.rows, self.cols = rows, cols
        self.base_bias = base.bias
        if bias is not None:
            self.register_buffer("own_bias", bias.to(base.weight.dtype).contiguous())
        else:
            self.own_bias = None
        self.in_features = base.in_features if cols is None else cols
        self.out_features = base.out_features if rows is None else rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight[: self.rows] if self.rows is not None else self.weight[:, : self.cols]
        bias = self.base_bias
        if bias is not None and self.rows is not None:
            bias = bias[: self.rows]
        if self.own_bias is not None:
            bias = self.own_bias if bias is None else bias + self.own_bias
        return F.linear(x, weight, bias)


def unit_order(scores: torch.Tensor) -> list[int]:
    """Most important first, in the order width_masks removes them backwards: the layer's
    best unit (never removed), then descending (score, index)."""
    best = int(torch.argmax(scores))
    rest = sorted((i for i in range(scores.numel()) if i != best), key=lambda i: (float(scores[i]), i), reverse=True)
    return [best, *rest]


def _permute(linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    with torch.no_grad():
        if rows is not None:
            linear.weight.data = linear.weight.data[rows].contiguous()
            if linear.bias is not None:
                linear.bias.data = linear.bias.data[rows].contiguous()
        if cols is not None:
            linear.weight.data = linear.weight.data[:, cols].contiguous()


def permuted(model: nn.Module, stats: WidthStats) -> tuple[nn.Module, WidthStats]:
    """A copy of `model` whose units are in importance order, and the statistics in the
    same order (the copy computes what the model computes)."""
    arch = architecture_of(model)
    model = copy.deepcopy(model)
    blocks = model.get_submodule(arch.layout.layers)
    reordered = WidthStats([], [], [], [])
    dim = arch.head_dim
    for index, layer in enumerate(blocks):
        groups = unit_order(stats.group_z[index])
        channels = torch.tensor(unit_order(stats.channel_z[index]))
        per_group = dim * arch.layer_heads[index] // arch.layer_kv_heads[index]
        q_rows = torch.cat([torch.arange(g * per_group, (g + 1) * per_group) for g in groups])
        kv_rows = torch.cat([torch.arange(g * dim, (g + 1) * dim) for g in groups])
        modules = layer_modules(layer, arch)
        _permute(modules.q, q_rows, None)
        _permute(modules.k, kv_rows, None)
        _permute(modules.v, kv_rows, None)
        _permute(modules.o, None, q_rows)
        for linear in modules.mlp_in:
            _permute(linear, channels, None)
        _permute(modules.mlp_out, None, channels)
        reordered.group_z.append(stats.group_z[index][torch.tensor(groups)])
        reordered.channel_z.append(stats.channel_z[index][channels])
        reordered.o_mean.append(stats.o_mean[index][q_rows])
        reordered.mlp_mean.append(stats.mlp_mean[index][channels])
    return model, reordered


def _prefix_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Module:
    return SlicedLinear(linear, len(rows), None, None)


def _prefix_columns(linear: nn.Linear, columns: torch.Tensor, mean: torch.Tensor) -> nn.Module:
    return SlicedLinear(linear, None, len(columns), compensation(linear.weight, mean, columns))


def shape_view(nested: nn.Module, stats: WidthStats | None, search: SubnetSearch, shape: Shape) -> nn.Module:
    """The subnet `shape` of the permuted model: its layers, its linears views of prefixes of
    the shared weights; parameters are the nested model's own tensors."""
    from edgec.subnet.extract import make_subnet

    arch = architecture_of(nested)
    view = copy.deepcopy(nested, memo={id(p): p for p in nested.parameters()})
    widths = search.widths_of(arch, int(nested.config.hidden_size), shape)
    # Permuted, every shape keeps the first units of each layer: as many as it keeps at all.
    prefixes = None if widths is None else {
        layer: LayerWidth(tuple(range(len(w.groups))), tuple(range(len(w.channels)))) for layer, w in widths.items()
    }
    make_subnet(view, search.layers(shape.depth), prefixes, stats, _prefix_rows, _prefix_columns)
    return view


def shape_tag(shape: Shape) -> str:
    """An entry-name suffix: depth=20,width=0.75 -> d20_w75."""
    return f"d{shape.depth}_w{round(shape.width * 100)}"
