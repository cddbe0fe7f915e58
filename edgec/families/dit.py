"""The diffusion-transformer family: a class-conditional DiT (diffusers'
`DiTTransformer2DModel`) with its noise schedule, as one entry and a sampler program:

    denoise(sample[2, C, H, W], timestep[2], class_labels[2]) -> noise[2, C, H, W]

A diffusers directory is recognised by its `model_index.json` (or `transformer/` plus
`scheduler/`). Each sampling step calls the entry once on the image twice over, with the
requested class and the null class, and mixes the two predictions (classifier-free
guidance); the scheduler's update (DDIM or DDPM, recipe `sampler:`) runs in numpy in
edgec.targets.runtime, so the host, the device agent and the RPC runner all sample.
The noise schedule (betas, spacing, clipping, prediction type) is read from the model's
scheduler config and written into the program as data.

Parity goes beyond one call: the reference is a whole sample drawn by diffusers' own
scheduler from numpy-generated noise, and the artifact's sampler must reproduce it.
`edgec run ART --class 3 --steps 20 --seed 0 -o grid.png` draws a grid, and `edgec eval
--task fid` scores samples with the Fashion-MNIST classifier (edgec.fashion).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgec.errors import BadInputError, UnsupportedError
from edgec.families import EvalRequest, Family, Progress, Section, entry_io, register
from edgec.mod import RoutedBlock, add_routers, capacity, set_capacities
from edgec.model import ModelHandle, sha256_files
from edgec.recipe import Recipe
from edgec.targets.export import ExportedEntry

FAMILY_DIT = "dit"
DIT_CLASSES: tuple[str, ...] = ("DiTTransformer2DModel",)
# Scheduler configs whose noise schedule edgec reads (the update rule is the recipe's).
SCHEDULER_CLASSES: tuple[str, ...] = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler")
WEIGHTS = "diffusion_pytorch_model.safetensors"
DIT_TASKS: tuple[str, ...] = ("fid",)
ENTRY = "denoise"
KEEP_MAP_CLASSES = (0, 5, 8)  # a top, a sandal, a bag: three different silhouettes


class DiTSection(Section):
    """manifest["dit"]: what the sampler draws and how."""

    architecture: str
    sample_shape: list[int]
    patch_size: int
    tokens: int
    layers: int
    num_classes: int
    null_class: int
    labels: list[str]
    model_scheduler: str
    # Token skipping (recipe `mod:`): policy, regions as [t_from, t_to), the keep ratio and
    # the static capacity (tokens kept) per region and layer, and each region's entry.
    mod: dict[str, Any] | None = None
    # With mod: which tokens the routers keep, for a few samples drawn at compile (`edgec report` draws them).
    keep_maps: list[dict[str, Any]] | None = None


class Denoiser(nn.Module):
    """The transformer's noise prediction only: a DiT trained with learned variance
    predicts 2C channels, of which the sampler uses the first C."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.channels = int(transformer.config.in_channels)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.transformer(sample, timestep, class_labels, return_dict=False)[0][:, : self.channels]


class RegionDenoiser(nn.Module):
    """The denoiser with every routed block's capacity fixed: one timestep region's graph."""

    def __init__(self, denoiser: Denoiser, capacities: list[int] | None) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.capacities = capacities

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        blocks = [b for b in self.denoiser.transformer.transformer_blocks if isinstance(b, RoutedBlock)]
        if blocks:
            set_capacities(blocks, self.capacities)
        return self.denoiser(sample, timestep, class_labels)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path} is not readable JSON ({exc})") from None


def _parts(path: Path) -> tuple[Path, Path]:
    """The transformer and scheduler directories of a diffusers model directory."""
    transformer, scheduler = path / "transformer", path / "scheduler"
    index = path / "model_index.json"
    if index.is_file():
        named = _read_json(index)
        for part in ("transformer", "scheduler"):
            if part not in named:
                raise BadInputError(f"{index} names no {part}; edgec compiles a DiT pipeline (transformer + scheduler)")
    return transformer, scheduler


