"""TVM CUDA artifacts on a real GPU, against PyTorch eager on the same GPU and inputs.

Runs on the GPU machine itself (the host is the device), with only what a device
has: numpy, the TVM runtime (no compiler) and, for the peer, torch + transformers.
For each artifact it does what `edgec deploy` and `edgec profile` do on a device,
through the same device-side agent (targets/agent.py): check every file's sha256,
the runtime version and the GPU's compute capability; run the reference inputs
and compare with the torch outputs stored in the artifact; then time prefill and
decode. The peer is the artifact's source model (an HF directory) in PyTorch eager,
on the same prompt ids, in the artifact's dtype.

    python3 benchmarks/cuda_device.py --model edgec/zoo/tiny-lm ART_FP32 ART_FP16 \\
        [--runs 50] [--warmup 10] [--prompt-len 128] [--new-tokens 64] [--out result.json]

Prints one table with ratios to torch (latency: lower is better; tokens/s: higher).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

AGENT = Path(__file__).resolve().parent.parent / "targets" / "agent.py"


def agent(command: str, artifact: Path, *args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(AGENT), command, str(artifact), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"agent {command} {artifact} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prompt_ids(artifact: Path, length: int) -> np.ndarray:
    """The agent's profile prompt: the artifact's reference prompt, repeated to `length`."""
    sys.path.insert(0, str(AGENT.parent))
    from runtime import profile_prompt, read_safetensors

    return profile_prompt(read_safetensors(artifact / "reference.safetensors"), length)


def torch_peer(model_dir: Path, dtype_name: str, ids: np.ndarray, runs: int, warmup: int, new_tokens: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "float16": torch.float16}[dtype_name]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).cuda().eval()
    x = torch.from_numpy(ids).cuda()

    def prefill() -> Any:
        out = model(input_ids=x, use_cache=True)
        torch.cuda.synchronize()
        return out

    with torch.no_grad():
        for _ in range(warmup):
            prefill()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            out = prefill()
            times.append((time.perf_counter() - start) * 1e3)
        past, logits = out.past_key_values, out.logits
        decode_ms = []
        for _ in range(new_tokens):
            token = logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            step = model(input_ids=token, past_key_values=past, use_cache=True)
            torch.cuda.synchronize()
            decode_ms.append((time.perf_counter() - start) * 1e3)
            past, logits = step.past_key_values, step.logits
    return {
        "prefill_p50_ms": float(np.percentile(times, 50)),
        "decode_tokens_per_s": 1e3 / float(np.median(decode_ms)) if decode_ms else None,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--model", type=Path, required=True, help="the HF directory the artifacts were compiled from")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    rows = []
    for artifact in args.artifacts:
        manifest = json.loads((artifact / "manifest.json").read_text())
        dtype = manifest["recipe"].get("dtype", "float32")
        check = agent("check", artifact)
        if not check["hashes_ok"] or check["missing_features"]:
            raise SystemExit(f"{artifact}: device check failed: {check}")
        parity = agent("parity", artifact)
        profile = agent("profile", artifact, str(args.runs), str(args.warmup), str(args.prompt_len), str(args.new_tokens))
        peer = torch_peer(args.model, dtype, prompt_ids(artifact, args.prompt_len), args.runs, args.warmup, args.new_tokens)
        rows.append({"artifact": artifact.name, "dtype": dtype, "check": check, "parity": parity, "profile": profile, "torch": peer})
        print(f"{artifact.name}: parity ok={parity['ok']} max|diff|={parity['max_abs_diff']:.3g} (tolerance {parity['tolerance']:.3g})", flush=True)

    print(f"\nGPU: {rows[0]['torch']['gpu']}; prompt {args.prompt_len} tokens, {args.new_tokens} decode steps, {args.runs} timed runs")
    print(f"{'artifact':<28} {'dtype':<8} {'load ms':>8} {'prefill p50 ms':>15} {'torch ms':>9} {'ratio':>6} {'decode tok/s':>13} {'torch':>7} {'ratio':>6}")
    for row in rows:
        prof, peer = row["profile"], row["torch"]
        p50, tp50 = prof["latency"]["p50_ms"], peer["prefill_p50_ms"]
        tps, ttps = prof["decode_tokens_per_s"], peer["decode_tokens_per_s"]
        print(
            f"{row['artifact']:<28} {row['dtype']:<8} {prof['load_ms']:8.1f} {p50:15.3f} {tp50:9.3f} {p50 / tp50:6.2f}"
            f" {tps:13.1f} {ttps:7.1f} {tps / ttps:6.2f}"
        )
        top = sorted(prof["per_op_ms"].items(), key=lambda kv: -kv[1])[:5]
        print("    top kernels (ms, one instrumented prefill): " + ", ".join(f"{name} {ms:.3f}" for name, ms in top))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
