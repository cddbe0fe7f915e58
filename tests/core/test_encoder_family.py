"""The encoder family in torch: pooling and normalisation as the sentence-transformers
config says, equal to the Hugging Face encoder's own states pooled by hand; bad pooling
configs refused naming the file; the similarity and retrieval scorers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgec.errors import BadInputError, UnsupportedError
from edgec.families.encoder import read_pairs, retrieval_set, spearman
from edgec.model import load_model

BERT = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


def save_encoder(path: Path, architecture: str = "BertModel", pooling: dict | None = None, normalize: bool = False) -> Path:
    import transformers

    config = getattr(transformers, architecture.replace("Model", "Config"))(**BERT, **({"pad_token_id": 1} if "Roberta" in architecture else {}))
    torch.manual_seed(0)
    getattr(transformers, architecture)(config).save_pretrained(path, safe_serialization=True)
    if pooling is not None:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (path / "modules.json").write_text(json.dumps(modules))
        (path / "1_Pooling").mkdir()
        (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    return path


@pytest.mark.parametrize(
    ("pooling", "normalize"),
    [({"pooling_mode_mean_tokens": True}, True), ({"pooling_mode_cls_token": True}, False), ({"pooling_mode_max_tokens": True}, False), (None, False)],
)
@pytest.mark.parametrize("architecture", ["BertModel", "RobertaModel"])
def test_embedding_pools_as_configured(tmp_path: Path, architecture: str, pooling: dict | None, normalize: bool) -> None:
    handle = load_model(str(save_encoder(tmp_path / "enc", architecture, pooling, normalize)))
    assert handle.family == "encoder" and handle.architecture == architecture
    ids = torch.randint(5, 120, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.int64)
    mask[1, 5:] = 0
    with torch.no_grad():
        states = handle.module.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        got = handle.module(ids, mask)
    mode = next(iter(pooling)) if pooling else "pooling_mode_mean_tokens"
    rows = []
    for row in range(2):
        real = states[row, : int(mask[row].sum())]
        rows.append({"pooling_mode_mean_tokens": real.mean(0), "pooling_mode_cls_token": real[0], "pooling_mode_max_tokens": real.max(0).values}[mode])
    want = torch.stack(rows)
    if normalize:
        want = want / want.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert handle.info["pooling"] == {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}[mode]


def test_unsupported_pooling_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = save_encoder(tmp_path / "enc", pooling={"pooling_mode_weightedmean_tokens": True})
    with pytest.raises(UnsupportedError, match=r"1_Pooling/config.json: pooling pooling_mode_weightedmean_tokens is not supported"):
        load_model(str(path))


def test_similarity_pairs_and_retrieval_set(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("sentence1\tsentence2\tscore\na\tb\t1.0\nc\td\t3.5\ne\tf\t2\n")
    first, second, gold = read_pairs(pairs)
    assert first == ["a", "c", "e"] and gold == [1.0, 3.5, 2.0]
    pairs.write_text("a\tb\t1.0\nc\td\n")
    with pytest.raises(BadInputError, match="pairs.tsv:2: expected sentence1<TAB>sentence2<TAB>score"):
        read_pairs(pairs)
    assert spearman(np.array([0.1, 0.9, 0.5]), np.array([1.0, 3.0, 2.0])) == pytest.approx(1.0)
    queries, documents = retrieval_set(0, 50)
    assert len(queries) == len(documents) == 50 and all(", " in q for q in queries)
    assert retrieval_set(0, 50) == (queries, documents) and retrieval_set(1, 50)[0] != queries
