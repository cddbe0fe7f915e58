"""Model families: the one place that knows what kind of model something is.

A family (one module each: causal_lm, graph, ...) says
  * how it recognises and loads a model (`recognise`, `load`), and what a recipe changes
    about it before export (`prepare`: fixed input shapes, a cleaned graph),
  * its entries, each with input/output names and dynamic dimensions (`entries`),
  * the reference run: realistic inputs and the reference implementation's outputs
    (`reference`),
  * the *program* that drives the entries (`program`: data in the manifest, run by
    edgec.targets.runtime on the host, in the device agent and over RPC),
  * its manifest section, a typed model with a schema version (`section`),
  * how `edgec run` and compile-time evaluation use an artifact (`run`, `evaluate`).

The compiler, verify, run, eval, deploy, profile, the agent and the RPC runner go
through this contract only, so a new family is a new module plus its tests: it calls
`register` and every command drives it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from edgec.errors import BadInputError, UnsupportedError

if TYPE_CHECKING:
    from edgec.model import ModelHandle
    from edgec.recipe import Recipe
    from edgec.targets.export import ExportedEntry

Progress = Callable[[str], None]
# Recipe sections only some families read, and who reads them (for the refusal's message).
FAMILY_SECTIONS: dict[str, str] = {"sampler": "diffusion transformers (family dit)", "mod": "diffusion transformers (family dit)"}


@dataclass(frozen=True)
class EvalRequest:
    """What `edgec eval` asked for; each family reads the fields its tasks use."""

    task: str | None = None
    data: str | None = None
    tokens: int = 32768
    window: int = 256
    seed: int = 0
    samples: int = 120
    device: str | None = None


class Section(BaseModel):
    """A family's manifest section: typed, versioned, and checked when an artifact is read."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = 1


