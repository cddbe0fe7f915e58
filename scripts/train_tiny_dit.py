"""Train the built-in diffusion transformer ``zoo:tiny-dit`` on Fashion-MNIST.

A class-conditional DiT (diffusers' ``DiTTransformer2DModel``: adaLN-zero blocks, label
embedding with a null class for classifier-free guidance) on 32x32 greyscale items, patch
size 2, so 256 tokens per image: room for token skipping. Pixel space, no VAE. The noise
schedule is diffusers' ``DDPMScheduler`` (cosine, 1000 steps, epsilon prediction); the
weights saved are an exponential moving average of the trained ones.

Usage (from the repository root)::

    .venv/bin/python scripts/train_tiny_dit.py --minutes 45      # the committed model
    .venv/bin/python scripts/train_tiny_dit.py --steps 3000

The output is a diffusers directory: ``model_index.json``, ``transformer/``,
``scheduler/``, plus ``metrics.json`` (steps, time, final loss, command). It is
written to a temporary directory beside the output and renamed into place, every
``--save-every`` steps and at the end, so an interrupted run leaves the last complete
save.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from edgec import fashion  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "edgec" / "zoo" / "tiny-dit"
CONFIG = {"num_attention_heads": 4, "attention_head_dim": 24, "in_channels": 1, "out_channels": 1, "num_layers": 6,
          "sample_size": fashion.SIZE, "patch_size": 2, "num_embeds_ada_norm": len(fashion.CLASSES)}


def save(model: torch.nn.Module, scheduler: DDPMScheduler, out: Path, metrics: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    model.save_pretrained(staging / "transformer")
    scheduler.save_pretrained(staging / "scheduler")
    index = {"_class_name": "DiTPipeline", "_diffusers_version": diffusers.__version__,
             "transformer": ["diffusers", "DiTTransformer2DModel"], "scheduler": ["diffusers", "DDPMScheduler"],
             "id2label": {str(i): name for i, name in enumerate(fashion.CLASSES)}}
    (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="train exactly this many steps")
    parser.add_argument("--minutes", type=float, default=45.0, help="without --steps: fit the step count to this budget")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    rng = np.random.default_rng(args.seed)
    images, labels = fashion.load("train")
    model = DiTTransformer2DModel(**CONFIG)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                              clip_sample=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    alphas = scheduler.alphas_cumprod
    parameters = sum(p.numel() for p in model.parameters())
    print(f"tiny-dit: {parameters / 1e6:.2f}M parameters, {(fashion.SIZE // CONFIG['patch_size']) ** 2} tokens per image")

    steps = args.steps
    warmup = 200
    start = time.perf_counter()
    losses: list[float] = []
    step = 0
    while steps is None or step < steps:
        if steps is None and step == 20:  # time the first steps, then fix the count that fits the budget
            per_step = (time.perf_counter() - start) / 20
            steps = max(100, int(args.minutes * 60 / per_step))
            print(f"{per_step:.2f} s/step: training {steps} steps", flush=True)
        batch = rng.integers(0, len(images), size=args.batch)
        x0 = torch.from_numpy(images[batch])
        y = torch.from_numpy(labels[batch])
        t = torch.from_numpy(rng.integers(0, scheduler.config.num_train_timesteps, size=args.batch))
        noise = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        model.train()  # the label embedding drops 10% of the labels to the null class: guidance needs it
        loss = torch.nn.functional.mse_loss(model(xt, t, y).sample, noise)
        total = steps or 10**9
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * min(1.0, step / total))) * 0.9 + 0.1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        decay = 0.0 if step < warmup else min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(f"step {step}/{steps} loss {np.mean(losses[-50:]):.4f} lr {lr:.2e} "
                  f"{(time.perf_counter() - start) / 60:.1f} min", flush=True)
        if step % args.save_every == 0 or step == steps:
            metrics = {"steps": step, "batch": args.batch, "seed": args.seed, "parameters": parameters,
                       "final_loss": float(np.mean(losses[-200:])), "minutes": round((time.perf_counter() - start) / 60, 1),
                       "data": str(fashion.DATA_DIR), "command": "scripts/train_tiny_dit.py " + " ".join(argv),
                       "complete": step == steps}
            save(ema, scheduler, args.out, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
