"""Bad input: one line naming the input and the fix, the documented exit code,
no traceback, and no artifact directory left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgec.cli import app

runner = CliRunner()


def run_cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def assert_clean_error(code: int, text: str, expected_code: int, *needles: str) -> None:
    assert code == expected_code, text
    assert "Traceback" not in text
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error:"), text
    for needle in needles:
        assert needle in text, (needle, text)


def nothing_left(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_missing_path(tmp_path: Path) -> None:
    code, text = run_cli("compile", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert_clean_error(code, text, 2, "nope does not exist", "zoo:NAME")
    assert nothing_left(tmp_path) == []


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    code, text = run_cli("compile", str(tmp_path / "model"), "-o", str(tmp_path / "out"))
    assert_clean_error(code, text, 2, "has no config.json")
    assert nothing_left(tmp_path) == ["model"]


def test_truncated_safetensors(tmp_path: Path, tiny_llama_dir: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_llama_dir.iterdir():
        data = item.read_bytes()
        (broken / item.name).write_bytes(data[: len(data) // 2] if item.suffix == ".safetensors" else data)
    code, text = run_cli("compile", str(broken), "-o", str(tmp_path / "out"))
    assert_clean_error(code, text, 2, "model.safetensors is truncated or corrupt")
    assert nothing_left(tmp_path) == ["broken"]


@pytest.mark.parametrize("architecture", ["FalconForCausalLM", "T5ForConditionalGeneration"])
def test_unknown_architecture(tmp_path: Path, architecture: str) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": "x"}))
    code, text = run_cli("compile", str(other), "-o", str(tmp_path / "out"))
    assert_clean_error(code, text, 3, f"architecture '{architecture}' is not supported", "LlamaForCausalLM", "Gemma3ForCausalLM")


def test_checkpoint_whose_tensors_do_not_fit_its_config_names_the_tensor(tmp_path: Path, tiny_llama_dir: Path) -> None:
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(tiny_llama_dir, edited)
    config = json.loads((edited / "config.json").read_text())
    config["intermediate_size"] = 96
    (edited / "config.json").write_text(json.dumps(config))
    code, text = run_cli("compile", str(edited), "-o", str(tmp_path / "out"))
    assert_clean_error(code, text, 2, "tensor model.layers.0.mlp.down_proj.weight in model.safetensors", "has shape [64, 128], the config implies [64, 96]")
    assert nothing_left(tmp_path) == ["edited"]


def test_unknown_target_lists_known_ones(tmp_path: Path, tiny_llama_dir: Path) -> None:
    code, text = run_cli("compile", str(tiny_llama_dir), "--target", "z80", "-o", str(tmp_path / "out"))
    assert_clean_error(code, text, 2, "unknown target 'z80'", "cpu", "arm64")
    assert nothing_left(tmp_path) == []


def test_recipe_unknown_key_and_wrong_type(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("target: cpu\nparity:\n  rtoll: 0.1\n")
    code, text = run_cli("compile", str(tiny_llama_dir), "--recipe", str(recipe), "-o", str(tmp_path / "out"))
    assert_clean_error(code, text, 2, "r.yaml:3: unknown key 'parity.rtoll'")
    recipe.write_text("max_context: lots\n")
    code, text = run_cli("compile", str(tiny_llama_dir), "--recipe", str(recipe), "-o", str(tmp_path / "out"))
    assert_clean_error(code, text, 2, "r.yaml:1: bad value for 'max_context'")
    assert nothing_left(tmp_path) == ["r.yaml"]


def test_existing_output_needs_force(tmp_path: Path, tiny_llama_dir: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, text = run_cli("compile", str(tiny_llama_dir), "-o", str(out))
    assert_clean_error(code, text, 2, "exists and is not empty", "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_force_replaces_only_artifacts_and_never_the_input(tmp_path: Path, tiny_llama_dir: Path) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine")
    code, text = run_cli("compile", str(tiny_llama_dir), "-o", str(out), "--force")
    assert_clean_error(code, text, 2, "not an edgec artifact")
    code, text = run_cli("compile", str(tiny_llama_dir), "-o", str(tiny_llama_dir), "--force")
    assert_clean_error(code, text, 2, "would replace the input model")
    code, text = run_cli("compile", str(tiny_llama_dir), "-o", str(tmp_path / "notes" / "todo.txt" / "x"))
    assert_clean_error(code, text, 2, "cannot write in")
    assert (out / "todo.txt").read_text() == "mine" and (tiny_llama_dir / "config.json").is_file()


def test_weights_that_do_not_fit_the_config(tmp_path: Path, tiny_llama_dir: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["hidden_size"] = 96
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").write_bytes((tiny_llama_dir / "model.safetensors").read_bytes())
    code, text = run_cli("inspect", str(bad))
    assert_clean_error(code, text, 2, "bad")


def test_raw_tvm_target_json(tmp_path: Path, tiny_llama_dir: Path) -> None:
    code, text = run_cli("compile", str(tiny_llama_dir), "--target", '{"kind": "llvm", "mcpu": "znver4"}', "--dry-run", "-o", str(tmp_path / "o"))
    assert code == 0 and "znver4" in text
    code, text = run_cli("compile", str(tiny_llama_dir), "--target", '{"mcpu": "x"}', "-o", str(tmp_path / "o"))
    assert_clean_error(code, text, 2, "JSON object with a 'kind'")


@pytest.mark.parametrize(
    ("args", "expected_code", "needle"),
    [
        # TVM alone accepts any mcpu and silently builds for a generic CPU.
        (["--target", "arm64", "--target-opt", "mcpu=cortx-a76"], 2, "LLVM knows no CPU 'cortx-a76' for aarch64-linux-gnu; did you mean cortex-a76"),
        (["--target", '{"kind": "llvm", "mcpu": "no-such-cpu-x"}'], 2, "LLVM knows no CPU 'no-such-cpu-x'"),
        (["--target", "arm64", "--target-opt", "no-such-field=1"], 2, "Unknown config option 'no-such-field'"),
        (["--target", "arm65"], 2, "unknown target 'arm65'; did you mean 'arm64'?"),
        (["--target", "cpu", "--set", "dtype=float16"], 3, "dtype float16: target cpu with backend tvm computes in float32 only"),
        (["--device", "rpc://127.0.0.1:1?timeout=soon"], 2, "timeout='soon' is not a positive number of seconds"),
    ],
)
def test_dry_run_refuses_what_compile_would_refuse(tmp_path: Path, tiny_llama_dir: Path, args: list[str], expected_code: int, needle: str) -> None:
    for dry in (["--dry-run"], []):  # the same message, whether dry or not, before any model is loaded
        code, text = run_cli("compile", str(tiny_llama_dir), *args, *dry, "-o", str(tmp_path / "o"))
        assert_clean_error(code, text, expected_code, needle)
        assert "load " not in text
    assert nothing_left(tmp_path) == []


def test_dry_run_prints_the_resolved_plan_and_writes_nothing(tmp_path: Path, tiny_llama_dir: Path) -> None:
    code, text = run_cli("compile", str(tiny_llama_dir), "--dry-run", "--set", "passes=quantize-weights-int8", "-o", str(tmp_path / "o"))
    assert code == 0 and "name: quantize-weights-int8" in text and "group_size: 0" in text and "rtol: 0.001" in text
    result = runner.invoke(app, ["compile", str(tiny_llama_dir), "--dry-run", "--json", "--target", "arm64", "--target-opt", "mcpu=cortex-a76",
                                 "-o", str(tmp_path / "o")])
    plan = json.loads(result.stdout)
    assert plan["output"] == str(tmp_path / "o") and plan["target"] == "arm64" and "mcpu=cortex-a76" in plan["target_resolved"]
    assert plan["recipe"]["target_options"] == {"mcpu": "cortex-a76"} and plan["passes"] == []
    code, text = run_cli("compile", str(tmp_path / "missing-model"), "--dry-run")
    assert_clean_error(code, text, 2, "missing-model does not exist")
    assert nothing_left(tmp_path) == []


@pytest.mark.compile
def test_ctrl_c_during_compile_leaves_nothing(tmp_path: Path, tiny_llama_dir: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "edgec.cli", "compile", str(tiny_llama_dir), "-o", str(out)],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stderr is not None
    seen = ""
    deadline = time.time() + 300
    while "tvm: import prefill" not in seen and time.time() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen += line
    staged = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=300)
    assert staged, "the compile was interrupted while writing its staging directory"
    assert process.returncode == 130, seen + rest
    assert "interrupted" in rest and "Traceback" not in rest
    assert nothing_left(tmp_path) == []


def test_a_deleted_tokenizer_file_is_named_not_a_traceback(tmp_path: Path) -> None:
    import shutil

    import edgec.zoo

    model = tmp_path / "model"
    shutil.copytree(Path(edgec.zoo.__file__).parent / "tiny-lm", model)
    (model / "tokenizer.json").unlink()
    code, text = run_cli("compile", str(model), "--backend", "onnx", "-o", str(tmp_path / "out"))
    assert_clean_error(code, text, 2, f"{model}: its tokenizer cannot be loaded", "found special_tokens_map.json, tokenizer_config.json",
                       "restore the files save_pretrained wrote")
    assert nothing_left(tmp_path) == ["model"]


def test_a_missing_onnxruntime_exits_5_before_any_work(tmp_path: Path, tiny_llama_dir: Path) -> None:
    blocked = (
        "import sys; sys.modules['onnxruntime'] = None; from edgec.cli import app; "
        f"sys.argv = ['edgec', 'compile', {str(tiny_llama_dir)!r}, '--backend', 'onnx', '-o', {str(tmp_path / 'out')!r}]; app()"
    )
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=300)
    assert_clean_error(result.returncode, result.stderr, 5, "onnxruntime is not installed", "pip install 'onnxruntime==")
    assert "load" not in result.stderr  # refused before the model was loaded
    assert nothing_left(tmp_path) == []


def test_an_onnx_operator_tvm_cannot_lower_is_unsupported_and_names_it(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Det", ["x"], ["y"])], "det",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "det.onnx")
    code, text = run_cli("compile", str(tmp_path / "det.onnx"), "--backend", "tvm", "-o", str(tmp_path / "out"))
    assert_clean_error(code, text, 3, "TVM's ONNX importer has no lowering for Det", "--backend onnx runs it")
    assert nothing_left(tmp_path) == ["det.onnx"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB file system of its own (tmpfs; `make test` runs as root, as sshd's tests need)."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_disk_too_small_for_the_weights_is_refused_before_work(small_disk: Path, tiny_llama_dir: Path) -> None:
    (small_disk / "filler").write_bytes(b"\0" * (2 * 1024 * 1024 - 128 * 1024))  # 128 KiB left, the weights are 331 kB
    code, text = run_cli("compile", str(tiny_llama_dir), "--backend", "onnx", "-o", str(small_disk / "out"))
    assert_clean_error(code, text, 2, "the artifact needs at least 0.3 MB and its disk has 0.1 MB free")
    assert "load" not in text and nothing_left(small_disk) == ["filler"]


def test_a_disk_that_fills_during_the_write_gives_one_line_and_leaves_nothing(small_disk: Path, tiny_llama_dir: Path) -> None:
    weights = (tiny_llama_dir / "model.safetensors").stat().st_size
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(b"\0" * (free - weights - 48 * 1024))  # passes the estimate; the artifact is larger
    code, text = run_cli("compile", str(tiny_llama_dir), "--backend", "onnx", "-o", str(small_disk / "out"))
    assert_clean_error(code, text, 2, "no space left on the disk", "nothing half-written was left")
    assert nothing_left(small_disk) == ["filler"]


@pytest.mark.parametrize("content", [None, "{not json", '{"entry": "decode"}'])
def test_an_unusable_compare_file_is_refused_before_the_artifact_or_device_is_touched(tmp_path: Path, content: str | None) -> None:
    baseline = tmp_path / "before.json"
    if content is not None:
        baseline.write_text(content)
    code, text = run_cli("profile", str(tmp_path / "no-artifact"), "--device", "qemu-arm64", "--compare", str(baseline))
    assert_clean_error(code, text, 2, f"--compare {baseline}", "edgec profile --out")
    assert "no-artifact" not in text.replace(str(baseline), "")
