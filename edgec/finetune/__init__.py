"""`edgec finetune MODEL --method M`: fine-tuning methods that change what a model can do
before it is compiled, each writing a model directory that `edgec compile` loads.

- edge-llm (edgec.finetune.edge_llm): adaptive layer tuning, exits that vote.
- amoeba (edgec.finetune.amoeba): a shape-aware mixture of LoRAs over the shapes of a
  subnet search, trained once with in-place distillation.

Long work that may be stopped: a checkpoint (the trained tensors, the optimizer state and
where the loop was) is written beside the output as OUT.checkpoint/, atomically, every
`finetune.checkpoint_every` steps and at the end of each stage; `--resume` continues from
it. The output directory appears only when complete; the checkpoint is then removed.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from edgec.artifact import staged
from edgec.data import check_training_data
from edgec.errors import BadInputError, UnsupportedError
from edgec.outputs import check_output, checkpoint_dir
from edgec.recipe import Recipe

Progress = Callable[[str], None]
METHODS: dict[str, str] = {
    "edge-llm": "Edge-LLM adaptive layer tuning: exits every `stride` layers, LoRA one window at a time, voting",
    "amoeba": "AmoebaLLM: shape-aware mixture of LoRAs over the subnet search's shapes, in-place distillation",
    "diffcr": "DiffRatio-MoD (DiffCR): token routers per DiT block, learned per-layer and per-timestep-region keep ratios",
}
RECORD = "finetune.json"
CHECKPOINT_VERSION = 1


def finetune(spec: str, method: str, recipe: Recipe, out: Path, resume: bool, force: bool, progress: Progress) -> dict[str, Any]:
    if method not in METHODS:
        raise BadInputError(f"--method {method}: unknown; edgec fine-tunes with {', '.join(METHODS)}")
    from edgec.finetune.amoeba import AmoebaOptions
    from edgec.finetune.diffcr import DiffcrOptions
    from edgec.finetune.edge_llm import EdgeLlmOptions

    kinds = {"amoeba": AmoebaOptions, "edge-llm": EdgeLlmOptions, "diffcr": DiffcrOptions}
    try:
        options = kinds[method].model_validate(recipe.finetune.options)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise BadInputError(f"finetune.options.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if method == "diffcr":
        if recipe.sampler.steps < options.regions:
            raise BadInputError(f"finetune.options.regions {options.regions} is more than the sampler's {recipe.sampler.steps} steps: "
                                "some region would never run; use fewer regions or more steps")
    else:
        check_training_data(recipe.finetune.data)
    check_output(out, force, RECORD, "finetune")
    checkpoint = checkpoint_dir(out)
    if checkpoint.exists() and not resume:
        raise BadInputError(f"{checkpoint} holds an earlier run's checkpoint: add --resume to continue it, or delete it to start over")
    if resume and not (checkpoint / "progress.json").is_file():
        raise BadInputError(f"--resume: no checkpoint at {checkpoint}; run without --resume to start")
    if method == "diffcr":
        return _tune_diffcr(spec, options, recipe, out, checkpoint, resume, progress)
    from edgec.exits import exits_of
    from edgec.finetune.edge_llm import check_options
    from edgec.model import load_model

    progress(f"load {spec}")
    handle = load_model(spec)
    if handle.module is None or handle.tokenizer is None or handle.family != "causal-lm":
        raise BadInputError(f"{spec}: --method {method} tunes a causal LM with a tokenizer")
    if exits_of(handle.module) is not None or handle.info.get("amoeba"):
        raise BadInputError(f"{spec} was tuned already (exit heads or a mixture of LoRAs); tune the model it came from")
    if method == "amoeba":
        return _tune_amoeba(handle, options, recipe, out, checkpoint, resume, progress)
    check_options(handle.module, options)  # before the passes: they can take minutes
    compressed = run_recipe_passes(handle, recipe, progress)
    return _tune_edge_llm(handle, options, recipe, out, checkpoint, resume, progress, compressed)


def run_recipe_passes(handle: Any, recipe: Recipe, progress: Progress) -> tuple[Any, list[dict[str, Any]]] | None:
    """The recipe's passes (e.g. luc), through the pass cache as a compile runs them: tuning
    then trains adapters on top of their output (packed weights stay frozen). Returns what
    records that output for the tuned model directory, or None without passes."""
    if not recipe.passes:
        return None
    from edgec.compiler import _calibration
    from edgec.compiler import _run_passes as run_cached
    from edgec.pass_cache import PassCache
    from edgec.passes import REGISTRY
    from edgec.pipeline import PassContext, PassManager

    manager = PassManager(REGISTRY, recipe.passes)

    capture = PassCache(handle.module)  # stamps of the loaded tensors: what the passes change is stored
    log = run_cached(manager, handle, PassContext(recipe=recipe, calibration_ids=_calibration(handle, recipe), progress=progress), recipe)
    entries = [{"name": e.name, "changed": e.changed, "seconds": e.seconds, "record": e.record} for e in log]
    progress(f"passes applied: {', '.join(e.name for e in log)}; the adapters train on top of their output")
    return capture, entries


def _tune_edge_llm(handle: Any, options: Any, recipe: Recipe, out: Path, checkpoint: Path, resume: bool,
                   progress: Progress, compressed: tuple[Any, list[dict[str, Any]]] | None) -> dict[str, Any]:
    from edgec.data import training_windows
    from edgec.exits import describe_exits
    from edgec.finetune.edge_llm import EdgeLlmTuner, record_of
    from edgec.progress import advance

    settings = recipe.finetune
    torch.manual_seed(settings.seed)
    tuner = EdgeLlmTuner(handle.module, options, settings.seed)
    num_layers = len(tuner.entries.layers)
    progress(f"edge-llm: {describe_exits(num_layers, options.stride)}; {tuner.describe()}")
    # Each exit trains on its own windows: the data is seen once, as a vanilla run of all the steps would see it.
    windows = torch.tensor(training_windows(handle.tokenizer, settings.data, settings.steps * settings.batch * len(tuner.stages),
                                            settings.seq_len, settings.seed))
    key = {"model": handle.sha256, "finetune": settings.model_dump(), "options": options.model_dump(),
           "passes": [spec.model_dump() for spec in recipe.passes], "version": CHECKPOINT_VERSION}
    state: dict[str, Any] = {"stage": 0, "step": 0, "losses": {}}
    optimizer_state: dict[str, torch.Tensor] = {}
    if resume:
        state, tensors, optimizer_state = _read_checkpoint(checkpoint, key)
        tuner.load_trained(tensors)
        where = (f"exit {tuner.stages[state['stage']].exit_layer}, step {state['step']}" if state["stage"] < len(tuner.stages)
                 else "every exit trained, the output not yet written")
        progress(f"resume from {checkpoint}: {where}")
    start = time.perf_counter()
    step_seconds: list[float] = []
    for stage_index in range(state["stage"], len(tuner.stages)):
        stage = tuner.stages[stage_index]
        params = tuner.set_trainable(stage)
        named = tuner.trainable(stage)
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
        first = state["step"] if stage_index == state["stage"] else 0
        if first and optimizer_state:
            _load_optimizer(optimizer, named, optimizer_state)
        losses: list[float] = state["losses"].setdefault(str(stage.exit_layer), [])
        label = f"edge-llm: exit after layer {stage.exit_layer} (LoRA in layers {stage.window[0]}-{stage.window[-1]})"
        for step in range(first, settings.steps):
            began = time.perf_counter()
            first_window = (stage_index * settings.steps + step) * settings.batch
            batch = windows[first_window : first_window + settings.batch]
            loss = tuner.loss(stage, batch)
            loss_value = float(loss.detach())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_seconds.append(time.perf_counter() - began)
            losses.append(loss_value)
            done = step + 1 == settings.steps
            if done or (step + 1) % settings.checkpoint_every == 0:
                at = {"stage": stage_index + 1, "step": 0} if done else {"stage": stage_index, "step": step + 1}
                _write_checkpoint(checkpoint, key, {**at, "losses": state["losses"]}, tuner.every_trained(),
                                  {} if done else _optimizer_tensors(optimizer, named))
            advance(progress, label, step + 1, settings.steps, f"loss {loss_value:.3f}")
        optimizer_state = {}
    record = {
        **record_of(tuner),
        "model": handle.name,
        "model_sha256": handle.sha256,
        "data": settings.data,
        "steps_per_exit": settings.steps,
        "batch": settings.batch,
        "seq_len": settings.seq_len,
        "lr": settings.lr,
        "seed": settings.seed,
        "loss": {exit_layer: {"first": values[0], "last": values[-1], "last_10_mean": sum(values[-10:]) / len(values[-10:])}
                 for exit_layer, values in state["losses"].items() if values},
        "seconds": time.perf_counter() - start,
        "step_ms_mean": 1e3 * sum(step_seconds) / len(step_seconds) if step_seconds else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        # Their records are in the output's passes/record.json.
        "passes": [] if compressed is None else [e["name"] for e in compressed[1]],
    }
    _write_model(handle, tuner, record, out, compressed)
    shutil.rmtree(checkpoint, ignore_errors=True)
    adapters = "merged adapters" if compressed is None else "adapters on the compressed model (kept separate)"
    progress(f"wrote {out}: {adapters} and {len(tuner.stages) - 1} exit heads; compile it with `edgec compile {out}`")
    return {"output": str(out), **record}


def _tune_amoeba(handle: Any, options: Any, recipe: Recipe, out: Path, checkpoint: Path, resume: bool,
                 progress: Progress) -> dict[str, Any]:
    import random

    from edgec.data import training_windows
    from edgec.finetune.amoeba import Amoeba, distillation_step
    from edgec.progress import advance
    from edgec.subnet.search import require_search

    if recipe.passes:
        raise BadInputError("--method amoeba tunes the dense model; compress after extraction "
                            "(edgec compile TUNED --subnet ... --recipe ...) and drop the recipe's passes here")
    if handle.info.get("applied_passes"):
        raise BadInputError(f"{handle.name} is a compressed tuned model; --method amoeba tunes a dense base model")
    search = require_search(handle, "--method amoeba")
    shapes = search.shapes()
    if len(shapes) < 2:
        raise BadInputError(f"{handle.name}: the subnet search's table has one shape; search with more depths or widths")
    settings = recipe.finetune
    torch.manual_seed(settings.seed)
    amoeba = Amoeba(handle.module, search, options, settings.seed)
    trained = sum(p.numel() for p in amoeba.trainable().values())
    smallest = shapes[-1][0].label()
    progress(f"amoeba: {len(amoeba.mixtures)} projections x {options.experts} LoRA experts (rank {options.rank}), "
             f"{trained:,} parameters train; {len(shapes)} shapes, smallest {smallest}")
    windows = torch.tensor(training_windows(handle.tokenizer, settings.data, settings.steps * settings.batch, settings.seq_len, settings.seed))
    key = {"model": handle.sha256, "method": "amoeba", "finetune": settings.model_dump(), "options": options.model_dump(),
           "search": search.record["key"], "version": CHECKPOINT_VERSION}
    state: dict[str, Any] = {"stage": 0, "step": 0, "losses": {"steps": []}}
    optimizer_state: dict[str, torch.Tensor] = {}
    if resume:
        state, tensors, optimizer_state = _read_checkpoint(checkpoint, key)
        amoeba.load_trained(tensors)
        progress(f"resume from {checkpoint}: step {state['step']} of {settings.steps}")
    params = amoeba.set_trainable()
    named = amoeba.trainable()
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    if optimizer_state:
        _load_optimizer(optimizer, named, optimizer_state)
    history: list[dict[str, float]] = state["losses"]["steps"]
    start = time.perf_counter()
    step_seconds: list[float] = []
    for step in range(state["step"], settings.steps):
        began = time.perf_counter()
        batch = windows[step * settings.batch : (step + 1) * settings.batch]
        # Seeded by the step: a resumed run draws the shapes an uninterrupted one would have.
        losses = distillation_step(amoeba, batch, random.Random(f"{settings.seed}:{step}"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - began)
        history.append(losses)
        done = step + 1 == settings.steps
        if done or (step + 1) % settings.checkpoint_every == 0:
            _write_checkpoint(checkpoint, key, {"stage": 0, "step": step + 1, "losses": state["losses"]}, amoeba.every_trained(),
                              {} if done else _optimizer_tensors(optimizer, named))
        advance(progress, "amoeba: in-place distillation", step + 1, settings.steps,
                f"full loss {losses['full']:.3f}, smallest KD {losses[smallest]:.3f}")
    record = {
        "method": "amoeba",
        **options.model_dump(),
        "model": handle.name,
        "model_sha256": handle.sha256,
        "data": settings.data,
        "steps": settings.steps,
        "batch": settings.batch,
        "seq_len": settings.seq_len,
        "lr": settings.lr,
        "seed": settings.seed,
        "trained_parameters": trained,
        "smallest_shape": smallest,
        "loss": _loss_summary(history),
        "seconds": time.perf_counter() - start,
        "step_ms_mean": 1e3 * sum(step_seconds) / len(step_seconds) if step_seconds else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    _write_amoeba_model(handle, amoeba, search, record, out)
    shutil.rmtree(checkpoint, ignore_errors=True)
    progress(f"wrote {out}: the mixture of LoRAs and its router; compile a shape with `edgec compile {out} --subnet depth=D,width=W`")
    return {"output": str(out), **record}


def _tune_diffcr(spec: str, options: Any, recipe: Recipe, out: Path, checkpoint: Path, resume: bool,
                 progress: Progress) -> dict[str, Any]:
    import numpy as np

    from edgec.finetune.diffcr import DIFFCR_CONFIG, DIFFCR_WEIGHTS, Diffcr, read_diffcr, training_images
    from edgec.families.dit import FAMILY_DIT, diffusers_scheduler
    from edgec.model import load_model
    from edgec.progress import advance

    settings = recipe.finetune
    progress(f"load {spec}")
    handle = load_model(spec)
    if handle.family != FAMILY_DIT:
        raise BadInputError(f"{spec}: --method diffcr tunes a diffusion transformer (a diffusers DiT directory), not a {handle.family} model")
    if read_diffcr(Path(handle.source)) is not None:
        raise BadInputError(f"{spec} was tuned with diffcr already; tune the model it came from")
    images, labels = training_images(settings.data)
    if tuple(images.shape[1:]) != tuple(handle.info["sample_shape"]):
        raise BadInputError(f"finetune.data {settings.data}: images {list(images.shape[1:])}, the model draws {handle.info['sample_shape']}")
    transformer = handle.module.transformer  # type: ignore[union-attr]
    schedule = diffusers_scheduler(handle.info["scheduler_config"], "ddpm")
    alphas = schedule.alphas_cumprod.float()
    torch.manual_seed(settings.seed)
    diffcr = Diffcr(transformer, options, int(schedule.config.num_train_timesteps))
    transformer.train()
    key = {"model": handle.sha256, "method": "diffcr", "finetune": settings.model_dump(), "options": options.model_dump(),
           "version": CHECKPOINT_VERSION}
    state: dict[str, Any] = {"stage": 0, "step": 0, "losses": {"diffusion": [], "mean_ratio": []}}
    named = {**{f"transformer.{n}": p for n, p in transformer.named_parameters()}, "ratios": diffcr.ratios}
    optimizer = torch.optim.AdamW(diffcr.parameter_groups(settings.lr), weight_decay=0.0)
    if resume:
        state, tensors, optimizer_state = _read_checkpoint(checkpoint, key)
        with torch.no_grad():
            for name, value in tensors.items():
                named[name].copy_(value)
        _load_optimizer(optimizer, named, optimizer_state)
        progress(f"resume from {checkpoint}: step {state['step']} of {settings.steps}")
    start = time.perf_counter()
    step_seconds: list[float] = []
    for step in range(state["step"], settings.steps):
        began = time.perf_counter()
        # Seeded by the step (numpy: data, timesteps, noise; torch: the label embedding's class dropout),
        # so a resumed run draws what an uninterrupted one would.
        rng = np.random.default_rng([settings.seed, step])
        torch.manual_seed(settings.seed * 1_000_003 + step)
        batch = rng.integers(0, len(images), size=settings.batch)
        loss, diffusion = diffcr.loss(torch.from_numpy(images[batch]), torch.from_numpy(labels[batch]), alphas, rng)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        diffcr.clamp()
        step_seconds.append(time.perf_counter() - began)
        mean_ratio = float(diffcr.ratios.detach().mean())
        state["losses"]["diffusion"].append(diffusion)
        state["losses"]["mean_ratio"].append(mean_ratio)
        if step + 1 == settings.steps or (step + 1) % settings.checkpoint_every == 0:
            _write_checkpoint(checkpoint, key, {"stage": 0, "step": step + 1, "losses": state["losses"]},
                              {n: p.detach() for n, p in named.items()}, _optimizer_tensors(optimizer, named))
        advance(progress, f"diffcr: target ratio {options.ratio}", step + 1, settings.steps,
                f"loss {diffusion:.4f}, mean ratio {mean_ratio:.3f}")
    table = diffcr.table()
    history = state["losses"]["diffusion"]
    record = {"method": "diffcr", **options.model_dump(), "model": handle.name, "model_sha256": handle.sha256,
              "data": settings.data, "steps": settings.steps, "batch": settings.batch, "lr": settings.lr, "seed": settings.seed,
              "loss": {"first": history[0], "last_10_mean": sum(history[-10:]) / len(history[-10:])} if history else {},
              "mean_ratio": float(np.mean(table["learned"])), "mean_bin": float(np.mean(table["bins"])),
              "seconds": time.perf_counter() - start,
              "step_ms_mean": 1e3 * sum(step_seconds) / len(step_seconds) if step_seconds else None,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    from safetensors.torch import save_file

    source = Path(handle.source)
    for block in diffcr.blocks:
        block.ratio = None
    with staged(out) as tmp:
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in (RECORD, DIFFCR_CONFIG, DIFFCR_WEIGHTS):
                shutil.copy2(path, tmp / path.name)
            elif path.is_dir() and path.name != "transformer":
                shutil.copytree(path, tmp / path.name)
        plain = diffcr.plain_transformer()
        plain.save_pretrained(tmp / "transformer")
        save_file(diffcr.router_tensors(), str(tmp / DIFFCR_WEIGHTS))
        (tmp / DIFFCR_CONFIG).write_text(json.dumps(table, indent=1) + "\n")
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(checkpoint, ignore_errors=True)
    progress(f"wrote {out}: mean learned ratio {record['mean_ratio']:.3f} (bins {record['mean_bin']:.3f}); "
             f"compile it with `edgec compile {out} --recipe recipes/diffcr.yaml`")
    if record["mean_ratio"] > options.ratio + 0.05:
        progress(f"warning: the mean ratio {record['mean_ratio']:.3f} stayed above the target {options.ratio}: the diffusion loss "
                 f"outweighs the ratio loss; raise finetune.options.lam (3 holds the target on zoo:tiny-dit) or tune longer")
    return {"output": str(out), **record, "table": table}


def _loss_summary(history: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """First, last and mean of the last 10 of each loss (the full model's CE, each shape's KD)."""
    names = sorted({name for losses in history for name in losses})
    summary = {}
    for name in names:
        values = [losses[name] for losses in history if name in losses]
        summary[name] = {"first": values[0], "last": values[-1], "last_10_mean": sum(values[-10:]) / len(values[-10:]), "steps": len(values)}
    return summary


# ----------------------------------------------------------------------------- output
def _write_amoeba_model(handle: Any, amoeba: Any, search: Any, record: dict[str, Any], out: Path) -> None:
    """The source model's files untouched, the mixtures and router (amoeba.*), the search
    they were trained over (subnet/), and the record; staged and renamed when complete."""
    from edgec.finetune.amoeba import AMOEBA_CONFIG, AMOEBA_WEIGHTS, save_amoeba
    from edgec.subnet.search import MODEL_SEARCH_DIR, SEARCH_FILE, WIDTH_FILE

    source = Path(handle.source)
    with staged(out) as tmp:
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in (RECORD, AMOEBA_CONFIG, AMOEBA_WEIGHTS):
                shutil.copy2(path, tmp / path.name)
        save_amoeba(amoeba, tmp, {k: record[k] for k in ("steps", "batch", "seq_len", "lr", "data")})
        (tmp / MODEL_SEARCH_DIR).mkdir()
        for name in (SEARCH_FILE, WIDTH_FILE):
            if (search.directory / name).is_file():
                shutil.copy2(search.directory / name, tmp / MODEL_SEARCH_DIR / name)
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")


def _write_model(handle: Any, tuner: Any, record: dict[str, Any], out: Path, compressed: tuple[Any, list[dict[str, Any]]] | None) -> None:
    """The source model's files, the exit heads and the record; staged in a temporary
    sibling and renamed when complete. A dense model gets the adapters merged into its
    weights. A compressed one keeps its weights as loaded plus what the passes made
    (passes/, the pass cache's format) and the adapters beside them (adapters.*): merging
    would re-quantize the packed weights the adapters were trained against."""
    from safetensors.torch import load_file, save_file

    from edgec.exits import EXITS_CONFIG, EXITS_WEIGHTS, detach, save_exits
    from edgec.finetune.lora import ADAPTERS_CONFIG, ADAPTERS_WEIGHTS, PASSES_DIR, save_adapters, unwrapped

    source = Path(handle.source)
    deltas = tuner.merged_deltas() if compressed is None else {}
    heads = detach(tuner.model)
    assert heads is not None
    heads.config.tuning = {k: record[k] for k in ("method", "steps_per_exit", "batch", "seq_len", "lr", "data")}
    with staged(out) as tmp:
        if compressed is not None:
            capture, log = compressed
            save_adapters(tuner.model, tmp)
            with unwrapped(tuner.model):
                capture.dir, capture.last = tmp, None
                capture.save(PASSES_DIR, tuner.model, log)
            if not (tmp / PASSES_DIR).is_dir():
                raise UnsupportedError("the recipe's passes put modules into the model that a tuned model directory cannot store")
        merged: set[str] = set()
        for path in sorted(source.iterdir()):
            if path.is_dir() or path.name in (EXITS_CONFIG, EXITS_WEIGHTS, RECORD, ADAPTERS_CONFIG, ADAPTERS_WEIGHTS):
                continue
            if path.name.startswith("model") and path.suffix == ".safetensors" and compressed is None:
                tensors = load_file(str(path))
                for name, delta in deltas.items():
                    key = f"{name}.weight"
                    if key in tensors:
                        weight = tensors[key]
                        # GPT-2 stores Conv1D weights [in, out]; edgec's modules are [out, in].
                        update = delta if tuple(weight.shape) == tuple(delta.shape) else delta.t()
                        tensors[key] = (weight.float() + update).to(weight.dtype).contiguous()
                        merged.add(name)
                save_file(tensors, str(tmp / path.name), metadata={"format": "pt"})
            else:
                shutil.copy2(path, tmp / path.name)
        missing = sorted(set(deltas) - merged)
        if missing:
            raise UnsupportedError(f"{source}: no weight named {missing[0]}.weight to merge the adapter into; "
                                   "this checkpoint's tensor names differ from its modules'")
        save_exits(heads, tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")


# ----------------------------------------------------------------------------- checkpoints
def _optimizer_tensors(optimizer: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, parameter in named.items():
        for field, value in optimizer.state.get(parameter, {}).items():
            tensors[f"{name}#{field}"] = torch.as_tensor(value).detach().clone()
    return tensors


def _load_optimizer(optimizer: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    for key, value in tensors.items():
        name, field = key.split("#")
        optimizer.state[named[name]][field] = value.clone()


def _write_checkpoint(path: Path, key: dict[str, Any], state: dict[str, Any], trained: dict[str, torch.Tensor],
                      optimizer: dict[str, torch.Tensor]) -> None:
    """Written beside `path` and swapped in by renames: a stop at any moment leaves the
    previous complete checkpoint or this one."""
    from safetensors.torch import save_file

    with staged(path) as tmp:
        save_file({k: v.contiguous() for k, v in trained.items()}, str(tmp / "trained.safetensors"))
        save_file({k: v.contiguous() for k, v in optimizer.items()}, str(tmp / "optimizer.safetensors"))
        (tmp / "progress.json").write_text(json.dumps({"key": key, **state}, indent=1) + "\n")


def _read_checkpoint(path: Path, key: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    try:
        saved = json.loads((path / "progress.json").read_text())
        trained = load_file(str(path / "trained.safetensors"))
        optimizer = load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: not a readable checkpoint ({exc}); delete it to start over") from None
    if saved.get("key") != key:
        raise BadInputError(f"{path} is a checkpoint of another model or other finetune settings; "
                            "resume with the same model and recipe, or delete it to start over")
    return {"stage": int(saved["stage"]), "step": int(saved["step"]), "losses": saved["losses"]}, trained, optimizer
