"""Shared fixtures: a tiny BERT built from a config (with the bundled tokenizer) and small data files."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

TINY_LABELS = ("negative", "positive")
POSITIVE = ["good", "great", "lovely", "happy", "excellent", "nice", "wonderful", "superb"]
NEGATIVE = ["bad", "awful", "sad", "terrible", "horrible", "nasty", "poor", "dreadful"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT with hidden size 32, saved like a pretrained model (random weights)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from fedtune.client.model import load_tokenizer

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = load_tokenizer("minilm")
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def sentiment_rows(n: int, secret: str = "") -> list[tuple[str, str]]:
    """`n` short, learnable rows; `secret` is embedded in each text to detect leaks."""
    rows = []
    for i in range(n):
        label = "positive" if i % 2 else "negative"
        word = (POSITIVE if i % 2 else NEGATIVE)[i % 8]
        rows.append((f"{word} {secret}{i}" if secret else f"so {word} indeed", label))
    return rows


def write_sentiment_csv(path: Path, n: int, secret: str = "", offset: int = 0) -> Path:
    """A text,label CSV of `sentiment_rows` number `offset` to `offset + n`."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("text", "label"))
        w.writerows(sentiment_rows(n + offset, secret)[offset:])
    return path


@pytest.fixture
def write_csv(tmp_path: Path):
    def _write(rows: list[tuple[str, str]], name: str = "data.csv", header=("text", "label")) -> Path:
        path = tmp_path / name
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t" if name.endswith(".tsv") else ",")
            w.writerow(header)
            w.writerows(rows)
        return path

    return _write
