"""edgec deploy to the emulated ARM64 device: an aarch64 artifact of zoo:tiny-lm passes
parity inside the aarch64 user space (TVM runtime and ONNX Runtime there), and bad
deployments are refused with the documented exit codes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec.cli import app
from edgec.targets.device_qemu import QemuDevice
from tests.conftest import dense_perplexity, edge_llm_tuned
from tests.targets.test_compile_int8_activations import RECIPE as INT8_RECIPE

pytestmark = pytest.mark.arm64
runner = CliRunner()


@pytest.fixture(scope="module")
def arm64_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arm64")
    built = {}
    for backend in ("tvm", "onnx"):
        out = root / f"tiny-lm-arm64-{backend}"
        result = runner.invoke(app, ["compile", "zoo:tiny-lm", "--target", "arm64", "--backend", backend, "-o", str(out), "--json"])
        assert result.exit_code == 0, result.output + result.stderr
        summary = json.loads(result.stdout)
        assert summary["parity"]["ok"] is None and "device" in summary["parity"]["reason"]
        built[backend] = out
    return built


def test_tvm_artifact_is_an_aarch64_elf(arm64_artifacts: dict[str, Path]) -> None:
    for entry in ("prefill", "decode"):
        header = (arm64_artifacts["tvm"] / "model" / f"{entry}.so").read_bytes()[:20]
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64


def kernel_listings(library: Path) -> dict[str, str]:
    """Function name -> its aarch64 disassembly, for the kernels of a TVM library."""
    listing = subprocess.run(
        ["aarch64-linux-gnu-objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True
    ).stdout
    functions = re.findall(r"^[0-9a-f]+ <([^>]+)>:\n(.*?)(?=\n\n|\Z)", listing, flags=re.M | re.S)
    return dict(functions)


def test_arm64_matmul_kernels_are_neon_vector_code(arm64_artifacts: dict[str, Path]) -> None:
    """Every matmul kernel of the arm64 build, and decode's attention kernel, multiplies on
    NEON vectors of 4 floats (fmla vN.4s), not one float at a time (fmadd sN)."""
    for entry, matmuls in (("prefill", 7), ("decode", 5)):
        listings = kernel_listings(arm64_artifacts["tvm"] / "model" / f"{entry}.so")
        kernels = {name: body for name, body in listings.items()
                   if ("matmul" in name or "decode_attention" in name) and "compute_" in name}
        assert len([name for name in kernels if "matmul" in name]) >= matmuls, sorted(kernels)
        # Decode's attention over the cache is one kernel (targets/tvm_attention), prefill's is matmuls.
        assert ("decode_attention_compute_" in kernels) == (entry == "decode"), sorted(kernels)
        scalar = [name for name, body in kernels.items() if not re.search(r"\bfmla\s+v\d+\.4s", body)]
        assert not scalar, scalar


def test_rpi5_int8_activations_use_sdot_and_pass_parity_on_the_emulated_device(tmp_path: Path) -> None:
    """rpi5 has the dot product (Cortex-A76): the linears run on the sdot kernel
    (targets/tvm_dot.py) and the artifact keeps parity inside the aarch64 user space."""
    recipe = tmp_path / "w4.yaml"
    recipe.write_text(INT8_RECIPE)
    out = tmp_path / "rpi5-int8"
    result = runner.invoke(app, ["compile", "zoo:tiny-lm", "--recipe", str(recipe), "--target", "rpi5",
                                 "--set", "schedule.activations=int8", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    record = json.loads((out / "manifest.json").read_text())["backend_record"]["activations"]
    # 6 of 7 linears x 6 layers + lm_head, on 3 kernels a layer (q/k/v and gate/up fused) + lm_head.
    assert record["isa"] == "neon-dotprod" and record["dot_linears"]["decode"] == 37 and record["dot_kernels"]["decode"] == 19
    kernels = {name: body for name, body in kernel_listings(out / "model" / "decode.so").items()
               if "qlinear_dot" in name and "compute_" in name}
    assert len(kernels) >= 4 and all(re.search(r"\bsdot\s+v\d+\.4s, v\d+\.16b, v\d+\.16b", body) for body in kernels.values())
    result = runner.invoke(app, ["deploy", str(out), "--device", "qemu-arm64", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    parity = json.loads(result.stdout)["parity"]
    assert parity["ok"] is True and 0 < parity["max_abs_diff"] <= parity["tolerance"]


@pytest.mark.parametrize("backend", ["tvm", "onnx"])
def test_deploy_passes_parity_on_the_emulated_device(arm64_artifacts: dict[str, Path], backend: str) -> None:
    result = runner.invoke(app, ["deploy", str(arm64_artifacts[backend]), "--device", "qemu-arm64", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    assert report["machine"] == "aarch64" and report["emulated"] is True and report["hashes_ok"] is True
    assert report["parity"]["ok"] is True and report["parity"]["max_abs_diff"] <= report["parity"]["tolerance"]
    assert {o["entry"] for o in report["parity"]["outputs"]} == {"prefill", "decode"}
    runtime = "tvm" if backend == "tvm" else "onnxruntime"
    assert report["versions"][runtime] not in ("", "missing")


def test_host_artifact_is_refused_before_upload(tmp_path: Path, tiny_llama_dir: Path) -> None:
    out = tmp_path / "host"
    assert runner.invoke(app, ["compile", str(tiny_llama_dir), "--backend", "onnx", "-o", str(out)]).exit_code == 0
    result = runner.invoke(app, ["deploy", str(out), "--device", "qemu-arm64"])
    assert result.exit_code == 3 and "built for cpu (x86_64) but qemu-arm64 is aarch64" in result.output


def test_unknown_device_and_damaged_artifact(arm64_artifacts: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["deploy", str(arm64_artifacts["onnx"]), "--device", "toaster"])
    assert result.exit_code == 2 and "known forms: qemu-arm64, ssh://" in result.output
    copy = tmp_path / "copy"
    shutil.copytree(arm64_artifacts["onnx"], copy)
    (copy / "model" / "weights.bin").write_bytes(b"0" * 16)
    result = runner.invoke(app, ["deploy", str(copy), "--device", "qemu-arm64"])
    assert result.exit_code == 4 and "nothing uploaded" in result.output


def test_corrupted_upload_runs_nothing(arm64_artifacts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    real_upload = QemuDevice.upload

    def corrupting_upload(self: QemuDevice, root: Path, name: str, timeout_s: float) -> str:
        device_dir = real_upload(self, root, name, timeout_s)
        weights = self.host_path(device_dir) / "model" / "weights.bin"
        data = bytearray(weights.read_bytes())
        data[100] ^= 0xFF  # one flipped byte on the way to the device
        weights.write_bytes(bytes(data))
        return device_dir

    monkeypatch.setattr(QemuDevice, "upload", corrupting_upload)
    result = runner.invoke(app, ["deploy", str(arm64_artifacts["onnx"]), "--device", "qemu-arm64"])
    assert result.exit_code == 4 and "corrupted upload (model/weights.bin differ on the device); nothing was run" in result.output


@pytest.mark.parametrize("backend", ["tvm", "onnx"])
def test_profile_on_the_emulated_device(arm64_artifacts: dict[str, Path], backend: str, tmp_path: Path) -> None:
    chart = tmp_path / "ops.png"
    args = ["profile", str(arm64_artifacts[backend]), "--device", "qemu-arm64", "--runs", "3", "--warmup", "1",
            "--prompt-len", "16", "--new-tokens", "4", "--plot", str(chart), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    assert report["emulated"] is True and "not ARM performance" in report["note"]
    latency = report["latency"]
    assert latency["runs"] == 3 and 0 < latency["p50_ms"] <= latency["p90_ms"] <= latency["p99_ms"]
    assert report["decode"]["runs"] == 4 and report["decode_tokens_per_s"] > 0 and report["prompt_tokens"] == 16
    assert report["load_ms"] > 0 and report["peak_rss_bytes"] > report["size_bytes"] > 0
    kernels = report["per_op_ms"]
    expected = "matmul" if backend == "tvm" else "MatMul"
    assert any(expected in name for name in kernels) and all(ms >= 0 for ms in kernels.values())
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = tmp_path / "old.json"
    saved.write_text(result.stdout)
    again = runner.invoke(app, [*args[:-3], "--compare", str(saved)])
    assert again.exit_code == 0 and "latency p50_ms (new/old)" in again.output


def test_profile_refuses_zero_runs(arm64_artifacts: dict[str, Path]) -> None:
    result = runner.invoke(app, ["profile", str(arm64_artifacts["tvm"]), "--device", "qemu-arm64", "--runs", "0"])
    assert result.exit_code == 2 and "--runs 0" in result.output


def _child_running(parent: int, needle: bytes) -> int | None:
    """The pid of a child of `parent` whose command line holds `needle`: only a process
    this test started is ever killed (never one of another test or user)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and needle in (stat.parent / "cmdline").read_bytes():
                return int(stat.parent.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


def test_a_device_dying_mid_profile_leaves_partial_results_marked_incomplete(arm64_artifacts: dict[str, Path], tmp_path: Path) -> None:
    """The emulator is killed while it profiles (as a board losing power would be): exit 6,
    and what the device measured before that is saved, marked incomplete."""
    import signal
    import subprocess
    import sys
    import time

    saved = tmp_path / "partial.json"
    edgec = Path(sys.executable).parent / "edgec"
    profile = subprocess.Popen(
        [str(edgec), "profile", str(arm64_artifacts["tvm"]), "--device", "qemu-arm64", "--runs", "100000", "--out", str(saved)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 300
        agent_pid = None
        while agent_pid is None and time.monotonic() < deadline and profile.poll() is None:
            agent_pid = _child_running(profile.pid, b"agent.py\x00profile")
            time.sleep(0.5)
        assert agent_pid is not None, "the agent never started profiling"
        assert profile.stdout is not None
        seen = ""
        while "loaded in" not in seen and time.monotonic() < deadline:  # past the load, into the timed runs
            line = profile.stdout.readline()
            if not line:
                break
            seen += line
        assert "loaded in" in seen, seen
        time.sleep(2)
        subprocess.run(["kill", "-KILL", str(agent_pid)], check=False)
        output, _ = profile.communicate(timeout=120)
    finally:
        if profile.poll() is None:
            profile.send_signal(signal.SIGKILL)
    assert profile.returncode == 6, output
    assert "stopped during `profile`" in output and "marked incomplete" in output and "Traceback" not in output
    partial = json.loads(saved.read_text())
    assert partial["complete"] is False and partial["load_ms"] > 0 and "latency" not in partial
    assert partial["device"] == "qemu-arm64" and partial["emulated"] is True


def test_luc_artifact_lowers_for_arm64_and_passes_parity_on_the_device(tmp_path: Path) -> None:
    recipe = tmp_path / "luc.yaml"
    # Groups of 32: the MLP's 688 inputs end in a ragged group of 16.
    recipe.write_text(
        "calibration: {samples: 6, seq_len: 64}\nevaluate: {tokens: 256}\npasses:\n"
        "  - name: luc\n    options: {bits: 4, sparsity: 0.3, bit_choices: [4], group_size: 32, probe_samples: 2, validation_samples: 2}\n"
        "  - name: schedule\n    options: {trials: 2}\n"
    )
    out = tmp_path / "luc-arm64"
    args = ["compile", "zoo:tiny-lm", "--target", "arm64", "--recipe", str(recipe), "-o", str(out), "--json", "--device", "qemu-arm64"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + result.stderr
    summary = json.loads(result.stdout)
    # Verified and measured on the device before the artifact was written.
    assert summary["parity"]["ok"] is True and "qemu-arm64 (emulated)" in summary["parity"]["reason"]
    evaluation = summary["evaluation"]
    assert evaluation["device"] == "qemu-arm64" and evaluation["tokens"] == 256
    dense = dense_perplexity(256, evaluation["window"])
    assert dense < evaluation["perplexity"] < 2 * dense, (evaluation, dense)
    assert summary["passes"][0]["record"]["layers"] and summary["size_bytes"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["evaluation"] == evaluation and manifest["parity"]["ok"] is True
    # Never timed on the emulated device: its timings are not ARM performance.
    assert all(not t["tuned"] and "emulated" in t["reason"] for t in manifest["backend_record"]["tuning"].values())
    # The same artifact scored again on the device by `eval` gives the same perplexity.
    evaluated = runner.invoke(app, ["eval", str(out), "--device", "qemu-arm64", "--tokens", "256", "--window", "256", "--json"])
    assert evaluated.exit_code == 0, evaluated.output + evaluated.stderr
    again = json.loads(evaluated.stdout)
    assert again["parity"]["ok"] is True and abs(again["perplexity"] - evaluation["perplexity"]) < 1e-6 * evaluation["perplexity"]


def test_act_artifact_passes_parity_and_profiles_on_the_device(planted_sink_llama_dir: Path, tmp_path: Path) -> None:
    """Calibrated attention with the carried column sums runs in the aarch64 TVM runtime
    (the ONNX graph is the one ORT runs on the host, tested in test_compile_act)."""
    out = tmp_path / "act-arm64"
    result = runner.invoke(app, ["compile", str(planted_sink_llama_dir), "--target", "arm64",
                                 "--recipe", "recipes/act.yaml", "--set", "act.heads={0: [0, 1, 2, 3]}", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    deployed = runner.invoke(app, ["deploy", str(out), "--device", "qemu-arm64", "--json"])
    assert deployed.exit_code == 0, deployed.output + deployed.stderr
    report = json.loads(deployed.stdout)
    assert report["machine"] == "aarch64" and report["parity"]["ok"] is True
    outputs = {(o["entry"], o["output"]) for o in report["parity"]["outputs"]}
    assert ("prefill", "present_s") in outputs and ("decode", "present_s") in outputs
    assert report["parity"]["generation"]["ok"] is True and report["parity"]["generation"]["matched"] > 0
    # Profiling drives decode from the program's cache list: four tensors fed back, not (k, v).
    profiled = runner.invoke(app, ["profile", str(out), "--device", "qemu-arm64", "--runs", "2", "--new-tokens", "4", "--json"])
    assert profiled.exit_code == 0, profiled.output + profiled.stderr
    result = json.loads(profiled.stdout)
    assert result["decode"]["runs"] == 4 and result["decode_tokens_per_s"] > 0


def test_voting_artifact_passes_parity_on_the_device(tmp_path: Path) -> None:
    tuned = edge_llm_tuned(tmp_path, stride=2)
    out = tmp_path / "voting-arm64"
    args = ["compile", str(tuned), "--target", "arm64", "-o", str(out), "--json", "--device", "qemu-arm64"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + result.stderr
    summary = json.loads(result.stdout)
    assert summary["parity"]["ok"] is True and "qemu-arm64 (emulated)" in summary["parity"]["reason"]
    assert summary["parity"]["generation"]["matched"] == summary["parity"]["generation"]["steps"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["lm"]["voting"]["exits"] == [1, 3, 5]
    assert manifest["program"]["entries"]["decode"]["outputs"][-1] == "exit_logits"
