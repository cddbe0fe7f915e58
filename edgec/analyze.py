"""`edgec analyze attention`: where a causal LM's attention sinks are, per (layer, head).

Runs the model (edgec's own attention, so what is measured is what gets compiled) on
calibration prompts, and for every (layer, head, prompt) lists the keys whose mean
received attention -- over the queries that see them -- passes either threshold form:
``absolute`` (score > tau, the ACT code) and ``alpha`` (score > alpha / N, the paper).
Heat maps of a few heads' attention, with the sinks marked, go to --plot DIR (the heads whose hidden sinks receive the most attention in total).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgec.lm import CausalLMEntries
from edgec.families import family_named
from edgec.model import ModelHandle
from edgec.errors import BadInputError, UnsupportedError
from edgec.sinks import SinkRule, find_sinks, sink_scores

DEFAULT_TAU = 0.1
DEFAULT_ALPHA = 5.0


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: list[int]


def prompts_from(model: ModelHandle, data: str, samples: int, seed: int) -> list[Prompt]:
    """Calibration prompts: a task's (wordnet, shakespeare) or the lines of a text file."""
    from edgec.data import read_user_text
    from edgec.tasks import TASK_NAMES, calibration_prompts

    if model.tokenizer is None:
        raise BadInputError(f"{model.name} has no tokenizer; attention analysis needs text prompts")
    if data in TASK_NAMES:
        texts = calibration_prompts(data, seed, samples)
    else:
        lines = read_user_text(Path(data), f"--data {data}", f"a task name ({', '.join(TASK_NAMES)})").splitlines()
        texts = [line for line in lines if line.strip()][:samples]
        if not texts:
            raise BadInputError(f"--data {data} has no non-empty lines; give one prompt per line")
    return [Prompt(text, list(model.tokenizer(text)["input_ids"])) for text in texts]


def record_attention(module: torch.nn.Module, ids: list[int]) -> list[torch.Tensor]:
    """Raw attention probabilities per layer for one prompt: [heads, T, T] each."""
    entries = CausalLMEntries(module).eval()
    maps: list[torch.Tensor] = []
    entries.observer = lambda layer, probs: maps.append(probs[0].detach().clone())
    with torch.no_grad():
        entries.prefill(torch.tensor([ids]))
    return maps


def check_attention_model(model: ModelHandle) -> None:
    if not family_named(model.family).generates_text or model.module is None:
        raise UnsupportedError(f"{model.name} (family {model.family}) has no attention to analyse; give a causal LM")


