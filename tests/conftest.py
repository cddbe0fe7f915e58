"""Shared fixtures: tiny models built in code, and the cache kept out of the user's home."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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


def parallel_bodies(listing: str) -> str:
    """The parallel tasks' code in an x86 assembly listing of a TVM build: the functions
    TVM outlines for `T.parallel` loops (`.L__tvm_parallel_lambda*`), each up to its end label."""
    return "\n".join(re.findall(r"^\.L__tvm_parallel_lambda[^:\n]*:\n(.*?)^\.Lfunc_end", listing, flags=re.M | re.S))


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


@contextlib.contextmanager
def host_rpc_server(key: str | None = None) -> Iterator[str]:
    """A stock TVM RPC server on loopback (this host as a device); yields its rpc:// URI."""
    port = free_port()
    command = [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)]
    process = subprocess.Popen(
        command + (["--key", key] if key else []), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for_port(port, "the stock RPC server", process)
        yield f"rpc://127.0.0.1:{port}?{f'key={key}&' if key else ''}arch=x86_64"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def dense_perplexity(tokens: int, window: int) -> float:
    """zoo:tiny-lm's own held-out perplexity (torch) over the same tokens and windows: the
    bound a compressed artifact's figure is judged by."""
    import json

    from typer.testing import CliRunner

    from edgec.cli import app

    result = CliRunner().invoke(app, ["eval", "zoo:tiny-lm", "--task", "ppl", "--tokens", str(tokens), "--window", str(window), "--json"])
    assert result.exit_code == 0, result.output
    return float(json.loads(result.stdout)["perplexity"])


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


# Token ids that every head of layer 0 attends to from any query: planted attention sinks.
SINK_TOKEN = 7
SINK_POSITIONS = (3, 9)


def make_planted_sink_llama() -> torch.nn.Module:
    """The tiny Llama with attention sinks planted in layer 0: every token's embedding has
    a constant channel that each query head reads, and SINK_TOKEN's has a channel each
    key head maps onto the same direction, in the lowest-frequency RoPE pair so position
    barely rotates it. Wherever SINK_TOKEN sits, every query attends to it."""
    model = make_tiny_llama(seed=1)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    slow_dim = head_dim // 2 - 1  # RoPE pairs (i, i + head_dim/2); the last i turns slowest
    constant, marker = 0, 1
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, constant] = 1.0
        embed[SINK_TOKEN, marker] = 1.0
        attn = model.model.layers[0].self_attn
        for head in range(config.num_attention_heads):
            attn.q_proj.weight[head * head_dim + slow_dim, constant] = 0.45
        for group in range(config.num_key_value_heads):
            attn.k_proj.weight[group * head_dim + slow_dim, marker] = 0.45
    return model


def planted_prompt(length: int = 14) -> list[int]:
    """Token ids with SINK_TOKEN at SINK_POSITIONS and nowhere else."""
    ids = [(11 * i + 20) % 120 + 8 for i in range(length)]
    for position in SINK_POSITIONS:
        ids[position] = SINK_TOKEN
    return ids


@pytest.fixture(scope="session")
def planted_sink_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "planted-sinks"
    make_planted_sink_llama().save_pretrained(path, safe_serialization=True)
    return path


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def test_run_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache for the whole test run (the device root file system, converted zoo models,
    tuning records), never the user's: what a test leaves there cannot leak into their builds,
    and what they have cached cannot make a test pass."""
    cache = tmp_path_factory.getbasetemp() / "edgec-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEC_CACHE_DIR", str(cache))
        yield cache


# A cheap LUC (uniform 4 bits, round to nearest) for tests that tune a compressed model.
CHEAP_LUC = """
calibration: {samples: 6, seq_len: 64}
passes:
  - name: luc
    options: {policy: uniform, bits: 4, sparsity: 0.3, bit_choices: [4], group_size: 32, quantizer: rtn, probe_samples: 2, validation_samples: 2}
"""


def edge_llm_tuned(root: Path, stride: int = 3, recipe: str | None = None) -> Path:
    """zoo:tiny-lm after a 2-step-per-exit `finetune --method edge-llm` (seconds): a model
    directory with exit heads, and adapters merged (or, with a compressing `recipe`, kept
    beside the passes' output). It exercises the command; it is not a trained model (no
    test trains one)."""
    from edgec.finetune import finetune
    from edgec.passes import options_for
    from edgec.recipe import load_recipe

    path = None
    if recipe is not None:
        path = root / "recipe.yaml"
        path.write_text(recipe)
    sets = ["finetune.steps=2", "finetune.batch=2", "finetune.seq_len=32", f"finetune.options.stride={stride}"]
    out = root / "tuned"
    finetune("zoo:tiny-lm", "edge-llm", load_recipe(path, sets, options_for), out, resume=False, force=False, progress=lambda _m: None)
    return out


def planted_exits_dir(root: Path) -> Path:
    """The 2-layer tiny Llama with an exit after each layer whose head adapter is planted
    (random, so the early exit's logits differ from lm_head's): a voting model in seconds."""
    from edgec.exits import ExitConfig, attach, detach, save_exits

    model = make_tiny_llama()
    heads = attach(model, ExitConfig(layers=[0, 1], stride=1, rank=4, alpha=8.0))
    generator = torch.Generator().manual_seed(3)
    for head in heads.heads.values():
        head.up.data.normal_(0.0, 0.5, generator=generator)
    detach(model)
    out = root / "planted-exits"
    model.save_pretrained(out, safe_serialization=True)
    save_exits(heads, out)
    return out
