"""Signed artifacts: `edgec keygen`, `compile --sign`, `edgec sign`, and `--trust KEY.pub`
on `verify` (here) and `deploy` (checked by the agent on the device before anything runs).
The signature covers manifest.json, which lists every file's sha256: an edit that keeps the
manifest self-consistent (its digest recomputed) passes every other check, not this one."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from edgec.artifact import manifest_digest
from edgec.cli import app

runner = CliRunner()


def _linear_onnx(path: Path) -> Path:
    weight = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4) / 16, "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], initializer=[weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _keys(tmp_path: Path, name: str) -> tuple[Path, Path]:
    made = runner.invoke(app, ["keygen", str(tmp_path / name), "--json"])
    assert made.exit_code == 0, made.output
    record = json.loads(made.stdout)
    return Path(record["private_key"]), Path(record["public_key"])


def _compile(tmp_path: Path, target: str, *extra: str) -> Path:
    out = tmp_path / f"linear-{target}"
    built = runner.invoke(app, ["compile", str(_linear_onnx(tmp_path / "linear.onnx")), "--backend", "onnx", "--target", target,
                                "-o", str(out), "--force", *extra])
    assert built.exit_code == 0, built.output
    return out


def _edit_and_reseal(root: Path) -> None:
    """What someone who can write the artifact but not sign it could do."""
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["model"]["name"] = "something-else"
    manifest["digest"] = manifest_digest(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _verify(root: Path, *extra: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["verify", str(root), "--json", *extra])
    return result.exit_code, json.loads(result.stdout)


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_replaces_one(tmp_path: Path) -> None:
    private, public = _keys(tmp_path, "release.key")
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600 and public == tmp_path / "release.key.pub"
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    before = private.read_bytes()
    again = runner.invoke(app, ["keygen", str(private)])
    assert again.exit_code == 2 and "exists" in again.output and "--force" in again.output
    assert private.read_bytes() == before


def test_a_signed_artifact_verifies_with_its_key_and_an_edit_or_another_key_fails_with_exit_4(tmp_path: Path) -> None:
    private, public = _keys(tmp_path, "release.key")
    _, stranger = _keys(tmp_path, "other.key")
    out = _compile(tmp_path, "cpu", "--sign", str(private))
    code, report = _verify(out, "--trust", str(public))
    assert code == 0 and report["checks"][-1]["name"] == "signature" and report["checks"][-1]["ok"] is True, report
    code, report = _verify(out, "--trust", str(stranger))
    assert code == 4 and "not by the trusted key" in report["checks"][-1]["detail"], report
    _edit_and_reseal(out)
    code, report = _verify(out)  # every check but the signature still passes
    assert code == 0, report
    code, report = _verify(out, "--trust", str(public))
    assert code == 4 and "the manifest changed after it was signed" in report["checks"][-1]["detail"], report


def test_edgec_sign_signs_an_unsigned_artifact_and_refuses_a_changed_one(tmp_path: Path) -> None:
    private, public = _keys(tmp_path, "release.key")
    out = _compile(tmp_path, "cpu")
    code, report = _verify(out, "--trust", str(public))
    assert code == 4 and "not signed" in report["checks"][-1]["detail"]
    signed = runner.invoke(app, ["sign", str(out), "--key", str(private)])
    assert signed.exit_code == 0, signed.output
    assert _verify(out, "--trust", str(public))[0] == 0
    (out / "reference.safetensors").write_bytes(b"changed")
    refused = runner.invoke(app, ["sign", str(out), "--key", str(private)])
    assert refused.exit_code == 4 and "does not match its manifest (reference.safetensors)" in refused.output


@pytest.mark.parametrize("key", ["missing", "not-a-key"])
def test_a_bad_signing_key_is_refused_before_any_work(tmp_path: Path, key: str) -> None:
    path = tmp_path / key
    if key == "not-a-key":
        path.write_text("hello\n")
    model = _linear_onnx(tmp_path / "linear.onnx")
    for dry in (["--dry-run"], []):
        result = runner.invoke(app, ["compile", str(model), "--backend", "onnx", "-o", str(tmp_path / "out"), "--sign", str(path), *dry])
        assert result.exit_code == 2 and f"--sign {path}" in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / "out").exists()
    trust = runner.invoke(app, ["verify", str(tmp_path), "--trust", str(path)])
    assert trust.exit_code == 2 and f"--trust {path}" in trust.output


@pytest.mark.arm64
def test_the_device_checks_the_signature_before_anything_runs(tmp_path: Path) -> None:
    private, public = _keys(tmp_path, "release.key")
    out = _compile(tmp_path, "arm64", "--sign", str(private))
    deployed = runner.invoke(app, ["deploy", str(out), "--device", "qemu-arm64", "--trust", str(public), "--json"])
    assert deployed.exit_code == 0, deployed.output
    report = json.loads(deployed.stdout)
    assert report["parity"]["ok"] is True and report["signature"].endswith("checked on the device"), report
    _edit_and_reseal(out)  # passes every check on the host: only the signature tells
    refused = runner.invoke(app, ["deploy", str(out), "--device", "qemu-arm64", "--trust", str(public)])
    assert refused.exit_code == 4, refused.output
    assert "qemu-arm64: the signature does not match manifest.json" in refused.output and "nothing was run" in refused.output


def test_for_a_stock_rpc_server_the_signature_is_checked_here_before_any_upload(tmp_path: Path) -> None:
    """A stock server runs no edgec code: the check happens on this machine, before connecting."""
    _, public = _keys(tmp_path, "release.key")
    out = _compile(tmp_path, "cpu")
    for command in (["deploy", str(out)], ["profile", str(out)]):
        result = runner.invoke(app, [*command, "--device", "rpc://127.0.0.1:9?timeout=5", "--trust", str(public)])
        assert result.exit_code == 4, result.output
        assert "is not signed" in result.output and "nothing was uploaded" in result.output
