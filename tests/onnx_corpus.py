"""A corpus of .onnx graphs shaped like the ones users bring from elsewhere, exported here
with torch (offline, in about a second): the constructs that broke real OCR and BERT graphs.

    resnet-bn-opset11     CNN, BatchNormalization nodes with `momentum`, residual adds, global pool
    fpn-resize-opset11    detector-style FPN: strided convs, nearest and bilinear Resize, lateral adds
    reshape-shape-opset13 Reshape to a shape computed from Shape/Gather/Concat at run time
    text-mask-opset17     embedding + masked attention + masked mean pool, [batch, seq] ids and mask
    gru-opset13           GRU over a [batch, time, features] sequence
    cnn-dynamo-opset18    the CNN through torch's own (dynamo) exporter

Weights are random (seeded): parity compares runtimes, not accuracy.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 100


class ResNetBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8, momentum=0.1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=0.1), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=0.1))
        self.head = nn.Linear(8, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.stem(image)
        x = F.relu(x + self.block(x))
        return self.head(x.mean((2, 3)))


class FPN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.lat2 = nn.Conv2d(16, 16, 1)
        self.lat1 = nn.Conv2d(8, 16, 1)
        self.out = nn.Conv2d(16, 2, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        f1 = F.relu(self.c1(image))
        f2 = F.relu(self.c2(f1))
        f3 = F.relu(self.c3(f2))
        p2 = self.lat2(f2) + F.interpolate(f3, scale_factor=2.0, mode="nearest")
        p1 = self.lat1(f1) + F.interpolate(p2, scale_factor=2.0, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.out(p1))


class ShapeReshape(nn.Module):
    """Splits features into heads with sizes read from the input at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, tokens = features.shape[0], features.shape[1]
        heads = self.proj(features).reshape(batch, tokens, 4, -1).transpose(1, 2)
        mixed = (heads @ heads.transpose(-1, -2)).softmax(-1) @ heads
        return mixed.transpose(1, 2).reshape(batch, tokens, -1)


class TextClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.query = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        scores = (self.query(h) @ h.transpose(1, 2)) / 4.0
        scores = scores.masked_fill(attention_mask[:, None, :] == 0, -1e9).softmax(-1)
        h = scores @ h
        mask = attention_mask[..., None].float()
        return self.head((h * mask).sum(1) / mask.sum(1))


class GRUTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(8, 12, batch_first=True)
        self.head = nn.Linear(12, 4)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(sequence)
        return self.head(out)


def _randomise_batchnorm(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)


def build(root: Path) -> dict[str, Path]:
    """Every graph of the corpus under `root`; name -> path."""
    # The dynamo exporter warns once per torchvision op it cannot register: none is used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    torch.manual_seed(0)
    paths = {}

    def legacy(name: str, model: nn.Module, example: tuple, inputs: list[str], dynamic: dict, opset: int) -> None:
        path = root / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            # No constant folding: BatchNormalization stays a node, as other frameworks export it.
            torch.onnx.export(model.eval(), example, path, dynamo=False, opset_version=opset, input_names=inputs,
                              dynamic_axes=dynamic, do_constant_folding=False)
        paths[name] = path

    image_axes = {0: "batch", 2: "height", 3: "width"}
    resnet = ResNetBN()
    _randomise_batchnorm(resnet)
    legacy("resnet-bn-opset11", resnet, (torch.randn(1, 3, 32, 32),), ["image"], {"image": image_axes}, 11)
    legacy("fpn-resize-opset11", FPN(), (torch.randn(1, 3, 64, 64),), ["image"], {"image": image_axes}, 11)
    legacy("reshape-shape-opset13", ShapeReshape(), (torch.randn(2, 5, 32),), ["features"],
           {"features": {0: "batch", 1: "tokens"}}, 13)
    legacy("text-mask-opset17", TextClassifier(), (torch.randint(0, VOCAB, (2, 7)), torch.ones(2, 7, dtype=torch.long)),
           ["input_ids", "attention_mask"], {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}, 17)
    legacy("gru-opset13", GRUTagger(), (torch.randn(2, 6, 8),), ["sequence"], {"sequence": {0: "batch", 1: "time"}}, 13)
    dynamo = root / "cnn-dynamo-opset18.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(resnet.eval(), (torch.randn(2, 3, 32, 32),), dynamo, dynamo=True, opset_version=18,
                          input_names=["image"], dynamic_shapes=({0: batch},), verbose=False)
    paths["cnn-dynamo-opset18"] = dynamo
    return paths
