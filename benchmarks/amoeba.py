"""AmoebaLLM subnets against the usual one-shot peers, at equal parameter counts.

    .venv/bin/python benchmarks/amoeba.py [--model zoo:smollm2-135m] [--fractions 0.8,0.65,0.5]
        [--tokens 8192] [--samples 100] [--latency] [--json FILE]

In one run on this CPU:
1. `edgec subnet search` (cached per model): depth masks by dynamic programming, nested
   width masks, the table of shapes with their calibration loss.
2. For each target fraction of the parameters, the AmoebaLLM shape of the table with the
   lowest calibration loss at or below it, and at the same parameter count (the nearest
   each peer's granularity allows; the fractions are printed):
   - last layers: the layers before the final one dropped from the top (the final layer kept);
   - ShortGPT: the layers of least block influence (1 - cosine similarity of a block's
     input and output hidden states, on the same calibration segments) dropped;
   - magnitude width: KV groups and MLP channels of smallest mean squared weight removed
     under one global threshold, every layer kept, no compensation.
   Held-out perplexity and the built-in tasks' test accuracy (wordnet, shakespeare; seed 0)
   in torch, before any fine-tuning (the compiled artifacts match torch: their parity).
   With --tuned DIR (the output of `edgec finetune --method amoeba`), the same shapes of
   the tuned model too (its gated LoRA merged for each shape, then extracted).
3. With --latency: the full model and each AmoebaLLM shape compiled (`edgec compile
   --subnet`, ONNX Runtime backend, this CPU, 2 threads), prefill of a 128-token prompt and
   greedy decode tokens/s over 32 steps (`edgec bench`, 5 runs: median prefill).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgec.architectures import architecture_of
from edgec.data import calibration_segments
from edgec.evaluate import quality as held_out_quality
from edgec.lm import CausalLMEntries
from edgec.model import ModelHandle, load_model
from edgec.finetune.amoeba import merge_for_shape
from edgec.subnet import Shape
from edgec.subnet.extract import extract, make_subnet
from edgec.subnet.search import SearchOptions, SubnetSearch, load_search, search_subnets, shape_parameters
from edgec.subnet.width import LayerWidth, WidthStats, layer_modules, width_masks

EDGEC = str(Path(sys.executable).with_name("edgec"))


def quality(model: torch.nn.Module, tokenizer: Any, tokens: int, samples: int) -> dict[str, float]:
    entries = CausalLMEntries(model).eval()

    def logits(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return entries.prefill(torch.from_numpy(ids))[0].numpy()

    return held_out_quality(logits, tokenizer, tokens, samples)


def block_influence(model: torch.nn.Module, batch: torch.Tensor) -> list[float]:
    """ShortGPT's BI per layer: 1 - mean cosine similarity of its input and output."""
    entries = CausalLMEntries(model).eval()
    with torch.no_grad():
        states = entries.layer_inputs(batch, entries.arch.num_layers)
        tables = entries._positions(batch.shape[1], None)
        outputs = [entries._layer(index, h, tables)[0] for index, h in enumerate(states)]
    return [float(1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).mean()) for h_in, h_out in zip(states, outputs)]


def magnitude_stats(model: torch.nn.Module) -> WidthStats:
    """Unit scores = mean squared weight of the unit's rows and columns; zero means (no compensation)."""
    arch = architecture_of(model)
    blocks = model.get_submodule(arch.layout.layers)
    stats = WidthStats([], [], [], [])
    dim = arch.head_dim
    for index, layer in enumerate(blocks):
        m = layer_modules(layer, arch)
        groups = arch.layer_kv_heads[index]
        per_group = arch.layer_heads[index] // groups
        q = m.q.weight.detach().pow(2).reshape(groups, per_group * dim, -1).mean((1, 2))
        o = m.o.weight.detach().pow(2).reshape(m.o.weight.shape[0], groups, per_group * dim).mean((0, 2))
        k = m.k.weight.detach().pow(2).reshape(groups, dim, -1).mean((1, 2))
        v = m.v.weight.detach().pow(2).reshape(groups, dim, -1).mean((1, 2))
        stats.group_z.append((q + o + k + v) / 4)
        rows = sum(linear.weight.detach().pow(2).mean(1) for linear in m.mlp_in)
        stats.channel_z.append((rows / len(m.mlp_in) + m.mlp_out.weight.detach().pow(2).mean(0)) / 2)
        stats.o_mean.append(torch.zeros(m.o.in_features))
        stats.mlp_mean.append(torch.zeros(m.mlp_out.in_features))
    return stats


