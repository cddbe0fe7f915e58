"""Train the Fashion-MNIST classifier that scores generated images (edgec/zoo/fashion-classifier).

Usage (from the repository root)::

    .venv/bin/python scripts/train_fashion_classifier.py            # 3 epochs, ~3 minutes on 2 cores

Writes model.safetensors and metrics.json (test accuracy, epochs, time) to a temporary
directory beside the output and renames it into place when complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from edgec import fashion  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "edgec" / "zoo" / "fashion-classifier"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    images, labels = fashion.load("train")
    test_images, test_labels = fashion.load("test")
    model = fashion.classifier_module()()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = rng.permutation(len(images))
        for step, first in enumerate(range(0, len(order), 128)):
            batch = order[first : first + 128]
            # A one-pixel random shift: the generated items are not always centred like the data.
            shift = tuple(int(s) for s in rng.integers(-1, 2, size=2))
            x = torch.roll(torch.from_numpy(images[batch]), shifts=shift, dims=(2, 3))
            logits, _ = model(x)
            loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels[batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 100 == 0:
                print(f"epoch {epoch + 1}/{args.epochs} step {step} loss {loss.item():.3f}", flush=True)
    model.eval()
    predicted, _ = fashion.classify(model, test_images)
    accuracy = float((predicted == test_labels).mean())
    minutes = (time.perf_counter() - start) / 60
    print(f"test accuracy {accuracy:.4f} after {args.epochs} epochs, {minutes:.1f} min")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.tmp-", dir=args.out.parent))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(staging / "model.safetensors"))
    metrics = {"test_accuracy": accuracy, "epochs": args.epochs, "seed": args.seed, "minutes": round(minutes, 2),
               "data": str(fashion.DATA_DIR), "command": "scripts/train_fashion_classifier.py " + " ".join(argv)}
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if args.out.exists():
        shutil.rmtree(args.out)
    staging.rename(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