def analyze_attention(
    model: ModelHandle,
    prompts: Sequence[Prompt],
    tau: float,
    alpha: float,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    check_attention_model(model)
    assert model.module is not None
    absolute = SinkRule(threshold_mode="absolute", threshold=tau, stat="paper")
    relative = SinkRule(threshold_mode="alpha", threshold=alpha, stat="paper")
    heads: dict[tuple[int, int], list[dict[str, Any]]] = {}
    maps_of_first: list[torch.Tensor] = []
    for number, prompt in enumerate(prompts):
        progress(f"prompt {number + 1}/{len(prompts)} ({len(prompt.ids)} tokens)")
        maps = record_attention(model.module, prompt.ids)
        if number == 0:
            maps_of_first = maps
        tokens = model.tokenizer.convert_ids_to_tokens(prompt.ids) if model.tokenizer is not None else [str(i) for i in prompt.ids]
        for layer, probs in enumerate(maps):
            batch = probs[None]
            # The paper's statistic: every query of the prompt counts; rows all see the same set.
            by_tau = find_sinks(batch, absolute)[0][0, :, -1]
            by_alpha = find_sinks(batch, relative)[0][0, :, -1]
            score = sink_scores(batch, "paper")[0][0, :, 0]
            seen_by = torch.arange(probs.shape[-1], 0, -1)  # queries that see each key
            for head in range(probs.shape[0]):
                found = (by_tau[head] | by_alpha[head]).nonzero().flatten().tolist()
                for position in found:
                    heads.setdefault((layer, head), []).append(
                        {
                            "prompt": number,
                            "position": int(position),
                            "token": tokens[position],
                            "score": round(float(score[head, position]), 4),
                            "seen_by": int(seen_by[position]),
                            "absolute": bool(by_tau[head, position]),
                            "alpha": bool(by_alpha[head, position]),
                        }
                    )
    n_layers = len(maps_of_first)
    n_heads = int(maps_of_first[0].shape[0]) if maps_of_first else 0
    table = []
    for layer in range(n_layers):
        for head in range(n_heads):
            sinks = heads.get((layer, head), [])
            firsts = _first_per_prompt(sinks)
            hidden = [s for s in sinks if (s["prompt"], s["position"]) not in firsts]
            table.append(
                {
                    "layer": layer,
                    "head": head,
                    "sinks": sinks,
                    "initial": sum(1 for s in sinks if s["position"] == 0),
                    "non_initial": sum(1 for s in sinks if s["position"] != 0),
                    "hidden": len(hidden),
                }
            )
    return {
        "model": model.name,
        "prompts": [{"text": p.text, "tokens": len(p.ids)} for p in prompts],
        "thresholds": {"tau": tau, "alpha": alpha, "statistic": "mean attention a key receives from the queries that see it"},
        "summary": {
            "heads": n_layers * n_heads,
            "sinks": sum(len(s["sinks"]) for s in table),
            "initial_sinks": sum(s["initial"] for s in table),
            "non_initial_sinks": sum(s["non_initial"] for s in table),
            "hidden_sinks": sum(s["hidden"] for s in table),
            "heads_with_hidden_sinks": sum(1 for s in table if s["hidden"]),
        },
        "heads": table,
        "_maps": maps_of_first,
    }


def _first_per_prompt(sinks: list[dict[str, Any]]) -> set[tuple[int, int]]:
    """(prompt, position) of the first sink per prompt: the one ACT keeps."""
    first: dict[int, int] = {}
    for sink in sinks:
        first[sink["prompt"]] = min(first.get(sink["prompt"], sink["position"]), sink["position"])
    return {(prompt, position) for prompt, position in first.items()}


def hidden_mass(row: dict[str, Any]) -> float:
    """Total attention the head's hidden sinks receive over all prompts."""
    firsts = _first_per_prompt(row["sinks"])
    return sum(s["score"] * s["seen_by"] for s in row["sinks"] if (s["prompt"], s["position"]) not in firsts)


def plot_heatmaps(result: dict[str, Any], tokens: list[str], out_dir: Path, count: int = 6) -> list[Path]:
    """Heat maps of the first prompt's attention for the heads whose hidden sinks receive the
    most attention in total (score x queries that see them): a key near the end that two
    queries attend to passes the threshold too, but is not what the plots are for."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    maps: list[torch.Tensor] = result["_maps"]
    ranked = sorted(result["heads"], key=lambda row: (-hidden_mass(row), row["layer"], row["head"]))[:count]
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for row in ranked:
        layer, head = row["layer"], row["head"]
        probs = maps[layer][head].numpy()
        sinks = sorted({s["position"] for s in row["sinks"] if s["prompt"] == 0})
        figure, axis = plt.subplots(figsize=(6.5, 5.5))
        image = axis.imshow(probs, cmap="viridis", vmin=0.0, vmax=max(float(probs.max()), 1e-6))
        for position in sinks:
            axis.axvline(position, color="red", linewidth=0.8, linestyle="--")
        axis.set_title(f"layer {layer} head {head}: sinks at {sinks or 'none'} (red)", fontsize=10)
        axis.set_xlabel("key")
        axis.set_ylabel("query")
        if len(tokens) <= 40:
            axis.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
            axis.set_yticks(range(len(tokens)), tokens, fontsize=6)
        figure.colorbar(image, ax=axis, fraction=0.046)
        figure.tight_layout()
        path = out_dir / f"attention-l{layer:02d}-h{head:02d}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written
