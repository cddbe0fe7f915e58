"""`edgec compile`: load -> passes -> export -> backend build -> parity -> artifact.

Everything that can be refused is refused before the slow work starts: the
recipe, the target/backend pair, the output directory, the model files, and
whether each pass accepts the model family.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgec import __version__
from edgec.artifact import (
    FLOAT16_MIN_RTOL,
    REFERENCE_FILE,
    check_output_dir,
    hash_tree,
    open_runtime,
    output_lock,
    save_reference,
    staging_dir,
    tool_versions,
    write_manifest,
)
from edgec.data import calibration_segments
from edgec.errors import BadInputError, CheckFailedError, UnsupportedError, require_modules
from edgec.families import Family, family_named
from edgec.model import ModelHandle, load_model
from edgec.parity import ParityResult, check, flatten_io, reference_io
from edgec.passes import REGISTRY
from edgec.passes.schedule import schedule_options, tuning_endpoint
from edgec.pipeline import PassContext, PassLogEntry, PassManager
from edgec.recipe import Recipe
from edgec.targets.export import export_entries
from edgec.targets.registry import ResolvedTarget, is_part_targets, resolve_part_targets, resolve_target
from edgec.targets.runtime import PARITY_RULE


def default_output(model_spec: str, target: str, backend: str) -> Path:
    stem = model_spec.removeprefix("zoo:").rstrip("/").split("/")[-1].replace(".", "-")
    target = target.replace("=", "-").replace(",", "-").replace(" ", "")  # sparse=cpu,dense=cuda
    return Path("artifacts") / f"{stem}-{target}-{backend}"


def _calibration(model: ModelHandle, recipe: Recipe) -> Callable[[], list[list[int]]] | None:
    """Calibration segments on demand (only passes that calibrate pay for tokenizing)."""
    if model.tokenizer is None:
        return None
    spec = recipe.calibration
    positions = getattr(getattr(model.module, "config", None), "max_position_embeddings", None)
    if recipe.passes and positions is not None and spec.seq_len > int(positions):
        # Checked before any pass runs: a learned-position model (GPT-2) fails deep inside
        # torch on a longer segment, and a RoPE model would be calibrated out of range.
        raise BadInputError(f"calibration.seq_len {spec.seq_len} is longer than the model's {positions} positions; "
                            f"set calibration.seq_len <= {positions} (--set calibration.seq_len={positions})")
    return lambda: calibration_segments(model.tokenizer, spec.data, spec.samples, spec.seq_len)


@dataclass(frozen=True)
class Plan:
    """What a compile will do, checked before any model is loaded (also `--dry-run`)."""

    target: ResolvedTarget
    manager: PassManager
    tuning: Any
    rtol: float
    out: Path
    # `--target PART=TARGET,...`: each part's target (`target` is the machine's CPU one).
    part_targets: dict[str, ResolvedTarget] = field(default_factory=dict)

    def to_json(self, model_spec: str, recipe: Recipe) -> dict[str, Any]:
        return {
            "model": model_spec,
            "output": str(self.out),
            "target": self.target.name,
            "target_resolved": self.target.how,
            **({"part_targets": {part: t.how for part, t in self.part_targets.items()}} if self.part_targets else {}),
            "backend": recipe.backend,
            "dtype": recipe.dtype,
            "passes": [spec.name for spec in recipe.passes],
            "parity_rtol": self.rtol,
            "parity_atol": recipe.parity.atol,
            "recipe": recipe.model_dump(),
        }


# What each backend imports to build and to check parity.
BACKEND_MODULES = {"tvm": ("tvm",), "onnx": ("onnx", "onnxscript", "onnxruntime")}


def plan_compile(model_spec: str, recipe: Recipe, out: Path, force: bool, device: str | None = None) -> Plan:
    """Every check that needs no model: the model path, the target and its fields, the
    device URI, the dtype, each pass against the target, the tuning device and the output."""
    local_input = Path(model_spec).expanduser()
    if model_spec.startswith("zoo:"):
        from edgec.zoo import ZOO

        if model_spec.removeprefix("zoo:") not in ZOO:
            raise BadInputError(f"{model_spec} is not a built-in model; known: {', '.join('zoo:' + n for n in ZOO)}")
    elif not local_input.exists():
        raise BadInputError(
            f"{model_spec} does not exist; give a Hugging Face model directory, a .pt2 or .onnx file, or zoo:NAME (edgec zoo list)"
        )
    part_targets: dict[str, ResolvedTarget] = {}
    if is_part_targets(recipe.target):
        target, part_targets = resolve_part_targets(recipe.target, recipe.backend, recipe.target_options)
    else:
        target = resolve_target(recipe.target, recipe.backend, recipe.target_options)
    require_modules(*BACKEND_MODULES.get(recipe.backend, ()))
    if device is not None:
        from edgec.deploy import open_device

        open_device(device)  # a malformed URI is refused before the slow work
    if recipe.dtype not in target.capability.compute_dtypes:
        raise UnsupportedError(
            f"dtype {recipe.dtype}: target {target.name} with backend {recipe.backend} computes in "
            f"{', '.join(target.capability.compute_dtypes)} only (edgec targets show {target.name}); float16 is for GPU targets"
        )
    manager = PassManager(REGISTRY, recipe.passes)
    for each in {t.name: t for t in (target, *part_targets.values())}.values():
        manager.check_capability(each.capability.weight_bits, each.capability.ops, f"{each.name}/{recipe.backend}")
    tuning = schedule_options(recipe.passes)
    if tuning is not None and tuning.device is not None and tuning.trials > 0 and recipe.backend == "tvm":
        tuning_endpoint(tuning.device, target.spec.arch, target.name)  # the device to time kernels on, before any work
    if tuning is not None and tuning.activations == "int8" and recipe.backend != "tvm":
        # Measured: ONNX Runtime's int8 MatMulNBits (accuracy_level 4) moved one of
        # zoo:tiny-lm's values cached by layer 5 from 3.7 to -2.0, where edgec's per-group kernel
        # stays within 1% of the range.
        raise UnsupportedError(
            f"schedule.activations=int8 is built by the TVM backend (integer dot-product kernels); with backend "
            f"{recipe.backend} use --backend tvm, or drop the option (float32 activations)"
        )
    if recipe.cache_dtype != "float32":
        # A backend that concatenates the cache would convert all of it to the compute dtype
        # and back on every step: slower than the float32 cache it was meant to beat.
        slow = [t.name for t in (target, *part_targets.values()) if not t.capability.appended_cache]
        if slow:
            raise UnsupportedError(
                f"cache_dtype={recipe.cache_dtype}: target {slow[0]} with backend {recipe.backend} concatenates the KV "
                "cache, and would convert all of it on every step; --backend tvm on a CPU target reads a float16 or int8 "
                "cache in place, or drop the option"
            )
    rtol = max(recipe.parity.rtol, FLOAT16_MIN_RTOL) if recipe.dtype == "float16" else recipe.parity.rtol
    check_output_dir(out, force, (local_input,) if local_input.exists() else ())
    if local_input.exists():
        # A pass that declares the widths it stores weights at (luc, int8) makes them smaller.
        compresses = any(getattr(REGISTRY[spec.name], "weight_bits", None) is not None for spec in manager.specs)
        _check_free_space(local_input, out, compresses)
    return Plan(target, manager, tuning, rtol, out, part_targets)


WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".pt2", ".bin", ".data")


def _check_free_space(source: Path, out: Path, compresses: bool) -> None:
    """Refuse before any work when the output's disk cannot hold even the weights: the artifact
    stores them once more (after a compressing pass, down to about a quarter at 4 bits)."""
    import shutil

    files = [source] if source.is_file() else [p for p in source.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    needed = sum(p.stat().st_size for p in files) // (4 if compresses else 1)
    parent = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise BadInputError(f"-o {out}: the artifact needs at least {needed / 1e6:.1f} MB and its disk has {free / 1e6:.1f} MB free; "
                            "free some or write elsewhere")


def compile_model(
    model_spec: str,
    recipe: Recipe,
    out: Path,
    force: bool,
    progress: Callable[[str], None],
    on_target: Callable[[ResolvedTarget], None] = lambda target: None,
    trust_pickle: bool = False,
    device: str | None = None,
    sign: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`extra`: more manifest sections (the latency budget's choice). `device`: check parity and measure the held-out perplexity on that device (as for
    `edgec deploy --device`) instead of on this machine -- how a cross-built artifact
    gets verified before it is written. `sign`: an ed25519 private key (PEM) that signs
    the manifest, read before any work."""
    plan = plan_compile(model_spec, recipe, out, force, device)
    signer = None
    if sign is not None:
        from edgec.signing import load_private_key

        signer = load_private_key(sign)
    target, manager, tuning, rtol = plan.target, plan.manager, plan.tuning, plan.rtol
    on_target(target)
    local_input = Path(model_spec).expanduser()
    # Held from the output check to the rename: a second compile to the same path fails fast
    # instead of silently replacing this one's result (or a file that appeared meanwhile).
    with output_lock(out):
        check_output_dir(out, force, (local_input,) if local_input.exists() else ())
        started = time.perf_counter()
        progress(f"load {model_spec}")
        model = load_model(model_spec, trust_pickle)
        family = family_named(model.family)
        if recipe.graph is not None and family.name != "gcn":
            raise BadInputError(f"--graph {recipe.graph}: a graph is what a GCN is compiled for; {model_spec} is a {family.name} model")
        place = _placement(plan.part_targets, family, model_spec, recipe.target)
        family.prepare(model, recipe, progress)
        # Whether every target's backend reads an appended KV cache in place (edgec.lm): the
        # cache contract a causal LM's entries are exported with; other families ignore it.
        model.prepared["appended_cache"] = all(t.capability.appended_cache for t in (target, *plan.part_targets.values()))
        model.prepared["attention_op"] = all(t.capability.attention_kernel for t in (target, *plan.part_targets.values()))
        model.prepared["cache_dtype"] = recipe.cache_dtype
        manager.check(model)
        ctx = PassContext(recipe=recipe, calibration_ids=_calibration(model, recipe), progress=progress)
        if recipe.cache_dtype == "int8":
            if ctx.calibration_ids is None:
                raise BadInputError(f"cache_dtype=int8: {model_spec} has no tokenizer to measure the cache's scales on "
                                    "calibration text; use cache_dtype=float16")
            # The family measures the int8 cache's scales on it, after the passes (edgec.lm.kv_scales).
            model.prepared["calibration_ids"] = ctx.calibration_ids
        pass_log = _run_passes(manager, model, ctx, recipe)

        progress("export entries")
        entries = export_entries(model)
        reference = flatten_io(reference_io(model, entries, recipe))
        program = family.program(model, entries, recipe)
        section = family.section(model, entries, recipe)
        if recipe.dtype == "float16" and recipe.backend == "onnx":
            _to_float16(model)
            progress("export entries again in float16 (the reference stays float32)")
            entries = export_entries(model)

        with staging_dir(out, force) as stage:
            model_dir = stage / "model"
            model_dir.mkdir()
            backend_record = build(recipe.backend, entries, target, model_dir, progress, recipe.dtype, tuning,
                                   {e.name: place(e.name) for e in entries} if place else None)
            save_reference(stage, reference)
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
                **({"part_targets": {part: t.to_json() for part, t in plan.part_targets.items()}} if plan.part_targets else {}),
                "backend": recipe.backend,
                "backend_record": backend_record,
                "tools": tool_versions(),
                "program": program,
                "reference": {
                    "file": REFERENCE_FILE,
                    "implementation": family.reference_rule(),
                    "entries": program["entries"],
                    "tolerance": {"rtol": rtol, "atol": recipe.parity.atol, "rule": PARITY_RULE},
                },
                "tokenizer": tokenizer_dir,
                **(extra or {}),
            }
            if section is not None and family.section_key is not None:
                manifest[family.section_key] = section.model_dump()
            files = hash_tree(stage)  # the parity run reads these files and writes none
            if device is None:
                parity = _check_parity({**manifest, "files": files}, stage, reference, rtol, target, progress, plan.part_targets)
            else:
                parity, evaluation = _verify_on_device(manifest, files, stage, model, family, recipe, device, progress)
            manifest["parity"] = parity.to_json()
            if parity.ok is False:
                where = f"on {device}" if device else f"on {target.name}/{recipe.backend}"
                int8 = plan.tuning is not None and plan.tuning.activations == "int8"
                advice = ("int8 activations (schedule.activations) move results by 1% (zoo:tiny-lm) to 10% (SmolLM2's logits) "
                          "of an output's range: raise parity.rtol (e.g. --set parity.rtol=0.1) and judge by perplexity, "
                          "or keep float32 activations"
                          if int8 else "report this with `edgec env`")
                raise CheckFailedError(f"parity check failed for {model_spec} {where}: {parity.reason}; nothing was written ({advice})")
            if device is None:
                evaluation = _evaluate({**manifest, "files": files}, stage, model, family, recipe, target, progress)
            if evaluation is not None:
                manifest["evaluation"] = evaluation
            manifest = write_manifest(stage, manifest, files)
            signed_by = None
            if signer is not None:
                from edgec.signing import sign_artifact

                signed_by = sign_artifact(stage, signer)
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
            "generation": parity.generation,
        },
        "evaluation": manifest.get("evaluation"),
        "signed_by": signed_by,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _run_passes(manager: PassManager, model: ModelHandle, ctx: PassContext, recipe: Recipe) -> list[PassLogEntry]:
    """The recipe's passes, resumed from the pass cache where an earlier run got to
    (EDGEC_PASS_CACHE=0 turns the cache off)."""
    if not manager.specs or model.module is None or os.environ.get("EDGEC_PASS_CACHE", "1") == "0":
        return manager.run(model, ctx)
    from edgec.pass_cache import PassCache, base_key

    return manager.run(model, ctx, PassCache(model.module), base_key(model.sha256, recipe))


