"""A shape made physical: what `edgec compile --subnet` does before any pass.

Blocks outside the depth mask are dropped; in the kept blocks the removed KV groups'
rows of q/k/v and columns of o_proj, and the removed channels' rows of the MLP's input
projections and columns of its output projection, are sliced away, and their mean
contribution becomes the output projections' bias (edgec.subnet.width). The config then
says what is left (layers, and heads per layer: edgec.architectures.LAYER_HEADS), so
the entries (edgec.lm) follow it like any model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgec.architectures import LAYER_HEADS, LAYER_KV_HEADS, Architecture, architecture_of
from edgec.errors import BadInputError
from edgec.model import ModelHandle
from edgec.subnet import Shape
from edgec.subnet.search import SubnetSearch, require_search, shape_parameters
from edgec.subnet.width import LayerWidth, WidthStats, compensation, kept_channels, layer_modules


def keep_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    sliced = nn.Linear(linear.in_features, len(rows), bias=linear.bias is not None, dtype=linear.weight.dtype)
    sliced.weight.data = linear.weight.detach()[rows].clone()
    if linear.bias is not None:
        sliced.bias.data = linear.bias.detach()[rows].clone()
    return sliced


def keep_columns(linear: nn.Linear, columns: torch.Tensor, mean: torch.Tensor) -> nn.Linear:
    """The kept input columns, with the removed ones' mean contribution as a bias."""
    sliced = nn.Linear(len(columns), linear.out_features, bias=True, dtype=linear.weight.dtype)
    sliced.weight.data = linear.weight.detach()[:, columns].clone()
    bias = compensation(linear.weight, mean, columns)
    if linear.bias is not None:
        bias = bias + linear.bias.detach().double()
    sliced.bias.data = bias.to(linear.weight.dtype)
    return sliced


# How a kept set of rows / of input columns (with its removed inputs' calibration means)
# becomes a module: copies here; views of shared weights in edgec.subnet.nested.
RowsFn = Callable[[nn.Linear, torch.Tensor], nn.Module]
ColumnsFn = Callable[[nn.Linear, torch.Tensor, torch.Tensor], nn.Module]


def slice_layer(layer: nn.Module, arch: Architecture, index: int, width: LayerWidth, stats: WidthStats,
                rows: RowsFn = keep_rows, columns: ColumnsFn = keep_columns) -> tuple[int, int]:
    """Slice one block in place; returns its (query heads, KV heads)."""
    modules = layer_modules(layer, arch)
    attn = getattr(layer, arch.layout.attention)
    mlp = getattr(layer, arch.layout.mlp)
    dim = arch.head_dim
    kv_rows = torch.cat([torch.arange(g * dim, (g + 1) * dim) for g in width.groups])
    q_rows = kept_channels(width, arch, index)
    channels = torch.tensor(width.channels, dtype=torch.int64)
    setattr(attn, arch.layout.q, rows(modules.q, q_rows))
    setattr(attn, arch.layout.k, rows(modules.k, kv_rows))
    setattr(attn, arch.layout.v, rows(modules.v, kv_rows))
    setattr(attn, arch.layout.o, columns(modules.o, q_rows, stats.o_mean[index]))
    assert arch.layout.mlp_in is not None
    for name, linear in zip(arch.layout.mlp_in, modules.mlp_in):
        setattr(mlp, name, rows(linear, channels))
    setattr(mlp, arch.layout.mlp_out, columns(modules.mlp_out, channels, stats.mlp_mean[index]))
    per_group = arch.layer_heads[index] // arch.layer_kv_heads[index]
    return len(width.groups) * per_group, len(width.groups)


def make_subnet(model: nn.Module, layers: list[int], widths: dict[int, LayerWidth] | None, stats: WidthStats | None,
                rows: RowsFn = keep_rows, columns: ColumnsFn = keep_columns) -> tuple[list[int], list[int]]:
    """Keep `layers`, sliced to `widths` (compensated by `stats`' means), in place; returns
    the query and KV heads per kept layer."""
    arch = architecture_of(model)
    config = model.config
    blocks = model.get_submodule(arch.layout.layers)
    heads, kv_heads = [], []
    for index in layers:
        if widths is None:
            heads.append(arch.layer_heads[index])
            kv_heads.append(arch.layer_kv_heads[index])
        else:
            assert stats is not None
            q, kv = slice_layer(blocks[index], arch, index, widths[index], stats, rows, columns)
            heads.append(q)
            kv_heads.append(kv)
    parent, _, name = arch.layout.layers.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, nn.ModuleList([blocks[i] for i in layers]))
    for position, index in enumerate(layers):
        attn = getattr(blocks[index], arch.layout.attention)
        if hasattr(attn, "layer_idx"):  # the HF forward (passes calibrate through it) indexes its cache by it
            attn.layer_idx = position
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in layers]
    if widths is not None:
        setattr(config, LAYER_HEADS, heads)
        setattr(config, LAYER_KV_HEADS, kv_heads)
    return heads, kv_heads


