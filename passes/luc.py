"""luc: Edge-LLM's layer-wise unified compression (per-layer pruning + low-bit weights).

Before: a causal LM with fp32 nn.Linear layers and an fp32 embedding table.
After: every linear is a PackedLinear (edgec.packing) holding pruned, group-quantized
weights in packed planes at its layer's bit-width, the embedding table (and a tied
lm_head, sharing it) likewise at `embedding_bits`.

1. Sensitivity: for each decoder layer alone, the increase of the model's loss on the
   calibration segments when that layer's linears are pruned (Wanda) at each probe
   sparsity, and when they are round-to-nearest quantized at each probe bit-width.
   Loss increase, not the layer's raw output MSE: raw MSE grows with the activation
   scale of deeper layers and tracks depth, not sensitivity (METHODS.md). The profile
   is cached per (model hash, probe segments, probes); the zoo's are committed.
2. Policy, under the user's budget (mean sparsity and mean bits over the decoder
   layers): bits by a greedy knapsack from the floor up (each step buys the most loss
   reduction per bit); sparsity proportional to 1 - temper x normalised sensitivity,
   clamped to [0, max_sparsity] with the excess re-spread, so the mean is the budget.
   `policy: uniform` gives every layer the budget itself, for comparison. Layer
   overrides fix `bits` / `sparsity` of the layers they match; the rest share the
   remaining budget.
3. Apply: prune (Wanda or SparseGPT, unstructured / N:M / channel) from the dense
   model's calibration activations, quantize (round to nearest, GPTQ, or per linear
   whichever moves the output less on held-out calibration segments) and pack.
   The sweep is one-shot: every layer sees the dense model's inputs, not the inputs
   of the already compressed layers before it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from edgec.architectures import architecture_of
from edgec.cache import cached_dir
from edgec.errors import BadInputError, UnsupportedError
from edgec.model import FAMILY_CAUSAL_LM, ModelHandle
from edgec.packing import (
    INDEX_WIDTH,
    SUPPORTED_BITS,
    PackedEmbedding,
    PackedLinear,
    PackedWeight,
    compress_nm,
    dequantize,
    is_offset,
    padded_width,
    quantize,
    set_submodule,
    unique_weight_bytes,
)
from edgec.passes.prune import GroupQuant, obs_compress, parse_pattern, pattern_sparsity, sparsegpt, wanda
from edgec.pipeline import PassContext, PassResult, override_matches
from edgec.progress import advance
from edgec.recipe import LayerOverride
from edgec.zoo import ZOO_DIR

FP32_BITS = 32
COMMITTED_PROFILES = ZOO_DIR / "luc-profiles"
# Options a layer override may fix for the layers it matches.
LAYER_KEYS = ("bits", "sparsity")


class LucOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: Literal["sensitivity", "uniform"] = Field(
        "sensitivity", description="sensitivity: per-layer from the profile; uniform: the budget on every layer"
    )
    bits: float = Field(4.0, ge=2, le=8, description="mean weight bits over the decoder layers (the budget)")
    sparsity: float = Field(0.0, ge=0, lt=1, description="mean sparsity over the decoder layers (the budget)")
    size_bytes: int | None = Field(
        None,
        gt=0,
        description="budget as the model's weight bytes after compression (packed layers, embedding, norms): "
        "the mean bits are the most that fit, replacing `bits` (sized with dense code storage)",
    )
    bit_choices: list[int] = Field([2, 3, 4, 8], description="bit-widths a layer may get (2, 3, 4, 8)")
    bits_floor: int = Field(2, description="no layer gets fewer bits")
    max_sparsity: float = Field(0.9, gt=0, lt=1, description="no layer is pruned beyond this")
    temper: float = Field(0.8, ge=0, le=1, description="1: the most sensitive layer gets no sparsity; 0: uniform")
    group_size: int = Field(32, ge=8, description="input channels per quantization scale")
    symmetric: bool = Field(True, description="symmetric (abs-max) or asymmetric (min-max, uint8 zero point) groups")
    offset: bool = Field(
        False,
        description="asymmetric groups on the offset grid (llama.cpp Q4_1's: code x scale + a float16 offset, the "
        "group's minimum) instead of an integer zero point: each group's own range, and weights that came from Q4_1 "
        "re-quantize without loss. Pruned layers, widths the group does not divide (a pruned or padded weight "
        "must decode to exactly 0) and 8-bit ones keep the zero point",
    )
    pruning: Literal["wanda", "sparsegpt"] = Field("wanda", description="wanda: |W| x ||x||; sparsegpt: OBS reconstruction")
    pattern: str = Field("unstructured", description="unstructured, N:M (N kept of every M, e.g. 2:4) or channel")
    sparse_storage: Literal["auto", "dense"] = Field(
        "auto",
        description="N:M patterns on TVM: auto stores only the kept codes and their positions where that is smaller "
        "(2:4 at 4 bits: 3 bits per weight); dense stores a pruned weight as its zero code",
    )
    quantizer: Literal["best", "gptq", "rtn"] = Field(
        "best",
        description="gptq: round column by column, compensating the error on the rest (OBS); rtn: round to nearest; "
        "best: per linear, whichever moves the output less on validation segments the fit did not see",
    )
    validation_samples: int = Field(
        4, ge=1, description="calibration segments held out of the fit to choose between gptq and rtn (quantizer: best)"
    )
    embedding_bits: int = Field(4, description="bits of the embedding table (and a tied lm_head); 32 keeps fp32")
    head_bits: int | None = Field(None, description="bits of an untied lm_head; default embedding_bits")
    probe_bits: list[int] = Field([2, 3, 4], description="bit-widths each layer is probed at (8 counts as lossless)")
    probe_sparsity: list[float] = Field([0.3, 0.5, 0.7], description="sparsities each layer is probed at")
    probe_samples: int = Field(
        4, ge=1, description="calibration segments the sensitivity loss is measured on (statistics use them all)"
    )

    @model_validator(mode="after")
    def _check(self) -> LucOptions:
        for name, values in (("bit_choices", self.bit_choices), ("probe_bits", self.probe_bits)):
            bad = [b for b in values if b not in SUPPORTED_BITS]
            if bad:
                raise ValueError(f"{name} {bad}: edgec packs {', '.join(map(str, SUPPORTED_BITS))} bits")
        for name, value in (("embedding_bits", self.embedding_bits), ("head_bits", self.head_bits)):
            if value is not None and value not in (*SUPPORTED_BITS, FP32_BITS):
                raise ValueError(f"{name} {value}: use one of {', '.join(map(str, SUPPORTED_BITS))} or 32 (fp32)")
        parse_pattern(self.pattern)
        if self.offset and self.symmetric:
            raise ValueError("offset: true is an asymmetric grid; set symmetric: false with it")
        return self


@dataclass
class LayerPlan:
    index: int
    bits: int
    sparsity: float
    fixed: bool


# ----------------------------------------------------------------------------- budget


def check_budget(options: LucOptions, fixed: dict[int, dict[str, float]], num_layers: int) -> None:
    """Refuse a budget no per-layer assignment can meet, before any work."""
    choices = sorted(b for b in options.bit_choices if b >= options.bits_floor)
    if not choices:
        raise BadInputError(f"luc: no bit choice {options.bit_choices} is at or above bits_floor {options.bits_floor}")
    free = num_layers - sum(1 for f in fixed.values() if "bits" in f)
    fixed_bits = sum(f["bits"] for f in fixed.values() if "bits" in f)
    total = options.bits * num_layers
    low = fixed_bits + free * choices[0]
    high = fixed_bits + free * choices[-1]
    if not low - 1e-9 <= total <= high + 1e-9:
        raise BadInputError(
            f"luc: a mean of {options.bits:g} bits cannot be met with bit choices {choices} (floor {options.bits_floor}) "
            f"and the fixed layers: the reachable mean is {low / num_layers:g} to {high / num_layers:g}"
        )
    if options.policy == "uniform" and options.bits not in choices:
        raise BadInputError(f"luc: policy uniform gives every layer {options.bits:g} bits; use one of {choices}")
    nm = pattern_sparsity(options.pattern)
    if nm is not None and options.sparsity not in (0.0, nm):
        raise BadInputError(
            f"luc: pattern {options.pattern} prunes exactly {nm:g} of each layer; set sparsity to {nm:g} (or 0 for none)"
        )
    if options.sparsity > options.max_sparsity:
        raise BadInputError(f"luc: mean sparsity {options.sparsity:g} is above max_sparsity {options.max_sparsity:g}")


def packed_bytes(outputs: int, inputs: int, bits: int, options: LucOptions) -> int:
    """Bytes of one matrix packed at `bits` with dense codes: codes, float16 scales and
    (asymmetric) uint8 zero points or (offset grid) float16 offsets."""
    stored = padded_width(inputs, options.group_size)
    groups = outputs * stored // options.group_size
    per_group = 2 if options.symmetric else 4 if uses_offset(options, bits, inputs, 0.0) else 3
    return outputs * stored * bits // 8 + groups * per_group


def uses_offset(options: LucOptions, bits: int, inputs: int, sparsity: float) -> bool:
    """Whether a matrix of `inputs` columns at `bits` and `sparsity` gets the offset grid.
    Not at 8 bits: an integer zero point is already within 1/510 of the group's range,
    and ONNX Runtime's 8-bit MatMulNBits takes no float zero points."""
    return options.offset and bits < 8 and sparsity == 0 and inputs % options.group_size == 0