def _placement(part_targets: dict[str, ResolvedTarget], family: Family, model_spec: str,
               request: str) -> Callable[[str], ResolvedTarget] | None:
    """entry -> its target, for `--target PART=TARGET,...` (refused unless the family has
    exactly those parts); None for one target."""
    if not part_targets:
        return None
    if not family.part_kinds:
        raise BadInputError(f"--target {request}: {model_spec} is a {family.name} model, not built in parts; give one target")
    if set(part_targets) != set(family.part_kinds):
        raise BadInputError(f"--target {request}: a {family.name} model's parts are {', '.join(family.part_kinds)}; "
                            f"give a target for each, e.g. {','.join(f'{k}=cpu' for k in family.part_kinds)}")
    return lambda entry: part_targets[family.part_of(entry)]


def build(
    backend: str, entries: list[Any], target: ResolvedTarget, out_dir: Path, progress: Callable[[str], None],
    dtype: str, tuning: Any, entry_targets: dict[str, ResolvedTarget] | None = None,
) -> dict[str, Any]:
    """One interface for both backends: build(entries, target, out, progress, dtype, tuning) -> record.
    `entry_targets` (TVM): a target per entry, when the parts of a model go to different ones."""
    if backend == "tvm":
        from edgec.targets import backend_tvm

        return backend_tvm.build(entries, target, out_dir, progress, dtype, tuning, entry_targets)
    assert entry_targets is None  # resolve_part_targets refuses other backends
    from edgec.targets import backend_onnx

    return backend_onnx.build(entries, target, out_dir, progress, dtype, tuning)


