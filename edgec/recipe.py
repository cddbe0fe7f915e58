"""Recipes: YAML files (plus `--set key=value` overrides) validated into typed objects.

A recipe names the passes to run with their options and per-layer overrides,
the target and backend, the calibration data and the parity check. Errors name
the key and the line it is on, so a typo is found without reading a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgec.errors import BadInputError

BACKENDS: tuple[str, ...] = ("tvm", "onnx")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LayerOverride(Strict):
    """Options for some layers only: `match` is a layer index, a range "2-5", or a glob on module names."""

    match: int | str
    options: dict[str, Any] = Field(default_factory=dict)


class PassSpec(Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    overrides: list[LayerOverride] = Field(default_factory=list)


class CalibrationSpec(Strict):
    data: str = Field(
        "train",
        description="'train' (the built-in train split), 'held-out' (the split perplexity is measured on) or a .txt path",
    )
    samples: int = Field(4, ge=1, description="number of calibration segments")
    seq_len: int = Field(128, ge=8, description="tokens per calibration segment")


class ParitySpec(Strict):
    rtol: float = Field(1e-3, gt=0, description="max |artifact - reference| allowed, as a fraction of each reference output's range")
    atol: float = Field(
        1e-5, ge=0, description="the tolerance's absolute floor: a near-constant output is not held to a fraction of its tiny range"
    )
    prompt_len: int = Field(16, ge=2, description="tokens in the reference prefill input")


class InputsSpec(Strict):
    """The inputs of a graph model (.onnx, .pt2): fixed shapes, sizes for its symbolic
    dimensions, and real reference inputs. What is not given is made up realistically."""

    shapes: dict[str, list[int]] = Field(
        default_factory=dict, description="input name -> its full shape, fixed in the artifact (--input-shape x=1x3x224x224)"
    )
    dims: dict[str, int] = Field(
        default_factory=dict, description="symbolic dimension name -> size, fixed in the artifact (--dim batch=1)"
    )
    file: str | None = Field(None, description=".npz of input name -> array, used as the reference inputs (--reference-inputs)")

    @field_validator("shapes")
    @classmethod
    def _positive_shapes(cls, shapes: dict[str, list[int]]) -> dict[str, list[int]]:
        for name, shape in shapes.items():
            if any(size < 1 for size in shape):
                raise ValueError(f"input {name}: every size must be >= 1, got {shape}")
        return shapes

    @field_validator("dims")
    @classmethod
    def _positive_dims(cls, dims: dict[str, int]) -> dict[str, int]:
        for name, size in dims.items():
            if size < 1:
                raise ValueError(f"dimension {name}: size must be >= 1, got {size}")
        return dims

    def given(self) -> bool:
        return bool(self.shapes or self.dims or self.file)


class EvaluateSpec(Strict):
    tokens: int = Field(0, ge=0, description="held-out tokens the artifact's perplexity is measured on at compile; 0 = skip")
    window: int = Field(256, ge=8, description="tokens per scoring window")


class VotingSpec(Strict):
    exits: list[int] | None = Field(
        None, description="layers whose exits vote (a model tuned with exits, edgec.exits); default all of them"
    )


class FinetuneSpec(Strict):
    """`edgec finetune`: what every method reads; a method's own settings are its options."""

    data: str = Field("train", description="'train' (the built-in train split) or a .txt path; the held-out split is never trained on")
    steps: int = Field(40, ge=1, description="optimizer steps (edge-llm: per exit)")
    batch: int = Field(4, ge=1, description="sequences per step")
    seq_len: int = Field(128, ge=8, description="tokens per sequence")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate")
    seed: int = 0
    checkpoint_every: int = Field(10, ge=1, description="steps between resumable checkpoints")
    options: dict[str, Any] = Field(default_factory=dict, description="the method's own options (edge-llm: stride, rank, alpha)")


class SamplerSpec(Strict):
    """A diffusion model's sampler loop, as the artifact's program runs it."""

    scheduler: Literal["ddim", "ddpm"] = Field(
        "ddim", description="update rule: ddim (deterministic, eta 0) or ddpm (ancestral); the noise schedule is the model's"
    )
    steps: int = Field(20, ge=1, le=1000, description="sampling steps (the default of `edgec run` and the parity check)")
    guidance_scale: float = Field(2.0, ge=1.0, description="classifier-free guidance scale; 1 = conditional only")


