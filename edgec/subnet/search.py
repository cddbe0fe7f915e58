"""`edgec subnet search`: depth masks, width importance and the table of shapes.

Everything is scored on the full model (layers skipped, removed channels replaced by their
means: edgec.subnet.width.masked) by the mean next-token loss over calibration segments.
The result lives in the cache under the model's hash; every score is written as it is
measured, so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from edgec.architectures import Architecture
from edgec.cache import cache_root, locked
from edgec.data import calibration_segments
from edgec.errors import BadInputError
from edgec.lm import CausalLMEntries
from edgec.model import ModelHandle
from edgec.progress import advance
from edgec.subnet import Shape
from edgec.subnet.depth import dp_removals, kept_layers
from edgec.subnet.width import LayerWidth, WidthStats, layer_modules, masked, measure_width, width_masks, width_prunable

SEARCH_FILE = "search.json"
WIDTH_FILE = "width.safetensors"
SCORES_FILE = "scores.json"
DEFAULT_WIDTHS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
SCORE_BATCH = 4  # segments per forward: bounds the logits' memory on large vocabularies


class SearchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: int = Field(8, ge=1, description="calibration segments (the built-in train split)")
    seq_len: int = Field(128, ge=8, description="tokens per segment")
    min_depth: int | None = Field(None, ge=1, description="shallowest subnet; default half the layers")
    widths: list[float] = Field(default_factory=lambda: list(DEFAULT_WIDTHS), description="width ratios in the table")


@dataclass
class SubnetSearch:
    """A finished search: search.json's record and the width statistics."""

    directory: Path
    record: dict[str, Any]
    stats: WidthStats | None

    @property
    def depths(self) -> list[int]:
        return [int(d["depth"]) for d in self.record["depths"]]

    @property
    def widths(self) -> list[float]:
        return [float(w) for w in self.record["options"]["widths"]]

    def shapes(self) -> list[tuple[Shape, dict[str, Any]]]:
        """Every shape of the table with its row, largest first."""
        rows = sorted(self.record["table"], key=lambda r: (-r["parameters"], -r["depth"], -r["width"]))
        return [(Shape(int(r["depth"]), float(r["width"])), r) for r in rows]

    def layers(self, depth: int | None) -> list[int]:
        if depth is None:
            return list(range(int(self.record["num_layers"])))
        return next(list(d["layers"]) for d in self.record["depths"] if int(d["depth"]) == depth)

    def check(self, shape: Shape, what: str) -> None:
        """Refuse a shape outside the table, naming the shapes it has."""
        if shape.depth is not None and shape.depth not in self.depths:
            raise BadInputError(f"{what} depth={shape.depth}: outside the search's table "
                                f"(depths {min(self.depths)}-{max(self.depths)}); re-run `edgec subnet search` with --min-depth")
        if not any(abs(shape.width - w) < 1e-9 for w in self.widths):
            raise BadInputError(f"{what} width={shape.width:g}: not in the search's table "
                                f"(widths {', '.join(f'{w:g}' for w in self.widths)}); re-run `edgec subnet search` with --widths")
        if shape.width < 1 and self.stats is None:
            raise BadInputError(f"{what} width={shape.width:g}: this architecture's search has depths only")

    def widths_of(self, arch: Architecture, hidden: int, shape: Shape) -> dict[int, LayerWidth] | None:
        if shape.width >= 1:
            return None
        assert self.stats is not None
        return width_masks(self.stats, arch, hidden, self.layers(shape.depth), shape.width)


def search_directory(model: ModelHandle) -> Path:
    return cache_root() / "subnet-search" / model.sha256[:24]


# A model directory written by `edgec finetune --method amoeba` carries its search here.
MODEL_SEARCH_DIR = "subnet"


def load_search(model: ModelHandle) -> SubnetSearch | None:
    """The search this model directory carries, else the cached one of its hash, else None."""
    carried = load_search_at(Path(model.source) / MODEL_SEARCH_DIR)
    return carried if carried is not None else load_search_at(search_directory(model))


def require_search(model: ModelHandle, what: str) -> SubnetSearch:
    """The model's search, or a refusal that says how to make one."""
    search = load_search(model)
    if search is None:
        raise BadInputError(f"{what}: {model.name} has no subnet search; run `edgec subnet search {model.name}` first")
    return search


