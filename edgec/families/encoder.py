"""The encoder family: BERT / RoBERTa text encoders, plain Hugging Face directories or
sentence-transformers ones (modules.json, 1_Pooling/config.json, Normalize), as one
entry that gives a sentence embedding:

    embed(input_ids[B, S], attention_mask[B, S]) -> embedding[B, H]

Pooling (cls, mean, max or mean/sqrt(len)) and normalisation follow the model's own
sentence-transformers configuration; a directory without one gets mean pooling. The
program is one forward; `edgec run --text` embeds text with the artifact's tokenizer,
and `edgec eval --task similarity|retrieval` scores the embeddings.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from edgec.errors import BadInputError, MissingDependencyError, UnsupportedError
from edgec.families import EvalRequest, Family, Progress, Section, register
from edgec.model import FAMILY_ENCODER, ModelHandle, load_tokenizer_files, read_config, sha256_files
from edgec.recipe import Recipe
from edgec.targets.export import ExportedEntry

ENCODER_ARCHITECTURES: tuple[str, ...] = ("BertModel", "RobertaModel")
Pooling = Literal["cls", "mean", "max", "mean_sqrt_len"]
POOLING_FIELDS: dict[str, Pooling] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}
NORMALIZE_MODULE = "sentence_transformers.models.Normalize"
ENCODER_TASKS: tuple[str, ...] = ("similarity", "retrieval")
REFERENCE_SENTENCES = (
    "A small model runs on the phone in my pocket.",
    "The compiler lowers every layer for the board.",
)


class EncoderSection(Section):
    """manifest["encoder"]: how the embedding was made and what the entry accepts."""

    architecture: str
    hidden_size: int
    pooling: Pooling
    normalize: bool
    max_length: int
    pad_token_id: int


class Embedder(nn.Module):
    """The encoder followed by the configured pooling (and L2 normalisation).

    Position and token-type ids are computed here and passed in: the encoders' own
    defaults slice stored buffers by the (symbolic) length, which TVM cannot shape.
    RoBERTa numbers the positions of real tokens from padding_idx + 1 and gives padding
    padding_idx (its `padding_offset`)."""

    def __init__(self, encoder: nn.Module, pooling: Pooling, normalize: bool, padding_offset: int | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize
        self.padding_offset = padding_offset

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.padding_offset is None:
            positions = torch.arange(input_ids.shape[1], dtype=torch.int64)[None].expand_as(input_ids)
        else:
            real = (input_ids != self.padding_offset).to(torch.int64)
            positions = torch.cumsum(real, dim=1) * real + self.padding_offset
        states = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, token_type_ids=torch.zeros_like(input_ids)
        ).last_hidden_state
        weights = attention_mask.to(states.dtype)[..., None]
        if self.pooling == "cls":
            pooled = states[:, 0]
        elif self.pooling == "max":
            # Padding never wins the max (a finite large negative stays NaN-free everywhere).
            pooled = (states + (weights - 1.0) * 1e9).amax(dim=1)
        else:
            counts = weights.sum(dim=1).clamp(min=1e-9)
            pooled = (states * weights).sum(dim=1) / (counts if self.pooling == "mean" else counts.sqrt())
        if self.normalize:
            pooled = pooled / (pooled * pooled).sum(dim=-1, keepdim=True).sqrt().clamp(min=1e-12)
        return pooled


def pooling_of(path: Path) -> tuple[Pooling, bool, str]:
    """(pooling, normalize, where it was read) from a sentence-transformers directory."""
    modules_path = path / "modules.json"
    if not modules_path.is_file():
        return "mean", False, "no sentence-transformers config: mean pooling, not normalised"
    import json

    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{modules_path} is not valid JSON ({exc})") from None
    normalize = any(m.get("type") == NORMALIZE_MODULE for m in modules)
    pooling_dirs = [m.get("path", "") for m in modules if str(m.get("type", "")).endswith("models.Pooling")]
    if not pooling_dirs:
        return "mean", normalize, f"{modules_path.name} lists no Pooling module: mean pooling"
    config_path = path / pooling_dirs[0] / "config.json"
    config = read_config(config_path.parent)
    chosen = [mode for field, mode in POOLING_FIELDS.items() if config.get(field)]
    other = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in POOLING_FIELDS)
    if other or len(chosen) != 1:
        found = other or chosen or ["none"]
        raise UnsupportedError(
            f"{config_path}: pooling {', '.join(found)} is not supported; edgec pools by exactly one of "
            f"{', '.join(POOLING_FIELDS)}"
        )
    return chosen[0], normalize, f"{config_path.relative_to(path)}"


class Encoder(Family):
    name = FAMILY_ENCODER
    section_key = "encoder"
    Section = EncoderSection
    architectures = ENCODER_ARCHITECTURES

    def recognise(self, path: Path) -> bool:
        if not (path / "config.json").is_file():
            return False
        architectures = read_config(path).get("architectures") or []
        return bool(architectures) and str(architectures[0]) in ENCODER_ARCHITECTURES

    def load(self, path: Path, name: str | None, trust_pickle: bool) -> ModelHandle:
        import transformers
        from transformers import AutoConfig

        from edgec.families.causal_lm import check_tensors, safetensors_weights

        architecture = str(read_config(path)["architectures"][0])
        pooling, normalize, source = pooling_of(path)
        weights = safetensors_weights(path)
        try:
            config = AutoConfig.from_pretrained(path)
        except (ValueError, OSError, KeyError, TypeError) as exc:
            raise BadInputError(f"{path / 'config.json'} is not a usable model config ({str(exc).splitlines()[0]})") from None
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise UnsupportedError(f"{path}: config field is_decoder/add_cross_attention is set; edgec embeds with encoders only")
        position = getattr(config, "position_embedding_type", "absolute")
        if position != "absolute":
            raise UnsupportedError(f"{path}: config field position_embedding_type={position!r} is not supported; edgec lowers absolute positions")
        config._attn_implementation = "eager"  # the masked softmax exports; SDPA's mask code does not
        model_class = getattr(transformers, architecture)
        check_tensors(path, weights, model_class, config)
        # The checkpoint's pooler head is not used (sentence pooling is ours): unused, not missing.
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            module, loading = model_class.from_pretrained(
                path, config=config, dtype=torch.float32, use_safetensors=True, output_loading_info=True, add_pooling_layer=False
            )
        except (ValueError, OSError, RuntimeError) as exc:
            raise BadInputError(f"{path}: the weights do not fit the config ({str(exc).splitlines()[0]})") from None
        finally:
            transformers.logging.set_verbosity(verbosity)
        missing = [k for k in loading["missing_keys"] if "position_ids" not in k]
        if missing or loading["mismatched_keys"]:
            problems = (missing + [str(m) for m in loading["mismatched_keys"]])[:3]
            raise BadInputError(f"{path}: weights and config disagree (e.g. {', '.join(problems)}); re-save with save_pretrained")
        tokenizer = None
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file() or (path / "vocab.txt").is_file():
            tokenizer = load_tokenizer_files(path)
        return ModelHandle(
            name=name or str(path),
            family=FAMILY_ENCODER,
            architecture=architecture,
            source=path,
            sha256=sha256_files([path / "config.json", *weights]),
            module=Embedder(module.eval(), pooling, normalize, int(config.pad_token_id) if architecture == "RobertaModel" else None).eval(),
            tokenizer=tokenizer,
            tokenizer_dir=path if tokenizer is not None else None,
            info={
                "parameters": sum(p.numel() for p in module.parameters()),
                "layers": int(config.num_hidden_layers),
                "hidden_size": int(config.hidden_size),
                "attention_heads": int(config.num_attention_heads),
                "vocab_size": int(config.vocab_size),
                "max_position_embeddings": int(config.max_position_embeddings),
                "pooling": pooling,
                "normalize": normalize,
                "pooling_config": source,
            },
        )

    def entries(self, model: ModelHandle) -> list[ExportedEntry]:
        assert model.module is not None
        ids, mask = _example(model)
        dynamic = torch.export.Dim.DYNAMIC
        shapes = ({0: dynamic, 1: dynamic}, {0: dynamic, 1: dynamic})
        with torch.no_grad():
            program = torch.export.export(model.module, (ids, mask), dynamic_shapes=shapes)
        return [ExportedEntry("embed", program, model.module, (ids, mask), shapes, ["input_ids", "attention_mask"], ["sentence_embedding"])]

    def reference(self, model: ModelHandle, entries: list[ExportedEntry], recipe: Recipe) -> dict[str, list[np.ndarray]]:
        """Two real sentences of different lengths, padded: the mask hides real padding."""
        assert model.module is not None
        ids, mask = reference_batch(model)
        with torch.no_grad():
            embedding = model.module(torch.from_numpy(ids), torch.from_numpy(mask))
        return {"embed.in": [ids, mask], "embed.out": [embedding.numpy()]}

    def section(self, model: ModelHandle, entries: list[ExportedEntry], recipe: Recipe) -> EncoderSection:
        assert isinstance(model.module, Embedder)
        config = model.module.encoder.config
        limit = int(config.max_position_embeddings) - (int(config.pad_token_id) + 1 if model.architecture == "RobertaModel" else 0)
        return EncoderSection(
            architecture=model.architecture,
            hidden_size=int(config.hidden_size),
            pooling=model.module.pooling,
            normalize=model.module.normalize,
            max_length=min(recipe.max_context or limit, limit),
            pad_token_id=int(config.pad_token_id or 0),
        )

    def run(self, root: Path, manifest: dict[str, Any], runtime: Any, request: dict[str, Any]) -> dict[str, Any]:
        texts = request.get("text") or []
        if not texts:
            raise BadInputError(f"{root} is an encoder artifact: give --text TEXT (repeatable) to embed")
        embed = artifact_embedder(root, manifest, runtime)
        start = time.perf_counter()
        vectors = embed(list(texts))
        ms = (time.perf_counter() - start) * 1e3
        return {
            "artifact": str(root),
            "backend": manifest["backend"],
            "texts": list(texts),
            "size": int(vectors.shape[1]),
            "norms": [float(n) for n in np.linalg.norm(vectors, axis=1)],
            "embeddings": vectors.tolist(),
            "ms": ms,
        }

    def eval(self, spec: str, request: EvalRequest, progress: Progress) -> dict[str, Any]:
        """similarity: Spearman correlation of cosine similarity with gold scores on a TSV of
        pairs; retrieval: each query finds its document by cosine among the sampled set."""
        task = request.task or "retrieval"
        if request.device is not None:
            raise BadInputError("--device: encoder tasks are scored on this machine (drop --device)")
        if task not in ENCODER_TASKS:
            raise BadInputError(f"--task {task}: not an encoder task; available: {', '.join(ENCODER_TASKS)}")
        embed, what = open_embedder(spec)
        if task == "similarity":
            if request.data is None:
                raise BadInputError("--task similarity needs --data PAIRS.tsv (sentence1<TAB>sentence2<TAB>score per line)")
            first, second, gold = read_pairs(Path(request.data).expanduser())
            progress(f"similarity of {len(gold)} pairs on {what}")
            predicted = cosine(embed(first), embed(second))
            return {"model": spec, "what": what, "task": task, "data": request.data, "pairs": len(gold),
                    "spearman": spearman(predicted, np.asarray(gold))}
        queries, documents = retrieval_set(request.seed, request.samples)
        progress(f"retrieval: {len(queries)} WordNet synonym lists -> their glosses on {what}")
        scores = _normalised(embed(queries)) @ _normalised(embed(documents)).T
        ranks = (scores > np.diag(scores)[:, None]).sum(axis=1)  # documents ranked above the right one
        return {"model": spec, "what": what, "task": task, "seed": request.seed, "queries": len(queries),
                "recall_at_1": float((ranks == 0).mean()), "recall_at_5": float((ranks < 5).mean()),
                "mrr": float((1.0 / (ranks + 1)).mean()), "chance_recall_at_1": 1 / len(queries)}

    def describe_eval(self, result: dict[str, Any]) -> str:
        if result["task"] == "similarity":
            return f"{result['what']}: Spearman {result['spearman']:.4f} over {result['pairs']} pairs ({result['data']})"
        return (f"{result['what']}: retrieval recall@1 {result['recall_at_1']:.3f}, recall@5 {result['recall_at_5']:.3f}, "
                f"MRR {result['mrr']:.3f} over {result['queries']} queries (seed {result['seed']}; chance {result['chance_recall_at_1']:.3f})")

    def describe_run(self, result: dict[str, Any]) -> tuple[list[str], str]:
        lines = [f"{text[:60]!r}: embedding size {result['size']}, norm {norm:.4f}" for text, norm in zip(result["texts"], result["norms"])]
        return lines, f"{len(result['texts'])} texts in {result['ms']:.1f} ms ({result['backend']})"


def _example(model: ModelHandle) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 2 x length 8 (size-1 example dims would be specialised by torch.export)."""
    vocab = int(model.info["vocab_size"])
    ids = torch.randint(5, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[1, 6:] = 0
    return ids, mask


def reference_batch(model: ModelHandle) -> tuple[np.ndarray, np.ndarray]:
    if model.tokenizer is not None:
        batch = model.tokenizer(list(REFERENCE_SENTENCES), padding=True, return_tensors="np")
        return batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
    ids, mask = _example(model)
    return ids.numpy(), mask.numpy()


EmbedFn = Any  # list[str] -> np.ndarray [N, H]


def tokenized_embedder(tokenizer: Any, max_length: int, run: Any, batch_size: int = 16) -> EmbedFn:
    """Embed texts in batches: `run(ids, mask) -> [N, H]` in torch or in a runtime."""

    def embed(texts: list[str]) -> np.ndarray:
        rows = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                              return_tensors="np")
            rows.append(np.asarray(run(batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64))))
        return np.concatenate(rows, axis=0).astype(np.float64)

    return embed


