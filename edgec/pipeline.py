"""The Pass contract and the PassManager that runs a recipe's passes in order.

A pass is a class with a `name`, the model `families` it accepts, a pydantic
`Options` model, and `run(model, ctx) -> PassResult`. The manager checks every
pass accepts the model before running any, times each pass, reports progress,
and turns a failure into "pass X failed after [A, B]: why".
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from edgec.errors import EdgecError, UnsupportedError
from edgec.model import ModelHandle
from edgec.recipe import LayerOverride, PassSpec, Recipe


@dataclass
class PassContext:
    """What a pass may use besides the model: the recipe, calibration data, progress."""

    recipe: Recipe
    calibration_ids: Callable[[], list[list[int]]] | None = None
    progress: Callable[[str], None] = lambda message: None


@dataclass
class PassResult:
    """What a pass changed and the record it leaves in the manifest."""

    changed: bool
    record: dict[str, Any] = field(default_factory=dict)


class Pass(Protocol):
    name: ClassVar[str]
    families: ClassVar[tuple[str, ...]]
    Options: ClassVar[type[BaseModel]]
    summary: ClassVar[str]

    def __init__(self, options: BaseModel, overrides: Sequence[LayerOverride]) -> None: ...

    def run(self, model: ModelHandle, ctx: PassContext) -> PassResult: ...


# Decoder layers live under `.layers.N.` (Llama and most others) or `.h.N.` (GPT-2).
_LAYER_IN_NAME = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def layer_index_of(module_name: str) -> int | None:
    found = _LAYER_IN_NAME.search(f".{module_name}.")
    return int(found.group(1)) if found else None


def override_matches(match: int | str, module_name: str) -> bool:
    """An override matches by layer index (3), index range ("2-5"), or glob on the module name."""
    index = layer_index_of(module_name)
    if isinstance(match, int):
        return index == match
    range_match = re.fullmatch(r"(\d+)-(\d+)", match.strip())
    if range_match:
        low, high = int(range_match.group(1)), int(range_match.group(2))
        return index is not None and low <= index <= high
    return fnmatch.fnmatchcase(module_name, match)


def options_for_module(
    base: BaseModel, overrides: Sequence[LayerOverride], module_name: str
) -> BaseModel:
    """The pass options in force for one module: later overrides win."""
    merged = base.model_dump()
    for override in overrides:
        if override_matches(override.match, module_name):
            merged.update(override.options)
    return type(base).model_validate(merged)


@dataclass
class PassLogEntry:
    name: str
    options: dict[str, Any]
    changed: bool
    seconds: float
    record: dict[str, Any]
    # The output came from the pass cache (an earlier run's); `seconds` is that run's.
    cached: bool = False


class PassCacheLike(Protocol):
    def load(self, key: str, root: Any) -> list[dict[str, Any]] | None: ...

    def save(self, key: str, root: Any, log: list[dict[str, Any]]) -> None: ...


class PassFailed(EdgecError):
    """Re-raised pass failure, naming the pass and the ones that ran before it."""

    def __init__(self, name: str, done: Sequence[str], cause: EdgecError) -> None:
        super().__init__(f"pass {name} failed after [{', '.join(done)}]: {cause.message}")
        self.exit_code = cause.exit_code


class PassManager:
    """Runs an ordered, named list of passes over one model."""

    def __init__(self, registry: dict[str, type[Pass]], specs: Sequence[PassSpec]) -> None:
        self.registry = registry
        self.specs = list(specs)

    def check(self, model: ModelHandle) -> None:
        """Refuse before any work if a pass does not accept this model family."""
        for spec in self.specs:
            cls = self.registry[spec.name]
            if model.family not in cls.families:
                raise UnsupportedError(
                    f"pass {spec.name} does not apply to {model.name} (family {model.family}); "
                    f"it accepts: {', '.join(cls.families)}"
                )

    def check_capability(self, supported: Sequence[int], ops: Sequence[str], where: str) -> None:
        """Refuse before any work a pass whose output the target/backend cannot lower: a
        stored weight width (naming the nearest it can), or an op family it lacks."""
        for spec in self.specs:
            cls = self.registry[spec.name]
            wanted_of = getattr(cls, "weight_bits", None)
            if wanted_of is not None:
                options = cls.Options.model_validate(spec.options)
                for bits in sorted(wanted_of(options)):
                    if bits not in supported:
                        nearest = min(supported, key=lambda b: (abs(b - bits), -b))
                        raise UnsupportedError(
                            f"pass {spec.name}: {bits}-bit weights cannot be lowered on {where} "
                            f"(it stores {', '.join(map(str, sorted(supported)))} bits); the nearest supported is {nearest} bits"
                        )
            missing = [op for op in getattr(cls, "requires_ops", ()) if op not in ops]
            if missing:
                raise UnsupportedError(
                    f"pass {spec.name} needs {', '.join(missing)}, which {where} does not lower yet "
                    "(`edgec targets show` lists what it does)"
                )

    def run(self, model: ModelHandle, ctx: PassContext, cache: PassCacheLike | None = None, base_key: str = "") -> list[PassLogEntry]:
        """With `cache`, the longest prefix of the passes whose output an earlier run stored
        (keys chained from `base_key`) is loaded instead of run, and each pass run now is stored."""
        self.check(model)
        log: list[PassLogEntry] = []
        keys = self.keys(base_key)
        first = 0
        if cache is not None and model.module is not None:
            for done in range(len(self.specs), 0, -1):
                entries = cache.load(keys[done - 1], model.module)
                if entries is not None:
                    log = [PassLogEntry(**{**entry, "cached": True}) for entry in entries]
                    first = done
                    ctx.progress(f"passes {', '.join(e.name for e in log)}: output of an earlier run, from the pass cache "
                                 f"({len(self.specs) - done} to run)")
                    break
        for number, spec in enumerate(self.specs[first:], start=first + 1):
            cls = self.registry[spec.name]
            options = cls.Options.model_validate(spec.options)
            instance = cls(options, spec.overrides)
            ctx.progress(f"pass {number}/{len(self.specs)}: {spec.name}")
            start = time.perf_counter()
            try:
                result = instance.run(model, ctx)
            except EdgecError as exc:
                raise PassFailed(spec.name, [entry.name for entry in log], exc) from None
            log.append(
                PassLogEntry(
                    name=spec.name,
                    options=options.model_dump(),
                    changed=result.changed,
                    seconds=round(time.perf_counter() - start, 3),
                    record=result.record,
                )
            )
            if cache is not None and model.module is not None:
                cache.save(keys[number - 1], model.module, [asdict(entry) for entry in log])
        return log

    def keys(self, base_key: str) -> list[str]:
        """The pass-cache key after each pass: the base, then every pass so far with its options."""
        from edgec.pass_cache import chain_key

        keys, key = [], base_key
        for spec in self.specs:
            options = self.registry[spec.name].Options.model_validate(spec.options).model_dump()
            key = chain_key(key, {"pass": spec.name, "options": options, "overrides": [o.model_dump() for o in spec.overrides]})
            keys.append(key)
        return keys
