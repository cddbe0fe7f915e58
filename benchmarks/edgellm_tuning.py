"""Edge-LLM adaptive layer tuning against vanilla LoRA tuning, and voting against the last exit.

    .venv/bin/python benchmarks/edgellm_tuning.py [--model zoo:smollm2-135m] [--stride 10]
        [--steps 30] [--batch 4] [--seq-len 128] [--measure-steps 4] [--tokens 4096] [--json FILE]
        [--recipe recipes/luc-w4-s30.yaml]   (tune the LUC-compressed model instead)

In one run, on this CPU, at the same batch and sequence length:
1. Memory and time of a training step, each mode in a fresh process: Edge-LLM (LoRA in the
   window below one exit, the forward stopped at the exit, the layers below the window
   without autograd) and vanilla LoRA (adapters in every layer, every layer with
   autograd, loss at the last layer). Measured: the bytes autograd keeps for the backward
   pass (saved-tensor hooks, parameters excluded), the optimizer state and gradients
   (AdamW's tensors), the peak resident memory above the loaded model (RSS sampled every
   2 ms), and the mean step time (the first step of each exit not counted). Edge-LLM's
   figures are the worst exit's memory and the mean over all exits' steps.
2. Quality: held-out perplexity and the built-in tasks' test accuracy (wordnet,
   shakespeare; seed 0) of the model before tuning (its own head; and voting with the
   untrained exit heads), after Edge-LLM tuning (--steps per exit; last exit alone and
   voting), and after vanilla LoRA tuning with the same total number of steps. Torch
   runs every figure; compiled artifacts match it (their parity checks).
With --recipe, the recipe's passes (through the pass cache, as `edgec finetune` runs them)
compress the model first and every figure is of the compressed model, adapters on top.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgec.data import training_windows
from edgec.evaluate import quality as held_out_quality
from edgec.finetune.edge_llm import EdgeLlmOptions, EdgeLlmTuner
from edgec.model import load_model

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class PeakRss:
    """Resident memory sampled every 2 ms on a thread: its peak."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def saved_bytes_of(loss_fn: Any, parameter_storages: set[int]) -> tuple[torch.Tensor, int]:
    """Run loss_fn() and count the distinct storages autograd saves for backward (not parameters)."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    return loss, sum(seen.values())


def load(model: str, recipe_path: Path | None) -> Any:
    """The model, compressed by the recipe's passes if one is given."""
    handle = load_model(model)
    if recipe_path is not None:
        from edgec.finetune import run_recipe_passes
        from edgec.passes import options_for
        from edgec.recipe import load_recipe

        run_recipe_passes(handle, load_recipe(recipe_path, [], options_for), lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    return handle


def measure(model: str, recipe: Path | None, mode: str, options: EdgeLlmOptions, batch: int, seq_len: int, steps: int) -> dict[str, Any]:
    """One mode's memory and step time (run in a fresh process by the parent)."""
    torch.manual_seed(0)
    handle = load(model, recipe)
    tuner = EdgeLlmTuner(handle.module, options, seed=0)
    windows = torch.tensor(training_windows(handle.tokenizer, "train", steps * batch, seq_len, 0))
    storages = {p.untyped_storage().data_ptr() for p in handle.module.parameters()}
    loaded = rss_bytes()
    plan = list(tuner.stages) if mode == "edge-llm" else [None]  # None: vanilla LoRA
    rows = []
    with PeakRss() as peak:
        for stage in plan:
            params = tuner.set_trainable(stage)
            optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
            times, saved = [], []
            for step in range(steps):
                chunk = windows[step * batch : (step + 1) * batch]
                began = time.perf_counter()
                loss, kept = saved_bytes_of(lambda: tuner.loss(stage, chunk), storages)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=False)
                times.append(time.perf_counter() - began)
                saved.append(kept)
            state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
            grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
            rows.append({"exit": None if stage is None else stage.exit_layer, "step_ms": [1e3 * t for t in times[1:]],
                         "saved_bytes": max(saved), "optimizer_bytes": state, "grad_bytes": grads,
                         "trainable": sum(p.numel() for p in params)})
            del optimizer
    return {
        "mode": mode,
        "step_ms_mean": statistics.mean(t for r in rows for t in r["step_ms"]),
        "saved_bytes": max(r["saved_bytes"] for r in rows),
        "optimizer_and_grad_bytes": max(r["optimizer_bytes"] + r["grad_bytes"] for r in rows),
        "trainable_max": max(r["trainable"] for r in rows),
        "rss_above_loaded_bytes": peak.peak - loaded,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "per_exit": rows,
    }