def subnet_model(base: torch.nn.Module, layers: list[int], widths: dict[int, LayerWidth] | None, stats: WidthStats | None) -> torch.nn.Module:
    model = copy.deepcopy(base)
    make_subnet(model, layers, widths, stats)
    return model


def tuned_subnet(path: Path, shape: Shape) -> torch.nn.Module:
    """The tuned model's shape: its gated LoRA merged for the shape, then extracted."""
    tuned = load_model(str(path))
    assert tuned.module is not None and tuned.info.get("amoeba"), f"{path} is not an `edgec finetune --method amoeba` output"
    search = load_search(tuned)
    assert search is not None
    merge_for_shape(tuned.module, shape, search)
    if shape.depth is not None or shape.width < 1:
        extract(tuned.module, search, shape)
    return tuned.module


def nearest_depth(base: torch.nn.Module, order: list[int], target: int) -> list[int]:
    """Drop layers in `order` until the parameter count is nearest `target`; the kept layers."""
    arch = architecture_of(base)
    best: list[int] = list(range(arch.num_layers))
    for count in range(len(order) + 1):
        kept = [layer for layer in range(arch.num_layers) if layer not in order[:count]]
        if abs(shape_parameters(base, arch, kept, None) - target) < abs(shape_parameters(base, arch, best, None) - target):
            best = kept
    return best


def magnitude_shape(base: torch.nn.Module, stats: WidthStats, target: int) -> tuple[float, dict[int, LayerWidth]]:
    """The width ratio (every layer kept) whose parameter count is nearest `target` (bisection)."""
    arch = architecture_of(base)
    hidden = int(base.config.hidden_size)
    layers = list(range(arch.num_layers))
    low, high = 0.05, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        if shape_parameters(base, arch, layers, width_masks(stats, arch, hidden, layers, middle)) > target:
            high = middle
        else:
            low = middle
    return high, width_masks(stats, arch, hidden, layers, high)