def bits_for_size(root: nn.Module, options: LucOptions, fixed: dict[int, dict[str, float]]) -> float:
    """The largest mean decoder-layer bits whose compressed model fits options.size_bytes:
    weight bytes are linear in each layer's bits, plus what the bits do not change (the
    embedding and lm_head at their own bits, norms, biases, scales). Refuses a size even
    the lowest bit choice exceeds."""
    assert options.size_bytes is not None
    layers = decoder_layers(root)
    linears = [[m for _, m in layer_linears(layer)] for layer in layers]
    layout = architecture_of(root).layout
    embedding = root.get_submodule(layout.embed).weight
    head = root.get_submodule(layout.head).weight
    tied = head.data_ptr() == embedding.data_ptr()
    constant = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in root.state_dict().values()}.values())
    constant -= sum(m.weight.numel() * 4 for group in linears for m in group) + embedding.numel() * 4
    constant -= 0 if tied else head.numel() * 4
    for table, bits in ((embedding, options.embedding_bits), *(() if tied else ((head, options.head_bits or options.embedding_bits),))):
        constant += table.numel() * 4 if bits == FP32_BITS else packed_bytes(*table.shape, bits, options)
    # Per layer: bytes = base + slope * bits.
    base = [sum(packed_bytes(*m.weight.shape, 0, options) for m in group) for group in linears]
    slope = [sum(m.weight.numel() for m in group) / 8 for group in linears]
    choices = sorted(b for b in options.bit_choices if b >= options.bits_floor)
    free = [i for i in range(len(layers)) if "bits" not in fixed.get(i, {})]
    spent = constant + sum(base) + sum(slope[i] * fixed[i]["bits"] for i in fixed if "bits" in fixed[i])
    smallest = spent + sum(slope[i] for i in free) * choices[0]
    if options.size_bytes < smallest:
        raise BadInputError(
            f"luc: size_bytes {options.size_bytes} cannot be met: at {choices[0]} bits (the lowest of bit choices {choices}, "
            f"floor {options.bits_floor}) this model's weights take {int(smallest)} bytes; raise size_bytes or lower the floor"
        )
    # The largest slope bounds every assignment's bytes, so no knapsack outcome overshoots.
    mean_free = min((options.size_bytes - spent) / (max(slope[i] for i in free) * len(free)), choices[-1]) if free else 0.0
    fixed_bits = sum(fixed[i]["bits"] for i in fixed if "bits" in fixed[i])
    return (fixed_bits + mean_free * len(free)) / len(layers)