def quality(tuner: EdgeLlmTuner, tokenizer: Any, voting: list[int], tokens: int, samples: int) -> dict[str, Any]:
    """Held-out perplexity and task accuracy with these exits voting (torch)."""
    assert tuner.heads is not None
    tuner.heads.voting = voting
    entries = tuner.entries.eval()

    def logits(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return entries.prefill(torch.from_numpy(ids))[0].numpy()

    return held_out_quality(logits, tokenizer, tokens, samples)


def train(tuner: EdgeLlmTuner, windows: torch.Tensor, batch: int, steps: int, lr: float, vanilla: bool) -> list[float]:
    """Edge-LLM: `steps` per exit, each exit on its own windows; vanilla: all those steps
    over the same windows in order (both see every window once)."""
    losses = []
    plan = [None] if vanilla else list(tuner.stages)
    for index, stage in enumerate(plan):
        optimizer = torch.optim.AdamW(tuner.set_trainable(stage), lr=lr, weight_decay=0.0)
        total = steps * len(tuner.stages) if stage is None else steps
        for step in range(total):
            start = (index * steps + step) * batch
            chunk = windows[start : start + batch]
            loss = tuner.loss(stage, chunk)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        print(f"  trained {'vanilla' if stage is None else f'exit {stage.exit_layer}'}: loss {losses[-total]:.3f} -> "
              f"{statistics.mean(losses[-min(10, total):]):.3f}", file=sys.stderr, flush=True)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="zoo:smollm2-135m")
    parser.add_argument("--stride", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="training steps per exit for the quality figures")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--measure-steps", type=int, default=4, help="steps per exit (and of vanilla) for memory and time")
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens for perplexity")
    parser.add_argument("--samples", type=int, default=120, help="test prompts per task")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--recipe", type=Path, help="compress the model with this recipe's passes first (e.g. recipes/luc-w4-s30.yaml)")
    parser.add_argument("--measure", choices=["edge-llm", "vanilla"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    options = EdgeLlmOptions(stride=args.stride, rank=args.rank, alpha=2.0 * args.rank)
    if args.measure:
        print(json.dumps(measure(args.model, args.recipe, args.measure, options, args.batch, args.seq_len, args.measure_steps)))
        return
    torch.set_num_threads(int(os.environ.get("EDGEC_THREADS", torch.get_num_threads())))
    if args.recipe is not None:
        load(args.model, args.recipe)  # once here, so the measuring processes find it in the pass cache
    figures: dict[str, Any] = {"model": args.model, "recipe": None if args.recipe is None else str(args.recipe), "stride": args.stride,
                               "rank": args.rank, "lr": args.lr, "steps_per_exit": args.steps, "batch": args.batch,
                               "seq_len": args.seq_len, "threads": torch.get_num_threads()}
    modes = {}
    for mode in ("edge-llm", "vanilla"):
        command = [sys.executable, __file__, "--measure", mode, "--model", args.model, "--stride", str(args.stride), "--rank",
                   str(args.rank), "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--measure-steps", str(args.measure_steps)]
        command += [] if args.recipe is None else ["--recipe", str(args.recipe)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        modes[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    figures["memory_time"] = modes
    edge, vanilla = modes["edge-llm"], modes["vanilla"]
    mib = 1 / 2**20
    compressed = "" if args.recipe is None else f" compressed by {args.recipe}"
    print(f"{args.model}{compressed}: batch {args.batch} x {args.seq_len} tokens, stride {args.stride}, rank {args.rank}, "
          f"{figures['threads']} threads")
    print(f"{'':<24} {'edge-llm':>12} {'vanilla LoRA':>14} {'vanilla/edge':>13}")
    for key, name, scale in (("saved_bytes", "activations kept (MiB)", mib), ("optimizer_and_grad_bytes", "optimizer+grads (MiB)", mib),
                             ("rss_above_loaded_bytes", "RSS above model (MiB)", mib), ("step_ms_mean", "step time (ms)", 1.0)):
        print(f"{name:<24} {edge[key] * scale:>12.1f} {vanilla[key] * scale:>14.1f} {vanilla[key] / max(edge[key], 1e-9):>12.2f}x")
    both = (edge["saved_bytes"] + edge["optimizer_and_grad_bytes"], vanilla["saved_bytes"] + vanilla["optimizer_and_grad_bytes"])
    print(f"{'training memory (MiB)':<24} {both[0] * mib:>12.1f} {both[1] * mib:>14.1f} {both[1] / both[0]:>12.2f}x")

    handle = load(args.model, args.recipe)
    tokenizer = handle.tokenizer
    tuner = EdgeLlmTuner(handle.module, options, seed=0)
    windows = torch.tensor(training_windows(tokenizer, "train", args.steps * args.batch * len(tuner.stages), args.seq_len, 0))
    last = tuner.stages[-1].exit_layer
    every = [s.exit_layer for s in tuner.stages]
    rows: dict[str, dict[str, Any]] = {}
    rows["before: model's head"] = quality(tuner, tokenizer, [last], args.tokens, args.samples)
    rows["before: voting (untrained exits)"] = quality(tuner, tokenizer, every, args.tokens, args.samples)
    began = time.perf_counter()
    train(tuner, windows, args.batch, args.steps, args.lr, vanilla=False)
    figures["edge_llm_train_seconds"] = time.perf_counter() - began
    rows["edge-llm: last exit"] = quality(tuner, tokenizer, [last], args.tokens, args.samples)
    rows["edge-llm: voting"] = quality(tuner, tokenizer, every, args.tokens, args.samples)
    vanilla_tuner = EdgeLlmTuner(load(args.model, args.recipe).module, options, seed=0)
    began = time.perf_counter()
    train(vanilla_tuner, windows, args.batch, args.steps, args.lr, vanilla=True)
    figures["vanilla_train_seconds"] = time.perf_counter() - began
    rows["vanilla LoRA: last layer"] = quality(vanilla_tuner, tokenizer, [last], args.tokens, args.samples)
    figures["quality"] = rows
    print(f"\nquality ({args.steps} steps per exit; vanilla {args.steps * len(every)} steps; lr {args.lr}; each window of the "
          f"train split seen once; ppl over {args.tokens} held-out tokens)")
    print(f"{'':<34} {'ppl':>8} {'wordnet':>8} {'shakespeare':>12}")
    for name, row in rows.items():
        print(f"{name:<34} {row['ppl']:>8.2f} {row['wordnet']:>8.3f} {row['shakespeare']:>12.3f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
