"""Shared fixtures: a tiny BERT built from a config (with the bundled tokenizer) and small data files."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

TINY_LABELS = ("negative", "positive")
POSITIVE = ["good", "great", "lovely", "happy", "excellent", "nice", "wonderful", "superb"]
NEGATIVE = ["bad", "awful", "sad", "terrible", "horrible", "nasty", "poor", "dreadful"]


def save_bert(out: Path, hidden: int) -> Path:
    """A 2-layer BERT classifier with random weights and the bundled tokenizer, saved like a pretrained model."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from fedtune.client.model import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT with hidden size 32, saved like a pretrained model (random weights)."""
    return save_bert(tmp_path_factory.mktemp("tiny-bert"), 32)


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


# A tiny chat template, so that instruction rows render as they do for a chat model (SmolLM2's has the same shape).
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with hidden size 32 (random weights), saved like a pretrained causal LM, with the bundled
    WordPiece tokenizer and a chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedtune.client.model_source import resolve_model

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    tokenizer.eos_token = "[SEP]"
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # as a causal LM's tokenizer: no token type ids
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.cls_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_instructions(path: Path, n: int, secret: str = "") -> Path:
    """`n` prompt/response rows (JSONL, columns q and a) a small model learns quickly."""
    import json

    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            a, b = i % 7, (i * 3) % 5
            f.write(json.dumps({"q": f"what is {a} plus {b} {secret}", "a": f"{a} plus {b} is {a + b}"}) + "\n")
    return path