def extract(model: nn.Module, search: SubnetSearch, shape: Shape) -> dict[str, Any]:
    """Make `model` the subnet `shape` of its search in place; returns what the manifest records."""
    arch = architecture_of(model)
    layers = search.layers(shape.depth)
    widths = search.widths_of(arch, int(model.config.hidden_size), shape)
    parameters = shape_parameters(model, arch, layers, widths)
    heads, kv_heads = make_subnet(model, layers, widths, search.stats)
    row = next((r for r in search.record["table"] if r["depth"] == len(layers) and abs(r["width"] - shape.width) < 1e-9), None)
    return {
        "shape": {"depth": len(layers), "width": shape.width},
        "layers": layers,
        "heads": heads,
        "kv_heads": kv_heads,
        "mlp_channels": None if widths is None else [len(widths[i].channels) for i in layers],
        "parameters": parameters,
        "calibration_score": None if row is None else row["score"],
        "search": {"model_sha256": search.record["model_sha256"], "options": search.record["options"]},
    }


def apply_subnet(model: ModelHandle, shape: Shape, what: str) -> None:
    """compile's `--subnet`: the model's cached search, the shape checked against its
    table, then extracted; the handle's hash and info follow the subnet."""
    assert model.module is not None
    if model.info.get("exits") or model.info.get("applied_passes"):
        raise BadInputError(f"{what}: {model.name} is a tuned model (exits or compressed passes); "
                            "extract subnets from the base model")
    search = require_search(model, what)
    search.check(shape, what)
    record = extract(model.module, search, shape)
    source = model.sha256
    model.sha256 = hashlib.sha256(f"{source}:{record['layers']}:{record['heads']}:{record['mlp_channels']}".encode()).hexdigest()
    model.info.update(subnet={**record, "source_sha256": source}, parameters=record["parameters"],
                      layers=len(record["layers"]))


@dataclass
class ShapeEntries:
    """One shape of a `--subnet all` compile: its view of the shared weights and entry names."""

    label: str
    shape: Shape
    module: nn.Module
    prefill: str
    decode: str
    record: dict[str, Any]


def prepare_all_shapes(model: ModelHandle, recipe: Any, progress: Any) -> None:
    """compile's `--subnet all`: the model permuted once so every shape of its search keeps
    prefixes of the same tensors (edgec.subnet.nested), a view per shape in
    model.prepared["shapes"] (the largest first: the default), the permuted model as the model."""
    from edgec.subnet.nested import permuted, shape_tag, shape_view

    assert model.module is not None
    what = "--subnet all"
    if model.info.get("exits") or model.info.get("applied_passes") or model.info.get("amoeba"):
        raise BadInputError(f"{what}: {model.name} is a tuned model (each shape would merge its own weights); "
                            "compile its shapes one at a time with --subnet depth=D,width=W")
    if recipe.passes or recipe.dtype != "float32":
        raise BadInputError(f"{what}: shapes share float32 weights; compress or cast one shape at a time "
                            "(--subnet depth=D,width=W with the recipe)")
    search = require_search(model, what)
    shapes = search.shapes()
    progress(f"subnet all: {len(shapes)} shapes over one copy of the weights")
    nested, stats = (model.module, None) if search.stats is None else permuted(model.module, search.stats)
    prepared = []
    for number, (shape, row) in enumerate(shapes):
        view = shape_view(nested, stats, search, shape)
        suffix = "" if number == 0 else f"_{shape_tag(shape)}"
        arch = architecture_of(view)
        prepared.append(ShapeEntries(shape.label(), shape, view, f"prefill{suffix}", f"decode{suffix}", {
            "layers": search.layers(shape.depth), "kv_heads": list(arch.layer_kv_heads), "parameters": int(row["parameters"]),
            "calibration_score": row["score"]}))
    model.module = nested
    model.prepared["shapes"] = prepared
    source = model.sha256
    model.sha256 = hashlib.sha256(f"{source}:all:{[s.label for s in prepared]}".encode()).hexdigest()
    model.info.update(subnet={"all": True, "shapes": [s.label for s in prepared], "source_sha256": source,
                              "search": {"model_sha256": search.record["model_sha256"], "options": search.record["options"]}})