def artifact_embedder(root: Path, manifest: dict[str, Any], runtime: Any) -> EmbedFn:
    from edgec.artifact import load_tokenizer

    section = manifest["encoder"]
    return tokenized_embedder(load_tokenizer(root, manifest), int(section["max_length"]),
                              lambda ids, mask: runtime.run("embed", [ids, mask])[0])


def torch_embedder(model: ModelHandle) -> EmbedFn:
    if model.tokenizer is None:
        raise BadInputError(f"{model.name}: embedding text needs the model's tokenizer files next to config.json")
    assert model.module is not None
    limit = int(model.info["max_position_embeddings"]) - (2 if model.architecture == "RobertaModel" else 0)

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

    return tokenized_embedder(model.tokenizer, limit, run)


def open_embedder(spec: str) -> tuple[EmbedFn, str]:
    """Texts -> embeddings for an encoder artifact (its runtime) or model (torch)."""
    from edgec.artifact import MANIFEST, open_runtime, read_manifest
    from edgec.model import load_model

    path = Path(spec)
    if path.is_dir() and (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        return artifact_embedder(path, manifest, open_runtime(path, manifest)), f"{spec} ({manifest['backend']} artifact)"
    return torch_embedder(load_model(spec)), f"{spec} (torch)"


def read_pairs(path: Path) -> tuple[list[str], list[str], list[float]]:
    """sentence1 <TAB> sentence2 <TAB> score per line (a header line is skipped)."""
    from edgec.data import read_user_text

    first: list[str] = []
    second: list[str] = []
    gold: list[float] = []
    for number, line in enumerate(read_user_text(path, f"--data {path}", "a TSV of pairs").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            score = float(fields[2]) if len(fields) == 3 else None
        except ValueError:
            score = None
        if score is None:
            if number == 1 and len(fields) == 3:
                continue  # header
            raise BadInputError(f"{path}:{number}: expected sentence1<TAB>sentence2<TAB>score")
        first.append(fields[0])
        second.append(fields[1])
        gold.append(score)
    if len(gold) < 3 or len(set(gold)) < 2:
        raise BadInputError(f"{path}: {len(gold)} pairs with {len(set(gold))} distinct scores; Spearman needs >= 3 pairs and 2 scores")
    return first, second, gold


def retrieval_set(seed: int, size: int) -> tuple[list[str], list[str]]:
    """`size` WordNet noun synsets with >= 2 lemmas: the query is the synonym list
    ("dog, domestic dog, Canis familiaris"), its document the gloss's definition."""
    import random

    from edgec.tasks import WORDNET_DIR

    data_path = WORDNET_DIR / "data.noun"
    if not data_path.is_file():
        raise MissingDependencyError(f"WordNet is not installed ({data_path} missing); `make test` installs the Debian package wordnet-base")
    pairs: list[tuple[str, str]] = []
    for line in data_path.read_text(encoding="utf-8").splitlines():
        if line.startswith(" ") or "|" not in line:
            continue
        fields, gloss = line.split("|", 1)
        parts = fields.split()
        count = int(parts[3], 16)
        lemmas = [parts[4 + 2 * i].replace("_", " ").split("(")[0] for i in range(count)]
        definition = gloss.split(";")[0].strip()
        if len(lemmas) >= 2 and len(definition.split()) >= 4:
            pairs.append((", ".join(lemmas), definition))
    if size > len(pairs):
        raise BadInputError(f"--samples {size}: WordNet has {len(pairs)} usable synsets")
    chosen = random.Random(f"retrieval:{seed}").sample(pairs, size)
    return [q for q, _ in chosen], [d for _, d in chosen]


def _normalised(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, H] arrays."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    value = float(spearmanr(x, y).statistic)
    return 0.0 if math.isnan(value) else value


register(Encoder())