def load_search_at(directory: Path) -> SubnetSearch | None:
    if not (directory / SEARCH_FILE).is_file():
        return None
    record = json.loads((directory / SEARCH_FILE).read_text())
    width = directory / WIDTH_FILE
    return SubnetSearch(directory, record, WidthStats.load(width, int(record["num_layers"])) if width.is_file() else None)


def _write_json(path: Path, data: Any) -> None:
    """Whole or not at all: a killed search leaves the previous file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=1)
    os.replace(tmp, path)


class Scorer:
    """Calibration loss of the full model restricted to a shape, memoised on disk."""

    def __init__(self, entries: CausalLMEntries, batches: list[torch.Tensor], memo: Path, key: str) -> None:
        self.entries = entries
        self.batches = batches
        self.memo = memo
        self.key = key
        saved = json.loads(memo.read_text()) if memo.is_file() else {}
        self.scores: dict[str, float] = saved.get("scores", {}) if saved.get("key") == key else {}
        self.resumed = len(self.scores)
        self.evaluations = 0

    def __call__(self, layers: list[int], stats: WidthStats | None = None, widths: dict[int, LayerWidth] | None = None,
                 label: str = "") -> float:
        name = f"layers={','.join(map(str, layers))};{label}"
        if name in self.scores:
            return self.scores[name]
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in self.batches:
                if widths:
                    assert stats is not None
                    with masked(self.entries, stats, widths):
                        logits = self.entries.logits_through(batch, layers)
                else:
                    logits = self.entries.logits_through(batch, layers)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
                total += float(loss)
                count += batch[:, 1:].numel()
        self.scores[name] = total / count
        self.evaluations += 1
        _write_json(self.memo, {"key": self.key, "scores": self.scores})
        return self.scores[name]


def shape_parameters(model: torch.nn.Module, arch: Architecture, layers: list[int], widths: dict[int, LayerWidth] | None) -> int:
    """Parameters of the extracted subnet (edgec.subnet.extract), counted without building it."""
    total = sum(p.numel() for p in model.parameters())
    all_layers = model.get_submodule(arch.layout.layers)
    hidden = int(model.config.hidden_size)
    for index, layer in enumerate(all_layers):
        if index not in layers:
            total -= sum(p.numel() for p in layer.parameters())
    for index, width in (widths or {}).items():
        modules = layer_modules(all_layers[index], arch)
        groups = arch.layer_kv_heads[index]
        per_group = arch.layer_heads[index] // groups
        gone_groups = groups - len(width.groups)
        gone_channels = modules.mlp_out.weight.shape[1] - len(width.channels)
        total -= gone_groups * hidden * arch.head_dim * (2 * per_group + 2)
        total -= gone_channels * hidden * (len(modules.mlp_in) + 1)
        for linear, gone in ((modules.q, gone_groups * per_group * arch.head_dim), (modules.k, gone_groups * arch.head_dim),
                             (modules.v, gone_groups * arch.head_dim), *((m, gone_channels) for m in modules.mlp_in)):
            total -= gone if linear.bias is not None else 0
        for linear in (modules.o, modules.mlp_out):
            total += hidden if linear.bias is None else 0  # the compensation bias (every sliced layer has one)
    return total


def options_key(model: ModelHandle, options: SearchOptions, segments: list[list[int]]) -> str:
    payload = {"model": model.sha256, "options": options.model_dump(),
               "segments": hashlib.sha256(json.dumps(segments).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def check_options(options: SearchOptions, arch: Architecture) -> int:
    """The shallowest depth, after refusing options the model cannot have."""
    min_depth = options.min_depth or math.ceil(arch.num_layers / 2)
    if not 1 <= min_depth <= arch.num_layers:
        raise BadInputError(f"--min-depth {min_depth}: the model has {arch.num_layers} layers; give 1-{arch.num_layers}")
    bad = [w for w in options.widths if not 0 < w <= 1]
    if bad or not options.widths:
        raise BadInputError(f"--widths {','.join(map(str, options.widths))}: give fractions in (0, 1], e.g. 1,0.8,0.6")
    return min_depth


def search_subnets(model: ModelHandle, options: SearchOptions, progress: Callable[[str], None],
                   force: bool = False) -> tuple[SubnetSearch, str]:
    """The search for this model and options: from the cache, resumed, or measured now.
    Returns it and where it came from ("cache", "resumed" or "measured")."""
    if model.module is None or model.tokenizer is None:
        raise BadInputError(f"{model.name}: subnet search needs a causal LM with a tokenizer")
    if model.info.get("exits") or model.info.get("applied_passes") or model.info.get("amoeba"):
        raise BadInputError(f"{model.name}: a tuned model (exits, compressed passes or amoeba); search the base model instead")
    entries = CausalLMEntries(model.module).eval()
    arch = entries.arch
    min_depth = check_options(options, arch)
    positions = int(model.module.config.max_position_embeddings)
    if options.seq_len > positions:
        raise BadInputError(f"--seq-len {options.seq_len}: longer than the model's {positions} positions")
    segments = calibration_segments(model.tokenizer, "train", options.samples, options.seq_len)
    key = options_key(model, options, segments)
    directory = search_directory(model)
    directory.mkdir(parents=True, exist_ok=True)
    with locked(directory / ".lock"):
        found = load_search_at(directory)
        if found is not None and found.record.get("key") == key and not force:
            return found, "cache"
        started = time.perf_counter()
        ids = torch.tensor(segments, dtype=torch.int64)
        batches = list(ids.split(SCORE_BATCH))
        scorer = Scorer(entries, batches, directory / SCORES_FILE, key if not force else key + f"-{time.time_ns()}")
        removable = arch.num_layers - min_depth
        done = [0]
        total_dp = sum(min(n, removable) for n in range(1, arch.num_layers)) + 1

        def score_removed(removed: tuple[int, ...]) -> float:
            value = scorer(kept_layers(arch.num_layers, removed))
            done[0] += 1
            advance(progress, "subnet search: depth", min(done[0], total_dp), total_dp)
            return value

        removals = dp_removals(arch.num_layers, removable, score_removed)
        stats = None
        if width_prunable(arch):
            progress("subnet search: width importance")
            stats = measure_width(entries, batches)
        else:
            progress(f"subnet search: {arch.name} fuses its projections; depths only")
        hidden = int(model.module.config.hidden_size)
        depths = [{"depth": arch.num_layers - m, "removed": list(removed), "layers": kept_layers(arch.num_layers, removed),
                   "score": scorer(kept_layers(arch.num_layers, removed))} for m, removed in removals.items()]
        widths = options.widths if stats is not None else [1.0]
        table = []
        cells = [(d, w) for d in depths for w in widths]
        for number, (depth, width) in enumerate(cells, 1):
            layers = depth["layers"]
            masks = None if width >= 1 or stats is None else width_masks(stats, arch, hidden, layers, width)
            score = scorer(layers, stats, masks, f"width={width:g}")
            table.append({"depth": depth["depth"], "width": width, "score": score, "perplexity": math.exp(score),
                          "parameters": shape_parameters(model.module, arch, layers, masks)})
            advance(progress, "subnet search: table", number, len(cells))
        full = sum(p.numel() for p in model.module.parameters())
        for row in table:
            row["fraction"] = row["parameters"] / full
        record = {
            "key": key,
            "model": model.name,
            "model_sha256": model.sha256,
            "num_layers": arch.num_layers,
            "options": {**options.model_dump(), "widths": widths, "min_depth": min_depth},
            "score": "mean next-token loss (nats) on the calibration segments, full model masked to the shape",
            "depths": depths,
            "table": table,
            "evaluations": scorer.evaluations,
            "resumed_scores": scorer.resumed,
            "seconds": round(time.perf_counter() - started, 1),
        }
        if stats is not None:
            stats.save(directory / WIDTH_FILE)  # replaced whole; search.json (its key) is written last
        elif (directory / WIDTH_FILE).exists():
            (directory / WIDTH_FILE).unlink()
        _write_json(directory / SEARCH_FILE, record)
        found = load_search_at(directory)
        assert found is not None
        return found, "resumed" if scorer.resumed else "measured"


def plot_search(search: SubnetSearch, path: Path) -> None:
    """Calibration loss against parameters, one line per width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for width in search.widths:
        rows = sorted((r for r in search.record["table"] if r["width"] == width), key=lambda r: r["parameters"])
        axes.plot([r["parameters"] / 1e6 for r in rows], [r["score"] for r in rows], marker="o", label=f"width {width:g}")
    axes.set_xlabel("parameters (millions)")
    axes.set_ylabel("calibration loss (nats/token)")
    axes.set_title(f"subnets of {search.record['model']}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
