"""Export entries of a decoder-only causal LM with an explicit KV cache.

Before: a Hugging Face ``LlamaForCausalLM`` whose forward hides its cache in
Python objects (DynamicCache) that neither exporter can carry across calls.
After: two plain tensor functions an application can drive from any runtime:

    prefill(input_ids[B, S])                      -> logits[B, S, V], k[L, B, KV, S, D], v[...]
    decode(input_ids[B, 1], past_k[L, B, KV, P, D], past_v) -> logits[B, 1, V], k[L, B, KV, P+1, D], v[...]

When attention calibration (ACT, `stat: causal`) is applied, the cache carries one more
tensor, the raw attention column sums of the calibrated heads, s[N, B, P]: prefill
returns it after v and decode takes it after past_v.

The forward is written out here from the model's own submodules rather than
by calling the HF layer forward, because (a) passes replace submodules
(``q_proj`` becomes a quantized linear, attention gets calibrated) and the
entries must pick those replacements up, and (b) the HF mask/cache code is
what breaks exporters (bool cumsum in TVM, cache objects in torch.export).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgec.sinks import SinkRule, calibrate

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("LlamaForCausalLM",)
# RoPE variants whose inverse frequencies are fixed at load time; "dynamic"
# and "longrope" change them with the sequence length, which a static graph
# cannot follow.
STATIC_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class LMShape:
    """What an application must know to allocate the KV cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int


def lm_shape(model: nn.Module, max_context: int) -> LMShape:
    config = model.config
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return LMShape(
        num_layers=int(config.num_hidden_layers),
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        vocab_size=int(config.vocab_size),
        max_context=max_context,
    )


