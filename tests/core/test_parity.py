"""The parity rule itself (edgec.targets.runtime, shared by host, agent and RPC): it passes
equal outputs and fails real differences, non-finite values, decisive argmax flips and
greedy generations that part from the reference where the reference was not near a tie."""

from typing import Any

import numpy as np

from edgec.targets.runtime import check_parity, compare_output

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(1, 4, 50)).astype(np.float32) * 5


def test_noise_passes_and_a_shift_fails_naming_the_values() -> None:
    assert compare_output("prefill", "logits", LOGITS, LOGITS + 1e-5, 1e-3, True)["ok"] is True
    shifted = compare_output("prefill", "logits", LOGITS, LOGITS + 0.5, 1e-3, True)
    assert shifted["ok"] is False and shifted["max_abs_diff"] > shifted["tolerance"]
    assert "max |diff| 0.5 > tolerance" in shifted["why"] and "artifact" in shifted["why"]


def test_a_decisive_argmax_flip_within_the_bound_fails() -> None:
    """Top-2 margin between tolerance and twice it: a flip needs no value to move more than
    the tolerance, so only the argmax rule catches it."""
    want = np.zeros((1, 1, 8), dtype=np.float32)
    want[0, 0, 3], want[0, 0, 5] = 1.0, 0.985  # range 1, tolerance 0.01, margin 0.015
    got = want.copy()
    got[0, 0, 3], got[0, 0, 5] = 0.992, 0.993
    result = compare_output("decode", "logits", want, got, 1e-2, True)
    assert result["ok"] is False and result["argmax_mismatches"] == 1 and "argmax 5" in result["why"]
    # The same values in an output that is not logits pass the bound.
    assert compare_output("decode", "hidden", want, got, 1e-2, False)["ok"] is True


def test_an_int8_cache_may_round_one_level_either_way_and_indices_may_not_move() -> None:
    levels = RNG.integers(-127, 128, size=(5, 2, 1, 3, 16)).astype(np.int8)
    edge = levels.copy()
    edge[0, 0, 0, 0, 0] += 1 if edge[0, 0, 0, 0, 0] < 127 else -1
    assert compare_output("decode", "present_k", levels, edge, 1e-3, False)["ok"] is True
    two = levels.copy()
    two[0, 0, 0, 0, 0] += 2 if two[0, 0, 0, 0, 0] < 126 else -2
    assert compare_output("decode", "present_k", levels, two, 1e-3, False)["ok"] is False
    indices = np.arange(40, dtype=np.int64)
    moved = indices.copy()
    moved[7] += 1
    assert compare_output("forward", "kept", indices, moved, 1e-3, False)["ok"] is False


def test_non_finite_values_fail_and_a_shape_mismatch_fails() -> None:
    cache = RNG.normal(size=(2, 1, 2, 5, 4)).astype(np.float32)
    planted = cache.copy()
    planted[1, 0, 1, 4, 2] = np.nan
    result = compare_output("decode", "present_k", cache, planted, 1e-3, False)
    assert result["ok"] is False and "non-finite values in the artifact's" in result["why"] and "[1, 0, 1, 4, 2]" in result["why"]
    # A broken reference is no pass either.
    assert "in the reference's" in compare_output("decode", "present_k", planted, cache, 1e-3, False)["why"]
    assert compare_output("prefill", "logits", LOGITS, LOGITS[:, :3], 1e-3, True)["ok"] is False


class Counter:
    """A toy 'LM' in numpy: the next token is last + 1, decisively; with `flip_after` the
    artifact prefers last + 2 after that token (it parts from the reference there)."""

    def __init__(self, vocab: int = 16, flip_after: int | None = None) -> None:
        self.vocab, self.flip_after = vocab, flip_after

    def logits(self, last: int) -> np.ndarray:
        row = np.zeros(self.vocab, dtype=np.float32)
        row[(last + 1) % self.vocab] = 10.0
        if last == self.flip_after:
            row[(last + 2) % self.vocab] = 10.5
        return row

    def run(self, entry: str, inputs: list[Any]) -> list[np.ndarray]:
        ids = inputs[0]
        past = inputs[1] if entry == "decode" else np.zeros((0,), dtype=np.float32)
        rows = [self.logits(int(t)) for t in ids[0]]
        return [np.stack(rows)[None], np.concatenate([past, ids[0].astype(np.float32)])]


