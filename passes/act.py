"""act: ACT's training-free attention calibration of hidden attention sinks.

Before: a causal LM whose attention is a plain softmax on every head.
After: the chosen (layer, head) pairs compute their attention in the calibrated form
(edgec.sinks): per input, inside the graph, find the keys whose mean received attention
passes the threshold, keep the first, scale the others' columns by `beta`, and give the
removed mass back to the row's other keys in proportion. No weight changes.

The heads come from the recipe (`heads: {layer: [head, ...]}`, or `all`) or from an
offline search (`heads: search`):

1. Rank heads by the attention mass calibration would move on the calibration prompts
   (heads without a sink besides the first are untouched by ACT and are skipped) and
   keep the top `search.candidates`.
2. Calibrate one candidate at a time and score the model on the tasks' calibration
   splits (edgec.tasks: accuracy, then the label NLL to break ties). A head helps when it
   beats the uncalibrated model.
3. Greedy combination: add the helpful heads best first, keeping each only if the set
   with it still beats the set without it, so the kept heads help together.

The search is cached per (model hash, rule, tasks, split seed, sizes); the per-head
score log, the split seed and the chosen heads go into the manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from edgec.architectures import architecture_of
from edgec.cache import cached_dir
from edgec.errors import BadInputError, UnsupportedError
from edgec.lm import AttentionCalibration, CausalLMEntries, calibration_of
from edgec.model import FAMILY_CAUSAL_LM, ModelHandle
from edgec.pipeline import PassContext, PassResult
from edgec.recipe import LayerOverride
from edgec.sinks import SinkRule, sinks_to_scale
from edgec.progress import advance
from edgec.tasks import TASK_NAMES, Example, TaskScore, is_task, build_task, by_length, label_token_ids, score
from edgec.zoo import ZOO_DIR

COMMITTED_SEARCHES = ZOO_DIR / "act-searches"
DEFAULT_THRESHOLDS = {"absolute": 0.1, "alpha": 5.0}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class SearchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(["wordnet"], description=f"labelled tasks scored in the search ({', '.join(TASK_NAMES)}, or FILE.jsonl)")
    samples: int = Field(64, ge=4, description="calibration prompts per task (balanced over its labels)")
    seed: int = Field(0, description="seed of the calibration/test split")
    candidates: int = Field(32, ge=0, description="heads tried one at a time, by the mass ACT would move on them (0: all)")
    max_heads: int = Field(8, ge=1, description="at most this many heads are kept")

    @model_validator(mode="after")
    def _check(self) -> SearchOptions:
        unknown = [t for t in self.tasks if not is_task(t)]
        if unknown or not self.tasks:
            raise ValueError(f"tasks {unknown or '[]'}: edgec has {', '.join(TASK_NAMES)}, or give a FILE.jsonl")
        return self


class ActOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.4, gt=0, le=1, description="scale of the non-first sinks' attention, in (0, 1]; 1 changes nothing")
    threshold_mode: Literal["absolute", "alpha"] = Field(
        "absolute", description="absolute: score > threshold (ACT code, 0.1); alpha: score > threshold / N (paper, 5)"
    )
    threshold: float | None = Field(None, gt=0, description="tau or alpha; default 0.1 (absolute) or 5 (alpha)")
    keep_first: bool = Field(True, description="leave the first sink of each row untouched")
    stat: Literal["paper", "causal"] = Field(
        "causal",
        description="paper: a key's mean over every query, later ones too (prefill only; decode keeps plain attention); "
        "causal: over the queries up to the current one, carried in the cache, so decode equals prefill",
    )
    heads: Literal["search", "all"] | dict[int, list[int]] = Field(
        "search", description="search, all, or {layer: [head, ...]}"
    )
    search: SearchOptions = Field(default_factory=SearchOptions)

    def rule(self) -> SinkRule:
        threshold = self.threshold if self.threshold is not None else DEFAULT_THRESHOLDS[self.threshold_mode]
        return SinkRule(self.beta, self.threshold_mode, threshold, self.keep_first, self.stat)


HeadSet = dict[int, list[int]]


def check_attention(model: ModelHandle) -> tuple[int, int]:
    """(layers, heads per layer) of a model whose attention edgec can rewrite; else say which module and why."""
    assert model.module is not None
    layout = architecture_of(model.module).layout
    for index, layer in enumerate(model.module.get_submodule(layout.layers)):
        attn = getattr(layer, layout.attention, None)
        where = f"{layout.layers}.{index}.{layout.attention}"
        if layout.qkv is not None:
            raise UnsupportedError(
                f"{where} ({type(attn).__name__}) projects q, k and v with one fused {layout.qkv}: act calibrates "
                "attention probabilities per head and applies to architectures with separate q/k/v/o projections"
            )
        missing = [name for name in PROJECTIONS if not isinstance(getattr(attn, name, None), nn.Module)]
        if attn is None or missing:
            raise UnsupportedError(
                f"{where} ({type(attn).__name__}) has no separate {', '.join(missing or PROJECTIONS)}: "
                "act rewrites attention from its q/k/v/o projections and cannot see inside a fused kernel"
            )
    return architecture_of(model.module).num_layers, int(model.module.config.num_attention_heads)


def check_heads(heads: HeadSet, layers: int, num_heads: int) -> None:
    for layer, chosen in heads.items():
        if not 0 <= layer < layers:
            raise BadInputError(f"act.heads: layer {layer} is outside the model (layers 0-{layers - 1})")
        bad = [h for h in chosen if not 0 <= h < num_heads]
        if bad:
            raise BadInputError(f"act.heads: layer {layer} head {bad[0]} is outside the model (heads 0-{num_heads - 1})")


def install(model: nn.Module, heads: HeadSet, rule: SinkRule) -> None:
    """Put the calibration on each chosen layer's attention (replacing any before)."""
    num_heads = int(model.config.num_attention_heads)
    layout = architecture_of(model).layout
    for index, layer in enumerate(model.get_submodule(layout.layers)):
        attn = getattr(layer, layout.attention)
        chosen = sorted(set(heads.get(index, [])))
        if chosen:
            attn.calibration = AttentionCalibration(chosen, num_heads, rule)
        elif calibration_of(attn) is not None:
            del attn.calibration


