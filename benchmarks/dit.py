"""Diffusion transformers on the host CPU: cost and quality of a DiT per sample, in one run.

    .venv/bin/python benchmarks/dit.py [--model zoo:tiny-dit] [--control DIR]
        [--diffcr 0.8=DIR ...] [--uniform 0.8=DIR ...] [--samples 500] [--runs 5]
        [--threads 2] [--out artifacts/bench-dit] [--json FILE] [--grid PNG]
        [--variant-grid PNG]

Variants: the base model; `--diffcr R=DIR`, a tuning of it by `edgec finetune MODEL
--method diffcr --ratio R` compiled with its learned ratios (recipes/diffcr.yaml); and
`--uniform R=DIR`, a tuning with `--set finetune.options.learn_ratios=false` (the same
training, every block and step fixed at R: uniform MoD) compiled with
`mod.policy=uniform mod.ratio=R`; and `--control DIR`, the base tuned the same way with
no skipping (`--ratio 1 --set finetune.options.learn_ratios=false`), which separates what
the variants' extra training does from what skipping does. For each:
- FLOPs per sample: one guided call (batch 2: the class and the null class) of each
  timestep region's graph, counted by torch's FlopCounterMode on the module that is
  exported, times the sampler steps that fall in that region;
- latency per sample at the recipe's 20 steps: the whole sampler loop, median of `--runs`
  samples after one warm-up, in PyTorch eager and in edgec's TVM and ONNX Runtime
  artifacts, with `--threads` threads each;
- quality: `--samples` images spread over the ten classes, drawn by the ONNX Runtime
  artifact (what ships; its parity check ties it to torch): the share the Fashion-MNIST
  classifier puts in the asked class, and the Fréchet distance of the classifier's
  features to the real test set ("FID" on those features, not Inception's), next to the
  floor that as many real training images reach.
Keep the machine idle.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgec.artifact import MANIFEST, open_runtime, read_manifest  # noqa: E402
from edgec.compiler import compile_model  # noqa: E402
from edgec.families.dit import draw, quality, write_grid  # noqa: E402
from edgec.model import load_model  # noqa: E402
from edgec.passes import options_for  # noqa: E402
from edgec.recipe import load_recipe  # noqa: E402
from edgec.targets.runtime import Sampler, sample_noise, sampler_timesteps  # noqa: E402


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compiled(model: str, name: str, backend: str, sets: list[str], out_root: Path) -> Path:
    out = out_root / f"{re.sub('[^a-z0-9.]+', '-', name.lower())}-{backend}"
    if not (out / MANIFEST).is_file():
        recipe = load_recipe(None, [*sets, f"backend={backend}"], options_for)
        compile_model(model, recipe, out, force=True, progress=lambda m: _log(f"  [{name} {backend}] {m}"))
    return out


def flops_per_call(module: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*example)
    return int(counter.get_total_flops())


def sample_ms(run: Any, program: dict[str, Any], runs: int) -> float:
    """Median wall time of whole samples (class i % 10, seed i) after one warm-up."""
    sampler = Sampler(program)
    steps, guidance = int(program["steps"]), float(program["guidance_scale"])
    times = []
    for i in range(runs + 1):
        start, draws = sample_noise(program, i, steps)
        began = time.perf_counter()
        sampler.sample(run, i % 10, start, steps, guidance, draws)
        if i:
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def region_modules(model: str, manifest: dict[str, Any]) -> dict[str, torch.nn.Module]:
    """Each entry's torch module, capacities as the artifact fixed them."""
    handle = load_model(model)
    assert handle.module is not None
    mod = manifest["dit"].get("mod")
    if not mod:
        return {"denoise": handle.module.eval()}
    from edgec.families.dit import RegionDenoiser  # the model's loader attached the tuned routers

    return {entry: RegionDenoiser(handle.module, list(capacities)).eval() for entry, capacities in zip(mod["entries"], mod["capacities"])}


GRID_CLASSES = list(range(8))  # one row per variant in the comparison grid, the same seeds in every row
GRID_SEED = 100


