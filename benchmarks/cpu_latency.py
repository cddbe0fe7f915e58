"""Prefill latency, decode speed at a short and a long context, held-out perplexity and
weight streaming against the measured memory bandwidth on the host CPU, in one run on
the same prompt, contexts and threads:

- fp32: edgec's ONNX artifact in ONNX Runtime (the baseline of every ratio), edgec's TVM
  artifact, PyTorch eager (transformers);
- luc, w4: edgec TVM and ONNX artifacts of recipes/luc-w4-s30.yaml (Edge-LLM's
  compression: a mean of 4 bits, 30% sparsity) and recipes/w4.yaml (plain 4-bit
  weights, no sparsity);
- int8: the same two recipes on TVM with int8 activations and integer dot products
  (`schedule.activations=int8`; parity.rtol 0.15: SmolLM2's logits move by up to 10% of their range);
- f16-cache: the int8 rows with `cache_dtype=float16` (K and V kept in float16 between
  steps, as llama.cpp's default cache is);
- i8-cache: the int8 rows with `cache_dtype=int8` (K and V in int8 at fixed scales per
  layer, head and channel: a quarter of the float32 cache's bytes);
- ort-quantizers: ONNX Runtime's own int8 dynamic and MatMulNBits 4-bit quantizers on
  edgec's dense ONNX graphs (benchmarks/ort_quantized.py);
- with --llama-cpp: llama.cpp's llama-bench on SmolLM2's source Q4_1 GGUF and on an
  F32 GGUF of the same weights.

    .venv/bin/python benchmarks/cpu_latency.py [--models zoo:tiny-lm zoo:smollm2-135m]
        [--rows fp32 luc w4 int8 f16-cache i8-cache ort-quantizers] [--prompt-len 128] [--contexts 32 1024]
        [--new-tokens 32] [--runs 10] [--rounds 3] [--min-decode-s 0.5] [--ppl-tokens 4096]
        [--decode-ppl-tokens 1024] [--out artifacts/bench] [--json FILE] [--llama-cpp]

Every row is loaded first (and its perplexity scored), then timed --rounds times, each
round timing every row in turn, so that the host's drift over minutes reaches all rows
alike. Prefill: median of the warm calls on the first --prompt-len held-out tokens
(--runs of them, spread over the rounds). Decode at context C: tokens/s of --new-tokens
greedy steps after a prompt of C held-out tokens (median over the rounds; each round
repeats the generation until its decode steps took --min-decode-s, so that a row at a
few ms a step is not one noisy sample; llama-bench: one repetition each). Long / short:
the median of the rounds' ratios, a round timing a row's two contexts back to back.
Perplexity: edgec's scoring windows (256 tokens) over the
first --ppl-tokens held-out tokens, in the row's own runtime (llama.cpp: llama-perplexity
on their text, its own metric: compare its Q4_1 / F32 ratio; zoo:smollm2-135m's fp32
weights are its Q4_1 GGUF's, dequantized). Weight streaming: the
bytes of weights one decode step reads (edgec artifacts: the model's weights as stored; ORT's quantized graphs: every
initializer a node other than a Gather reads; PyTorch: Linear weights and lm_head in fp32; llama.cpp: the GGUF's layer
tensors and head as stored) / the step's time, as GB/s and as % of the bandwidth of a
numpy copy of a 1 GiB buffer (one thread; read + write bytes counted). Decode perplexity
(the int8-activation rows): the first --decode-ppl-tokens held-out tokens scored by
decode steps, one token fed at a time, the path through the KV cache that the windowed
perplexity (prefills) never takes; it tells what a narrower cache costs. Bytes bound
(edgec and ORT rows): weight bytes / (weight bytes + the K and V cache's bytes at the
long context), the long / short ratio a step bound by memory bandwidth would show. Artifacts are
compiled once into --out (the compile time is printed). Keep the machine otherwise
idle: TVM's thread pool is wrecked by other load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgec.artifact import MANIFEST, open_runtime, read_manifest
from edgec.compiler import compile_model
from edgec.data import held_out_slice
from edgec.evaluate import decode_perplexity, evaluation_ids, perplexity, runtime_logits_fn, torch_logits_fn
from edgec.model import load_model
from edgec.passes import options_for
from edgec.recipe import load_recipe
from edgec.targets.runtime import Generation, Runtime, as_numpy, timed

from benchmarks.ort_quantized import quantized_artifact

# Tokens per perplexity window (edgec's evaluate default), capped at the artifact's context.
PPL_WINDOW = 256


def median_ms(call: Callable[[], object], runs: int, warmup: int = 2) -> float:
    return statistics.median(timed(call, runs, warmup))


def ensure_artifact(model: str, backend: str, recipe: str | None, out_root: Path, max_context: int,
                    sets: tuple[str, ...] = ()) -> Path:
    variant = (("" if recipe is None else "-" + Path(recipe).stem) + ("-int8" if "schedule.activations=int8" in sets else "")
               + ("-f16cache" if "cache_dtype=float16" in sets else "") + ("-i8cache" if "cache_dtype=int8" in sets else ""))
    out = out_root / f"{model.removeprefix('zoo:')}-cpu-{backend}{variant}-ctx{max_context}"
    if (out / MANIFEST).is_file():
        return out
    recipe_obj = load_recipe(None if recipe is None else Path(recipe), [f"backend={backend}", f"max_context={max_context}", *sets],
                             options_for)
    start = time.perf_counter()
    compile_model(model, recipe_obj, out, force=True, progress=lambda m: print(f"  [{backend}] {m}", file=sys.stderr))
    print(f"  compiled {out.name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return out


def decode_steps(runtime: Any, program: dict[str, Any], prompt: list[int], new_tokens: int) -> tuple[list[float], list[int]]:
    """Seconds of each decode call of one greedy generation after `prompt`, driven as
    `edgec run` drives it (the cache stays in the runtime between steps), and its tokens."""
    decode_s: list[float] = []
    generation = Generation(program)

    def run(entry: str, args: list[Any]) -> list[Any]:
        start = time.perf_counter()
        outputs = runtime.run(entry, args, native=True)
        as_numpy(generation.logits(outputs, entry))
        if entry == generation.decode:
            decode_s.append(time.perf_counter() - start)
        return outputs

    tokens = generation.greedy(run, prompt, new_tokens)
    return decode_s, tokens


@dataclass
class Round:
    """One round's timings of a row: prefill ms samples and decode tokens/s per context."""

    prefill_ms: list[float]
    rates: dict[int, float]


