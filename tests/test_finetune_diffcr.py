"""DiffCR on a small random DiT saved as a diffusers directory: the tuning moves the ratios
toward the target and resumes from its checkpoint to the same result; the tuned model
compiles to one region graph per timestep region whose TopK capacities are the table's,
sharing one copy of the weights, and its report draws the ratios and the kept tokens;
uniform MoD from the same routers and trained at a fixed ratio; bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel
from typer.testing import CliRunner

from edgec.cli import app
from edgec.finetune import finetune
from edgec.mod import capacity
from edgec.recipe import load_recipe
from safetensors.torch import load_file

runner = CliRunner()
TOKENS = 16  # 8x8 images, patch 2


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dit")
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=3,
                                        sample_size=8, patch_size=2, num_embeds_ada_norm=3)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    transformer.save_pretrained(root / "transformer")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
                                                       "scheduler": ["diffusers", "DDPMScheduler"]}))
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", images=rng.uniform(-1, 1, (64, 1, 8, 8)).astype(np.float32), labels=rng.integers(0, 3, 64))
    return root


def _recipe(model: Path, *extra: str):
    return load_recipe(None, [f"finetune.data={model / 'data.npz'}", "finetune.steps=4", "finetune.batch=4", "finetune.checkpoint_every=2",
                              "finetune.options.ratio=0.5", "finetune.options.regions=2", "finetune.options.ratio_lr=0.1", *extra])


@pytest.fixture(scope="module")
def tuned(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tuned") / "dit-diffcr"
    finetune(str(model), "diffcr", _recipe(model), out, resume=False, force=False, progress=lambda _m: None)
    return out


def test_tuning_moves_the_ratios_and_resumes_to_the_same_result(model: Path, tuned: Path, tmp_path: Path) -> None:
    table = json.loads((tuned / "diffcr.json").read_text())
    assert table["regions"] == [[0, 500], [500, 1000]] and len(table["learned"]) == 3
    learned = np.asarray(table["learned"])
    assert learned.mean() < 0.8  # pulled toward 0.5 from "keep all" (every ratio starts at 1)
    assert np.allclose(table["bins"], np.clip(np.round(learned * 10) / 10, 0.1, 1.0))
    record = json.loads((tuned / "finetune.json").read_text())
    assert record["method"] == "diffcr" and record["steps"] == 4 and record["mean_ratio"] == pytest.approx(learned.mean())

    def stop_at_step_three(message: str) -> None:
        if "3/4" in message:
            raise KeyboardInterrupt

    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        finetune(str(model), "diffcr", _recipe(model), out, resume=False, force=False, progress=stop_at_step_three)
    assert not out.exists() and (tmp_path / "stopped.checkpoint" / "progress.json").is_file()
    seen: list[str] = []
    finetune(str(model), "diffcr", _recipe(model), out, resume=True, force=False, progress=seen.append)
    assert any("resume from" in m and "step 2 of 4" in m for m in seen), seen
    np.testing.assert_allclose(json.loads((out / "diffcr.json").read_text())["learned"], table["learned"], atol=1e-6)


def test_uniform_mod_trains_the_routers_at_a_fixed_ratio(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "uniform"
    finetune(str(model), "diffcr", _recipe(model, "finetune.options.learn_ratios=false"), out, resume=False, force=False,
             progress=lambda _m: None)
    table = json.loads((out / "diffcr.json").read_text())
    assert table["learn_ratios"] is False and np.asarray(table["learned"]).tolist() == [[0.5, 0.5]] * 3
    routers = load_file(str(out / "diffcr.safetensors"))
    assert all(w.abs().sum() > 0 for w in routers.values())  # trained away from their zero start


def _topk_capacities(path: Path) -> list[int]:
    """The k of every TopK in the graph, as ONNX shape inference reads it from the graph (a
    k that is not a constant would come out unknown and fail the comparison)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False), data_prop=True)
    shapes = {v.name: v.type.tensor_type.shape.dim for v in [*model.graph.value_info, *model.graph.output]}
    return [shapes[n.output[1]][1].dim_value if shapes[n.output[1]][1].HasField("dim_value") else -1
            for n in model.graph.node if n.op_type == "TopK"]


