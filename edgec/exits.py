"""Early exits and max-confidence voting (Edge-LLM's adaptive layer tuning and voting).

A causal LM tuned with `edgec finetune --method edge-llm` carries exit heads after every
`stride`-th decoder layer (exits at layers stride-1, 2*stride-1, ..., and always the last).
An exit reads the hidden state leaving its layer:

    logits_e = lm_head(norm_e(h_e)) + (alpha / rank) * norm_e(h_e) @ down_e^T @ up_e^T

(ours) Each exit head is the model's lm_head plus its own norm and a rank-`rank` adapter
(up starts at 0, so the head starts as lm_head, as the method asks), not a full copy of
lm_head: a copy costs hidden x vocab parameters per exit (28M for SmolLM2), more than the
tuning window itself, and in an artifact every exit shares the (packed) lm_head table.
The last exit is the model's own head.

Voting (the paper's rule): softmax at each voting exit, the element-wise max over exits,
renormalised. The graph returns its log (`logits`), so greedy decoding's argmax is the
voted token and perplexity is the voted distribution's, plus every exit's raw logits
(`exit_logits`). In log space throughout: a max of log-softmaxes, renormalised, stays
finite where probabilities would underflow.

A model directory stores the heads beside the Hugging Face files:
    exits.json         {"schema_version", "layers", "stride", "rank", "alpha", "tuning"}
    exits.safetensors  exit.<layer>.norm.*, exit.<layer>.down [rank, hidden], exit.<layer>.up [vocab, rank]
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgec.errors import BadInputError

EXITS_CONFIG = "exits.json"
EXITS_WEIGHTS = "exits.safetensors"
SCHEMA_VERSION = 1
# Where a model carries its exit heads (an attribute of the Hugging Face module).
ATTRIBUTE = "edgec_exits"


def exit_layers(num_layers: int, stride: int) -> list[int]:
    """Exits after every `stride` layers and always after the last one."""
    if not 1 <= stride <= num_layers:
        raise BadInputError(f"stride {stride}: exits go every 1 to {num_layers} layers of this {num_layers}-layer model")
    layers = list(range(stride - 1, num_layers, stride))
    return layers if layers[-1] == num_layers - 1 else [*layers, num_layers - 1]


def describe_exits(num_layers: int, stride: int) -> str:
    """What a stride does on this model, in one line (a stride that does not divide the
    layers leaves a shorter last window)."""
    layers = exit_layers(num_layers, stride)
    windows = [b - a for a, b in zip([-1, *layers], layers)]
    note = "" if len(set(windows)) == 1 else f"; the last window has {windows[-1]} layers (stride {stride} does not divide {num_layers})"
    return f"exits after layers {', '.join(map(str, layers))} (windows of {', '.join(map(str, windows))} layers){note}"


class ExitHead(nn.Module):
    """One early exit: its own norm and a low-rank adapter on the shared lm_head."""

    def __init__(self, norm: nn.Module, hidden: int, vocab: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.norm = copy.deepcopy(norm)
        self.down = nn.Parameter(torch.randn(rank, hidden) / hidden**0.5)
        self.up = nn.Parameter(torch.zeros(vocab, rank))
        self.scale = alpha / rank

    def adapter(self, normed: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(normed, self.down.t()), self.up.t()) * self.scale


@dataclass
class ExitConfig:
    layers: list[int]
    stride: int
    rank: int
    alpha: float
    tuning: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "layers": self.layers, "stride": self.stride, "rank": self.rank,
                "alpha": self.alpha, "tuning": self.tuning}


class ExitHeads(nn.Module):
    """The exits of one model: heads for every exit but the last, and which exits vote."""

    def __init__(self, config: ExitConfig, norm: nn.Module, hidden: int, vocab: int) -> None:
        super().__init__()
        self.config = config
        self.heads = nn.ModuleDict(
            {str(layer): ExitHead(norm, hidden, vocab, config.rank, config.alpha) for layer in config.layers[:-1]}
        )
        self.voting: list[int] = list(config.layers)

    @property
    def layers(self) -> list[int]:
        return list(self.config.layers)

    def select(self, voting: list[int]) -> None:
        """Vote with these exits only (their order does not matter)."""
        unknown = [layer for layer in voting if layer not in self.config.layers]
        if unknown or not voting:
            raise BadInputError(f"voting.exits {voting}: this model's exits are after layers {self.config.layers}")
        self.voting = sorted(set(voting))


def vote(exit_logits: torch.Tensor) -> torch.Tensor:
    """Max-confidence voting over axis 0 ([E, ..., V] -> [..., V]): the log of the
    renormalised element-wise max of the exits' softmaxes."""
    log_probs = torch.log_softmax(exit_logits, dim=-1)
    # Pairwise maxima over the few exits: element-wise maximum lowers everywhere (amax does not in TVM's importer).
    best = log_probs[0]
    for index in range(1, exit_logits.shape[0]):
        best = torch.maximum(best, log_probs[index])
    # best <= 0 and its exponentials sum to between 1 and E: no max shift is needed.
    return best - torch.log(torch.exp(best).sum(dim=-1, keepdim=True))


