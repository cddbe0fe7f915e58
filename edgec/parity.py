"""Reference inputs/outputs and the parity check of an artifact against torch.

Tolerance: for every output, max |artifact - torch| <= rtol x (range of the
torch output); for logits also the same argmax wherever torch's top-2 margin
exceeds that tolerance (a near tie may flip without the model being wrong).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from edgec.model import FAMILY_CAUSAL_LM, ModelHandle
from edgec.targets.export import ExportedEntry

REFERENCE_TEXT = (
    "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
    "def main() -> None: print('hello, world')"
)


def reference_prompt(model: ModelHandle, length: int) -> np.ndarray:
    """A fixed prompt of `length` tokens (the tokenizer's, else fixed pseudo-random ids)."""
    if model.tokenizer is not None:
        ids = list(model.tokenizer(REFERENCE_TEXT)["input_ids"])
        while len(ids) < length:
            ids = ids + ids
        return np.asarray([ids[:length]], dtype=np.int64)
    vocab = int(model.module.config.vocab_size) if model.module is not None else 100
    generator = np.random.default_rng(0)
    return generator.integers(0, vocab, size=(1, length), dtype=np.int64)


def reference_io(model: ModelHandle, entries: list[ExportedEntry], prompt_len: int) -> dict[str, list[np.ndarray]]:
    """Run torch on the reference inputs; returns {"<entry>.in": [...], "<entry>.out": [...]}."""
    io: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        if model.family == FAMILY_CAUSAL_LM:
            by_name = {e.name: e for e in entries}
            prompt = torch.from_numpy(reference_prompt(model, prompt_len))
            prefill_out = by_name["prefill"].module(prompt[:, :-1])
            io["prefill.in"] = [prompt[:, :-1].numpy()]
            io["prefill.out"] = [t.numpy() for t in prefill_out]
            decode_in = (prompt[:, -1:], *prefill_out[1:])
            io["decode.in"] = [t.numpy() for t in decode_in]
            io["decode.out"] = [t.numpy() for t in by_name["decode"].module(*decode_in)]
        else:
            for entry in entries:
                if entry.onnx_model is not None:
                    io[f"{entry.name}.in"] = [t.numpy() for t in entry.example]
                    io[f"{entry.name}.out"] = _run_onnx_reference(entry)
                    continue
                assert entry.module is not None
                outputs = entry.module(*entry.example)
                if isinstance(outputs, torch.Tensor):
                    outputs = (outputs,)
                io[f"{entry.name}.in"] = [t.numpy() for t in entry.example]
                io[f"{entry.name}.out"] = [t.detach().numpy() for t in outputs]
    return io


def _run_onnx_reference(entry: ExportedEntry) -> list[np.ndarray]:
    """For an .onnx input the reference is the ONNX specification's own evaluator
    (onnx.reference), independent of both backends, so ORT is never checked against itself."""
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(entry.onnx_model)
    feed = {name: t.numpy() for name, t in zip(entry.input_names, entry.example)}
    return [np.asarray(x) for x in evaluator.run(entry.output_names, feed)]


def flatten_io(io: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    return {f"{key}.{i}": value for key, values in io.items() for i, value in enumerate(values)}


def unflatten_io(tensors: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    grouped: dict[str, dict[int, np.ndarray]] = {}
    for name, value in tensors.items():
        key, index = name.rsplit(".", 1)
        grouped.setdefault(key, {})[int(index)] = value
    return {key: [values[i] for i in sorted(values)] for key, values in grouped.items()}


@dataclass
class OutputParity:
    entry: str
    output: str
    max_abs_diff: float
    tolerance: float
    argmax_mismatches: int = 0


@dataclass
class ParityResult:
    ok: bool | None
    max_abs_diff: float | None
    tolerance: float | None
    rtol: float
    reason: str = ""
    outputs: list[OutputParity] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def compare(
    reference: dict[str, list[np.ndarray]],
    actual: dict[str, list[np.ndarray]],
    output_names: dict[str, list[str]],
    rtol: float,
) -> ParityResult:
    results: list[OutputParity] = []
    for entry, names in output_names.items():
        for index, name in enumerate(names):
            want = reference[f"{entry}.out"][index].astype(np.float64)
            got = actual[f"{entry}.out"][index].astype(np.float64)
            if want.shape != got.shape:
                results.append(OutputParity(entry, name, float("inf"), 0.0))
                continue
            tolerance = rtol * float(want.max() - want.min()) if want.size else 0.0
            diff = float(np.abs(want - got).max()) if want.size else 0.0
            mismatches = 0
            if name == "logits" and want.size:
                top2 = np.sort(want, axis=-1)[..., -2:]
                decisive = (top2[..., 1] - top2[..., 0]) > tolerance
                mismatches = int(((want.argmax(-1) != got.argmax(-1)) & decisive).sum())
            results.append(OutputParity(entry, name, diff, tolerance, mismatches))
    failing = [r for r in results if r.max_abs_diff > r.tolerance or r.argmax_mismatches]
    # The summary names the worst failing output, else the worst logits.
    pool = failing or [r for r in results if r.output == "logits"] or results
    worst = max(pool, key=lambda r: r.max_abs_diff / r.tolerance if r.tolerance else float("inf"))
    reason = ""
    if failing:
        shape = " (shape differs)" if worst.max_abs_diff == float("inf") else ""
        reason = f"{worst.entry}.{worst.output}{shape}"
    return ParityResult(not failing, worst.max_abs_diff, worst.tolerance, rtol, reason, results)


def run_reference(runtime: Any, reference: dict[str, list[np.ndarray]], entries: list[str]) -> dict[str, list[np.ndarray]]:
    return {f"{entry}.out": runtime.run(entry, reference[f"{entry}.in"]) for entry in entries}
