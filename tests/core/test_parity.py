"""The parity rule itself: it passes equal outputs and fails real differences."""

import numpy as np

from edgec.parity import compare


def outputs(logits: np.ndarray) -> dict[str, list[np.ndarray]]:
    return {"prefill.out": [logits]}


def test_parity_accepts_noise_and_rejects_a_shift_or_a_flipped_argmax() -> None:
    # A decisive flip (margin > tolerance) always also breaks the absolute bound; both are reported.
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(1, 4, 50)).astype(np.float32) * 5
    names = {"prefill": ["logits"]}
    ok = compare(outputs(reference), outputs(reference + 1e-5), names, rtol=1e-3)
    assert ok.ok is True and ok.max_abs_diff < ok.tolerance
    shifted = compare(outputs(reference), outputs(reference + 0.5), names, rtol=1e-3)
    assert shifted.ok is False and shifted.max_abs_diff > shifted.tolerance
    flipped = reference.copy()
    top = flipped[0, 0].argmax()
    flipped[0, 0, top] -= 100.0
    result = compare(outputs(reference), outputs(flipped), names, rtol=1e-3)
    assert result.ok is False and result.outputs[0].argmax_mismatches == 1


def test_parity_fails_on_a_shape_mismatch() -> None:
    reference = np.zeros((1, 4, 8), dtype=np.float32)
    result = compare(outputs(reference), outputs(reference[:, :3]), {"prefill": ["logits"]}, rtol=1e-3)
    assert result.ok is False
