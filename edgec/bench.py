"""`edgec bench ARTIFACT`: the artifact's latency on this machine, llama-bench style.

One row per point of the sweep (threads x batch x prompt length x new tokens): prefill
(or the program's first entry) and greedy decode timed over repeated runs after warm-up,
with the same percentiles as `edgec profile`. A batch of B repeats the reference rows (the
prompt, for LMs) B times along the batch axis, which the artifact must declare dynamic;
decode tokens/s counts the B tokens each step makes. No device needed: the artifact must
run here.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgec.artifact import artifact_runs_here, open_runtime, read_manifest
from edgec.errors import BadInputError, UnsupportedError
from edgec.targets import runtime as shared

FORMATS = ("table", "csv", "json")
# The table's short headers for COLUMNS (the CSV and JSON keep the long names).
HEADERS = ("thr", "batch", "prompt", "new", "p50 ms", "p90 ms", "p99 ms", "decode p50", "decode p90", "tok/s")
# latency: the prefill, or the program's first entry (as `edgec profile` names it).
COLUMNS = ("threads", "batch", "prompt_tokens", "new_tokens", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms",
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
    batches: Sequence[int],
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
    entries = [program["prefill"], program["decode"]] if generate else [next(iter(program["entries"]))]
    if max(batches) > 1:
        _require_dynamic_batch(program, entries, max(batches))
    reference = shared.read_safetensors(root / manifest["reference"]["file"])
    rows: list[dict[str, Any]] = []
    checked = False
    for count in threads:
        runtime = open_runtime(root, manifest, check_files=not checked, threads=count)
        checked = True
        for batch in batches:
            if not generate:
                entry = entries[0]
                inputs = [_rows(reference[f"{entry}.in.{i}"], batch) for i in range(len(program["entries"][entry]["inputs"]))]
                progress(f"{count} thread(s), batch {batch}: {entry}, {runs} runs")
                latency = shared.percentiles(shared.timed(lambda: runtime.run(entry, inputs), runs, warmup))
                rows.append({"threads": count, "batch": batch, "entry": entry, "latency": latency})
                continue
            generation = shared.Generation(program)
            for length in prompt_lens:
                ids = _rows(shared.profile_prompt(reference, length), batch)
                progress(f"{count} thread(s), batch {batch}: prefill of {length} tokens, {runs} runs")
                prefill = shared.percentiles(shared.timed(lambda: runtime.run(generation.prefill, [ids]), runs, warmup))
                for steps in new_tokens:
                    decode_ms: list[float] = []
                    if steps:
                        progress(f"{count} thread(s), batch {batch}: {steps} decode steps after {length} tokens, {runs} runs")
                        for index in range(warmup + runs):
                            times = _decode_ms(runtime, generation, ids, steps)
                            if index >= warmup:
                                decode_ms += times
                    rows.append({
                        "threads": count, "batch": batch, "prompt_tokens": length, "new_tokens": steps, "latency": prefill,
                        "decode": shared.percentiles(decode_ms) if decode_ms else None,
                        "decode_tokens_per_s": batch * 1e3 / float(np.median(decode_ms)) if decode_ms else None,
                    })
    return {"artifact": str(root), "backend": manifest["backend"], "target": manifest["target"]["name"],
            "runs": runs, "warmup": warmup, "cpu_count": os.cpu_count(), "rows": rows}


def _require_dynamic_batch(program: dict[str, Any], entries: list[str], batch: int) -> None:
    # Inputs are batch-first, except cache tensors, whose layout names their batch axis.
    axes = {c["input"]: c["layout"].index("batch") for c in program.get("cache", []) if "batch" in c.get("layout", [])}
    for entry in entries:
        for name, shape in program["entries"][entry].get("input_shapes", {}).items():
            axis = axes.get(name, 0)
            if len(shape) > axis and shape[axis] is not None:
                raise BadInputError(f"--batch {batch}: input {name!r} of entry {entry!r} has a fixed batch of {shape[axis]} "
                                    f"(shape {shape}); sweep batch only on an artifact exported with a dynamic one")


def _rows(array: np.ndarray, batch: int) -> np.ndarray:
    """`batch` rows along axis 0, the reference's rows repeated in turn."""
    return np.ascontiguousarray(np.take(array, np.arange(batch) % array.shape[0], axis=0))


def _decode_ms(runtime: shared.Runtime, generation: shared.Generation, ids: np.ndarray, steps: int) -> list[float]:
    """Each greedy decode step's wall time (ms) after a prefill of `ids` ([B, T]), all rows at once."""
    outputs = runtime.run(generation.prefill, [ids], native=True)
    entry = generation.prefill
    times = []
    for _ in range(steps):
        token = np.argmax(shared.as_numpy(generation.logits(outputs, entry))[:, -1], axis=-1).astype(np.int64)[:, None]
        args = generation.decode_args(token, outputs, entry)
        start = time.perf_counter()
        outputs = runtime.run(generation.decode, args, native=True)
        times.append((time.perf_counter() - start) * 1e3)
        entry = generation.decode
    return times


def flat_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat record per row, the columns of the table and CSV."""
    flat = []
    for row in result["rows"]:
        decode = row.get("decode") or {}
        flat.append({
            "threads": row["threads"], "batch": row["batch"], "prompt_tokens": row.get("prompt_tokens", ""), "new_tokens": row.get("new_tokens", ""),
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
