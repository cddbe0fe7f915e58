"""ACT attention calibration on a real model: test accuracy without and with it, and its cost.

    .venv/bin/python benchmarks/act.py [--model zoo:smollm2-135m] [--seeds 0 1 2]
        [--tasks wordnet shakespeare] [--paper-seeds 0] [--test-samples 120]
        [--prompt-len 128] [--runs 10] [--out artifacts/bench-act] [--json FILE] [--no-latency]

In one run:
1. Sinks: `edgec analyze attention` on 8 wordnet calibration prompts (seed 0): how many
   sinks sit at position 0, how many elsewhere, how many are hidden (after a row's first).
2. For each task and split seed: the head search of recipes/act.yaml on the task's
   calibration split (stat causal; and stat paper for --paper-seeds), then accuracy on the
   disjoint test split of the model without ACT and with the chosen heads calibrated
   (torch; the compiled artifacts match it, as their parity checks show), and for the
   --paper-seeds with every head calibrated (no search). Searches are cached, so a
   rerun only re-scores.
3. Cost: TVM and ONNX Runtime artifacts of the model without and with ACT (the wordnet
   seed-0 heads), prefill latency (median of warm runs) and decode tokens/s on this CPU,
   with the calibrated/uncalibrated ratio. Keep the machine idle.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_latency import runtime_timings  # noqa: E402
from luc import compiled  # noqa: E402

from edgec.analyze import analyze_attention, prompts_from  # noqa: E402
from edgec.artifact import open_runtime, read_manifest  # noqa: E402
from edgec.model import ModelHandle, load_model  # noqa: E402
from edgec.passes import options_for  # noqa: E402
from edgec.passes.act import ActOptions, cached_search, install  # noqa: E402
from edgec.recipe import load_recipe  # noqa: E402
from edgec.tasks import build_task, evaluate_task, torch_last_logits  # noqa: E402

ACT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "act.yaml"
# Search sizes per task: wordnet's are recipes/act.yaml's; the shakespeare prompts (six
# solved lines in front) are about four times longer, so its search scores fewer prompts
# and heads to take about as long.
SEARCH_SIZES: dict[str, dict[str, int]] = {
    "wordnet": {"samples": 64, "candidates": 32, "max_heads": 8},
    "shakespeare": {"samples": 36, "candidates": 16, "max_heads": 4},
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def act_options(task: str, seed: int, stat: str) -> ActOptions:
    sets = [f"act.stat={stat}", f"act.search.tasks=[{task}]", f"act.search.seed={seed}",
            *(f"act.search.{key}={value}" for key, value in SEARCH_SIZES[task].items())]
    recipe = load_recipe(ACT_RECIPE, sets, options_for)
    return ActOptions.model_validate(recipe.passes[0].options)


def sink_census(handle: ModelHandle) -> dict[str, Any]:
    result = analyze_attention(handle, prompts_from(handle, "wordnet", 8, 0), tau=0.1, alpha=5.0)
    return result["summary"]


def accuracy_rows(handle: ModelHandle, tasks: list[str], seeds: list[int], paper_seeds: list[int], test_samples: int) -> list[dict[str, Any]]:
    assert handle.module is not None
    rows = []
    for task in tasks:
        for seed in seeds:
            test = build_task(task, seed, 0, test_samples)
            install(handle.module, {}, act_options(task, seed, "causal").rule())
            plain = evaluate_task(torch_last_logits(handle.module), handle.tokenizer, test.test, test.labels)
            for stat in ("causal", "paper") if seed in paper_seeds else ("causal",):
                options = act_options(task, seed, stat)
                _log(f"search: {task} seed {seed} stat {stat}")
                found, source = cached_search(handle, options, lambda m: _log(f"  {m}"))
                heads = {int(layer): chosen for layer, chosen in found["heads"].items()}
                install(handle.module, heads, options.rule())
                calibrated = evaluate_task(torch_last_logits(handle.module), handle.tokenizer, test.test, test.labels)
                install(handle.module, {}, options.rule())
                rows.append({
                    "task": task, "seed": seed, "stat": stat, "heads": sum(len(h) for h in heads.values()),
                    "head_set": found["heads"], "search_source": source,
                    "calibration_accuracy": [found["baseline"]["accuracy"], found["calibrated"]["accuracy"]],
                    "test_prompts": len(test.test), "chance": 1 / len(test.labels),
                    "test_accuracy_without": plain.accuracy, "test_accuracy_with": calibrated.accuracy,
                    "gain": calibrated.accuracy - plain.accuracy,
                })
                _log(f"  {task} seed {seed} {stat}: {rows[-1]['heads']} heads, test {plain.accuracy:.3f} -> {calibrated.accuracy:.3f}")
            if seed in paper_seeds:
                # The pilot of METHODS.md: every head calibrated, no search.
                every = {layer: list(range(handle.module.config.num_attention_heads)) for layer in range(len(handle.module.model.layers))}
                install(handle.module, every, act_options(task, seed, "causal").rule())
                calibrated = evaluate_task(torch_last_logits(handle.module), handle.tokenizer, test.test, test.labels)
                install(handle.module, {}, act_options(task, seed, "causal").rule())
                rows.append({
                    "task": task, "seed": seed, "stat": "causal", "heads": sum(len(h) for h in every.values()),
                    "head_set": "all", "search_source": None, "calibration_accuracy": None,
                    "test_prompts": len(test.test), "chance": 1 / len(test.labels),
                    "test_accuracy_without": plain.accuracy, "test_accuracy_with": calibrated.accuracy,
                    "gain": calibrated.accuracy - plain.accuracy,
                })
    return rows


def latency_rows(model: str, heads: dict[str, list[int]], prompt: list[int], runs: int, out_root: Path) -> list[dict[str, Any]]:
    head_text = "{" + ", ".join(f"{layer}: [{', '.join(map(str, chosen))}]" for layer, chosen in heads.items()) + "}"
    rows = []
    for backend in ("tvm", "onnx"):
        timings = {}
        for name, sets in (("plain", ["passes=", f"backend={backend}"]), ("act", [f"act.heads={head_text}", f"backend={backend}"])):
            path = compiled(model, f"{name}-{backend}", ACT_RECIPE, sets, out_root)
            runtime = open_runtime(path, read_manifest(path))
            timings[name] = runtime_timings(runtime, prompt, 16, runs)
        rows.append({
            "backend": backend,
            "prefill_ms_without": timings["plain"][0], "prefill_ms_with": timings["act"][0],
            "prefill_overhead": timings["act"][0] / timings["plain"][0],
            "decode_tokens_per_s_without": timings["plain"][1], "decode_tokens_per_s_with": timings["act"][1],
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="zoo:smollm2-135m")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--paper-seeds", type=int, nargs="*", default=[0], help="seeds also searched with stat paper")
    parser.add_argument("--tasks", nargs="+", default=["wordnet", "shakespeare"])
    parser.add_argument("--test-samples", type=int, default=120)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench-act"))
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--no-latency", action="store_true", help="skip the artifacts and their timing (e.g. on a busy machine)")
    args = parser.parse_args()

    handle = load_model(args.model)
    census = sink_census(handle)
    rows = accuracy_rows(handle, args.tasks, args.seeds, args.paper_seeds, args.test_samples)
    first = next(r for r in rows if r["task"] == args.tasks[0] and r["seed"] == args.seeds[0] and r["stat"] == "causal" and r["head_set"] != "all")
    ids = list(handle.tokenizer(" ".join(["The quick brown fox jumps over the lazy dog."] * 40))["input_ids"])[: args.prompt_len]
    latency = [] if args.no_latency else latency_rows(args.model, first["head_set"], ids, args.runs, args.out)

    print(f"\n{args.model}: sinks on 8 wordnet prompts (tau 0.1 or alpha 5): {census['sinks']} in all, "
          f"{census['initial_sinks']} at position 0, {census['non_initial_sinks']} elsewhere; "
          f"{census['hidden_sinks']} hidden (after a row's first) in {census['heads_with_hidden_sinks']} of {census['heads']} heads")
    print(f"\n{'task':<12} {'seed':>4} {'stat':<7} {'heads':>5} {'calib acc':>15} {'test acc w/o':>12} {'test acc w/':>11} {'gain':>7}")
    for r in rows:
        calib = f"{r['calibration_accuracy'][0]:.3f}->{r['calibration_accuracy'][1]:.3f}" if r["calibration_accuracy"] else "all heads"
        print(f"{r['task']:<12} {r['seed']:>4} {r['stat']:<7} {r['heads']:>5} {calib:>15} {r['test_accuracy_without']:>12.3f} "
              f"{r['test_accuracy_with']:>11.3f} {r['gain']:>+7.3f}")
    for task in args.tasks:
        gains = [r["gain"] for r in rows if r["task"] == task and r["stat"] == "causal" and r["head_set"] != "all"]
        print(f"mean gain {task} (stat causal, {len(gains)} seeds, {rows[0]['test_prompts']} test prompts each): "
              f"{statistics.mean(gains):+.3f} (min {min(gains):+.3f}, max {max(gains):+.3f})")
    if latency:
        print(f"\nprefill {len(ids)} tokens, batch 1; heads of {first['task']} seed {first['seed']} ({first['heads']}):")
        print(f"{'backend':<8} {'prefill ms w/o':>14} {'prefill ms w/':>13} {'x':>6} {'decode tok/s w/o':>16} {'decode tok/s w/':>15}")
    for r in latency:
        print(f"{r['backend']:<8} {r['prefill_ms_without']:>14.2f} {r['prefill_ms_with']:>13.2f} {r['prefill_overhead']:>6.3f} "
              f"{r['decode_tokens_per_s_without']:>16.1f} {r['decode_tokens_per_s_with']:>15.1f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"sinks": census, "accuracy": rows, "latency": latency}, indent=1))


if __name__ == "__main__":
    main()
