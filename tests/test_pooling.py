"""What the head reads: mean pooling as sentence-transformers checkpoints were trained, and its export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_LABELS


def _as_sentence_transformer(tiny_model_dir: Path, dest: Path, pooling: str) -> Path:
    """The tiny BERT, marked up as a sentence-transformers checkpoint trained with `pooling` ("mean" or "cls")."""
    shutil.copytree(tiny_model_dir, dest)
    (dest / "config_sentence_transformers.json").write_text("{}")
    (dest / "1_Pooling").mkdir()
    modes = {"pooling_mode_cls_token": pooling == "cls", "pooling_mode_mean_tokens": pooling == "mean"}
    (dest / "1_Pooling" / "config.json").write_text(json.dumps(modes))
    return dest


def test_auto_pooler_follows_how_the_checkpoint_was_trained(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedtune.client.model import ModelSpec, resolve_pooler

    mean = _as_sentence_transformer(tiny_model_dir, tmp_path / "mean", "mean")
    cls = _as_sentence_transformer(tiny_model_dir, tmp_path / "cls", "cls")
    assert resolve_pooler(ModelSpec(name=str(mean))) == "mean"
    assert resolve_pooler(ModelSpec(name=str(cls))) == "identity"
    assert resolve_pooler(ModelSpec(name=str(tiny_model_dir))) == "checkpoint"
    assert resolve_pooler(ModelSpec(name="minilm")) == "mean"  # the bundled all-MiniLM-L6-v2
    assert resolve_pooler(ModelSpec(name=str(mean), pooler="checkpoint")) == "checkpoint"


def test_mean_pooler_averages_real_tokens_only(tiny_model_dir: Path) -> None:
    import torch

    from fedtune.client.model import ModelSpec, build_model, load_tokenizer

    model = build_model(ModelSpec(name=str(tiny_model_dir), lora=False, pooler="mean"), TINY_LABELS).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    texts = ["good", "so very bad and long and dreadful indeed"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.bert(**batch)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
        assert torch.allclose(out.pooler_output, expected, atol=1e-6)
        # The short row, padded to the long one, gets the logits it gets alone: padding is left out.
        alone = model(**tokenizer(texts[:1], return_tensors="pt")).logits
        assert torch.allclose(model(**batch).logits[0], alone[0], atol=1e-5)


def test_mean_pooler_on_an_architecture_without_one_is_a_clear_error(tmp_path: Path) -> None:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from fedtune.client.model import ModelError, ModelSpec, build_model, load_tokenizer

    config = DistilBertConfig(vocab_size=load_tokenizer("minilm").vocab_size, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    DistilBertForSequenceClassification(config).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="pooler 'mean' needs a BERT classifier"):
        build_model(ModelSpec(name=str(tmp_path), pooler="mean"), TINY_LABELS)


def test_exported_mean_pooled_model_predicts_what_was_trained(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import pipeline

    from fedtune.client.model import ModelSpec, build_model, export_model, load_tokenizer

    model = build_model(ModelSpec(name=str(tiny_model_dir), pooler="mean"), TINY_LABELS).eval()
    with torch.no_grad():  # a head that is not the initial one, so the check sees what travels
        for name, param in model.named_parameters():
            if "classifier" in name and param.requires_grad:
                param.add_(torch.randn_like(param))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    texts = ["good", "so very bad and long and dreadful indeed"]
    with torch.no_grad():
        expected = torch.softmax(model(**tokenizer(texts, padding=True, return_tensors="pt")).logits, -1)
    out = export_model(model, tokenizer, tmp_path / "model")
    classify = pipeline("text-classification", model=str(out), device="cpu", trust_remote_code=True)
    got = [{p["label"]: p["score"] for p in row} for row in classify(texts, top_k=None)]
    assert torch.allclose(torch.tensor([[row[name] for name in TINY_LABELS] for row in got]), expected, atol=1e-5)
    # Without the pooling code the export refuses to load rather than silently pooling [CLS].
    with pytest.raises(ValueError, match="trust_remote_code"):
        pipeline("text-classification", model=str(out), device="cpu", trust_remote_code=False)
