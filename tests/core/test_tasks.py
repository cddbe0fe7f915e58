"""The labelled tasks ACT's head search scores on: real data, a user's .jsonl file, disjoint splits, paper scoring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgec.data import HELD_OUT, corpus_documents, split_of
from edgec.errors import BadInputError
from edgec.tasks import Example, build_task, label_token_ids, score, shakespeare_items, wordnet_items


def test_wordnet_nouns_are_common_and_unambiguous() -> None:
    items = dict(wordnet_items())
    labels = ("animal", "plant", "food", "artifact")
    assert labels[items["sparrow"]] == "animal" and labels[items["oak"]] == "plant"
    assert labels[items["bread"]] == "food" and labels[items["hammer"]] == "artifact"
    assert "chicken" not in items  # an animal and a food: senses disagree


@pytest.mark.parametrize("name", ["wordnet", "shakespeare"])
def test_splits_are_balanced_disjoint_and_the_test_split_ignores_calibration_size(name: str) -> None:
    task = build_task(name, seed=3, calibration_size=24, test_size=60)
    assert len(task.test) == 60 and len(task.calibration) == 24
    assert np.bincount([e.label for e in task.test]).tolist() == [60 // len(task.labels)] * len(task.labels)
    assert not {e.prompt for e in task.calibration} & {e.prompt for e in task.test}
    assert build_task(name, seed=3, calibration_size=60, test_size=60).test == task.test
    assert build_task(name, seed=4, calibration_size=24, test_size=60).test != task.test


def test_shakespeare_test_lines_come_from_plays_tiny_lm_never_saw() -> None:
    held_out_text = "\n".join(text for doc_id, text in corpus_documents() if split_of(doc_id) == HELD_OUT)
    task = build_task("shakespeare", seed=0, calibration_size=12, test_size=30)
    for example in task.test:
        passage = example.prompt.rsplit('Line: "', 1)[1].split('"\n', 1)[0]
        first_line = min(passage[:20], passage.split(", ")[0], key=len)  # inside the first verse line
        assert first_line in held_out_text
    assert len(shakespeare_items()[HELD_OUT]) > 1000


def test_scoring_is_argmax_over_label_logits() -> None:
    examples = [Example("a", 0), Example("b", 1), Example("c", 1)]
    result = score(np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0]]), examples)
    assert result.predictions == (0, 1, 0) and result.accuracy == pytest.approx(2 / 3)


def test_labels_sharing_a_first_token_and_oversized_splits_are_refused() -> None:
    class OneToken:
        def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
            return {"input_ids": [7, len(text)]}

    with pytest.raises(BadInputError, match="start with the same token"):
        label_token_ids(OneToken(), ["comedy", "tragedy"])
    with pytest.raises(BadInputError, match="wordnet test: .* labelled 'animal' and 100 per label were asked"):
        build_task("wordnet", seed=0, calibration_size=8, test_size=400)
    with pytest.raises(BadInputError, match="unknown task 'trivia'"):
        build_task("trivia", seed=0, calibration_size=8, test_size=8)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def test_a_users_jsonl_file_is_a_task_split_by_seed(tmp_path: Path) -> None:
    rows = [{"text": f"{word} {i}", "label": label} for label, word in (("spam", "win"), ("ham", "meet")) for i in range(12)]
    path = write_jsonl(tmp_path / "mail.jsonl", rows)
    task = build_task(str(path), 0, 4, 8)
    assert task.labels == ("ham", "spam") and len(task.test) == 8 and len(task.calibration) == 4
    assert task.test[0].prompt.endswith("\nLabel:") and "Label: spam\n\n" in task.test[0].prompt
    texts = lambda examples: {e.prompt.rsplit("Text: ", 1)[1] for e in examples}  # noqa: E731
    assert not texts(task.test) & texts(task.calibration)
    assert build_task(str(path), 0, 4, 8).test == task.test and build_task(str(path), 1, 4, 8).test != task.test


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "a", "label": "x"}\nnot json\n', r"bad.jsonl:2: not a JSON object"),
        ('{"text": "a"}\n', r'bad.jsonl:1: expected \{"text"'),
        ('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', "1 distinct label"),
    ],
)
def test_a_bad_task_file_is_refused_naming_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(BadInputError, match=message):
        build_task(str(path), 0, 2, 2)
