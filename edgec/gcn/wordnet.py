"""The WordNet noun graph (Debian `wordnet-base`), offline: a real graph larger than the
classic citation benchmarks.

Nodes are the ~82k noun synsets of `data.noun`; edges are their noun-to-noun semantic
pointers (hypernym / hyponym, instance of, part / member / substance meronym and holonym),
made undirected; features are the TF-IDF of each synset's gloss and lemmas reduced by a
truncated SVD; the label is the lexicographer file (noun.animal, noun.artifact, ...).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from edgec.errors import MissingDependencyError
from edgec.gcn.graph import Graph, split_masks
from edgec.tasks import WORDNET_DIR

# lexnames(5WN): noun files are 03 (noun.Tops) .. 28 (noun.time).
NOUN_FILES: tuple[str, ...] = (
    "Tops", "act", "animal", "artifact", "attribute", "body", "cognition", "communication", "event", "feeling", "food",
    "group", "location", "motive", "object", "person", "phenomenon", "plant", "possession", "process", "quantity",
    "relation", "shape", "state", "substance", "time",
)
FIRST_NOUN_FILE = 3
# wninput(5WN) pointer symbols between noun synsets that carry meaning (not the lexical
# "derived from" or domain links).
SEMANTIC_POINTERS = frozenset({"@", "@i", "~", "~i", "%m", "%s", "%p", "#m", "#s", "#p"})
WORD = re.compile(r"[a-z]{2,}")
VOCABULARY_BUCKETS = 1 << 15


def read_synsets() -> tuple[list[str], list[int], list[str], list[tuple[str, str]]]:
    """(offsets, lexicographer file, gloss + lemma text, (source offset, target offset) pointers)."""
    path = WORDNET_DIR / "data.noun"
    if not path.is_file():
        raise MissingDependencyError(f"WordNet is not installed ({path} missing); `make install` installs the Debian package "
                                     "wordnet-base")
    offsets: list[str] = []
    files: list[int] = []
    texts: list[str] = []
    pointers: list[tuple[str, str]] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(" "):
            continue  # licence header
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        word_count = int(fields[3], 16)
        lemmas = fields[4 : 4 + 2 * word_count : 2]
        at = 4 + 2 * word_count
        pointer_count = int(fields[at])
        for p in range(pointer_count):
            symbol, target, pos = fields[at + 1 + 4 * p : at + 4 + 4 * p]
            if pos == "n" and symbol in SEMANTIC_POINTERS:
                pointers.append((fields[0], target))
        offsets.append(fields[0])
        files.append(int(fields[1]))
        texts.append(" ".join(lemma.replace("_", " ") for lemma in lemmas) + " " + gloss)
    return offsets, files, texts, pointers


def tfidf_svd(texts: list[str], dims: int, seed: int) -> np.ndarray:
    """Hashed TF-IDF (sublinear term frequency, rows L2-normalised) -> truncated SVD ->
    standardised columns; deterministic for a seed."""
    import zlib

    import scipy.sparse as sp
    from scipy.sparse.linalg import svds

    rows: list[int] = []
    cols: list[int] = []
    for row, text in enumerate(texts):
        for word in WORD.findall(text.lower()):
            rows.append(row)
            cols.append(zlib.crc32(word.encode()) % VOCABULARY_BUCKETS)
    counts = sp.csr_matrix((np.ones(len(rows), dtype=np.float64), (rows, cols)), shape=(len(texts), VOCABULARY_BUCKETS))
    counts.sum_duplicates()
    counts.data = 1.0 + np.log(counts.data)
    document_frequency = np.bincount(counts.indices, minlength=VOCABULARY_BUCKETS)
    idf = np.log((1 + len(texts)) / (1 + document_frequency)) + 1.0
    weighted = counts @ sp.diags(idf)
    norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(1)).ravel())
    weighted = sp.diags(1.0 / np.maximum(norms, 1e-12)) @ weighted
    start = np.random.default_rng(seed).standard_normal(min(weighted.shape))
    u, s, _ = svds(weighted, k=dims, v0=start)
    order = np.argsort(-s)
    reduced = u[:, order] * s[order]
    reduced -= reduced.mean(0)
    reduced /= reduced.std(0) + 1e-12
    return reduced.astype(np.float32)


def wordnet_graph(dims: int = 64, seed: int = 0, progress: Callable[[str], None] = lambda _m: None) -> Graph:
    offsets, files, texts, pointers = read_synsets()
    index = {offset: i for i, offset in enumerate(offsets)}
    progress(f"wordnet: {len(offsets):,} noun synsets, {len(pointers):,} semantic pointers")
    pairs = np.array([(index[a], index[b]) for a, b in pointers if b in index and a != b], dtype=np.int64).T
    both = np.concatenate([pairs, pairs[::-1]], axis=1)
    # Unique undirected edges, each listed in both directions, sorted by target then source.
    keys = np.unique(both[1] * len(offsets) + both[0])
    edge_index = np.stack([keys % len(offsets), keys // len(offsets)])
    progress(f"wordnet: features = TF-IDF of glosses and lemmas -> SVD to {dims}")
    features = tfidf_svd(texts, dims, seed)
    labels = np.array(files, dtype=np.int64) - FIRST_NOUN_FILE
    train, val, test = split_masks(len(offsets), seed)
    return Graph(edge_index, features, labels, train, val, test, len(NOUN_FILES), [f"noun.{n}" for n in NOUN_FILES], "wordnet")
