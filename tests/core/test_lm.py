"""The explicit-KV-cache entries reproduce the Hugging Face model exactly."""

import numpy as np
import pytest
import torch

from edgec.decode_attention import dequantized
from edgec.lm import CausalLMEntries, greedy_generate, kv_scales
from tests.conftest import make_tiny_llama


def test_prefill_and_decode_match_transformers() -> None:
    model = make_tiny_llama()
    entries = CausalLMEntries(model).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
        logits, k, v = entries.prefill(ids[:, :11])
        step, k2, v2 = entries.decode(ids[:, 11:], k, v)
    # Position-major, and decode returns only the position it added.
    assert k.shape == (11, 2, 2, 2, 16) and k2.shape == (1, 2, 2, 2, 16)
    # The new position's keys are those a prefill of all 12 tokens computes for it.
    with torch.no_grad():
        _, k_all, v_all = entries.prefill(ids)
    torch.testing.assert_close(k2, k_all[11:], atol=1e-5, rtol=0)
    torch.testing.assert_close(v2, v_all[11:], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, reference[:, :11], atol=1e-5, rtol=0)
    torch.testing.assert_close(step, reference[:, 11:], atol=1e-5, rtol=0)


def test_greedy_generate_matches_transformers_generate() -> None:
    model = make_tiny_llama(seed=3)
    entries = CausalLMEntries(model).eval()
    prompt = [5, 17, 99, 3]

    def prefill(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with torch.no_grad():
            return tuple(t.numpy() for t in entries.prefill(torch.from_numpy(ids)))  # type: ignore[return-value]

    def decode(ids: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with torch.no_grad():
            out = entries.decode(torch.from_numpy(ids), torch.from_numpy(k), torch.from_numpy(v))
        return tuple(t.numpy() for t in out)  # type: ignore[return-value]

    ours = greedy_generate(prefill, decode, prompt, max_new_tokens=10, max_context=64, eos_token_id=None)
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert ours == theirs[0, len(prompt) :].tolist()


@pytest.mark.parametrize("length", [1, 7])
def test_generation_stops_at_max_context(length: int) -> None:
    calls = []

    def prefill(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.zeros((1, ids.shape[1], 4)), np.zeros(1), np.zeros(1)

    def decode(ids: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        calls.append(ids)
        return np.zeros((1, 1, 4)), k[:1], v[:1]

    tokens = greedy_generate(prefill, decode, [1] * length, max_new_tokens=100, max_context=8, eos_token_id=None)
    assert len(tokens) == 8 - length


def test_an_int8_cache_holds_k_and_v_within_half_a_level_and_decodes_like_float32() -> None:
    model = make_tiny_llama(seed=2)
    full = CausalLMEntries(model).eval()
    generator = torch.Generator().manual_seed(4)
    segments = [torch.randint(0, 128, (24,), generator=generator).tolist() for _ in range(3)]
    k_scale, v_scale = kv_scales(full, segments)
    # Stacked: [layers, KV heads, head dim]; a key's rotary pair (i, i + 8) shares its scale.
    assert k_scale.shape == v_scale.shape == (2, 2, 16)
    torch.testing.assert_close(k_scale[..., :8], k_scale[..., 8:], atol=0, rtol=0)
    assert not torch.equal(v_scale[..., :8], v_scale[..., 8:])
    quantized = CausalLMEntries(model, cache_dtype=torch.int8, cache_scales=(k_scale, v_scale)).eval()
    ids = torch.tensor([segments[0]])
    with torch.no_grad():
        logits, k, v = full.prefill(ids[:, :-1])
        logits8, k8, v8 = quantized.prefill(ids[:, :-1])
        torch.testing.assert_close(logits8, logits, atol=0, rtol=0)  # a prefill never reads its cache
        assert k8.dtype == v8.dtype == torch.int8 and int(k8.abs().max()) == 127  # the calibration text's peak
        for cache, cache8, scale in ((k, k8, k_scale), (v, v8, v_scale)):
            error = (dequantized(cache8, scale, torch.float32) - cache).abs()
            assert bool((error <= scale[:, None] / 2 + 1e-6).all()), float(error.max())
        step = full.decode(ids[:, -1:], k, v)[0]
        step8 = quantized.decode(ids[:, -1:], k8, v8)[0]
    spread = float(step.max() - step.min())
    assert float((step8 - step).abs().max()) < 0.02 * spread
    assert float((step8 - step).abs().max()) > 0  # the int8 cache was read, not the float one
