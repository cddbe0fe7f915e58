"""Per-pass output cache: a compile that fails late (a build, parity or device error, a
full disk, Ctrl-C) resumes on the next run after the last pass that finished.

After each pass, what the passes so far changed in the freshly loaded model is stored
under the cache's `passes/KEY/`: the tensors that are not the loaded ones any more
(safetensors, shared tensors once) and the modules the passes put in, each by its class
from an allow-list (`KINDS`) and its plain settings; with the pass log. The key chains
the model's sha256, the recipe settings passes read (calibration, backend, dtype, target),
every pass so far with its options and layer overrides, and a digest of edgec's own
source, so a changed pass or option never reuses an old output. Nothing is unpickled: an
entry is tensors and JSON. On the next run the longest cached prefix of the recipe's passes
is loaded into the model and only the rest run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from edgec.cache import cache_root
from edgec.lm import AttentionCalibration
from edgec.packing import PackedEmbedding, PackedLinear, PackedWeight, planes_of, set_submodule
from edgec.passes.quantize_weights_int8 import Int8Embedding, Int8Linear
from edgec.sinks import SinkRule

ENTRY_VERSION = 1
TENSORS = "changed.safetensors"
RECORD = "record.json"


# ----------------------------------------------------------------------------- modules
def _packed_settings(module: PackedLinear | PackedEmbedding) -> dict[str, Any]:
    return {"bits": module.bits, "group": module.group, "keep": module.keep, "span": module.span, "cols": module.cols}


def _packed(settings: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PackedWeight:
    return PackedWeight(planes_of(tensors["plane0"], tensors.get("plane1")), tensors["scales"], tensors.get("zeros"),
                        int(settings["bits"]), int(settings["group"]), tensors.get("index"), int(settings["keep"]), int(settings["span"]),
                        int(settings["cols"]))


# A module kind: its class, its settings, and how to build it again from them and its own
# tensors (names relative to the module).
Kind = tuple[type[nn.Module], Callable[[Any], dict[str, Any]], Callable[[dict[str, Any], dict[str, torch.Tensor]], nn.Module]]

# The modules a pass may put into a model.
KINDS: dict[str, Kind] = {
    "PackedLinear": (PackedLinear, _packed_settings, lambda s, t: PackedLinear(_packed(s, t), t.get("bias"))),
    "PackedEmbedding": (PackedEmbedding, _packed_settings, lambda s, t: PackedEmbedding(_packed(s, t))),
    "AttentionCalibration": (
        AttentionCalibration,
        lambda m: {"heads": m.heads, "num_heads": m.num_heads, "rule": dict(m.rule.__dict__)},
        lambda s, t: AttentionCalibration(list(s["heads"]), int(s["num_heads"]), SinkRule(**s["rule"])),
    ),
    "Int8Linear": (Int8Linear, lambda m: {}, lambda s, t: Int8Linear(t["qweight"], t["scale"], t.get("bias"))),
    "Int8Embedding": (Int8Embedding, lambda m: {}, lambda s, t: Int8Embedding(t["qweight"], t["scale"])),
}


# ----------------------------------------------------------------------------- keys
@cache
def code_digest() -> str:
    """sha256 of edgec's Python source (the edgec, passes and targets packages)."""
    import edgec
    import edgec.passes
    import edgec.targets

    digest = hashlib.sha256()
    for package in (edgec, edgec.passes, edgec.targets):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def chain_key(previous: str, step: dict[str, Any]) -> str:
    return hashlib.sha256((previous + json.dumps(step, sort_keys=True, default=str)).encode()).hexdigest()[:24]


def base_key(model_sha256: str, recipe: Any) -> str:
    """What every pass may read besides its options: the model, and these recipe settings."""
    return chain_key(code_digest(), {
        "version": ENTRY_VERSION, "model": model_sha256, "calibration": recipe.calibration.model_dump(),
        "backend": recipe.backend, "dtype": recipe.dtype, "target": recipe.target,
    })


