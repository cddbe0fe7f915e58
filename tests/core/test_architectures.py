"""Every supported decoder architecture, as a tiny random model: edgec's entries (one
forward driven by edgec.architectures data) match the Hugging Face forward for prefill
and for several decode steps, sliding windows and soft-capping included."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from edgec.architectures import SUPPORTED_ARCHITECTURES, architecture_of
from edgec.errors import UnsupportedError
from edgec.lm import CausalLMEntries

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
# Windows of 4 tokens: the test sequences (12) are longer, so the windows bind.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "LlamaForCausalLM": ("LlamaConfig", COMMON),
    "Qwen2ForCausalLM": ("Qwen2Config", COMMON),  # q/k/v biases
    "Qwen3ForCausalLM": ("Qwen3Config", {**COMMON, "head_dim": 16}),  # QK-norm
    "MistralForCausalLM": ("MistralConfig", {**COMMON, "sliding_window": 4, "tie_word_embeddings": False}),
    "Phi3ForCausalLM": ("Phi3Config", {**COMMON, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                                       "partial_rotary_factor": 0.5, "tie_word_embeddings": False}),
    "Gemma2ForCausalLM": ("Gemma2Config", {**COMMON, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4,
                                           "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0}),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", {**COMMON, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4,
                                               "layer_types": ["sliding_attention", "full_attention"],
                                               "rope_local_base_freq": 100.0}),
    "GPT2LMHeadModel": ("GPT2Config", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)),
}


def make_model(architecture: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random model of `architecture` with the eager attention HF compares best with.
    Norm weights are randomised too (HF initialises them to 1 or 0, which hides a wrong norm)."""
    import transformers

    config_class, settings = CONFIGS[architecture]
    config = getattr(transformers, config_class)(**{**settings, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    return model


def test_every_supported_architecture_has_a_tiny_model() -> None:
    assert set(CONFIGS) == set(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("appended", [True, False], ids=["appended", "concatenated"])
@pytest.mark.parametrize("architecture", list(CONFIGS))
def test_prefill_and_decode_steps_match_transformers(architecture: str, appended: bool) -> None:
    model = make_model(architecture)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
        entries = CausalLMEntries(model, appended_cache=appended).eval()
        logits, k, v = entries.prefill(ids[:, :8])
        steps = [logits]
        for position in range(8, 12):
            step, new_k, new_v = entries.decode(ids[:, position : position + 1], k, v)
            if appended:  # only the new position, which the caller appends
                assert new_k.shape[0] == 1
                new_k, new_v = torch.cat((k, new_k)), torch.cat((v, new_v))
            k, v = new_k, new_v
            steps.append(step)
    layout = (12, 2, 2, entries.num_kv_heads, entries.head_dim) if appended else (2, 2, entries.num_kv_heads, 12, entries.head_dim)
    assert k.shape == layout
    torch.testing.assert_close(torch.cat(steps, dim=1), reference, atol=2e-5, rtol=0)


def test_architecture_data_is_read_from_the_config() -> None:
    gemma3 = architecture_of(make_model("Gemma3ForCausalLM"))
    assert gemma3.windows == (4, None) and gemma3.qk_norm and gemma3.norm == "rms_offset"
    assert [t.layers for t in gemma3.ropes] == [(1,), (0,)] and gemma3.attn_scale == 0.25 and gemma3.embed_scale == 8.0
    gpt2 = architecture_of(make_model("GPT2LMHeadModel"))
    assert gpt2.ropes == () and gpt2.norm == "layer" and gpt2.layout.qkv == "c_attn"
    assert architecture_of(make_model("Gemma2ForCausalLM")).attn_softcap == 5.0
    assert architecture_of(make_model("MistralForCausalLM")).windows == (4, 4)
    assert architecture_of(make_model("LlamaForCausalLM")).windows == (None, None)


def test_gpt2_conv1d_weights_become_linear_layers() -> None:
    model = make_model("GPT2LMHeadModel")
    CausalLMEntries(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert "transformer.h.0.attn.c_attn" in linears and "transformer.h.1.mlp.c_proj" in linears
    assert model.transformer.h[0].attn.c_attn.weight.shape == (192, 64)


@pytest.mark.parametrize(
    ("architecture", "overrides", "field"),
    [
        ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
        ("GPT2LMHeadModel", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ("Gemma3ForCausalLM", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ],
)
def test_a_config_the_entries_cannot_follow_is_refused_naming_the_field(architecture: str, overrides: dict, field: str) -> None:
    with pytest.raises(UnsupportedError, match=f"config field {field}="):
        architecture_of(make_model(architecture, **overrides))
