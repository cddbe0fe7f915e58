"""ONNX Runtime's own weight quantizers as benchmark peers, applied to each entry of an
edgec dense ONNX artifact, so their rows run the very graphs edgec's ONNX row runs.

    .venv/bin/python benchmarks/ort_quantized.py ARTIFACT {int8,nbits4} OUT

- int8: `quantize_dynamic` (int8 weights per tensor, activations quantized per call:
  DynamicQuantizeMatMul / MatMulInteger).
- nbits4: `MatMulNBitsQuantizer` (4-bit weights in blocks of 32 with uint8 zero points,
  llama.cpp Q4_1's granularity; `accuracy_level=4`: int8 compute in its CPU kernel).

Both quantize MatMuls whose weight is an initializer; edgec's exporter reads a Linear's
weight through a Transpose, so each entry first goes through `quant_pre_process` (ORT's
own graph optimisation, which folds it), as ORT's documentation prescribes.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

KINDS = ("int8", "nbits4")
BLOCK = 32


def _quantize_entry(source: Path, target: Path, kind: str) -> None:
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.getLogger().setLevel(logging.WARNING)  # the quantizers log every node at INFO
    folded = target.with_suffix(".folded.onnx")
    quant_pre_process(str(source), str(folded), skip_symbolic_shape=True, save_as_external_data=True,
                      all_tensors_to_one_file=True, external_data_location=folded.name + ".data")
    if kind == "int8":
        quantize_dynamic(folded, target, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    else:
        config = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=False, accuracy_level=4)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(folded)), algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=False)
    folded.unlink()
    folded.with_name(folded.name + ".data").unlink()


def quantized_artifact(dense: Path, kind: str, out: Path) -> tuple[Path, dict[str, Any]]:
    """The model directory of `dense`'s entries quantized by ORT (made once under `out`),
    and a backend record for edgec's Runtime that points at its files."""
    from edgec.artifact import read_manifest

    if kind not in KINDS:
        raise SystemExit(f"unknown ORT quantizer {kind!r}; use one of {', '.join(KINDS)}")
    record = read_manifest(dense)["backend_record"]
    entries = {name: {**info, "file": f"{name}.onnx"} for name, info in record["entries"].items()}
    quantized = {**record, "entries": entries, "weights_file": None}
    if all((out / info["file"]).is_file() for info in entries.values()):
        return out, quantized
    staging = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent if out.parent.is_dir() else None))
    try:
        for name, info in record["entries"].items():
            _quantize_entry(dense / "model" / info["file"], staging / entries[name]["file"], kind)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out, quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="an edgec ONNX artifact (dense fp32)")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    path, _ = quantized_artifact(args.artifact, args.kind, args.out)
    for file in sorted(path.iterdir()):
        print(f"{file}  {file.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
