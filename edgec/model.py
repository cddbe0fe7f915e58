"""Loading what a user hands edgec into a ModelHandle.

MODEL is a Hugging Face directory (config.json + *.safetensors), a `torch.export`
.pt2 file, an .onnx file, or `zoo:NAME`. Which family it is, and how it loads, is
the families' business (edgec.families); here: the handle, and the checks every
family shares. Weights are read with safetensors only; the one format that needs
pickle (.pt2, via torch.export.load) is refused unless the user says --trust-pickle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgec.errors import BadInputError, UnsupportedError

FAMILY_CAUSAL_LM = "causal-lm"
FAMILY_EXPORTED = "exported-program"
FAMILY_ONNX = "onnx-graph"
FAMILY_ENCODER = "encoder"


@dataclass
class ModelHandle:
    """A loaded model plus what passes and backends need to know about it."""

    name: str
    family: str
    architecture: str
    source: Path
    sha256: str
    module: nn.Module | None = None
    tokenizer: Any | None = None
    tokenizer_dir: Path | None = None
    exported: torch.export.ExportedProgram | None = None
    onnx_path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # What the family's `prepare` made of the model for this compile (a cleaned graph,
    # the reference inputs): the family's own business.
    prepared: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        return None if self.module is None else getattr(self.module, "config", None)


def sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def check_safetensors(path: Path) -> None:
    """A truncated or corrupt file fails here with its name, not deep inside transformers."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            if keys:
                handle.get_slice(keys[-1])
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadInputError(f"{path} is truncated or corrupt ({exc}); re-save it with save_pretrained") from None
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise BadInputError(
            f"{path} is truncated or corrupt ({size} bytes, header promises {8 + header_len + end}); "
            "re-save it with save_pretrained"
        )



def read_config(path: Path) -> dict[str, Any]:
    """A model directory's config.json as a dict, or a one-line refusal naming it."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise BadInputError(f"{path} has no config.json; a Hugging Face model directory needs config.json and *.safetensors")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{config_path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{config_path} is not a JSON object of model settings")
    return data


def load_tokenizer_files(path: Path) -> Any:
    """transformers' tokenizer from a directory, or a one-line error naming the directory: a
    deleted or mismatched tokenizer file otherwise surfaces as a traceback from deep inside
    the tokenizer conversion."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        listed = ", ".join(sorted(p.name for p in path.iterdir() if "token" in p.name or p.name in ("vocab.txt", "merges.txt")))
        raise BadInputError(
            f"{path}: its tokenizer cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
            f"found {listed or 'no tokenizer files'}: restore the files save_pretrained wrote (tokenizer.json with tokenizer_config.json)"
        ) from None


def load_model(spec: str, trust_pickle: bool = False) -> ModelHandle:
    """Resolve MODEL (path or zoo:NAME) into a ModelHandle through the family that
    recognises it, or fail with a clear message."""
    from edgec.families import recognise

    name = None
    if spec.startswith("zoo:"):
        from edgec.zoo import zoo_path

        path, name = zoo_path(spec.removeprefix("zoo:")), spec
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise BadInputError(
                f"{spec} does not exist; give a Hugging Face model directory, a .pt2 or .onnx file, or zoo:NAME (edgec zoo list)"
            )
    family = recognise(path)
    if family is None:
        if path.is_dir():
            config = read_config(path)
            found = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
            raise UnsupportedError(
                f"{spec}: architecture '{found}' is not supported; edgec loads {', '.join(supported_architectures())}"
            )
        raise BadInputError(f"{spec}: unknown model format '{path.suffix}'; edgec reads HF directories, .pt2 and .onnx files")
    return family.load(path, name, trust_pickle)


def supported_architectures() -> list[str]:
    """Every HF architecture some family loads (for messages)."""
    from edgec.families import all_families

    return [a for family in all_families() for a in family.architectures]