# ----------------------------------------------------------------------------- store
class PassCache:
    """Snapshots of one model after each pass, against the tensors it was loaded with."""

    def __init__(self, root: nn.Module, directory: Path | None = None) -> None:
        # The cache's entries; a tuned model directory keeps its own (edgec.finetune).
        self.dir = directory if directory is not None else cache_root() / "passes"
        # Identity and version of every loaded tensor: a pass that replaces or edits one
        # in place changes them; the others need not be stored.
        self.loaded = {name: _stamp(t) for name, t in _tensors(root).items()}
        self.structure = {(name, type(module)) for name, module in root.named_modules()}
        # The last entry stored or loaded, and the model's stamps then: a pass that changes
        # nothing (schedule only records) is stored as a pointer to it, not as a copy.
        self.last: tuple[str, dict[str, tuple[int, int]], list[dict[str, Any]]] | None = None

    def load(self, key: str, root: nn.Module) -> list[dict[str, Any]] | None:
        """The pass log of entry `key`, after putting its state into `root`; None if absent."""
        try:
            log = json.loads((self.dir / key / RECORD).read_text())["log"]
            state = _follow(self.dir, key)
            record = json.loads((self.dir / state / RECORD).read_text())
            tensors = load_file(self.dir / state / TENSORS) if (self.dir / state / TENSORS).exists() else {}
        except Exception:  # absent, half-deleted or corrupt: a miss, and the model is untouched
            return None
        # One Parameter per stored tensor, shared by its aliases: modules that shared one (a
        # tied embedding and head) share it again, which the exporters rely on to store it once.
        params = {name: nn.Parameter(tensor, requires_grad=False) for name, tensor in tensors.items()}
        for alias, original in record["aliases"].items():
            params[alias] = params[original]
        if any(module["kind"] not in KINDS for module in record["modules"]):
            return None
        for module in record["modules"]:
            prefix = f"{module['name']}."
            own = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
            set_submodule(root, module["name"], KINDS[module["kind"]][2](module["settings"], own))
        missing, unexpected = root.load_state_dict({k: p.data for k, p in params.items()}, strict=False)
        if unexpected or set(record["changed"]) & set(missing):
            raise RuntimeError(f"pass cache entry {key} does not fit the model (unexpected {unexpected[:3]})")
        self.last = (key, {name: _stamp(t) for name, t in _tensors(root).items()}, _modules(root))
        return list(log)

    def save(self, key: str, root: nn.Module, log: list[dict[str, Any]]) -> None:
        """Store the model's state after the passes in `log`; a failure to store (a full
        disk) costs the cache entry, never the compile."""
        known = {cls for cls, _, _ in KINDS.values()}
        if any((name, type(m)) not in self.structure and type(m) not in known for name, m in root.named_modules()):
            return  # a module no entry could rebuild: this pass's output is not stored
        modules = _modules(root)
        current = _tensors(root)
        stamps = {name: _stamp(t) for name, t in current.items()}
        if self.last is not None and self.last[1:] == (stamps, modules):
            if self._write(key, {"version": ENTRY_VERSION, "same_as": self.last[0], "log": log}, {}):
                return
        changed = sorted(name for name, t in current.items() if self.loaded.get(name) != _stamp(t))
        inside = [m["name"] + "." for m in modules]
        stored = sorted(set(changed) | {n for n in current if n.startswith(tuple(inside))})
        unique: dict[str, torch.Tensor] = {}
        aliases: dict[str, str] = {}
        seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
        storages: set[int] = set()
        for name in stored:
            tensor = current[name].detach()
            storage = tensor.untyped_storage().data_ptr()
            identity = (storage, tensor.storage_offset(), tuple(tensor.shape))
            if identity in seen:
                aliases[name] = seen[identity]
                continue
            seen[identity] = name
            # safetensors stores no two tensors over one memory: another view is copied.
            unique[name] = tensor.clone() if storage in storages else tensor.contiguous()
            storages.add(storage)
        record = {"version": ENTRY_VERSION, "modules": modules, "changed": changed, "aliases": aliases, "log": log}
        if self._write(key, record, unique):
            self.last = (key, stamps, modules)

    def _write(self, key: str, record: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bool:
        """Written beside and renamed: a reader never sees half an entry."""
        if (self.dir / key).is_dir():
            return True
        tmp: Path | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=self.dir))
            if tensors:
                save_file(tensors, str(tmp / TENSORS))
            (tmp / RECORD).write_text(json.dumps(record))
            os.rename(tmp, self.dir / key)
            return True
        except (OSError, TypeError, ValueError):  # a full disk, or a record that is not JSON
            return False
        finally:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _follow(directory: Path, key: str) -> str:
    """The entry holding the state of `key` (itself, or what its `same_as` points to)."""
    for _ in range(64):
        record = json.loads((directory / key / RECORD).read_text())
        if "same_as" not in record:
            return key
        key = record["same_as"]
    raise ValueError("pass cache: a same_as chain with no end")


def _modules(root: nn.Module) -> list[dict[str, Any]]:
    """The allow-listed modules in the model, with their settings."""
    by_class = {cls: name for name, (cls, _, _) in KINDS.items()}
    return [{"name": name, "kind": by_class[type(m)], "settings": KINDS[by_class[type(m)]][1](m)}
            for name, m in root.named_modules() if type(m) in by_class]


def _tensors(root: nn.Module) -> dict[str, torch.Tensor]:
    return dict(root.state_dict(keep_vars=True))


def _stamp(tensor: torch.Tensor) -> tuple[int, int]:
    return tensor.data_ptr(), tensor._version
