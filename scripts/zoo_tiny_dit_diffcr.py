"""Make zoo:tiny-dit-diffcr: zoo:tiny-dit tuned by DiffCR at a mean keep ratio of 0.8.

Usage (from the repository root)::

    .venv/bin/python scripts/zoo_tiny_dit_diffcr.py [--from DIR]   # ~15 minutes on 2 cores

Runs `edgec finetune zoo:tiny-dit --method diffcr --ratio 0.8` with the settings below
(600 steps of 32 Fashion-MNIST images, lr 1e-4, ratio-loss weight 3: at the paper's 0.3
the mean ratio was still 0.87 after 240 steps, the diffusion loss outweighing the
penalty on this small model; at 3 it holds 0.80 from step 60), or takes the output of that command
given as --from, and stores it in edgec/zoo/tiny-dit-diffcr with the transformer's
weights in float16 (half the bytes in the repository; diffusers loads them back as
float32, and everything downstream, parity included, works from what is stored).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from edgec.artifact import staged  # noqa: E402

OUT = REPO_ROOT / "edgec" / "zoo" / "tiny-dit-diffcr"
SETTINGS = ["--ratio", "0.8", "--set", "finetune.steps=600", "--set", "finetune.batch=32", "--set", "finetune.lr=1e-4",
            "--set", "finetune.checkpoint_every=50", "--set", "finetune.options.lam=3"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, default=None, help="an existing output of the finetune command")
    args = parser.parse_args(argv)
    import torch
    from diffusers import DiTTransformer2DModel

    with tempfile.TemporaryDirectory() as scratch:
        source = args.source
        if source is None:
            source = Path(scratch) / "tuned"
            edgec = Path(sys.executable).with_name("edgec")
            subprocess.run([str(edgec), "finetune", "zoo:tiny-dit", "--method", "diffcr", *SETTINGS, "-o", str(source)], check=True)
        with staged(OUT) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            shutil.rmtree(tmp / "transformer")
            (tmp / "metrics.json").unlink(missing_ok=True)  # the base's training record; finetune.json is this model's
            transformer = DiTTransformer2DModel.from_pretrained(source / "transformer", torch_dtype=torch.float32)
            transformer.to(torch.float16).save_pretrained(tmp / "transformer")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
