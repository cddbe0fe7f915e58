"""`edgec finetune DIT --method diffcr`: DiffRatio-MoD (DiffCR) training of a DiT.

Every block gets a router (edgec.mod.RoutedBlock). One ratio per (layer, timestep region)
is learned, starting at "keep all": a batch draws one region, timesteps uniform inside it,
and each block runs at the two 10% bins around its ratio for that region, mixed by
distance. Loss = diffusion loss (noise MSE) + lambda x (mean ratio - target)^2, lambda 0.3.
The DiT's weights, the routers and the ratios all train (the ratios at their own rate).

The output is the model's diffusers directory with the tuned transformer, plus
diffcr.json (target, regions as timestep ranges, the learned ratios and the bins they
snap to) and diffcr.safetensors (the routers). The dit family reads them: a compile
writes one region graph per region, capacities fixed to the snapped bins.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from edgec.errors import BadInputError
from edgec.mod import RoutedBlock, add_routers, snap

DIFFCR_CONFIG = "diffcr.json"
DIFFCR_WEIGHTS = "diffcr.safetensors"


class DiffcrOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ratio: float = Field(0.8, gt=0, le=1, description="target mean share of tokens every block keeps")
    regions: int = Field(4, ge=1, le=10, description="timestep regions, each with its own ratios (4 for 20 steps)")
    lam: float = Field(0.3, ge=0, description="weight of the ratio loss (mean ratio - target)^2: the paper's 0.3; if the mean "
                       "stays above the target, raise it (3 holds 0.8 on zoo:tiny-dit)")
    ratio_lr: float = Field(0.01, gt=0, description="learning rate of the ratios and routers")
    learn_ratios: bool = Field(
        True, description="false: uniform MoD, every block and region fixed at the target ratio (only the routers and weights train)"
    )


def region_bounds(train_timesteps: int, regions: int) -> list[tuple[int, int]]:
    """[t_from, t_to) of each region, region 0 the least noisy."""
    edges = [round(train_timesteps * r / regions) for r in range(regions + 1)]
    return [(edges[r], edges[r + 1]) for r in range(regions)]


class Diffcr:
    """The routed transformer and its ratio table, trained together."""

    def __init__(self, transformer: torch.nn.Module, options: DiffcrOptions, train_timesteps: int) -> None:
        self.transformer = transformer
        self.options = options
        self.blocks: list[RoutedBlock] = add_routers(transformer)
        self.bounds = region_bounds(train_timesteps, options.regions)
        start = 1.0 if options.learn_ratios else options.ratio
        self.ratios = torch.nn.Parameter(torch.full((len(self.blocks), options.regions), start),
                                         requires_grad=options.learn_ratios)

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        routers = [p for b in self.blocks for p in b.router.parameters()]
        weights = [p for n, p in self.transformer.named_parameters() if ".router." not in n]
        ratios = [self.ratios] if self.options.learn_ratios else []
        return [{"params": weights, "lr": lr}, {"params": [*routers, *ratios], "lr": self.options.ratio_lr}]

    def loss(self, clean: torch.Tensor, labels: torch.Tensor, alphas: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
        region = int(rng.integers(0, self.options.regions))
        low, high = self.bounds[region]
        t = torch.from_numpy(rng.integers(low, high, size=clean.shape[0]))
        noise = torch.from_numpy(rng.standard_normal(clean.shape).astype(np.float32))
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * clean + (1 - a).sqrt() * noise
        for layer, block in enumerate(self.blocks):
            block.ratio = self.ratios[layer, region]
        predicted = self.transformer(noisy, t, labels, return_dict=False)[0][:, : clean.shape[1]]
        diffusion = torch.nn.functional.mse_loss(predicted, noise)
        if not self.options.learn_ratios:
            return diffusion, float(diffusion.detach())
        penalty = (self.ratios.clamp(0.1, 1.0).mean() - self.options.ratio) ** 2
        return diffusion + self.options.lam * penalty, float(diffusion.detach())

    def clamp(self) -> None:
        with torch.no_grad():
            self.ratios.clamp_(0.1, 1.0)

    def table(self) -> dict[str, Any]:
        learned = self.ratios.detach().clamp(0.1, 1.0).tolist()
        return {"target": self.options.ratio, "learn_ratios": self.options.learn_ratios, "regions": [list(b) for b in self.bounds], "learned": learned,
                "bins": [[snap(r) for r in row] for row in learned]}

    def plain_transformer(self) -> torch.nn.Module:
        """A copy without the routers: what diffusers' save_pretrained writes and loads."""
        plain = copy.deepcopy(self.transformer)
        for i, block in enumerate(plain.transformer_blocks):
            if isinstance(block, RoutedBlock):
                plain.transformer_blocks[i] = block.block
        return plain.eval()

    def router_tensors(self) -> dict[str, torch.Tensor]:
        return {f"blocks.{i}.router.weight": b.router.weight.detach().contiguous() for i, b in enumerate(self.blocks)}


def training_images(data: str) -> tuple[np.ndarray, np.ndarray]:
    """'train' (Fashion-MNIST's train split, the built-in DiT's data) or an .npz of `images`
    [N, C, H, W] in [-1, 1] and `labels` [N]."""
    from edgec import fashion

    if data == "train":
        return fashion.load("train")
    path = Path(data).expanduser()
    try:
        with np.load(path, allow_pickle=False) as loaded:
            return loaded["images"].astype(np.float32), loaded["labels"].astype(np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise BadInputError(f"finetune.data {data}: not an .npz with images [N, C, H, W] and labels [N] ({exc})") from None


def read_diffcr(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """A DiffCR-tuned model directory's table and routers (None: not tuned)."""
    if not (path / DIFFCR_CONFIG).is_file():
        return None
    from safetensors.torch import load_file

    try:
        table = json.loads((path / DIFFCR_CONFIG).read_text())
        routers = load_file(str(path / DIFFCR_WEIGHTS))
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: the DiffCR files are not readable ({exc}); tune it again") from None
    return table, routers
