"""The causal-LM family: Hugging Face decoder-only LMs (edgec.architectures) as a
prefill and a decode entry over an explicit KV cache, driven by a `generate` program.

    prefill(input_ids)             -> logits, present_k, present_v[, present_s]
    decode(input_ids, past_k, past_v[, past_s]) -> logits, present_k, present_v[, present_s]

The cache is data in the program: each cache output feeds the decode input of the
same role, with its layout, its growing axis and whether the output holds only the
positions the call added (`append`: k and v, which runners append to a cache reserved for
the whole context) or the whole tensor (s), so runners never assume (k, v).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from edgec.architectures import SUPPORTED_ARCHITECTURES, architecture_of, canonicalize, check_config
from edgec.errors import BadInputError, UnsupportedError
from edgec.exits import EXITS_CONFIG, EXITS_WEIGHTS, exits_of, has_exits, load_exits
from edgec.families import EvalRequest, Family, Progress, Section, entry_io, register
from edgec.lm import CausalLMEntries, DecodeEntry, PrefillEntry, kv_scales, lm_shape
from edgec.model import FAMILY_CAUSAL_LM, ModelHandle, check_safetensors, load_tokenizer_files, read_config, sha256_files
from edgec.recipe import Recipe
from edgec.targets.export import ExportedEntry
from edgec.targets.runtime import GENERATION_STEPS, Generation, shape_program

DEFAULT_MAX_CONTEXT = 1024
# An appended cache is position-major: the filled prefix of a cache reserved for the whole
# context is contiguous. A concatenated one grows inside (edgec.lm, `appended_cache`).
KV_LAYOUT = ["tokens", "layers", "batch", "kv_heads", "head_dim"]
CONCAT_KV_LAYOUT = ["layers", "batch", "kv_heads", "tokens", "head_dim"]
# A subnet whose layers keep different KV heads: each layer's heads follow the previous layer's.
RAGGED_KV_LAYOUT = ["tokens", "batch", "kv_heads_by_layer", "head_dim"]
CONCAT_RAGGED_KV_LAYOUT = ["batch", "kv_heads_by_layer", "tokens", "head_dim"]
STATE_LAYOUT = ["calibrated_heads", "batch", "tokens"]
REFERENCE_TEXT = (
    "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
    "def main() -> None: print('hello, world')"
)


class CacheTensor(BaseModel):
    """One cache tensor: fed back from `output` to `input` on every decode step."""

    model_config = ConfigDict(extra="forbid")
    input: str
    output: str
    layout: list[str]
    shape: list[int | None]  # None: dynamic (batch, tokens)
    tokens_axis: int
    dtype: str = "float32"
    # True: `output` holds only the positions the call added, appended along `tokens_axis`
    # by the runner; False: `output` is the whole next input.
    append: bool = False


class VotingSection(BaseModel):
    """Early exits that vote (edgec.exits): `logits` is the voted log-distribution."""

    model_config = ConfigDict(extra="forbid")
    exits: list[int]
    model_exits: list[int]
    output: str = "exit_logits"
    rule: str = "softmax per exit, element-wise max over exits, renormalised; logits = its log"


class ShapeSection(BaseModel):
    """One shape of a `--subnet all` artifact (edgec.subnet.nested)."""

    model_config = ConfigDict(extra="forbid")
    label: str
    depth: int
    width: float
    layers: list[int]
    kv_heads: list[int]
    parameters: int
    calibration_score: float | None
    prefill: str
    decode: str
    cache: list[CacheTensor]


class LMSection(Section):
    """manifest["lm"]: what an application needs to drive the entries itself."""

    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    bos_token_id: int | None
    eos_token_id: int | None
    cache: list[CacheTensor]
    config: dict[str, Any]
    voting: VotingSection | None = None
    layer_kv_heads: list[int] | None = None  # set where layers differ (RAGGED_KV_LAYOUT)
    shapes: list[ShapeSection] = []  # `--subnet all`: every shape's entries; the first is the default


class CausalLM(Family):
    name = FAMILY_CAUSAL_LM
    section_key = "lm"
    Section = LMSection
    architectures = SUPPORTED_ARCHITECTURES
    generates_text = True

    def recognise(self, path: Path) -> bool:
        if not (path / "config.json").is_file():
            return False
        architectures = read_config(path).get("architectures") or []
        return bool(architectures) and str(architectures[0]).endswith(("ForCausalLM", "LMHeadModel"))

    def load(self, path: Path, name: str | None, trust_pickle: bool) -> ModelHandle:
        return load_hf_causal_lm(path, name)

    def prepare(self, model: ModelHandle, recipe: Recipe, progress: Progress) -> None:
        """The recipe's `subnet` (extracted: edgec.subnet) and `voting.exits` (which of the
        model's exits vote)."""
        super().prepare(model, recipe, progress)
        assert model.module is not None
        if model.info.get("amoeba"):
            self._merge_amoeba(model, recipe, progress)
        if recipe.subnet == "all":
            from edgec.subnet.extract import prepare_all_shapes

            prepare_all_shapes(model, recipe, progress)
        elif recipe.subnet is not None:
            from edgec.subnet import parse_shape
            from edgec.subnet.extract import apply_subnet

            progress(f"extract subnet {recipe.subnet}")
            apply_subnet(model, parse_shape(recipe.subnet, "subnet"), f"--subnet {recipe.subnet}")
        chosen = recipe.voting.exits
        if chosen is None:
            return
        assert model.module is not None
        heads = exits_of(model.module)
        if heads is None:
            raise BadInputError(f"{model.name}: voting.exits {chosen} needs a model with exit heads; "
                                "make one with `edgec finetune MODEL --method edge-llm`")
        heads.select(chosen)

    @staticmethod
    def _merge_amoeba(model: ModelHandle, recipe: Recipe, progress: Progress) -> None:
        """A model tuned with --method amoeba: the gated LoRA of the shape being compiled
        (the full model without --subnet) merged into its weights."""
        from edgec.finetune.amoeba import merge_for_shape
        from edgec.subnet import Shape, parse_shape
        from edgec.subnet.search import load_search

        assert model.module is not None
        search = load_search(model)
        assert search is not None  # loading checked it
        shape = Shape() if recipe.subnet is None else parse_shape(recipe.subnet, "subnet")
        if recipe.subnet is not None:
            search.check(shape, f"--subnet {recipe.subnet}")
        merged = merge_for_shape(model.module, shape, search)
        progress(f"amoeba: the mixture of LoRAs merged for {merged['shape']} (gates {merged['gates']})")
        model.info["amoeba"] = {**model.info["amoeba"], "merged": merged}
        model.info["parameters"] = sum(p.numel() for p in model.module.parameters())

    def entries(self, model: ModelHandle) -> list[ExportedEntry]:
        """prefill and decode; with `--subnet all`, a pair per shape (the default shape's
        named plainly, the others suffixed with their tag), all over shared weights."""
        assert model.module is not None
        shapes = model.prepared.get("shapes")
        # The compiler records whether the backend reads an appended cache in place (its capability).
        appended = bool(model.prepared.get("appended_cache", True))
        cache_dtype = str(model.prepared.get("cache_dtype", "float32"))
        # An int8 cache's scales are measured on the calibration text (the compiler passes it on).
        segments = model.prepared["calibration_ids"]() if cache_dtype == "int8" else None
        # And whether it has a kernel for a decode step's whole attention (edgec.decode_attention).
        attention_op = bool(model.prepared.get("attention_op", False))
        if not shapes:
            return _export_pair(model.module, "prefill", "decode", appended, cache_dtype=cache_dtype, attention_op=attention_op,
                                segments=segments)
        return [entry for shape in shapes
                for entry in _export_pair(shape.module, shape.prefill, shape.decode, appended, True, cache_dtype, attention_op,
                                          segments)]

    def reference(self, model: ModelHandle, entries: list[ExportedEntry], recipe: Recipe) -> dict[str, list[np.ndarray]]:
        """Prefill on the reference prompt but its last token, one decode step with it, and
        a greedy generation from the whole prompt with each step's top-2 margin."""
        by_name = {e.name: e for e in entries}
        prompt = reference_prompt(model, recipe.parity.prompt_len)
        ids = torch.from_numpy(prompt)
        io: dict[str, list[np.ndarray]] = {}
        pairs = [(s.prefill, s.decode) for s in model.prepared.get("shapes") or []] or [("prefill", "decode")]
        with torch.no_grad():
            for prefill, decode in pairs:
                prefill_out = by_name[prefill].module(ids[:, :-1])
                io[f"{prefill}.in"] = [ids[:, :-1].numpy()]
                io[f"{prefill}.out"] = [t.numpy() for t in prefill_out]
                decode_in = (ids[:, -1:], *prefill_out[1 : len(by_name[decode].input_names)])
                io[f"{decode}.in"] = [t.numpy() for t in decode_in]
                io[f"{decode}.out"] = [t.numpy() for t in by_name[decode].module(*decode_in)]

            def run(entry: str, args: list[Any]) -> list[np.ndarray]:
                outputs = by_name[entry].module(*(torch.from_numpy(np.asarray(a)) for a in args))
                return [t.numpy() for t in outputs]

            program = self.program(model, entries, recipe)
            steps = max(0, min(GENERATION_STEPS, int(program["max_context"]) - prompt.shape[1]))
            margins: list[float] = []

            def margin(step: int, logits: np.ndarray) -> None:
                top2 = np.sort(logits.astype(np.float64))[-2:]
                margins.append(float(top2[1] - top2[0]))

            tokens = Generation(program).greedy(run, [int(t) for t in prompt[0]], steps, on_step=margin)
        logits = io[f"{pairs[0][0]}.out"][0]
        io["generate.prompt"] = [prompt]
        io["generate.tokens"] = [np.asarray(tokens, dtype=np.int64)]
        io["generate.margins"] = [np.asarray(margins, dtype=np.float64)]
        io["generate.logits_range"] = [np.asarray([float(logits.max() - logits.min())], dtype=np.float64)]
        return io

    def program(self, model: ModelHandle, entries: list[ExportedEntry], recipe: Recipe) -> dict[str, Any]:
        section = self.section(model, entries, recipe)
        assert isinstance(section, LMSection)
        return {
            "kind": "generate",
            "entries": entry_io(entries),
            "prefill": "prefill",
            "decode": "decode",
            "token_input": "input_ids",
            "logits": "logits",
            "cache": [c.model_dump() for c in section.cache],
            "max_context": section.max_context,
            "eos_token_id": section.eos_token_id,
            # `--subnet all`: each shape's entries and cache; the top level runs the default shape.
            **({"shapes": {s.label: {"prefill": s.prefill, "decode": s.decode, "cache": [c.model_dump() for c in s.cache]}
                           for s in section.shapes}, "default_shape": section.shapes[0].label} if section.shapes else {}),
        }

    @staticmethod
    def _max_context(model: ModelHandle, recipe: Recipe) -> int:
        assert model.module is not None
        return min(recipe.max_context or DEFAULT_MAX_CONTEXT, int(model.module.config.max_position_embeddings))

    def section(self, model: ModelHandle, entries: list[ExportedEntry], recipe: Recipe) -> LMSection:
        assert model.module is not None
        max_context = self._max_context(model, recipe)
        prepared = model.prepared.get("shapes") or []
        module = prepared[0].module if prepared else model.module  # `--subnet all`: the default shape's
        shape = lm_shape(module, max_context)
        by_name = {e.name: e for e in entries}
        arch = architecture_of(module)
        appended = bool(model.prepared.get("appended_cache", True))
        cache = _cache_tensors(module, by_name["decode"], appended)
        shapes = [ShapeSection(label=s.label, depth=s.shape.depth or arch.num_layers, width=s.shape.width, prefill=s.prefill,
                               decode=s.decode, cache=_cache_tensors(s.module, by_name[s.decode], appended), **s.record)
                  for s in prepared]
        tokenizer, config = model.tokenizer, model.module.config
        heads = exits_of(model.module)
        voting = None if heads is None else VotingSection(exits=heads.voting, model_exits=heads.layers)
        return LMSection(
            architecture=model.architecture,
            num_layers=shape.num_layers,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            vocab_size=shape.vocab_size,
            max_context=max_context,
            bos_token_id=getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else config.bos_token_id,
            eos_token_id=_single(getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else config.eos_token_id),
            cache=cache,
            config=arch.summary(),
            voting=voting,
            layer_kv_heads=list(arch.layer_kv_heads) if arch.ragged_kv else None,
            shapes=shapes,
        )

    def describe_section(self, section: dict[str, Any]) -> str:
        cache = ", ".join(f"{c['output']} {'appended to' if c.get('append') else '->'} {c['input']} {c['layout']}"
                          for c in section["cache"])
        voting = section.get("voting")
        votes = "" if voting is None else f"; exits after layers {voting['exits']} vote (max softmax, renormalised)"
        return (f"{section['architecture']}: {section['num_layers']} layers, kv {section['num_kv_heads']}x{section['head_dim']}, "
                f"vocab {section['vocab_size']}, max context {section['max_context']}; cache {cache}{votes}")

    def evaluates(self, model: ModelHandle, recipe: Recipe) -> bool:
        return recipe.evaluate.tokens > 0 and model.tokenizer is not None

    def evaluate(self, model: ModelHandle, recipe: Recipe, score: Any, progress: Progress) -> dict[str, Any] | None:
        """Held-out perplexity (recipe `evaluate.tokens`) from the summed NLL per window."""
        if not self.evaluates(model, recipe):
            return None
        from edgec.evaluate import evaluation_ids, windows_perplexity

        ids, label = evaluation_ids(model.tokenizer, "held-out", recipe.evaluate.tokens)
        progress(f"evaluate: held-out perplexity over {len(ids)} tokens")
        # The window never outruns the positions the artifact accepts (GPT-2 has 1024, tiny ones fewer).
        window = min(recipe.evaluate.window, self._max_context(model, recipe))
        return windows_perplexity(score, ids, model.tokenizer, window, label, progress).to_json()

    def run(self, root: Path, manifest: dict[str, Any], runtime: Any, request: dict[str, Any]) -> dict[str, Any]:
        from edgec.generate import generate_text

        if request.get("prompt") is None:
            raise BadInputError(f"{root} is a causal-LM artifact: give --prompt TEXT to continue")
        program = program_for_shape(manifest["program"], request.get("shape"), root)
        result = generate_text(root, {**manifest, "program": program}, runtime, str(request["prompt"]),
                               int(request.get("max_new_tokens", 32)))
        return {**result, "shape": program.get("shape", program.get("default_shape"))}

    def eval(self, spec: str, request: EvalRequest, progress: Progress) -> dict[str, Any]:
        """Perplexity (`ppl`, here or on a device) or a labelled task's test accuracy."""
        from edgec.tasks import TASK_NAMES, is_task

        task = request.task or "ppl"
        if task != "ppl" and not is_task(task):
            raise BadInputError(f"--task {task}: not a causal-LM task; available: ppl, {', '.join(TASK_NAMES)} or FILE.jsonl")
        if request.device is not None and task != "ppl":
            raise BadInputError(f"--device works with --task ppl only; score {task} on this machine (drop --device)")
        if task == "ppl":
            return _perplexity(spec, request, progress)
        return _task_accuracy(spec, task, request, progress)

    def describe_eval(self, result: dict[str, Any]) -> str:
        if result["task"] == "ppl":
            return (f"{result['what']}: perplexity {result['perplexity']:.3f}, {result['bits_per_byte']:.4f} bits/byte "
                    f"over {result['tokens']} tokens ({result['seconds']:.1f} s)")
        return (f"{result['what']}: {result['task']} accuracy {result['accuracy']:.3f} over {result['n']} test prompts "
                f"(seed {result['seed']}; chance {result['chance']:.3f})")

    def describe_run(self, result: dict[str, Any]) -> tuple[list[str], str]:
        shape = f"shape {result['shape']}, " if result.get("shape") else ""
        return [result["text"]], (
            f"{shape}{result['new_tokens']} tokens, prefill {result['prefill_ms']:.1f} ms, "
            f"decode {result['decode_tokens_per_s']:.1f} tokens/s ({result['backend']})"
        )