def layer_overrides(overrides: Sequence[LayerOverride], num_layers: int) -> dict[int, dict[str, float]]:
    """Layer index -> the bits / sparsity its overrides fix; an override that matches no layer is an error."""
    fixed: dict[int, dict[str, float]] = {}
    for override in overrides:
        unknown = sorted(set(override.options) - set(LAYER_KEYS))
        if unknown:
            raise BadInputError(f"luc override {override.match!r}: only {', '.join(LAYER_KEYS)} can be set per layer, not {unknown}")
        matched = [i for i in range(num_layers) if override_matches(override.match, f"model.layers.{i}.mlp")]
        if not matched:
            raise BadInputError(
                f"luc override {override.match!r} matches no decoder layer; the model has layers 0-{num_layers - 1}"
            )
        for index in matched:
            fixed.setdefault(index, {}).update({k: float(v) for k, v in override.options.items()})
    for index, values in fixed.items():
        if "bits" in values and int(values["bits"]) not in SUPPORTED_BITS:
            raise BadInputError(f"luc override for layer {index}: bits {values['bits']:g}; use one of {SUPPORTED_BITS}")
        if "sparsity" in values and not 0 <= values["sparsity"] < 1:
            raise BadInputError(f"luc override for layer {index}: sparsity {values['sparsity']:g} is outside [0, 1)")
    return fixed


# ------------------------------------------------------------------------------ policy


