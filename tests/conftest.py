"""Shared fixtures: tiny models built in code, and the cache kept out of the user's home."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

TINY_CONFIG = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)


def free_port() -> int:
    """A TCP port nothing listens on right now (servers started by tests bind to it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, what: str, process: subprocess.Popen[bytes] | None = None, timeout_s: float = 60.0) -> None:
    """Block until something accepts connections on 127.0.0.1:port; fail if `process` exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
                pytest.fail(f"{what} did not start listening on port {port}")
            time.sleep(0.2)


def make_tiny_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_CONFIG)).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama saved as an HF directory (GQA 4/2 heads, tied embeddings)."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_tiny_llama().save_pretrained(path, safe_serialization=True)
    return path


def pytest_configure(config: pytest.Config) -> None:
    # Tests share one cache (the converted SmolLM2 is 541 MB): the user's, unless CI says otherwise.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