class ModSpec(Strict):
    """Mixture-of-Depths token skipping in a DiT (a model tuned with `finetune --method diffcr`)."""

    policy: Literal["none", "learned", "uniform"] = Field(
        "none", description="learned: the tuned ratio per (layer, timestep region), one region graph each; "
        "uniform: `ratio` in every block and step, one graph; none: plain blocks"
    )
    ratio: float | None = Field(None, gt=0, le=1, description="uniform: the share of tokens every block keeps (default the tuned target)")


class Recipe(Strict):
    target: str = "cpu"
    backend: Literal["tvm", "onnx"] = "tvm"
    # TVM target fields as TVM types them (num-cores is a number, mattr a list); checked by TVM and LLVM before any work.
    target_options: dict[str, bool | int | float | str | list[str]] = Field(default_factory=dict)
    dtype: Literal["float32", "float16"] = Field(
        "float32", description="compute dtype of the artifact; float16 where the target's capability table allows it (GPUs)"
    )
    max_context: int | None = Field(None, ge=16, description="longest sequence the artifact accepts; default min(model, 1024)")
    cache_dtype: Literal["float32", "float16", "int8"] = Field(
        "float32", description="an LLM's KV cache between calls: float16 halves what a long-context decode step reads, "
        "int8 quarters it (a fixed scale per layer, head and channel, measured on the calibration text); attention "
        "still computes in the artifact's dtype"
    )
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    parity: ParitySpec = Field(default_factory=ParitySpec)
    inputs: InputsSpec = Field(default_factory=InputsSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    voting: VotingSpec = Field(default_factory=VotingSpec)
    subnet: str | None = Field(
        None, description="AmoebaLLM shape 'depth=N,width=R' extracted before the passes, or 'all': every shape of the table in one artifact (after `edgec subnet search MODEL`)"
    )
    graph: str | None = Field(None, description="a GCN model: the graph .npz (or zoo:wordnet) it is compiled for and checked on")
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    mod: ModSpec = Field(default_factory=ModSpec)
    passes: list[PassSpec] = Field(default_factory=list)

    @field_validator("subnet")
    @classmethod
    def _shape(cls, subnet: str | None) -> str | None:
        if subnet is not None and subnet != "all":
            from edgec.subnet import parse_shape

            try:
                parse_shape(subnet, "subnet")
            except BadInputError as exc:
                raise ValueError(exc.message) from None
        return subnet


# name -> options model; filled by edgec.passes so recipe loading can check pass options.
OptionsLookup = Callable[[str], type[BaseModel] | None]


class RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads `2:4` as the base-60 integer 124; a recipe means the N:M pattern."""


_INT_TAG = "tag:yaml.org,2002:int"
RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _INT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# YAML 1.1's integers without the base-60 form.
RecipeLoader.add_implicit_resolver(
    _INT_TAG,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def _line_of(root: yaml.Node | None, loc: Sequence[str | int]) -> int | None:
    """1-based line of the deepest YAML node along `loc` (a pydantic error location)."""
    node = root
    line = None if root is None else root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = None
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    found = (key_node, value_node)
                    break
            if found is None:
                return line
            line = found[0].start_mark.line + 1
            node = found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _explain(
    error: ValidationError, where: str, root: yaml.Node | None, prefix: Sequence[str | int] = (),
    set_by: dict[tuple[str | int, ...], str] | None = None,
) -> str:
    first = error.errors()[0]
    loc = [*prefix, *first["loc"]]
    key = ".".join(str(p) for p in loc) or "<top level>"
    # A value that came from --set is blamed on the --set, not on the recipe line it replaced.
    given = next((text for path, text in (set_by or {}).items() if tuple(loc[: len(path)]) == path), None)
    line = _line_of(root, loc) if root is not None and given is None else None
    at = f"--set {given}" if given is not None else f"{where}:{line}" if line is not None else where
    if first["type"] == "extra_forbidden":
        return f"{at}: unknown key '{key}'; check the spelling (edgec compile --dry-run shows every valid key)"
    return f"{at}: bad value for '{key}': {first['msg']}"


def _parse_value(text: str) -> Any:
    try:
        return yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError:
        return text


def apply_set(data: dict[str, Any], assignment: str) -> tuple[str | int, ...]:
    """Apply one `--set key=value`: a recipe field (`backend=onnx`, `parity.rtol=1e-4`)
    or a pass option (`PASS.option=value`, the pass must be in the recipe). Returns the
    path it set in the recipe's data."""
    if "=" not in assignment:
        raise BadInputError(f"--set {assignment!r}: expected key=value, e.g. --set backend=onnx")
    key, raw = assignment.split("=", 1)
    # Target names and raw TVM JSON stay text: YAML would turn '{"kind": ...}' into a mapping.
    value = raw if key.strip() in ("target", "backend") else _parse_value(raw)
    parts = key.strip().split(".")
    if parts[0] == "passes" and len(parts) == 1:
        names = [n.strip() for n in str(raw).split(",") if n.strip()]
        data["passes"] = [{"name": n} for n in names]
        return ("passes",)
    if parts[0] in Recipe.model_fields:
        target: dict[str, Any] = data
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise BadInputError(f"--set {key}: '{part}' is not a section")
        target[parts[-1]] = value
        return tuple(parts)
    for index, spec in enumerate(data.get("passes", []) or []):
        if isinstance(spec, dict) and spec.get("name") == parts[0]:
            if len(parts) < 2:
                raise BadInputError(f"--set {key}: pass options are set as PASS.option=value (or PASS.section.option=value)")
            options = spec.setdefault("options", {})
            for part in parts[1:-1]:
                options = options.setdefault(part, {})
                if not isinstance(options, dict):
                    raise BadInputError(f"--set {key}: '{part}' is not a section of {parts[0]}'s options")
            options[parts[-1]] = value
            return ("passes", index, "options", *parts[1:])
    fields = ", ".join(Recipe.model_fields)
    raise BadInputError(
        f"--set {key}: '{parts[0]}' is neither a recipe key ({fields}) nor a pass in this recipe; "
        "add the pass under passes: or with --set passes=NAME"
    )


def load_recipe(
    path: Path | None,
    sets: Sequence[str] = (),
    options_for: OptionsLookup | None = None,
) -> Recipe:
    """Read, override and validate a recipe; pass options are validated by their pass's model."""
    root: yaml.Node | None = None
    where = "recipe"
    data: dict[str, Any] = {}
    if path is not None:
        where = str(path)
        if not path.is_file():
            raise BadInputError(f"recipe {path} does not exist; see recipes/ for ready-made ones")
        text = path.read_text()
        try:
            root = yaml.compose(text, Loader=RecipeLoader)
            loaded = yaml.load(text, Loader=RecipeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise BadInputError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise BadInputError(f"{path}: a recipe is a mapping of keys (target, backend, passes, ...)")
        data = loaded
    set_by = {apply_set(data, assignment): assignment for assignment in sets}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise BadInputError(_explain(exc, where, root, set_by=set_by)) from None
    if options_for is not None:
        for index, spec in enumerate(recipe.passes):
            options_model = options_for(spec.name)
            if options_model is None:
                line = _line_of(root, ["passes", index, "name"]) if root is not None else None
                at = f"{where}:{line}" if line is not None else where
                raise BadInputError(f"{at}: unknown pass '{spec.name}'; run `edgec passes` for the list")
            try:
                spec.options = options_model.model_validate(spec.options).model_dump()
            except ValidationError as exc:
                raise BadInputError(_explain(exc, where, root, ["passes", index, "options"], set_by)) from None
            for o_index, override in enumerate(spec.overrides):
                merged = {**spec.options, **override.options}
                try:
                    options_model.model_validate(merged)
                except ValidationError as exc:
                    raise BadInputError(
                        _explain(exc, where, root, ["passes", index, "overrides", o_index, "options"])
                    ) from None
    return recipe


def with_inputs(recipe: Recipe, shapes: Sequence[str], dims: Sequence[str], file: Path | None) -> Recipe:
    """The recipe with `--input-shape NAME=1x3x320x320`, `--dim NAME=N` and
    `--reference-inputs FILE.npz` applied over its `inputs:` section."""
    merged = recipe.inputs.model_dump()
    for option in shapes:
        name, _, text = option.rpartition("=")
        sizes = text.lower().split("x")
        if not name or not all(size.isdigit() and int(size) >= 1 for size in sizes):
            raise BadInputError(f"--input-shape {option!r}: expected NAME=SIZExSIZE..., sizes integers >= 1, e.g. image=1x3x320x320")
        merged["shapes"][name] = [int(size) for size in sizes]
    for option in dims:
        name, _, text = option.rpartition("=")
        if not name or not text.isdigit() or int(text) < 1:
            raise BadInputError(f"--dim {option!r}: expected NAME=SIZE with SIZE an integer >= 1, e.g. --dim batch=1")
        merged["dims"][name] = int(text)
    if file is not None:
        if not file.expanduser().is_file():
            raise BadInputError(f"--reference-inputs {file} does not exist; give an .npz of input name -> array")
        merged["file"] = str(file.expanduser())
    return recipe.model_copy(update={"inputs": InputsSpec.model_validate(merged)})