@dataclass
class Row:
    """A runtime under test: a round of its timings, its greedy tokens after the prompt
    (None: not comparable), the weight bytes a decode step reads, held-out perplexity
    (windows of prefills) and decode perplexity (through the cache; None: not measured)."""

    time_round: Callable[[], Round]
    tokens: list[int] | None
    step_bytes: int
    ppl: float | None
    decode_ppl: float | None = None
    long_cache_bytes: int | None = None


def repeated_rate(runtime: Any, program: dict[str, Any], prompt: list[int], new_tokens: int, min_s: float) -> float:
    """Tokens/s of greedy generations after `prompt`, repeated until their decode steps took `min_s`."""
    decode_s: list[float] = []
    while sum(decode_s) < min_s:
        steps = decode_steps(runtime, program, prompt, new_tokens)[0]
        if not steps:
            raise ValueError(f"no decode step after {len(prompt)} tokens: the artifact's context is full")
        decode_s += steps
    return len(decode_s) / sum(decode_s)


def runtime_round(runtime: Any, program: dict[str, Any], prompts: dict[int, list[int]], prompt: list[int],
                  new_tokens: int, runs: int, min_decode_s: float) -> Round:
    ids = np.asarray([prompt], dtype=np.int64)
    prefill = timed(lambda: runtime.run("prefill", [ids]), runs, 1)
    return Round(prefill, {ctx: repeated_rate(runtime, program, p, new_tokens, min_decode_s) for ctx, p in prompts.items()})


def held_out_perplexity(logits_fn: Callable[[np.ndarray], np.ndarray], tokenizer: Any, tokens: int, window: int) -> float | None:
    """Perplexity on the first `tokens` held-out tokens (edgec's scoring windows), or None for 0 tokens."""
    if tokens <= 0:
        return None
    ids, label = evaluation_ids(tokenizer, "held-out", tokens)
    return perplexity(logits_fn, ids, tokenizer, window, label).perplexity


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of an ONNX graph's initializers that some node other than a Gather reads: the
    weights a decode step streams (an embedding table only gathered is read a row a step)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path), load_external_data=False).graph
    streamed = {name for node in graph.node if node.op_type != "Gather" for name in node.input}
    total = 0
    for init in graph.initializer:
        if init.name not in streamed:
            continue
        external = {entry.key: entry.value for entry in init.external_data}
        total += int(external["length"]) if "length" in external else numpy_helper.to_array(init).nbytes
    return total


