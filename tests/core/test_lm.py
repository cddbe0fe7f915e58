"""The explicit-KV-cache entries reproduce the Hugging Face model exactly."""

import numpy as np
import pytest
import torch

from edgec.lm import CausalLMEntries, greedy_generate
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
