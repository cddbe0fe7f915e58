"""Perplexity of a causal LM (torch) or of a compiled artifact (in its runtime).

The token stream is cut into non-overlapping windows; each window starts with
BOS (as the models saw in training) and every token of the stream is predicted
exactly once. Bits per byte = total NLL in bits / UTF-8 bytes of the scored
text, which compares across tokenizers; per-token perplexity does not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import BadInputError
from edgec.progress import advance

LogitsFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class PerplexityResult:
    task: str
    data: str
    tokens: int
    bytes: int
    window: int
    nll_per_token: float
    perplexity: float
    bits_per_byte: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def evaluation_ids(tokenizer: Any, data: str, n_tokens: int) -> tuple[list[int], str]:
    """Token ids to score: the built-in held-out slice, or the first n_tokens of a text file."""
    if data == "held-out":
        from edgec.data import held_out_slice

        return held_out_slice(tokenizer, n_tokens), "built-in held-out slice"
    from edgec.data import read_user_text

    path = Path(data).expanduser()
    text = read_user_text(path, f"--data {data}", "'held-out'")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:n_tokens]
    if len(ids) < 2:
        raise BadInputError(f"--data {data}: fewer than 2 tokens of text to score")
    return ids, str(path)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def score_windows(ids: list[int], tokenizer: Any, window: int) -> list[list[int]]:
    """The windows to run: each starts with BOS (when the tokenizer has one), and every
    token of `ids` is predicted exactly once."""
    bos = getattr(tokenizer, "bos_token_id", None)
    step = window - 1 if bos is not None else window
    prefix = [bos] if bos is not None else []
    windows = [prefix + ids[i : i + step] for i in range(0, len(ids), step)]
    return [tokens for tokens in windows if len(tokens) >= 2]


def window_nll(logits: np.ndarray, tokens: list[int]) -> float:
    """Summed negative log-likelihood of tokens[1:] given logits [len(tokens), vocab]."""
    log_probs = _log_softmax(logits[:-1].astype(np.float64))
    targets = np.asarray(tokens[1:])
    return -float(log_probs[np.arange(len(targets)), targets].sum())


# Summed NLL per window, in order; `progress` gets a line now and then.
WindowsNllFn = Callable[[list[list[int]], Callable[[str], None]], list[float]]


def logits_nll_fn(logits_fn: LogitsFn) -> WindowsNllFn:
    def run(windows: list[list[int]], progress: Callable[[str], None]) -> list[float]:
        nlls = []
        for number, tokens in enumerate(windows, start=1):
            nlls.append(window_nll(logits_fn(np.asarray([tokens], dtype=np.int64))[0], tokens))
            advance(progress, "ppl windows", number, len(windows))
        return nlls

    return run


def perplexity(
    logits_fn: LogitsFn,
    ids: list[int],
    tokenizer: Any,
    window: int,
    data_label: str,
    progress: Callable[[str], None] = lambda message: None,
) -> PerplexityResult:
    """`logits_fn` maps ids [1, T] to logits [1, T, vocab]."""
    return windows_perplexity(logits_nll_fn(logits_fn), ids, tokenizer, window, data_label, progress)


def windows_perplexity(
    nll_fn: WindowsNllFn,
    ids: list[int],
    tokenizer: Any,
    window: int,
    data_label: str,
    progress: Callable[[str], None] = lambda message: None,
) -> PerplexityResult:
    """Perplexity from the summed NLL of each window (a device can score them itself)."""
    start = time.perf_counter()
    windows = score_windows(ids, tokenizer, window)
    total_nll = float(sum(nll_fn(windows, progress)))
    scored = sum(len(tokens) - 1 for tokens in windows)
    n_bytes = len(tokenizer.decode(ids).encode("utf-8"))
    nll = total_nll / max(scored, 1)
    return PerplexityResult(
        task="ppl",
        data=data_label,
        tokens=scored,
        bytes=n_bytes,
        window=window,
        nll_per_token=nll,
        perplexity=math.exp(nll),
        bits_per_byte=total_nll / math.log(2) / max(n_bytes, 1),
        seconds=round(time.perf_counter() - start, 2),
    )


def torch_logits_fn(module: Any) -> LogitsFn:
    import torch

    from edgec.lm import CausalLMEntries

    entries = CausalLMEntries(module).eval()

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return entries.prefill(torch.from_numpy(ids))[0].numpy()

    return run


def decode_perplexity(runtime: Any, program: dict[str, Any], ids: list[int], prompt: int) -> float:
    """Perplexity of ids[prompt:], each token scored by the call before it: a prefill of
    ids[:prompt], then one decode step per token fed in turn. This is the path through the
    KV cache (its dtype, its scales), which windowed perplexity, all prefills, never takes."""
    from edgec.targets.runtime import Generation, as_numpy

    if not 0 < prompt < len(ids) <= int(program["max_context"]):
        raise ValueError(f"decode perplexity: prompt {prompt} of {len(ids)} tokens, context {program['max_context']}")
    generation = Generation(program)
    outputs = runtime.run(generation.prefill, [np.asarray([ids[:prompt]], dtype=np.int64)], native=True)
    entry = generation.prefill
    nll = 0.0
    for position in range(prompt, len(ids)):
        last = as_numpy(generation.logits(outputs, entry))[0, -1:].astype(np.float64)
        nll -= float(_log_softmax(last)[0, ids[position]])
        if position + 1 < len(ids):
            outputs = runtime.run(generation.decode, generation.decode_args(np.asarray([[ids[position]]], dtype=np.int64), outputs, entry),
                                  native=True)
            entry = generation.decode
    return math.exp(nll / (len(ids) - prompt))


def runtime_logits_fn(runtime: Any, program: dict[str, Any]) -> LogitsFn:
    """Prefill logits of a generate program's artifact (entries and outputs by name)."""
    from edgec.targets.runtime import Generation

    generation = Generation(program)

    def run(ids: np.ndarray) -> np.ndarray:
        return np.asarray(generation.logits(runtime.run(generation.prefill, [ids]), generation.prefill))

    return run


def quality(logits_fn: LogitsFn, tokenizer: Any, tokens: int, samples: int, tasks: tuple[str, ...] = ("wordnet", "shakespeare")) -> dict[str, float]:
    """What the benchmarks compare models by: held-out perplexity over `tokens` tokens
    (256-token windows) and each built-in task's test accuracy (`samples` prompts, seed 0)."""
    from edgec.tasks import build_task, evaluate_task

    ids, label = evaluation_ids(tokenizer, "held-out", tokens)
    result = {"ppl": perplexity(logits_fn, ids, tokenizer, 256, label).perplexity}
    for task in tasks:
        built = build_task(task, 0, 0, samples)
        score = evaluate_task(lambda prompts: np.asarray(logits_fn(np.asarray(prompts, dtype=np.int64))[:, -1], dtype=np.float64),
                              tokenizer, built.test, built.labels)
        result[task] = score.accuracy
    return result
