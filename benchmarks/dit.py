"""Diffusion transformers on the host CPU: cost and quality of a DiT per sample, in one run.

    .venv/bin/python benchmarks/dit.py [--model zoo:tiny-dit] [--samples 500] [--runs 5]
        [--threads 2] [--out artifacts/bench-dit] [--json FILE]

For each variant of the model (today: the base model; DiffCR and uniform MoD variants join
this table as they land):
- FLOPs per sample: one guided call (batch 2: the class and the null class) counted by
  torch's FlopCounterMode on the graph that is exported, times the sampler's steps;
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
from edgec.targets.runtime import Sampler, sample_noise  # noqa: E402


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compiled(model: str, name: str, backend: str, sets: list[str], out_root: Path) -> Path:
    out = out_root / f"{model.removeprefix('zoo:')}-{name}-{backend}"
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


def variant_row(model: str, name: str, sets: list[str], args: argparse.Namespace) -> dict[str, Any]:
    artifacts = {backend: compiled(model, name, backend, sets, args.out) for backend in ("tvm", "onnx")}
    manifest = read_manifest(artifacts["onnx"])
    program = manifest["program"]
    handle = load_model(model)
    assert handle.module is not None
    module = handle.module.eval()
    example = (torch.zeros(2, *program["sample_shape"]), torch.tensor([500, 500]), torch.tensor([0, program["null_class"]]))
    row: dict[str, Any] = {"variant": name, "steps": program["steps"], "guidance": program["guidance_scale"],
                           "gflops_per_sample": flops_per_call(module, example) * program["steps"] / 1e9}

    def torch_run(entry: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            return [module(*(torch.from_numpy(np.asarray(x)) for x in inputs)).numpy()]

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
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    base = rows[0]
    lines = ["| variant | GFLOPs / sample | torch eager ms | edgec TVM ms | edgec ORT ms | class accuracy | FID (classifier features) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        ratio = "" if row is base else f" ({row['gflops_per_sample'] / base['gflops_per_sample']:.2f}x)"
        lines.append(f"| {row['variant']} | {row['gflops_per_sample']:.2f}{ratio} | {row['torch_ms']:.0f} | {row['tvm_ms']:.0f} | "
                     f"{row['onnx_ms']:.0f} | {row['class_accuracy']:.1%} | {row['fid']:.2f} |")
    lines.append(f"\nFID floor (as many real training images as samples): {base['fid_real_floor']:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:tiny-dit")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench-dit"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--grid", type=Path, default=None, help="also draw 8 samples of every class (one row each) into this PNG")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    rows = [variant_row(args.model, "base", [], args)]
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
        args.json.write_text(json.dumps({"model": args.model, "samples": args.samples, "runs": args.runs, "threads": args.threads,
                                         "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
