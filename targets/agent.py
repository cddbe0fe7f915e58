"""edgec device agent: runs ON the device, next to an uploaded artifact.

Standard library + numpy + the TVM runtime or ONNX Runtime only: it must not
import edgec, torch or the TVM compiler, because devices have none of them.
edgec uploads this file with the artifact and calls it:

    python3 agent.py check  ARTIFACT_DIR      # machine, runtime versions, sha256 of every file
    python3 agent.py parity ARTIFACT_DIR      # run the reference inputs, compare with the torch outputs

Each command prints one JSON object on stdout.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The safetensors layout: u64 header length, JSON header, raw little-endian data."""
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        array = np.frombuffer(data[base + start : base + end], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
        tensors[name] = array.reshape(info["shape"]).copy()
    return tensors


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        import tvm

        versions["tvm"] = tvm.__version__
    except ImportError:
        versions["tvm"] = "missing"
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        versions["onnxruntime"] = "missing"
    return versions


def check(root: Path) -> dict[str, Any]:
    manifest = json.loads((root / "manifest.json").read_text())
    mismatched = []
    for name, expected in manifest["files"].items():
        path = root / name
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        if digest != expected:
            mismatched.append(name)
    return {"machine": platform.machine(), "versions": _versions(), "hashes_ok": not mismatched, "mismatched": mismatched}


class _Runtime:
    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        record = manifest["backend_record"]
        model_dir = root / "model"
        self.backend = manifest["backend"]
        if self.backend == "tvm":
            import tvm
            from tvm.runtime.vm import VirtualMachine

            self._tvm = tvm
            device = tvm.cpu()
            stored = read_safetensors(model_dir / record["params_file"])
            self.vms = {}
            self.params = {}
            for name, info in record["entries"].items():
                library = tvm.runtime.load_module(str(model_dir / info["library"]))
                self.vms[name] = VirtualMachine(library, device)
                self.params[name] = [tvm.runtime.tensor(stored[key], device) for key in info["params"]]
            self.device = device
        else:
            import onnxruntime as ort

            # Under qemu-user (-L ROOTFS) ORT resolves external data to the host path and
            # then rejects it as outside the model's directory; the emulator passes the
            # host-side root so the model is opened by that same path. Real devices: unset.
            host_root = os.environ.get("EDGEC_QEMU_HOST_ROOT")
            if host_root:
                model_dir = Path(host_root + str(model_dir.resolve()))
            self.sessions = {
                name: ort.InferenceSession(str(model_dir / info["file"]), providers=["CPUExecutionProvider"])
                for name, info in record["entries"].items()
            }

    def run(self, entry: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if self.backend == "tvm":
            tvm = self._tvm
            args = [tvm.runtime.tensor(np.ascontiguousarray(x), self.device) for x in inputs]
            result = self.vms[entry]["main"](*args, *self.params[entry])
            if isinstance(result, tvm.runtime.Tensor):
                return [result.numpy()]
            return [item.numpy() for item in result]
        session = self.sessions[entry]
        feed = {i.name: x for i, x in zip(session.get_inputs(), inputs)}
        return list(session.run(None, feed))


def parity(root: Path) -> dict[str, Any]:
    """Same rule as edgec.parity: max |got - want| <= rtol x range(want) for every output."""
    manifest = json.loads((root / "manifest.json").read_text())
    reference = read_safetensors(root / manifest["reference"]["file"])
    rtol = float(manifest["reference"]["tolerance"]["rtol"])
    runtime = _Runtime(root, manifest)
    outputs = []
    for entry, info in manifest["reference"]["entries"].items():
        inputs = [reference[f"{entry}.in.{i}"] for i in range(len(info["inputs"]))]
        got = runtime.run(entry, inputs)
        for index, name in enumerate(info["outputs"]):
            want = reference[f"{entry}.out.{index}"].astype(np.float64)
            have = got[index].astype(np.float64)
            tolerance = rtol * float(want.max() - want.min()) if want.size else 0.0
            diff = float(np.abs(want - have).max()) if want.shape == have.shape and want.size else float("inf")
            outputs.append({"entry": entry, "output": name, "max_abs_diff": diff, "tolerance": tolerance})
    ok = all(o["max_abs_diff"] <= o["tolerance"] for o in outputs)
    worst = max(outputs, key=lambda o: o["max_abs_diff"] / o["tolerance"] if o["tolerance"] else float("inf"))
    return {"ok": ok, "max_abs_diff": worst["max_abs_diff"], "tolerance": worst["tolerance"], "rtol": rtol, "outputs": outputs}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("check", "parity"):
        print(json.dumps({"error": "usage: agent.py check|parity ARTIFACT_DIR"}))
        return 2
    root = Path(argv[2])
    result = check(root) if argv[1] == "check" else parity(root)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