def rope_type(config: object) -> str:
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        return str(scaling.get("rope_type", scaling.get("type", "default")))
    return "default"


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    # Squares overflow float16 beyond |x| = 256: normalise in float32 (a no-op for float32
    # models). Square by multiplying: TVM's CUDA codegen lowers pow to the fast __powf,
    # which is NaN for every negative base (measured on an H100: all outputs NaN).
    wide = x.float()
    variance = (wide * wide).mean(-1, keepdim=True)
    return norm.weight * (wide * torch.rsqrt(variance + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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


class CausalLMEntries(nn.Module):
    """Prefill and decode entries over the submodules of a Llama-family model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.num_heads = int(config.num_attention_heads)
        shape = lm_shape(model, int(config.max_position_embeddings))
        self.num_kv_heads = shape.num_kv_heads
        self.head_dim = shape.head_dim
        rotary = model.model.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().clone().float(), persistent=False)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        # The norms' dtype is the compute dtype (float16 after a half cast); the entries'
        # KV and logits stay float32 at the boundary, so applications and parity see one layout.
        self.compute_dtype = model.model.norm.weight.dtype
        # Offsets of each layer's calibrated heads in the carried column-sum state.
        self.state_offsets: dict[int, int] = {}
        self.state_heads = 0
        for index, layer in enumerate(model.model.layers):
            calibration = calibration_of(layer.self_attn)
            if calibration is not None and calibration.carries_state:
                self.state_offsets[index] = self.state_heads
                self.state_heads += len(calibration.heads)
        # Analysis hook: called with (layer, raw probabilities [B, H, Tq, Tk]) when set.
        self.observer: AttentionObserver | None = None

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scale).to(self.compute_dtype), (emb.sin() * self.rope_scale).to(self.compute_dtype)

    def _attention(
        self,
        layer_index: int,
        attn: nn.Module,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_k: torch.Tensor | None,
        past_v: torch.Tensor | None,
        past_sums: torch.Tensor | None,
        causal_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        batch, seq, _ = x.shape
        q = attn.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if past_k is not None and past_v is not None:
            k = torch.cat((past_k, k), dim=2)
            v = torch.cat((past_v, v), dim=2)
        groups = self.num_heads // self.num_kv_heads
        total = k.shape[2]
        # GQA: each KV head serves `groups` query heads; expand instead of copying weights.
        k_full = k[:, :, None].expand(batch, self.num_kv_heads, groups, total, self.head_dim)
        v_full = v[:, :, None].expand(batch, self.num_kv_heads, groups, total, self.head_dim)
        k_full = k_full.reshape(batch, self.num_heads, total, self.head_dim)
        v_full = v_full.reshape(batch, self.num_heads, total, self.head_dim)
        scores = torch.matmul(q, k_full.transpose(2, 3)) / math.sqrt(self.head_dim)
        if causal_mask is not None:
            scores = scores + causal_mask
        probs = attention_probs(scores)
        if self.observer is not None:
            self.observer(layer_index, probs)
        sums: torch.Tensor | None = None
        calibration = calibration_of(attn)
        # The paper's statistic needs every query of the sequence: prefill only.
        if calibration is not None and (calibration.carries_state or past_k is None):
            probs, sums = calibration(probs, past_sums)
        out = torch.matmul(probs, v_full).transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return attn.o_proj(out), k, v, sums if calibration is not None and calibration.carries_state else None

    def _positions(self, seq: int, past: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """RoPE tables for the new positions, and the causal mask when there is no cache
        (`past` None; a cache length is symbolic in an export and is never compared)."""
        dtype = self.compute_dtype
        positions = torch.arange(seq, dtype=torch.int64) + (0 if past is None else past)
        cos, sin = self._rope(positions)
        causal_mask: torch.Tensor | None = None
        if past is None:
            rows = torch.arange(seq, dtype=torch.int64)
            # A finite large negative keeps fully-masked arithmetic NaN-free in every runtime.
            causal_mask = (rows[None, :] > rows[:, None]).to(dtype) * (-1e9 if dtype == torch.float32 else -3e4)
        return cos, sin, causal_mask

    def _layer(
        self,
        index: int,
        h: torch.Tensor,
        tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        past_k: torch.Tensor | None = None,
        past_v: torch.Tensor | None = None,
        past_s: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        layer = self.model.model.layers[index]
        cos, sin, causal_mask = tables
        layer_s = None
        offset = self.state_offsets.get(index)
        if offset is not None and past_s is not None:
            calibration = calibration_of(layer.self_attn)
            assert calibration is not None
            layer_s = past_s[offset : offset + len(calibration.heads)].transpose(0, 1).to(h.dtype)
        attn_out, k, v, sums = self._attention(
            index, layer.self_attn, _rms_norm(layer.input_layernorm, h), cos, sin, past_k, past_v, layer_s, causal_mask
        )
        h = h + attn_out
        h = h + layer.mlp(_rms_norm(layer.post_attention_layernorm, h))
        return h, k, v, sums

    def _run(
        self,
        input_ids: torch.Tensor,
        past_k: torch.Tensor | None,
        past_v: torch.Tensor | None,
        past_s: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        inner = self.model.model
        dtype = self.compute_dtype
        if past_k is not None and past_v is not None and dtype != torch.float32:
            past_k, past_v = past_k.to(dtype), past_v.to(dtype)
        tables = self._positions(input_ids.shape[1], None if past_k is None else past_k.shape[3])
        h = inner.embed_tokens(input_ids)
        new_k: list[torch.Tensor] = []
        new_v: list[torch.Tensor] = []
        new_s: list[torch.Tensor] = []
        for index in range(len(inner.layers)):
            layer_k = None if past_k is None else past_k[index]
            layer_v = None if past_v is None else past_v[index]
            h, k, v, sums = self._layer(index, h, tables, layer_k, layer_v, past_s)
            new_k.append(k)
            new_v.append(v)
            if sums is not None:
                new_s.append(sums.transpose(0, 1))
        logits = self.model.lm_head(_rms_norm(inner.norm, h))
        outputs = [logits, torch.stack(new_k), torch.stack(new_v)]
        if new_s:
            outputs.append(torch.cat(new_s, dim=0))
        return tuple(t.float() for t in outputs) if dtype != torch.float32 else tuple(outputs)

    def layer_inputs(self, input_ids: torch.Tensor, layers: int) -> list[torch.Tensor]:
        """Hidden states entering layers 0..layers-1 (prefill): searches that change one
        layer restart from its input instead of re-running the layers before it."""
        tables = self._positions(input_ids.shape[1], None)
        h = self.model.model.embed_tokens(input_ids)
        states = [h]
        for index in range(layers - 1):
            h = self._layer(index, h, tables)[0]
            states.append(h)
        return states

    def final_hidden(self, h: torch.Tensor, start: int) -> torch.Tensor:
        """Run layers start..L-1 on their input `h` (prefill) and the final norm."""
        tables = self._positions(h.shape[1], None)
        for index in range(start, len(self.model.model.layers)):
            h = self._layer(index, h, tables)[0]
        return _rms_norm(self.model.model.norm, h)

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


# Runtime-agnostic steps: prefill(ids) -> (logits, *cache); decode(ids, *cache) -> (logits, *cache).
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
    """Greedy decoding over any runtime's prefill/decode callables (numpy in, numpy out)."""
    ids = np.asarray([prompt_ids], dtype=np.int64)
    logits, *cache = step_prefill(ids)
    generated: list[int] = []
    length = len(prompt_ids)
    while len(generated) < max_new_tokens and length < max_context:
        token = int(np.argmax(logits[0, -1]))
        generated.append(token)
        if eos_token_id is not None and token == eos_token_id:
            break
        logits, *cache = step_decode(np.asarray([[token]], dtype=np.int64), *cache)
        length += 1
    return generated

