"""Where a TVM decode step's time goes: each kernel and VM builtin of the decode entry of
a causal-LM artifact, timed through the VM's instrument hook on the host CPU.

    .venv/bin/python benchmarks/decode_profile.py ARTIFACT [--context 1024] [--steps 5]
        [--top 20] [--threads 2] [--by-kind] [--prefill] [--json FILE]

Prefills --context random tokens, then times --steps decode calls on that cache (the
same cache each time, kept in the runtime), reporting per kernel: total ms per step,
calls per step, and share of the step. --prefill times the prefill of those tokens instead. The hook's own overhead (a Python call around
every VM instruction) inflates the total; the uninstrumented step time is printed too.
--by-kind sums the kernels that differ only by TVM's numeric suffix (view_matmul1,
view_matmul2, ...: one per layer).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgec.artifact import open_runtime, read_manifest
from edgec.targets.runtime import as_numpy


def profile(path: Path, context: int, steps: int, threads: int, by_kind: bool = False,
            prefill: bool = False) -> dict[str, Any]:
    manifest = read_manifest(path)
    if manifest["backend"] != "tvm" or manifest["program"]["kind"] != "generate":
        raise SystemExit(f"{path}: a TVM causal-LM artifact is needed (backend {manifest['backend']}, "
                         f"program {manifest['program']['kind']})")
    if context + 1 > int(manifest["program"]["max_context"]):
        raise SystemExit(f"--context {context}: over the artifact's max context {manifest['program']['max_context']}; "
                         "compile with --set max_context=N")
    runtime = open_runtime(path, manifest, threads=threads)
    program = manifest["program"]
    vocab = int(manifest["lm"]["vocab_size"])
    ids = np.random.default_rng(0).integers(0, vocab, size=(1, context), dtype=np.int64)
    logits, *cache = runtime.run(program["prefill"], [ids], native=True)
    token = np.asarray([[int(np.argmax(as_numpy(logits)[0, -1]))]], dtype=np.int64)
    entry, inputs = (program["prefill"], [ids]) if prefill else (program["decode"], [token, *cache])
    runtime.run(entry, inputs, native=True)  # warm-up
    plain = []
    for _ in range(steps):
        start = time.perf_counter()
        runtime.run(entry, inputs, native=True)
        plain.append((time.perf_counter() - start) * 1e3)

    seconds: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()
    began: dict[str, float] = {}

    def instrument(func: Any, symbol: str, before: bool, ret: Any, *args: Any) -> int:
        del func, ret, args
        if before:
            began[symbol] = time.perf_counter()
        else:
            name = re.sub(r"\d+$", "", symbol) if by_kind else symbol
            seconds[name] += time.perf_counter() - began[symbol]
            calls[name] += 1
        return 0

    runtime.vms[entry].set_instrument(instrument)
    start = time.perf_counter()
    for _ in range(steps):
        runtime.run(entry, inputs, native=True)
    instrumented = (time.perf_counter() - start) / steps * 1e3
    kernels = sorted(({"kernel": name, "ms_per_step": total / steps * 1e3, "calls_per_step": calls[name] // steps}
                      for name, total in seconds.items()), key=lambda row: -row["ms_per_step"])
    return {"artifact": str(path), "entry": entry, "context": context, "steps": steps, "threads": threads,
            "step_ms": statistics.median(plain), "instrumented_step_ms": instrumented, "kernels": kernels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--context", type=int, default=1024, help="tokens in the cache before the timed steps")
    parser.add_argument("--steps", type=int, default=5, help="decode calls timed, with and without the hook")
    parser.add_argument("--top", type=int, default=20, help="kernels listed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--by-kind", action="store_true", help="sum kernels that differ only by a numeric suffix")
    parser.add_argument("--prefill", action="store_true", help="time the prefill of --context tokens, not a decode step")
    parser.add_argument("--json", type=Path, help="write the whole profile here")
    args = parser.parse_args()
    result = profile(args.artifact, args.context, args.steps, args.threads, args.by_kind, args.prefill)
    what = f"prefill of {args.context} tokens" if args.prefill else f"decode step at context {args.context}"
    print(f"{args.artifact}: {what}: {result['step_ms']:.1f} ms "
          f"(median of {args.steps}; {result['instrumented_step_ms']:.1f} ms with the hook)")
    total = sum(row["ms_per_step"] for row in result["kernels"])
    print("| kernel | calls/step | ms/step | share of kernel time |\n|---|---:|---:|---:|")
    for row in result["kernels"][: args.top]:
        print(f"| {row['kernel']} | {row['calls_per_step']} | {row['ms_per_step']:.2f} | {row['ms_per_step'] / total:.0%} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