def _evaluate(
    manifest: dict[str, Any],
    stage: Path,
    model: ModelHandle,
    family: Family,
    recipe: Recipe,
    target: ResolvedTarget,
    progress: Callable[[str], None],
) -> dict[str, Any] | None:
    """The family's compile-time evaluation of the built artifact, in its own runtime."""
    from edgec.evaluate import logits_nll_fn, runtime_logits_fn

    if not family.evaluates(model, recipe):
        return None
    if not target.runs_here:
        return {
            "skipped": f"built for {target.spec.arch}: compile with --device D to measure it there, "
            "or run `edgec eval ARTIFACT --device D`"
        }
    runtime = open_runtime(stage, manifest, check_files=False)  # hashed a moment ago
    return family.evaluate(model, recipe, logits_nll_fn(runtime_logits_fn(runtime, manifest["program"])), progress)


def _verify_on_device(
    manifest: dict[str, Any],
    files: dict[str, str],
    stage: Path,
    model: ModelHandle,
    family: Family,
    recipe: Recipe,
    device: str,
    progress: Callable[[str], None],
) -> tuple[ParityResult, dict[str, Any] | None]:
    """Parity and the family's evaluation, both on `device`, from the staged artifact; a
    manifest is written for the upload and rewritten by the caller."""
    from edgec.deploy import deploy

    write_manifest(stage, manifest, files)
    report: dict[str, Any] = {}

    def on_device(windows: list[list[int]], progress: Callable[[str], None]) -> list[float]:
        report.update(deploy(stage, device, progress, windows=windows or None))
        return list(report.get("window_nll", []))

    evaluation = None
    if family.evaluates(model, recipe):
        progress(f"parity and evaluation on {device}")
        evaluation = family.evaluate(model, recipe, on_device, progress)
    else:
        progress(f"parity: run reference inputs on {device}")
        on_device([], progress)
    if evaluation is not None:
        evaluation = {**evaluation, "device": report["device"], "emulated": report["emulated"]}
    emulated = " (emulated)" if report["emulated"] else ""
    parity = ParityResult.from_report(report["parity"], reason=f"checked on {report['device']}{emulated}")
    return parity, evaluation


def _to_float16(model: ModelHandle) -> None:
    if model.module is None:
        raise UnsupportedError(f"{model.name}: dtype float16 needs a torch model (a Hugging Face directory or zoo:NAME)")
    model.module.half()


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
    rtol: float,
    target: ResolvedTarget,
    progress: Callable[[str], None],
    part_targets: dict[str, ResolvedTarget] | None = None,
) -> ParityResult:
    elsewhere = [f"its {part} parts for {t.spec.arch}" for part, t in (part_targets or {}).items() if not t.runs_here]
    if not target.runs_here or elsewhere:
        built = " and ".join(elsewhere) if target.runs_here else target.spec.arch
        return ParityResult(None, None, None, rtol, reason=f"built for {built}; parity is checked on the device at deploy")
    progress("parity: reference inputs and program in the artifact's runtime")
    return check(open_runtime(stage, manifest, check_files=False), manifest, reference)