PROGRAM = {
    "kind": "generate",
    "entries": {"prefill": {"inputs": ["input_ids"], "outputs": ["logits", "present"]},
                "decode": {"inputs": ["input_ids", "past"], "outputs": ["logits", "present"]}},
    "prefill": "prefill", "decode": "decode", "token_input": "input_ids", "logits": "logits",
    "cache": [{"input": "past", "output": "present", "tokens_axis": 0}], "max_context": 64,
}


def reference_of(model: Counter, margins: list[float] | None = None) -> dict[str, np.ndarray]:
    prompt = np.asarray([[1, 2, 3, 4]], dtype=np.int64)
    prefill = model.run("prefill", [prompt[:, :-1]])
    decode_in = [prompt[:, -1:], prefill[1]]
    tokens = [(4 + 1 + i) % 16 for i in range(8)]
    return {
        "prefill.in.0": prompt[:, :-1], "prefill.out.0": prefill[0], "prefill.out.1": prefill[1],
        "decode.in.0": decode_in[0], "decode.in.1": decode_in[1],
        "decode.out.0": model.run("decode", decode_in)[0], "decode.out.1": model.run("decode", decode_in)[1],
        "generate.prompt.0": prompt, "generate.tokens.0": np.asarray(tokens),
        "generate.margins.0": np.asarray(margins or [10.0] * 8), "generate.logits_range.0": np.asarray([10.0]),
    }


def test_generation_must_match_the_reference_tokens() -> None:
    ok = check_parity(Counter(), PROGRAM, reference_of(Counter()), 1e-3)
    assert ok["ok"] is True and ok["generation"]["matched"] == 8
    # After token 7 the artifact says 9 where the reference says 8: step 3 of the generation.
    parted = check_parity(Counter(flip_after=7), PROGRAM, reference_of(Counter()), 1e-3)
    assert parted["ok"] is False and parted["reason"].startswith("greedy generation: step 3: token")
    assert "> tolerance" in parted["reason"]
    # Where the reference itself was at a near tie, parting is no failure.
    near_tie = [10.0, 10.0, 10.0, 1e-4, 10.0, 10.0, 10.0, 10.0]
    tied = check_parity(Counter(flip_after=7), PROGRAM, reference_of(Counter(), near_tie), 1e-3)
    assert tied["ok"] is True and tied["generation"]["near_tie_at"] == 3


def test_a_near_constant_output_is_held_to_the_absolute_floor_not_to_its_range() -> None:
    """A fully saturated output varies by 1e-9: rtol x range alone would make float noise a failure."""
    want = (0.5 + 1e-9 * RNG.normal(size=(2, 8))).astype(np.float64)
    got = want + 3e-7
    assert compare_output("main", "probs", want, got, 1e-3, False)["ok"] is False
    floored = compare_output("main", "probs", want, got, 1e-3, False, atol=1e-5)
    assert floored["ok"] is True and floored["tolerance"] == 1e-5
    # The floor is a floor: a real error above it still fails, and prints `>`.
    broken = compare_output("main", "probs", want, want + 1e-3, 1e-3, False, atol=1e-5)
    assert broken["ok"] is False and "> tolerance 1e-05" in broken["why"]


class Raising:
    def run(self, entry: str, inputs: list[Any]) -> list[np.ndarray]:
        raise ValueError("Mismatched lv3.ndim on argument #1 when calling:\n  `fused_less_add_where(...)`,\n  expected 0")


def test_an_entry_the_runtime_cannot_run_is_a_failed_check_naming_it() -> None:
    program = {"kind": "forward", "entries": {"main": {"inputs": ["x"], "outputs": ["y"]}}}
    reference = {"main.in.0": np.zeros((1, 4), np.float32), "main.out.0": np.zeros((1, 4), np.float32),
                 "main@2.in.0": np.zeros((3, 4), np.float32), "main@2.out.0": np.zeros((3, 4), np.float32)}
    report = check_parity(Raising(), program, reference, 1e-3, 1e-5)
    assert report["ok"] is False and [o["entry"] for o in report["outputs"]] == ["main", "main@2"]
    assert report["reason"].startswith("main.*: the runtime failed on inputs x [1, 4]: ValueError: Mismatched lv3.ndim")
    assert "expected 0" in report["reason"] and "\n" not in report["reason"]