class Family:
    """The contract; defaults fit a family whose program is one forward per entry."""

    name: ClassVar[str]
    # The manifest key of the family's section (None: it writes none).
    section_key: ClassVar[str | None] = None
    # Whether its models continue text (eval's perplexity and labelled tasks apply).
    generates_text: ClassVar[bool] = False
    # Hugging Face architectures it loads (for messages and `edgec inspect`).
    architectures: ClassVar[tuple[str, ...]] = ()
    Section: ClassVar[type[Section] | None] = None
    # Kinds of entry that `--target PART=TARGET,...` can place apart (a GCN's sparse / dense).
    part_kinds: ClassVar[tuple[str, ...]] = ()
    # Recipe sections of FAMILY_SECTIONS this family reads; the others must stay at their defaults.
    recipe_sections: ClassVar[tuple[str, ...]] = ()

    def part_of(self, entry: str) -> str:
        """The part kind of an entry (for families with `part_kinds`)."""
        raise NotImplementedError

    def recognise(self, path: Path) -> bool:
        """Whether `path` (a file or directory that exists) is a model of this family."""
        return False

    def load(self, path: Path, name: str | None, trust_pickle: bool) -> ModelHandle:
        raise NotImplementedError

    def prepare(self, model: ModelHandle, recipe: Recipe, progress: Progress) -> None:
        """Whatever the recipe changes about the model before passes and export (fixed input
        shapes, a cleaned graph), kept in `model.prepared`. By default: nothing, and the
        recipe's `inputs` section, which this family does not read, is refused."""
        if recipe.inputs.given():
            raise BadInputError(f"{model.name}: --input-shape, --dim and --reference-inputs (recipe `inputs:`) apply to .onnx "
                                f"models; a {self.name} model's inputs are the family's own")
        self.check_sections(model, recipe)

    def check_sections(self, model: ModelHandle, recipe: Recipe) -> None:
        """A family-specific recipe section set for a model whose family does not read it is a
        mistake the user should hear about, not a setting silently ignored."""
        for section, readers in FAMILY_SECTIONS.items():
            value = getattr(recipe, section)
            if section not in self.recipe_sections and value != type(value)():
                raise BadInputError(f"{model.name}: recipe `{section}:` is read by {readers}; a {self.name} model does not read it")

    def entries(self, model: ModelHandle) -> list[ExportedEntry]:
        raise NotImplementedError

    def reference(self, model: ModelHandle, entries: list[ExportedEntry], recipe: Recipe) -> dict[str, list[np.ndarray]]:
        """{"<entry>.in": inputs, "<entry>.out": reference outputs} (plus program checks)."""
        import torch

        io: dict[str, list[np.ndarray]] = {}
        with torch.no_grad():
            for entry in entries:
                assert entry.module is not None
                outputs = entry.module(*entry.example)
                outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
                io[f"{entry.name}.in"] = [t.numpy() for t in entry.example]
                io[f"{entry.name}.out"] = [t.detach().numpy() for t in outputs]
        return io

    def program(self, model: ModelHandle, entries: list[ExportedEntry], recipe: Recipe) -> dict[str, Any]:
        return {"kind": "forward", "entries": entry_io(entries)}

    def section(self, model: ModelHandle, entries: list[ExportedEntry], recipe: Recipe) -> Section | None:
        return None

    def reference_rule(self) -> str:
        return "torch"

    def describe_section(self, section: dict[str, Any]) -> str:
        """One line for `edgec inspect ARTIFACT`."""
        return ", ".join(f"{k} {v}" for k, v in section.items() if k != "schema_version")

    def evaluates(self, model: ModelHandle, recipe: Recipe) -> bool:
        """Whether the recipe asks this model for a compile-time evaluation."""
        return False

    def evaluate(self, model: ModelHandle, recipe: Recipe, score: Any, progress: Progress) -> dict[str, Any] | None:
        """Compile-time evaluation of the built artifact. `score(windows, progress)` gives
        the summed NLL of token windows in the artifact's runtime, here or on a device."""
        return None

    def eval(self, spec: str, request: EvalRequest, progress: Progress) -> dict[str, Any]:
        """`edgec eval` of a model spec or an artifact directory of this family."""
        raise UnsupportedError(f"{spec}: `edgec eval` has no tasks for the {self.name} family yet")

    def describe_eval(self, result: dict[str, Any]) -> str:
        return str(result)

    def run(self, root: Path, manifest: dict[str, Any], runtime: Any, request: dict[str, Any]) -> dict[str, Any]:
        """`edgec run` on the artifact: by default, each entry on its reference inputs (or
        on `request["inputs"]`, an .npz of input name -> array), outputs summarised."""
        import time

        from edgec.artifact import load_reference

        reference = load_reference(root)
        supplied = _read_inputs(request.get("inputs"))
        results: dict[str, Any] = {}
        for entry, io in manifest["program"]["entries"].items():
            inputs = [supplied.get(name, reference[f"{entry}.in.{i}"]) for i, name in enumerate(io["inputs"])]
            start = time.perf_counter()
            outputs = runtime.run(entry, inputs)
            results[entry] = {
                "ms": (time.perf_counter() - start) * 1e3,
                "outputs": {name: _summary(np.asarray(value)) for name, value in zip(io["outputs"], outputs)},
            }
        return {"artifact": str(root), "backend": manifest["backend"], "entries": results}

    def describe_run(self, result: dict[str, Any]) -> tuple[list[str], str]:
        """Lines for stdout and one note for stderr that say what `run` produced."""
        lines = []
        for entry, info in result["entries"].items():
            for name, value in info["outputs"].items():
                lines.append(f"{entry}.{name}: {value['dtype']}{value['shape']} min {value['min']:.4g} max {value['max']:.4g} "
                             f"mean {value['mean']:.4g}" if value["min"] is not None else f"{entry}.{name}: {value['dtype']}{value['shape']}")
        times = ", ".join(f"{entry} {info['ms']:.1f} ms" for entry, info in result["entries"].items())
        return lines, f"{times} ({result['backend']})"