def program_for_shape(program: dict[str, Any], shape: str | None, root: Path) -> dict[str, Any]:
    """The generate program running one shape of a `--subnet all` artifact (None: its default)."""
    if shape is None:
        return program
    shapes = program.get("shapes")
    if not shapes:
        raise BadInputError(f"--shape {shape}: {root} has one shape; compile with --subnet all for an artifact with several")
    from edgec.subnet import parse_shape

    label = parse_shape(shape, "--shape").label()
    if label not in shapes:
        raise BadInputError(f"--shape {shape}: not in {root}; its shapes are {', '.join(shapes)}")
    return shape_program(program, label)


def _export_pair(module: torch.nn.Module, prefill_name: str, decode_name: str, appended: bool,
                 shares_weights: bool = False, cache_dtype: str = "float32", attention_op: bool = False,
                 segments: list[list[int]] | None = None) -> list[ExportedEntry]:
    """A prefill and a decode entry of one causal LM module, exported with dynamic batch and
    length (`appended`: k and v hold only the new positions, position-major; `shares_weights`:
    slices of weights other entries read too; `cache_dtype`: k and v between the calls, an
    int8 cache at scales measured on the calibration `segments`; `attention_op`: a decode
    step's plain attention layers as edgec::decode_attention nodes)."""
    scales = None
    if cache_dtype == "int8":
        assert segments is not None
        scales = kv_scales(CausalLMEntries(module, appended_cache=appended).eval(), segments)
    entries = CausalLMEntries(module, appended_cache=appended, cache_dtype=getattr(torch, cache_dtype),
                              attention_op=attention_op, cache_scales=scales).eval()
    prefill = PrefillEntry(entries).eval()
    decode = DecodeEntry(entries).eval()
    vocab = int(module.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    # Batch 2 / length 8: size-1 example dims would be specialised to 1 by torch.export.
    ids = torch.randint(0, vocab, (2, 8), generator=generator)
    with torch.no_grad():
        cache = list(entries.prefill(ids[:, :7])[1 : 1 + entries.cache_count])
    dynamic = torch.export.Dim.DYNAMIC
    prefill_shapes: tuple[dict[int, Any], ...] = ({0: dynamic, 1: dynamic},)
    layout = _kv_layout(entries.arch.ragged_kv, appended)
    kv_dims = {layout.index("tokens"): dynamic, layout.index("batch"): dynamic}
    decode_shapes: tuple[dict[int, Any], ...] = ({0: dynamic}, kv_dims, kv_dims)
    cache_in, cache_out = ["past_k", "past_v"], ["present_k", "present_v"]
    if entries.state_heads:  # calibrated attention heads (act, stat: causal) carry their column sums
        decode_shapes = (*decode_shapes, {1: dynamic, 2: dynamic})
        cache_in.append("past_s")
        cache_out.append("present_s")
    decode_example = (ids[:, 7:8], *cache)
    # Voting exits: every exit's own logits after the cache (edgec.exits).
    extra = ["exit_logits"] if entries.exits is not None else []
    with torch.no_grad():
        prefill_ep = torch.export.export(prefill, (ids,), dynamic_shapes=prefill_shapes)
        decode_ep = torch.export.export(decode, decode_example, dynamic_shapes=decode_shapes)
    return [
        ExportedEntry(prefill_name, prefill_ep, prefill, (ids,), prefill_shapes, ["input_ids"], ["logits", *cache_out, *extra],
                      shares_weights=shares_weights),
        ExportedEntry(decode_name, decode_ep, decode, decode_example, decode_shapes, ["input_ids", *cache_in],
                      ["logits", *cache_out, *extra], rows_per_call=1, shares_weights=shares_weights),
    ]


def _kv_layout(ragged: bool, appended: bool) -> list[str]:
    if ragged:
        return RAGGED_KV_LAYOUT if appended else CONCAT_RAGGED_KV_LAYOUT
    return KV_LAYOUT if appended else CONCAT_KV_LAYOUT


def _cache_tensors(module: torch.nn.Module, decode: ExportedEntry, appended: bool) -> list[CacheTensor]:
    """The decode entry's cache: each input fed from the output of the same role."""
    arch = architecture_of(module)
    layout = _kv_layout(arch.ragged_kv, appended)
    sizes = {"layers": arch.num_layers, "kv_heads": arch.num_kv_heads, "kv_heads_by_layer": sum(arch.layer_kv_heads),
             "head_dim": arch.head_dim}
    cache = []
    for past, present in zip(decode.input_names[1:], decode.output_names[1:]):
        if past == "past_s":
            calibrated = int(decode.example[decode.input_names.index("past_s")].shape[0])
            cache.append(CacheTensor(input=past, output=present, layout=STATE_LAYOUT, shape=[calibrated, None, None], tokens_axis=2))
        else:
            dtype = str(decode.example[decode.input_names.index(past)].dtype).removeprefix("torch.")
            cache.append(CacheTensor(input=past, output=present, layout=layout, shape=[sizes.get(name) for name in layout],
                                     tokens_axis=layout.index("tokens"), dtype=dtype, append=appended))
    return cache


def open_lm(spec: str, needs: str) -> tuple[Any, Any, int, str]:
    """(tokenizer, ids -> logits in the artifact's runtime or in torch, max context,
    description) of a causal-LM artifact directory or a model spec."""
    from edgec.artifact import MANIFEST, open_runtime
    from edgec.evaluate import runtime_logits_fn, torch_logits_fn
    from edgec.model import load_model

    path = Path(spec)
    if path.is_dir() and (path / MANIFEST).is_file():
        manifest, tokenizer = artifact_lm(path, needs)
        logits_fn = runtime_logits_fn(open_runtime(path, manifest), manifest["program"])
        return tokenizer, logits_fn, int(manifest["program"]["max_context"]), f"{spec} ({manifest['backend']} artifact)"
    handle = load_model(spec)
    if handle.module is None or handle.tokenizer is None:
        raise BadInputError(f"{spec}: {needs} needs a causal LM with a tokenizer")
    return handle.tokenizer, torch_logits_fn(handle.module), int(handle.module.config.max_position_embeddings), f"{spec} (torch)"


def artifact_lm(path: Path, needs: str) -> tuple[dict[str, Any], Any]:
    """The manifest and tokenizer of an artifact whose program generates text."""
    from edgec.artifact import load_tokenizer, read_manifest

    manifest = read_manifest(path)
    if manifest.get("tokenizer") is None or manifest["program"]["kind"] != "generate":
        raise BadInputError(f"{path}: not a causal-LM artifact with a tokenizer; {needs} needs one")
    return manifest, load_tokenizer(path, manifest)


def _perplexity(spec: str, request: EvalRequest, progress: Progress) -> dict[str, Any]:
    from edgec.evaluate import evaluation_ids, logits_nll_fn, windows_perplexity

    on_device: dict[str, Any] = {}
    if request.device is None:
        tokenizer, logits_fn, max_context, what = open_lm(spec, "eval --task ppl")
        score = logits_nll_fn(logits_fn)
    else:
        from edgec.deploy import deploy

        manifest, tokenizer = artifact_lm(Path(spec), "eval --device")
        max_context, what = int(manifest["program"]["max_context"]), f"{spec} on {request.device}"
        device = request.device

        def score(windows: list[list[int]], progress: Progress) -> list[float]:
            on_device.update(deploy(Path(spec), device, progress, windows=windows))
            return list(on_device["window_nll"])

    window = min(request.window, max_context)
    ids, label = evaluation_ids(tokenizer, request.data or "held-out", request.tokens)
    progress(f"ppl of {what} on {label}: {len(ids)} tokens")
    result = windows_perplexity(score, ids, tokenizer, window, label, progress)
    payload = {"model": spec, "what": what, **result.to_json()}
    if on_device:
        payload.update(device=on_device["device"], emulated=on_device["emulated"], parity=on_device["parity"])
    return payload


def _task_accuracy(spec: str, task: str, request: EvalRequest, progress: Progress) -> dict[str, Any]:
    from edgec.tasks import build_task, evaluate_task

    built = build_task(task, request.seed, 0, request.samples)  # the test split does not depend on the calibration size
    tokenizer, logits_fn, _, what = open_lm(spec, "labelled tasks")

    def last_logits(prompts: list[list[int]]) -> np.ndarray:
        return np.asarray(logits_fn(np.asarray(prompts, dtype=np.int64))[:, -1], dtype=np.float64)

    progress(f"{task} test split (seed {request.seed}): {len(built.test)} prompts on {what}")
    result = evaluate_task(last_logits, tokenizer, built.test, built.labels)
    return {"model": spec, "what": what, "task": task, "seed": request.seed, "chance": 1 / len(built.labels),
            "labels": list(built.labels), **result.to_json()}


def _single(token: Any) -> int | None:
    """Some configs list several EOS ids; the loop stops at the first."""
    if isinstance(token, list):
        return int(token[0]) if token else None
    return None if token is None else int(token)


def reference_prompt(model: ModelHandle, length: int) -> np.ndarray:
    """A fixed prompt of `length` tokens (the tokenizer's, else fixed pseudo-random ids)."""
    if model.tokenizer is not None:
        ids = list(model.tokenizer(REFERENCE_TEXT)["input_ids"])
        while len(ids) < length:
            ids = ids + ids
        return np.asarray([ids[:length]], dtype=np.int64)
    vocab = int(model.module.config.vocab_size) if model.module is not None else 100
    return np.random.default_rng(0).integers(0, vocab, size=(1, length), dtype=np.int64)


def load_hf_causal_lm(path: Path, name: str | None = None) -> ModelHandle:
    """A Hugging Face causal-LM directory; everything that can be wrong is refused first."""
    config_path = path / "config.json"
    config_data = read_config(path)
    architectures = config_data.get("architectures") or []
    architecture = str(architectures[0]) if architectures else str(config_data.get("model_type", "unknown"))
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedError(
            f"{path}: architecture '{architecture}' is not supported; edgec loads {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    weights = safetensors_weights(path)
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise BadInputError(f"{config_path} is not a usable model config ({str(exc).splitlines()[0]})") from None
    try:
        check_config(architecture, config)
    except UnsupportedError as exc:
        raise UnsupportedError(f"{path}: {exc.message}") from None
    check_tensors(path, weights, getattr(transformers, architecture), config)
    try:
        model, loading = getattr(transformers, architecture).from_pretrained(
            path, config=config, dtype=torch.float32, use_safetensors=True, output_loading_info=True
        )
    except (ValueError, OSError, RuntimeError) as exc:
        raise BadInputError(f"{path}: the weights do not fit the config ({str(exc).splitlines()[0]})") from None
    # Tied lm_head weights are legitimately absent from the file.
    missing = [k for k in loading["missing_keys"] if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or loading["unexpected_keys"] or loading["mismatched_keys"]:
        problems = (missing + list(loading["unexpected_keys"]) + [str(m) for m in loading["mismatched_keys"]])[:3]
        raise BadInputError(f"{path}: weights and config disagree (e.g. {', '.join(problems)}); re-save with save_pretrained")
    model = canonicalize(model.eval())
    arch = architecture_of(model)
    exit_files, applied = restore_tuned(model, path)
    amoeba = None
    from edgec.finetune.amoeba import AMOEBA_CONFIG, AMOEBA_WEIGHTS, has_amoeba

    if has_amoeba(path):
        from edgec.finetune.amoeba import load_amoeba
        from edgec.subnet.search import MODEL_SEARCH_DIR, SEARCH_FILE, WIDTH_FILE, load_search_at

        search = load_search_at(path / MODEL_SEARCH_DIR)
        if search is None:
            raise BadInputError(f"{path}: {AMOEBA_CONFIG} without the search it was trained over ({MODEL_SEARCH_DIR}/); "
                                "re-run `edgec finetune --method amoeba`")
        config_data = load_amoeba(model, path, search)
        amoeba = {k: config_data[k] for k in ("experts", "top_k", "rank", "alpha", "widths")}
        exit_files += [path / AMOEBA_CONFIG, path / AMOEBA_WEIGHTS,
                       *(p for p in (path / MODEL_SEARCH_DIR / SEARCH_FILE, path / MODEL_SEARCH_DIR / WIDTH_FILE) if p.is_file())]
    heads = None
    if has_exits(path):
        heads = load_exits(model, path).eval()
        exit_files += [path / EXITS_CONFIG, path / EXITS_WEIGHTS]
    tokenizer = None
    tokenizer_dir = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer_files(path)
        tokenizer_dir = path
    return ModelHandle(
        name=name or str(path),
        family=FAMILY_CAUSAL_LM,
        architecture=architecture,
        source=path,
        sha256=sha256_files([config_path, *weights, *exit_files]),
        module=model,
        tokenizer=tokenizer,
        tokenizer_dir=tokenizer_dir,
        info={
            "parameters": sum(p.numel() for p in model.parameters()),
            "layers": arch.num_layers,
            "hidden_size": int(config.hidden_size),
            "attention_heads": arch.num_heads,
            "kv_heads": arch.num_kv_heads,
            "head_dim": arch.head_dim,
            "vocab_size": int(config.vocab_size),
            "max_position_embeddings": int(config.max_position_embeddings),
            "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}),
            "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
            "architecture_config": arch.summary(),
            **({"exits": heads.config.to_json()} if heads is not None else {}),
            # A tuned compressed model: the passes it was made with (their records), for the manifest.
            **({"applied_passes": applied} if applied is not None else {}),
            # AmoebaLLM's mixture of LoRAs: merged for the compiled shape (edgec.finetune.amoeba).
            **({"amoeba": amoeba} if amoeba is not None else {}),
        },
    )


def restore_tuned(model: torch.nn.Module, path: Path) -> tuple[list[Path], list[dict[str, Any]] | None]:
    """What `edgec finetune` stored beside a compressed model's weights: the passes' output
    (passes/, the pass cache's format) and the adapters trained on it. Returns the files
    read and the log of those passes (None: no passes were stored)."""
    from edgec.finetune.lora import ADAPTERS_CONFIG, ADAPTERS_WEIGHTS, PASSES_DIR, load_adapters
    from edgec.pass_cache import RECORD, TENSORS, PassCache

    files: list[Path] = []
    log: list[dict[str, Any]] | None = None
    passes = path / PASSES_DIR
    if (passes / RECORD).is_file():
        log = PassCache(model, directory=path).load(PASSES_DIR, model)
        if log is None:
            raise BadInputError(f"{passes}: the stored output of the passes does not load into this edgec; re-run `edgec finetune`")
        files += [p for p in (passes / RECORD, passes / TENSORS) if p.is_file()]
    if (path / ADAPTERS_CONFIG).is_file():
        load_adapters(model, path)
        files += [path / ADAPTERS_CONFIG, path / ADAPTERS_WEIGHTS]
    return files, log


def safetensors_weights(path: Path) -> list[Path]:
    """The checkpoint's safetensors files (model.safetensors or shards), each checked."""
    weights = sorted(p for p in path.glob("model*.safetensors"))
    if not weights:
        pickled = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
        hint = (
            f" ({pickled[0].name} found: edgec does not unpickle weights; re-save with save_pretrained(safe_serialization=True))"
            if pickled
            else ""
        )
        raise BadInputError(f"{path} has no *.safetensors weights{hint}")
    for weight in weights:
        check_safetensors(weight)
    return weights


def check_tensors(path: Path, weights: list[Path], model_class: Any, config: Any) -> None:
    """Every tensor in the files against the shape the config implies, before loading:
    a checkpoint that does not fit its config is refused naming the tensor."""
    from safetensors import safe_open

    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in model_class(config).state_dict().items()}
    for weight in weights:
        with safe_open(str(weight), framework="pt") as handle:
            for name in handle.keys():
                shape = tuple(handle.get_slice(name).get_shape())
                want = expected.get(name)
                if want is not None and want != shape:
                    raise BadInputError(
                        f"{path}: tensor {name} in {weight.name} has shape {list(shape)}, the config implies {list(want)}; "
                        "the checkpoint does not match its config.json"
                    )


register(CausalLM())