def bench_artifact(model: str, subnet: str | None, out: Path) -> dict[str, float]:
    command = [EDGEC, "compile", model, "--backend", "onnx", "-o", str(out), "--force", "--json"]
    subprocess.run(command + (["--subnet", subnet] if subnet else []), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = subprocess.run([EDGEC, "bench", str(out), "-p", "128", "-n", "32", "-r", "5", "-o", "json"],
                          check=True, capture_output=True, text=True)
    row = json.loads(done.stdout)["rows"][0]
    return {"prefill_ms": float(row["latency"]["p50_ms"]), "decode_tokens_per_s": float(row["decode_tokens_per_s"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="zoo:smollm2-135m")
    parser.add_argument("--fractions", default="0.8,0.65,0.5")
    parser.add_argument("--min-depth", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens for perplexity")
    parser.add_argument("--samples", type=int, default=100, help="test prompts per task")
    parser.add_argument("--latency", action="store_true", help="compile the shapes and measure them (ONNX Runtime)")
    parser.add_argument("--tuned", type=Path, default=None,
                        help="the model after `edgec finetune --method amoeba`: its shapes are scored too (each merged, then extracted)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    handle: ModelHandle = load_model(args.model)
    base = handle.module
    assert base is not None
    arch = architecture_of(base)
    search: SubnetSearch
    search, source = search_subnets(handle, SearchOptions(min_depth=args.min_depth), lambda m: print(m, file=sys.stderr))
    print(f"search: {source}, {search.record['evaluations']} evaluations, {search.record['seconds']} s", file=sys.stderr)
    full = shape_parameters(base, arch, list(range(arch.num_layers)), None)
    options = search.record["options"]
    segments = torch.tensor(calibration_segments(handle.tokenizer, "train", options["samples"], options["seq_len"]))
    influence = block_influence(base, segments)
    shortgpt_order = sorted(range(arch.num_layers - 1), key=lambda layer: influence[layer])
    last_order = list(range(arch.num_layers - 2, -1, -1))
    magnitude = magnitude_stats(base)
    rows: list[dict[str, Any]] = [{"fraction_target": 1.0, "method": "full model", "shape": "all", "parameters": full,
                                   **quality(base, handle.tokenizer, args.tokens, args.samples)}]
    print(json.dumps(rows[-1]), file=sys.stderr)
    if args.tuned is not None:
        rows.append({"fraction_target": 1.0, "method": "full model + fine-tuning", "shape": "all", "parameters": full,
                     **quality(tuned_subnet(args.tuned, Shape()), handle.tokenizer, args.tokens, args.samples)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    chosen: dict[float, dict[str, Any]] = {}
    for target in (float(f) for f in args.fractions.split(",")):
        candidates = [r for r in search.record["table"] if r["fraction"] <= target + 0.005]
        if not candidates:
            print(f"no shape at or below {target:.0%} of the parameters; lower --min-depth", file=sys.stderr)
            continue
        row = min(candidates, key=lambda r: r["score"])
        chosen[target] = row
        layers = search.layers(row["depth"])
        widths = None if row["width"] >= 1 else width_masks(search.stats, arch, int(base.config.hidden_size), layers, row["width"])
        made = {
            f"AmoebaLLM depth={row['depth']},width={row['width']:g}": (subnet_model(base, layers, widths, search.stats), layers, widths),
        }
        for name, order in (("last layers", last_order), ("ShortGPT", shortgpt_order)):
            kept = nearest_depth(base, order, row["parameters"])
            made[f"{name} depth={len(kept)}"] = (subnet_model(base, kept, None, None), kept, None)
        ratio, masks = magnitude_shape(base, magnitude, row["parameters"])
        all_layers = list(range(arch.num_layers))
        made[f"magnitude width={ratio:.3f}"] = (subnet_model(base, all_layers, masks, magnitude), all_layers, masks)
        if args.tuned is not None:
            made[f"AmoebaLLM + fine-tuning depth={row['depth']},width={row['width']:g}"] = (
                tuned_subnet(args.tuned, Shape(int(row["depth"]), float(row["width"]))), layers, widths)
        for name, (model, kept, widths_of) in made.items():
            parameters = shape_parameters(base, arch, kept, widths_of)
            rows.append({"fraction_target": target, "method": name.split(" depth=")[0].split(" width=")[0], "shape": name,
                         "parameters": parameters, "fraction": parameters / full,
                         **quality(model, handle.tokenizer, args.tokens, args.samples)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    latency: list[dict[str, Any]] = []
    if args.latency:
        with tempfile.TemporaryDirectory() as tmp:
            for target, row in [(1.0, None), *chosen.items()]:
                subnet = None if row is None else f"depth={row['depth']},width={row['width']:g}"
                measured = bench_artifact(args.model, subnet, Path(tmp) / "artifact")
                parameters = full if row is None else row["parameters"]
                latency.append({"shape": subnet or "full", "parameters": parameters, **measured})
                print(json.dumps(latency[-1]), file=sys.stderr)
        for entry in latency:
            entry["prefill_vs_full"] = entry["prefill_ms"] / latency[0]["prefill_ms"]
            entry["decode_vs_full"] = entry["decode_tokens_per_s"] / latency[0]["decode_tokens_per_s"]
            entry["parameters_vs_full"] = entry["parameters"] / full
    print(f"\n{args.model}: held-out perplexity ({args.tokens} tokens) and task accuracy (seed 0, {args.samples} prompts), "
          + ("without and with the one-time fine-tuning of " + str(args.tuned) if args.tuned else "no fine-tuning"))
    print(f"{'target':>6} {'method':<24} {'shape':<40} {'params':>7} {'ppl':>8} {'wordnet':>8} {'shakesp.':>8}")
    for r in rows:
        print(f"{r['fraction_target']:>6.0%} {r['method']:<24} {r['shape']:<40} {r['parameters'] / full:>7.1%} "
              f"{r['ppl']:>8.2f} {r['wordnet']:>8.3f} {r['shakespeare']:>8.3f}")
    for target in chosen:
        group = [r for r in rows if r["fraction_target"] == target]
        best_peer = min((r for r in group if not r["method"].startswith("AmoebaLLM")), key=lambda r: r["ppl"])
        for ours in (r for r in group if r["method"].startswith("AmoebaLLM")):
            print(f"{target:.0%}: {ours['method']} ppl {ours['ppl']:.2f} vs best peer ({best_peer['method']}) {best_peer['ppl']:.2f}: "
                  f"{'beats' if ours['ppl'] < best_peer['ppl'] else 'does NOT beat'} every peer")
    if latency:
        print("\nhost CPU latency (ONNX Runtime, 2 threads, prefill 128 tokens: median of 5; decode tokens/s over 32 steps)")
        for entry in latency:
            print(f"{entry['shape']:<22} params {entry['parameters_vs_full']:>6.1%}  prefill {entry['prefill_ms']:7.1f} ms "
                  f"({entry['prefill_vs_full']:.2f}x)  decode {entry['decode_tokens_per_s']:6.1f} tok/s ({entry['decode_vs_full']:.2f}x)")
    result = {"model": args.model, "search": {k: v for k, v in search.record.items() if k != "table"}, "table": search.record["table"],
              "rows": rows, "latency": latency, "seconds": round(time.perf_counter() - started, 1)}
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