def exits_of(model: nn.Module) -> ExitHeads | None:
    found = getattr(model, ATTRIBUTE, None)
    return found if isinstance(found, ExitHeads) else None


def attach(model: nn.Module, config: ExitConfig) -> ExitHeads:
    """New exit heads on `model` (heads start as its lm_head)."""
    from edgec.architectures import architecture_of

    layout = architecture_of(model).layout
    heads = ExitHeads(config, model.get_submodule(layout.final_norm), int(model.config.hidden_size), int(model.config.vocab_size))
    setattr(model, ATTRIBUTE, heads)
    return heads


def detach(model: nn.Module) -> ExitHeads | None:
    """Take the heads off (Hugging Face's save_pretrained must not see them)."""
    heads = exits_of(model)
    if heads is not None:
        delattr(model, ATTRIBUTE)
    return heads


def has_exits(path: Path) -> bool:
    return (path / EXITS_CONFIG).is_file()


def save_exits(heads: ExitHeads, out: Path) -> None:
    from safetensors.torch import save_file

    (out / EXITS_CONFIG).write_text(json.dumps(heads.config.to_json(), indent=1) + "\n")
    save_file({f"exit.{name}": t.detach().contiguous() for name, t in heads.heads.state_dict().items()}, str(out / EXITS_WEIGHTS))


def read_exit_config(path: Path, num_layers: int) -> ExitConfig:
    source = path / EXITS_CONFIG
    try:
        data = json.loads(source.read_text())
        config = ExitConfig(layers=[int(x) for x in data["layers"]], stride=int(data["stride"]), rank=int(data["rank"]),
                            alpha=float(data["alpha"]), tuning=dict(data.get("tuning", {})))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"{source}: not a readable exits file ({exc}); re-run `edgec finetune --method edge-llm`") from None
    if data.get("schema_version") != SCHEMA_VERSION:
        raise BadInputError(f"{source}: schema_version {data.get('schema_version')} is not {SCHEMA_VERSION}; re-run the fine-tuning")
    if not config.layers or config.layers != sorted(set(config.layers)) or config.layers[-1] != num_layers - 1 or config.layers[0] < 0:
        raise BadInputError(f"{source}: exits {config.layers} must rise and end at the last layer ({num_layers - 1})")
    return config


def load_exits(model: nn.Module, path: Path) -> ExitHeads:
    """The exit heads stored in model directory `path`, attached to `model` (safetensors only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from edgec.model import check_safetensors

    heads = attach(model, read_exit_config(path, int(model.config.num_hidden_layers)))
    weights = path / EXITS_WEIGHTS
    if not weights.is_file():
        raise BadInputError(f"{path}: {EXITS_CONFIG} without {EXITS_WEIGHTS}; re-run `edgec finetune --method edge-llm`")
    check_safetensors(weights)
    try:
        tensors = {k.removeprefix("exit."): v for k, v in load_file(str(weights)).items()}
        heads.heads.load_state_dict(tensors, strict=True)
    except (SafetensorError, RuntimeError) as exc:
        raise BadInputError(f"{weights}: the exit heads do not fit this model ({str(exc).splitlines()[0]})") from None
    return heads