def variant_row(model: str, name: str, sets: list[str], args: argparse.Namespace) -> tuple[dict[str, Any], np.ndarray]:
    """The variant's figures, and its row of the comparison grid."""
    artifacts = {backend: compiled(model, name, backend, sets, args.out) for backend in ("tvm", "onnx")}
    manifest = read_manifest(artifacts["onnx"])
    program = manifest["program"]
    modules = region_modules(model, manifest)
    sampler = Sampler(program)
    steps_in = [sampler.entry_at(t) for t, _ in sampler_timesteps(program["scheduler"], int(program["steps"]))]
    example = (torch.zeros(2, *program["sample_shape"]), torch.tensor([500, 500]), torch.tensor([0, program["null_class"]]))
    flops = sum(flops_per_call(modules[entry], example) * steps_in.count(entry) for entry in modules)
    mod = manifest["dit"].get("mod") or {}
    kept = (sum(map(sum, mod["capacities"])) / (manifest["dit"]["tokens"] * manifest["dit"]["layers"] * len(mod["capacities"]))
            if mod else 1.0)
    row: dict[str, Any] = {"variant": name, "model": model, "steps": program["steps"], "guidance": program["guidance_scale"],
                           "block_tokens_kept": kept, "gflops_per_sample": flops / 1e9}

    def torch_run(entry: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            return [modules[entry](*(torch.from_numpy(np.asarray(x)) for x in inputs)).numpy()]

    _log(f"[{name}] latency: torch eager")
    row["torch_ms"] = sample_ms(torch_run, program, args.runs)
    runtimes = {}
    for backend, path in artifacts.items():
        _log(f"[{name}] latency: edgec {backend}")
        runtime = runtimes[backend] = open_runtime(path, read_manifest(path), threads=args.threads)
        row[f"{backend}_ms"] = sample_ms(lambda entry, inputs, r=runtime: r.run(entry, list(inputs)), program, args.runs)
    _log(f"[{name}] quality: {args.samples} samples with the ONNX Runtime artifact")
    classes = [i % 10 for i in range(args.samples)]
    images = draw(lambda entry, inputs: runtimes["onnx"].run(entry, list(inputs)), program, classes, 0, int(program["steps"]),
                  float(program["guidance_scale"]), _log)
    row.update(quality(images, np.asarray(classes)))
    grid = draw(lambda entry, inputs: runtimes["onnx"].run(entry, list(inputs)), program, GRID_CLASSES, GRID_SEED,
                int(program["steps"]), float(program["guidance_scale"]))
    return row, grid


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table, each figure with its ratio to the base, and the latency cut as a share of
    the FLOP cut (the goal: at least 0.8)."""
    base = rows[0]

    def vs(row: dict[str, Any], key: str, digits: str) -> str:
        figure = format(row[key], digits)
        return figure if row is base else f"{figure} ({row[key] / base[key]:.2f}x)"

    lines = ["| variant | block-tokens kept | GFLOPs / sample | torch eager ms | edgec TVM ms | edgec ORT ms | "
             "class accuracy | FID (classifier features) | latency cut / FLOP cut (TVM, ORT) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        cut = 1 - row["gflops_per_sample"] / base["gflops_per_sample"]
        shares = "" if row is base or cut <= 0 else ", ".join(
            f"{(1 - row[f'{b}_ms'] / base[f'{b}_ms']) / cut:.2f}" for b in ("tvm", "onnx"))
        lines.append(f"| {row['variant']} | {row['block_tokens_kept']:.1%} | {vs(row, 'gflops_per_sample', '.2f')} | "
                     f"{vs(row, 'torch_ms', '.0f')} | {vs(row, 'tvm_ms', '.0f')} | {vs(row, 'onnx_ms', '.0f')} | "
                     f"{row['class_accuracy']:.1%} | {vs(row, 'fid', '.2f')} | {shares} |")
    lines.append(f"\nFID floor (as many real training images as samples): {base['fid_real_floor']:.2f}")
    return "\n".join(lines)


def variant_dirs(values: list[str], flag: str) -> list[tuple[float, str]]:
    pairs = []
    for value in values:
        ratio, sep, path = value.partition("=")
        if not sep or not (path.startswith("zoo:") or Path(path).is_dir()):
            raise SystemExit(f"{flag} {value}: give RATIO=DIR (or RATIO=zoo:NAME), a model tuned by edgec finetune --method diffcr")
        pairs.append((float(ratio), path))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:tiny-dit")
    parser.add_argument("--diffcr", action="append", default=[], metavar="R=DIR", help="a DiffCR tuning at target ratio R")
    parser.add_argument("--control", default=None, metavar="DIR",
                        help="the base tuned with the variants' settings and no skipping (ratio 1, learn_ratios false)")
    parser.add_argument("--uniform", action="append", default=[], metavar="R=DIR",
                        help="a uniform-MoD tuning at ratio R (learn_ratios false)")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench-dit"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--grid", type=Path, default=None, help="also draw 8 samples of every class (one row each) into this PNG")
    parser.add_argument("--variant-grid", type=Path, default=None,
                        help="also draw classes 0-7 from the same seeds with every variant (one row each) into this PNG")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    variants = [(args.model, "base", [])]
    if args.control is not None:
        variants.append((args.control, "base, tuned alike", []))
    variants += [(path, f"DiffCR {ratio:g}", ["mod.policy=learned"]) for ratio, path in variant_dirs(args.diffcr, "--diffcr")]
    variants += [(path, f"uniform MoD {ratio:g}", ["mod.policy=uniform", f"mod.ratio={ratio}"])
                 for ratio, path in variant_dirs(args.uniform, "--uniform")]
    rows, grids = [], []
    for model, name, sets in variants:
        row, grid = variant_row(model, name, sets, args)
        rows.append(row)
        grids.append(grid)
    if args.variant_grid is not None:
        write_grid(np.concatenate(grids), args.variant_grid,
                   "rows: " + ", ".join(row["variant"] for row in rows) + f"; classes 0-7, seeds {GRID_SEED}-{GRID_SEED + 7}")
    if args.grid is not None:
        base = compiled(args.model, "base", "onnx", [], args.out)
        runtime = open_runtime(base, read_manifest(base), threads=args.threads)
        program = read_manifest(base)["program"]
        images = draw(lambda entry, inputs: runtime.run(entry, list(inputs)), program, [c for c in range(10) for _ in range(8)],
                      100, int(program["steps"]), float(program["guidance_scale"]))
        write_grid(images, args.grid, f"{args.model}: 8 samples per class (rows: classes 0-9), {program['steps']} DDIM steps, "
                   f"guidance {program['guidance_scale']}")
    text = markdown(rows)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "command": " ".join(sys.argv), "samples": args.samples, "runs": args.runs, "threads": args.threads,
                                         "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
