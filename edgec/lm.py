"""Export entries of a decoder-only causal LM with an explicit KV cache.

Before: a Hugging Face decoder-only LM (Llama, Qwen, Mistral, Phi-3, Gemma, GPT-2:
edgec.architectures) whose forward hides its cache in Python objects (DynamicCache) that neither exporter can carry across calls.
After: two plain tensor functions an application can drive from any runtime:

    prefill(input_ids[B, S])                      -> logits[B, S, V], k[S, L, B, KV, D], v[...]
    decode(input_ids[B, 1], past_k[P, L, B, KV, D], past_v) -> logits[B, 1, V], k[1, L, B, KV, D], v[...]

k and v are position-major and hold only the positions the call added: the caller appends
them to its cache. A cache reserved for the whole context then grows in place, its filled
prefix a contiguous view that decode reads where it lies, so no step copies the cache.
A runtime that reads such a cache only through copies (ONNX Runtime: a transpose per
layer and step) gets the concatenated contract instead (`appended_cache=False`):

    decode(input_ids[B, 1], past_k[L, B, KV, P, D], past_v) -> logits, k[L, B, KV, P+1, D], v[...]

k and v cross the boundary in float32, or narrower (`cache_dtype`): float16, or int8 at
fixed scales per layer, KV head and channel measured on calibration text (`kv_scales`),
which the entries quantize k and v to and dequantize the cache with.

When attention calibration (ACT, `stat: causal`) is applied, the cache carries one more
tensor, the raw attention column sums of the calibrated heads, s[N, B, P]: prefill
returns it after v and decode takes it after past_v. Every step adds to every column, so
s is returned whole, not appended.

A width-pruned subnet (edgec.subnet) whose layers keep different numbers of KV heads
cannot stack its cache by layer: there k and v are [P, B, sum of KV heads, D] (concatenated:
[B, sum of KV heads, P, D]), each layer's heads one after the other (`CausalLMEntries.kv_offsets`).

A model with early exits (edgec.exits) votes: `logits` is the voted log-distribution and
a last output, exit_logits[E, B, S, V], holds each voting exit's own logits. Every layer
still runs (the cache stays complete); the exits only read hidden states.

The forward is written out here from the model's own submodules rather than
by calling the HF layer forward, because (a) passes replace submodules
(``q_proj`` becomes a quantized linear, attention gets calibrated) and the
entries must pick those replacements up, and (b) the HF mask/cache code is
what breaks exporters (bool cumsum in TVM, cache objects in torch.export).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgec.architectures import Architecture, architecture_of, canonicalize
from edgec.decode_attention import HEAD_DIM_MULTIPLE, decode_attention, dequantized
from edgec.exits import ExitHeads, exits_of, vote
from edgec.sinks import SinkRule, calibrate

@dataclass(frozen=True)
class LMShape:
    """What an application must know to allocate the KV cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int


def lm_shape(model: nn.Module, max_context: int) -> LMShape:
    arch = architecture_of(model)
    return LMShape(
        num_layers=arch.num_layers,
        num_kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        vocab_size=int(model.config.vocab_size),
        max_context=max_context,
    )


