"""A generate program's appended cache: each call returns only the positions it added, the
runner keeps them in a buffer reserved for the whole context, and every decode call sees
exactly the positions so far, in that buffer (numpy for ONNX Runtime, a TVM tensor for
the Relax VM), with no step copying the cache."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tvm

from edgec.targets.runtime import Generation, as_numpy

PROGRAM = {
    "kind": "generate",
    "entries": {"prefill": {"inputs": ["input_ids"], "outputs": ["logits", "new_k", "sums"]},
                "decode": {"inputs": ["input_ids", "past_k", "past_s"], "outputs": ["logits", "new_k", "sums"]}},
    "prefill": "prefill", "decode": "decode", "token_input": "input_ids", "logits": "logits",
    "cache": [{"input": "past_k", "output": "new_k", "tokens_axis": 0, "append": True},
              {"input": "past_s", "output": "sums", "tokens_axis": 0}],
    "max_context": 16,
}


class Recorder:
    """k at position p is [p, p + 0.5] for each of 3 heads; the sums are fed back whole.
    Outputs are numpy arrays, or TVM tensors (`tensors`) as `Runtime.run(native=True)` gives."""

    def __init__(self, tensors: bool) -> None:
        self.tensors = tensors
        self.pasts: list[Any] = []

    def _out(self, value: np.ndarray) -> Any:
        return tvm.runtime.tensor(value) if self.tensors else value

    def run(self, entry: str, args: list[Any]) -> list[Any]:
        ids = np.asarray(args[0])
        start = 0
        sums = np.zeros(1, dtype=np.float32)
        if entry == "decode":
            self.pasts.append(args[1])
            start = int(args[1].shape[0])
            sums = as_numpy(args[2]) + 1
        positions = np.arange(start, start + ids.shape[1], dtype=np.float32)
        new_k = np.stack([positions, positions + 0.5], axis=-1)[:, None, :].repeat(3, axis=1)
        logits = np.zeros((1, ids.shape[1], 4), dtype=np.float32)
        logits[..., start % 4] = 1.0
        return [logits, self._out(np.ascontiguousarray(new_k)), self._out(sums)]


def _expected(positions: int) -> np.ndarray:
    p = np.arange(positions, dtype=np.float32)
    return np.stack([p, p + 0.5], axis=-1)[:, None, :].repeat(3, axis=1)


@pytest.mark.parametrize("tensors", [False, True], ids=["numpy", "tvm"])
def test_each_decode_sees_every_position_so_far_in_one_reserved_buffer(tensors: bool) -> None:
    generation = Generation(PROGRAM)
    recorder = Recorder(tensors)
    tokens = generation.greedy(recorder.run, [1, 2, 3], 10)
    assert len(tokens) == 10 and len(recorder.pasts) == 10
    for step, past in enumerate(recorder.pasts):
        np.testing.assert_array_equal(as_numpy(past), _expected(3 + step))
    cache = generation.appended["past_k"]
    # One buffer, reserved for max_context at the first append; the later pasts are its prefixes.
    assert int(cache.buffer.shape[0]) == PROGRAM["max_context"] and cache.length == 12  # the last step's position is never fed back
    # The first decode reads the prefill's own output (a single step after a prefill reserves
    # nothing); every later one a prefix of the buffer, where it lies.
    if tensors:
        assert all(isinstance(p, tvm.runtime.Tensor) for p in recorder.pasts)
        assert recorder.pasts[0].data_ptr() != cache.buffer.data_ptr()
        assert {p.data_ptr() for p in recorder.pasts[1:]} == {cache.buffer.data_ptr()}
    else:
        assert not np.shares_memory(recorder.pasts[0], cache.buffer)
        assert all(np.shares_memory(p, cache.buffer) and p.base is cache.buffer for p in recorder.pasts[1:])


def test_a_new_prefill_starts_the_cache_over() -> None:
    generation = Generation(PROGRAM)
    recorder = Recorder(False)
    generation.greedy(recorder.run, [1, 2, 3, 4, 5], 4)
    recorder.pasts.clear()
    generation.greedy(recorder.run, [7], 3)
    assert [int(p.shape[0]) for p in recorder.pasts] == [1, 2, 3]
    np.testing.assert_array_equal(recorder.pasts[-1], _expected(3))


def test_an_appended_cache_must_grow_along_its_first_axis() -> None:
    program = {**PROGRAM, "cache": [{**PROGRAM["cache"][0], "tokens_axis": 2}, PROGRAM["cache"][1]]}
    with pytest.raises(ValueError, match="first axis"):
        Generation(program)


def test_a_cache_past_its_capacity_grows_and_keeps_every_position() -> None:
    generation = Generation({**PROGRAM, "max_context": 4})
    recorder = Recorder(False)
    outputs = recorder.run("prefill", [np.asarray([[1, 2, 3]])])
    args = generation.decode_args(np.asarray([[4]]), outputs, "prefill")
    for _ in range(3):
        outputs = recorder.run("decode", args)
        args = generation.decode_args(np.asarray([[4]]), outputs, "decode")
    cache = generation.appended["past_k"]
    assert cache.length == 6 and int(cache.buffer.shape[0]) == 10  # 4 reserved, then twice the 5 needed
    np.testing.assert_array_equal(args[1], _expected(6))
