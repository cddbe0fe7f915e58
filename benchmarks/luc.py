"""Edge-LLM LUC against uniform compression and ONNX Runtime's quantizers, at one budget.

    .venv/bin/python benchmarks/luc.py [--models zoo:tiny-lm zoo:smollm2-135m] [--bits 4]
        [--sparsity 0.3] [--asymmetric] [--pruning wanda] [--group-size 32] [--tokens 4096]
        [--prompt-len 128] [--new-tokens 32] [--runs 5] [--pattern unstructured|2:4] [--out artifacts/bench-luc]

For each model, in one run and on the same held-out tokens and prompt:
- edgec TVM artifacts: dense fp32; `luc` with policy uniform (the budget on every
  layer); `luc` with policy sensitivity (LUC). Same recipe otherwise
  (recipes/luc-w4-s30.yaml), each with the `schedule` pass's measured kernels.
- peers, from edgec's dense ONNX artifact: ONNX Runtime quantize_dynamic (int8 weights,
  MatMulInteger) and ORT's MatMulNBitsQuantizer (4-bit RTN, symmetric, block 32).
Prints held-out perplexity, artifact bytes, prefill latency (median of warm runs) and
decode tokens/s, with ratios to the dense fp32 TVM artifact. Keep the machine idle.

With `--pattern 2:4` (and `--sparsity 0.5`) the pruning is N:M and one more artifact is
built: the same LUC weights stored dense (`luc.sparse_storage=dense`), to show what the
compressed storage and the schedule pass's sparse-or-decode kernel choice change.

    .venv/bin/python benchmarks/luc.py --ablation [--models zoo:smollm2-135m] [--group-sizes 16 64 192]

instead runs the pass in torch (no compile) with the recipe's calibration and prints
held-out perplexity for: 4 bits everywhere with no pruning (round to nearest, and
quantizer best), and the per-layer bits policy over 2/3/4/8 bits with no pruning;
`--group-sizes` adds 4 bits everywhere (rtn and best) at other group sizes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_latency import runtime_timings  # noqa: E402

from edgec.artifact import MANIFEST, open_runtime, read_manifest  # noqa: E402
from edgec.compiler import compile_model  # noqa: E402
from edgec.data import held_out_slice  # noqa: E402
from edgec.evaluate import evaluation_ids, perplexity, runtime_logits_fn  # noqa: E402
from edgec.model import load_model  # noqa: E402
from edgec.passes import options_for  # noqa: E402
from edgec.recipe import load_recipe  # noqa: E402

LUC_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "luc-w4-s30.yaml"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compiled(model: str, name: str, recipe_path: Path | None, sets: list[str], out_root: Path) -> Path:
    out = out_root / f"{model.removeprefix('zoo:')}-{name}"
    if (out / MANIFEST).is_file():
        return out
    recipe = load_recipe(recipe_path, [*sets, "max_context=512", "evaluate.tokens=0"], options_for)
    compile_model(model, recipe, out, force=True, progress=lambda m: _log(f"  [{name}] {m}"))
    return out


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class OrtEntries:
    """prefill/decode ONNX graphs of an edgec artifact, rewritten by an ORT quantizer."""

    def __init__(self, directory: Path) -> None:
        import onnxruntime as ort

        self.sessions = {
            name: ort.InferenceSession(str(directory / f"{name}.onnx"), providers=["CPUExecutionProvider"])
            for name in ("prefill", "decode")
        }

    def run(self, entry: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        session = self.sessions[entry]
        return list(session.run(None, dict(zip([i.name for i in session.get_inputs()], inputs))))


def ort_peer(dense_onnx: Path, kind: str, out_root: Path) -> Path:
    """Fold the dense graphs (ORT basic optimizations turn Transpose(W) into a constant B,
    which both quantizers need), then quantize each entry: 'int8' (quantize_dynamic) or
    'q4' (MatMulNBitsQuantizer, 4 bits, block 32, symmetric)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out = out_root / f"{dense_onnx.name}-ort-{kind}"
    if (out / "done").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    work = out / "folded"
    work.mkdir(parents=True)
    for name in ("prefill", "decode"):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(work / f"{name}.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{name}.bin")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(dense_onnx / "model" / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
        target = out / f"{name}.onnx"
        if kind == "int8":
            quantize_dynamic(
                str(work / f"{name}.onnx"), str(target), weight_type=QuantType.QInt8, use_external_data_format=True
            )
        else:
            model = onnx.load(str(work / f"{name}.onnx"))
            quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True)
            quantizer.process()
            onnx.save_model(
                quantizer.model.model, str(target), save_as_external_data=True, location=f"{name}.data", size_threshold=1024
            )
    shutil.rmtree(work)
    (out / "done").write_text("")
    return out