def _norm(kind: str, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The architecture's norm, computed from the module's parameters (a pass may have
    replaced anything around it). RMS norms compute in float32: squares overflow float16
    beyond |x| = 256 (a no-op for float32 models). Square by multiplying: TVM's CUDA
    codegen lowers pow to the fast __powf, which is NaN for every negative base."""
    if kind == "layer":
        return F.layer_norm(x, norm.weight.shape, norm.weight, norm.bias, float(norm.eps))
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    wide = x.float()
    normed = wide * torch.rsqrt((wide * wide).mean(-1, keepdim=True) + eps)
    if kind == "rms_offset":  # Gemma: scales by (1 + w), in float32, then casts
        return (normed * (1.0 + norm.weight.float())).to(x.dtype)
    return norm.weight * normed.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# An int8 cache's values: -127..127, symmetric around 0.
INT8_CACHE_LEVELS = 127


def _quantized(cache: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An appended cache's new positions in int8 at its fixed scales (dequantized's inverse)."""
    scaled = cache / (scale[:, None] if cache.dim() == 5 else scale).to(cache.dtype)
    return torch.clamp(torch.round(scaled), -INT8_CACHE_LEVELS, INT8_CACHE_LEVELS).to(torch.int8)


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


def attention_probs(scores: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores, dim=-1)


class AttentionCalibration(nn.Module):
    """ACT on some query heads of one layer: installed as ``self_attn.calibration`` by the
    act pass; the entries apply it to those heads' probabilities (edgec.sinks)."""

    def __init__(self, heads: list[int], num_heads: int, rule: SinkRule) -> None:
        super().__init__()
        self.heads = sorted(set(heads))
        self.num_heads = num_heads
        self.rule = rule

    @property
    def carries_state(self) -> bool:
        return self.rule.stat == "causal"

    def _runs(self) -> list[tuple[int, int, bool]]:
        """[start, stop) runs of consecutive heads, and whether the run is calibrated: both
        the pick and the put-back are slices and one concat (no gather in the graph)."""
        runs: list[tuple[int, int, bool]] = []
        for head in range(self.num_heads):
            chosen = head in self.heads
            if runs and runs[-1][2] == chosen and runs[-1][1] == head:
                runs[-1] = (runs[-1][0], head + 1, chosen)
            else:
                runs.append((head, head + 1, chosen))
        return runs

    def forward(self, probs: torch.Tensor, past_sums: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        runs = self._runs()
        chosen = [probs[:, start:stop] for start, stop, calibrated in runs if calibrated]
        picked = chosen[0] if len(chosen) == 1 else torch.cat(chosen, dim=1)
        calibrated_probs, sums = calibrate(picked, self.rule, past_sums)
        pieces: list[torch.Tensor] = []
        offset = 0
        for start, stop, calibrated in runs:
            if calibrated:
                pieces.append(calibrated_probs[:, offset : offset + stop - start])
                offset += stop - start
            else:
                pieces.append(probs[:, start:stop])
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)), sums


def calibration_of(attn: nn.Module) -> AttentionCalibration | None:
    found = getattr(attn, "calibration", None)
    return found if isinstance(found, AttentionCalibration) else None


AttentionObserver = Callable[[int, torch.Tensor], None]


@dataclass
class Tables:
    """Per-call position data: RoPE (cos, sin) per table, the mask per sliding window
    (None: full attention), and the absolute positions of the new tokens."""

    rope: list[tuple[torch.Tensor, torch.Tensor]]
    masks: dict[int | None, torch.Tensor | None]
    positions: torch.Tensor