def scheduler_config(path: Path) -> dict[str, Any]:
    _, scheduler = _parts(path)
    config_path = scheduler / "scheduler_config.json"
    if not config_path.is_file():
        raise BadInputError(f"{path}: no scheduler/scheduler_config.json; save the pipeline's scheduler next to the transformer")
    config = _read_json(config_path)
    kind = str(config.get("_class_name"))
    if kind not in SCHEDULER_CLASSES:
        raise UnsupportedError(f"{config_path}: scheduler {kind} is not supported; edgec reads {', '.join(SCHEDULER_CLASSES)}")
    if config.get("thresholding"):
        raise UnsupportedError(f"{config_path}: dynamic thresholding is not supported; set thresholding false")
    if config.get("prediction_type", "epsilon") not in ("epsilon", "sample", "v_prediction"):
        raise UnsupportedError(f"{config_path}: prediction_type {config.get('prediction_type')!r} is not supported")
    return config


def diffusers_scheduler(config: dict[str, Any], kind: str) -> Any:
    """diffusers' scheduler for the update rule `kind` over the model's noise schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler

    known = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
    return known[kind].from_config(config)


def program_scheduler(config: dict[str, Any], kind: str) -> dict[str, Any]:
    """The update rule and the noise schedule as data for edgec.targets.runtime."""
    scheduler = diffusers_scheduler(config, kind)
    final = float(scheduler.final_alpha_cumprod) if kind == "ddim" else 1.0
    return {
        "kind": kind,
        "alphas_cumprod": [float(a) for a in scheduler.alphas_cumprod],
        "train_timesteps": int(scheduler.config.num_train_timesteps),
        "spacing": str(scheduler.config.timestep_spacing),
        "steps_offset": int(scheduler.config.steps_offset),
        "final_alpha_cumprod": final,
        "prediction_type": str(scheduler.config.prediction_type),
        "clip_sample": bool(scheduler.config.clip_sample),
        "clip_sample_range": float(scheduler.config.clip_sample_range),
    }


def torch_sample(module: nn.Module | Any, scheduler: Any, label: int, null_class: int, start: np.ndarray, steps: int,
                 guidance: float, step_noise: np.ndarray | None) -> np.ndarray:
    """One sample drawn with diffusers' own scheduler (the reference for the numpy sampler);
    a DDPM step's random draw is taken from `step_noise` so both samplers add the same noise."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    scheduler.set_timesteps(steps)
    x = torch.from_numpy(np.asarray(start, dtype=np.float32))
    labels = torch.tensor([label, null_class], dtype=torch.int64)
    draw: list[torch.Tensor] = []
    original = ddpm_module.randn_tensor
    ddpm_module.randn_tensor = lambda *args, **kwargs: draw[0]
    try:
        with torch.no_grad():
            for index, t in enumerate(scheduler.timesteps):
                denoise = module if isinstance(module, nn.Module) else module(int(t))  # t -> its region's module
                output = denoise(torch.cat([x, x]), torch.full((2,), int(t), dtype=torch.int64), labels)
                guided = output[1:] + guidance * (output[:1] - output[1:])
                if step_noise is not None:
                    draw[:] = [torch.from_numpy(step_noise[index])]
                x = scheduler.step(guided, t, x).prev_sample
    finally:
        ddpm_module.randn_tensor = original
    return x.numpy()