def allocate_bits(
    damage: list[dict[int, float]], choices: Sequence[int], budget: float, fixed: dict[int, int]
) -> list[int]:
    """Greedy knapsack: every free layer starts at the lowest choice; repeatedly raise the
    layer whose next step removes the most loss per added bit while the mean stays within
    the budget. damage[l][b]: loss increase of layer l alone at b bits (8 bits: 0)."""
    ordered = sorted(choices)
    layers = len(damage)
    bits = [fixed.get(i, ordered[0]) for i in range(layers)]
    allowance = budget * layers - sum(bits)
    while True:
        best: tuple[float, int, int] | None = None
        for index in range(layers):
            if index in fixed or bits[index] == ordered[-1]:
                continue
            step = ordered[ordered.index(bits[index]) + 1]
            cost = step - bits[index]
            if cost > allowance + 1e-9:
                continue
            gain = (damage[index].get(bits[index], 0.0) - damage[index].get(step, 0.0)) / cost
            if best is None or gain > best[0]:
                best = (gain, index, step)
        if best is None:
            return bits
        _, index, step = best
        allowance -= step - bits[index]
        bits[index] = step


def allocate_sparsity(
    scores: list[float], budget: float, fixed: dict[int, float], temper: float, ceiling: float
) -> list[float]:
    """sparsity_l proportional to 1 - temper x normalised score, clamped to [0, ceiling];
    the part cut off by the clamp is spread over the others, so the mean is the budget."""
    layers = len(scores)
    free = [i for i in range(layers) if i not in fixed]
    result = [fixed.get(i, 0.0) for i in range(layers)]
    remaining = budget * layers - sum(fixed.values())
    if not free or remaining <= 0:
        return result
    low, high = min(scores[i] for i in free), max(scores[i] for i in free)
    span = high - low if high > low else 1.0
    weights = {i: 1.0 - temper * (scores[i] - low) / span for i in free}
    open_layers = set(free)
    while open_layers:
        total = sum(weights[i] for i in open_layers)
        share = {i: remaining * weights[i] / total for i in open_layers}
        over = [i for i in open_layers if share[i] > ceiling]
        if not over:
            for i in open_layers:
                result[i] = share[i]
            break
        for i in over:
            result[i] = ceiling
            remaining -= ceiling
            open_layers.discard(i)
    return result


def plan_layers(options: LucOptions, profile: dict[str, Any] | None, fixed: dict[int, dict[str, float]], num_layers: int) -> list[LayerPlan]:
    fixed_bits = {i: int(v["bits"]) for i, v in fixed.items() if "bits" in v}
    fixed_sparsity = {i: v["sparsity"] for i, v in fixed.items() if "sparsity" in v}
    choices = sorted(b for b in options.bit_choices if b >= options.bits_floor)
    nm = pattern_sparsity(options.pattern)
    if options.policy == "uniform" or profile is None:
        bits = [fixed_bits.get(i, int(options.bits)) for i in range(num_layers)]
        sparsity = [fixed_sparsity.get(i, options.sparsity) for i in range(num_layers)]
    else:
        damage = [{int(b): d for b, d in layer["bits"].items()} for layer in profile["layers"]]
        bits = allocate_bits(damage, choices, options.bits, fixed_bits)
        if nm is not None:
            sparsity = [fixed_sparsity.get(i, options.sparsity) for i in range(num_layers)]
        else:
            scores = [sum(layer["sparsity"].values()) for layer in profile["layers"]]
            sparsity = allocate_sparsity(scores, options.sparsity, fixed_sparsity, options.temper, options.max_sparsity)
    return [LayerPlan(i, bits[i], sparsity[i], i in fixed) for i in range(num_layers)]


# ------------------------------------------------------------------------- calibration


def decoder_layers(root: nn.Module) -> list[nn.Module]:
    return list(root.get_submodule(architecture_of(root).layout.layers))


def layer_linears(layer: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in layer.named_modules() if isinstance(m, nn.Linear)]


def calibration_loss(root: nn.Module, batch: torch.Tensor) -> float:
    with torch.no_grad():
        return float(root(input_ids=batch, labels=batch).loss)


