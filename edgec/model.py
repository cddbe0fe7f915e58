"""Loading what a user hands edgec into a ModelHandle.

MODEL is a Hugging Face causal-LM directory (config.json + *.safetensors), a
`torch.export` .pt2 file, an .onnx file, or `zoo:NAME`. Every way a model can
be wrong is checked here, before any work, with a message naming the file.
Weights are read with safetensors only; the one format that needs pickle
(.pt2, via torch.export.load) is refused unless the user says --trust-pickle.
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
from edgec.architectures import SUPPORTED_ARCHITECTURES, architecture_of, canonicalize, check_config

FAMILY_CAUSAL_LM = "causal-lm"
FAMILY_EXPORTED = "exported-program"
FAMILY_ONNX = "onnx-graph"


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


def _check_safetensors(path: Path) -> None:
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


def load_hf_dir(path: Path, name: str | None = None) -> ModelHandle:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise BadInputError(
            f"{path} has no config.json; a Hugging Face causal-LM directory needs config.json and *.safetensors"
        )
    try:
        config_data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{config_path} is not valid JSON ({exc})") from None
    if not isinstance(config_data, dict):
        raise BadInputError(f"{config_path} is not a JSON object of model settings")
    architectures = config_data.get("architectures") or []
    architecture = str(architectures[0]) if architectures else str(config_data.get("model_type", "unknown"))
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedError(
            f"{path}: architecture '{architecture}' is not supported; edgec loads {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    # transformers reads model.safetensors or a sharded index; only those are hashed and loaded.
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
        _check_safetensors(weight)

    import transformers
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise BadInputError(f"{config_path} is not a usable model config ({str(exc).splitlines()[0]})") from None
    try:
        check_config(architecture, config)
    except UnsupportedError as exc:
        raise UnsupportedError(f"{path}: {exc.message}") from None
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
    tokenizer = None
    tokenizer_dir = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer_dir = path
    params = sum(p.numel() for p in model.parameters())
    return ModelHandle(
        name=name or str(path),
        family=FAMILY_CAUSAL_LM,
        architecture=architecture,
        source=path,
        sha256=sha256_files([config_path, *weights]),
        module=model,
        tokenizer=tokenizer,
        tokenizer_dir=tokenizer_dir,
        info={
            "parameters": params,
            "layers": arch.num_layers,
            "hidden_size": int(config.hidden_size),
            "attention_heads": arch.num_heads,
            "kv_heads": arch.num_kv_heads,
            "head_dim": arch.head_dim,
            "vocab_size": int(config.vocab_size),
            "max_position_embeddings": int(config.max_position_embeddings),
            "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}),
            "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
            "architecture": arch.summary(),
        },
    )


def load_pt2(path: Path, trust_pickle: bool) -> ModelHandle:
    if not trust_pickle:
        raise BadInputError(
            f"{path}: reading a torch.export archive runs pickle (torch.export.load), which can execute code; "
            "pass --trust-pickle if you made this file or trust its author"
        )
    import zipfile

    try:
        exported = torch.export.load(str(path))
    except (RuntimeError, ValueError, KeyError, OSError, AssertionError, zipfile.BadZipFile) as exc:
        raise BadInputError(f"{path} is not a readable torch.export .pt2 file ({exc}); save it with torch.export.save") from None
    params = sum(t.numel() for t in exported.state_dict.values())
    specs = [str(s.arg.name) for s in exported.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    return ModelHandle(
        name=str(path),
        family=FAMILY_EXPORTED,
        architecture="ExportedProgram",
        source=path,
        sha256=sha256_files([path]),
        exported=exported,
        info={"parameters": params, "inputs": specs},
    )


def load_onnx(path: Path) -> ModelHandle:
    import onnx

    try:
        # Checking by path lets the checker find external data next to the file.
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path), load_external_data=False)
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError, OSError, ValueError) as exc:
        raise BadInputError(f"{path} is not a valid ONNX model ({str(exc).splitlines()[0]})") from None
    params = sum(int(torch.Size(t.dims).numel()) for t in model.graph.initializer)
    return ModelHandle(
        name=str(path),
        family=FAMILY_ONNX,
        architecture=f"onnx-opset{model.opset_import[0].version if model.opset_import else '?'}",
        source=path,
        sha256=sha256_files([path]),
        onnx_path=path,
        info={"parameters": params, "inputs": [i.name for i in model.graph.input]},
    )


def load_model(spec: str, trust_pickle: bool = False) -> ModelHandle:
    """Resolve MODEL (path or zoo:NAME) into a ModelHandle, or fail with a clear message."""
    if spec.startswith("zoo:"):
        from edgec.zoo import zoo_path

        name = spec.removeprefix("zoo:")
        return load_hf_dir(zoo_path(name), name=spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise BadInputError(
            f"{spec} does not exist; give a Hugging Face model directory, a .pt2 or .onnx file, or zoo:NAME (edgec zoo list)"
        )
    if path.is_dir():
        return load_hf_dir(path)
    if path.suffix == ".pt2":
        return load_pt2(path, trust_pickle)
    if path.suffix == ".onnx":
        return load_onnx(path)
    raise BadInputError(f"{spec}: unknown model format '{path.suffix}'; edgec reads HF directories, .pt2 and .onnx files")
