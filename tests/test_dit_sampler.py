"""The numpy sampler that artifacts run (edgec.targets.runtime) against diffusers' own
schedulers, on a small random DiT: timesteps, each update rule, and whole samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel

from edgec.families.dit import Denoiser, program_scheduler, torch_sample
from edgec.targets.runtime import Sampler, sample_noise, sampler_timesteps

SCHEDULE = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
            "prediction_type": "epsilon", "clip_sample": True}


@pytest.fixture(scope="module")
def denoiser() -> Denoiser:
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2, num_layers=2,
                                        sample_size=8, patch_size=2, num_embeds_ada_norm=3)
    with torch.no_grad():  # adaLN-zero starts at zero output: give the blocks something to do
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return Denoiser(transformer.eval()).eval()


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 20, 50])
def test_timesteps_are_spaced_as_diffusers_spaces_them(kind: str, spacing: str, steps: int) -> None:
    config = {**SCHEDULE, "timestep_spacing": spacing}
    scheduler = (DDIMScheduler if kind == "ddim" else DDPMScheduler).from_config(config)
    scheduler.set_timesteps(steps)
    ours = sampler_timesteps(program_scheduler(config, kind), steps)
    assert [t for t, _ in ours] == [int(t) for t in scheduler.timesteps]
    if kind == "ddpm":
        assert [p for _, p in ours] == [int(scheduler.previous_timestep(t)) for t in scheduler.timesteps]
    else:
        assert all(p == t - 1000 // steps for t, p in ours)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_a_whole_guided_sample_matches_diffusers(denoiser: Denoiser, kind: str, prediction: str) -> None:
    config = {**SCHEDULE, "prediction_type": prediction}
    program = {"scheduler": program_scheduler(config, kind), "null_class": 3, "sample_shape": [1, 8, 8],
               "regions": [{"entry": "denoise", "t_from": 0, "t_to": 1000}]}
    start, draws = sample_noise(program, seed=4, steps=12)
    assert (draws is not None) == (kind == "ddpm")

    def run(entry: str, args: list[np.ndarray]) -> list[np.ndarray]:
        assert entry == "denoise"
        with torch.no_grad():
            return [denoiser(*(torch.from_numpy(a) for a in args)).numpy()]

    ours = Sampler(program).sample(run, 1, start, 12, 2.5, draws)
    theirs = torch_sample(denoiser, (DDIMScheduler if kind == "ddim" else DDPMScheduler).from_config(config), 1, 3, start, 12, 2.5, draws)
    assert ours.shape == (1, 1, 8, 8) and np.abs(ours - start).max() > 0.5  # the loop moved the sample
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=0)
    # Guidance matters, and so does the class: a different answer, not a copy of the same one.
    assert np.abs(Sampler(program).sample(run, 1, start, 12, 1.0, draws) - ours).max() > 1e-3
    assert np.abs(Sampler(program).sample(run, 2, start, 12, 2.5, draws) - ours).max() > 1e-3


def test_each_step_runs_the_entry_of_its_timestep_region() -> None:
    program = {"scheduler": program_scheduler(SCHEDULE, "ddim"), "null_class": 3, "sample_shape": [1, 8, 8],
               "regions": [{"entry": "r0", "t_from": 0, "t_to": 250}, {"entry": "r1", "t_from": 250, "t_to": 500},
                           {"entry": "r2", "t_from": 500, "t_to": 1000}]}
    sampler = Sampler(program)
    called: list[tuple[str, int]] = []

    def run(entry: str, args: list[np.ndarray]) -> list[np.ndarray]:
        called.append((entry, int(args[1][0])))
        return [np.zeros_like(args[0])]

    start, _ = sample_noise(program, 0, 20)
    sampler.sample(run, 0, start, 20, 1.0)
    assert [t for _, t in called] == list(range(950, -1, -50))
    assert all(entry == ("r0" if t < 250 else "r1" if t < 500 else "r2") for entry, t in called)
    assert [e for e, _ in called].count("r2") == 10 and [e for e, _ in called].count("r0") == 5
