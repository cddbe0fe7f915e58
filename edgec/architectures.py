"""Decoder-only architectures as data: what differs between Llama, Qwen, Mistral, Phi-3,
Gemma and GPT-2 is read from the config into an `Architecture`, and one forward
(edgec.lm) follows it. Nothing here copies a forward.

A config field the entries cannot follow (a RoPE variant that changes with length,
bidirectional attention, GPT-2's per-layer attention scaling) is refused by
`architecture_of` before any work, naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from edgec.errors import UnsupportedError

NormKind = Literal["rms", "rms_offset", "layer"]

# RoPE variants whose inverse frequencies are fixed at load time; "dynamic" and
# "longrope" change them with the sequence length, which a static graph cannot follow.
STATIC_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "yarn")

# Config fields an extracted subnet (edgec.subnet) carries: query and KV heads per layer,
# where width pruning left layers with different head counts.
LAYER_HEADS = "edgec_layer_heads"
LAYER_KV_HEADS = "edgec_layer_kv_heads"


@dataclass(frozen=True)
class Layout:
    """Where an architecture keeps its modules (dotted paths from the HF model)."""

    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    positions: str | None = None  # learned position table
    final_norm: str = "model.norm"
    head: str = "lm_head"
    attention: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    qkv: str | None = None  # one fused projection, split as [q | k | v]
    o: str = "o_proj"
    mlp: str = "mlp"
    # The MLP's input projections (their rows are its channels) and its output projection
    # (whose columns are); None: fused in a way width slicing does not follow (Phi-3).
    mlp_in: tuple[str, ...] | None = ("gate_proj", "up_proj")
    mlp_out: str = "down_proj"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    # Gemma's sandwich norms: on the attention output and around the MLP.
    post_attn_norm: str | None = None
    post_mlp_norm: str | None = None


LLAMA = Layout()
PHI3 = Layout(qkv="qkv_proj", mlp_in=None)
GEMMA = Layout(
    mlp_norm="pre_feedforward_layernorm",
    post_attn_norm="post_attention_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
)
GPT2 = Layout(
    layers="transformer.h",
    embed="transformer.wte",
    positions="transformer.wpe",
    final_norm="transformer.ln_f",
    attention="attn",
    qkv="c_attn",
    o="c_proj",
    mlp_in=("c_fc",),
    mlp_out="c_proj",
    attn_norm="ln_1",
    mlp_norm="ln_2",
)


@dataclass(frozen=True)
class Family:
    """Per HF class: its layout and norm; the rest comes from each checkpoint's config."""

    layout: Layout
    norm: NormKind
    qk_norm: bool = False
    # x sqrt(hidden) after the lookup (Gemma); Gemma 3's embedding module does it itself,
    # and the entries apply it only where the module in place (a pass may replace it) does not.
    scaled_embedding: bool = False


ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": Family(LLAMA, "rms"),
    "MistralForCausalLM": Family(LLAMA, "rms"),
    "Qwen2ForCausalLM": Family(LLAMA, "rms"),
    "Qwen3ForCausalLM": Family(LLAMA, "rms", qk_norm=True),
    "Phi3ForCausalLM": Family(PHI3, "rms"),
    "Gemma2ForCausalLM": Family(GEMMA, "rms_offset", scaled_embedding=True),
    "Gemma3ForCausalLM": Family(GEMMA, "rms_offset", qk_norm=True, scaled_embedding=True),
    "GPT2LMHeadModel": Family(GPT2, "layer"),
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(ARCHITECTURES)


@dataclass(frozen=True)
class RopeTable:
    """One RoPE frequency table: the submodule holding inv_freq, and which layers use it."""

    module: str
    layers: tuple[int, ...]


@dataclass(frozen=True)
class Architecture:
    """Everything the entries need to know that differs between architectures."""

    name: str
    layout: Layout
    norm: NormKind
    qk_norm: bool
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    embed_scale: float
    attn_scale: float
    attn_softcap: float | None
    final_softcap: float | None
    windows: tuple[int | None, ...]  # per layer: sliding window in tokens, None = full attention
    layer_heads: tuple[int, ...]  # per layer: query heads (num_heads unless a subnet sliced them)
    layer_kv_heads: tuple[int, ...]
    ropes: tuple[RopeTable, ...]  # empty: learned positions
    max_positions: int

    @property
    def ragged_kv(self) -> bool:
        """Layers keep different numbers of KV heads (a width-pruned subnet): the cache
        concatenates them along the heads axis instead of stacking layers."""
        return len(set(self.layer_kv_heads)) > 1

    def summary(self) -> dict[str, Any]:
        """What the manifest and `inspect` show of it."""
        windows = sorted({w for w in self.windows if w is not None})
        return {
            "norm": self.norm,
            "qk_norm": self.qk_norm,
            "positions": "learned" if not self.ropes else "rope",
            "fused_qkv": self.layout.qkv is not None,
            "sandwich_norms": self.layout.post_attn_norm is not None,
            "sliding_window_layers": [i for i, w in enumerate(self.windows) if w is not None],
            "sliding_windows": windows,
            "attn_softcap": self.attn_softcap,
            "final_softcap": self.final_softcap,
            "embed_scale": self.embed_scale,
        }


def rope_type(config: Any) -> str:
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        return str(scaling.get("rope_type", scaling.get("type", "default")))
    return "default"