def artifact_weight_bytes(manifest: dict[str, Any], dense_bytes: int) -> int:
    """Bytes of weights one decode step of an edgec artifact reads: the packed weights as
    the luc pass stored them (both models tie lm_head to the embedding table, which a step
    reads whole), else the fp32 Linear weights and lm_head (`dense_bytes`). From the model,
    not the artifact's files: a TVM build keeps the tied table twice (panels for the
    head, rows for the gather), and a step reads only one row of the second."""
    for record in manifest["passes"]:
        if record["name"] == "luc":
            return int(record["record"]["achieved"]["weight_bytes"])
    return dense_bytes


def cache_bytes(program: dict[str, Any], positions: int) -> int:
    """Bytes of a generate program's K and V cache at `positions` tokens, batch 1: what a
    decode step at that context reads besides the weights."""
    kv = [cache for cache in program["cache"] if cache["input"] in ("past_k", "past_v")]
    return sum(positions * int(np.prod([size for size in cache["shape"] if size is not None]))
               * np.dtype(cache.get("dtype", "float32")).itemsize for cache in kv)


def torch_round(module: Any, prompts: dict[int, list[int]], prompt: list[int], new_tokens: int, runs: int) -> Round:
    """PyTorch eager: generate() = one prefill + (new_tokens - 1) decode steps, so a context's
    decode rate is generate()'s time less that context's prefill (median of 3)."""
    with torch.no_grad():
        prefill = timed(lambda: module(torch.tensor([prompt])), runs, 1)
        rates: dict[int, float] = {}
        for ctx, ids in prompts.items():
            ids_t = torch.tensor([ids])
            start_ms = median_ms(lambda: module(ids_t), 3, 1)
            start = time.perf_counter()
            module.generate(ids_t, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            rates[ctx] = (new_tokens - 1) / max(time.perf_counter() - start - start_ms / 1e3, 1e-9)
    return Round(prefill, rates)


def torch_tokens(module: Any, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = module.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def memory_bandwidth_gbs(size: int = 1 << 30, runs: int = 5) -> float:
    """GB/s of a numpy copy (one thread) of a buffer far larger than the caches, read and
    written bytes both counted: what a step that streams its weights once can hope for."""
    source = np.ones(size // 4, dtype=np.float32)
    target = np.empty_like(source)
    np.copyto(target, source)  # first touch: page faults are not bandwidth
    seconds = statistics.median(timed(lambda: np.copyto(target, source), runs, 1)) / 1e3
    return 2 * size / seconds / 1e9


def decode_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of fp32 Linear weights and biases (lm_head included) one decode step reads."""
    return sum(4 * p.numel() for m in module.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False))


def gguf_step_bytes(path: Path) -> int:
    """Bytes of the tensors a llama.cpp decode step reads from a GGUF: every layer's, and the
    output head (the token embedding where the head is tied to it)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    head = tensors.get("output.weight", tensors["token_embd.weight"])
    return head + sum(size for name, size in tensors.items() if name.startswith("blk."))


def llama_cpp_rows(model: str, out_root: Path, prompt_len: int, contexts: list[int], new_tokens: int,
                   tokenizer: Any, ppl_tokens: int) -> dict[str, Row]:
    """llama-bench on the Q4_1 GGUF zoo:smollm2-135m is converted from and on an F32 GGUF
    of the same weights (other models: no rows; they do not come from a GGUF), one
    repetition a round, and llama-perplexity on the text of the first `ppl_tokens` held-out
    tokens: llama.cpp's own metric (chunks of PPL_WINDOW, second halves scored), so compare
    the two GGUFs' ratio, not the value, with edgec's rows. The F32 GGUF holds the Q4_1
    weights dequantized: the ratio is the cost of llama.cpp's int8 activations alone."""
    from benchmarks.llama_cpp import bench, f32_gguf, perplexity
    from edgec.zoo import smollm2_gguf

    if model != "zoo:smollm2-135m":
        return {}
    source = smollm2_gguf()
    ggufs = {"llama.cpp Q4_1 (the zoo's source GGUF)": source,
             "llama.cpp F32 (the same weights)": f32_gguf(source, out_root / "smollm2-135m-f32.gguf")}
    text = out_root / "held-out.txt"
    if ppl_tokens > 0:
        ids, _ = evaluation_ids(tokenizer, "held-out", ppl_tokens)
        text.write_text(tokenizer.decode(ids))

    def one_round(path: Path) -> Round:
        result = bench(path, prompt_len, contexts, new_tokens, torch.get_num_threads(), 1)
        return Round([result["prefill_ms"]], {int(c): r for c, r in result["decode_tokens_per_s"].items()})

    rows = {}
    for name, path in ggufs.items():
        ppl = perplexity(path, text, PPL_WINDOW, torch.get_num_threads()) if ppl_tokens > 0 else None
        rows[name] = Row(lambda path=path: one_round(path), None, gguf_step_bytes(path), ppl)
    return rows


# Row -> (backend, recipe): edgec's artifacts, compiled once into --out.
# Row -> (backend, recipe, --set overrides).
INT8 = ("schedule.activations=int8", "parity.rtol=0.15")
EDGEC_ROWS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "edgec onnx": ("onnx", None, ()),
    "edgec tvm": ("tvm", None, ()),
    "edgec onnx luc-w4-s30": ("onnx", "recipes/luc-w4-s30.yaml", ()),
    "edgec tvm luc-w4-s30": ("tvm", "recipes/luc-w4-s30.yaml", ()),
    "edgec onnx w4": ("onnx", "recipes/w4.yaml", ()),
    "edgec tvm w4": ("tvm", "recipes/w4.yaml", ()),
    "edgec tvm luc-w4-s30 int8": ("tvm", "recipes/luc-w4-s30.yaml", INT8),
    "edgec tvm w4 int8": ("tvm", "recipes/w4.yaml", INT8),
    "edgec tvm luc-w4-s30 int8 f16-cache": ("tvm", "recipes/luc-w4-s30.yaml", (*INT8, "cache_dtype=float16")),
    "edgec tvm w4 int8 f16-cache": ("tvm", "recipes/w4.yaml", (*INT8, "cache_dtype=float16")),
    "edgec tvm luc-w4-s30 int8 i8-cache": ("tvm", "recipes/luc-w4-s30.yaml", (*INT8, "cache_dtype=int8")),
    "edgec tvm w4 int8 i8-cache": ("tvm", "recipes/w4.yaml", (*INT8, "cache_dtype=int8")),
}
# Row -> benchmarks/ort_quantized.py kind, applied to the dense "edgec onnx" artifact.
ORT_ROWS = {"ORT int8 dynamic": "int8", "ORT MatMulNBits 4-bit": "nbits4"}
GROUPS = {
    "fp32": ["edgec onnx", "edgec tvm", "torch eager"],
    "luc": ["edgec onnx luc-w4-s30", "edgec tvm luc-w4-s30"],
    "w4": ["edgec onnx w4", "edgec tvm w4"],
    "int8": ["edgec tvm luc-w4-s30 int8", "edgec tvm w4 int8"],
    "f16-cache": ["edgec tvm luc-w4-s30 int8 f16-cache", "edgec tvm w4 int8 f16-cache"],
    "i8-cache": ["edgec tvm luc-w4-s30 int8 i8-cache", "edgec tvm w4 int8 i8-cache"],
    "ort-quantizers": list(ORT_ROWS),
}
FP32_ROWS = set(GROUPS["fp32"])
# Rows whose decode perplexity is measured: the same weights with three caches.
DECODE_PPL_ROWS = {*GROUPS["int8"], *GROUPS["f16-cache"], *GROUPS["i8-cache"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["zoo:tiny-lm", "zoo:smollm2-135m"])
    parser.add_argument("--rows", nargs="+", choices=list(GROUPS), default=list(GROUPS),
                        help="row groups (the ONNX Runtime fp32 row is always timed: ratios are to it)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32, 1024], help="decode speed after prompts this long")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=10, help="prefill calls timed per row, spread over the rounds")
    parser.add_argument("--rounds", type=int, default=3, help="times every row is timed, in turn (medians over them)")
    parser.add_argument("--min-decode-s", type=float, default=0.5,
                        help="decode seconds timed per context and round: fast rows repeat their generation until then")
    parser.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens each row's perplexity is scored on (0: none)")
    parser.add_argument("--decode-ppl-tokens", type=int, default=1024,
                        help="held-out tokens the int8 rows' decode perplexity is scored on, a step a token (0: none)")
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench"))
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="also time llama.cpp's llama-bench (built into the edgec cache on first use: minutes)")
    args = parser.parse_args()
    wanted = ["edgec onnx", *(name for group in args.rows for name in GROUPS[group] if name != "edgec onnx")]

    per_round = max(2, -(-args.runs // args.rounds))  # prefill calls a row times each round
    bandwidth = memory_bandwidth_gbs()
    print(f"memory bandwidth (numpy copy, one thread): {bandwidth:.1f} GB/s", file=sys.stderr)
    rows = []
    for model in args.models:
        handle = load_model(model)
        assert handle.module is not None
        # A context the model was not trained for is capped at its own limit (zoo:tiny-lm: 512).
        limit = int(getattr(handle.module.config, "max_position_embeddings", 10**9)) - args.new_tokens
        short, long = min(min(args.contexts), limit), min(max(args.contexts), limit)
        max_context = max(long, args.prompt_len) + args.new_tokens
        window = min(PPL_WINDOW, max_context)
        held_out = held_out_slice(handle.tokenizer, max(long, args.prompt_len))
        prompt = held_out[: args.prompt_len]
        prompts = {short: held_out[:short], long: held_out[:long]}
        decode_ids = held_out[: min(args.decode_ppl_tokens, max_context)]
        loaded: dict[str, Row] = {}
        dense_onnx: Path | None = None
        for name in wanted:
            if name in EDGEC_ROWS:
                backend, recipe, sets = EDGEC_ROWS[name]
                path = ensure_artifact(model, backend, recipe, args.out, max_context, sets)
                dense_onnx = path if name == "edgec onnx" else dense_onnx
                manifest = read_manifest(path)
                runtime, program = open_runtime(path, manifest), manifest["program"]
                step_bytes = artifact_weight_bytes(manifest, decode_weight_bytes(handle.module))
            elif name in ORT_ROWS:
                assert dense_onnx is not None
                model_dir, record = quantized_artifact(dense_onnx, ORT_ROWS[name], args.out / f"{dense_onnx.name}-ort-{ORT_ROWS[name]}")
                runtime, program = Runtime(model_dir, "onnx", record), read_manifest(dense_onnx)["program"]
                step_bytes = onnx_weight_bytes(model_dir / record["entries"]["decode"]["file"])
            else:
                print(f"loading {model} torch ...", file=sys.stderr)
                ppl = held_out_perplexity(torch_logits_fn(handle.module), handle.tokenizer, args.ppl_tokens, window)
                loaded[name] = Row(lambda: torch_round(handle.module, prompts, prompt, args.new_tokens, per_round),
                                   torch_tokens(handle.module, prompt, args.new_tokens), decode_weight_bytes(handle.module), ppl)
                continue
            print(f"loading {model} {name} ...", file=sys.stderr)
            ppl = held_out_perplexity(runtime_logits_fn(runtime, program), handle.tokenizer, args.ppl_tokens, window)
            scores_decode = name in DECODE_PPL_ROWS and len(decode_ids) > 1
            decode_ppl = decode_perplexity(runtime, program, decode_ids, 1) if scores_decode else None
            loaded[name] = Row(lambda runtime=runtime, program=program: runtime_round(runtime, program, prompts, prompt,
                                                                                     args.new_tokens, per_round, args.min_decode_s),
                               decode_steps(runtime, program, prompt, args.new_tokens)[1], step_bytes, ppl, decode_ppl,
                               cache_bytes(program, long))
        if args.llama_cpp:
            loaded.update(llama_cpp_rows(model, args.out, args.prompt_len, [short, long], args.new_tokens,
                                         handle.tokenizer, args.ppl_tokens))
        # Every row once a round, in turn: the host's speed drifts by 10-30% over minutes,
        # and rows timed minutes apart would carry that drift into their ratios.
        rounds: dict[str, list[Round]] = {name: [] for name in loaded}
        for index in range(args.rounds):
            for name, row in loaded.items():
                print(f"timing {model} round {index + 1}/{args.rounds}: {name} ...", file=sys.stderr)
                rounds[name].append(row.time_round())
        results: dict[str, tuple[float, dict[int, float], list[int] | None, int, float | None]] = {}
        for name, row in loaded.items():
            prefill_ms = statistics.median(ms for one in rounds[name] for ms in one.prefill_ms)
            rates = {ctx: statistics.median(one.rates[ctx] for one in rounds[name]) for ctx in (short, long)}
            # A round times a row's two contexts seconds apart, its rounds minutes apart: the
            # ratio per round keeps the host's drift out of it.
            long_vs_short = statistics.median(one.rates[long] / one.rates[short] for one in rounds[name])
            results[name] = (prefill_ms, rates, long_vs_short, row)
        base_prefill, base_rates, _, base_row = results["edgec onnx"]
        for name, (prefill_ms, rates, long_vs_short, row) in results.items():
            step_bytes, long_cache = row.step_bytes, row.long_cache_bytes
            streamed = step_bytes * rates[short] / 1e9
            rows.append(
                {
                    "model": model,
                    "runtime": "ONNX Runtime (edgec onnx)" if name == "edgec onnx" else name,
                    "prefill_ms": prefill_ms,
                    "prefill_vs_ort": prefill_ms / base_prefill,
                    "contexts": [short, long],
                    "decode_tokens_per_s": {str(ctx): rate for ctx, rate in rates.items()},
                    "decode_vs_ort": rates[short] / base_rates[short],
                    "long_vs_short": long_vs_short,
                    # What a step reads at the long context over the short one, if bandwidth bound
                    # (weights and cache; the short context's cache left out): the ratio's limit.
                    "long_cache_bytes": long_cache,
                    "bytes_bound_long_vs_short": None if long_cache is None else step_bytes / (step_bytes + long_cache),
                    "weight_bytes_per_step": step_bytes,
                    "weight_gb_per_s": streamed,
                    "of_bandwidth": streamed / bandwidth,
                    "held_out_ppl": row.ppl,
                    "decode_ppl": row.decode_ppl,
                    # fp32 rows compute the same function: their greedy tokens should equal ORT's.
                    "same_tokens_as_ort": row.tokens == base_row.tokens if name in FP32_ROWS else None,
                }
            )

    print(f"\nprefill {args.prompt_len} tokens (batch 1), median of {args.rounds} x {per_round} "
          f"warm runs; decode {args.new_tokens} tokens after a short and a long context, median of {args.rounds} rounds (every "
          f"row in turn each round); {torch.get_num_threads()} threads; memory bandwidth "
          f"{bandwidth:.1f} GB/s (numpy copy, one thread); perplexity on {args.ppl_tokens} held-out tokens, decode perplexity "
          f"on {args.decode_ppl_tokens}")
    print("| model | runtime | prefill ms | x ORT | contexts | decode tok/s short | x ORT | long | long / short "
          "| bytes bound | weight MB / step | cache MB (long) | weights GB/s (short) | % of bandwidth | held-out ppl | decode ppl "
          "| same tokens |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        short, long = row["contexts"]
        rates = row["decode_tokens_per_s"]
        ppl = "-" if row["held_out_ppl"] is None else f"{row['held_out_ppl']:.2f}"
        decode_ppl = "-" if row["decode_ppl"] is None else f"{row['decode_ppl']:.3f}"
        bound = "-" if row["bytes_bound_long_vs_short"] is None else f"{row['bytes_bound_long_vs_short']:.2f}"
        cache_mb = "-" if row["long_cache_bytes"] is None else f"{row['long_cache_bytes'] / 1e6:.1f}"
        print(
            f"| {row['model']} | {row['runtime']} | {row['prefill_ms']:.1f} | {row['prefill_vs_ort']:.2f} | {short} / {long} "
            f"| {rates[str(short)]:.1f} | {row['decode_vs_ort']:.2f} | {rates[str(long)]:.1f} | {row['long_vs_short']:.2f} "
            f"| {bound} | {row['weight_bytes_per_step'] / 1e6:.1f} | {cache_mb} | {row['weight_gb_per_s']:.1f} | {100 * row['of_bandwidth']:.0f}% | {ppl} | {decode_ppl} "
            f"| {'-' if row['same_tokens_as_ort'] is None else row['same_tokens_as_ort']} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"memory_bandwidth_gbs": bandwidth, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
