"""Prefill latency and decode speed on the host CPU: edgec TVM artifact, edgec ONNX
artifact in ONNX Runtime, and PyTorch eager (transformers), on the same inputs in one run.

    .venv/bin/python benchmarks/cpu_latency.py [--models zoo:tiny-lm zoo:smollm2-135m]
        [--prompt-len 128] [--new-tokens 64] [--runs 10] [--out artifacts/bench]

Prints one table with ratios to ONNX Runtime (lower latency / higher tokens/s is better).
Keep the machine otherwise idle: TVM's thread pool is wrecked by other load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgec.artifact import MANIFEST, open_runtime, read_manifest
from edgec.compiler import compile_model
from edgec.data import held_out_slice
from edgec.lm import greedy_generate
from edgec.model import load_model
from edgec.passes import options_for
from edgec.recipe import load_recipe
from edgec.targets.runtime import timed


def median_ms(call: Callable[[], object], runs: int, warmup: int = 2) -> float:
    return statistics.median(timed(call, runs, warmup))


def ensure_artifact(model: str, backend: str, out_root: Path) -> Path:
    out = out_root / f"{model.removeprefix('zoo:')}-cpu-{backend}"
    if (out / MANIFEST).is_file():
        return out
    recipe = load_recipe(None, [f"backend={backend}", "max_context=512"], options_for)
    compile_model(model, recipe, out, force=True, progress=lambda m: print(f"  [{backend}] {m}", file=sys.stderr))
    return out


def artifact_timings(path: Path, prompt: list[int], new_tokens: int, runs: int) -> tuple[float, float, list[int]]:
    return runtime_timings(open_runtime(path, read_manifest(path)), prompt, new_tokens, runs)


def runtime_timings(runtime: Any, prompt: list[int], new_tokens: int, runs: int) -> tuple[float, float, list[int]]:
    """Median prefill ms over warm runs, and decode tokens/s of a greedy loop (median of 3)."""
    ids = np.asarray([prompt], dtype=np.int64)
    prefill_ms = median_ms(lambda: runtime.run("prefill", [ids]), runs)
    decode_s: list[float] = []

    def prefill(x: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(runtime.run("prefill", [x]))

    def decode(x: np.ndarray, *cache: np.ndarray) -> tuple[np.ndarray, ...]:
        start = time.perf_counter()
        outputs = runtime.run("decode", [x, *cache])
        decode_s.append(time.perf_counter() - start)
        return tuple(outputs)

    tokens: list[int] = []
    rates = []
    for _ in range(3):
        decode_s.clear()
        tokens = greedy_generate(prefill, decode, prompt, new_tokens, 10**9, None)
        rates.append(len(decode_s) / sum(decode_s))
    return prefill_ms, statistics.median(rates), tokens


def torch_timings(model_spec: str, prompt: list[int], new_tokens: int, runs: int) -> tuple[float, float, list[int]]:
    module = load_model(model_spec).module
    assert module is not None
    ids = torch.tensor([prompt])
    with torch.no_grad():
        prefill_ms = median_ms(lambda: module(ids), runs)
        rates = []
        tokens: list[int] = []
        for _ in range(3):
            start = time.perf_counter()
            out = module.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            total_s = time.perf_counter() - start
            tokens = out[0, len(prompt) :].tolist()
            # generate() = one prefill + (new_tokens - 1) decode steps.
            rates.append((new_tokens - 1) / max(total_s - prefill_ms / 1e3, 1e-9))
    return prefill_ms, statistics.median(rates), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["zoo:tiny-lm", "zoo:smollm2-135m"])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench"))
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()

    rows = []
    for model in args.models:
        handle = load_model(model)
        prompt = held_out_slice(handle.tokenizer, args.prompt_len)
        results = {}
        for backend in ("onnx", "tvm"):
            path = ensure_artifact(model, backend, args.out)
            print(f"timing {model} {backend} ...", file=sys.stderr)
            results[f"edgec {backend}"] = artifact_timings(path, prompt, args.new_tokens, args.runs)
        print(f"timing {model} torch ...", file=sys.stderr)
        results["torch eager"] = torch_timings(model, prompt, args.new_tokens, args.runs)
        base_prefill, base_rate, base_tokens = results["edgec onnx"]
        for name, (prefill_ms, rate, tokens) in results.items():
            rows.append(
                {
                    "model": model,
                    "runtime": "ONNX Runtime (edgec onnx)" if name == "edgec onnx" else name,
                    "prefill_ms": prefill_ms,
                    "prefill_vs_ort": prefill_ms / base_prefill,
                    "decode_tokens_per_s": rate,
                    "decode_vs_ort": rate / base_rate,
                    "same_tokens_as_ort": tokens == base_tokens,
                }
            )

    print(f"\nprefill {args.prompt_len} tokens (batch 1), decode {args.new_tokens} tokens; "
          f"median of warm runs; {torch.get_num_threads()} threads")
    print(f"{'model':<18} {'runtime':<26} {'prefill ms':>10} {'x ORT':>6} {'decode tok/s':>12} {'x ORT':>6} {'same tokens':>11}")
    for row in rows:
        print(
            f"{row['model']:<18} {row['runtime']:<26} {row['prefill_ms']:>10.1f} {row['prefill_vs_ort']:>6.2f} "
            f"{row['decode_tokens_per_s']:>12.1f} {row['decode_vs_ort']:>6.2f} {str(row['same_tokens_as_ort']):>11}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