# ----------------------------------------------------------------------------- scoring
@dataclass
class _Group:
    indices: list[int]
    states: list[torch.Tensor]  # input of every layer


class TaskScorer:
    """Scores a model (with whatever calibration is installed) on labelled prompts, reusing
    the hidden states before the first calibrated layer, which calibration cannot change."""

    def __init__(self, model: nn.Module, tokenizer: Any, examples: Sequence[Example], labels: Sequence[str]) -> None:
        self.model = model
        self.examples = list(examples)
        self.label_ids = label_token_ids(tokenizer, labels)
        self.prompts = [list(tokenizer(e.prompt)["input_ids"]) for e in self.examples]
        self.entries = CausalLMEntries(model).eval()
        layers = len(self.entries.layers)
        self.groups: list[_Group] = []
        with torch.no_grad():
            for _, indices in sorted(by_length(self.prompts).items()):
                ids = torch.tensor([self.prompts[i] for i in indices])
                self.groups.append(_Group(indices, self.entries.layer_inputs(ids, layers)))

    def __call__(self, start_layer: int = 0) -> TaskScore:
        logits = np.zeros((len(self.examples), len(self.label_ids)), dtype=np.float64)
        with torch.no_grad():
            for group in self.groups:
                final = self.entries.final_hidden(group.states[start_layer], start_layer)
                last = self.entries.head(final[:, -1:, :])[:, 0, :]
                logits[group.indices] = last[:, self.label_ids].double().numpy()
        return score(logits, self.examples)

    def moved_mass(self, rule: SinkRule) -> np.ndarray:
        """[layers, heads]: mean attention mass per row that calibrating the head would move."""
        layers, heads = len(self.entries.layers), int(self.model.config.num_attention_heads)
        mass = np.zeros((layers, heads))
        rows = 0

        def observe(layer: int, probs: torch.Tensor) -> None:
            scaled, _, _ = sinks_to_scale(probs, rule)
            moved = (1 - rule.beta) * torch.where(scaled, probs, torch.zeros((), dtype=probs.dtype)).sum(-1)
            mass[layer] += moved.sum(dim=(0, 2)).double().numpy()

        self.entries.observer = observe
        try:
            with torch.no_grad():
                for group in self.groups:
                    self.entries.final_hidden(group.states[0], 0)
                    rows += group.states[0].shape[0] * group.states[0].shape[1]
        finally:
            self.entries.observer = None
        return mass / max(rows, 1)