class InputStats:
    """Per-linear input statistics from one dense forward: sum of squares per input
    channel (Wanda) and, if asked, the Gram matrix X^T X (SparseGPT)."""

    def __init__(self, root: nn.Module, batch: torch.Tensor, gram: bool, validation: int = 0) -> None:
        """The last `validation` segments are kept out of the fit: their Gram matrix
        (`gram_validation`) scores candidate weights on inputs the fit did not see."""
        self.sq_sum: dict[str, torch.Tensor] = {}
        self.gram: dict[str, torch.Tensor] = {}
        self.gram_validation: dict[str, torch.Tensor] = {}
        fit_rows = batch.shape[0] - validation
        by_input: dict[int, str] = {}
        alive: list[torch.Tensor] = []  # keeps ids unique: a freed tensor's id could be reused
        handles = []

        def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
            def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                key = id(inputs[0])
                if key in by_input:  # q/k/v and gate/up read the same tensor: compute once
                    first = by_input[key]
                    self.sq_sum[name] = self.sq_sum[first]
                    if gram:
                        self.gram[name] = self.gram[first]
                    if first in self.gram_validation:
                        self.gram_validation[name] = self.gram_validation[first]
                    return
                by_input[key] = name
                alive.append(inputs[0])
                width = inputs[0].shape[-1]
                x = inputs[0].detach()[:fit_rows].reshape(-1, width).double()
                self.sq_sum[name] = (x * x).sum(0).float()
                if gram:
                    self.gram[name] = (x.T @ x).float()
                if validation:
                    held = inputs[0].detach()[fit_rows:].reshape(-1, width).double()
                    self.gram_validation[name] = (held.T @ held).float()

            return record

        for name, module in root.named_modules():
            if isinstance(module, nn.Linear) and name.startswith(f"{architecture_of(root).layout.layers}."):
                handles.append(module.register_forward_pre_hook(hook(name)))
        try:
            with torch.no_grad():
                root(input_ids=batch)
        finally:
            for handle in handles:
                handle.remove()


def fake_quantize(weight: torch.Tensor, bits: int, group: int, symmetric: bool, offset: bool = False) -> torch.Tensor:
    packed = quantize(weight, bits, group, symmetric, offset=offset)
    return dequantize(packed.planes, packed.scales, packed.zeros, bits, group)[:, : weight.shape[1]]


