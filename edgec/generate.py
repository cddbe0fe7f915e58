"""`edgec run`: greedy generation from a causal-LM artifact in its own runtime."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgec.artifact import open_runtime, read_manifest, tokenizer_dir
from edgec.errors import BadInputError
from edgec.lm import greedy_generate


def generate_from_artifact(root: Path, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    manifest = read_manifest(root)
    if "lm" not in manifest or manifest.get("tokenizer") is None:
        raise BadInputError(f"{root}: not a causal-LM artifact with a tokenizer; `edgec run` generates text only")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir(root, manifest)))
    lm = manifest["lm"]
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    if not prompt_ids:
        raise BadInputError("--prompt is empty after tokenization; give some text to continue")
    if len(prompt_ids) >= lm["max_context"]:
        raise BadInputError(
            f"--prompt is {len(prompt_ids)} tokens; this artifact's maximum context is {lm['max_context']}"
        )
    runtime = open_runtime(root, manifest)
    timings: dict[str, float] = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0}

    def prefill(ids: np.ndarray) -> tuple[np.ndarray, ...]:
        start = time.perf_counter()
        outputs = runtime.run("prefill", [ids])
        timings["prefill_s"] += time.perf_counter() - start
        return tuple(outputs)

    def decode(ids: np.ndarray, *cache: np.ndarray) -> tuple[np.ndarray, ...]:
        start = time.perf_counter()
        outputs = runtime.run("decode", [ids, *cache])
        timings["decode_s"] += time.perf_counter() - start
        timings["decode_steps"] += 1
        return tuple(outputs)

    tokens = greedy_generate(prefill, decode, prompt_ids, max_new_tokens, lm["max_context"], lm.get("eos_token_id"))
    steps = int(timings["decode_steps"])
    return {
        "artifact": str(root),
        "backend": manifest["backend"],
        "prompt_tokens": len(prompt_ids),
        "new_tokens": len(tokens),
        "tokens": tokens,
        "text": tokenizer.decode(tokens, skip_special_tokens=True),
        "prefill_ms": timings["prefill_s"] * 1e3,
        "decode_tokens_per_s": steps / timings["decode_s"] if timings["decode_s"] > 0 else 0.0,
    }
