"""`edgec run` for causal LMs: greedy generation in the artifact's own runtime with the
tokenizer it carries, driven by the manifest's generate program."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgec.artifact import load_tokenizer
from edgec.errors import BadInputError
from edgec.targets.runtime import Generation


def generate_text(root: Path, manifest: dict[str, Any], runtime: Any, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    program = manifest["program"]
    tokenizer = load_tokenizer(root, manifest)
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    if not prompt_ids:
        raise BadInputError("--prompt is empty after tokenization; give some text to continue")
    if len(prompt_ids) >= program["max_context"]:
        raise BadInputError(f"--prompt is {len(prompt_ids)} tokens; this artifact's maximum context is {program['max_context']}")
    generation = Generation(program)
    seconds = {generation.prefill: 0.0, generation.decode: 0.0}
    decode_steps = 0

    def run(entry: str, args: list[Any]) -> list[np.ndarray]:
        nonlocal decode_steps
        start = time.perf_counter()
        outputs = runtime.run(entry, args, native=True)  # the cache stays in the runtime between steps
        seconds[entry] += time.perf_counter() - start
        decode_steps += entry == generation.decode
        return outputs

    tokens = generation.greedy(run, prompt_ids, max_new_tokens, program.get("eos_token_id"))
    decode_s = seconds[generation.decode]
    return {
        "artifact": str(root),
        "backend": manifest["backend"],
        "prompt_tokens": len(prompt_ids),
        "new_tokens": len(tokens),
        "tokens": tokens,
        "text": tokenizer.decode(tokens, skip_special_tokens=True),
        "prefill_ms": seconds[generation.prefill] * 1e3,
        "decode_tokens_per_s": decode_steps / decode_s if decode_s > 0 else 0.0,
    }