class CausalLMEntries(nn.Module):
    """Prefill and decode entries over the submodules of a decoder-only causal LM whose
    architectural differences are data (edgec.architectures)."""

    def __init__(self, model: nn.Module, appended_cache: bool = True, cache_dtype: torch.dtype = torch.float32,
                 attention_op: bool = False, cache_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.model = canonicalize(model)
        self.appended_cache = appended_cache
        # A decode step's plain attention over an appended cache as one edgec::decode_attention
        # node, for backends with a kernel for it (Capability.attention_kernel).
        self.attention_op = attention_op and appended_cache
        # K and V between calls (the presents returned, the pasts taken); computed in compute_dtype.
        self.cache_dtype = cache_dtype
        # An int8 cache's fixed scales (kv_scales): k_scale, v_scale, the cache's shape
        # without its tokens and batch axes.
        if (cache_dtype == torch.int8) != (cache_scales is not None):
            raise ValueError("an int8 cache takes its scales (kv_scales), and only an int8 cache does")
        if cache_scales is not None and not appended_cache:
            raise ValueError("an int8 cache is an appended one (a concatenated cache would be requantized every step)")
        if cache_scales is not None:
            self.register_buffer("k_scale", cache_scales[0].detach().float().clone(), persistent=False)
            self.register_buffer("v_scale", cache_scales[1].detach().float().clone(), persistent=False)
        self.arch: Architecture = architecture_of(model)
        arch = self.arch
        self.num_heads = arch.num_heads
        self.num_kv_heads = arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.layers = model.get_submodule(arch.layout.layers)
        # Where each layer's heads start in a ragged cache (arch.ragged_kv).
        self.kv_offsets = [sum(arch.layer_kv_heads[:index]) for index in range(arch.num_layers + 1)]
        # One frequency table per RoPE module (Gemma 3 has a local and a global one).
        self.rope_of_layer: list[int] = [0] * arch.num_layers
        self.rope_scales: list[float] = []
        for index, table in enumerate(arch.ropes):
            rotary = model.get_submodule(table.module)
            self.register_buffer(f"inv_freq_{index}", rotary.inv_freq.detach().clone().float(), persistent=False)
            self.rope_scales.append(float(getattr(rotary, "attention_scaling", 1.0)))
            for layer in table.layers:
                self.rope_of_layer[layer] = index
        # The norms' dtype is the compute dtype (float16 after a half cast); the entries'
        # KV and logits stay float32 at the boundary, so applications and parity see one layout.
        self.compute_dtype = model.get_submodule(arch.layout.final_norm).weight.dtype
        # Offsets of each layer's calibrated heads in the carried column-sum state.
        self.state_offsets: dict[int, int] = {}
        self.state_heads = 0
        for index, layer in enumerate(self.layers):
            calibration = calibration_of(self.attention(layer))
            if calibration is not None and calibration.carries_state:
                self.state_offsets[index] = self.state_heads
                self.state_heads += len(calibration.heads)
        # Analysis hook: called with (layer, raw probabilities [B, H, Tq, Tk]) when set.
        self.observer: AttentionObserver | None = None
        self.exits: ExitHeads | None = exits_of(model)

    @property
    def cache_scales(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An int8 cache's (k_scale, v_scale) as the module holds them now (after any .to())."""
        return (self.k_scale, self.v_scale) if "k_scale" in self._buffers else None

    @property
    def cache_count(self) -> int:
        """Cache tensors after the logits in each entry's outputs (k, v[, s])."""
        return 3 if self.state_heads else 2

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.arch.layout.attention)

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _norm(self.arch.norm, norm, x)

    def _rope(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        tables = []
        for index, scale in enumerate(self.rope_scales):
            freqs = positions.float()[:, None] * getattr(self, f"inv_freq_{index}")[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            tables.append(((emb.cos() * scale).to(self.compute_dtype), (emb.sin() * scale).to(self.compute_dtype)))
        return tables

    def _apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rotary = cos.shape[-1]
        if rotary == self.head_dim:
            return x * cos + _rotate_half(x) * sin
        # Partial rotary (Phi): only the first `rotary` channels of each head turn.
        turned, kept = x[..., :rotary], x[..., rotary:]
        return torch.cat((turned * cos + _rotate_half(turned) * sin, kept), dim=-1)

    def _project(self, attn: nn.Module, x: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layout = self.arch.layout
        if layout.qkv is None:
            return getattr(attn, layout.q)(x), getattr(attn, layout.k)(x), getattr(attn, layout.v)(x)
        fused = getattr(attn, layout.qkv)(x)
        q_width = heads * self.head_dim
        kv_width = kv_heads * self.head_dim
        return fused[..., :q_width], fused[..., q_width : q_width + kv_width], fused[..., q_width + kv_width :]

    def _uses_attention_op(self, layer_index: int, seq: int, past: torch.Tensor | None) -> bool:
        """Whether this layer's attention in this call is one edgec::decode_attention node:
        one new position over an appended cache, plain softmax attention in float32 (no
        window mask, no soft-capping, no calibrated heads, no observer)."""
        return (self.attention_op and past is not None and seq == 1 and self.observer is None
                and self.compute_dtype == torch.float32 and self.head_dim % HEAD_DIM_MULTIPLE == 0
                and self.arch.windows[layer_index] is None
                and self.arch.attn_softcap is None and calibration_of(self.attention(self.layers[layer_index])) is None)

    def _attention(
        self,
        layer_index: int,
        attn: nn.Module,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        past_k: torch.Tensor | None,
        past_v: torch.Tensor | None,
        past_sums: torch.Tensor | None,
        mask: torch.Tensor | None,
        stored: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(output, the new positions' k and v [B, KV, S, D], the calibrated heads' sums).
        `stored`: the whole cache as passed in (past_k, past_v), for the attention op."""
        batch, seq, _ = x.shape
        heads, kv_heads = self.arch.layer_heads[layer_index], self.arch.layer_kv_heads[layer_index]
        q, k, v = self._project(attn, x, heads, kv_heads)
        q = q.view(batch, seq, heads, self.head_dim)
        k = k.view(batch, seq, kv_heads, self.head_dim)
        if self.arch.qk_norm:
            q, k = self._norm(attn.q_norm, q), self._norm(attn.k_norm, k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(batch, seq, kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = self._apply_rope(q, *rope), self._apply_rope(k, *rope)
        groups = heads // kv_heads
        past = 0 if past_k is None else past_k.shape[2]
        total = past + seq
        # GQA: each KV head serves `groups` query heads. A group's query heads meet their KV
        # head in one matmul that broadcasts K and V over the group instead of repeating them
        # per query head (TVM reads such broadcasts in place: targets/tvm_views).
        # Query head h is member h % groups of KV head h // groups, as in HF's repeat_kv.
        # With a cache, the past and the new keys are scored side by side and the values
        # summed in two parts: the cache is read where it lies, never copied onto the new
        # keys (that copy, per layer and step, was most of a long-context decode step).
        grouped_q = q.reshape(batch, kv_heads, groups, seq, self.head_dim)
        if stored is not None:
            # A stacked cache is indexed by layer, a ragged one by where the layer's heads start.
            ragged = self.arch.ragged_kv
            layer, head_offset = (0, self.kv_offsets[layer_index]) if ragged else (layer_index, 0)
            out = decode_attention(grouped_q[:, :, :, 0], k[:, :, 0], v[:, :, 0], *stored, layer, head_offset, float(self.arch.attn_scale),
                                   *(self.cache_scales or ()))
            out = out.reshape(batch, heads, 1, self.head_dim).transpose(1, 2).reshape(batch, 1, heads * self.head_dim)
            return getattr(attn, self.arch.layout.o)(out), k, v, None
        scores = torch.matmul(grouped_q, k[:, :, None].transpose(3, 4))
        if past_k is not None:
            scores = torch.cat((torch.matmul(grouped_q, past_k[:, :, None].transpose(3, 4)), scores), dim=-1)
        scores = _softcap(scores.view(batch, heads, seq, total) * self.arch.attn_scale, self.arch.attn_softcap)
        if mask is not None:
            scores = scores + mask
        probs = attention_probs(scores)
        if self.observer is not None:
            self.observer(layer_index, probs)
        sums: torch.Tensor | None = None
        calibration = calibration_of(attn)
        # The paper's statistic needs every query of the sequence: prefill only.
        if calibration is not None and (calibration.carries_state or past_k is None):
            probs, sums = calibration(probs, past_sums)
        grouped_probs = probs.reshape(batch, kv_heads, groups, seq, total)
        if past_v is None:
            out = torch.matmul(grouped_probs, v[:, :, None])
        else:
            # The new columns by index, not as the slice [past:]: TVM types that slice's
            # length (P + S) - P and then cannot prove it equals S.
            new_probs = grouped_probs.index_select(-1, torch.arange(seq, dtype=torch.int64) + past)
            # One new key (a decode step): a product, not a matmul whose reduction has extent 1,
            # which TVM's GPU GEMV schedule cannot take.
            new_out = new_probs * v[:, :, None] if seq == 1 else torch.matmul(new_probs, v[:, :, None])
            out = torch.matmul(grouped_probs[..., :past], past_v[:, :, None]) + new_out
        out = out.view(batch, heads, seq, self.head_dim).transpose(1, 2).reshape(batch, seq, heads * self.head_dim)
        return getattr(attn, self.arch.layout.o)(out), k, v, sums if calibration is not None and calibration.carries_state else None

    def _positions(self, seq: int, past: int | None) -> Tables:
        """RoPE tables for the new positions and the masks each layer needs. Without a
        cache (`past` None) every layer gets the causal mask; with one, only sliding
        layers get a mask (their window), built by tensor arithmetic on the cache length,
        which is symbolic in an export and is never compared in Python."""
        dtype = self.compute_dtype
        offset = 0 if past is None else past
        positions = torch.arange(seq, dtype=torch.int64) + offset
        # A finite large negative keeps fully-masked arithmetic NaN-free in every runtime.
        blocked = -1e9 if dtype == torch.float32 else -3e4
        keys = torch.arange(seq, dtype=torch.int64) if past is None else torch.arange(seq + offset, dtype=torch.int64)
        distance = positions[:, None] - keys[None, :]
        masks: dict[int | None, torch.Tensor | None] = {}
        for window in set(self.arch.windows):
            hidden = distance < 0 if past is None else None
            if window is not None:
                outside = distance >= window
                hidden = outside if hidden is None else hidden | outside
            masks[window] = None if hidden is None else hidden.to(dtype) * blocked
        return Tables(self._rope(positions) if self.arch.ropes else [], masks, positions)

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        layout = self.arch.layout
        embedding = self.model.get_submodule(layout.embed)
        h = embedding(input_ids)
        if self.arch.embed_scale != 1.0 and not hasattr(embedding, "embed_scale"):
            h = h * torch.tensor(self.arch.embed_scale, dtype=h.dtype)
        if layout.positions is not None:
            h = h + self.model.get_submodule(layout.positions)(positions)[None]
        return h

    def _layer(
        self,
        index: int,
        h: torch.Tensor,
        tables: Tables,
        past_k: torch.Tensor | None = None,
        past_v: torch.Tensor | None = None,
        past_s: torch.Tensor | None = None,
        stored: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        layout = self.arch.layout
        layer = self.layers[index]
        attn = self.attention(layer)
        layer_s = None
        offset = self.state_offsets.get(index)
        if offset is not None and past_s is not None:
            calibration = calibration_of(attn)
            assert calibration is not None
            layer_s = past_s[offset : offset + len(calibration.heads)].transpose(0, 1).to(h.dtype)
        rope = tables.rope[self.rope_of_layer[index]] if tables.rope else None
        mask = tables.masks[self.arch.windows[index]]
        x = self._norm(getattr(layer, layout.attn_norm), h)
        attn_out, k, v, sums = self._attention(index, attn, x, rope, past_k, past_v, layer_s, mask, stored)
        if layout.post_attn_norm is not None:
            attn_out = self._norm(getattr(layer, layout.post_attn_norm), attn_out)
        h = h + attn_out
        mlp_out = layer.mlp(self._norm(getattr(layer, layout.mlp_norm), h))
        if layout.post_mlp_norm is not None:
            mlp_out = self._norm(getattr(layer, layout.post_mlp_norm), mlp_out)
        return h + mlp_out, k, v, sums

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        normed = self._norm(self.model.get_submodule(self.arch.layout.final_norm), h)
        return _softcap(self.model.get_submodule(self.arch.layout.head)(normed), self.arch.final_softcap)

    def _run(
        self,
        input_ids: torch.Tensor,
        past_k: torch.Tensor | None,
        past_v: torch.Tensor | None,
        past_s: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        dtype = self.compute_dtype
        # The attention op reads the cache as it is stored (its kernel converts as it reads).
        by_op = [self._uses_attention_op(index, input_ids.shape[1], past_k) for index in range(len(self.layers))]
        stored = None if past_k is None or past_v is None else (past_k, past_v)
        scales = self.cache_scales or (None, None)
        if past_k is not None and past_v is not None and past_k.dtype != dtype and not all(by_op):
            past_k, past_v = dequantized(past_k, scales[0], dtype), dequantized(past_v, scales[1], dtype)
        ragged = self.arch.ragged_kv
        tables = self._positions(input_ids.shape[1], None if past_k is None else past_k.shape[self.tokens_axis])
        h = self._embed(input_ids, tables.positions)
        new_k: list[torch.Tensor] = []
        new_v: list[torch.Tensor] = []
        new_s: list[torch.Tensor] = []
        voting = [] if self.exits is None else self.exits.voting
        exit_logits: list[torch.Tensor] = []
        for index in range(len(self.layers)):
            if by_op[index]:
                h, k, v, sums = self._layer(index, h, tables, past_s=past_s, stored=stored)
            else:
                layer_k, layer_v = self._layer_cache(index, past_k), self._layer_cache(index, past_v)
                h, k, v, sums = self._layer(index, h, tables, layer_k, layer_v, past_s)
            new_k.append(k)
            new_v.append(v)
            if sums is not None:
                new_s.append(sums.transpose(0, 1))
            if index in voting:
                exit_logits.append(self.exit_logits(index, h).float())
        stacked = torch.stack(exit_logits) if exit_logits else None
        logits = self._logits(h) if stacked is None else vote(stacked)
        join = (lambda parts: torch.cat(parts, dim=1)) if ragged else torch.stack
        present_k, present_v = join(new_k), join(new_v)
        if self.appended_cache:
            # Only the new positions, position-major: [S, B, KV total, D] ragged, else [S, L, B, KV, D].
            order = (2, 0, 1, 3) if ragged else (3, 0, 1, 2, 4)
            present_k, present_v = present_k.permute(order), present_v.permute(order)
            if self.cache_scales is not None:
                present_k, present_v = (_quantized(t, scale) for t, scale in zip((present_k, present_v), self.cache_scales))
        elif past_k is not None and past_v is not None:
            # One copy of the cache per step, with the new positions appended.
            present_k = torch.cat((past_k, present_k), dim=self.tokens_axis)
            present_v = torch.cat((past_v, present_v), dim=self.tokens_axis)
        outputs = [logits, present_k, present_v]
        if new_s:
            outputs.append(torch.cat(new_s, dim=0))
        if stacked is not None:
            outputs.append(stacked)
        wanted = [torch.float32, self.cache_dtype, self.cache_dtype, *[torch.float32] * (len(outputs) - 3)]
        return tuple(t if t.dtype == want else t.to(want) for t, want in zip(outputs, wanted))

    @property
    def tokens_axis(self) -> int:
        """The cache's growing axis: first when appended, else after layers, batch and heads."""
        return 0 if self.appended_cache else 2 if self.arch.ragged_kv else 3

    def _layer_cache(self, index: int, past: torch.Tensor | None) -> torch.Tensor | None:
        """One layer's [B, KV, P, D] view of a stacked or ragged cache."""
        if past is None:
            return None
        heads = slice(self.kv_offsets[index], self.kv_offsets[index + 1])
        if not self.appended_cache:
            return past[:, heads] if self.arch.ragged_kv else past[index]
        return (past[:, :, heads] if self.arch.ragged_kv else past[:, index]).permute(1, 2, 0, 3)

    def exit_logits(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Logits of the exit after `layer` from the hidden state leaving it (the last
        layer's exit is the model's own head)."""
        if layer == len(self.layers) - 1:
            return self._logits(h)
        assert self.exits is not None
        head = self.exits.heads[str(layer)]
        normed = self._norm(head.norm, h)
        lm_head = self.model.get_submodule(self.arch.layout.head)
        return _softcap(lm_head(normed) + head.adapter(normed), self.arch.final_softcap)

    def exit_forward(self, input_ids: torch.Tensor, exit_layer: int, frozen_below: int = 0) -> torch.Tensor:
        """Logits at the exit after `exit_layer`, running layers 0..exit_layer only (the
        forward stops at the exit); layers below `frozen_below` run without autograd, so
        none of their activations are kept for a backward pass."""
        tables = self._positions(input_ids.shape[1], None)
        with torch.set_grad_enabled(torch.is_grad_enabled() and frozen_below == 0):
            h = self._embed(input_ids, tables.positions)
            for index in range(min(frozen_below, exit_layer + 1)):
                h = self._layer(index, h, tables)[0]
        for index in range(frozen_below, exit_layer + 1):
            h = self._layer(index, h, tables)[0]
        return self.exit_logits(exit_layer, h)

    def logits_through(self, input_ids: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """Prefill logits (no cache) running only `layers`, in order: how a subnet search
        scores a depth mask on the full model."""
        tables = self._positions(input_ids.shape[1], None)
        h = self._embed(input_ids, tables.positions)
        for index in layers:
            h = self._layer(index, h, tables)[0]
        return self._logits(h)

    def layer_inputs(self, input_ids: torch.Tensor, layers: int) -> list[torch.Tensor]:
        """Hidden states entering layers 0..layers-1 (prefill): searches that change one
        layer restart from its input instead of re-running the layers before it."""
        tables = self._positions(input_ids.shape[1], None)
        h = self._embed(input_ids, tables.positions)
        states = [h]
        for index in range(layers - 1):
            h = self._layer(index, h, tables)[0]
            states.append(h)
        return states

    def final_hidden(self, h: torch.Tensor, start: int) -> torch.Tensor:
        """Run layers start..L-1 on their input `h` (prefill) and the final norm."""
        tables = self._positions(h.shape[1], None)
        for index in range(start, len(self.layers)):
            h = self._layer(index, h, tables)[0]
        return self._norm(self.model.get_submodule(self.arch.layout.final_norm), h)

    def head(self, normed: torch.Tensor) -> torch.Tensor:
        """Logits from final_hidden's output (the output head and any soft-capping)."""
        return _softcap(self.model.get_submodule(self.arch.layout.head)(normed), self.arch.final_softcap)

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """logits, k, v (and s when calibrated heads carry state)."""
        return self._run(input_ids, None, None, None)

    def decode(
        self, input_ids: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, past_s: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        if (past_s is None) != (self.state_heads == 0):
            raise ValueError(f"decode takes past_s exactly when calibrated heads carry state ({self.state_heads} here)")
        return self._run(input_ids, past_k, past_v, past_s)


class PrefillEntry(nn.Module):
    def __init__(self, entries: CausalLMEntries) -> None:
        super().__init__()
        self.entries = entries

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.entries.prefill(input_ids)


class DecodeEntry(nn.Module):
    def __init__(self, entries: CausalLMEntries) -> None:
        super().__init__()
        self.entries = entries

    def forward(
        self, input_ids: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, past_s: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        return self.entries.decode(input_ids, past_k, past_v, past_s)


# Runtime-agnostic steps: prefill(ids) -> (logits, k, v[, s]); decode(ids, *cache) -> (logits, new k, new v[, s]).
PrefillFn = Callable[[np.ndarray], tuple[np.ndarray, ...]]
DecodeFn = Callable[..., tuple[np.ndarray, ...]]


def greedy_generate(
    step_prefill: PrefillFn,
    step_decode: DecodeFn,
    prompt_ids: list[int],
    max_new_tokens: int,
    max_context: int,
    eos_token_id: int | None,
) -> list[int]:
    """Greedy decoding over any runtime's prefill/decode callables (numpy in, numpy out) of
    entries with an appended cache (the default; a runner of any artifact: Generation)."""
    ids = np.asarray([prompt_ids], dtype=np.int64)
    logits, *cache = step_prefill(ids)
    generated: list[int] = []
    length = len(prompt_ids)
    while len(generated) < max_new_tokens and length < max_context:
        token = int(np.argmax(logits[0, -1]))
        generated.append(token)
        if eos_token_id is not None and token == eos_token_id:
            break
        logits, *returned = step_decode(np.asarray([[token]], dtype=np.int64), *cache)
        # k and v gain the new positions; s (calibrated heads' sums) comes back whole.
        cache = [np.concatenate((old, new), axis=0) if role < 2 else new for role, (old, new) in enumerate(zip(cache, returned))]
        length += 1
    return generated


def kv_scales(entries: CausalLMEntries, segments: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed scales of an int8 KV cache (`cache_dtype=int8`): per layer, KV head and channel
    (stacked [L, KV, D], ragged [KV total, D]), each the largest |value| the prefill of the
    calibration `segments` puts there, over INT8_CACHE_LEVELS. A value beyond it is clipped.

    Keys share a scale across each rotary pair (channels i and i + rotary/2): RoPE turns
    the pair by an angle that grows with the position, so a pair that turns slowly has only
    shown part of its circle in short segments. Fixed channels are what K's outliers are
    (KIVI quantizes keys per channel for that reason); one scale per channel also keeps the
    kernel's dequantization a vector multiply, with no scale per position to read."""
    if not entries.appended_cache or entries.cache_dtype != torch.float32:
        raise ValueError("kv_scales measures a float32 appended cache")

    def peak(cache: torch.Tensor) -> torch.Tensor:  # appended: [S, L, B, KV, D] stacked, [S, B, KV total, D] ragged
        return cache.abs().amax(dim=(0, 2) if cache.dim() == 5 else (0, 1))

    with torch.no_grad():
        peaks = [entries.prefill(torch.tensor([segment], dtype=torch.int64))[1:3] for segment in segments]
    k_peak = torch.stack([peak(k) for k, _ in peaks]).amax(dim=0)
    v_peak = torch.stack([peak(v) for _, v in peaks]).amax(dim=0)
    rotary = entries._rope(torch.zeros(1, dtype=torch.int64))[0][0].shape[-1] if entries.arch.ropes else 0
    half = rotary // 2
    if half:
        paired = torch.maximum(k_peak[..., :half], k_peak[..., half:rotary])
        k_peak = torch.cat((paired, paired, k_peak[..., rotary:]), dim=-1)
    tiny = torch.tensor(1e-8)
    return torch.maximum(k_peak, tiny) / INT8_CACHE_LEVELS, torch.maximum(v_peak, tiny) / INT8_CACHE_LEVELS