def evaluate_runtime(
    runtime: Any, program: dict[str, Any], tokenizer: Any, ids: list[int], label: str, prompt: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    ppl = perplexity(runtime_logits_fn(runtime, program), ids, tokenizer, 256, label)
    prefill_ms, rate, _ = runtime_timings(runtime, prompt, args.new_tokens, args.runs)
    return {"perplexity": ppl.perplexity, "prefill_ms": prefill_ms, "decode_tokens_per_s": rate}


def ablation(models: list[str], tokens: int, group_sizes: list[int]) -> None:
    from edgec.data import calibration_segments
    from edgec.evaluate import torch_logits_fn
    from edgec.passes.luc import Luc, LucOptions
    from edgec.pipeline import PassContext
    from edgec.recipe import Recipe

    recipe = load_recipe(LUC_RECIPE, [], options_for)
    spec = recipe.passes[0]
    variants = {
        "dense fp32": None,
        "4 bits everywhere, round to nearest": {"bit_choices": [4], "sparsity": 0.0, "quantizer": "rtn"},
        "4 bits everywhere, quantizer best": {"bit_choices": [4], "sparsity": 0.0},
        "bits policy over 2/3/4/8 (mean 4), best": {"bit_choices": [2, 3, 4, 8], "sparsity": 0.0},
    }
    # SmolLM2's shipped weights were 4-bit at group 32: the same at other group sizes.
    for group in group_sizes:
        for quantizer in ("rtn", "best"):
            name = f"4 bits everywhere, {quantizer}, group {group}"
            variants[name] = {"bit_choices": [4], "sparsity": 0.0, "quantizer": quantizer, "group_size": group}
    print(f"{'model':<18} {'variant':<42} {'ppl':>8}  per-layer bits")
    for model in models:
        for name, changes in variants.items():
            handle = load_model(model)
            bits = ""
            if changes is not None:
                options = {**spec.options, **changes}
                calibration = recipe.calibration
                segments = lambda: calibration_segments(handle.tokenizer, calibration.data, calibration.samples, calibration.seq_len)  # noqa: E731
                result = Luc(LucOptions(**options), []).run(handle, PassContext(Recipe(), calibration_ids=segments))
                bits = " ".join(str(row["bits"]) for row in result.record["layers"])
            ids, label = evaluation_ids(handle.tokenizer, "held-out", tokens)
            ppl = perplexity(torch_logits_fn(handle.module), ids, handle.tokenizer, 256, label)
            print(f"{model:<18} {name:<42} {ppl.perplexity:>8.2f}  {bits}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["zoo:tiny-lm", "zoo:smollm2-135m"])
    parser.add_argument("--bits", type=float, default=4.0)
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--group-size", type=int, default=32, help="input channels per scale; a width it does not divide gets a ragged last group")
    parser.add_argument("--pruning", default="wanda", choices=["wanda", "sparsegpt"])
    parser.add_argument("--pattern", default="unstructured", help="unstructured or N:M, e.g. 2:4 (then --sparsity 0.5)")
    parser.add_argument("--asymmetric", action="store_true")
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens for perplexity")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench-luc"))
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--ablation", action="store_true", help="perplexity of bit policies in torch, no compile")
    parser.add_argument(
        "--group-sizes", nargs="*", type=int, default=[], help="--ablation: also 4 bits everywhere at these group sizes"
    )
    args = parser.parse_args()
    if args.ablation:
        ablation(args.models, args.tokens, args.group_sizes)
        return

    rows: list[dict[str, Any]] = []
    for model in args.models:
        handle = load_model(model)
        tokenizer = handle.tokenizer
        ids, label = evaluation_ids(tokenizer, "held-out", args.tokens)
        prompt = held_out_slice(tokenizer, args.prompt_len)
        group = 16 if model == "zoo:tiny-lm" else args.group_size
        luc = [
            f"luc.bits={args.bits}", f"luc.sparsity={args.sparsity}", f"luc.group_size={group}",
            f"luc.pruning={args.pruning}", f"luc.symmetric={'false' if args.asymmetric else 'true'}",
            f"luc.pattern={args.pattern}",
        ]
        pattern = "" if args.pattern == "unstructured" else "-" + args.pattern.replace(":", "of")
        tag = f"w{args.bits:g}-s{args.sparsity:g}{pattern}-g{group}-{args.pruning}{'-asym' if args.asymmetric else ''}"
        built = {
            # Dense gets the same measured kernel choice (schedule pass) as the compressed ones.
            "dense fp32 (edgec tvm)": compiled(
                model, "dense-tvm-scheduled", None, ["backend=tvm", "passes=schedule", "schedule.trials=4"], args.out
            ),
            "uniform (edgec tvm)": compiled(model, f"uniform-{tag}", LUC_RECIPE, [*luc, "luc.policy=uniform"], args.out),
            "LUC (edgec tvm)": compiled(model, f"luc-{tag}", LUC_RECIPE, [*luc, "luc.policy=sensitivity"], args.out),
        }
        if pattern:
            built["LUC, N:M stored dense"] = compiled(
                model, f"luc-{tag}-dense-storage", LUC_RECIPE, [*luc, "luc.policy=sensitivity", "luc.sparse_storage=dense"], args.out
            )
        dense_onnx = compiled(model, "dense-onnx", None, ["backend=onnx"], args.out)
        results: dict[str, dict[str, Any]] = {}
        for name, path in built.items():
            _log(f"measuring {model} {name} ...")
            manifest = read_manifest(path)
            result = evaluate_runtime(open_runtime(path, manifest), manifest["program"], tokenizer, ids, label, prompt, args)
            result["bytes"] = directory_bytes(path / "model")
            records = [p["record"] for p in manifest["passes"] if p["name"] == "luc"]
            if records:
                result["achieved"] = records[0]["achieved"]
                result["sparsity_storage"] = records[0]["sparsity_storage"]
            kernels = manifest["backend_record"].get("nm_kernels", {}).get("decode", [])
            if kernels:
                result["decode_sparse_kernels"] = f"{sum(k['kernel'] == 'sparse' for k in kernels)}/{len(kernels)}"
            results[name] = result
        for kind, name in (("int8", "ORT quantize_dynamic int8"), ("q4", "ORT MatMulNBits 4-bit RTN")):
            path = ort_peer(dense_onnx, kind, args.out)
            _log(f"measuring {model} {name} ...")
            # The peer's graphs are the dense artifact's entries, quantized: its program drives them.
            result = evaluate_runtime(OrtEntries(path), read_manifest(dense_onnx)["program"], tokenizer, ids, label, prompt, args)
            result["bytes"] = directory_bytes(path) - (path / "done").stat().st_size
            results[name] = result
        base = results["dense fp32 (edgec tvm)"]
        for name, result in results.items():
            rows.append(
                {
                    "model": model,
                    "artifact": name,
                    **result,
                    "bytes_vs_dense": result["bytes"] / base["bytes"],
                    "ppl_vs_dense": result["perplexity"] / base["perplexity"],
                    "prefill_vs_dense": result["prefill_ms"] / base["prefill_ms"],
                    "decode_vs_dense": result["decode_tokens_per_s"] / base["decode_tokens_per_s"],
                }
            )

    print(f"\nbudget: mean {args.bits:g} bits, mean sparsity {args.sparsity:g} ({args.pattern}), {args.pruning}, "
          f"{'asymmetric' if args.asymmetric else 'symmetric'} groups; perplexity over {args.tokens} held-out tokens; "
          f"prefill {args.prompt_len} tokens, decode {args.new_tokens} tokens, batch 1, median of warm runs")
    header = f"{'model':<18} {'artifact':<28} {'ppl':>8} {'x dense':>7} {'MB':>7} {'x dense':>7} {'prefill ms':>10} {'x dense':>7} {'tok/s':>7} {'x dense':>7}"
    print(header)
    for row in rows:
        print(
            f"{row['model']:<18} {row['artifact']:<28} {row['perplexity']:>8.2f} {row['ppl_vs_dense']:>7.3f} "
            f"{row['bytes'] / 1e6:>7.2f} {row['bytes_vs_dense']:>7.3f} {row['prefill_ms']:>10.1f} {row['prefill_vs_dense']:>7.2f} "
            f"{row['decode_tokens_per_s']:>7.1f} {row['decode_vs_dense']:>7.2f}"
        )
    for row in rows:
        if "sparsity_storage" in row:
            storage = row["sparsity_storage"]
            kernels = f"; sparse kernels in decode: {row['decode_sparse_kernels']} workloads" if "decode_sparse_kernels" in row else ""
            print(f"{row['model']} {row['artifact']}: sparsity saves {storage['bytes_saved']} bytes as stored "
                  f"({storage['stored']}){kernels}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
