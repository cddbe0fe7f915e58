"""AmoebaLLM's one-time fine-tuning: a shape-aware mixture of LoRAs with in-place distillation.

Every projection of every layer gets `experts` LoRA experts (A_i [rank, in], B_i [out, rank],
B zero at the start). One global router reads the shape code, [layer mask || one-hot
width], and gates the experts top-k (softmax over the k largest logits, zero elsewhere):

    y = W x + (alpha / rank) * (sum_i g_i B_i) (sum_i g_i A_i) x

so a shape's update is one rank-`rank` matrix that merges into W before extraction
(`merge_for_shape`). Each step (in-place distillation): the full model's next-token loss
(its logits are the teacher), then two random shapes of the search's table and the
smallest, each with KL(teacher || shape); each shape's loss is scaled to the full loss's
magnitude (loss_i * loss_full / loss_i, the factor detached). Shapes run as the search
scores them: the full model with layers skipped and removed channels replaced by their
calibration means (edgec.subnet.width.masked), which is what extraction computes.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from edgec.errors import BadInputError
from edgec.finetune.lora import linear_names
from edgec.lm import CausalLMEntries
from edgec.packing import set_submodule
from edgec.subnet import Shape
from edgec.subnet.search import SubnetSearch
from edgec.subnet.width import masked

AMOEBA_CONFIG = "amoeba.json"
AMOEBA_WEIGHTS = "amoeba.safetensors"


class AmoebaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    experts: int = Field(5, ge=1, description="LoRA experts per projection")
    top_k: int = Field(2, ge=1, description="experts the router mixes per shape")
    rank: int = Field(16, ge=1, description="LoRA rank of each expert")
    alpha: float = Field(32.0, gt=0, description="LoRA scale numerator (scale = alpha / rank)")
    shapes_per_step: int = Field(2, ge=0, description="random shapes distilled per step (the smallest shape always is)")


class MixtureLinear(nn.Module):
    """A frozen linear plus gated LoRA experts; `gates` [experts] is set per shape."""

    def __init__(self, base: nn.Linear, experts: int, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.experts_a = nn.Parameter(torch.randn(experts, rank, self.in_features, generator=generator) / math.sqrt(self.in_features))
        self.experts_b = nn.Parameter(torch.zeros(experts, self.out_features, rank))
        self.scale = alpha / rank
        self.gates: torch.Tensor = torch.full((experts,), 1.0 / experts)

    def mixed(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.einsum("e,eri->ri", self.gates, self.experts_a), torch.einsum("e,eor->or", self.gates, self.experts_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.mixed()
        return self.base(x) + torch.matmul(torch.matmul(x, a.t()), b.t()) * self.scale

    def delta(self) -> torch.Tensor:
        """The gated update [out, in] for the current gates."""
        a, b = self.mixed()
        return (b @ a).detach() * self.scale


class ShapeRouter(nn.Module):
    """Shape code [layer mask (L) || one-hot width (W)] -> top-k gates over the experts."""

    def __init__(self, num_layers: int, widths: list[float], experts: int, top_k: int, generator: torch.Generator) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.widths = list(widths)
        self.top_k = min(top_k, experts)
        self.proj = nn.Linear(num_layers + len(widths), experts)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=generator) * 0.5)
            self.proj.bias.zero_()

    def code(self, layers: list[int], width: float) -> torch.Tensor:
        mask = torch.zeros(self.num_layers)
        mask[layers] = 1.0
        onehot = torch.zeros(len(self.widths))
        onehot[min(range(len(self.widths)), key=lambda i: abs(self.widths[i] - width))] = 1.0
        return torch.cat([mask, onehot])

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        logits = self.proj(code)
        top = torch.topk(logits, self.top_k)
        return torch.zeros_like(logits).scatter(0, top.indices, torch.softmax(top.values, dim=0))


class Amoeba:
    """A model with mixtures on its projections and the router (attached to the model as
    `edgec_amoeba`, so it travels with it) over the shapes of a search."""

    def __init__(self, model: nn.Module, search: SubnetSearch, options: AmoebaOptions, seed: int) -> None:
        self.model = model
        self.search = search
        self.options = options
        generator = torch.Generator().manual_seed(seed)
        self.entries = CausalLMEntries(model)
        self.mixtures: dict[str, MixtureLinear] = {}
        prefix = self.entries.arch.layout.layers
        for index, layer in enumerate(self.entries.layers):
            for name in linear_names(layer):
                wrapped = MixtureLinear(layer.get_submodule(name), options.experts, options.rank, options.alpha, generator)
                set_submodule(layer, name, wrapped)
                self.mixtures[f"{prefix}.{index}.{name}"] = wrapped
        self.router = ShapeRouter(self.entries.arch.num_layers, search.widths, options.experts, options.top_k, generator)
        model.edgec_amoeba = self.router
        model.requires_grad_(False)

    def shape_layers(self, shape: Shape) -> list[int]:
        return self.search.layers(shape.depth)

    def set_shape(self, shape: Shape) -> torch.Tensor:
        gates = self.router(self.router.code(self.shape_layers(shape), shape.width))
        for mixture in self.mixtures.values():
            mixture.gates = gates
        return gates

    def logits(self, shape: Shape, batch: torch.Tensor) -> torch.Tensor:
        """The shape's logits as the search scores it (the masked full model)."""
        self.set_shape(shape)
        layers = self.shape_layers(shape)
        widths = self.search.widths_of(self.entries.arch, int(self.model.config.hidden_size), shape)
        if widths is None:
            return self.entries.logits_through(batch, layers)
        assert self.search.stats is not None
        with masked(self.entries, self.search.stats, widths):
            return self.entries.logits_through(batch, layers)

    def trainable(self) -> dict[str, nn.Parameter]:
        found = {f"{name}.{part}": getattr(m, part) for name, m in self.mixtures.items() for part in ("experts_a", "experts_b")}
        found.update({f"router.{name}": p for name, p in self.router.named_parameters()})
        return found

    def set_trainable(self) -> list[nn.Parameter]:
        self.model.requires_grad_(False)
        chosen = self.trainable()
        for parameter in chosen.values():
            parameter.requires_grad_(True)
        return list(chosen.values())

    def load_trained(self, tensors: dict[str, torch.Tensor]) -> None:
        current = self.trainable()
        if set(tensors) != set(current):
            raise BadInputError("the tensors do not match this model's mixture of LoRAs; delete the checkpoint or fix the settings")
        with torch.no_grad():
            for name, tensor in tensors.items():
                current[name].copy_(tensor)

    def every_trained(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.trainable().items()}

    def config(self) -> dict[str, Any]:
        return {**self.options.model_dump(), "widths": self.router.widths, "num_layers": self.router.num_layers,
                "modules": sorted(self.mixtures)}