@dataclass(frozen=True)
class Scored:
    accuracy: float
    label_nll: float

    def beats(self, other: Scored) -> bool:
        return (self.accuracy, -self.label_nll) > (other.accuracy, -other.label_nll)

    def to_json(self) -> dict[str, float]:
        return {"accuracy": round(self.accuracy, 4), "label_nll": round(self.label_nll, 4)}


def _mean(scores: Sequence[TaskScore]) -> Scored:
    return Scored(float(np.mean([s.accuracy for s in scores])), float(np.mean([s.label_nll for s in scores])))


# ----------------------------------------------------------------------------- search
def search_key(model: ModelHandle, options: ActOptions) -> str:
    key: dict[str, Any] = {"model": model.sha256, "rule": options.rule().__dict__, "search": options.search.model_dump(), "version": 2}
    # A user's task file is keyed by its content, not its name (built-in keys stay as they were).
    files = [Path(t).expanduser() for t in options.search.tasks if t not in TASK_NAMES]
    if files:
        key["files"] = [hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else str(f) for f in files]
    payload = json.dumps(key, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def search_heads(model: ModelHandle, options: ActOptions, progress: Callable[[str], None]) -> dict[str, Any]:
    """The offline head search; returns its log (heads chosen, per-head scores, seeds)."""
    assert model.module is not None and model.tokenizer is not None
    module, rule, search = model.module, options.rule(), options.search
    install(module, {}, rule)
    tasks = [build_task(name, search.seed, search.samples, 0) for name in search.tasks]
    progress(f"act search: {sum(len(t.calibration) for t in tasks)} calibration prompts over {', '.join(search.tasks)}")
    scorers = [TaskScorer(module, model.tokenizer, t.calibration, t.labels) for t in tasks]

    def evaluate(heads: HeadSet) -> Scored:
        install(module, heads, rule)
        try:
            start = min(heads) if heads else architecture_of(module).num_layers - 1
            return _mean([scorer(start) for scorer in scorers])
        finally:
            install(module, {}, rule)

    baseline = evaluate({})
    mass = sum(scorer.moved_mass(rule) for scorer in scorers) / len(scorers)
    ranked = sorted(
        ((int(layer), int(head)) for layer, head in zip(*np.nonzero(mass > 0))),
        key=lambda lh: -mass[lh],
    )
    candidates = ranked if search.candidates == 0 else ranked[: search.candidates]
    log: list[dict[str, Any]] = []
    for number, (layer, head) in enumerate(candidates, start=1):
        result = evaluate({layer: [head]})
        log.append({"layer": layer, "head": head, "moved_mass": round(float(mass[layer, head]), 5), **result.to_json(),
                    "helps": result.beats(baseline)})
        advance(progress, "act search: heads scored", number, len(candidates), f"{sum(r['helps'] for r in log)} help")
    helpful = sorted((r for r in log if r["helps"]), key=lambda r: (-r["accuracy"], r["label_nll"]))
    chosen: HeadSet = {}
    current = baseline
    greedy: list[dict[str, Any]] = []
    # Each trial re-runs the model from the earliest chosen layer: try at most twice as many
    # heads as may be kept.
    for row in helpful[: 2 * search.max_heads]:
        if sum(len(h) for h in chosen.values()) >= search.max_heads:
            break
        trial = {layer: list(heads) for layer, heads in chosen.items()}
        trial.setdefault(row["layer"], []).append(row["head"])
        result = evaluate(trial)
        kept = result.beats(current)
        greedy.append({"layer": row["layer"], "head": row["head"], **result.to_json(), "kept": kept})
        if kept:
            chosen, current = trial, result
        progress(f"act search: combination {len(greedy)}/{len(helpful)}: {'kept' if kept else 'dropped'} layer "
                 f"{row['layer']} head {row['head']} (accuracy {result.accuracy:.3f})")
    progress(f"act search: kept {sum(len(h) for h in chosen.values())} heads; calibration accuracy "
             f"{baseline.accuracy:.3f} -> {current.accuracy:.3f}")
    return {
        "tasks": search.tasks,
        "seed": search.seed,
        "samples_per_task": search.samples,
        "baseline": baseline.to_json(),
        "calibrated": current.to_json(),
        "heads_with_hidden_sinks": len(ranked),
        "candidates": len(candidates),
        "per_head": log,
        "greedy": greedy,
        "heads": {str(layer): sorted(heads) for layer, heads in sorted(chosen.items())},
    }


def cached_search(model: ModelHandle, options: ActOptions, progress: Callable[[str], None]) -> tuple[dict[str, Any], str]:
    key = search_key(model, options)
    committed = COMMITTED_SEARCHES / f"{key}.json"
    if committed.is_file():
        return json.loads(committed.read_text()), "committed"
    measured: list[bool] = []

    def build(directory: Any) -> None:
        measured.append(True)
        (directory / "search.json").write_text(json.dumps(search_heads(model, options, progress), indent=1))

    directory = cached_dir("act-search", key, build)
    return json.loads((directory / "search.json").read_text()), "measured" if measured else "cache"


# ----------------------------------------------------------------------------- pass
class Act:
    """ACT attention calibration of the chosen heads (edgec.sinks), heads from the recipe or a search."""

    name: ClassVar[str] = "act"
    families: ClassVar[tuple[str, ...]] = (FAMILY_CAUSAL_LM,)
    Options: ClassVar[type[BaseModel]] = ActOptions
    summary: ClassVar[str] = "ACT: calibrate hidden attention sinks on searched heads (no weight change)"

    def __init__(self, options: BaseModel, overrides: Sequence[LayerOverride]) -> None:
        assert isinstance(options, ActOptions)
        if overrides:
            raise BadInputError("act takes its heads in options.heads ({layer: [head, ...]}); it has no layer overrides")
        self.options = options

    def run(self, model: ModelHandle, ctx: PassContext) -> PassResult:
        assert model.module is not None
        layers, num_heads = check_attention(model)
        options, rule = self.options, self.options.rule()
        record: dict[str, Any] = {"rule": {**rule.__dict__}, "phases": ["prefill", "decode"] if rule.stat == "causal" else ["prefill"]}
        if options.heads == "search":
            if model.tokenizer is None:
                raise BadInputError(f"{model.name} has no tokenizer; act's head search scores text tasks (give heads: {{layer: [head]}})")
            found, source = cached_search(model, options, ctx.progress)
            heads = {int(layer): chosen for layer, chosen in found["heads"].items()}
            record["search"] = {**found, "source": source}
        elif options.heads == "all":
            heads = {layer: list(range(num_heads)) for layer in range(layers)}
        else:
            heads = {int(layer): sorted(set(chosen)) for layer, chosen in options.heads.items() if chosen}
        check_heads(heads, layers, num_heads)
        install(model.module, heads, rule)
        count = sum(len(h) for h in heads.values())
        record["calibrated_heads"] = count
        record["table"] = [{"layer": layer, "heads": chosen} for layer, chosen in sorted(heads.items())]
        ctx.progress(f"act: {count} heads calibrated over {len(heads)} layers (beta {rule.beta}, {rule.threshold_mode} "
                     f"{rule.threshold}, stat {rule.stat})")
        return PassResult(changed=count > 0, record=record)

