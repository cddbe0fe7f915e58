"""`edgec compile`: load -> passes -> export -> backend build -> parity -> artifact.

Everything that can be refused is refused before the slow work starts: the
recipe, the target/backend pair, the output directory, the model files, and
whether each pass accepts the model family.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgec import __version__
from edgec.artifact import (
    REFERENCE_FILE,
    check_output_dir,
    hash_tree,
    open_runtime,
    save_reference,
    staging_dir,
    tool_versions,
    write_manifest,
)
from edgec.data import calibration_segments
from edgec.errors import CheckFailedError, UnsupportedError
from edgec.lm import lm_shape
from edgec.model import FAMILY_CAUSAL_LM, ModelHandle, load_model
from edgec.parity import ParityResult, compare, flatten_io, reference_io, run_reference
from edgec.passes import REGISTRY
from edgec.passes.schedule import schedule_options, tuning_endpoint
from edgec.pipeline import PassContext, PassManager
from edgec.recipe import Recipe
from edgec.targets.export import export_entries
from edgec.targets.registry import ResolvedTarget, resolve_target

DEFAULT_MAX_CONTEXT = 1024
# float16 artifacts are compared with the float32 model: half precision alone moves
# logits by ~1e-3 of their range, so their parity tolerance is at least this.
FLOAT16_MIN_RTOL = 1e-2


def default_output(model_spec: str, target: str, backend: str) -> Path:
    stem = model_spec.removeprefix("zoo:").rstrip("/").split("/")[-1].replace(".", "-")
    return Path("artifacts") / f"{stem}-{target}-{backend}"


def _calibration(model: ModelHandle, recipe: Recipe) -> Callable[[], list[list[int]]] | None:
    """Calibration segments on demand (only passes that calibrate pay for tokenizing)."""
    if model.tokenizer is None:
        return None
    spec = recipe.calibration
    return lambda: calibration_segments(model.tokenizer, spec.data, spec.samples, spec.seq_len)


def compile_model(
    model_spec: str,
    recipe: Recipe,
    out: Path,
    force: bool,
    progress: Callable[[str], None],
    on_target: Callable[[ResolvedTarget], None] = lambda target: None,
    trust_pickle: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """`device`: check parity and measure the held-out perplexity on that device (as for
    `edgec deploy --device`) instead of on this machine -- how a cross-built artifact
    gets verified before it is written."""
    target = resolve_target(recipe.target, recipe.backend, recipe.target_options)
    if device is not None:
        from edgec.deploy import open_device

        open_device(device)  # a malformed URI is refused before the slow work
    if recipe.dtype not in target.capability.compute_dtypes:
        raise UnsupportedError(
            f"dtype {recipe.dtype}: target {target.name} with backend {recipe.backend} computes in "
            f"{', '.join(target.capability.compute_dtypes)} only (edgec targets show {target.name}); float16 is for GPU targets"
        )
    manager = PassManager(REGISTRY, recipe.passes)
    manager.check_capability(target.capability.weight_bits, target.capability.ops, f"{target.name}/{recipe.backend}")
    tuning = schedule_options(recipe.passes)
    if tuning is not None and tuning.device is not None and tuning.trials > 0 and recipe.backend == "tvm":
        tuning_endpoint(tuning.device, target.spec.arch, target.name)  # the device to time kernels on, before any work
    rtol = max(recipe.parity.rtol, FLOAT16_MIN_RTOL) if recipe.dtype == "float16" else recipe.parity.rtol
    on_target(target)
    local_input = Path(model_spec).expanduser()
    check_output_dir(out, force, (local_input,) if local_input.exists() else ())
    started = time.perf_counter()
    progress(f"load {model_spec}")
    model = load_model(model_spec, trust_pickle)
    manager.check(model)
    ctx = PassContext(recipe=recipe, calibration_ids=_calibration(model, recipe), progress=progress)
    pass_log = manager.run(model, ctx)

    progress("export entries (torch.export)")
    entries = export_entries(model)
    reference = reference_io(model, entries, recipe.parity.prompt_len)
    if recipe.dtype == "float16" and recipe.backend == "onnx":
        _to_float16(model)
        progress("export entries again in float16 (the reference stays float32)")
        entries = export_entries(model)
    output_names = {e.name: e.output_names for e in entries}

    with staging_dir(out, force) as stage:
        model_dir = stage / "model"
        model_dir.mkdir()
        if recipe.backend == "tvm":
            from edgec.targets import backend_tvm as backend
        else:
            from edgec.targets import backend_onnx as backend  # type: ignore[no-redef]
        if recipe.backend == "tvm":
            backend_record = backend.build(
                entries, target, model_dir, progress, recipe.dtype, tuning=tuning
            )
        else:
            backend_record = backend.build(entries, target, model_dir, progress, recipe.dtype)
        save_reference(stage, flatten_io(reference))
        tokenizer_dir = _copy_tokenizer(model, stage)
        manifest: dict[str, Any] = {
            "edgec_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": {
                "name": model.name,
                "family": model.family,
                "architecture": model.architecture,
                "sha256": model.sha256,
                "info": model.info,
            },
            "recipe": recipe.model_dump(),
            "passes": [asdict(entry) for entry in pass_log],
            "target": target.to_json(),
            "backend": recipe.backend,
            "backend_record": backend_record,
            "tools": tool_versions(),
            "reference": {
                "file": REFERENCE_FILE,
                "entries": {e.name: {"inputs": e.input_names, "outputs": e.output_names} for e in entries},
                "tolerance": {"rtol": rtol, "rule": "max|artifact-torch| <= rtol x range(torch output); same argmax where top-2 margin > tolerance"},
            },
            "tokenizer": tokenizer_dir,
        }
        if model.family == FAMILY_CAUSAL_LM:
            decode_inputs = next(e.input_names for e in entries if e.name == "decode")
            manifest["lm"] = _lm_record(model, recipe, cache=decode_inputs[1:])
        files = hash_tree(stage)  # the parity run reads these files and writes none
        if device is None:
            parity = _check_parity({**manifest, "files": files}, stage, reference, output_names, rtol, target, progress)
        else:
            parity, evaluation = _verify_on_device(manifest, files, stage, model, recipe, device, progress)
        manifest["parity"] = parity.to_json()
        if parity.ok is False:
            where = f"on {device}" if device else f"on {target.name}/{recipe.backend}"
            raise CheckFailedError(
                f"parity check failed for {model_spec} {where}: {parity.reason} max |diff| "
                f"{parity.max_abs_diff:.3g} > tolerance {parity.tolerance:.3g}; nothing was written "
                "(report this with `edgec env`)"
            )
        if device is None:
            evaluation = _evaluate({**manifest, "files": files}, stage, model, recipe, target, progress)
        if evaluation is not None:
            manifest["evaluation"] = evaluation
        manifest = write_manifest(stage, manifest, files)
    return {
        "artifact": str(out),
        "model": model.name,
        "target": target.name,
        "target_resolved": target.how,
        "backend": recipe.backend,
        "size_bytes": manifest["size_bytes"],
        "passes": [{"name": e.name, "changed": e.changed, "seconds": e.seconds, "record": e.record} for e in pass_log],
        "parity": {
            "ok": parity.ok,
            "max_abs_diff": parity.max_abs_diff,
            "tolerance": parity.tolerance,
            "reason": parity.reason,
        },
        "evaluation": manifest.get("evaluation"),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _evaluate(
    manifest: dict[str, Any],
    stage: Path,
    model: ModelHandle,
    recipe: Recipe,
    target: ResolvedTarget,
    progress: Callable[[str], None],
) -> dict[str, Any] | None:
    """Held-out perplexity of the built artifact in its own runtime (recipe `evaluate`)."""
    if recipe.evaluate.tokens == 0 or model.tokenizer is None or model.family != FAMILY_CAUSAL_LM:
        return None
    if not target.runs_here:
        return {
            "skipped": f"built for {target.spec.arch}: compile with --device D to measure it there, "
            "or run `edgec eval ARTIFACT --device D`"
        }
    from edgec.evaluate import evaluation_ids, perplexity, runtime_logits_fn

    ids, label = evaluation_ids(model.tokenizer, "held-out", recipe.evaluate.tokens)
    progress(f"evaluate: held-out perplexity over {len(ids)} tokens")
    runtime = open_runtime(stage, manifest)
    result = perplexity(runtime_logits_fn(runtime), ids, model.tokenizer, recipe.evaluate.window, label, progress)
    return result.to_json()


def _verify_on_device(
    manifest: dict[str, Any],
    files: dict[str, str],
    stage: Path,
    model: ModelHandle,
    recipe: Recipe,
    device: str,
    progress: Callable[[str], None],
) -> tuple[ParityResult, dict[str, Any] | None]:
    """Parity and (for a causal LM with `evaluate.tokens`) held-out perplexity, both on
    `device`, from the staged artifact; a manifest is written for the upload and
    rewritten by the caller."""
    from edgec.deploy import deploy
    from edgec.evaluate import evaluation_ids, windows_perplexity

    write_manifest(stage, manifest, files)
    evaluates = recipe.evaluate.tokens > 0 and model.tokenizer is not None and model.family == FAMILY_CAUSAL_LM
    report: dict[str, Any] = {}

    def on_device(windows: list[list[int]], progress: Callable[[str], None]) -> list[float]:
        report.update(deploy(stage, device, progress, windows=windows or None))
        return list(report.get("window_nll", []))

    evaluation = None
    if evaluates:
        ids, label = evaluation_ids(model.tokenizer, "held-out", recipe.evaluate.tokens)
        progress(f"evaluate: parity and held-out perplexity over {len(ids)} tokens on {device}")
        result = windows_perplexity(on_device, ids, model.tokenizer, recipe.evaluate.window, label, progress)
        evaluation = {**result.to_json(), "device": report["device"], "emulated": report["emulated"]}
    else:
        progress(f"parity: run reference inputs on {device}")
        on_device([], progress)
    found = report["parity"]
    emulated = " (emulated)" if report["emulated"] else ""
    parity = ParityResult(
        found["ok"], found["max_abs_diff"], found["tolerance"], float(found["rtol"]),
        reason=f"checked on {report['device']}{emulated}",
    )
    return parity, evaluation


def _to_float16(model: ModelHandle) -> None:
    if model.module is None:
        raise UnsupportedError(f"{model.name}: dtype float16 needs a torch model (a Hugging Face directory or zoo:NAME)")
    model.module.half()


def _lm_record(model: ModelHandle, recipe: Recipe, cache: list[str]) -> dict[str, Any]:
    assert model.module is not None
    config = model.module.config
    limit = int(config.max_position_embeddings)
    max_context = min(recipe.max_context or DEFAULT_MAX_CONTEXT, limit)
    shape = lm_shape(model.module, max_context)
    tokenizer = model.tokenizer
    return {
        **asdict(shape),
        "bos_token_id": getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else config.bos_token_id,
        "eos_token_id": getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else config.eos_token_id,
        "kv_layout": "[layers, batch, kv_heads, tokens, head_dim], float32",
        # decode(input_ids, *cache) -> (logits, *cache); prefill(input_ids) -> (logits, *cache)
        "cache": cache,
        **({"sink_state_layout": "[calibrated heads, batch, tokens], float32"} if "past_s" in cache else {}),
    }


def _copy_tokenizer(model: ModelHandle, stage: Path) -> str | None:
    if model.tokenizer is None:
        return None
    target = stage / "tokenizer"
    model.tokenizer.save_pretrained(str(target))
    return "tokenizer"


def _check_parity(
    manifest: dict[str, Any],
    stage: Path,
    reference: dict[str, Any],
    output_names: dict[str, list[str]],
    rtol: float,
    target: ResolvedTarget,
    progress: Callable[[str], None],
) -> ParityResult:
    if not target.runs_here:
        return ParityResult(
            None, None, None, rtol, reason=f"built for {target.spec.arch}; parity is checked on the device at deploy"
        )
    progress("parity: run reference inputs in the artifact's runtime")
    runtime = open_runtime(stage, manifest)
    actual = run_reference(runtime, reference, list(output_names))
    return compare(reference, actual, output_names, rtol)