def distillation_step(amoeba: Amoeba, batch: torch.Tensor, rng: random.Random) -> dict[str, float]:
    """One step's losses; each loss's backward runs here (gradients add up), the caller
    steps the optimizer."""
    shapes = amoeba.search.shapes()
    full, smallest = shapes[0][0], shapes[-1][0]
    middle = [shape for shape, _ in shapes[1:-1]]
    logits = amoeba.logits(full, batch)
    loss_full = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
    teacher = F.log_softmax(logits.detach()[:, :-1].float(), dim=-1).flatten(0, 1)
    loss_full.backward()
    losses = {"full": float(loss_full.detach())}
    chosen = rng.sample(middle, min(amoeba.options.shapes_per_step, len(middle))) + [smallest]
    for shape in chosen:
        student = F.log_softmax(amoeba.logits(shape, batch)[:, :-1].float(), dim=-1).flatten(0, 1)
        kd = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        (kd * (loss_full.detach() / kd.detach().clamp_min(1e-8))).backward()
        losses[shape.label()] = float(kd.detach())
    return losses


def merge_for_shape(model: nn.Module, shape: Shape, search: SubnetSearch) -> dict[str, Any]:
    """Replace every mixture by its base linear with the shape's gated update merged in;
    returns the gates used."""
    router = getattr(model, "edgec_amoeba", None)
    if not isinstance(router, ShapeRouter):
        raise BadInputError("this model has no mixture of LoRAs to merge")
    with torch.no_grad():
        gates = router(router.code(search.layers(shape.depth), shape.width))
        for name, module in list(model.named_modules()):
            if isinstance(module, MixtureLinear):
                module.gates = gates
                merged = nn.Linear(module.in_features, module.out_features, bias=module.base.bias is not None,
                                   dtype=module.base.weight.dtype)
                merged.weight.copy_(module.base.weight + module.delta().to(module.base.weight.dtype))
                if module.base.bias is not None:
                    merged.bias.copy_(module.base.bias)
                set_submodule(model, name, merged)
    del model.edgec_amoeba
    return {"shape": shape.label(), "gates": [round(float(g), 6) for g in gates]}


def save_amoeba(amoeba: Amoeba, out: Path, record: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    (out / AMOEBA_CONFIG).write_text(json.dumps({**amoeba.config(), "tuning": record}, indent=1) + "\n")
    save_file({name: t.contiguous() for name, t in amoeba.every_trained().items()}, str(out / AMOEBA_WEIGHTS))


def has_amoeba(path: Path) -> bool:
    return (path / AMOEBA_CONFIG).is_file()


def load_amoeba(model: nn.Module, path: Path, search: SubnetSearch) -> dict[str, Any]:
    """Put the stored mixtures and router on `model`; returns the stored config."""
    from safetensors.torch import load_file

    try:
        config = json.loads((path / AMOEBA_CONFIG).read_text())
        options = AmoebaOptions.model_validate({k: config[k] for k in AmoebaOptions.model_fields})
        tensors = load_file(str(path / AMOEBA_WEIGHTS))
    except (OSError, ValueError, KeyError) as exc:
        raise BadInputError(f"{path / AMOEBA_CONFIG}: not a readable mixture of LoRAs ({exc}); re-run `edgec finetune --method amoeba`") from None
    amoeba = Amoeba(model, search, options, seed=0)
    if sorted(amoeba.mixtures) != config["modules"] or amoeba.router.widths != config["widths"]:
        raise BadInputError(f"{path / AMOEBA_CONFIG}: its modules or widths do not match this model and its search")
    amoeba.load_trained(tensors)
    model.requires_grad_(False)
    return config
