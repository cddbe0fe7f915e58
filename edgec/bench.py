"""`edgec bench ARTIFACT`: the artifact's latency on this machine, llama-bench style.

One row per point of the sweep (threads x prompt length x new tokens): prefill (or the
program's first entry) and greedy decode timed over repeated runs after warm-up, with
the same percentiles as `edgec profile`. No device needed: the artifact must run here.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgec.artifact import artifact_runs_here, open_runtime, read_manifest
from edgec.errors import BadInputError, UnsupportedError
from edgec.targets import runtime as shared

FORMATS = ("table", "csv", "json")
# The table's short headers for COLUMNS (the CSV and JSON keep the long names).
HEADERS = ("thr", "prompt", "new", "p50 ms", "p90 ms", "p99 ms", "decode p50", "decode p90", "tok/s")
# latency: the prefill, or the program's first entry (as `edgec profile` names it).
COLUMNS = ("threads", "prompt_tokens", "new_tokens", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms",
           "decode_p50_ms", "decode_p90_ms", "decode_tokens_per_s")


def parse_sweep(text: str, option: str, minimum: int) -> list[int]:
    """`1,2,4` -> [1, 2, 4]; each at least `minimum`."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < minimum:
        raise BadInputError(f"{option} {text!r}: give whole numbers >= {minimum}, separated by commas (e.g. 16,64,128)")
    return sorted(set(values))


def bench(
    root: Path,
    threads: Sequence[int],
    prompt_lens: Sequence[int],
    new_tokens: Sequence[int],
    runs: int,
    warmup: int,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    if runs < 1 or warmup < 0:
        raise BadInputError(f"--runs {runs} / --warmup {warmup}: at least one timed run, and no negative warm-up")
    manifest = read_manifest(root, check_self=True)
    runs_here, why = artifact_runs_here(manifest)
    if not runs_here:
        raise UnsupportedError(f"{root}: cannot run here: {why}; deploy it to a matching device (edgec profile --device D times it there)")
    program = manifest["program"]
    generate = program["kind"] == "generate"
    if generate and max(prompt_lens) + max(new_tokens) > int(program["max_context"]):
        raise BadInputError(f"--prompt-len {max(prompt_lens)} + --new-tokens {max(new_tokens)} exceeds the artifact's "
                            f"max context {program['max_context']}")
    reference = shared.read_safetensors(root / manifest["reference"]["file"])
    rows: list[dict[str, Any]] = []
    checked = False
    for count in threads:
        runtime = open_runtime(root, manifest, check_files=not checked, threads=count)
        checked = True
        if not generate:
            entry = next(iter(program["entries"]))
            inputs = [reference[f"{entry}.in.{i}"] for i in range(len(program["entries"][entry]["inputs"]))]
            progress(f"{count} thread(s): {entry}, {runs} runs")
            latency = shared.percentiles(shared.timed(lambda: runtime.run(entry, inputs), runs, warmup))
            rows.append({"threads": count, "entry": entry, "latency": latency})
            continue
        generation = shared.Generation(program)
        for length in prompt_lens:
            ids = shared.profile_prompt(reference, length)
            progress(f"{count} thread(s): prefill of {length} tokens, {runs} runs")
            prefill = shared.percentiles(shared.timed(lambda: runtime.run(generation.prefill, [ids]), runs, warmup))
            for steps in new_tokens:
                decode_ms: list[float] = []
                if steps:
                    progress(f"{count} thread(s): {steps} decode steps after {length} tokens, {runs} runs")
                    for index in range(warmup + runs):
                        times: list[float] = []
                        generation.greedy(_timing(runtime, generation.decode, times), [int(t) for t in ids[0]], steps)
                        if index >= warmup:
                            decode_ms += times
                decode = shared.percentiles(decode_ms) if decode_ms else None
                rows.append({
                    "threads": count, "prompt_tokens": length, "new_tokens": steps, "latency": prefill, "decode": decode,
                    "decode_tokens_per_s": 1e3 / float(np.median(decode_ms)) if decode_ms else None,
                })
    return {"artifact": str(root), "backend": manifest["backend"], "target": manifest["target"]["name"],
            "runs": runs, "warmup": warmup, "cpu_count": os.cpu_count(), "rows": rows}


def _timing(runtime: shared.Runtime, decode: str, times: list[float]) -> Callable[[str, list[Any]], Sequence[Any]]:
    """A runner for Generation.greedy that records each decode call's wall time (ms)."""
    import time

    def run(name: str, args: list[Any]) -> Sequence[Any]:
        start = time.perf_counter()
        outputs = runtime.run(name, args)
        if name == decode:
            times.append((time.perf_counter() - start) * 1e3)
        return outputs

    return run


def flat_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat record per row, the columns of the table and CSV."""
    flat = []
    for row in result["rows"]:
        decode = row.get("decode") or {}
        flat.append({
            "threads": row["threads"], "prompt_tokens": row.get("prompt_tokens", ""), "new_tokens": row.get("new_tokens", ""),
            "latency_p50_ms": row["latency"]["p50_ms"], "latency_p90_ms": row["latency"]["p90_ms"],
            "latency_p99_ms": row["latency"]["p99_ms"], "decode_p50_ms": decode.get("p50_ms", ""),
            "decode_p90_ms": decode.get("p90_ms", ""), "decode_tokens_per_s": row.get("decode_tokens_per_s") or "",
        })
    return flat


def as_csv(result: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in flat_rows(result):
        writer.writerow({k: f"{v:.3f}" if isinstance(v, float) else v for k, v in row.items()})
    return buffer.getvalue()