def profile_key(model: ModelHandle, segments: list[list[int]], options: LucOptions) -> str:
    fields: dict[str, Any] = {
        "model": model.sha256,
        "segments": hashlib.sha256(json.dumps(segments).encode()).hexdigest(),
        "probe_bits": sorted(options.probe_bits),
        "probe_sparsity": sorted(options.probe_sparsity),
        "group": options.group_size,
        "symmetric": options.symmetric,
        "pattern": options.pattern,
    }
    if options.offset:  # only when set: the committed profiles' keys predate the option
        fields["offset"] = True
    payload = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def measure_profile(
    root: nn.Module, batch: torch.Tensor, stats: InputStats, options: LucOptions, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Loss increase of each decoder layer compressed alone, at each probe."""
    base = calibration_loss(root, batch)
    layers = decoder_layers(root)
    rows: list[dict[str, Any]] = []
    prefix = {id(m): n for n, m in root.named_modules()}
    for index, layer in enumerate(layers):
        linears = layer_linears(layer)
        originals = [linear.weight.data.clone() for _, linear in linears]
        row: dict[str, Any] = {"layer": index, "bits": {}, "sparsity": {}}
        probes: list[tuple[str, float, Callable[[str, torch.Tensor], torch.Tensor]]] = []
        for bits in sorted(options.probe_bits):
            probes.append(("bits", bits, lambda _n, w, b=bits: fake_quantize(
                w, b, options.group_size, options.symmetric, uses_offset(options, b, w.shape[1], 0.0))))
        for sparsity in sorted(options.probe_sparsity):
            pattern = "unstructured" if options.pattern != "channel" else "channel"
            probes.append(("sparsity", sparsity, lambda n, w, s=sparsity, p=pattern: wanda(w, stats.sq_sum[n], s, p)))
        for kind, value, compress in probes:
            try:
                for (_, linear), original in zip(linears, originals):
                    linear.weight.data = compress(prefix[id(linear)], original)
                row[kind][str(value) if kind == "sparsity" else str(int(value))] = calibration_loss(root, batch) - base
            finally:
                for (_, linear), original in zip(linears, originals):
                    linear.weight.data = original
        row["bits"]["8"] = 0.0
        rows.append(row)
        advance(progress, "luc: layer sensitivity", index + 1, len(layers))
    return {"base_loss": base, "measure": "calibration loss increase, one layer compressed", "layers": rows}


def cached_profile(
    model: ModelHandle, segments: list[list[int]], key: str, options: LucOptions, progress: Callable[[str], None]
) -> tuple[dict[str, Any], str]:
    """The sensitivity profile and where it came from: committed with the zoo (the zoo
    models' default calibration, so tests and benchmarks skip minutes of probing), the
    cache, or measured now (and cached)."""
    assert model.module is not None
    committed = COMMITTED_PROFILES / f"{key}.json"
    if committed.is_file():
        return json.loads(committed.read_text()), "committed"
    measured: list[bool] = []

    def build(path: Path) -> None:
        batch = torch.tensor(segments, dtype=torch.int64)
        # Wanda's probes use statistics of the probe segments only: the profile is a
        # function of exactly what its key names.
        probe_stats = InputStats(model.module, batch, gram=False)
        profile = measure_profile(model.module, batch, probe_stats, options, progress)
        (path / "profile.json").write_text(json.dumps(profile, indent=1))
        measured.append(True)

    directory = cached_dir("luc-sensitivity", key, build)
    profile = json.loads((directory / "profile.json").read_text())
    return profile, "measured" if measured else "cache"


# ------------------------------------------------------------------------------ apply


def sparse_code_bytes(total: int, pruned: int, bits: int, pattern: str) -> int:
    """Bytes the codes would take stored sparse: N:M as the kept codes plus a position
    index of log2(M) bits each; otherwise the kept codes plus a one-bit-per-weight mask.
    (Stored dense, a pruned weight costs its code; compare with code_bytes.)"""
    kind, keep, group = parse_pattern(pattern)
    kept = total - pruned
    if kind == "nm":
        return kept * (bits + max(group - 1, 1).bit_length()) // 8
    return (kept * bits + total) // 8



def _storage_note(options: LucOptions, compress: tuple[int, int] | None, records: list[dict[str, Any]]) -> str:
    if compress is not None and any(r["compressed_linears"] for r in records):
        keep, span = compress
        return f"{keep}:{span} compressed where smaller: kept codes + {INDEX_WIDTH[span]}-bit positions; the rest dense"
    if parse_pattern(options.pattern)[0] == "nm" and options.sparse_storage == "auto":
        return "dense codes: N:M compressed storage is for TVM (ONNX's MatMulNBits has no sparse form) and saves nothing at 2 bits"
    return "dense codes: a pruned weight is its zero code (only N:M patterns have a compressed form)"


def _packed(
    weight: torch.Tensor, bits: int, options: LucOptions, sparsity: float,
    params: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> PackedWeight:
    offset = uses_offset(options, bits, weight.shape[1], sparsity)
    return quantize(weight, bits, options.group_size, options.symmetric, params, offset=offset)


class Luc:
    """Edge-LLM layer-wise unified compression: per-layer sparsity and bits from sensitivity."""

    name: ClassVar[str] = "luc"
    families: ClassVar[tuple[str, ...]] = (FAMILY_CAUSAL_LM,)
    Options: ClassVar[type[BaseModel]] = LucOptions
    summary: ClassVar[str] = "Edge-LLM layer-wise unified compression: per-layer pruning + packed low-bit weights"
    # Packed weights need a decode-in-matmul lowering: CPU targets have it, GPUs not yet.
    requires_ops: ClassVar[tuple[str, ...]] = ("packed_lowbit_matmul",)

    def __init__(self, options: BaseModel, overrides: Sequence[LayerOverride]) -> None:
        assert isinstance(options, LucOptions)
        self.options = options
        self.overrides = list(overrides)

    @staticmethod
    def weight_bits(options: BaseModel) -> set[int]:
        """The stored widths this configuration asks the backend for (checked before loading)."""
        assert isinstance(options, LucOptions)
        wanted = {b for b in options.bit_choices if b >= options.bits_floor}
        wanted |= {b for b in (options.embedding_bits, options.head_bits) if b is not None}
        return wanted

    def run(self, model: ModelHandle, ctx: PassContext) -> PassResult:
        root = model.module
        assert root is not None
        options = self.options
        if any(isinstance(m, (PackedLinear, PackedEmbedding)) for m in root.modules()):
            raise BadInputError("luc: the model is already compressed; list the pass once in the recipe")
        layers = decoder_layers(root)
        fixed = layer_overrides(self.overrides, len(layers))
        if options.size_bytes is not None:
            options = options.model_copy(update={"bits": bits_for_size(root, options, fixed)})
            if options.policy == "uniform":  # every layer the same bits: the most that fit
                fitting = [b for b in options.bit_choices if options.bits_floor <= b <= options.bits + 1e-9]
                options = options.model_copy(update={"bits": float(max(fitting))})
            self.options = options
        check_budget(options, fixed, len(layers))
        if ctx.calibration_ids is None:
            raise UnsupportedError("luc needs calibration data; run it through edgec compile")
        segments = ctx.calibration_ids()
        batch = torch.tensor(segments, dtype=torch.int64)
        before = unique_weight_bytes(root)
        ctx.progress(f"luc: calibration statistics over {batch.numel()} tokens")
        validation = options.validation_samples if options.quantizer == "best" else 0
        if validation and len(segments) <= validation:
            raise BadInputError(
                f"luc: quantizer best holds {validation} calibration segments out of the fit; "
                f"set calibration.samples above {validation} (it is {len(segments)}) or luc.quantizer to gptq or rtn"
            )
        stats = InputStats(root, batch, gram=options.pruning == "sparsegpt" or options.quantizer != "rtn", validation=validation)
        probes = segments[: options.probe_samples]
        # The uniform policy needs no sensitivity: it is the baseline LUC is compared with.
        key = profile_key(model, probes, options)
        profile, source = (None, "not measured (policy uniform)")
        if options.policy != "uniform":
            profile, source = cached_profile(model, probes, key, options, ctx.progress)
        plans = plan_layers(options, profile, fixed, len(layers))
        kind, keep, span = parse_pattern(options.pattern)
        compress = (keep, span) if kind == "nm" and options.sparse_storage == "auto" and ctx.recipe.backend == "tvm" else None
        records = self._apply(root, plans, stats, compress, ctx.progress)
        embed_record = self._compress_embeddings(root)
        after = unique_weight_bytes(root)
        achieved_bits = sum(p.bits for p in plans) / len(plans)
        achieved_sparsity = sum(r["measured_sparsity"] for r in records) / len(records)
        for record, row in zip(records, profile["layers"] if profile else []):
            record["sensitivity"] = {"bits": row["bits"], "sparsity": row["sparsity"]}
        return PassResult(
            changed=True,
            record={
                "policy": options.policy,
                "budget": {"bits": options.bits, "sparsity": options.sparsity, "size_bytes": options.size_bytes},
                "achieved": {"bits": round(achieved_bits, 4), "sparsity": round(achieved_sparsity, 4), "weight_bytes": after},
                "pruning": options.pruning,
                "pattern": options.pattern,
                "quantizer": options.quantizer,
                "group_size": options.group_size,
                "symmetric": options.symmetric,
                "offset": options.offset,
                "calibration": {"segments": len(segments), "tokens": batch.numel()},
                "sensitivity_profile": {
                    "measure": profile["measure"] if profile else None,
                    "dense_loss": profile["base_loss"] if profile else None,
                    "source": source,
                    "key": key,
                    "segments": len(probes),
                },
                "embeddings": embed_record,
                "weight_bytes_before": before,
                "weight_bytes_after": after,
                "sparsity_storage": {
                    "stored": _storage_note(options, compress, records),
                    "code_bytes": sum(r["code_bytes"] for r in records),
                    "code_bytes_if_sparse_stored": sum(r["code_bytes_if_sparse_stored"] for r in records),
                    "bytes_saved": sum(r["bytes_dense_storage"] - r["bytes"] for r in records),
                },
                "layers": records,
            },
        )

    def _apply(
        self,
        root: nn.Module,
        plans: list[LayerPlan],
        stats: InputStats,
        compress: tuple[int, int] | None,
        progress: Callable[[str], None],
    ) -> list[dict[str, Any]]:
        """`compress`: (N, M) to store N:M-pruned linears compressed where that is smaller."""
        options = self.options
        records: list[dict[str, Any]] = []
        names = {id(m): n for n, m in root.named_modules()}
        for number, (plan, layer) in enumerate(zip(plans, decoder_layers(root)), start=1):
            zeros = total = stored_bytes = dense_bytes = compensated = compressed = offset_grid = 0
            for _, linear in layer_linears(layer):
                name = names[id(linear)]
                weight, params, pruned = self._compress(linear.weight.detach().float(), name, plan, stats)
                zeros += int(pruned.sum())
                total += weight.numel()
                compensated += params is not None
                packed = _packed(weight, plan.bits, options, plan.sparsity, params)
                offset_grid += is_offset(packed.zeros)
                dense_bytes += packed.nbytes()
                if compress is not None and plan.sparsity > 0:
                    smaller = compress_nm(packed, *compress)
                    if smaller is not None and smaller.nbytes() < packed.nbytes():
                        packed = smaller
                        compressed += 1
                stored_bytes += packed.nbytes()
                set_submodule(root, name, PackedLinear(packed, linear.bias))
            records.append(
                {
                    "layer": plan.index,
                    "bits": plan.bits,
                    "sparsity": round(plan.sparsity, 4),
                    "measured_sparsity": round(zeros / total, 4),
                    "fixed_by_override": plan.fixed,
                    "gptq_linears": compensated,
                    "offset_grid_linears": offset_grid,
                    "parameters": total,
                    "bytes": stored_bytes,
                    "bytes_dense_storage": dense_bytes,
                    "compressed_linears": compressed,
                    "code_bytes": total * plan.bits // 8,
                    "code_bytes_if_sparse_stored": sparse_code_bytes(total, zeros, plan.bits, options.pattern),
                }
            )
            advance(progress, "luc: layers compressed", number, len(plans), f"{plan.bits} bits, sparsity {plan.sparsity:.2f}")
        return records

    def _compress(
        self, weight: torch.Tensor, name: str, plan: LayerPlan, stats: InputStats
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor]:
        """Prune, and with GPTQ also fix the quantization grid, of one linear's weight.
        Returns the weight, the (scale, zero) GPTQ chose (None: round to nearest) and the
        pruning mask (rounding to the zero code can zero more weights; they are not counted)."""
        options = self.options
        sparse = plan.sparsity > 0
        rounded: tuple[torch.Tensor, None, torch.Tensor] | None = None
        if options.quantizer in ("rtn", "best"):
            pruned = weight
            if sparse and options.pruning == "sparsegpt":
                pruned = sparsegpt(weight, stats.gram[name], plan.sparsity, options.pattern)
            elif sparse:
                pruned = wanda(weight, stats.sq_sum[name], plan.sparsity, options.pattern)
            rounded = (pruned, None, pruned == 0)
            if options.quantizer == "rtn":
                return rounded
        offset = uses_offset(options, plan.bits, weight.shape[1], plan.sparsity)
        quant = GroupQuant(plan.bits, options.group_size, options.symmetric, offset)
        if sparse and options.pruning == "wanda":
            mask = wanda(weight, stats.sq_sum[name], plan.sparsity, options.pattern) == 0
            result = obs_compress(weight, stats.gram[name], plan.sparsity, options.pattern, quant, fixed_mask=mask)
        else:
            result = obs_compress(weight, stats.gram[name], plan.sparsity if sparse else 0.0, options.pattern if sparse else "unstructured", quant)
        compensated = (result.weight, result.params, result.pruned)
        if rounded is None:
            return compensated
        # GPTQ fits the calibration inputs; where it over-fits them (wide inputs, few
        # tokens) plain rounding moves the output less on inputs it has not seen.
        gram = stats.gram_validation[name].double()
        rtn_weight = fake_quantize(rounded[0], plan.bits, options.group_size, options.symmetric, offset)

        def output_error(candidate: torch.Tensor) -> float:
            delta = (candidate - weight).double()
            return float(((delta @ gram) * delta).sum())

        return compensated if output_error(result.weight) < output_error(rtn_weight) else rounded

    def _compress_embeddings(self, root: nn.Module) -> dict[str, Any]:
        options = self.options
        tied = bool(getattr(root.config, "tie_word_embeddings", False))
        record: dict[str, Any] = {"tied": tied}
        layout = architecture_of(root).layout
        embedding = root.get_submodule(layout.embed)
        head = root.get_submodule(layout.head)
        assert isinstance(embedding, nn.Embedding) and isinstance(head, nn.Linear)
        head_bits = options.embedding_bits if options.head_bits is None else options.head_bits
        shared: PackedWeight | None = None
        if options.embedding_bits != FP32_BITS:
            shared = _packed(embedding.weight.detach().float(), options.embedding_bits, options, 0.0)
            set_submodule(root, layout.embed, PackedEmbedding(shared))
            record["embedding"] = {"bits": options.embedding_bits, "bytes": shared.nbytes()}
        else:
            record["embedding"] = {"bits": FP32_BITS, "bytes": embedding.weight.numel() * 4}
        if head_bits == FP32_BITS:
            record["lm_head"] = {"bits": FP32_BITS, "shared_with_embedding": tied}
            return record
        if tied and shared is not None and head_bits == options.embedding_bits:
            embed_module = root.get_submodule(layout.embed)
            assert isinstance(embed_module, PackedEmbedding)
            set_submodule(root, layout.head, PackedLinear(embed_module.packed, head.bias))
            record["lm_head"] = {"bits": head_bits, "shared_with_embedding": True}
        else:
            packed = _packed(head.weight.detach().float(), head_bits, options, 0.0)
            set_submodule(root, layout.head, PackedLinear(packed, head.bias))
            record["lm_head"] = {"bits": head_bits, "shared_with_embedding": False, "bytes": packed.nbytes()}
        return record