def keep_map(model: ModelHandle, modules: dict[str, nn.Module], program: dict[str, Any], recipe: Recipe, label: int) -> dict[str, Any]:
    """Which tokens every block keeps at the middle sampling step of each timestep region,
    while drawing one sample of class `label` (seed 0) with the region graphs' torch modules;
    the drawn image beside it. Kept tokens are bitmasks (hex, row-major over the patch grid)."""
    from edgec.targets.runtime import Sampler, sample_noise

    assert isinstance(model.module, Denoiser)
    blocks = [b for b in model.module.transformer.transformer_blocks if isinstance(b, RoutedBlock)]
    tokens = int(model.info["tokens"])
    seen: dict[tuple[int, int], str] = {}  # (t, layer) -> kept tokens of the conditional half

    def recorder(layer: int) -> Any:
        def record(block: RoutedBlock, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            t = int(kwargs["timestep"][0])
            mask = np.ones(tokens, dtype=bool)
            if block.capacity is not None and block.capacity < tokens:
                mask[:] = False
                mask[block.choose(hidden[:1], block.capacity)[1][0].numpy()] = True
            seen[(t, layer)] = np.packbits(mask).tobytes().hex()
        return record

    handles = [block.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        start, draws = sample_noise(program, 0, recipe.sampler.steps)
        scheduler = diffusers_scheduler(model.info["scheduler_config"], recipe.sampler.scheduler)
        sampler = Sampler(program)
        image = torch_sample(lambda t: modules[sampler.entry_at(t)], scheduler, label,
                             int(model.info["num_classes"]), start, recipe.sampler.steps, recipe.sampler.guidance_scale, draws)
    finally:
        for handle in handles:
            handle.remove()
    drawn = sorted({t for t, _ in seen}, reverse=True)
    middles = []
    for region in program["regions"]:
        inside = [t for t in drawn if region["t_from"] <= t < region["t_to"]]
        middles.append(inside[len(inside) // 2] if inside else None)
    pixels = np.clip((image[0, 0] + 1) * 127.5, 0, 255).round().astype(np.uint8)
    return {"class": label, "label": model.info["labels"][label], "image": pixels.tolist(), "t": middles,
            "kept": [[seen[(t, layer)] for layer in range(len(blocks))] if t is not None else None for t in middles]}


class DiT(Family):
    name = FAMILY_DIT
    section_key = "dit"
    Section = DiTSection
    architectures = DIT_CLASSES
    recipe_sections = ("sampler", "mod")

    def recognise(self, path: Path) -> bool:
        if not path.is_dir():
            return False
        config = path / "transformer" / "config.json"
        if not ((path / "model_index.json").is_file() or (path / "scheduler").is_dir()) or not config.is_file():
            return False
        try:
            return str(json.loads(config.read_text(encoding="utf-8")).get("_class_name")) in DIT_CLASSES
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False

    def load(self, path: Path, name: str | None, trust_pickle: bool) -> ModelHandle:
        from diffusers import DiTTransformer2DModel

        transformer_dir, _ = _parts(path)
        config = _read_json(transformer_dir / "config.json")
        patch, size = int(config.get("patch_size") or 0), int(config.get("sample_size") or 0)
        if patch <= 0 or size <= 0 or size % patch:
            raise BadInputError(f"{transformer_dir / 'config.json'}: sample_size {size} is not a multiple of patch_size {patch}")
        if not config.get("num_embeds_ada_norm"):
            raise UnsupportedError(f"{transformer_dir}: not class-conditional (no num_embeds_ada_norm); edgec samples by class")
        weights = transformer_dir / WEIGHTS
        if not weights.is_file():
            raise BadInputError(f"{transformer_dir}: no {WEIGHTS} (edgec reads safetensors only; re-save with save_pretrained)")
        schedule = scheduler_config(path)
        try:
            # float32 whatever the stored dtype (zoo:tiny-dit-diffcr stores float16): what edgec compiles and checks.
            transformer = DiTTransformer2DModel.from_pretrained(transformer_dir, use_safetensors=True, torch_dtype=torch.float32)
        except (ValueError, OSError, RuntimeError, TypeError) as exc:
            raise BadInputError(f"{transformer_dir}: the weights do not fit the config ({str(exc).splitlines()[0]})") from None
        from edgec.finetune.diffcr import DIFFCR_CONFIG, DIFFCR_WEIGHTS, read_diffcr

        tuned = read_diffcr(path)
        if tuned is not None:
            table, routers = tuned
            blocks = add_routers(transformer)
            expected = {f"blocks.{i}.router.weight" for i in range(len(blocks))}
            if set(routers) != expected or len(table.get("bins", [])) != len(blocks):
                raise BadInputError(f"{path / DIFFCR_WEIGHTS}: routers or ratio table do not fit the {len(blocks)} blocks; tune it again")
            with torch.no_grad():
                for i, block in enumerate(blocks):
                    block.router.weight.copy_(routers[f"blocks.{i}.router.weight"])
        index = path / "model_index.json"
        id2label = _read_json(index).get("id2label", {}) if index.is_file() else {}
        classes = int(config["num_embeds_ada_norm"])
        labels = [str(id2label.get(str(i), i)) for i in range(classes)]
        return ModelHandle(
            name=name or str(path),
            family=FAMILY_DIT,
            architecture=str(config["_class_name"]),
            source=path,
            sha256=sha256_files([transformer_dir / "config.json", weights, path / "scheduler" / "scheduler_config.json",
                                 *([path / DIFFCR_CONFIG, path / DIFFCR_WEIGHTS] if tuned is not None else [])]),
            module=Denoiser(transformer.eval()).eval(),
            info={
                "parameters": sum(p.numel() for p in transformer.parameters()),
                "layers": int(config["num_layers"]),
                "hidden_size": int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
                "sample_shape": [int(config["in_channels"]), size, size],
                "patch_size": patch,
                "tokens": (size // patch) ** 2,
                "num_classes": classes,
                "labels": labels,
                "scheduler_config": schedule,
                **({"diffcr": tuned[0]} if tuned is not None else {}),
            },
        )

    def prepare(self, model: ModelHandle, recipe: Recipe, progress: Progress) -> None:
        """Recipe `mod:`: the static capacities of each timestep region's graph."""
        super().prepare(model, recipe, progress)
        mod, table = recipe.mod, model.info.get("diffcr")
        tokens, layers = int(model.info["tokens"]), int(model.info["layers"])
        total = int(model.info["scheduler_config"].get("num_train_timesteps", 1000))
        model.prepared["mod"] = None
        if mod.policy == "none":
            if mod.ratio is not None:
                raise BadInputError("mod.ratio applies to mod.policy uniform; set mod.policy=uniform (or learned, with the tuned ratios)")
            return
        if table is None:
            raise BadInputError(f"{model.name}: mod.policy {mod.policy} needs the routers of a model tuned with "
                                f"`edgec finetune {model.name} --method diffcr`; this one has none "
                                "(zoo:tiny-dit-diffcr is zoo:tiny-dit so tuned)")
        if mod.policy == "learned":
            if mod.ratio is not None:
                raise BadInputError("mod.ratio applies to mod.policy uniform; the learned policy keeps the tuned ratios")
            regions = [list(map(int, r)) for r in table["regions"]]
            ratios = [[float(table["bins"][layer][r]) for layer in range(layers)] for r in range(len(regions))]
            if len(regions) > recipe.sampler.steps:
                raise BadInputError(f"{model.name}: {len(regions)} timestep regions but sampler.steps {recipe.sampler.steps}: "
                                    "some region would never run; sample with at least as many steps")
        else:
            ratio = float(mod.ratio if mod.ratio is not None else table["target"])
            regions, ratios = [[0, total]], [[ratio] * layers]
        capacities = [[capacity(r, tokens) for r in row] for row in ratios]
        model.prepared["mod"] = {"policy": mod.policy, "regions": regions, "ratios": ratios, "capacities": capacities}
        kept = sum(map(sum, capacities)) / (tokens * layers * len(regions))
        progress(f"mod {mod.policy}: {len(regions)} timestep region(s), {kept:.1%} of block-tokens kept on average")

    def _example(self, model: ModelHandle) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(2, *model.info["sample_shape"], generator=generator)
        return sample, torch.tensor([500, 500], dtype=torch.int64), torch.tensor([0, model.info["num_classes"]], dtype=torch.int64)

    def region_entries(self, model: ModelHandle) -> tuple[dict[str, list[int] | None], list[str]]:
        """Each distinct capacity vector's entry name, and the entry of each region."""
        mod = model.prepared.get("mod")
        if not mod:
            return {ENTRY: None}, [ENTRY]
        names: dict[tuple[int, ...], str] = {}
        for row in mod["capacities"]:
            names.setdefault(tuple(row), f"{ENTRY}_r{len(names)}")
        return {name: list(row) for row, name in names.items()}, [names[tuple(row)] for row in mod["capacities"]]

    def entries(self, model: ModelHandle) -> list[ExportedEntry]:
        assert isinstance(model.module, Denoiser)
        example = self._example(model)
        exported = []
        for name, capacities in self.region_entries(model)[0].items():
            module = RegionDenoiser(model.module, capacities).eval()
            with torch.no_grad():
                program = torch.export.export(module, example)
            exported.append(ExportedEntry(name, program, module, example, None, ["sample", "timestep", "class_labels"], ["noise"]))
        return exported

    def reference(self, model: ModelHandle, entries: list[ExportedEntry], recipe: Recipe) -> dict[str, list[np.ndarray]]:
        """One call at a mid-schedule timestep, and one whole sample (class 0, seed 0)."""
        from edgec.targets.runtime import sample_noise

        io = super().reference(model, entries, recipe)
        program = self.program(model, entries, recipe)
        start, draws = sample_noise(program, 0, recipe.sampler.steps)
        scheduler = diffusers_scheduler(model.info["scheduler_config"], recipe.sampler.scheduler)
        modules = {entry.name: entry.module for entry in entries}
        regions = program["regions"]

        def module_at(t: int) -> nn.Module:
            return modules[next(r["entry"] for r in regions if r["t_from"] <= t < r["t_to"])]

        image = torch_sample(module_at, scheduler, 0, model.info["num_classes"], start, recipe.sampler.steps,
                             recipe.sampler.guidance_scale, draws)
        io["sample.noise"] = [start]
        io["sample.labels"] = [np.asarray([0], dtype=np.int64)]
        if draws is not None:
            io["sample.step_noise"] = [draws]
        io["sample.out"] = [image]
        return io

    def program(self, model: ModelHandle, entries: list[ExportedEntry], recipe: Recipe) -> dict[str, Any]:
        return {
            "kind": "sample",
            "entries": entry_io(entries),
            "regions": self.regions(model),
            "inputs": ["sample", "timestep", "class_labels"],
            "output": "noise",
            "scheduler": program_scheduler(model.info["scheduler_config"], recipe.sampler.scheduler),
            "steps": recipe.sampler.steps,
            "guidance_scale": recipe.sampler.guidance_scale,
            "null_class": int(model.info["num_classes"]),
            "sample_shape": list(model.info["sample_shape"]),
        }

    def regions(self, model: ModelHandle) -> list[dict[str, Any]]:
        mod = model.prepared.get("mod")
        if not mod:
            return [{"entry": ENTRY, "t_from": 0, "t_to": int(model.info["scheduler_config"].get("num_train_timesteps", 1000))}]
        names = self.region_entries(model)[1]
        return [{"entry": name, "t_from": lo, "t_to": hi} for name, (lo, hi) in zip(names, mod["regions"])]

    def section(self, model: ModelHandle, entries: list[ExportedEntry], recipe: Recipe) -> DiTSection:
        return DiTSection(
            architecture=model.architecture,
            sample_shape=list(model.info["sample_shape"]),
            patch_size=int(model.info["patch_size"]),
            tokens=int(model.info["tokens"]),
            layers=int(model.info["layers"]),
            num_classes=int(model.info["num_classes"]),
            null_class=int(model.info["num_classes"]),
            labels=list(model.info["labels"]),
            model_scheduler=str(model.info["scheduler_config"]["_class_name"]),
            mod=None if not model.prepared.get("mod") else {**model.prepared["mod"], "entries": self.region_entries(model)[1]},
            keep_maps=None if not model.prepared.get("mod") else self.keep_maps(model, entries, recipe),
        )

    def keep_maps(self, model: ModelHandle, entries: list[ExportedEntry], recipe: Recipe) -> list[dict[str, Any]]:
        modules, program = {e.name: e.module for e in entries}, self.program(model, entries, recipe)
        return [keep_map(model, modules, program, recipe, label) for label in KEEP_MAP_CLASSES if label < int(model.info["num_classes"])]

    def describe_section(self, section: dict[str, Any]) -> str:
        c, h, w = section["sample_shape"]
        mod = section.get("mod")
        skipping = ""
        if mod:
            kept = sum(map(sum, mod["capacities"])) / (section["tokens"] * section["layers"] * len(mod["capacities"]))
            skipping = f"; mod {mod['policy']}: {len(mod['capacities'])} region graph(s), {kept:.1%} of block-tokens kept"
        return (f"{section['architecture']}: {c}x{h}x{w} images, {section['tokens']} tokens (patch {section['patch_size']}), "
                f"{section['layers']} layers, {section['num_classes']} classes{skipping}")

    def run(self, root: Path, manifest: dict[str, Any], runtime: Any, request: dict[str, Any]) -> dict[str, Any]:
        """Samples of one class: `class` (index or name), `samples` images, seeds from `seed`,
        `steps` (default the program's), a PNG grid written to `output` when given."""
        program, section = manifest["program"], manifest["dit"]
        label = class_of(request.get("class"), section["labels"])
        steps = int(request.get("steps") or program["steps"])
        count = int(request.get("samples") or 8)
        seed = int(request.get("seed") or 0)
        guidance = float(request.get("guidance") or program["guidance_scale"])
        result: dict[str, Any] = {"artifact": str(root), "backend": manifest["backend"], "class": label,
                                  "label": section["labels"][label], "samples": count, "seed": seed, "steps": steps}
        if request.get("device"):
            from edgec.deploy import sample_on_device

            drawn = sample_on_device(root, str(request["device"]), {"classes": [label] * count, "seed": seed, "steps": steps,
                                                                    "guidance": guidance}, request.get("progress") or (lambda _m: None))
            images = drawn.pop("images")
            result.update(drawn)
        else:
            started = time.perf_counter()
            images = draw(lambda entry, args: runtime.run(entry, list(args)), program, [label] * count, seed, steps, guidance)
            result["ms_per_sample"] = (time.perf_counter() - started) * 1e3 / count
        judged = judge(images, label)
        if judged is not None:
            result["classified_as_asked"] = judged
        where = f" on {result['device']}" if "device" in result else ""
        output = request.get("output")
        if output:
            write_grid(images, Path(output), f"{section['labels'][label]}, {steps} steps{where}")
            result["grid"] = str(output)
        if request.get("npz"):
            path = Path(request["npz"])
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_name(f".{path.name}.tmp.npz")
            np.savez(staging, images=images)
            staging.replace(path)
            result["npz"] = str(path)
        return result

    def describe_run(self, result: dict[str, Any]) -> tuple[list[str], str]:
        lines = [f"{result['samples']} samples of class {result['class']} ({result['label']}), seeds {result['seed']}.."
                 f"{result['seed'] + result['samples'] - 1}, {result['steps']} steps"]
        if "classified_as_asked" in result:
            lines.append(f"the Fashion-MNIST classifier calls {result['classified_as_asked']:.0%} of them {result['label']}")
        if "grid" in result:
            lines.append(f"grid: {result['grid']}")
        if "npz" in result:
            lines.append(f"images: {result['npz']}")
        where = f", on {result['device']}{' (emulated)' if result.get('emulated') else ''}" if "device" in result else ""
        return lines, f"{result['ms_per_sample']:.0f} ms per sample ({result['backend']}{where})"

    def eval(self, spec: str, request: EvalRequest, progress: Progress) -> dict[str, Any]:
        """fid: `samples` images spread evenly over the classes; the classifier's accuracy on
        the requested class and the Fréchet distance of its features to the real test set."""
        from edgec import fashion

        task = request.task or "fid"
        if task not in DIT_TASKS:
            raise BadInputError(f"--task {task}: not a diffusion task; available: {', '.join(DIT_TASKS)}")
        if request.device is not None:
            raise BadInputError("--device: diffusion samples are scored on this machine (drop --device)")
        run, program, labels, what = open_sampler(spec)
        if labels != list(fashion.CLASSES):
            raise UnsupportedError(f"{spec}: --task fid scores Fashion-MNIST classes; this model's classes are {labels[:3]}...")
        classes = [i % len(labels) for i in range(request.samples)]
        progress(f"fid: {request.samples} samples, {program['steps']} steps each, on {what}")
        started = time.perf_counter()
        images = draw(run, program, classes, request.seed, int(program["steps"]), float(program["guidance_scale"]), progress)
        seconds = time.perf_counter() - started
        return {"model": spec, "what": what, "task": task, "samples": request.samples, "seed": request.seed,
                "steps": int(program["steps"]), "ms_per_sample": seconds * 1e3 / request.samples,
                **quality(images, np.asarray(classes))}

    def describe_eval(self, result: dict[str, Any]) -> str:
        return (f"{result['what']}: FID (Fashion-MNIST classifier features) {result['fid']:.2f} over {result['samples']} samples, "
                f"classified as asked {result['class_accuracy']:.1%} (real test images: FID {result['fid_real_floor']:.2f}); "
                f"{result['ms_per_sample']:.0f} ms per sample")


def class_of(value: Any, labels: list[str]) -> int:
    if value is None:
        raise BadInputError(f"give --class: 0-{len(labels) - 1} or a label ({', '.join(labels)})")
    text = str(value).strip()
    if text.isdigit() and int(text) < len(labels):
        return int(text)
    for index, label in enumerate(labels):
        if text.lower() == label.lower():
            return index
    raise BadInputError(f"--class {value}: not a class of this model; give 0-{len(labels) - 1} or one of {', '.join(labels)}")


def draw(run: Any, program: dict[str, Any], classes: list[int], seed: int, steps: int, guidance: float,
         progress: Progress | None = None) -> np.ndarray:
    """Images [N, C, H, W], image i of class classes[i] from seed + i."""
    from edgec.targets.runtime import Sampler, sample_noise

    sampler = Sampler(program)
    images = []
    for i, label in enumerate(classes):
        start, draws = sample_noise(program, seed + i, steps)
        images.append(sampler.sample(run, label, start, steps, guidance, draws))
        if progress is not None and (i + 1) % 50 == 0:
            progress(f"{i + 1}/{len(classes)} samples")
    return np.concatenate(images)


def open_sampler(spec: str, recipe: Recipe | None = None) -> tuple[Any, dict[str, Any], list[str], str]:
    """(run(entry, args), program, labels, description) for an artifact (its runtime) or a
    model (torch, with `recipe`'s sampler and token skipping; by default the default recipe,
    and for a DiffCR-tuned model its learned ratios, what it was tuned to run with)."""
    from edgec.artifact import MANIFEST, open_runtime, read_manifest
    from edgec.model import load_model

    path = Path(spec)
    if path.is_dir() and (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        runtime = open_runtime(path, manifest)
        return (lambda entry, args: runtime.run(entry, list(args))), manifest["program"], manifest["dit"]["labels"], \
            f"{spec} ({manifest['backend']} artifact)"
    model = load_model(spec)
    if model.family != FAMILY_DIT:
        raise BadInputError(f"{spec} is a {model.family} model, not a diffusion transformer")
    assert model.module is not None
    if recipe is None:
        recipe = Recipe.model_validate({"mod": {"policy": "learned"}} if "diffcr" in model.info else {})
    family = DiT()
    family.prepare(model, recipe, lambda _message: None)
    modules = {name: RegionDenoiser(model.module, capacities).eval() for name, capacities in family.region_entries(model)[0].items()}
    program = family.program(model, [], recipe)

    def run(entry: str, args: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            return [modules[entry](*(torch.from_numpy(np.asarray(a)) for a in args)).numpy()]

    skipping = f", mod {recipe.mod.policy}" if recipe.mod.policy != "none" else ""
    return run, program, list(model.info["labels"]), f"{spec} (torch{skipping})"


def _classifier() -> Any | None:
    from edgec.zoo import ZOO_DIR

    path = ZOO_DIR / "fashion-classifier"
    if not (path / "model.safetensors").is_file():
        return None
    from edgec import fashion

    return fashion.load_classifier(path)


def judge(images: np.ndarray, label: int) -> float | None:
    """The share of images the Fashion-MNIST classifier puts in class `label` (None: no
    classifier, or images of another shape)."""
    from edgec import fashion

    classifier = _classifier()
    if classifier is None or images.shape[1:] != (1, fashion.SIZE, fashion.SIZE):
        return None
    predicted, _ = fashion.classify(classifier, images)
    return float((predicted == label).mean())


def quality(images: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """Class accuracy, FID against the real test set, and the floor: FID of as many real
    training images (what sampling noise alone gives at this sample count)."""
    from edgec import fashion

    classifier = _classifier()
    if classifier is None:
        raise BadInputError("edgec/zoo/fashion-classifier is missing; run scripts/train_fashion_classifier.py")
    predicted, features = fashion.classify(classifier, images)
    real, floor = _real_features(len(images))
    return {"class_accuracy": float((predicted == classes).mean()), "fid": fashion.frechet_distance(features, real),
            "fid_real_floor": fashion.frechet_distance(floor, real)}


@functools.lru_cache(maxsize=4)
def _real_features(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The classifier's features of the 10,000 test images, and of `count` training images
    (seeded): the same for every evaluation in a process, so computed once."""
    from edgec import fashion

    classifier = _classifier()
    test_images, _ = fashion.load("test")
    _, real = fashion.classify(classifier, test_images)
    train_images, _ = fashion.load("train")
    _, floor = fashion.classify(classifier, train_images[np.random.default_rng(0).choice(len(train_images), count, replace=False)])
    return real, floor


def write_grid(images: np.ndarray, path: Path, title: str) -> None:
    """Images in [-1, 1] as one PNG, up to 8 per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(images)
    columns = min(8, count)
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, 1.2 * rows + 0.4), squeeze=False)
    for i, axis in enumerate(axes.flat):
        axis.axis("off")
        if i < count:
            axis.imshow(np.clip((images[i, 0] + 1) / 2, 0, 1), cmap="gray", vmin=0, vmax=1)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    figure.savefig(staging, dpi=100, format="png")
    plt.close(figure)
    staging.replace(path)


register(DiT())