@pytest.mark.compile
def test_region_graphs_have_the_tables_capacities_and_share_the_weights(tuned: Path, tmp_path: Path) -> None:
    table = json.loads((tuned / "diffcr.json").read_text())
    out = tmp_path / "art"
    result = runner.invoke(app, ["compile", str(tuned), "--recipe", "recipes/diffcr.yaml", "--backend", "onnx", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(result.stdout)["parity"]["ok"] is True
    manifest = json.loads((out / "manifest.json").read_text())
    mod = manifest["dit"]["mod"]
    want = [[capacity(table["bins"][layer][r], TOKENS) for layer in range(3)] for r in range(2)]
    assert mod["policy"] == "learned" and mod["capacities"] == want
    regions = manifest["program"]["regions"]
    assert [(r["t_from"], r["t_to"]) for r in regions] == [(0, 500), (500, 1000)]
    for region, row in zip(regions, want):
        # A routed block: TopK k of the scores, then TopK k again to sort the kept indices back to
        # spatial order (ONNX sorts with TopK); a block keeping every token has neither.
        assert _topk_capacities(out / "model" / f"{region['entry']}.onnx") == [k for k in row if k < TOKENS for _ in (1, 2)]
    # The report's keep maps: every block keeps exactly its capacity at each region's mid step.
    report = runner.invoke(app, ["report", str(out), "-o", str(tmp_path / "report"), "--json"])
    assert report.exit_code == 0, report.output
    assert {"mod_ratios.png", "keep_maps.png", "report.html"} <= set(json.loads(report.stdout)["files"])
    for sample in manifest["dit"]["keep_maps"]:
        kept = [[int(np.unpackbits(np.frombuffer(bytes.fromhex(bits), dtype=np.uint8)).sum()) for bits in region]
                for region in sample["kept"]]
        assert kept == want and np.asarray(sample["image"]).shape == (8, 8)
    weights = (out / "model" / manifest["backend_record"]["weights_file"]).stat().st_size
    parameters = sum(p.numel() for p in DiTTransformer2DModel.from_pretrained(tuned / "transformer").parameters()) * 4
    assert weights < 1.2 * parameters  # one copy, not one per region graph

    uniform = tmp_path / "uniform"
    result = runner.invoke(app, ["compile", str(tuned), "--recipe", "recipes/diffcr.yaml", "--set", "mod.policy=uniform",
                                 "--set", "mod.ratio=0.25", "--backend", "onnx", "-o", str(uniform), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    manifest = json.loads((uniform / "manifest.json").read_text())
    assert manifest["dit"]["mod"]["capacities"] == [[4, 4, 4]] and len(manifest["program"]["regions"]) == 1
    assert _topk_capacities(uniform / "model" / "denoise_r0.onnx") == [4] * 6


@pytest.mark.compile
def test_region_graphs_compile_for_cuda(tuned: Path, tmp_path: Path) -> None:
    """TVM's CUDA code generation takes the routed graphs (TopK, gather, scatter); they run
    where a GPU is lent, and here the build alone is checked."""
    out = tmp_path / "cuda"
    result = runner.invoke(app, ["compile", str(tuned), "--recipe", "recipes/diffcr.yaml", "--target", "cuda", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(result.stdout)["parity"]["reason"].startswith("built for cuda")
    manifest = json.loads((out / "manifest.json").read_text())
    mod = manifest["dit"]["mod"]
    assert manifest["target"]["name"] == "cuda" and len(mod["entries"]) == 2
    for entry, capacities in zip(mod["entries"], mod["capacities"]):
        library = (out / "model" / f"{entry}.so").read_bytes()
        assert b"__global__" in library  # CUDA C kernels, compiled by NVRTC where the library loads
        assert (b"topk_kernel" in library) == (min(capacities) < TOKENS), (entry, capacities)


def test_bad_diffcr_input_is_refused_before_any_work(model: Path, tmp_path: Path) -> None:
    data = f"finetune.data={model / 'data.npz'}"
    cases = [
        (["finetune", str(model), "--method", "diffcr", "--ratio", "1.5", "-o", str(tmp_path / "a")], 2, "finetune.options.ratio"),
        (["finetune", str(model), "--method", "diffcr", "--set", data, "--set", "finetune.options.regions=8", "--set",
          "sampler.steps=5", "-o", str(tmp_path / "b")], 2, "regions 8 is more than the sampler's 5 steps"),
        (["finetune", "zoo:tiny-lm", "--method", "diffcr", "-o", str(tmp_path / "c")], 2, "tunes a diffusion transformer"),
        (["finetune", str(model), "--method", "edge-llm", "--ratio", "0.5", "-o", str(tmp_path / "d")], 2, "--ratio is a diffcr option"),
        (["compile", str(model), "--recipe", "recipes/diffcr.yaml", "-o", str(tmp_path / "e")], 2, "needs the routers of a model tuned"),
        (["compile", str(model), "--set", "mod.ratio=0.5", "-o", str(tmp_path / "f")], 2, "mod.ratio applies to mod.policy uniform"),
        (["compile", str(model), "--set", "mod.policy=uniform", "--set", "mod.ratio=0", "-o", str(tmp_path / "g")], 2, "mod.ratio"),
        (["compile", "zoo:tiny-lm", "--set", "mod.policy=learned", "-o", str(tmp_path / "h")], 2,
         "recipe `mod:` is read by diffusion transformers (family dit); a causal-lm model does not read it"),
        (["compile", "zoo:tiny-lm", "--set", "sampler.steps=4", "-o", str(tmp_path / "i")], 2, "recipe `sampler:` is read by"),
    ]
    for args, code, words in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == code and words in result.output and "Traceback" not in result.output, (args, result.output)
    assert not any(p.name in "abcdefghi" for p in tmp_path.iterdir())