def entry_io(entries: list[ExportedEntry]) -> dict[str, dict[str, Any]]:
    """Each entry's input and output names, and its input shapes (null: a dynamic dimension)."""
    return {
        e.name: {"inputs": list(e.input_names), "outputs": list(e.output_names), "input_shapes": input_shapes(e)}
        for e in entries
    }


def input_shapes(entry: ExportedEntry) -> dict[str, list[int | None]]:
    if entry.onnx_model is not None:
        declared = {v.name: v.type.tensor_type.shape.dim for v in entry.onnx_model.graph.input}
        return {name: [d.dim_value if d.HasField("dim_value") else None for d in declared[name]] for name in entry.input_names}
    if entry.dynamic_shapes is not None:
        return {
            name: [None if axis in dynamic else int(size) for axis, size in enumerate(example.shape)]
            for name, example, dynamic in zip(entry.input_names, entry.example, entry.dynamic_shapes)
        }
    assert entry.program is not None  # a .pt2: its placeholders say which sizes are symbolic
    values = {n.name: n.meta.get("val") for n in entry.program.graph.nodes if n.op == "placeholder"}
    return {name: [d if isinstance(d, int) else None for d in values[name].shape] for name in entry.input_names}


def _summary(value: np.ndarray) -> dict[str, Any]:
    finite = value[np.isfinite(value)] if value.dtype.kind == "f" else value
    return {
        "shape": list(value.shape),
        "dtype": str(value.dtype),
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "mean": float(finite.mean()) if finite.size else None,
    }


def _read_inputs(path: str | None) -> dict[str, np.ndarray]:
    if path is None:
        return {}
    source = Path(path).expanduser()
    try:
        with np.load(source, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise BadInputError(f"--inputs {path}: not a readable .npz of input arrays ({exc})") from None


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family (built-ins register on import; a test may add its own)."""
    FAMILIES[family.name] = family
    return family


def _builtins() -> None:
    from edgec.families import causal_lm, dit, encoder, gcn, graph  # noqa: F401  (each registers itself)


def all_families() -> list[Family]:
    _builtins()
    return list(FAMILIES.values())


def family_named(name: str) -> Family:
    _builtins()
    found = FAMILIES.get(name)
    if found is None:
        raise UnsupportedError(f"model family {name!r} is unknown to this edgec; known: {', '.join(sorted(FAMILIES))}")
    return found


def recognise(path: Path) -> Family | None:
    _builtins()
    return next((family for family in FAMILIES.values() if family.recognise(path)), None)


def family_of_spec(spec: str) -> Family:
    """The family of an artifact directory (from its manifest) or of a model spec (by
    recognising its files, without loading it)."""
    from edgec.artifact import MANIFEST, read_manifest

    path = Path(spec).expanduser()
    if path.is_dir() and (path / MANIFEST).is_file():
        return family_named(read_manifest(path)["model"]["family"])
    if spec.startswith("zoo:"):
        from edgec.zoo import zoo_path

        path = zoo_path(spec.removeprefix("zoo:"))
    elif not path.exists():
        raise BadInputError(f"{spec} does not exist; give an artifact directory, a model directory, a .pt2 or .onnx file, or zoo:NAME")
    found = recognise(path)
    if found is None:
        from edgec.model import load_model

        load_model(spec)  # says why it is not a model edgec knows
        raise BadInputError(f"{spec}: no model family recognises it")
    return found


def check_section(root: Path, manifest: dict[str, Any]) -> None:
    """An artifact's family section must validate against its family's schema."""
    family = family_named(manifest["model"]["family"])
    if family.section_key is None or family.Section is None:
        return
    section = manifest.get(family.section_key)
    if section is None:
        raise BadInputError(f"{root}: the manifest lacks its {family.section_key!r} section; recompile it")
    from pydantic import ValidationError

    try:
        family.Section.model_validate(section)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise BadInputError(
            f"{root}: manifest section {family.section_key!r} is invalid at {'.'.join(map(str, first['loc']))} "
            f"({first['msg']}); recompile it"
        ) from None