def architecture_name(model: nn.Module) -> str:
    return type(model).__name__


def _refuse(name: str, field: str, value: Any, why: str) -> UnsupportedError:
    return UnsupportedError(f"{name}: config field {field}={value!r} is not supported: {why}")


def _windows(config: Any, name: str, layers: int) -> tuple[int | None, ...]:
    """Sliding windows per layer, from `layer_types` where the config has it (Qwen2/3,
    Gemma 2/3), else one `sliding_window` for every layer (Mistral, Phi-3)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        unknown = sorted({t for t in types if t not in ("sliding_attention", "full_attention")})
        if unknown:
            raise _refuse(name, "layer_types", unknown, "edgec lowers sliding_attention and full_attention layers")
        return tuple(int(window) if t == "sliding_attention" and window else None for t in types)
    return tuple(int(window) if window else None for _ in range(layers))


def check_config(name: str, config: Any) -> Family:
    """The architecture's family, if the config asks for nothing the entries cannot follow
    (called on the config alone, before any weights are read)."""
    family = ARCHITECTURES.get(name)
    if family is None:
        raise UnsupportedError(f"architecture '{name}' is not supported; edgec loads {', '.join(SUPPORTED_ARCHITECTURES)}")
    kind = rope_type(config)
    if family.layout.positions is None and kind not in STATIC_ROPE_TYPES:
        raise _refuse(name, "rope_scaling.rope_type", kind, f"it changes with sequence length; supported: {', '.join(STATIC_ROPE_TYPES)}")
    if getattr(config, "use_bidirectional_attention", False):
        raise _refuse(name, "use_bidirectional_attention", True, "the entries are causal")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise _refuse(name, "scale_attn_by_inverse_layer_idx", True, "edgec scales GPT-2 attention by 1/sqrt(head_dim) only")
    if getattr(config, "add_cross_attention", False):
        raise _refuse(name, "add_cross_attention", True, "edgec lowers decoder-only models")
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse(name, "is_encoder_decoder", True, "edgec lowers decoder-only models")
    _windows(config, name, int(config.num_hidden_layers))
    return family


def architecture_of(model: nn.Module) -> Architecture:
    """The data the entries follow for this HF causal LM; refuses what they cannot follow."""
    name = architecture_name(model)
    config = model.config
    family = check_config(name, config)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    layers = int(config.num_hidden_layers)
    if getattr(config, "query_pre_attn_scalar", None):
        attn_scale = float(config.query_pre_attn_scalar) ** -0.5
    elif getattr(config, "scale_attn_weights", True):
        attn_scale = 1.0 / math.sqrt(head_dim)
    else:
        attn_scale = 1.0
    windows = _windows(config, name, layers)
    ropes: tuple[RopeTable, ...] = ()
    if family.layout.positions is None:
        inner = family.layout.layers.rsplit(".", 1)[0]
        if hasattr(model.get_submodule(inner), "rotary_emb_local"):
            # Gemma 3: sliding layers use the local base frequency, full layers the global one.
            local = tuple(i for i, w in enumerate(windows) if w is not None)
            ropes = (
                RopeTable(f"{inner}.rotary_emb", tuple(i for i in range(layers) if i not in local)),
                RopeTable(f"{inner}.rotary_emb_local", local),
            )
        else:
            ropes = (RopeTable(f"{inner}.rotary_emb", tuple(range(layers))),)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    layer_heads = tuple(int(h) for h in getattr(config, LAYER_HEADS, None) or [heads] * layers)
    layer_kv_heads = tuple(int(h) for h in getattr(config, LAYER_KV_HEADS, None) or [kv_heads] * layers)
    if len(layer_heads) != layers or len(layer_kv_heads) != layers:
        raise _refuse(name, LAYER_HEADS, list(layer_heads), f"it must list one head count for each of the {layers} layers")
    return Architecture(
        name=name,
        layout=family.layout,
        norm=family.norm,
        qk_norm=family.qk_norm,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        embed_scale=math.sqrt(float(config.hidden_size)) if family.scaled_embedding else 1.0,
        attn_scale=attn_scale,
        attn_softcap=getattr(config, "attn_logit_softcapping", None),
        final_softcap=getattr(config, "final_logit_softcapping", None),
        windows=windows,
        layer_heads=layer_heads,
        layer_kv_heads=layer_kv_heads,
        ropes=ropes,
        max_positions=int(config.max_position_embeddings),
    )


def canonicalize(model: nn.Module) -> nn.Module:
    """Make the modules passes see uniform, in place and idempotently: GPT-2's Conv1D
    projections become nn.Linear (weights transposed once) and its GELU torch's. The
    HF forward still runs on the result (passes calibrate through it)."""
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        replacement: nn.Module | None = None
        if isinstance(module, Conv1D):
            weight = module.weight
            linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None)
            linear.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=weight.requires_grad)
            if module.bias is not None:
                linear.bias = module.bias
            replacement = linear
        elif type(module).__name__ == "NewGELUActivation":
            # GPT-2's tanh GELU computes pow(x, 3.0), which TVM's CUDA codegen turns into
            # __powf (NaN for negative x); torch's own tanh GELU is the same function.
            replacement = nn.GELU(approximate="tanh")
        if replacement is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
    return model
